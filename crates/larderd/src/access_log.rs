//! The access log: one line per request, on by default, in the format of the other log lines
//! (`--log-format text|json`, target `larderd::access`, so `LARDER_LOG=…,larderd::access=off`
//! turns it off like any other target).
//!
//! It is written here rather than through `tracing`'s formatter because a tracing event cost a
//! quarter of a small GET's instructions (generic field visitors, `fmt::Debug` per field, the
//! subscriber's per-event bookkeeping), which made an access line more expensive than serving
//! 4 KiB. The line is built in a per-thread buffer and handed to the same buffered writer thread
//! as every other log line, so a request never waits for stderr.
//!
//! On the threads that serve connections, lines are handed over in batches (nginx's
//! `access_log … buffer= flush=`): one line per hand-over cost a tenth of a small GET's CPU at
//! 130k requests/s (an allocation, a channel send, and a wake-up of the writer thread, which
//! spun in `sched_yield` between lines). A batch goes out when it holds [`BATCH_BYTES`] or
//! [`BATCH_DELAY`] after its first line, and when the thread stops serving, so a line waits
//! about that long at most (plus the thread's scheduling) and a graceful stop loses none. Lines from other threads go out one
//! by one as before. Within a thread lines stay in order; lines of different threads (and the
//! thread's other log lines) may interleave up to [`BATCH_DELAY`] out of time order.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What one access line says.
#[derive(Default)]
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'static str,
    pub ns: &'a str,
    pub key: &'a str,
    pub status: u16,
    pub tier: &'a str,
    pub etag: &'a str,
    pub token: &'a str,
    pub micros: u64,
}

struct Sink {
    writer: tracing_appender::non_blocking::NonBlocking,
    json: bool,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends access lines to `writer` (the log writer), as JSON objects or text lines, unless the
/// installed log filter turns target `larderd::access` off. Called once the filter is in place;
/// the filter is never changed afterwards, so it is asked once here instead of on every
/// request (a tenth of an access line's cost).
pub fn install(writer: tracing_appender::non_blocking::NonBlocking, json: bool) {
    if tracing::enabled!(target: "larderd::access", tracing::Level::INFO) {
        let _ = SINK.set(Sink { writer, json });
    }
}

/// Writes the line, stamped `now` (the caller's clock read, which it also uses for the
/// response's `Date`), unless the access log is off (or not installed: unit tests).
pub fn record(line: &AccessLine, now: SystemTime) {
    let Some(sink) = SINK.get() else {
        return;
    };
    BATCH.with_borrow_mut(|batch| {
        let was_empty = batch.lines.is_empty();
        if sink.json {
            format_json(&mut batch.lines, line, now);
        } else {
            format_text(&mut batch.lines, line, now);
        }
        match &batch.flusher {
            None => batch.hand_over(sink),
            Some(_) if batch.lines.len() >= BATCH_BYTES => batch.hand_over(sink),
            Some(flusher) if was_empty => flusher.notify_one(),
            Some(_) => {}
        }
    });
}

/// A batch is handed to the writer thread once it holds this much (about 130 text lines).
/// With the writer's channel bounded at `LOG_CHANNEL_MESSAGES` (main.rs) messages, a stuck stderr
/// holds at most that many batches before requests wait for it.
pub const BATCH_BYTES: usize = 32 << 10;

/// How long a line may wait in its thread's batch.
pub const BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(50);

/// The access lines recorded on this thread and not yet handed to the writer thread.
struct Batch {
    lines: String,
    /// Set while [`flush_this_threads_batches`] runs on this thread; without it each line is
    /// handed over at once.
    flusher: Option<Arc<tokio::sync::Notify>>,
}

impl Batch {
    fn hand_over(&mut self, sink: &Sink) {
        if self.lines.is_empty() {
            return;
        }
        // A failed write means the log thread is gone (shutting down): nothing to do.
        let _ = sink.writer.clone().write_all(self.lines.as_bytes());
        self.lines.clear();
        // A rare long line (a huge key) must not keep its memory for the thread's lifetime.
        if self.lines.capacity() > 2 * BATCH_BYTES {
            self.lines.shrink_to(BATCH_BYTES);
        }
    }
}

thread_local! {
    static BATCH: RefCell<Batch> = const {
        RefCell::new(Batch { lines: String::new(), flusher: None })
    };
}

/// Batches the access lines of the calling thread until the returned future is dropped, which
/// hands over what is left. The future must be polled on this same thread (inside the
/// `block_on` of the thread's single-threaded runtime, not spawned onto a pool): it hands over
/// this thread's batch [`BATCH_DELAY`] after its first line. It never finishes on its own.
pub fn flush_this_threads_batches() -> impl std::future::Future<Output = ()> {
    let flusher = Arc::new(tokio::sync::Notify::new());
    BATCH.with_borrow_mut(|batch| {
        batch.lines.reserve(BATCH_BYTES + 512);
        batch.flusher = Some(flusher.clone());
    });
    let stop_batching = StopBatchingOnDrop;
    async move {
        let _stop_batching = stop_batching;
        loop {
            flusher.notified().await;
            tokio::time::sleep(BATCH_DELAY).await;
            hand_over_this_threads_batch();
        }
    }
}

/// Ends batching on the thread that drops it, handing over what the batch holds.
struct StopBatchingOnDrop;

impl Drop for StopBatchingOnDrop {
    fn drop(&mut self) {
        // `try_with`: during thread teardown the thread-local may already be gone.
        let _ = BATCH.try_with(|batch| batch.borrow_mut().flusher = None);
        hand_over_this_threads_batch();
    }
}

fn hand_over_this_threads_batch() {
    if let Some(sink) = SINK.get() {
        let _ = BATCH.try_with(|batch| batch.borrow_mut().hand_over(sink));
    }
}

/// `TIMESTAMP  INFO larderd::access: request request_id="…" … micros=N`, like tracing's text
/// lines (strings quoted and escaped). Written piece by piece rather than through `format!`:
/// the formatting machinery cost as much as serving a small object.
fn format_text(buf: &mut String, l: &AccessLine, now: SystemTime) {
    push_timestamp(buf, now);
    buf.push_str("  INFO larderd::access: request request_id=");
    push_quoted(buf, l.request_id);
    push_request_fields(buf, l);
    buf.push_str(" micros=");
    push_number(buf, l.micros);
    buf.push('\n');
}

/// ` method=… route=… ns=… key=… status=… tier=… etag=… token=…`.
fn write_request_fields(buf: &mut String, l: &AccessLine) {
    buf.push_str(" method=");
    buf.push_str(l.method);
    buf.push_str(" route=");
    buf.push_str(l.route);
    buf.push_str(" ns=");
    push_quoted(buf, l.ns);
    buf.push_str(" key=");
    push_quoted(buf, l.key);
    buf.push_str(" status=");
    push_number(buf, u64::from(l.status));
    buf.push_str(" tier=");
    push_quoted(buf, l.tier);
    buf.push_str(" etag=");
    push_quoted(buf, l.etag);
    buf.push_str(" token=");
    push_quoted(buf, l.token);
}

/// How many lines' request fields each thread keeps written out.
const CACHED_FIELDS: usize = 256;

/// [`write_request_fields`], copied from a recent line of this thread with the same values
/// when there is one: escaping and joining eight values was half of an access line's
/// instructions. Only lines with an ETag (a revision read or written) are kept.
fn push_request_fields(buf: &mut String, l: &AccessLine) {
    struct Written {
        method: String,
        route: &'static str,
        ns: String,
        key: String,
        status: u16,
        tier: String,
        etag: String,
        token: String,
        fields: String,
    }
    thread_local! {
        static WRITTEN: RefCell<crate::recent::Recent<Written>> =
            RefCell::new(crate::recent::Recent::new(CACHED_FIELDS));
    }
    let digits = l.etag.as_bytes();
    if digits.len() < 9 {
        return write_request_fields(buf, l);
    }
    // An ETag's digits are a digest; the key's last bytes and length tell apart keys holding
    // the same bytes.
    let key = l.key.as_bytes();
    let mut tail = [0u8; 8];
    let tail_len = key.len().min(8);
    tail[..tail_len].copy_from_slice(&key[key.len() - tail_len..]);
    let hash = (u64::from_le_bytes(tail)
        ^ u64::from_le_bytes(std::array::from_fn(|i| digits[1 + i])))
    .wrapping_add(key.len() as u64);
    WRITTEN.with_borrow_mut(|written| {
        let same = |entry: &Written| {
            entry.etag == l.etag
                && entry.key == l.key
                && entry.ns == l.ns
                && entry.status == l.status
                && entry.method == l.method
                && entry.route == l.route
                && entry.tier == l.tier
                && entry.token == l.token
        };
        if let Some(entry) = written.get(hash, same) {
            buf.push_str(&entry.fields);
            return;
        }
        let start = buf.len();
        write_request_fields(buf, l);
        written.keep(hash, || Written {
            method: l.method.to_owned(),
            route: l.route,
            ns: l.ns.to_owned(),
            key: l.key.to_owned(),
            status: l.status,
            tier: l.tier.to_owned(),
            etag: l.etag.to_owned(),
            token: l.token.to_owned(),
            fields: buf[start..].to_owned(),
        });
    });
}

/// `"s"` with Rust's string escapes (as tracing writes `{:?}` fields); the escape machinery only
/// for the strings that need it.
fn push_quoted(buf: &mut String, s: &str) {
    // Most values (a namespace, a key, a tier) need no escape: checked a word at a time, the
    // last word padded, where the scan below would take a short string byte by byte.
    if needs_no_escape(s) {
        buf.push('"');
        buf.push_str(s);
        buf.push('"');
        return;
    }
    // A value in quotes (an ETag, the commonest) with nothing else to escape: its two quotes
    // escaped directly, instead of the byte-by-byte path the scan would take for each.
    if let Some(inner) = s.strip_prefix('"').and_then(|rest| rest.strip_suffix('"'))
        && needs_no_escape(inner)
    {
        buf.push_str("\"\\\"");
        buf.push_str(inner);
        buf.push_str("\\\"\"");
        return;
    }
    let start = buf.len();
    buf.push('"');
    let bytes = s.as_bytes();
    // Copied in runs: `plain..at` needs no escape.
    let (mut plain, mut at) = (0, 0);
    while at < bytes.len() {
        // Eight bytes at a time while none needs a look: a byte-by-byte scan of the six strings
        // of an access line cost more than the rest of the line.
        if let Some(word) = bytes.get(at..at + 8)
            && needs_a_look(u64::from_le_bytes(word.try_into().unwrap_or_default())) == 0
        {
            at += 8;
            continue;
        }
        let b = bytes[at];
        if b == b'"' || b == b'\\' {
            buf.push_str(&s[plain..at]);
            buf.push('\\');
            plain = at;
        } else if !(b' '..=b'~').contains(&b) {
            // Printable ASCII needs escapes only for the quote and the backslash; anything
            // else is left to the escape machinery.
            buf.truncate(start);
            let _ = write!(buf, "{s:?}");
            return;
        }
        at += 1;
    }
    buf.push_str(&s[plain..]);
    buf.push('"');
}

/// Whether every byte of `s` is printable ASCII other than a quote or a backslash.
fn needs_no_escape(s: &str) -> bool {
    let mut words = s.as_bytes().chunks_exact(8);
    let clean_words = words
        .by_ref()
        .all(|w| needs_a_look(u64::from_le_bytes(w.try_into().unwrap_or_default())) == 0);
    // The last few bytes as a word too, filled up with a byte that needs no look.
    let mut last = [b'a'; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    clean_words && needs_a_look(u64::from_le_bytes(last)) == 0
}

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// Non-zero when a byte of `w` is outside `' '..='~'`, a quote or a backslash.
fn needs_a_look(w: u64) -> u64 {
    // Per byte, the high bit of `x - n` where `x` had it clear: set for some byte exactly when
    // one is below `n` (n ≤ 0x80).
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS;
    let equal = |x: u64, b: u8| below(x ^ (ONES * u64::from(b)), 1);
    below(w, b' ') | (w & HIGHS) | equal(w, 0x7f) | equal(w, b'"') | equal(w, b'\\')
}

/// `n` in decimal (`format!` costs more than the rest of a line; a digit-at-a-time loop and
/// its UTF-8 check were 4 % of a small GET's instructions, callgrind).
fn push_number(buf: &mut String, n: u64) {
    buf.push_str(itoa::Buffer::new().format(n));
}

/// RFC 3339 with microseconds, UTC (`2026-11-29T11:24:33.123456Z`); the part up to the second
/// is formatted once a second per thread.
fn push_timestamp(buf: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = since.as_secs();
    SECOND.with_borrow_mut(|(at, prefix)| {
        if *at != second {
            *at = second;
            let whole = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(second));
            *prefix = whole.to_string();
            prefix.pop(); // the 'Z'
            prefix.push('.');
        }
        buf.push_str(prefix);
    });
    let micros = u64::from(since.subsec_micros());
    // "1xxxxxx" → "xxxxxx": six digits with leading zeros.
    buf.push_str(&itoa::Buffer::new().format(micros + 1_000_000)[1..]);
    buf.push('Z');
}

/// The shape of tracing's JSON lines: `{"timestamp", "level", "fields": {…}, "target"}`.
fn format_json(buf: &mut String, l: &AccessLine, now: SystemTime) {
    #[derive(serde::Serialize)]
    struct Fields<'a> {
        message: &'static str,
        request_id: &'a str,
        method: &'a str,
        route: &'a str,
        ns: &'a str,
        key: &'a str,
        status: u16,
        tier: &'a str,
        etag: &'a str,
        token: &'a str,
        micros: u64,
    }
    #[derive(serde::Serialize)]
    struct Line<'a> {
        timestamp: String,
        level: &'static str,
        fields: Fields<'a>,
        target: &'static str,
    }
    let line = Line {
        timestamp: humantime::format_rfc3339_micros(now).to_string(),
        level: "INFO",
        fields: Fields {
            message: "request",
            request_id: l.request_id,
            method: l.method,
            route: l.route,
            ns: l.ns,
            key: l.key,
            status: l.status,
            tier: l.tier,
            etag: l.etag,
            token: l.token,
            micros: l.micros,
        },
        target: "larderd::access",
    };
    // Serializing borrowed strings and numbers into a String cannot fail.
    if let Ok(text) = serde_json::to_string(&line) {
        buf.push_str(&text);
        buf.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>() -> AccessLine<'a> {
        AccessLine {
            request_id: "job \"7\"",
            method: "GET",
            route: "object",
            ns: "ci",
            key: "a b/c",
            status: 206,
            tier: "disk",
            etag: "\"abc\"",
            token: "",
            micros: 42,
        }
    }

    #[test]
    fn json_lines_have_tracings_shape_and_escape_what_they_carry() {
        let mut buf = String::new();
        format_json(&mut buf, &sample(), SystemTime::now());
        assert!(buf.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        assert_eq!(v["target"], "larderd::access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["status"], 206);
        assert_eq!(v["fields"]["request_id"], "job \"7\"");
        assert_eq!(v["fields"]["etag"], "\"abc\"");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn hand_written_pieces_read_as_the_formatting_machinery_writes_them() {
        for s in [
            "",
            "plain/key.tar",
            "a b",
            "q\"uote",
            "back\\slash",
            "new\nline",
            "é",
            "\u{7f}",
            "\"0123456789abcdef\"",
            "\"\"",
            "\"",
            "\"in \"quotes\"",
            "\"back\\slash\"",
            "\"é\"",
            "\"tab\there\"",
            "\"ends-in-a-remainder-of-5\"",
            "exactly8",
            "seven\"\\",
            "tab\there",
            "\u{1f}\u{20}",
        ] {
            let mut buf = String::new();
            push_quoted(&mut buf, s);
            assert_eq!(buf, format!("{s:?}"));
        }
        // Every byte value at every position of a word, against the formatting machinery.
        for b in 0u8..=0x7f {
            for at in 0..17 {
                let mut s = "x".repeat(17);
                s.replace_range(at..=at, std::str::from_utf8(&[b]).unwrap());
                let mut buf = String::new();
                push_quoted(&mut buf, &s);
                assert_eq!(buf, format!("{s:?}"), "byte {b:#x} at {at}");
                // And in quotes, as an ETag is.
                let quoted = format!("\"{s}\"");
                let mut buf = String::new();
                push_quoted(&mut buf, &quoted);
                assert_eq!(buf, format!("{quoted:?}"), "byte {b:#x} at {at}, quoted");
            }
        }
        for n in [0, 7, 10, 99_999, u64::MAX] {
            let mut buf = String::new();
            push_number(&mut buf, n);
            assert_eq!(buf, n.to_string());
        }
        for micros in [
            0u64,
            1,
            999_999,
            1_764_000_000_123_456,
            1_764_000_001_000_007,
        ] {
            let at = UNIX_EPOCH + Duration::from_micros(micros);
            let mut buf = String::new();
            push_timestamp(&mut buf, at);
            assert_eq!(buf, humantime::format_rfc3339_micros(at).to_string());
        }
    }

    #[test]
    fn a_lines_fields_copied_from_an_earlier_line_are_its_own() {
        let fresh = |l: &AccessLine| {
            let mut buf = String::new();
            write_request_fields(&mut buf, l);
            buf
        };
        let pushed = |l: &AccessLine| {
            let mut buf = String::new();
            push_request_fields(&mut buf, l);
            buf
        };
        let etag = format!("\"{}\"", "0123456789abcdef".repeat(4));
        let first = AccessLine {
            etag: &etag,
            key: "one/common-tail",
            ..sample()
        };
        for _ in 0..3 {
            assert_eq!(pushed(&first), fresh(&first));
        }
        // Each value differing alone from a line already written.
        let variants = [
            // The same length and last bytes as the first key: the same hash.
            AccessLine {
                key: "two/common-tail",
                ..first
            },
            AccessLine {
                ns: "other",
                ..first
            },
            AccessLine {
                status: 304,
                ..first
            },
            AccessLine {
                method: "HEAD",
                ..first
            },
            AccessLine {
                route: "bazel_cas",
                ..first
            },
            AccessLine {
                tier: "s3",
                ..first
            },
            AccessLine {
                token: "ci",
                ..first
            },
            AccessLine {
                etag: "\"0123456789abcdef-other\"",
                ..first
            },
        ];
        for variant in &variants {
            assert_eq!(pushed(variant), fresh(variant));
            assert_eq!(pushed(&first), fresh(&first));
        }
        // Lines without an ETag are written each time.
        let no_etag = AccessLine { etag: "", ..first };
        assert_eq!(pushed(&no_etag), fresh(&no_etag));
        // More lines than a thread keeps, each key read twice.
        let keys: Vec<String> = (0..CACHED_FIELDS * 2).map(|i| format!("key-{i}")).collect();
        for key in keys.iter().chain(keys.iter()) {
            let line = AccessLine { key, ..first };
            assert_eq!(pushed(&line), fresh(&line));
        }
    }

    #[test]
    fn text_lines_quote_strings_so_a_key_cannot_forge_fields() {
        let mut buf = String::new();
        let mut line = sample();
        line.key = "k status=200\nfake";
        format_text(&mut buf, &line, SystemTime::now());
        assert_eq!(buf.matches('\n').count(), 1, "{buf}");
        assert!(buf.contains(r#"key="k status=200\nfake""#), "{buf}");
        assert!(buf.contains("status=206 "), "{buf}");
    }
}

//! The access log: one line per request, on by default, in the format of the other log lines
//! (`--log-format text|json`, target `larderd::access`, so `LARDER_LOG=…,larderd::access=off`
//! turns it off like any other target).
//!
//! It is written here rather than through `tracing`'s formatter because a tracing event cost a
//! quarter of a small GET's instructions (generic field visitors, `fmt::Debug` per field, the
//! subscriber's per-event bookkeeping), which made an access line more expensive than serving
//! 4 KiB. The line is built in a per-thread buffer and handed whole to the same buffered writer
//! thread as every other log line, so a request never waits for stderr.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::SystemTime;

/// What one access line says.
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

/// Sends access lines to `writer` (the log writer), as JSON objects or text lines.
pub fn install(writer: tracing_appender::non_blocking::NonBlocking, json: bool) {
    let _ = SINK.set(Sink { writer, json });
}

/// Writes the line, unless the access log is off (or not installed: unit tests).
pub fn record(line: &AccessLine) {
    let Some(sink) = SINK.get() else {
        return;
    };
    if !tracing::enabled!(target: "larderd::access", tracing::Level::INFO) {
        return;
    }
    thread_local! {
        static BUFFER: RefCell<String> = RefCell::new(String::with_capacity(512));
    }
    BUFFER.with_borrow_mut(|buf| {
        buf.clear();
        if sink.json {
            format_json(buf, line);
        } else {
            format_text(buf, line);
        }
        // A failed write means the log thread is gone (shutting down): nothing to do.
        let _ = sink.writer.clone().write_all(buf.as_bytes());
    });
}

fn timestamp() -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_micros(SystemTime::now())
}

/// `TIMESTAMP  INFO larderd::access: request request_id="…" … micros=N`, like tracing's text
/// lines (strings quoted and escaped).
fn format_text(buf: &mut String, l: &AccessLine) {
    let _ = writeln!(
        buf,
        "{}  INFO larderd::access: request request_id={:?} method={} route={} ns={:?} key={:?} \
         status={} tier={:?} etag={:?} token={:?} micros={}",
        timestamp(),
        l.request_id,
        l.method,
        l.route,
        l.ns,
        l.key,
        l.status,
        l.tier,
        l.etag,
        l.token,
        l.micros
    );
}

/// The shape of tracing's JSON lines: `{"timestamp", "level", "fields": {…}, "target"}`.
fn format_json(buf: &mut String, l: &AccessLine) {
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
        timestamp: timestamp().to_string(),
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
        format_json(&mut buf, &sample());
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
    fn text_lines_quote_strings_so_a_key_cannot_forge_fields() {
        let mut buf = String::new();
        let mut line = sample();
        line.key = "k status=200\nfake";
        format_text(&mut buf, &line);
        assert_eq!(buf.matches('\n').count(), 1, "{buf}");
        assert!(buf.contains(r#"key="k status=200\nfake""#), "{buf}");
        assert!(buf.contains("status=206 "), "{buf}");
    }
}

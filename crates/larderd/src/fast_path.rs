//! The HTTP/1.1 fast path: plain-HTTP connections start here, and the requests CI fleets send by
//! the thousand — a GET or HEAD of one object, or of a range of it, with nothing but validators
//! and a token, on the object route or as a Bazel blob or action result ([`ReadRoute`]) — are
//! parsed, answered and written without hyper. Serving a small object from disk costs a few
//! microseconds; hyper's connection machinery (dispatch, header maps in and out, its encoder)
//! cost more than the lookup and the write together. A large body from disk is
//! handed to the kernel (`sendfile`) instead of being copied through user space.
//!
//! Only the transport is replaced. What a request means is decided by the same code as on the
//! general path ([`api::read_object`] → the tier → the field plan [`api::respond`] follows too),
//! so status, headers, access line and metrics are those of any other request. Anything else — another route or method, a
//! header outside the short list below, a body, a malformed or oversized head, HTTP/1.0 — hands
//! the connection to hyper for good, with the bytes read so far, before anything happened. An
//! answer whose body is neither from disk nor small and ready (a read through S3) is handed
//! over too, together with its request: hyper parses the same request again and the
//! connection's service answers it with the response already decided, so a request is never
//! executed twice.
//!
//! `LARDER_FAST_PATH=0` turns it off (every connection goes to hyper), for comparisons.

use crate::api::{self, Body, FieldValue, ObjectRead, ReadAnswer, ReadRoute, State};
use crate::io::SendFile;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use larder_tier::FileRegion;
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// Header fields a request head may have on the fast path; more is hyper's business.
const MAX_FIELDS: usize = 16;

/// Bodies up to this size are written with their head in one go; larger ones from disk are sent
/// from their file, others go to hyper.
const SMALL_BODY: u64 = api::SMALL_READ;

/// Room for request heads; grows only for a pipelined burst.
const READ_BUFFER: usize = 8 * 1024;

/// Whether the fast path is on (`LARDER_FAST_PATH=0` turns it off), read once.
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LARDER_FAST_PATH").map_or(true, |v| v != "0"))
}

/// How the fast path left a connection.
pub(crate) enum Outcome<T> {
    /// Finished: closed by the client, timed out, failed, or the server is stopping.
    Closed,
    /// hyper serves the rest: `unread` are the bytes received and not yet answered, and
    /// `answer` the response to the first request in them when it was already decided.
    HandOver {
        io: T,
        unread: Bytes,
        answer: Option<Response<Body>>,
    },
}

pub(crate) struct Limits {
    /// Time allowed for a whole request head, and for a keep-alive connection to send one.
    pub header_timeout: Duration,
    /// Longest request head (request line and fields) the fast path reads.
    pub max_head: usize,
    pub max_fields: usize,
}

/// Serves requests on `io` until the connection closes or a request needs hyper.
pub(crate) async fn serve<T: AsyncRead + AsyncWrite + SendFile + Unpin>(
    state: &State,
    mut io: T,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) -> Outcome<T> {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut out = Vec::with_capacity(READ_BUFFER);
    // A second look at the stop signal that does not wait on it, to tell whether `stopping`
    // needs polling again.
    let mut stop_news = stop.clone();
    stop_news.borrow_and_update();
    // Registered once for the connection, not once per request.
    let stopping = stop.wait_for(|stop| *stop);
    tokio::pin!(stopping);
    // One timer for the connection's life. Each answer moves `deadline`; the timer is only
    // re-armed when it fires before the deadline it should be at. Arming and clearing a timer
    // per request cost more than parsing the request head.
    let mut deadline = Instant::now() + limits.header_timeout;
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    // Whether `stopping` and `timer` hold this task's waker. Once they do, they wake the task
    // when they are due and need no poll before: polling both whenever the read was not ready
    // (once per request) cost a tenth of the instructions of a small GET.
    let (mut stopping_registered, mut timer_registered) = (false, false);
    loop {
        let request = loop {
            if !buf.is_empty() {
                match parse(&buf, limits) {
                    Parsed::Request(request) => break request,
                    Parsed::Partial => {}
                    Parsed::NotOurs => {
                        return Outcome::HandOver {
                            io,
                            unread: buf.freeze(),
                            answer: None,
                        };
                    }
                }
            }
            let idle = buf.is_empty();
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(READ_BUFFER);
            }
            // The read comes first: a request that has arrived is read without looking at the
            // other two, which is most of the time under load.
            let woken = {
                let mut read = std::pin::pin!(io.read_buf(&mut buf));
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(read) = read.as_mut().poll(cx) {
                        return Poll::Ready(Woken::Read(read));
                    }
                    // Between requests a stopping server closes the connection; a request
                    // already arriving is read to its end and answered.
                    if idle && (!stopping_registered || stop_news.has_changed().unwrap_or(true)) {
                        stopping_registered = true;
                        if stopping.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Woken::Stopping);
                        }
                    }
                    if !timer_registered || timer.is_elapsed() {
                        timer_registered = true;
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Woken::Timer);
                        }
                    }
                    Poll::Pending
                })
                .await
            };
            match woken {
                Woken::Read(Ok(0) | Err(_)) | Woken::Stopping => return Outcome::Closed,
                Woken::Read(Ok(_)) => {}
                Woken::Timer if Instant::now() < deadline => {
                    timer.as_mut().reset(deadline);
                    // Polled once more to be sure it holds the waker (tokio's keeps it from
                    // the poll that saw it fire, but does not promise to).
                    timer_registered = false;
                }
                Woken::Timer => {
                    if !idle {
                        crate::metrics::limit_rejected("header_timeout");
                        let answer = crate::server::request_timeout_answer(limits.header_timeout);
                        let _ = io.write_all(answer.as_bytes()).await;
                        let _ = io.shutdown().await;
                    }
                    return Outcome::Closed;
                }
            }
        };
        let head_len = request.head_len;
        let head = request.head;
        // The one monotonic clock read before the answer: the request's start for its
        // duration, and, for an answer written at once, where the next head's time starts.
        let started = std::time::Instant::now();
        let (close, after_head) = match request.answer(state, started).await {
            // Nothing happened yet: hyper answers it from scratch.
            None => {
                return Outcome::HandOver {
                    io,
                    unread: buf.freeze(),
                    answer: None,
                };
            }
            Some(ReadAnswer::Small {
                status,
                meta,
                range,
                body,
                request_id,
                answered_at,
            }) => {
                encode_read(&mut out, status, &meta, range, &request_id, answered_at);
                let bodiless = head || status == StatusCode::NOT_MODIFIED || body.is_empty();
                (false, (!bodiless).then_some(AfterHead::Bytes(body)))
            }
            Some(ReadAnswer::File {
                status,
                meta,
                range,
                region,
                body,
                request_id,
                answered_at,
            }) => {
                // The head only: the body follows from the file, or is copied from the tier's
                // stream when sendfile is off.
                encode_read(&mut out, status, &meta, range, &request_id, answered_at);
                let large = match body {
                    Some(body) if !sendfile_enabled() => AfterHead::Stream(body),
                    _ => AfterHead::File(region),
                };
                (false, Some(large))
            }
            Some(ReadAnswer::Broken) => return Outcome::Closed,
            Some(ReadAnswer::Response(response, served_by)) => {
                match collect_small(response, served_by).await {
                    Collected::Small(parts, body) => (encode(&mut out, &parts, &body, head), None),
                    Collected::Large(response) => {
                        return Outcome::HandOver {
                            io,
                            unread: buf.freeze(),
                            answer: Some(response),
                        };
                    }
                    Collected::Failed => return Outcome::Closed,
                }
            }
        };
        let large = matches!(after_head, Some(AfterHead::File(_) | AfterHead::Stream(_)));
        let written = match after_head {
            // One write from two buffers: copying the body behind the head cost more than
            // the kernel's gathering it.
            Some(AfterHead::Bytes(body)) => {
                write_all_vectored(
                    &mut io,
                    &mut [io::IoSlice::new(&out), io::IoSlice::new(&body)],
                )
                .await
            }
            Some(AfterHead::File(region)) => send_region(&mut io, &out, &region).await,
            Some(AfterHead::Stream(body)) => copy_body(&mut io, &out, body).await,
            None => io.write_all(&out).await,
        };
        // After a failure part of the answer may have gone out: the connection cannot say
        // anything more.
        if written.is_err() || close {
            return Outcome::Closed;
        }
        // A small answer went out microseconds after `started`; a large one may have taken
        // minutes, and the client's next head gets its full time from the answer's end.
        deadline = if large {
            Instant::now()
        } else {
            Instant::from_std(started)
        } + limits.header_timeout;
        if out.capacity() > 4 * SMALL_BODY as usize {
            out = Vec::with_capacity(READ_BUFFER);
        }
        buf.advance(head_len);
    }
}

/// What ended a wait for the next bytes of a request head.
enum Woken {
    Read(io::Result<usize>),
    Stopping,
    Timer,
}

enum Parsed<'a> {
    Request(Request<'a>),
    Partial,
    NotOurs,
}

/// A request the fast path takes: a GET or HEAD of an object, HTTP/1.1, no body.
struct Request<'a> {
    head_len: usize,
    head: bool,
    route: ReadRoute,
    ns: &'a str,
    key: &'a str,
    request_id: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
    if_match: Option<&'a str>,
    if_none_match: Option<&'a str>,
    range: Option<&'a str>,
}

impl Request<'_> {
    async fn answer(&self, state: &State, started: std::time::Instant) -> Option<ReadAnswer> {
        let request_id = api::RequestId::of_request(self.request_id);
        let authorization = match self.authorization {
            Some(v) => Some(HeaderValue::from_bytes(v).ok()?),
            None => None,
        };
        api::read_object(
            state,
            ObjectRead {
                route: self.route,
                ns: self.ns,
                key: self.key,
                head: self.head,
                request_id,
                authorization,
                if_match: self.if_match,
                if_none_match: self.if_none_match,
                range: self.range,
            },
            started,
        )
        .await
    }
}

fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<'a> {
    // Left unwritten until parsed: zeroing sixteen fields per request cost more than the
    // fields a request has.
    let mut fields = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= limits.max_head => return Parsed::Partial,
        _ => return Parsed::NotOurs,
    };
    if head_len > limits.max_head || req.headers.len() > limits.max_fields || req.version != Some(1)
    {
        return Parsed::NotOurs;
    }
    let head = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Parsed::NotOurs,
    };
    // Only paths hyper's URI parser takes as they are, so that a request handed over with its
    // answer is the same request when hyper reads it.
    let Some((route, ns, key)) = req
        .path
        .filter(|p| p.bytes().all(plain_path_byte))
        .and_then(ReadRoute::of_path)
    else {
        return Parsed::NotOurs;
    };
    let mut request = Request {
        head_len,
        head,
        route,
        ns,
        key,
        request_id: None,
        authorization: None,
        if_match: None,
        if_none_match: None,
        range: None,
    };
    for field in req.headers.iter() {
        let name = field.name;
        // Gradle says who it is in its own field, as others do in `User-Agent`.
        let fine = if name.eq_ignore_ascii_case("host")
            || name.eq_ignore_ascii_case("user-agent")
            || name.eq_ignore_ascii_case("accept")
            || name.eq_ignore_ascii_case("accept-encoding")
            || name.eq_ignore_ascii_case("x-gradle-version")
        {
            true
        } else if name.eq_ignore_ascii_case("connection") {
            field.value.eq_ignore_ascii_case(b"keep-alive")
        } else if name.eq_ignore_ascii_case("x-request-id") {
            request.request_id.replace(field.value).is_none()
        } else if name.eq_ignore_ascii_case("authorization") {
            request.authorization.replace(field.value).is_none()
        } else if name.eq_ignore_ascii_case("if-match") {
            request.if_match.replace(header_text(field.value)).is_none()
        } else if name.eq_ignore_ascii_case("if-none-match") {
            request
                .if_none_match
                .replace(header_text(field.value))
                .is_none()
        } else if name.eq_ignore_ascii_case("range") {
            request.range.replace(header_text(field.value)).is_none()
        } else {
            false
        };
        if !fine {
            return Parsed::NotOurs;
        }
    }
    Parsed::Request(request)
}

/// RFC 3986 path characters: unreserved, sub-delims, `:`, `@`, `/` and percent-escapes.
fn plain_path_byte(b: u8) -> bool {
    const PLAIN: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            table[b] = c.is_ascii_alphanumeric();
            b += 1;
        }
        let extra = b"-._~!$&'()*+,;=:@/%";
        let mut i = 0;
        while i < extra.len() {
            table[extra[i] as usize] = true;
            i += 1;
        }
        table
    };
    PLAIN[b as usize]
}

/// A field value as the general path reads it (`HeaderValue::to_str`): visible ASCII, else `""`
/// (an `If-Match` then matches nothing) — never "absent".
fn header_text(value: &[u8]) -> &str {
    if value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        std::str::from_utf8(value).unwrap_or("")
    } else {
        ""
    }
}

enum Collected {
    Small(http::response::Parts, Bytes),
    Large(Response<Body>),
    /// The body failed before it was complete; the connection cannot be used any more.
    Failed,
}

/// The whole body when it is small and at hand: a buffer (reasons, HEAD, 304) or an object
/// read from the local disk, whose first read holds it whole.
async fn collect_small(response: Response<Body>, served_by: &str) -> Collected {
    let from_disk = served_by == "disk";
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let exact = response.body().size_hint().exact();
    let small = match (exact, declared) {
        (Some(n), _) => n <= SMALL_BODY,
        (None, Some(n)) => from_disk && n <= SMALL_BODY,
        (None, None) => false,
    };
    if !small {
        return Collected::Large(response);
    }
    let (parts, body) = response.into_parts();
    match body.collect().await {
        Ok(collected) => Collected::Small(parts, collected.to_bytes()),
        Err(_) => Collected::Failed,
    }
}

/// Writes status line, fields and body into `out`; true when the connection closes after it.
fn encode(out: &mut Vec<u8>, parts: &http::response::Parts, body: &Bytes, head: bool) -> bool {
    out.clear();
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // As hyper does: the length of a body that has none declared, and the date.
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if !bodiless && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: ");
        push_number(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        http_date(|date| out.extend_from_slice(date));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head && !bodiless {
        out.extend_from_slice(body);
    }
    parts
        .headers
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// The head of a read's 200, 206 or 304, its fields from the plan `api::respond` follows too;
/// the body, if any, goes out from its own buffer. `answered_at` is the `Date`.
fn encode_read(
    out: &mut Vec<u8>,
    status: StatusCode,
    meta: &larder_tier::ObjectMeta,
    range: Option<larder_proto::ByteRange>,
    request_id: &api::RequestId,
    answered_at: SystemTime,
) {
    out.clear();
    if status == StatusCode::OK && range.is_none() {
        whole_body_fields(out, meta);
    } else {
        revision_fields(out, status, meta, range);
    }
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(request_id.as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    // A revision committed while this read was looked up (after the clock was read) must not
    // look modified after the answer's date.
    http_date_of(answered_at.max(meta.last_modified), |date| {
        out.extend_from_slice(date)
    });
    out.extend_from_slice(b"\r\n\r\n");
}

/// The status line and the fields that depend only on the revision and the range (all but
/// the request id and `Date`).
fn revision_fields(
    out: &mut Vec<u8>,
    status: StatusCode,
    meta: &larder_tier::ObjectMeta,
    range: Option<larder_proto::ByteRange>,
) {
    out.extend_from_slice(match status {
        StatusCode::OK => b"HTTP/1.1 200 OK\r\n",
        StatusCode::PARTIAL_CONTENT => b"HTTP/1.1 206 Partial Content\r\n",
        _ => b"HTTP/1.1 304 Not Modified\r\n",
    });
    let mut field = |name: &str, value: FieldValue<'_>| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        match value {
            FieldValue::Text(text) => out.extend_from_slice(text.as_bytes()),
            FieldValue::Number(n) => push_number(out, n),
            FieldValue::ETag(etag) => out.extend_from_slice(etag.quoted().as_bytes()),
            FieldValue::Date(at) => http_date_of(at, |date| out.extend_from_slice(date)),
            FieldValue::Owned(text) => out.extend_from_slice(text.as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    };
    if status != StatusCode::NOT_MODIFIED {
        let len = range.map_or(meta.size, |r| r.len);
        api::body_fields(meta, len, range, &mut field);
    } else {
        api::not_modified_fields(meta, &mut field);
    }
}

/// How many revisions' fields of a whole 200 each thread keeps written out.
const CACHED_HEADS: usize = 256;

/// [`revision_fields`] of a whole 200 (or its HEAD), as written for a recent read of the same
/// revision on this thread. Writing them costs a check of every stored header, a number, the
/// ETag and a date, about a tenth of a small GET's instructions (callgrind).
fn whole_body_fields(out: &mut Vec<u8>, meta: &larder_tier::ObjectMeta) {
    /// The fields were written from these. Holding the stored headers' `Arc` keeps its address
    /// from being reused by other headers while the entry lives, so the same address means the
    /// same headers.
    struct Written {
        headers: std::sync::Arc<[(String, String)]>,
        etag: larder_proto::ETag,
        size: u64,
        last_modified: SystemTime,
        fields: Vec<u8>,
    }
    thread_local! {
        static WRITTEN: RefCell<crate::recent::Recent<Written>> =
            RefCell::new(crate::recent::Recent::new(CACHED_HEADS));
    }
    // Each revision has stored headers of its own; the ETag's digits tell apart revisions that
    // might share them.
    let address = std::sync::Arc::as_ptr(&meta.headers).cast::<u8>() as usize as u64;
    let digits = meta.etag.as_str().as_bytes();
    // One load of the first eight digits (an ETag has 64): built byte by byte, the optimizer
    // kept eight bounds checks in some builds.
    let first_digits = digits.first_chunk::<8>().copied().unwrap_or_default();
    let hash = address ^ u64::from_le_bytes(first_digits);
    WRITTEN.with_borrow_mut(|written| {
        let same = |entry: &Written| {
            std::sync::Arc::ptr_eq(&entry.headers, &meta.headers)
                && entry.size == meta.size
                && entry.last_modified == meta.last_modified
                && entry.etag == meta.etag
        };
        if let Some(entry) = written.get(hash, same) {
            out.extend_from_slice(&entry.fields);
            return;
        }
        let start = out.len();
        revision_fields(out, StatusCode::OK, meta, None);
        written.keep(hash, || Written {
            headers: meta.headers.clone(),
            etag: meta.etag.clone(),
            size: meta.size,
            last_modified: meta.last_modified,
            fields: out[start..].to_vec(),
        });
    });
}

/// Most bytes handed to the kernel in one `sendfile`: a connection sending a large object yields
/// between calls, so the thread's other connections are not held up behind it. Measured on
/// loopback: one 1 GiB download ran at 2.3 GB/s with 128–256 KiB per call, 1.7–1.8 GB/s with
/// 1–4 MiB (BENCHMARKS.md, performance round 4).
const SEND_FILE_CHUNK: u64 = 256 << 10;

/// A body the fast path sends after the head, not from the same buffer.
enum AfterHead {
    /// Small and whole in memory: written with the head in one call.
    Bytes(Bytes),
    /// Large, from disk.
    File(FileRegion),
    Stream(larder_tier::BodyStream),
}

/// Whether large bodies from disk go out with `sendfile` (`LARDER_SENDFILE=0` copies them
/// through user space instead), read once.
pub(crate) fn sendfile_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LARDER_SENDFILE").map_or(true, |v| v != "0"))
}

/// Sends `head`, then the chunks of `body`, the first with the head in one write.
async fn copy_body<T: AsyncWrite + Unpin>(
    io: &mut T,
    head: &[u8],
    mut body: larder_tier::BodyStream,
) -> io::Result<()> {
    use futures_util::StreamExt;
    let mut head = Some(head);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| io::Error::other(e.chain()))?;
        crate::metrics::bytes_served("disk", chunk.len() as u64);
        match head.take() {
            Some(head) => {
                write_all_vectored(io, &mut [io::IoSlice::new(head), io::IoSlice::new(&chunk)])
                    .await?
            }
            None => io.write_all(&chunk).await?,
        }
    }
    match head {
        // The tier promised bytes and sent none.
        Some(_) => Err(io::ErrorKind::UnexpectedEof.into()),
        None => Ok(()),
    }
}

async fn write_all_vectored<T: AsyncWrite + Unpin>(
    io: &mut T,
    mut slices: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        match io.write_vectored(slices).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => io::IoSlice::advance_slices(&mut slices, n),
        }
    }
    Ok(())
}

/// Sends `head`, then the bytes of `region`.
async fn send_region<T: SendFile>(io: &mut T, head: &[u8], region: &FileRegion) -> io::Result<()> {
    let mut written = 0;
    while written < head.len() {
        match std::future::poll_fn(|cx| io.poll_write_more(cx, &head[written..])).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => written += n,
        }
    }
    let mut sent = 0;
    while sent < region.len {
        let offset = region.offset + sent;
        let want = (region.len - sent).min(SEND_FILE_CHUNK) as usize;
        let n =
            std::future::poll_fn(|cx| io.poll_send_file(cx, &region.file, offset, want)).await?;
        if n == 0 {
            // Revision files are never shortened: this one is damaged.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "revision file shorter than its header says",
            ));
        }
        crate::metrics::bytes_served("disk", n as u64);
        sent += n as u64;
    }
    Ok(())
}

fn push_number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `Last-Modified` values: formatting a date cost as much as the lookup of the object, and a
/// fleet reads the same few revisions over and over; a few per thread, by second.
fn http_date_of(at: SystemTime, with: impl FnOnce(&[u8])) {
    const SLOTS: usize = 16;
    thread_local! {
        static CACHED: RefCell<[(u64, String); SLOTS]> =
            RefCell::new(std::array::from_fn(|_| (u64::MAX, String::new())));
    }
    let second = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|slots| {
        let (cached_at, text) = &mut slots[(second % SLOTS as u64) as usize];
        if *cached_at != second {
            *cached_at = second;
            *text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(second));
        }
        with(text.as_bytes());
    });
}

/// The current `Date` value, formatted once a second per thread.
fn http_date(with: impl FnOnce(&[u8])) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        with(text.as_bytes());
    });
}

/// The connection as hyper gets it: first the bytes the fast path read and did not answer.
pub(crate) struct Rewind<T> {
    unread: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(inner: T, unread: Bytes) -> Rewind<T> {
        Rewind { unread, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(1),
            max_head: 8192,
            max_fields: 100,
        }
    }

    fn ours(head: &str) -> bool {
        matches!(parse(head.as_bytes(), &limits()), Parsed::Request(_))
    }

    #[test]
    fn takes_plain_object_reads_and_leaves_everything_else_to_hyper() {
        assert!(ours(
            "GET /api/v1/object/ci/a/b.tar HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        assert!(ours(
            "HEAD /api/v1/object/ci/k HTTP/1.1\r\nIf-None-Match: \"e\"\r\nAuthorization: Bearer t\r\nX-Request-Id: r1\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(ours(
            "GET /api/v1/object/ci/k HTTP/1.1\r\nRange: bytes=0-1\r\nIf-Match: \"e\"\r\n\r\n"
        ));
        for other in [
            "PUT /api/v1/object/ci/k HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            "GET /api/v1/object/ci/k HTTP/1.0\r\n\r\n",
            "GET /api/v1/object/ci/k?x=1 HTTP/1.1\r\n\r\n",
            "GET /api/v1/object/ci/k{x} HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n\r\n",
            "GET /api/v1/object/ci/k HTTP/1.1\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n",
            "GET /api/v1/object/ci/k HTTP/1.1\r\nRange: bytes=0-1\r\nIf-Range: \"e\"\r\n\r\n",
            "GET /api/v1/object/ci/k HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /api/v1/object/ci/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /api/v1/object/ci/k HTTP/1.1\r\nIf-Match: \"a\"\r\nIf-Match: \"b\"\r\n\r\n",
            "BREW /api/v1/object/ci/k HTTP/1.1\r\n\r\n",
        ] {
            assert!(!ours(other), "{other:?} goes to hyper");
        }
        assert!(matches!(
            parse(b"GET /api/v1/object/ci/k HTTP/1.1\r\nHost:", &limits()),
            Parsed::Partial
        ));
        let long = format!(
            "GET /api/v1/object/ci/{} HTTP/1.1\r\n\r\n",
            "k".repeat(9000)
        );
        assert!(
            !ours(&long),
            "a head over the limit goes to hyper, which answers 431"
        );
    }

    #[test]
    fn cached_dates_and_numbers_read_as_formatted_ones() {
        for secs in [0u64, 1, 16, 17, 1_764_000_000, 1_764_000_016, 1_764_000_000] {
            let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(999);
            let mut got = Vec::new();
            http_date_of(at, |d| got.extend_from_slice(d));
            assert_eq!(String::from_utf8(got).unwrap(), httpdate::fmt_http_date(at));
        }
        for n in [0u64, 9, 10, 4096, u64::MAX] {
            let mut got = Vec::new();
            push_number(&mut got, n);
            assert_eq!(String::from_utf8(got).unwrap(), n.to_string());
        }
    }

    fn meta_of(
        body: &[u8],
        modified_secs: u64,
        headers: &std::sync::Arc<[(String, String)]>,
    ) -> larder_tier::ObjectMeta {
        larder_tier::ObjectMeta {
            etag: larder_proto::ETag::of(body),
            size: body.len() as u64,
            last_modified: UNIX_EPOCH + Duration::from_secs(modified_secs),
            expires: UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)),
            headers: headers.clone(),
        }
    }

    /// The head of a whole 200 as `encode_read` writes it, and as written from scratch.
    fn heads(meta: &larder_tier::ObjectMeta) -> (String, String) {
        let (id, at) = (api::RequestId::of_request(Some(b"r1")), UNIX_EPOCH);
        let mut got = Vec::new();
        encode_read(&mut got, StatusCode::OK, meta, None, &id, at);
        let mut fresh = Vec::new();
        revision_fields(&mut fresh, StatusCode::OK, meta, None);
        let mut fresh = String::from_utf8(fresh).unwrap();
        // `Date` is never before the revision's `Last-Modified`.
        let date = httpdate::fmt_http_date(meta.last_modified);
        fresh.push_str(&format!("x-request-id: r1\r\ndate: {date}\r\n\r\n"));
        (String::from_utf8(got).unwrap(), fresh)
    }

    #[test]
    fn a_revisions_head_written_again_is_the_head_of_that_revision() {
        let typed: std::sync::Arc<[(String, String)]> =
            vec![("content-type".to_owned(), "text/plain".to_owned())].into();
        let other_type: std::sync::Arc<[(String, String)]> =
            vec![("content-type".to_owned(), "image/png".to_owned())].into();
        let first = meta_of(b"same bytes", 1_764_000_000, &typed);
        for _ in 0..3 {
            let (got, fresh) = heads(&first);
            assert_eq!(got, fresh);
            assert!(got.contains("content-type: text/plain\r\n"), "{got}");
        }
        // The same headers and bytes, committed later (a key written again with the same body).
        let later = meta_of(b"same bytes", 1_764_000_100, &typed);
        let (got, fresh) = heads(&later);
        assert_eq!(got, fresh);
        assert!(
            got.contains(&httpdate::fmt_http_date(later.last_modified)),
            "{got}"
        );
        assert_eq!(heads(&first).0, heads(&first).1);
        // Another size under the same ETag and headers cannot happen; the head follows it all
        // the same.
        let longer = larder_tier::ObjectMeta {
            size: 99,
            ..first.clone()
        };
        assert!(heads(&longer).0.contains("content-length: 99\r\n"));
        // The same bytes under other stored headers: another revision.
        let (got, fresh) = heads(&meta_of(b"same bytes", 1_764_000_000, &other_type));
        assert_eq!(got, fresh);
        assert!(got.contains("content-type: image/png\r\n"), "{got}");
        // More revisions than a thread keeps: every head still its own.
        let many: Vec<_> = (0..CACHED_HEADS * 2)
            .map(|i| meta_of(format!("body {i}").as_bytes(), 1_764_000_000, &typed))
            .collect();
        for meta in many.iter().chain(many.iter().rev()) {
            let (got, fresh) = heads(meta);
            assert_eq!(got, fresh);
            assert!(got.contains(meta.etag.quoted()));
        }
    }

    #[test]
    fn a_value_that_is_not_visible_ascii_reads_as_empty_not_absent() {
        assert_eq!(header_text(b"\"abc\""), "\"abc\"");
        assert_eq!(header_text(b"\"ab\xffc\""), "");
    }

    #[tokio::test]
    async fn rewind_replays_the_unread_bytes_before_the_socket() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut rewound = Rewind::new(server, Bytes::from_static(b"hello"));
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}

//! Checking a response against what was asked (status, `Content-Range`, `Content-Length`,
//! `ETag`) before any byte of it is used, and the classification of failures.

use crate::Error;
use larder_proto::{ByteRange, ETag};
use reqwest::header::{self, HeaderMap};

/// Why one request failed.
pub(super) enum Fail {
    /// Worth another try, here or elsewhere. `connect` holds the cause when no connection could
    /// be made at all, so an exhausted retry can say "is larderd running?".
    Transient {
        why: String,
        connect: Option<String>,
    },
    /// The pinned revision is no longer served.
    Changed(String),
    /// Retrying cannot help.
    Fatal(Error),
}

pub(super) fn transient(why: String) -> Fail {
    Fail::Transient { why, connect: None }
}

pub(super) fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn response_etag(headers: &HeaderMap) -> Option<ETag> {
    text(headers, header::ETAG).and_then(ETag::parse)
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    text(headers, header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

/// A 206 must cover exactly the range asked for; a shorter one (same start) is a server that
/// gave up early, anything else is confusion. Both are retried, neither is written.
pub(super) fn check_range(
    url: &str,
    got: ByteRange,
    want: ByteRange,
    total: u64,
    raw: &str,
) -> Result<(), Fail> {
    if got == want {
        return Ok(());
    }
    let asked = format!("bytes {}-{}/{total}", want.start, want.last());
    if got.start == want.start && got.len < want.len {
        return Err(transient(format!(
            "{url} answered a short 206 (Content-Range {raw:?}) to a request for {asked}"
        )));
    }
    Err(transient(format!(
        "{url} answered Content-Range {raw:?} to a request for {asked}"
    )))
}

pub(super) fn check_length(url: &str, headers: &HeaderMap, want: u64) -> Result<(), Fail> {
    match content_length(headers) {
        Some(n) if n == want => Ok(()),
        Some(n) => Err(transient(format!(
            "{url} answered Content-Length {n} for a {want}-byte range"
        ))),
        None => Err(transient(format!(
            "{url} answered a range without a Content-Length"
        ))),
    }
}

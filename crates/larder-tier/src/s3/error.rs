//! Turning `object_store` failures into `TierError`s.
//!
//! The rule that matters: an S3 failure never becomes a 404 or a 412 for the client. A 404 from
//! S3 means "no such key" only when the tier asked for a reference object and interprets that
//! itself; a 412/409 from S3 is a compare-and-swap conflict that the tier retries or turns into
//! its own decision. Everything else is the dependency's fault: unreachable or timed out → 503
//! (`Unavailable`), answered with an error → 502 (`Upstream`).

use crate::error::{ErrorKind, TierError};
use object_store::client::{HttpError, HttpErrorKind};

/// The kind an unexpected `object_store` error maps to.
pub(crate) fn kind_of(err: &object_store::Error) -> ErrorKind {
    if let object_store::Error::JoinError { .. } = err {
        return ErrorKind::Internal;
    }
    // Transport failures sit a few levels down the source chain (RetryError → RequestError →
    // HttpError); only their kind says whether S3 was reachable at all.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(http) = e.downcast_ref::<HttpError>() {
            return match http.kind() {
                HttpErrorKind::Connect
                | HttpErrorKind::Request
                | HttpErrorKind::Timeout
                | HttpErrorKind::Interrupted => ErrorKind::Unavailable,
                _ => ErrorKind::Upstream,
            };
        }
        source = e.source();
    }
    ErrorKind::Upstream
}

/// A 404 that is about the bucket, not the key: with a missing or misnamed bucket every key
/// would otherwise look absent. S3 says which in the error body (`NoSuchBucket`), which
/// `object_store` keeps in the error's text.
pub(crate) fn is_missing_bucket(err: &object_store::Error) -> bool {
    matches!(err, object_store::Error::NotFound { .. }) && err.to_string().contains("NoSuchBucket")
}

/// A client-safe one-line error for an unexpected S3 failure during `what`; the S3 error itself
/// stays the source, and whoever gives up on the request logs the whole chain once.
pub(crate) fn s3_error(what: &str, err: object_store::Error) -> TierError {
    let kind = kind_of(&err);
    let reason = match kind {
        ErrorKind::Unavailable => "S3 is unreachable or timed out",
        _ => "S3 answered with an error",
    };
    TierError::new(kind, format!("{reason} ({what}): {}", one_line(&err))).with_source(err)
}

/// An S3 operation that did not finish within the tier's own deadline.
pub(crate) fn timed_out(what: &str) -> TierError {
    TierError::new(
        ErrorKind::Unavailable,
        format!("S3 is unreachable or timed out ({what}): no answer in time"),
    )
}

/// Error messages travel in one-line HTTP bodies and log fields: cut at the first line break
/// (S3 error bodies are multi-line XML) and at a sane length.
pub(crate) fn one_line(err: &dyn std::fmt::Display) -> String {
    const MAX: usize = 300;
    let text = err.to_string();
    let line = text.lines().next().unwrap_or("").trim();
    if line.len() <= MAX {
        return line.to_string();
    }
    let mut cut = MAX;
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &line[..cut])
}

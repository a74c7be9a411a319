//! The error every tier maps its failures into. Callers match on the meaning (`kind`), never on
//! a backend's codes; the kind also says who is to blame, which decides the HTTP status, the
//! metrics label and whether a client may retry.

use larder_proto::ETag;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No current revision (404).
    NotFound,
    /// A write precondition failed (412); the error carries the current ETag if there is one.
    PreconditionFailed,
    /// The body is larger than allowed (413).
    TooLarge,
    /// The request was malformed in a way only the tier could see (400).
    InvalidInput,
    /// The request body ended early or failed while streaming: nothing was stored.
    BodyAborted,
    /// No space left in the tier (507).
    InsufficientStorage,
    /// A dependency (for example S3) is unreachable or timed out (503).
    Unavailable,
    /// A dependency answered with an error (502).
    Upstream,
    /// A bug or an unexpected local I/O failure (500).
    Internal,
}

impl ErrorKind {
    /// The HTTP status this failure maps to.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::PreconditionFailed => 412,
            ErrorKind::TooLarge => 413,
            ErrorKind::InvalidInput | ErrorKind::BodyAborted => 400,
            ErrorKind::InsufficientStorage => 507,
            ErrorKind::Unavailable => 503,
            ErrorKind::Upstream => 502,
            ErrorKind::Internal => 500,
        }
    }

    /// A short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::PreconditionFailed => "precondition_failed",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::BodyAborted => "body_aborted",
            ErrorKind::InsufficientStorage => "insufficient_storage",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Upstream => "upstream",
            ErrorKind::Internal => "internal",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TierError {
    pub kind: ErrorKind,
    /// One line, safe to send to the client.
    pub message: String,
    /// For `PreconditionFailed`: the ETag of the current revision, if any.
    pub current_etag: Option<ETag>,
}

impl TierError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> TierError {
        TierError {
            kind,
            message: message.into(),
            current_etag: None,
        }
    }
    pub fn not_found() -> TierError {
        TierError::new(ErrorKind::NotFound, "no such object")
    }
    pub fn precondition_failed(current: Option<ETag>) -> TierError {
        let message = match &current {
            Some(etag) => format!("precondition failed: current ETag is {etag}"),
            None => "precondition failed: the object does not exist".to_string(),
        };
        TierError {
            kind: ErrorKind::PreconditionFailed,
            message,
            current_etag: current,
        }
    }
    pub fn internal(context: &str, err: impl fmt::Display) -> TierError {
        TierError::new(ErrorKind::Internal, format!("{context}: {err}"))
    }
    /// Maps a local I/O error, turning "disk full" into 507 instead of a generic 500.
    pub fn io(context: &str, err: &std::io::Error) -> TierError {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => TierError::new(
                ErrorKind::InsufficientStorage,
                format!("{context}: disk tier is out of space"),
            ),
            _ => TierError::new(ErrorKind::Internal, format!("{context}: {err}")),
        }
    }
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TierError {}

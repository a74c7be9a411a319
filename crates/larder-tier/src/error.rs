//! The error every tier maps its failures into. Callers match on the meaning (`kind`), never on
//! a backend's codes; the kind also says who is to blame, which decides the HTTP status, the
//! metrics label and whether a client may retry.

use larder_proto::ETag;
use std::fmt;
use std::sync::Arc;

/// What went wrong, independent of the backend; decides the HTTP status ([`ErrorKind::status`])
/// and who is to blame ([`TierError::fault`]).
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

/// Who a failure is to blame on; decides whether it is logged as the server's problem and
/// whether the client should change its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request itself (4xx): asking again unchanged gets the same answer.
    Client,
    /// This server: a bug or its own disk (500, 507).
    Server,
    /// A dependency such as S3 (502, 503).
    Dependency,
}

/// A tier failure: its [`ErrorKind`], a one-line message safe to show the client, and the
/// underlying cause kept for logs only (see [`TierError::chain`]).
#[derive(Clone, Debug)]
pub struct TierError {
    /// What went wrong; match on this, never on the message.
    pub kind: ErrorKind,
    /// One line, safe to send to the client.
    pub message: String,
    /// For `PreconditionFailed`: the ETag of the current revision, if any.
    pub current_etag: Option<ETag>,
    /// What went wrong underneath (an I/O or S3 error), kept whole for the log; never sent to
    /// the client. Shared so that a failure reported to several waiters stays cloneable.
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl TierError {
    /// An error of `kind` with a client-safe `message`, no current ETag and no source.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> TierError {
        TierError {
            kind,
            message: message.into(),
            current_etag: None,
            source: None,
        }
    }

    /// Keeps `source` as the cause, for logs (see [`TierError::chain`]).
    pub fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> TierError {
        self.source = Some(Arc::new(source));
        self
    }

    /// The same failure (kind, ETag, cause) told to the client in other words.
    pub fn reworded(mut self, reword: impl FnOnce(&str) -> String) -> TierError {
        self.message = reword(&self.message);
        self
    }

    /// `NotFound` with the standard message: the key has no current revision.
    pub fn not_found() -> TierError {
        TierError::new(ErrorKind::NotFound, "no such object")
    }
    /// `PreconditionFailed` carrying `current`, the ETag of the current revision (`None` when the
    /// key does not exist), which the message names too.
    pub fn precondition_failed(current: Option<ETag>) -> TierError {
        let message = match &current {
            Some(etag) => format!("precondition failed: current ETag is {etag}"),
            None => "precondition failed: the object does not exist".to_string(),
        };
        TierError {
            current_etag: current,
            ..TierError::new(ErrorKind::PreconditionFailed, message)
        }
    }
    /// `Internal` (500) with the message `"{context}: {err}"`; for bugs and unexpected failures.
    pub fn internal(context: &str, err: impl fmt::Display) -> TierError {
        TierError::new(ErrorKind::Internal, format!("{context}: {err}"))
    }
    /// Maps a local I/O error, turning "disk full" into 507 instead of a generic 500; the I/O
    /// error stays the source.
    pub fn io(context: &str, err: &std::io::Error) -> TierError {
        let error = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => TierError::new(
                ErrorKind::InsufficientStorage,
                format!("{context}: disk tier is out of space"),
            ),
            _ => TierError::new(ErrorKind::Internal, format!("{context}: {err}")),
        };
        // io::Error is not Clone; an OS error is rebuilt exactly from its code.
        let copy = match err.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::new(err.kind(), err.to_string()),
        };
        error.with_source(copy)
    }

    /// Who is to blame.
    pub fn fault(&self) -> Fault {
        match self.kind {
            ErrorKind::NotFound
            | ErrorKind::PreconditionFailed
            | ErrorKind::TooLarge
            | ErrorKind::InvalidInput
            | ErrorKind::BodyAborted => Fault::Client,
            ErrorKind::InsufficientStorage | ErrorKind::Internal => Fault::Server,
            ErrorKind::Unavailable | ErrorKind::Upstream => Fault::Dependency,
        }
    }

    /// Whether the same request may succeed later without change: a dependency that was
    /// unreachable or failed, or a full disk that eviction frees.
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Unavailable | ErrorKind::Upstream | ErrorKind::InsufficientStorage
        )
    }

    /// The message followed by every cause, `: `-separated, for logs.
    pub fn chain(&self) -> String {
        let mut out = self.message.clone();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            let text = e.to_string();
            // Messages often repeat their cause's text; say each thing once.
            if !out.ends_with(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            next = e.source();
        }
        out
    }
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TierError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_keeps_its_cause_and_a_full_disk_is_retryable() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = TierError::io("write temp file", &full);
        assert_eq!(e.kind, ErrorKind::InsufficientStorage);
        assert_eq!(e.fault(), Fault::Server);
        assert!(e.retryable());
        let cause = std::error::Error::source(&e).expect("a source");
        let io = cause
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(io.raw_os_error(), Some(libc::ENOSPC));
        assert!(
            e.chain()
                .starts_with("write temp file: disk tier is out of space: ")
        );
        assert!(
            !e.message.contains("os error"),
            "the client sees one line: {}",
            e.message
        );
    }

    #[test]
    fn faults_follow_the_kind() {
        assert_eq!(TierError::not_found().fault(), Fault::Client);
        assert!(!TierError::not_found().retryable());
        assert_eq!(
            TierError::new(ErrorKind::Unavailable, "x").fault(),
            Fault::Dependency
        );
        assert!(TierError::new(ErrorKind::Unavailable, "x").retryable());
        assert!(!TierError::internal("x", "y").retryable());
    }
}

//! Why a client operation failed, phrased for the person at the terminal.
//!
//! Every message says what happened and, where there is something to do, what to do; the CLI
//! prints them as they are. The variants are kept by meaning rather than by source library so
//! that callers (the CLI's exit codes now, download retries later) can decide without parsing
//! text: "not there" is a different answer from "broken".

use larder_proto::ETag;
use reqwest::StatusCode;

/// Why a client operation failed. `Display` is the complete message for the user; match on the
/// variant to decide (see [`Error::exit_code`] and [`Error::is_not_found`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad local input (names, flags, URL): nothing was sent.
    #[error("{0}")]
    InvalidInput(String),

    /// No TCP/TLS connection to the server could be made.
    #[error("cannot connect to {url}: is larderd running? set --url or LARDER_URL ({cause})")]
    Connect {
        /// The server URL as the user gave it.
        url: String,
        /// The innermost cause, usually the OS or TLS error.
        cause: String,
    },

    /// The TLS handshake failed on the server's certificate: retrying cannot help, trusting
    /// the right CA can.
    #[error(
        "cannot connect to {url}: {cause}; the server's TLS certificate is not trusted: pass \
         --ca-cert FILE (or set LARDER_CA_CERT) with the PEM of the CA that signed it"
    )]
    UntrustedCertificate {
        /// The server URL as the user gave it.
        url: String,
        /// The innermost cause: the TLS library's verdict on the certificate.
        cause: String,
    },

    /// 404 on an object.
    #[error("{target} not found")]
    NotFound {
        /// What was asked for, as the user would name it (`ns/key`).
        target: String,
    },

    /// A git repository the server has no snapshot of yet; it is making one.
    #[error(
        "no snapshot of {upstream} in the cache yet; the server is making one{}",
        retry_after.map(|s| format!(", ask again in {s} s")).unwrap_or_default()
    )]
    NoSnapshotYet {
        /// The upstream's normalised URL.
        upstream: String,
        /// The server's `Retry-After`, in seconds, if it sent one.
        retry_after: Option<u64>,
    },

    /// A git command run on a restored repository failed; the message carries git's.
    #[error("{0}")]
    Git(String),

    /// 412: the message already explains which precondition and why.
    #[error("{message}")]
    PreconditionFailed {
        /// The complete message shown to the user.
        message: String,
        /// ETag of the current revision, if the server named one (`None` when the key does not
        /// exist).
        current: Option<ETag>,
    },

    /// 401: no token was sent where one is needed, or the server does not know the one sent.
    #[error("{op} {target}: {}", unauthorized(*token_sent, reason))]
    Unauthorized {
        /// The HTTP method of the request (`"GET"`, `"PUT"`, …).
        op: &'static str,
        /// What the request was about, as the user would name it (`ns/key`, a head record).
        target: String,
        /// Whether the request carried a token (decides the advice: pass one, or check it).
        token_sent: bool,
        /// The server's one-line reason.
        reason: String,
    },

    /// 403: the token is known but its scopes do not cover this namespace or operation.
    #[error(
        "{op} {target}: the token is not allowed to do this ({}); its scopes do not cover this \
         namespace or operation: use a token with the {} scope for it",
        with_reason("403 Forbidden", reason),
        scope_for(op)
    )]
    Forbidden {
        /// The HTTP method of the request (`"GET"`, `"PUT"`, …).
        op: &'static str,
        /// What the request was about, as the user would name it (`ns/key`, a head record).
        target: String,
        /// The server's one-line reason.
        reason: String,
    },

    /// Any other 4xx/5xx, with the server's one-line reason.
    #[error("{op} {target}: the server answered {status}: {reason}{}", server_hint(*status))]
    Server {
        /// The HTTP method of the request (`"GET"`, `"PUT"`, …).
        op: &'static str,
        /// What the request was about, as the user would name it (`ns/key`, a head record).
        target: String,
        /// The status the server answered.
        status: StatusCode,
        /// The server's one-line reason.
        reason: String,
    },

    /// The connection failed after it was established (reset, timeout, truncated body).
    #[error(
        "{op} {target}: {cause}; retry, and check the network or the larderd logs if it persists"
    )]
    Transport {
        /// The HTTP method of the request (`"GET"`, `"PUT"`, …).
        op: &'static str,
        /// What the request was about, as the user would name it (`ns/key`, a head record).
        target: String,
        /// The chain of causes (`timed out: …` for a timeout).
        cause: String,
    },

    /// What arrived is not what the server's ETag names.
    #[error(
        "{target}: the received bytes have digest {actual} but the server's ETag is {expected}; \
         {consequence}"
    )]
    DigestMismatch {
        /// The object downloaded (`ns/key`).
        target: String,
        /// The ETag the server announced for the revision.
        expected: ETag,
        /// The digest of the bytes actually received.
        actual: ETag,
        /// What the failure means for the destination (from
        /// [`Sink::failure_consequence`](crate::Sink::failure_consequence)).
        consequence: String,
    },

    /// A snapshot archive with an entry that would escape the target or is not allowed; the
    /// message names the entry and says what was (not) restored.
    #[error("{0}")]
    UnsafeArchive(String),

    /// The server answered something a larderd would not (missing ETag, bad JSON, …).
    #[error("{0}")]
    Protocol(String),

    /// A local file or stream failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which file (`"writing to out.bin"`).
        context: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn unauthorized(token_sent: bool, reason: &str) -> String {
    let answer = with_reason("401 Unauthorized", reason);
    if token_sent {
        format!(
            "the server did not accept the token ({answer}); it is unknown to this server or was \
             revoked: check --token or LARDER_TOKEN"
        )
    } else {
        format!("the server requires a token ({answer}); pass --token TOKEN or set LARDER_TOKEN")
    }
}

/// "403 Forbidden: reason", without repeating the status phrase when that is all there is (HEAD).
fn with_reason(status: &str, reason: &str) -> String {
    if status.ends_with(reason) {
        status.to_string()
    } else {
        format!("{status}: {reason}")
    }
}

/// The larderd scope an operation needs, for the 403 advice.
fn scope_for(op: &str) -> &'static str {
    match op {
        "GET" | "HEAD" => "read",
        "PUT" | "DELETE" => "write",
        _ => "admin",
    }
}

fn server_hint(status: StatusCode) -> &'static str {
    if status.is_server_error() {
        " (a server-side problem: retry later or check the larderd logs)"
    } else {
        ""
    }
}

/// Who a client failure is to blame on, as the server's `TierError` says it: what to fix, and
/// whether trying again may help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request as given (a name, a flag, a missing object, a refused token, a precondition):
    /// the same request fails the same way.
    Caller,
    /// The network between client and server, or a server that cannot be reached: a retry may
    /// help.
    Network,
    /// The server or what it depends on answered with an error (5xx), or not like a larderd.
    Server,
    /// The data is not what it claims to be (a digest mismatch, an unsafe archive).
    Data,
    /// This machine: a local file, a child process (git).
    Local,
}

impl Error {
    /// Who is to blame (see [`Fault`]).
    pub fn fault(&self) -> Fault {
        match self {
            Error::InvalidInput(_)
            | Error::NotFound { .. }
            | Error::NoSnapshotYet { .. }
            | Error::PreconditionFailed { .. }
            | Error::Unauthorized { .. }
            | Error::Forbidden { .. }
            | Error::UntrustedCertificate { .. } => Fault::Caller,
            Error::Connect { .. } | Error::Transport { .. } => Fault::Network,
            Error::Server { status, .. } if status.is_client_error() => Fault::Caller,
            Error::Server { .. } | Error::Protocol(_) => Fault::Server,
            Error::DigestMismatch { .. } | Error::UnsafeArchive(_) => Fault::Data,
            Error::Git(_) | Error::Io { .. } => Fault::Local,
        }
    }

    /// Whether the same operation may succeed if tried again unchanged: a network failure, a
    /// 5xx, a snapshot that is being made, or data damaged on the way.
    pub fn retryable(&self) -> bool {
        matches!(self, Error::NoSnapshotYet { .. })
            || matches!(self.fault(), Fault::Network | Fault::Server | Fault::Data)
    }

    /// The process exit status for this failure: 2 means "no such object", so scripts can treat
    /// a cache miss differently from a broken cache; 3 means access control refused the request
    /// (401 or 403), which no retry fixes.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NotFound { .. } | Error::NoSnapshotYet { .. } => 2,
            Error::Unauthorized { .. } | Error::Forbidden { .. } => 3,
            _ => 1,
        }
    }

    /// Whether the object (or the snapshot) does not exist: [`Error::NotFound`] or
    /// [`Error::NoSnapshotYet`], the failures with exit code 2.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. } | Error::NoSnapshotYet { .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Maps a reqwest failure. `base` is the server URL as the user gave it, so the connect
    /// message names what they can fix.
    pub(crate) fn request(op: &'static str, target: &str, base: &str, e: reqwest::Error) -> Error {
        if e.is_connect() {
            let (url, cause) = (base.to_string(), innermost_cause(&e));
            if is_certificate_error(&e) {
                return Error::UntrustedCertificate { url, cause };
            }
            return Error::Connect { url, cause };
        }
        let cause = if e.is_timeout() {
            format!("timed out: {}", causes(&e))
        } else {
            causes(&e)
        };
        Error::Transport {
            op,
            target: target.to_string(),
            cause,
        }
    }
}

/// The error's sources joined by ": ", leaving out reqwest's own top line (it only repeats the
/// URL) and consecutive repeats, which hyper's layers like to produce.
pub(crate) fn causes(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = std::error::Error::source(e);
    while let Some(err) = next {
        let text = err.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// A certificate the client does not trust looks like any other connect failure to reqwest; the
/// rustls error that says so sits in the source chain, wrapped in `io::Error`s (whose own
/// `source()` skips the error they wrap, so those are unwrapped with `get_ref`).
pub(crate) fn is_certificate_error(e: &reqwest::Error) -> bool {
    fn about_certificates(e: &rustls::Error) -> bool {
        matches!(
            e,
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::InvalidCertRevocationList(_)
        )
    }
    if !e.is_connect() {
        return false;
    }
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<rustls::Error>()
            .is_some_and(about_certificates)
        {
            return true;
        }
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// The deepest cause, usually the OS error ("Connection refused (os error 111)") or the TLS
/// error.
pub(crate) fn innermost_cause(e: &reqwest::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_say_what_to_fix_and_whether_to_retry() {
        let not_found = Error::NotFound {
            target: "ci/x".into(),
        };
        assert_eq!(not_found.fault(), Fault::Caller);
        assert!(!not_found.retryable());
        let down = Error::Connect {
            url: "http://127.0.0.1:9".into(),
            cause: "refused".into(),
        };
        assert_eq!(down.fault(), Fault::Network);
        assert!(down.retryable());
        let bad_gateway = Error::Server {
            op: "GET",
            target: "ci/x".into(),
            status: StatusCode::BAD_GATEWAY,
            reason: "S3 answered with an error".into(),
        };
        assert_eq!(bad_gateway.fault(), Fault::Server);
        assert!(bad_gateway.retryable());
        let too_large = Error::Server {
            op: "PUT",
            target: "ci/x".into(),
            status: StatusCode::PAYLOAD_TOO_LARGE,
            reason: "too large".into(),
        };
        assert_eq!(too_large.fault(), Fault::Caller);
        assert!(!too_large.retryable());
        let not_yet = Error::NoSnapshotYet {
            upstream: "https://h/r.git".into(),
            retry_after: Some(5),
        };
        assert!(
            not_yet.retryable(),
            "a snapshot being made is worth asking for again"
        );
        assert_eq!(not_yet.exit_code(), 2);
    }
}

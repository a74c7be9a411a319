//! Uploads: one streaming PUT per object.
//!
//! Artifacts are often several GiB, so the body is streamed from the file or stdin and never held
//! in memory. The bytes are hashed on their way out; because the server's ETag is the BLAKE3
//! digest of what it stored, comparing the two proves the stored object is exactly what was read
//! here, which a status code alone cannot.

use crate::progress::Progress;
use crate::{Client, Error, ObjectName};
use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use larder_proto::ETag;
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, StatusCode};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncRead;
use tokio_util::io::ReaderStream;

/// The condition under which a PUT may replace the current revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Precondition {
    /// Replace whatever is there.
    #[default]
    None,
    /// `If-None-Match: *`: only create; fail if the key exists.
    CreateOnly,
    /// `If-Match`: compare-and-swap against this revision.
    IfMatch(ETag),
}

/// Options of an upload; the default is an unconditional write with the server's TTL.
#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    /// Condition the server checks when it commits; a failure is [`Error::PreconditionFailed`].
    pub precondition: Precondition,
    /// Time to live; the server clamps it to its maximum, which also applies when this is None.
    pub ttl: Option<Duration>,
    /// `Content-Type` to store with the object, returned on every read of it.
    pub content_type: Option<String>,
    /// Shows bytes sent; hidden by default.
    pub progress: Progress,
}

/// What the server stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResult {
    /// Strong ETag of the stored revision: the BLAKE3 digest of the bytes sent.
    pub etag: ETag,
    /// Length of the stored body in bytes.
    pub size: u64,
    /// The key had no current revision before (201 rather than 200).
    pub created: bool,
}

/// Large reads keep the per-chunk overhead (hashing calls, body frames) negligible.
const READ_CHUNK: usize = 256 * 1024;

/// Updated by the body stream while reqwest owns it, and read back once the response is in.
#[derive(Default)]
struct Sent {
    hasher: blake3::Hasher,
    bytes: u64,
    read_error: Option<std::io::Error>,
}

impl Client {
    /// Uploads a file. Its length is announced up front, so a server with a size limit can
    /// refuse it before anything is sent.
    pub async fn put_file(
        &self,
        name: &ObjectName,
        path: &Path,
        opts: &PutOptions,
    ) -> Result<PutResult, Error> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        // A FIFO or device has no meaningful length: send it chunked like stdin.
        let len = meta.is_file().then_some(meta.len());
        self.put_reader(name, file, len, &path.display().to_string(), opts)
            .await
    }

    /// Uploads everything `reader` yields. `len`, when known, becomes the Content-Length; the
    /// reader must then yield exactly that many bytes. `source` names the reader in messages.
    pub async fn put_reader<R>(
        &self,
        name: &ObjectName,
        reader: R,
        len: Option<u64>,
        source: &str,
        opts: &PutOptions,
    ) -> Result<PutResult, Error>
    where
        R: AsyncRead + Send + 'static,
    {
        let stream = ReaderStream::with_capacity(reader, READ_CHUNK);
        self.put_stream(name, stream, len, source, opts).await
    }

    /// Uploads everything `stream` yields; an error from the stream aborts the upload, and the
    /// server then stores nothing. `len` and `source` as for [`Client::put_reader`].
    pub async fn put_stream<S>(
        &self,
        name: &ObjectName,
        stream: S,
        len: Option<u64>,
        source: &str,
        opts: &PutOptions,
    ) -> Result<PutResult, Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let mut req = self.request(Method::PUT, name);
        match &opts.precondition {
            Precondition::None => {}
            Precondition::CreateOnly => req = req.header(header::IF_NONE_MATCH, "*"),
            Precondition::IfMatch(etag) => req = req.header(header::IF_MATCH, etag.header_value()),
        }
        if let Some(ttl) = opts.ttl {
            if ttl.as_secs() == 0 {
                return Err(Error::InvalidInput(
                    "invalid TTL: must be at least one second".into(),
                ));
            }
            req = req.header("Time-To-Live", format!("{}s", ttl.as_secs()));
        }
        if let Some(ct) = &opts.content_type {
            // HeaderValue admits obs-text (bytes >= 0x80), which the server refuses to store.
            let value = HeaderValue::from_str(ct)
                .ok()
                .filter(|_| ct.is_ascii())
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "invalid content type {ct:?}: must be visible ASCII"
                    ))
                })?;
            req = req.header(header::CONTENT_TYPE, value);
        }
        if let Some(len) = len {
            req = req.header(header::CONTENT_LENGTH, len);
        }

        opts.progress.bytes_phase("uploading", len);
        let sent = Arc::new(Mutex::new(Sent::default()));
        let on_chunk = Arc::clone(&sent);
        let on_error = Arc::clone(&sent);
        let progress = opts.progress.clone();
        let stream = stream
            .inspect_ok(move |chunk| {
                let mut s = on_chunk.lock().expect("upload state");
                s.hasher.update(chunk);
                s.bytes += chunk.len() as u64;
                progress.inc(chunk.len() as u64);
            })
            .inspect_err(move |e| {
                // reqwest would only report "error sending request"; keep the real cause.
                let mut s = on_error.lock().expect("upload state");
                if s.read_error.is_none() {
                    s.read_error = Some(std::io::Error::new(e.kind(), e.to_string()));
                }
            });
        let req = req.body(reqwest::Body::wrap_stream(stream));

        let result = self.send("PUT", name, req).await;
        opts.progress.finish();
        let read_error = sent.lock().expect("upload state").read_error.take();
        if let Some(e) = read_error {
            return Err(Error::io(
                format!("reading {source} failed, so nothing was stored"),
                e,
            ));
        }
        let resp = result?;
        let status = resp.status();
        if !status.is_success() {
            return Err(match self.failure("PUT", name, resp).await {
                Error::PreconditionFailed { message, current } => Error::PreconditionFailed {
                    message: explain_precondition(
                        &message,
                        name,
                        &opts.precondition,
                        current.as_ref(),
                    ),
                    current,
                },
                other => other,
            });
        }
        let etag = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(ETag::parse)
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "PUT {name}: the server answered {status} without a larder ETag"
                ))
            })?;

        let s = sent.lock().expect("upload state");
        let local = ETag::from_digest(&s.hasher.finalize());
        if local != etag {
            return Err(Error::Protocol(format!(
                "PUT {name}: the server stored ETag {etag} but the {} bytes read from {source} have digest {local}; \
                 the upload was altered in transit (or {source} changed while it was read), retry",
                s.bytes
            )));
        }
        Ok(PutResult {
            etag,
            size: s.bytes,
            created: status == StatusCode::CREATED,
        })
    }
}

/// Adds what the failed precondition means for this PUT and how to proceed.
fn explain_precondition(
    server: &str,
    name: &ObjectName,
    pre: &Precondition,
    current: Option<&ETag>,
) -> String {
    let advice = match (pre, current) {
        (Precondition::CreateOnly, _) => {
            format!(
                "{name} already exists and --if-none-match only creates; drop it to replace the object"
            )
        }
        (Precondition::IfMatch(want), Some(_)) => format!(
            "{name} is no longer at ETag {}; it was replaced meanwhile, run `larder stat` and retry with the current ETag",
            want.as_str()
        ),
        (Precondition::IfMatch(_), None) => {
            format!("{name} does not exist; use --if-none-match to create it")
        }
        (Precondition::None, _) => return server.to_string(),
    };
    format!("{server}; {advice}")
}

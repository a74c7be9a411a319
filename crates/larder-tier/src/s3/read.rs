//! Reading a range of an immutable body object as parallel ranged GETs, delivered in order.
//!
//! A single GET of a multi-GiB object runs at the speed of one S3 connection; splitting the
//! range into parts fetched `read_concurrency` at a time gets close to the server's aggregate
//! throughput, while `buffered` keeps at most that many parts in memory and yields them in
//! order. Each part is fetched by a spawned task, so parts keep arriving while a slow client
//! drains the previous one (their request timeout does not depend on the client's pace), and
//! the tasks are aborted when the reader goes away.
//!
//! The first part's GET is issued before the stream is handed out, so its response headers —
//! and with them any 404/412/5xx — arrive before the caller writes a status line.

use super::error::s3_error;
use crate::error::{ErrorKind, TierError};
use crate::tier::BodyStream;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, GetResult, ObjectStore};
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::task::JoinHandle;

/// Why the first part could not be opened.
pub(crate) enum OpenError {
    /// The body object is gone or is not the one the reference names: the reference may have
    /// changed since it was read, so the caller re-reads it.
    Missing(TierError),
    Failed(TierError),
}

pub(crate) struct BodyReader {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    /// S3's ETag of the body object, if known.
    pub if_match: Option<String>,
    pub part_size: u64,
    pub concurrency: usize,
}

impl BodyReader {
    /// Opens `start..start+len` (len > 0): the first part's response headers have arrived when
    /// this returns.
    pub(crate) async fn open(self, start: u64, len: u64) -> Result<BodyStream, OpenError> {
        let end = start + len;
        let part = self.part_size.max(1);
        let first = start..end.min(start + part);
        let result =
            self.store
                .get_opts(&self.path, self.options(first.clone()))
                .await
                .map_err(|e| match e {
                    object_store::Error::NotFound { .. }
                    | object_store::Error::Precondition { .. } => OpenError::Missing(vanished(&e)),
                    e => OpenError::Failed(s3_error("body read", e)),
                })?;
        let first_task = spawn_part(collect_part(result, first.clone()));
        // `buffered` counts the first, already running part among those in flight.
        let concurrency = self
            .concurrency
            .clamp(1, len.div_ceil(part).max(1) as usize);

        let this = Arc::new(self);
        let rest = (first.end..end).step_by(part as usize).map(move |s| {
            let this = this.clone();
            let range = s..end.min(s + part);
            spawn_part(async move { this.fetch_part(range).await })
        });
        // `rest` is lazy: `buffered` spawns each later part only when it has room for it.
        let parts = futures_util::stream::iter(std::iter::once(first_task).chain(rest));
        Ok(parts.buffered(concurrency).boxed())
    }

    fn options(&self, range: Range<u64>) -> GetOptions {
        GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: self.if_match.clone(),
            ..GetOptions::default()
        }
    }

    async fn fetch_part(&self, range: Range<u64>) -> Result<Bytes, TierError> {
        let result =
            self.store
                .get_opts(&self.path, self.options(range.clone()))
                .await
                .map_err(|e| match e {
                    // The status line is out: there is no way back to a clean answer, so the
                    // stream ends with an error and the server aborts the connection.
                    object_store::Error::NotFound { .. }
                    | object_store::Error::Precondition { .. } => vanished(&e),
                    e => s3_error("body read", e),
                })?;
        collect_part(result, range).await
    }
}

fn vanished(e: &object_store::Error) -> TierError {
    tracing::warn!(error = %e, "S3 body object vanished or changed while being read");
    TierError::new(
        ErrorKind::Upstream,
        "S3 body object of the current revision is missing or changed (reaped or overwritten)",
    )
}

async fn collect_part(result: GetResult, range: Range<u64>) -> Result<Bytes, TierError> {
    if result.range != range {
        return Err(TierError::new(
            ErrorKind::Upstream,
            format!(
                "S3 returned bytes {:?} for a request of bytes {range:?}",
                result.range
            ),
        ));
    }
    let bytes = result.bytes().await.map_err(|e| s3_error("body read", e))?;
    if bytes.len() as u64 != range.end - range.start {
        // Never let a short part through: the response would end cleanly with missing bytes.
        return Err(TierError::new(
            ErrorKind::Upstream,
            format!(
                "S3 body part ended after {} of {} bytes",
                bytes.len(),
                range.end - range.start
            ),
        ));
    }
    Ok(bytes)
}

fn spawn_part<F>(fut: F) -> PartTask
where
    F: Future<Output = Result<Bytes, TierError>> + Send + 'static,
{
    PartTask(tokio::spawn(fut))
}

/// A spawned part fetch that is aborted when the read is dropped (client gone).
struct PartTask(JoinHandle<Result<Bytes, TierError>>);

impl Future for PartTask {
    type Output = Result<Bytes, TierError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| match joined {
            Ok(result) => result,
            Err(e) => Err(TierError::internal("S3 body read task", e)),
        })
    }
}

impl Drop for PartTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

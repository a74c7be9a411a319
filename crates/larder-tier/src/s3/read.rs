//! Reading a range of an immutable body object as parallel ranged GETs, delivered in order.
//!
//! A single GET of a multi-GiB object runs at the speed of one S3 connection; splitting the
//! range into parts fetched `read_concurrency` at a time gets close to the server's aggregate
//! throughput. Each part is fetched by a spawned task that passes its bytes on as they arrive
//! (so the part at the head of the read reaches the client chunk by chunk, not after the whole
//! part: time to first byte is one S3 round trip, whatever the part size), while the parts
//! behind it fill their buffers; at most `read_concurrency` parts are in flight, so memory stays
//! at about that many parts. Parts keep arriving while a slow client drains the previous one
//! (their request timeout does not depend on the client's pace), and the tasks are aborted when
//! the reader goes away.
//!
//! The first part's GET is issued before the stream is handed out, so its response headers —
//! and with them any 404/412/5xx — arrive before the caller writes a status line.

use super::error::s3_error;
use crate::error::{ErrorKind, TierError};
use crate::tier::BodyStream;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, GetResult, ObjectStore};
use std::collections::VecDeque;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
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
        let concurrency = self
            .concurrency
            .clamp(1, len.div_ceil(part).max(1) as usize);
        let mut parts = Parts {
            reader: Arc::new(self),
            next: first.end,
            end,
            concurrency,
            in_flight: VecDeque::with_capacity(concurrency),
        };
        parts
            .in_flight
            .push_back(PartTask::spawn(first, |tx, range| {
                forward_part(Ok(result), range, tx)
            }));
        parts.fill();
        Ok(parts.boxed())
    }

    fn options(&self, range: Range<u64>) -> GetOptions {
        GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: self.if_match.clone(),
            ..GetOptions::default()
        }
    }
}

fn vanished(e: &object_store::Error) -> TierError {
    tracing::warn!(error = %e, "S3 body object vanished or changed while being read");
    TierError::new(
        ErrorKind::Upstream,
        "S3 body object of the current revision is missing or changed (reaped or overwritten)",
    )
}

/// The read's parts in order: the head part is being delivered, the ones behind it are being
/// fetched; a new part starts whenever the head part is done.
struct Parts {
    reader: Arc<BodyReader>,
    /// Start of the first part not yet started.
    next: u64,
    end: u64,
    concurrency: usize,
    in_flight: VecDeque<PartTask>,
}

impl Parts {
    /// Starts parts until `concurrency` are in flight or none is left.
    fn fill(&mut self) {
        let part = self.reader.part_size.max(1);
        while self.in_flight.len() < self.concurrency && self.next < self.end {
            let range = self.next..self.end.min(self.next + part);
            self.next = range.end;
            let reader = self.reader.clone();
            self.in_flight
                .push_back(PartTask::spawn(range, move |tx, range| async move {
                    let result = reader
                        .store
                        .get_opts(&reader.path, reader.options(range.clone()))
                        .await
                        .map_err(|e| match e {
                            // The status line is out: there is no way back to a clean answer,
                            // so the stream ends with an error and the server aborts the
                            // connection.
                            object_store::Error::NotFound { .. }
                            | object_store::Error::Precondition { .. } => vanished(&e),
                            e => s3_error("body read", e),
                        });
                    forward_part(result, range, tx).await
                }));
        }
    }
}

impl Stream for Parts {
    type Item = Result<Bytes, TierError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let Some(head) = self.in_flight.front_mut() else {
                return Poll::Ready(None);
            };
            let failure = match head.chunks.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(Some(chunk)))) => return Poll::Ready(Some(Ok(chunk))),
                Poll::Ready(Some(Ok(None))) => {
                    self.in_flight.pop_front();
                    self.fill();
                    continue;
                }
                Poll::Ready(Some(Err(e))) => e,
                // The task ended without saying its part was whole: it panicked.
                Poll::Ready(None) => {
                    TierError::internal("S3 body read task", "ended before its part was complete")
                }
            };
            // Nothing after a failed part may be delivered.
            self.in_flight.clear();
            self.next = self.end;
            return Poll::Ready(Some(Err(failure)));
        }
    }
}

/// What a part task sends: bytes as they arrive, an error, or `Ok(None)`: the part is whole.
type PartMessage = Result<Option<Bytes>, TierError>;

/// One part's fetch, running on its own task and aborted when the read is dropped (client gone).
struct PartTask {
    chunks: mpsc::UnboundedReceiver<PartMessage>,
    task: JoinHandle<()>,
}

impl PartTask {
    fn spawn<F, Fut>(range: Range<u64>, fetch: F) -> PartTask
    where
        F: FnOnce(mpsc::UnboundedSender<PartMessage>, Range<u64>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // Unbounded, yet bounded by the part: a task never sends more than its part's bytes.
        let (tx, chunks) = mpsc::unbounded_channel();
        let task = tokio::spawn(fetch(tx, range));
        PartTask { chunks, task }
    }
}

impl Drop for PartTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Passes a part's bytes on as they arrive, then the end-of-part marker; a response for other
/// bytes than asked, or one that ends short, is an error (never a clean end with bytes missing).
async fn forward_part(
    result: Result<GetResult, TierError>,
    range: Range<u64>,
    tx: mpsc::UnboundedSender<PartMessage>,
) {
    let result = match result {
        Ok(r) if r.range == range => r,
        Ok(r) => {
            let _ = tx.send(Err(TierError::new(
                ErrorKind::Upstream,
                format!(
                    "S3 returned bytes {:?} for a request of bytes {range:?}",
                    r.range
                ),
            )));
            return;
        }
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let want = range.end - range.start;
    let mut got = 0u64;
    let mut body = result.into_stream();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(s3_error("body read", e)));
                return;
            }
        };
        got += chunk.len() as u64;
        if got > want {
            break;
        }
        if tx.send(Ok(Some(chunk))).is_err() {
            return; // the read was dropped
        }
    }
    let _ = tx.send(if got == want {
        Ok(None)
    } else {
        Err(TierError::new(
            ErrorKind::Upstream,
            format!("S3 body part ended after {got} of {want} bytes"),
        ))
    });
}

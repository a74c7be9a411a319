//! Byte plumbing between the socket and the handlers: a connection wrapper that bounds how long
//! a peer may stall a response and remembers whether the peer sent anything since the last
//! response, and the pump that feeds an upload's body to the tier.
//!
//! A client that stops reading a download would otherwise hold its connection, its buffers and
//! an open revision file forever: a write that cannot make progress for the idle timeout fails
//! the connection instead. The read flag tells a client that sent part of a request head (and
//! deserves a 408 when it times out) from an idle keep-alive connection (closed silently, so a
//! client reusing it at that moment does not read an answer to a request it never sent).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

pub struct GuardedIo<T> {
    inner: T,
    idle: Duration,
    /// Armed while a write is blocked on the peer.
    write_stall: Option<Pin<Box<Sleep>>>,
    read_since_write: Arc<ReadFlag>,
}

/// Whether bytes arrived after the last response bytes went out.
#[derive(Default)]
pub struct ReadFlag(AtomicBool);

impl ReadFlag {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, idle: Duration) -> Self {
        GuardedIo {
            inner,
            idle,
            write_stall: None,
            read_since_write: Arc::default(),
        }
    }

    pub fn read_since_write_flag(&self) -> Arc<ReadFlag> {
        self.read_since_write.clone()
    }

    /// Turns a `Pending` write into a timeout error once the peer has stalled for `idle`.
    fn stalled<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match poll {
            Poll::Pending => {
                let idle = self.idle;
                let timer = self
                    .write_stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if timer.as_mut().poll(cx).is_ready() {
                    self.write_stall = None;
                    crate::metrics::limit_rejected("response_body_idle");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("peer read nothing for {}s", idle.as_secs()),
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.write_stall = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.read_since_write.0.store(true, Ordering::Relaxed);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.read_since_write.0.store(false, Ordering::Relaxed);
        }
        this.stalled(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.read_since_write.0.store(false, Ordering::Relaxed);
        }
        this.stalled(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.stalled(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.stalled(cx, poll)
    }
}

/// A piece of an upload's body, or why the body failed.
pub type BodyChunk = Result<bytes::Bytes, io::Error>;
/// Where the pump sends an upload's body.
pub type BodySender = tokio::sync::mpsc::Sender<BodyChunk>;

/// How an upload's body pump ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Pump {
    /// The whole body went to the tier.
    Complete,
    /// The tier stopped reading, or the body failed.
    Stopped,
    /// The client stopped sending for longer than the idle timeout.
    Idle,
}

/// An upload's body as a stream for the tier, fed through the returned sender.
///
/// The body is pumped through a channel rather than handed to the tier, so that when the tier
/// refuses it half-way (disk full, too large, a precondition checked first) the handler still
/// owns the connection's body and can give the remainder back to be drained: the client then
/// reads the 4xx/5xx instead of a reset.
pub fn upload_channel() -> (
    BodySender,
    futures_util::stream::BoxStream<'static, BodyChunk>,
) {
    use futures_util::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed();
    (tx, stream)
}

/// Feeds `body` into `tx` until it ends, fails, the receiver stops, or nothing arrives for
/// `idle` (then the receiver gets a `TimedOut` error, so the tier discards what it wrote).
pub async fn pump_body(body: &mut hyper::body::Incoming, tx: BodySender, idle: Duration) -> Pump {
    use http_body_util::BodyExt;
    loop {
        let item = match tokio::time::timeout(idle, body.frame()).await {
            Ok(None) => return Pump::Complete,
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Ok(data),
                Err(_) => continue, // trailers carry nothing we store
            },
            Ok(Some(Err(e))) => Err(io::Error::other(e)),
            Err(_) => {
                let _ = tx
                    .send(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "upload body idle",
                    )))
                    .await;
                return Pump::Idle;
            }
        };
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return Pump::Stopped;
        }
    }
}

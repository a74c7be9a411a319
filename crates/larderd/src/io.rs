//! Byte plumbing between the socket and the handlers: a connection wrapper that bounds how long
//! a peer may stall a response and remembers whether the peer sent anything since the last
//! response, and the pump that feeds an upload's body to the tier.
//!
//! An upload can also be checked while it streams in ([`checked`]): a route that knows what the
//! bytes must be (the Bazel CAS: their SHA-256) lets the tier see the end of the body only once
//! the check accepts it, so a refused body ends in an error and nothing is committed, on any tier.
//!
//! A client that stops reading a download would otherwise hold its connection, its buffers and
//! an open revision file forever: a write that cannot make progress for the idle timeout fails
//! the connection instead. The read flag tells a client that sent part of a request head (and
//! deserves a 408 when it times out) from an idle keep-alive connection (closed silently, so a
//! client reusing it at that moment does not read an answer to a request it never sent).
//!
//! A plain TCP connection can also send bytes straight from a file ([`SendFile`]): the kernel
//! copies them from the page cache to the socket, without a pass through user space.

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

/// A transport that can send the bytes of a file itself (`sendfile(2)`).
pub trait SendFile {
    /// Writes the start of `head` as a write does, but tells the kernel more follows at once
    /// (`MSG_MORE`): a response's head then leaves in the same packets as the first bytes of
    /// its body, instead of as a small packet of its own the client wakes up for.
    fn poll_write_more(&mut self, cx: &mut Context<'_>, head: &[u8]) -> Poll<io::Result<usize>>;

    /// Sends up to `len` bytes of `file` from `offset`: fewer when the socket's buffer fills,
    /// `Ok(0)` when the file ends first. A peer that reads nothing for the idle timeout fails
    /// it, as it fails a write.
    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>>;
}

impl SendFile for GuardedIo<tokio::net::TcpStream> {
    fn poll_write_more(&mut self, cx: &mut Context<'_>, head: &[u8]) -> Poll<io::Result<usize>> {
        use std::os::fd::AsRawFd;
        let socket = self.inner.as_raw_fd();
        self.poll_socket_write(cx, || {
            // SAFETY: the socket stays open for the call, and `head` is a valid, borrowed
            // buffer of `head.len()` bytes.
            let sent = unsafe {
                libc::send(
                    socket,
                    head.as_ptr().cast(),
                    head.len(),
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            };
            if sent < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(sent as usize)
            }
        })
    }

    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        use std::os::fd::AsRawFd;
        let socket = self.inner.as_raw_fd();
        self.poll_socket_write(cx, || send_file(socket, file, offset, len))
    }
}

impl GuardedIo<tokio::net::TcpStream> {
    /// Runs the non-blocking write `write` once the socket is writable, as `poll_write` does.
    fn poll_socket_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl Fn() -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let poll = loop {
            // Readiness is polled first (it also counts against the task's budget, so a long
            // send lets the other connections of the thread run); `try_io` clears it when the
            // socket's buffer is full.
            match self.inner.poll_write_ready(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.inner.try_io(tokio::io::Interest::WRITABLE, &write) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => break Poll::Ready(done),
            }
        };
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.read_since_write.0.store(false, Ordering::Relaxed);
        }
        self.stalled(cx, poll)
    }
}

fn send_file(
    socket: std::os::fd::RawFd,
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: both descriptors stay open for the call (the caller borrows both owners), and
    // `offset` is a valid, exclusively borrowed off_t that sendfile updates.
    let sent = unsafe { libc::sendfile(socket, file.as_raw_fd(), &mut offset, len) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
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
    /// The tier refused the upload before it asked for a byte: the body was not touched.
    NotAsked,
    /// The client stopped sending for longer than the idle timeout.
    Idle,
}

/// Whether the tier asked for an upload's bytes (see [`larder_tier::upload_channel`]).
pub type Demand = tokio::sync::oneshot::Receiver<()>;

/// Once the tier asks for bytes (`demand`), feeds `body` into `tx` until it ends, fails, the
/// receiver stops, or nothing arrives for `idle` (then the receiver gets a `TimedOut` error, so
/// the tier discards what it wrote). A tier that never asks leaves the body unread, so a client
/// that sent `Expect: 100-continue` is not invited to upload what will be refused.
///
/// The body is pumped through a channel ([`larder_tier::upload_channel`]) rather than handed to
/// the tier, so that when the tier refuses it half-way (disk full, too large, a precondition
/// checked first) the handler still owns the connection's body and can give the remainder back
/// to be drained: the client then reads the 4xx/5xx instead of a reset.
pub async fn pump_body(
    body: &mut hyper::body::Incoming,
    tx: BodySender,
    demand: Demand,
    idle: Duration,
) -> Pump {
    use http_body_util::BodyExt;
    if demand.await.is_err() {
        return Pump::NotAsked;
    }
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

/// Why a checked upload was refused: the status and the one-line reason its answer gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: http::StatusCode,
    pub reason: String,
}

impl Refusal {
    /// `400 Bad Request` with `reason`.
    pub fn bad_request(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: http::StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }
}

/// A check of an upload's bytes as they stream in (see [`checked`]).
pub trait BodyCheck: Send + 'static {
    /// Sees each chunk, in order; `Err` refuses the body at once.
    fn update(&mut self, chunk: &[u8]) -> Result<(), Refusal>;
    /// Decides once the whole body was seen.
    fn finish(&mut self) -> Result<(), Refusal>;
}

/// Where a checked upload leaves its refusal for the handler: the tier only sees an error item,
/// the client is told why.
pub type Verdict = Arc<std::sync::OnceLock<Refusal>>;

/// Passes `upload` through `check` on its way to the tier. Each chunk is checked before the
/// tier gets it, and the end of the body is passed on only once [`BodyCheck::finish`] accepts
/// it: a refused body ends with an `InvalidData` error instead of its end, which makes every
/// tier discard what it wrote (nothing is committed before a body's end). The refusal is left
/// in the returned [`Verdict`].
pub fn checked(
    upload: futures_util::stream::BoxStream<'static, BodyChunk>,
    check: Box<dyn BodyCheck>,
) -> (futures_util::stream::BoxStream<'static, BodyChunk>, Verdict) {
    use futures_util::StreamExt;
    let verdict = Verdict::default();
    let stream = Checked {
        inner: upload,
        check,
        verdict: verdict.clone(),
        ended: false,
    };
    (stream.boxed(), verdict)
}

struct Checked {
    inner: futures_util::stream::BoxStream<'static, BodyChunk>,
    check: Box<dyn BodyCheck>,
    verdict: Verdict,
    /// The stream has given its last item (its end, or an error).
    ended: bool,
}

impl Checked {
    fn refuse(&mut self, refusal: Refusal) -> Poll<Option<BodyChunk>> {
        self.ended = true;
        let error = io::Error::new(io::ErrorKind::InvalidData, refusal.reason.clone());
        let _ = self.verdict.set(refusal);
        Poll::Ready(Some(Err(error)))
    }
}

impl futures_util::Stream for Checked {
    type Item = BodyChunk;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BodyChunk>> {
        use futures_util::StreamExt;
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(this.inner.poll_next_unpin(cx)) {
            Some(Ok(chunk)) => match this.check.update(&chunk) {
                Ok(()) => Poll::Ready(Some(Ok(chunk))),
                Err(refusal) => this.refuse(refusal),
            },
            Some(Err(e)) => {
                // The body itself failed: the tier discards it anyway, and the check has
                // nothing to say about a body it did not see whole.
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            None => match this.check.finish() {
                Ok(()) => {
                    this.ended = true;
                    Poll::Ready(None)
                }
                Err(refusal) => this.refuse(refusal),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// Accepts bodies of exactly `want` bytes; refuses at once beyond `refuse_after`.
    struct Length {
        seen: usize,
        want: usize,
        refuse_after: usize,
    }

    impl BodyCheck for Length {
        fn update(&mut self, chunk: &[u8]) -> Result<(), Refusal> {
            self.seen += chunk.len();
            if self.seen > self.refuse_after {
                return Err(Refusal {
                    status: http::StatusCode::PAYLOAD_TOO_LARGE,
                    reason: "too long".into(),
                });
            }
            Ok(())
        }
        fn finish(&mut self) -> Result<(), Refusal> {
            if self.seen == self.want {
                Ok(())
            } else {
                Err(Refusal::bad_request(format!("{} bytes", self.seen)))
            }
        }
    }

    fn body(chunks: &[&'static [u8]]) -> futures_util::stream::BoxStream<'static, BodyChunk> {
        let items: Vec<BodyChunk> = chunks
            .iter()
            .map(|c| Ok(bytes::Bytes::from_static(c)))
            .collect();
        futures_util::stream::iter(items).boxed()
    }

    /// What the tier sees: the chunks, then `Ok(())` for a clean end or the error's message.
    async fn drain(
        mut s: futures_util::stream::BoxStream<'static, BodyChunk>,
    ) -> (Vec<u8>, Result<(), String>) {
        let mut seen = Vec::new();
        while let Some(item) = s.next().await {
            match item {
                Ok(chunk) => seen.extend_from_slice(&chunk),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    assert!(s.next().await.is_none(), "nothing after the error");
                    return (seen, Err(e.to_string()));
                }
            }
        }
        (seen, Ok(()))
    }

    #[tokio::test]
    async fn an_accepted_body_passes_unchanged_and_ends_cleanly() {
        let check = Length {
            seen: 0,
            want: 6,
            refuse_after: 100,
        };
        let (s, verdict) = checked(body(&[b"abc", b"def"]), Box::new(check));
        assert_eq!(drain(s).await, (b"abcdef".to_vec(), Ok(())));
        assert!(verdict.get().is_none());
    }

    #[tokio::test]
    async fn a_body_refused_at_its_end_ends_in_an_error_instead_of_its_end() {
        let check = Length {
            seen: 0,
            want: 7,
            refuse_after: 100,
        };
        let (s, verdict) = checked(body(&[b"abc", b"def"]), Box::new(check));
        let (seen, end) = drain(s).await;
        assert_eq!(
            seen, b"abcdef",
            "every chunk went through before the decision"
        );
        assert_eq!(
            end,
            Err("6 bytes".to_string()),
            "the tier never sees a clean end"
        );
        assert_eq!(
            verdict.get(),
            Some(&Refusal::bad_request("6 bytes")),
            "the handler learns why"
        );
    }

    #[tokio::test]
    async fn a_chunk_refused_midway_never_reaches_the_tier() {
        let check = Length {
            seen: 0,
            want: 9,
            refuse_after: 4,
        };
        let (s, verdict) = checked(body(&[b"abc", b"def", b"ghi"]), Box::new(check));
        let (seen, end) = drain(s).await;
        assert_eq!(seen, b"abc");
        assert_eq!(end, Err("too long".to_string()));
        assert_eq!(
            verdict.get().unwrap().status,
            http::StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[tokio::test]
    async fn a_failing_body_is_passed_on_without_a_verdict() {
        let check = Length {
            seen: 0,
            want: 3,
            refuse_after: 100,
        };
        let items: Vec<BodyChunk> = vec![
            Ok(bytes::Bytes::from_static(b"abc")),
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone")),
        ];
        let (mut s, verdict) = checked(futures_util::stream::iter(items).boxed(), Box::new(check));
        assert!(s.next().await.unwrap().is_ok());
        let e = s.next().await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(s.next().await.is_none());
        assert!(verdict.get().is_none(), "not the check's refusal");
    }
}

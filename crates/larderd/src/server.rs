//! The accept loops: connection limits, HTTP/1.1 (and HTTP/2 over TLS) served by hyper, the
//! timeouts that keep slow or stalled clients from holding resources, and graceful shutdown.
//!
//! Connections are served nginx's way: `--workers` threads (one per core by default), each
//! with its own single-threaded event loop and its own listening socket on the same port
//! (`SO_REUSEPORT`: the kernel spreads new connections over them). A connection lives on one
//! thread from accept to close, so serving a small object involves no hand-over between threads
//! (a work-stealing runtime wakes another thread for nearly every request, which cost more than
//! the request itself). Work a request starts (a fill, a blocking disk read) runs on that
//! worker's loop or its blocking pool; the process's main runtime keeps the background work
//! (index scan, reaper, memory trimmer).
//!
//! hyper's write buffer limit is raised well above the 1 MiB body chunks so that a few chunks
//! can be queued for one `writev` while the next positioned read is in flight; with the default
//! (~400 KiB) every chunk would be flushed alone.

use crate::api::{self, State};
use crate::config::Limits;
use crate::io::GuardedIo;
use crate::metrics::limit_rejected;
use anyhow::Context;
use futures_util::FutureExt;
use http::{Response, StatusCode, header};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

// Two 1 MiB chunks queued per connection: enough to keep the socket busy while the next read
// runs, small enough that 16 concurrent 1 GiB downloads stay well under 100 MiB of RSS.
const WRITE_BUFFER: usize = 2 << 20;

// HTTP/2 flow-control windows for uploads: large enough that one stream can fill a fast link
// (bandwidth × delay of tens of MiB/s × tens of ms), bounded per connection.
const H2_STREAM_WINDOW: u32 = 8 << 20;
const H2_CONNECTION_WINDOW: u32 = 32 << 20;
const H2_MAX_FRAME: u32 = 1 << 20;
const H2_MAX_STREAMS: u32 = 128;

pub struct ServeOptions {
    pub limits: Limits,
    pub tls: Option<TlsAcceptor>,
    pub grace: Duration,
}

/// Listens on `addr` with `workers` threads and serves until SIGTERM or SIGINT, then lets
/// requests in flight finish for up to the grace period.
pub async fn serve(
    addr: SocketAddr,
    workers: usize,
    state: Arc<State>,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let listeners = bind(addr, workers.max(1))?;
    let local = listeners[0].local_addr()?;
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    tracing::info!(%local, scheme, workers = listeners.len(), "listening");
    // One plain line on stdout, so scripts and tests can learn the port when binding to :0.
    println!("larderd listening on {scheme}://{local}");
    let _ = std::io::stdout().flush();

    let limits = opts.limits;
    let mut h1 = http1::Builder::new();
    // hyper's own header limits are a hard ceiling above the configured ones: between the two,
    // `api` answers 431 with a reason; beyond, hyper answers 431 without reading further.
    h1.max_buf_size(WRITE_BUFFER)
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(limits.max_headers * 2)
        .max_header_size(limits.max_header_bytes * 2);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .max_send_buf_size(WRITE_BUFFER)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size((limits.max_header_bytes * 2) as u32)
        // A peer that stops answering pings is gone; its streams and buffers are released.
        .keep_alive_interval(limits.idle_timeout / 2)
        .keep_alive_timeout(limits.idle_timeout / 2);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    crate::memory::spawn_trimmer(connections.clone(), limits.max_connections);
    let server = Arc::new(Server {
        state,
        h1,
        h2,
        tls: opts.tls,
        idle: limits.idle_timeout,
        header_timeout: limits.header_timeout,
        connections,
        // Connections beyond the limit are told so (503) while a few of them fit; past that
        // they are closed at once, so a flood cannot buy memory by opening sockets.
        refusals: Arc::new(Semaphore::new((limits.max_connections / 16).clamp(8, 256))),
        grace: opts.grace,
        fast_limits: crate::fast_path::Limits {
            header_timeout: limits.header_timeout,
            max_head: limits.max_header_bytes,
            max_fields: limits.max_headers,
        },
    });

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut finished = Vec::new();
    for (n, listener) in listeners.into_iter().enumerate() {
        let (server, stopped) = (server.clone(), stopped.clone());
        let (done, finished_one) = tokio::sync::oneshot::channel::<()>();
        finished.push(finished_one);
        thread::Builder::new()
            .name(format!("larderd-worker-{n}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(format!("larderd-worker-{n}-blocking"))
                    .build()
                    .expect("worker runtime");
                runtime.block_on(async {
                    // Polled in this `block_on`, so on this thread, whose lines it batches;
                    // dropped (handing over the last batch) when the accept loop ends.
                    let batches = crate::access_log::flush_this_threads_batches();
                    tokio::select! {
                        () = server.accept_loop(listener, stopped) => {}
                        () = batches => {}
                    }
                });
                // Dropping the runtime ends what is left on it (fills of a stopping server).
                drop(runtime);
                let _ = done.send(());
            })
            .context("cannot start a worker thread")?;
    }
    shutdown.await;
    tracing::info!(
        grace_seconds = opts.grace.as_secs(),
        "shutting down: waiting for requests in flight"
    );
    let _ = stop.send(true);
    for worker in finished {
        let _ = worker.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// `workers` listening sockets on one address, each with `SO_REUSEPORT` so the kernel spreads
/// connections over them. Port 0 is resolved by the first; the others bind the port it got.
fn bind(addr: SocketAddr, workers: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    // SO_REUSEPORT would also let a second larderd (same user) share a port another one
    // already serves, each getting half the connections: a plain bind first says whether the
    // port is taken. (Port 0 needs no check: the kernel never picks a port in use for it.)
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        probe
            .bind(&addr.into())
            .with_context(|| format!("cannot listen on {addr}"))?;
    }
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    let mut at = addr;
    for _ in 0..workers {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&at.into())
            .and_then(|_| socket.listen(1024))
            .with_context(|| format!("cannot listen on {addr}"))?;
        let listener = std::net::TcpListener::from(socket);
        at = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

struct Server {
    state: Arc<State>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    idle: Duration,
    header_timeout: Duration,
    /// Open connections, all workers together (`--max-connections`).
    connections: Arc<Semaphore>,
    /// Connections being told 503 because of the limit.
    refusals: Arc<Semaphore>,
    grace: Duration,
    fast_limits: crate::fast_path::Limits,
}

impl Server {
    /// One worker: accepts on its own listener until told to stop, then waits up to the grace
    /// period for its connections' requests in flight.
    async fn accept_loop(
        self: Arc<Self>,
        listener: std::net::TcpListener,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "worker cannot use its listening socket");
                return;
            }
        };
        let graceful = GracefulShutdown::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.wait_for(|stop| *stop) => break,
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                limit_rejected("connections");
                if let Ok(permit) = self.refusals.clone().try_acquire_owned() {
                    let server = self.clone();
                    tokio::spawn(async move {
                        server.refuse(stream, peer).await;
                        drop(permit);
                    });
                }
                continue;
            };
            let server = self.clone();
            let watcher = graceful.watcher();
            let stop = stop.clone();
            tokio::spawn(async move {
                server.connection(stream, peer, watcher, stop).await;
                drop(permit);
            });
        }
        drop(listener);
        tokio::select! {
            _ = graceful.shutdown() => tracing::debug!("worker's connections all closed"),
            _ = tokio::time::sleep(self.grace) => tracing::warn!("grace period over; closing remaining connections"),
        }
    }

    async fn connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let state = self.state.clone();
        // The answer the fast path decided for the request it hands over with the connection.
        let decided: Arc<std::sync::Mutex<Option<Response<api::Body>>>> = Arc::default();
        let first_answer = decided.clone();
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let state = state.clone();
            let decided = first_answer.lock().unwrap().take();
            async move {
                if let Some(answer) = decided {
                    return Ok::<_, Infallible>(answer);
                }
                let http1 = req.version() < http::Version::HTTP_2;
                // `api::handle` answers a panic of its handler itself and keeps the connection;
                // this catches one outside it (logging, metrics), where the request body is
                // lost with the panic and the connection cannot be reused, so it says so.
                let answer = match AssertUnwindSafe(api::handle(state, req))
                    .catch_unwind()
                    .await
                {
                    Ok(response) => response,
                    Err(panic) => {
                        let mut r = api::panicked("unknown", &*panic);
                        if http1 {
                            r.headers_mut().insert(
                                header::CONNECTION,
                                http::HeaderValue::from_static("close"),
                            );
                        }
                        r
                    }
                };
                Ok::<_, Infallible>(answer)
            }
        });
        let Some(tls) = &self.tls else {
            // A second handle on the socket, so that a client too slow to send its request head
            // can still be told 408 after hyper has given up the connection.
            let raw = stream.as_fd().try_clone_to_owned().ok();
            let io = GuardedIo::new(stream, self.idle);
            let partial_head = io.read_since_write_flag();
            let io = if crate::fast_path::enabled() {
                match crate::fast_path::serve(&self.state, io, &self.fast_limits, &mut stop).await {
                    crate::fast_path::Outcome::Closed => return,
                    crate::fast_path::Outcome::HandOver { io, unread, answer } => {
                        // Once per connection: how many clients send what the fast path does
                        // not take (another route, a header off its list).
                        metrics::counter!("larder_fast_path_handovers_total").increment(1);
                        *decided.lock().unwrap() = answer;
                        crate::fast_path::Rewind::new(io, unread)
                    }
                }
            } else {
                crate::fast_path::Rewind::new(io, bytes::Bytes::new())
            };
            let result = watcher
                .watch(self.h1.serve_connection(TokioIo::new(io), service))
                .await;
            if let Err(e) = result {
                if e.is_timeout() && partial_head.get() {
                    limit_rejected("header_timeout");
                    if let Some(raw) = raw {
                        send_request_timeout(std::net::TcpStream::from(raw), self.header_timeout);
                    }
                }
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        };
        // The handshake gets the same bound as a request head: a client that opens a socket and
        // then says nothing holds a connection slot for no longer than that.
        let tls_stream = match tokio::time::timeout(self.header_timeout, tls.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                limit_rejected("header_timeout");
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(GuardedIo::new(tls_stream, self.idle));
        let result = if h2 {
            watcher.watch(self.h2.serve_connection(io, service)).await
        } else {
            watcher.watch(self.h1.serve_connection(io, service)).await
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }

    /// Answers every request on a connection over the limit with 503, then closes it.
    async fn refuse(&self, stream: TcpStream, peer: SocketAddr) {
        let service = service_fn(|_req| async {
            let mut r: Response<api::Body> = api::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections; retry shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            Ok::<_, Infallible>(r)
        });
        let mut h1 = self.h1.clone();
        h1.keep_alive(false);
        match &self.tls {
            None => {
                let io = TokioIo::new(GuardedIo::new(stream, self.idle));
                let _ = h1.serve_connection(io, service).await;
            }
            // TLS clients need a handshake before they can read any answer.
            Some(tls) => {
                if let Ok(Ok(tls_stream)) =
                    tokio::time::timeout(self.header_timeout, tls.accept(stream)).await
                {
                    let io = TokioIo::new(GuardedIo::new(tls_stream, self.idle));
                    let _ = h1.serve_connection(io, service).await;
                }
            }
        }
        tracing::debug!(%peer, "connection refused: too many connections");
    }
}

/// Writes a 408 on a connection whose request head did not arrive in time. Best effort: the
/// answer is small enough for the socket buffer, and a client that vanished loses nothing.
fn send_request_timeout(mut socket: std::net::TcpStream, after: Duration) {
    let _ = socket.write_all(request_timeout_answer(after).as_bytes());
    let _ = socket.shutdown(std::net::Shutdown::Write);
}

/// The 408 for a request head that did not arrive within `after`, closing the connection.
pub(crate) fn request_timeout_answer(after: Duration) -> String {
    let reason = format!(
        "the request head did not arrive within {}s\n",
        after.as_secs()
    );
    format!(
        "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\r\n{reason}",
        reason.len()
    )
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a signal sent right after the "listening" line must be caught.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
}

//! The least any HTTP server can do per small GET: the ceiling for larderd's small-object row
//! (issue 13, item 1) on a machine where the load generator shares the cores.
//!
//! It answers every request head on a keep-alive connection with the same 4 KiB response
//! (a head shaped like larderd's and the body, one `writev`), without looking at the request:
//! no parsing beyond finding the head's end, no lookup, no log, no metrics. Two variants, each
//! with one thread per core and its own `SO_REUSEPORT` listener, as larderd and nginx run:
//!
//! - `tokio`: a current-thread tokio runtime per thread, a task per connection (larderd's
//!   model with nothing else in it);
//! - `epoll`: a bare edge-triggered epoll loop per thread, no runtime at all.
//!
//! Whatever the kernel and the generator cost per request is in both; what larderd spends
//! above the `tokio` variant is its own work.
//!
//!   bare-server tokio|epoll PORT [BODY_BYTES]

use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(variant), Some(port)) = (args.get(1), args.get(2).and_then(|p| p.parse().ok()))
    else {
        eprintln!("usage: bare-server tokio|epoll PORT [BODY_BYTES]");
        std::process::exit(2);
    };
    let body_len: usize = args.get(3).and_then(|b| b.parse().ok()).unwrap_or(4096);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let variant = variant.clone();
    let servers: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener(port).expect("listen");
            let variant = variant.clone();
            std::thread::spawn(move || match variant.as_str() {
                "tokio" => serve_tokio(listener, body_len),
                "epoll" => serve_epoll(listener, body_len),
                other => panic!("unknown variant {other}"),
            })
        })
        .collect();
    println!("listening on 127.0.0.1:{port}");
    for server in servers {
        let _ = server.join();
    }
}

/// The response, head and body apart so that both go out in one gathering write.
fn response(body_len: usize) -> (Vec<u8>, Vec<u8>) {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\naccept-ranges: bytes\r\n\
         content-type: application/octet-stream\r\ncache-control: no-cache\r\n\
         etag: \"{etag}\"\r\nlast-modified: Mon, 30 Nov 2026 07:00:00 GMT\r\n\
         x-request-id: 1234567\r\ndate: Mon, 30 Nov 2026 07:00:00 GMT\r\n\r\n",
        etag = "e".repeat(64)
    );
    (head.into_bytes(), vec![b'x'; body_len])
}

fn listener(port: u16) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Bytes up to and including the first blank line, if a whole head has arrived.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

fn serve_tokio(listener: TcpListener, body_len: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
        let (head, body) = response(body_len);
        let (head, body) = (std::rc::Rc::new(head), std::rc::Rc::new(body));
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (head, body) = (head.clone(), body.clone());
            tokio::task::spawn_local(async move {
                let mut buf = Vec::with_capacity(8192);
                loop {
                    while let Some(end) = head_end(&buf) {
                        buf.drain(..end);
                        let mut slices = [IoSlice::new(&head), IoSlice::new(&body)];
                        let mut rest = &mut slices[..];
                        while !rest.is_empty() {
                            match stream.write_vectored(rest).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                            }
                        }
                    }
                    if !matches!(stream.read_buf(&mut buf).await, Ok(n) if n > 0) {
                        return;
                    }
                }
            });
        }
    });
}

fn serve_epoll(listener: TcpListener, body_len: usize) {
    const LISTENER: u64 = u64::MAX;
    let (head, body) = response(body_len);
    let listener = listener.into_raw_fd();
    let mut pending: std::collections::HashMap<i32, Vec<u8>> = Default::default();
    let mut scratch = vec![0u8; 8192];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    // SAFETY (all blocks below): plain system calls on descriptors this thread owns, with
    // buffers that outlive the calls.
    let epoll = unsafe { libc::epoll_create1(0) };
    assert!(epoll >= 0, "epoll_create1");
    let mut interest = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: LISTENER,
    };
    unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, listener, &mut interest) };
    loop {
        let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 256, -1) };
        for event in &events[..ready.max(0) as usize] {
            if event.u64 == LISTENER {
                loop {
                    let conn = unsafe {
                        libc::accept4(
                            listener,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK,
                        )
                    };
                    if conn < 0 {
                        break;
                    }
                    let on: libc::c_int = 1;
                    unsafe {
                        libc::setsockopt(
                            conn,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            (&on as *const libc::c_int).cast(),
                            size_of::<libc::c_int>() as libc::socklen_t,
                        );
                        let mut interest = libc::epoll_event {
                            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                            u64: conn as u64,
                        };
                        libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, conn, &mut interest);
                    }
                    pending.insert(conn, Vec::with_capacity(8192));
                }
                continue;
            }
            let conn = event.u64 as i32;
            // Edge-triggered: read until the socket has nothing more.
            let closed = loop {
                let n = unsafe { libc::recv(conn, scratch.as_mut_ptr().cast(), scratch.len(), 0) };
                if n == 0 {
                    break true;
                }
                if n < 0 {
                    break io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock;
                }
                let buf = pending.get_mut(&conn).expect("known connection");
                buf.extend_from_slice(&scratch[..n as usize]);
                let mut failed = false;
                while let Some(end) = head_end(buf) {
                    buf.drain(..end);
                    let iov = [
                        libc::iovec {
                            iov_base: head.as_ptr() as *mut _,
                            iov_len: head.len(),
                        },
                        libc::iovec {
                            iov_base: body.as_ptr() as *mut _,
                            iov_len: body.len(),
                        },
                    ];
                    // A short write would need buffering; a client that stops reading for
                    // 4 KiB is not what this measures, so it is dropped instead.
                    let written = unsafe { libc::writev(conn, iov.as_ptr(), 2) };
                    failed |= written as usize != head.len() + body.len();
                }
                if failed {
                    break true;
                }
                if (n as usize) < scratch.len() {
                    break false;
                }
            };
            if closed {
                pending.remove(&conn);
                unsafe { libc::close(conn) };
            }
        }
    }
}

//! Protective limits of the real larderd: connections, request heads (size, count, time),
//! stalled request and response bodies, concurrent uploads. Each must answer with the status
//! the limit calls for, count it in a metric, and leave nothing half-written.

use larder_testkit::Larderd;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn connect(srv: &Larderd) -> TcpStream {
    let s = TcpStream::connect(&srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads one response's head and returns it (status line and headers) with the start of the
/// body that came with it.
fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&byte[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends a HEAD of `ci/{key}` on `s` and returns the answer's head.
fn head_of(s: &mut TcpStream, key: &str) -> String {
    write!(
        s,
        "HEAD /api/v1/object/ci/{key} HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    .unwrap();
    read_head(s)
}

fn read_all(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn metrics(srv: &Larderd) -> String {
    let mut s = connect(srv);
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    read_all(&mut s)
}

fn limit_count(srv: &Larderd, limit: &str) -> u64 {
    let needle = format!("larder_limit_rejections_total{{limit=\"{limit}\"}} ");
    metrics(srv)
        .lines()
        .find_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
        .unwrap_or(0)
}

fn put(srv: &Larderd, key: &str, body: &[u8]) -> String {
    let mut s = connect(srv);
    write!(
        s,
        "PUT /api/v1/object/ci/{key} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    read_all(&mut s)
}

fn status_of(key: &str, srv: &Larderd) -> String {
    let mut s = connect(srv);
    write!(
        s,
        "HEAD /api/v1/object/ci/{key} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    read_all(&mut s).lines().next().unwrap_or("").to_string()
}

/// Files in the data directory other than directories: what a refused upload must not leave.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn connections_over_the_limit_get_503_with_retry_after() {
    let srv = Larderd::start(&["--max-connections", "2"]);
    // Two keep-alive connections that have each finished a request hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&srv);
        s.write_all(b"GET /_liveness HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut third = connect(&srv);
    third
        .write_all(b"GET /_liveness HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let answer = read_all(&mut third);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("too many connections"), "{answer}");
    // Freeing a slot lets the next connection in.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut s = connect(&srv);
    s.write_all(b"GET /_liveness HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    assert!(read_all(&mut s).starts_with("HTTP/1.1 200"));
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert!(limit_count(&srv, "connections") >= 1);
}

#[test]
fn a_slow_request_head_gets_408_and_an_idle_connection_is_closed_quietly() {
    let srv = Larderd::start(&["--header-timeout", "1s"]);
    // Slowloris: part of a head, then nothing.
    let mut slow = connect(&srv);
    slow.write_all(b"GET /api/v1/object/ci/x HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let answer = read_all(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("did not arrive within 1s"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A connection that never sent anything (or is idle between requests) is just closed.
    let mut idle = connect(&srv);
    assert_eq!(read_all(&mut idle), "");
    let mut reused = connect(&srv);
    reused
        .write_all(b"GET /_liveness HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let first = read_head(&mut reused);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(
        read_all(&mut reused),
        "",
        "no unsolicited 408 after a response"
    );
    assert!(limit_count(&srv, "header_timeout") >= 1);
}

#[test]
fn the_header_timeout_of_a_keep_alive_connection_counts_from_its_last_answer() {
    let srv = Larderd::start(&["--header-timeout", "2s"]);
    assert!(put(&srv, "kept", b"kept bytes").starts_with("HTTP/1.1 201"));
    // Requests every 0.5 s for 3.5 s on one connection: its first two seconds end while it is
    // busy, and it must not be closed then. Each request comes 1.5 s before its deadline, room
    // for a loaded machine.
    let mut s = connect(&srv);
    for n in 0..7 {
        let head = head_of(&mut s, "kept");
        assert!(head.starts_with("HTTP/1.1 200"), "request {n}: {head:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Part of a head after the last answer: the 408 comes two seconds after that answer (1.5 s
    // from now), not at once and not never.
    let started = Instant::now();
    s.write_all(b"HEAD /api/v1/object/ci/kept HTTP/1.1\r\n")
        .unwrap();
    let answer = read_all(&mut s);
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_secs(8),
        "408 after {waited:?}"
    );
}

/// A stopping server closes the keep-alive connections that sit between requests at once, not
/// at the end of its grace period: connections that served requests (on the fast path, which
/// watches the stop signal without polling it per request) and then went idle.
#[test]
fn a_stopping_server_closes_idle_keep_alive_connections_at_once() {
    let mut srv = Larderd::start(&["--shutdown-grace", "60s", "--header-timeout", "60s"]);
    assert!(put(&srv, "idle", b"idle bytes").starts_with("HTTP/1.1 201"));
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = connect(&srv);
            for n in 0..3 {
                let head = head_of(&mut s, "idle");
                assert!(head.starts_with("HTTP/1.1 200"), "request {n}: {head:?}");
            }
            s
        })
        .collect();
    let started = Instant::now();
    let status = srv.terminate();
    let took = started.elapsed();
    assert!(status.success(), "graceful exit, got {status}");
    assert!(
        took < Duration::from_secs(10),
        "the stop waited {took:?} for idle connections"
    );
    for s in &mut idle {
        assert_eq!(read_all(s), "", "closed without a word");
    }
}

/// The connection's one timer fires at its first deadline while a request's answer has moved
/// the deadline on; re-armed then, it must still fire at the new deadline even though nothing
/// else happens on the connection: part of a head sent right after the answer gets its 408.
#[test]
fn a_head_started_after_an_answer_gets_its_408_when_the_timer_was_re_armed() {
    let srv = Larderd::start(&["--header-timeout", "1s"]);
    assert!(put(&srv, "rearmed", b"rearmed").starts_with("HTTP/1.1 201"));
    let mut s = connect(&srv);
    // The timer is armed for one second after the connection began; the answer at 0.6 s moves
    // the deadline to 1.6 s, so the timer fires early once and is re-armed.
    std::thread::sleep(Duration::from_millis(600));
    let head = head_of(&mut s, "rearmed");
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    let started = Instant::now();
    s.write_all(b"HEAD /api/v1/object/ci/rearmed HTTP/1.1\r\n")
        .unwrap();
    let answer = read_all(&mut s);
    let waited = started.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "{answer:?} after {waited:?}"
    );
    assert!(waited < Duration::from_secs(8), "408 after {waited:?}");
}

#[test]
fn too_many_or_too_large_header_fields_get_431_with_a_reason() {
    let srv = Larderd::start(&[]);
    let mut many = String::from("GET /_liveness HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for i in 0..120 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let mut s = connect(&srv);
    s.write_all(many.as_bytes()).unwrap();
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(answer.contains("the limit is 100"), "{answer}");

    let big = format!(
        "GET /_liveness HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {}\r\n\r\n",
        "a".repeat(80 << 10)
    );
    let mut s = connect(&srv);
    s.write_all(big.as_bytes()).unwrap();
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    assert!(answer.contains("the limit is 65536"), "{answer:.300}");

    // Far beyond the limit hyper stops reading and answers 431 itself.
    let huge = format!(
        "GET /_liveness HTTP/1.1\r\nhost: x\r\nx-huge: {}\r\n\r\n",
        "a".repeat(512 << 10)
    );
    let mut s = connect(&srv);
    let _ = s.write_all(huge.as_bytes());
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    assert!(limit_count(&srv, "header_count") >= 1);
    assert!(limit_count(&srv, "header_bytes") >= 1);
}

#[test]
fn a_stalled_upload_gets_408_and_stores_nothing() {
    let srv = Larderd::start(&["--idle-timeout", "1s"]);
    let before = files_under(&srv.data_dir);
    let mut s = connect(&srv);
    s.write_all(
        b"PUT /api/v1/object/ci/stalled HTTP/1.1\r\nhost: x\r\ncontent-length: 1048576\r\n\r\n",
    )
    .unwrap();
    s.write_all(&vec![7u8; 100 << 10]).unwrap();
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("nothing was stored"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "the rest of the body is not waited for, and the answer says so: {answer}"
    );
    assert!(status_of("stalled", &srv).starts_with("HTTP/1.1 404"));
    assert_eq!(files_under(&srv.data_dir), before, "no temp file left");
    assert!(limit_count(&srv, "request_body_idle") >= 1);
}

#[test]
fn a_download_nobody_reads_is_abandoned_after_the_idle_timeout() {
    let srv = Larderd::start(&["--idle-timeout", "1s"]);
    let body = vec![1u8; 64 << 20];
    assert!(put(&srv, "big", &body).starts_with("HTTP/1.1 201"));
    let mut s = connect(&srv);
    // A small receive buffer, so the server's writes block soon.
    s.write_all(b"GET /api/v1/object/ci/big HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    assert!(
        received < body.len(),
        "the server should have given up: got {received} bytes"
    );
    assert!(limit_count(&srv, "response_body_idle") >= 1);
    // The server is fine afterwards.
    assert!(status_of("big", &srv).starts_with("HTTP/1.1 200"));
}

#[test]
fn uploads_over_the_limit_get_503_and_the_first_one_completes() {
    let srv = Larderd::start(&["--max-uploads", "1"]);
    let body = vec![3u8; 2 << 20];
    let mut first = connect(&srv);
    write!(
        first,
        "PUT /api/v1/object/ci/first HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    first.write_all(&body[..1 << 20]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let answer = put(&srv, "second", b"small");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"));
    assert!(
        answer.contains("too many uploads in progress (limit 1)"),
        "{answer}"
    );
    assert!(status_of("second", &srv).starts_with("HTTP/1.1 404"));
    first.write_all(&body[1 << 20..]).unwrap();
    assert!(read_all(&mut first).starts_with("HTTP/1.1 201"));
    assert!(put(&srv, "second", b"small").starts_with("HTTP/1.1 201"));
    assert!(limit_count(&srv, "uploads") >= 1);
}

#[test]
fn oversized_uploads_are_counted() {
    let srv = Larderd::start(&["--max-object-size", "1KiB"]);
    let answer = put(&srv, "big", &[0u8; 2048]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(limit_count(&srv, "object_size") >= 1);
}

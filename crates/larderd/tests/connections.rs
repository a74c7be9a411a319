//! Connections of the real larderd under early answers and faults: every request on a
//! keep-alive connection gets its answer, and a connection ends only after an answer that said
//! `Connection: close`.
//!
//! The client here is a small raw HTTP/1.1 client, because what is tested is exactly what
//! HTTP libraries hide: whether a response announced the close, whether the next request on
//! the same connection was answered or met a reset, and when a request body is sent (after the
//! head, in its own packet, as clients that stream uploads do).

use larder_testkit::bazel::{self, sha256_hex};
use larder_testkit::{Larderd, Launch, s3, token_sha256};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

struct Request {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    /// Send `Expect: 100-continue` and the body only once invited.
    expect_continue: bool,
}

impl Request {
    fn new(method: &'static str, path: &str) -> Request {
        Request {
            method,
            path: path.to_string(),
            headers: Vec::new(),
            body: None,
            expect_continue: false,
        }
    }

    fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn body(mut self, body: &[u8]) -> Request {
        self.body = Some(body.to_vec());
        self
    }

    fn expect_continue(mut self) -> Request {
        self.expect_continue = true;
        self
    }

    fn head(&self) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\nhost: larder\r\n", self.method, self.path);
        for (n, v) in &self.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(body) = &self.body {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
            if self.expect_continue {
                head.push_str("expect: 100-continue\r\n");
            }
        }
        head.push_str("\r\n");
        head.into_bytes()
    }
}

/// A keep-alive HTTP/1.1 client that reconnects only after a response announced the close.
struct Client {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
    /// Connections opened, the first included.
    connects: usize,
    /// Pause between a request head and its body, so that the body arrives after the server
    /// has seen the head (and may have answered already).
    body_pause: Duration,
}

impl Client {
    fn new(addr: &str) -> Client {
        Client {
            addr: addr.to_string(),
            conn: None,
            connects: 0,
            body_pause: Duration::from_millis(2),
        }
    }

    /// Sends `req` and reads its answer. An error is a request left without an answer on a
    /// connection that was not announced to close; the connection is then dropped.
    async fn send(&mut self, req: &Request) -> Result<Response, String> {
        let result = tokio::time::timeout(Duration::from_secs(20), self.exchange(req))
            .await
            .unwrap_or_else(|_| Err("no answer within 20 s".into()));
        match &result {
            Ok(r) if !r.closes() => {}
            _ => self.conn = None,
        }
        result
    }

    async fn exchange(&mut self, req: &Request) -> Result<Response, String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            s.set_nodelay(true).unwrap();
            self.conn = Some(BufReader::new(s));
            self.connects += 1;
        }
        let head_only = req.method == "HEAD";
        let conn = self.conn.as_mut().unwrap();
        let lost = |what: &str, e: std::io::Error| {
            format!("{what} on a connection whose last answer did not announce a close: {e}")
        };
        conn.get_mut()
            .write_all(&req.head())
            .await
            .map_err(|e| lost("writing the request head", e))?;
        if let Some(body) = &req.body {
            if req.expect_continue {
                let first = read_response(conn, head_only)
                    .await
                    .map_err(|e| lost("waiting for 100 Continue", e))?;
                if first.status != 100 {
                    // The body was never sent: reusing the connection would make the server
                    // read the next request as this one's body, so the close must be said.
                    if !first.closes() {
                        return Err(format!(
                            "{} to an Expect: 100-continue request without Connection: close",
                            first.status
                        ));
                    }
                    return Ok(first);
                }
            } else {
                tokio::time::sleep(self.body_pause).await;
            }
            if let Err(e) = conn.get_mut().write_all(body).await {
                // The server may have answered and closed already; only an announced close
                // excuses that.
                return match read_response(conn, head_only).await {
                    Ok(r) if r.closes() => Ok(r),
                    _ => Err(lost("writing the request body", e)),
                };
            }
        }
        read_response(conn, head_only)
            .await
            .map_err(|e| lost("reading the answer", e))
    }
}

async fn read_response(
    conn: &mut BufReader<TcpStream>,
    head_only: bool,
) -> std::io::Result<Response> {
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l
            .split_once(':')
            .ok_or_else(|| std::io::Error::other(format!("bad header {l:?}")))?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut r = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if r.header("transfer-encoding").is_some() {
        return Err(std::io::Error::other(
            "larderd answers with a Content-Length",
        ));
    }
    let has_body = !head_only && !matches!(status, 100..=199 | 204 | 304);
    if has_body {
        let len: usize = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| std::io::Error::other("no Content-Length"))?;
        r.body = vec![0; len];
        conn.read_exact(&mut r.body).await?;
    }
    Ok(r)
}

const WRITER: &str = "keepalive-writer-token";
const READER: &str = "keepalive-reader-token";
/// Small enough that a body over it is still a small body.
const MAX_OBJECT: usize = 4096;

fn tokens_config(dir: &std::path::Path) -> String {
    let path = dir.join("larder.toml");
    std::fs::write(
        &path,
        format!(
            "[[tokens]]\nname = \"writer\"\nsha256 = \"{}\"\nscopes = [\"read\", \"write\"]\n\
             [[tokens]]\nname = \"reader\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
            token_sha256(WRITER),
            token_sha256(READER)
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// One kind of request and the status it must get.
struct Round {
    name: &'static str,
    request: Request,
    want: u16,
}

/// Every early answer the object API gives, each with a small body where a client could send
/// one, and the ordinary answers around them.
fn rounds(etag: &str, i: usize) -> Vec<Round> {
    let obj = "/api/v1/object/ci/obj";
    let auth = format!("Bearer {WRITER}");
    let other = "\"0000000000000000000000000000000000000000000000000000000000000000\"";
    let small = vec![b'x'; 100 + i % 700];
    let r = |method, path: &str| Request::new(method, path).header("authorization", &auth);
    let mut many_headers = r("GET", obj);
    for h in 0..120 {
        many_headers = many_headers.header(&format!("x-filler-{h}"), "1");
    }
    vec![
        Round {
            name: "HEAD 200",
            request: r("HEAD", obj),
            want: 200,
        },
        Round {
            name: "GET 200",
            request: r("GET", obj),
            want: 200,
        },
        Round {
            name: "GET with a body 200",
            request: r("GET", obj).body(&small),
            want: 200,
        },
        Round {
            name: "GET 304",
            request: r("GET", obj).header("if-none-match", etag),
            want: 304,
        },
        Round {
            name: "GET 412",
            request: r("GET", obj).header("if-match", other),
            want: 412,
        },
        Round {
            name: "GET 416",
            request: r("GET", obj).header("range", "bytes=99999-"),
            want: 416,
        },
        Round {
            name: "GET 206",
            request: r("GET", obj).header("range", "bytes=10-19"),
            want: 206,
        },
        Round {
            name: "PUT If-None-Match * 412",
            request: r("PUT", obj).header("if-none-match", "*").body(&small),
            want: 412,
        },
        Round {
            name: "PUT If-Match other 412",
            request: r("PUT", obj).header("if-match", other).body(&small),
            want: 412,
        },
        Round {
            name: "PATCH 405",
            request: r("PATCH", obj).body(&small),
            want: 405,
        },
        Round {
            name: "PUT 401",
            request: Request::new("PUT", obj).body(&small),
            want: 401,
        },
        Round {
            name: "PUT 403",
            request: Request::new("PUT", obj)
                .header("authorization", &format!("Bearer {READER}"))
                .body(&small),
            want: 403,
        },
        Round {
            name: "PUT 413",
            request: r("PUT", "/api/v1/object/ci/big").body(&vec![b'b'; MAX_OBJECT + 1 + i]),
            want: 413,
        },
        Round {
            name: "PUT bad Time-To-Live 400",
            request: r("PUT", "/api/v1/object/ci/ttl")
                .header("time-to-live", "soon")
                .body(&small),
            want: 400,
        },
        Round {
            name: "PUT bad name 400",
            request: r("PUT", "/api/v1/object/CI/x").body(&small),
            want: 400,
        },
        Round {
            name: "POST unknown route 404",
            request: r("POST", "/nope").body(&small),
            want: 404,
        },
        Round {
            name: "431 with a body",
            request: many_headers.body(&small),
            want: 431,
        },
        Round {
            name: "PUT 412 (create-only, the key exists) with 100-continue",
            request: r("PUT", obj)
                .header("if-none-match", "*")
                .body(&small)
                .expect_continue(),
            want: 412,
        },
        Round {
            name: "PUT 401 without 100-continue",
            request: Request::new("PUT", obj).body(&small).expect_continue(),
            want: 401,
        },
        Round {
            name: "PUT 413 without 100-continue",
            request: r("PUT", "/api/v1/object/ci/big")
                .body(&vec![b'b'; MAX_OBJECT + 1])
                .expect_continue(),
            want: 413,
        },
        Round {
            name: "PUT 201",
            request: r("PUT", "/api/v1/object/ci/tmp").body(&small),
            want: 201,
        },
        Round {
            name: "DELETE 204",
            request: r("DELETE", "/api/v1/object/ci/tmp"),
            want: 204,
        },
    ]
}

/// Runs `cycles` cycles of every round on one connection, then uploads refused for the upload
/// limit, and fails on any request left without an answer or with the wrong status.
/// `refused_before_body` is how many of a cycle's `Expect: 100-continue` uploads are refused
/// before the body is invited (each of those costs the connection: the client never sent it).
async fn keep_alive_rounds(srv: &Larderd, cycles: usize, refused_before_body: usize) {
    let mut c = Client::new(&srv.addr);
    let body = vec![7u8; 3000];
    let put = Request::new("PUT", "/api/v1/object/ci/obj")
        .header("authorization", &format!("Bearer {WRITER}"))
        .body(&body);
    let r = c.send(&put).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let etag = r.header("etag").unwrap().to_string();
    let (mut answered, mut failures, mut announced) = (0, Vec::new(), 0);
    for i in 0..cycles {
        for round in rounds(&etag, i) {
            match c.send(&round.request).await {
                Ok(r) => {
                    assert_eq!(r.status, round.want, "{}: {r:?}", round.name);
                    if round.want == 200 && round.request.method == "GET" {
                        assert!(r.body == body, "{}: the whole object", round.name);
                    }
                    answered += 1;
                    announced += usize::from(r.closes());
                }
                Err(e) => failures.push(format!("cycle {i}, {}: {e}", round.name)),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests got no answer:\n{}",
        failures.len(),
        answered + failures.len(),
        failures.join("\n")
    );
    // A small body sent promptly never costs the connection; only an answer that kept a
    // 100-continue body from being sent ends it.
    let refused_continues = refused_before_body * cycles;
    assert_eq!(
        announced, refused_continues,
        "connections closed with an announcement"
    );
    assert_eq!(c.connects, 1 + refused_continues, "connections opened");

    // 503 for the upload limit (the server runs with --max-uploads 1): one upload held open on
    // another connection, then uploads with small bodies on this one. Should the probe win
    // the slot, the held upload is refused instead and tried again.
    let probe = Request::new("PUT", "/api/v1/object/ci/probe")
        .header("authorization", &format!("Bearer {WRITER}"))
        .body(b"probe");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut held = loop {
        let mut held = TcpStream::connect(&srv.addr).await.unwrap();
        let head = Request::new("PUT", "/api/v1/object/ci/held")
            .header("authorization", &format!("Bearer {WRITER}"))
            .body(&[1; 1000])
            .head();
        held.write_all(&head).await.unwrap();
        held.write_all(&[1; 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = c.send(&probe).await.unwrap();
        if r.status == 503 {
            break held;
        }
        assert!(r.status == 201 || r.status == 200, "{r:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the held upload never took the slot"
        );
    };
    let connects = c.connects;
    for _ in 0..50 {
        let r = c.send(&probe).await.unwrap();
        assert_eq!(r.status, 503, "{r:?}");
        assert!(
            !r.closes(),
            "a small body is read, the connection kept: {r:?}"
        );
    }
    assert_eq!(c.connects, connects);
    held.write_all(&[1; 990]).await.unwrap();
    let r = read_response(&mut BufReader::new(held), false)
        .await
        .unwrap();
    assert_eq!(r.status, 201, "the held upload completes: {r:?}");
}

/// Issue 10, item 1: an answer given before the request body was read (405 after PATCH, 412,
/// 401, 403, 413, 400, 404, 431) ended the connection without `Connection: close` when the
/// body arrived after the head, and the client's next request met a closed socket.
#[tokio::test]
async fn every_request_on_a_keep_alive_connection_is_answered_after_early_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tokens_config(dir.path());
    let srv = Launch::new(&[
        "--config",
        &cfg,
        "--max-object-size",
        "4KiB",
        "--max-uploads",
        "1",
    ])
    .start();
    // 401, 413 and the create-only 412 are decided before the body is needed.
    keep_alive_rounds(&srv, 25, 3).await;
}

/// The same over S3, where a conditional PUT is refused before its body is read — and, sent with
/// `Expect: 100-continue`, before the client is invited to send it.
#[tokio::test]
async fn every_request_on_a_keep_alive_connection_is_answered_after_early_answers_over_s3() {
    if !s3::available(
        "every_request_on_a_keep_alive_connection_is_answered_after_early_answers_over_s3",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = tokens_config(dir.path());
    let mut args = vec![
        "--config",
        &cfg,
        "--max-object-size",
        "4KiB",
        "--max-uploads",
        "1",
    ];
    let over_s3 = s3::replica_args(&s3::unique_prefix("keepalive-test"));
    args.extend(over_s3.iter().map(String::as_str));
    let srv = Launch::new(&args).start();
    // S3 refuses the create-only write before the body is read, so it is never invited.
    keep_alive_rounds(&srv, 25, 3).await;
}

/// Issue 10, item 11: a panic while handling a request ended its connection's task, so the
/// client got no answer at all, nor did the requests after it on that connection. A request for
/// the object the test fault hook names panics in the handler: it gets a 500 with a reason, and
/// the same connection goes on serving.
#[tokio::test]
async fn a_panicking_request_gets_500_and_its_connection_serves_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("larderd.log");
    let mut srv = Launch::new(&[])
        .env("LARDER_TEST_FAULT_PANIC_KEY", "ci/boom")
        .stderr_to(&log)
        .start();
    let mut c = Client::new(&srv.addr);
    let fine = "/api/v1/object/ci/fine";
    let boom = "/api/v1/object/ci/boom";
    assert_eq!(
        c.send(&Request::new("PUT", fine).body(b"fine"))
            .await
            .unwrap()
            .status,
        201
    );
    for req in [
        Request::new("GET", boom).header("x-request-id", "boom-get"),
        Request::new("PUT", boom)
            .header("x-request-id", "boom-put")
            .body(&[9; 1000]),
    ] {
        let r = c.send(&req).await.unwrap();
        assert_eq!(r.status, 500, "{r:?}");
        let reason = String::from_utf8(r.body.clone()).unwrap();
        assert!(
            reason.ends_with('\n') && reason.trim_end().lines().count() == 1,
            "one-line reason: {reason:?}"
        );
        assert!(reason.contains("panicked"), "{reason}");
        assert_eq!(
            r.header("x-request-id"),
            req.headers
                .iter()
                .find(|(n, _)| n == "x-request-id")
                .map(|(_, v)| v.as_str())
        );
        assert!(!r.closes(), "the connection is kept: {r:?}");
        let r = c.send(&Request::new("GET", fine)).await.unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"fine"[..]),
            "the next request on the connection"
        );
    }
    assert_eq!(c.connects, 1, "one connection served every request");
    let r = c.send(&Request::new("GET", "/metrics")).await.unwrap();
    let metrics = String::from_utf8(r.body).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "larder_request_panics_total 2"),
        "{metrics}"
    );
    assert_eq!(
        c.send(&Request::new("HEAD", boom)).await.unwrap().status,
        500,
        "still panicking, still answered"
    );
    // A graceful stop: log lines are buffered, and only a stop flushes the last of them.
    srv.terminate();
    let text = std::fs::read_to_string(&log).unwrap();
    for id in ["boom-get", "boom-put"] {
        assert!(
            text.lines()
                .any(|l| l.contains("request handler panicked") && l.contains(id)),
            "the panic is logged with its request id {id}:\n{text}"
        );
    }
}

/// Issue 10, item 11: about once per 40,000–100,000 requests a connection died without an
/// answer when access logging was on: the object handler held a span entered across `.await`,
/// which stayed on the stack of whatever thread ran it, so log lines carried long chains of
/// other requests' spans and the subscriber could panic. A few hundred thousand requests over
/// 64 keep-alive connections, GET/HEAD/404/PUT mixed, with the access log on: every one
/// answered with its status, one access line written for each, and no line carrying another
/// request's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_of_a_concurrent_load_with_logging_on_is_answered() {
    const CONNECTIONS: usize = 64;
    const PER_CONNECTION: usize = 3_125;
    const KEYS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("larderd.log");
    let mut srv = Launch::new(&["--log-format", "json"])
        .env("LARDER_LOG", "info")
        .stderr_to(&log)
        .start();
    let mut c = Client::new(&srv.addr);
    let bodies: Vec<Vec<u8>> = (0..KEYS).map(|k| vec![k as u8; 200 + k * 100]).collect();
    for (k, body) in bodies.iter().enumerate() {
        let r = c
            .send(&Request::new("PUT", &format!("/api/v1/object/load/k{k}")).body(body))
            .await
            .unwrap();
        assert_eq!(r.status, 201);
    }
    let bodies = std::sync::Arc::new(bodies);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|t| {
            let (addr, bodies) = (srv.addr.clone(), bodies.clone());
            tokio::spawn(async move {
                let mut c = Client::new(&addr);
                c.body_pause = Duration::ZERO;
                let mut failures = Vec::new();
                let mut puts = 0;
                for i in 0..PER_CONNECTION {
                    let k = (t + i) % KEYS;
                    let object = |name: &str| format!("/api/v1/object/load/{name}");
                    let (req, want) = match i % 8 {
                        0..=2 => (Request::new("GET", &object(&format!("k{k}"))), 200),
                        3 | 4 => (Request::new("HEAD", &object(&format!("k{k}"))), 200),
                        5 | 6 => (Request::new("GET", &object(&format!("missing{t}"))), 404),
                        _ => {
                            puts += 1;
                            let req = Request::new("PUT", &object(&format!("own{t}")));
                            (req.body(&bodies[k]), if puts == 1 { 201 } else { 200 })
                        }
                    };
                    match c.send(&req).await {
                        Ok(r) if r.status == want => {
                            if req.method == "GET" && want == 200 {
                                assert!(r.body == bodies[k], "GET k{k}: the whole object");
                            }
                        }
                        Ok(r) => failures.push(format!(
                            "{} {}: {} {:?}",
                            req.method,
                            req.path,
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        )),
                        Err(e) => failures.push(format!("{} {}: {e}", req.method, req.path)),
                    }
                }
                (failures, c.connects, puts)
            })
        })
        .collect();
    let (mut failures, mut connects, mut puts) = (Vec::new(), 0, 0);
    for t in tasks {
        let (f, n, p) = t.await.unwrap();
        failures.extend(f);
        connects += n;
        puts += p;
    }
    let elapsed = started.elapsed();
    let total = CONNECTIONS * PER_CONNECTION;
    println!(
        "{total} requests over {CONNECTIONS} connections in {:.1} s ({:.0}/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    assert_eq!(connects, CONNECTIONS, "no connection ended");
    // A graceful stop: log lines are buffered, and only a stop flushes the last of them.
    srv.terminate();

    let text = std::fs::read_to_string(&log).unwrap();
    let (mut access, mut stored, mut foreign) = (0, 0, Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let spans = v["spans"].as_array().map_or(0, Vec::len);
        if v["target"] == "larderd::access" {
            access += 1;
            if spans > 0 {
                foreign.push(line.to_string());
            }
        } else if v["fields"]["message"] == "stored" {
            stored += 1;
            // Its own request's span and nothing else.
            if spans != 1 || v["span"]["name"] != "request" {
                foreign.push(line.to_string());
            }
            assert!(
                v["span"]["etag"].as_str().is_some_and(|e| e.len() == 64),
                "the request span names the revision stored: {line}"
            );
        }
        assert!(!line.contains("panicked"), "a request panicked: {line}");
    }
    assert_eq!(access, KEYS + total, "one access line per request");
    assert_eq!(stored, KEYS + puts, "one line per stored upload");
    assert!(
        foreign.is_empty(),
        "{} log lines carry spans of other requests, e.g. {}",
        foreign.len(),
        &foreign[0][..foreign[0].len().min(600)]
    );
}

/// Access lines are handed to the log writer in batches per worker thread; a batch must still
/// reach the log soon after its requests while the server keeps running (not only at a stop),
/// in order, and again after the server sat idle.
#[tokio::test]
async fn access_lines_reach_the_log_soon_while_the_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("larderd.log");
    let srv = Launch::new(&[])
        .env("LARDER_LOG", "warn,larderd::access=info")
        .stderr_to(&log)
        .start();
    let access_lines = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("larderd::access"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let wait_for = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let lines = access_lines();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut c = Client::new(&srv.addr);
    let path = "/api/v1/object/soon/k";
    for (method, status) in [("GET", 404), ("PUT", 201), ("GET", 200)] {
        let mut req = Request::new(method, path);
        if method == "PUT" {
            req = req.body(b"soon");
        }
        assert_eq!(c.send(&req).await.unwrap().status, status);
    }
    let lines = wait_for(3);
    let statuses: Vec<_> = lines
        .iter()
        .map(|l| l.split(" status=").nth(1).unwrap_or("?")[..3].to_string())
        .collect();
    assert_eq!(statuses, ["404", "201", "200"], "{lines:#?}");
    // Idle long past the batch delay, then one more request: its line comes out on its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.send(&Request::new("HEAD", path)).await.unwrap().status,
        200
    );
    let lines = wait_for(4);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(lines[3].contains("method=HEAD"), "{}", lines[3]);
    drop(srv);
}

/// `LARDER_LOG=…,larderd::access=off` turns the access log off, and only it: the filter is read
/// once at start for the access log, so a server told so writes no access line for any request,
/// on the fast path or through hyper, while its other lines still reach the log.
#[tokio::test]
async fn the_access_log_can_be_turned_off_by_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("larderd.log");
    let mut srv = Launch::new(&[])
        .env("LARDER_LOG", "info,larderd::access=off")
        .stderr_to(&log)
        .start();
    let mut c = Client::new(&srv.addr);
    let path = "/api/v1/object/quiet/k";
    let requests = [
        (Request::new("GET", path), 404),
        (Request::new("PUT", path).body(b"quiet"), 201),
        (Request::new("GET", path), 200),
        // An extra field sends the request to hyper.
        (Request::new("GET", path).header("x-other", "1"), 200),
    ];
    for (req, status) in requests {
        assert_eq!(c.send(&req).await.unwrap().status, status);
    }
    // A graceful stop hands over every batch a worker still holds.
    assert!(srv.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("listening"),
        "other info lines stay on: {text}"
    );
    assert!(
        !text.contains("larderd::access"),
        "no access line with the access log off: {text}"
    );
}

/// The header fields of an answer that must not differ between two servings of one request:
/// all but the date.
fn comparable(r: &Response) -> (u16, Vec<(String, String)>, usize, String) {
    let mut headers: Vec<_> = r
        .headers
        .iter()
        .filter(|(n, _)| n != "date")
        .cloned()
        .collect();
    headers.sort();
    let digest = blake3::hash(&r.body).to_hex().to_string();
    (r.status, headers, r.body.len(), digest)
}

/// Object reads without hyper (`fast_path.rs`) answer exactly as hyper does: the same request
/// sent plainly (the fast path takes it) and with one extra header (which sends it to hyper)
/// gets the same status, header fields and body, for every kind of answer a read can get; and
/// a connection moves from the fast path to hyper in the middle — for a request the fast path
/// does not take, for pipelined requests — with every request answered once, in order. Large
/// bodies go out with `sendfile`, or copied when `LARDER_SENDFILE=0`: the same either way.
#[tokio::test]
async fn object_reads_on_the_fast_path_answer_exactly_as_hyper_does() {
    fast_path_answers_as_hyper_does(true).await;
}

#[tokio::test]
async fn object_reads_on_the_fast_path_without_sendfile_answer_exactly_as_hyper_does() {
    fast_path_answers_as_hyper_does(false).await;
}

async fn fast_path_answers_as_hyper_does(sendfile: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tokens_config(dir.path());
    // ccache's `layout=bazel` entries are action results nobody checks.
    let toml = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{toml}[bazel]\nunchecked_namespaces = [\"ccache\"]\n"),
    )
    .unwrap();
    let mut launch = Launch::new(&["--config", &cfg]);
    if !sendfile {
        launch = launch.env("LARDER_SENDFILE", "0");
    }
    let srv = launch.start();
    let writer = format!("Bearer {WRITER}");
    let reader = format!("Bearer {READER}");
    let small_path = "/api/v1/object/ci/small";
    let large_path = "/api/v1/object/ci/large";
    let large = larder_testkit::pattern(1 << 20, 7);
    let mut c = Client::new(&srv.addr);
    for (path, body) in [(small_path, vec![b's'; 4096]), (large_path, large.clone())] {
        let put = Request::new("PUT", path)
            .header("authorization", &writer)
            .header("content-type", "application/x-tar")
            .body(&body);
        assert_eq!(c.send(&put).await.unwrap().status, 201);
    }
    // A Bazel blob; an action result naming it; and the blob's bytes as an unchecked action
    // result and as a checked one (which is no ActionResult, so it reads as a miss).
    let blob = b"a bazel blob ".repeat(100);
    let blob_hash = sha256_hex(&blob);
    let blob_path = format!("/bazel/ci/cas/{blob_hash}");
    let action_result = bazel::action_result(&[("out/blob", &blob)], b"");
    let action_path = format!("/bazel/ci/ac/{}", sha256_hex(b"an action"));
    let unchecked_ac = format!("/bazel/ccache/ac/{blob_hash}");
    let not_an_action_result = format!("/bazel/ci/ac/{blob_hash}");
    for (path, body) in [
        (&blob_path, &blob),
        (&action_path, &action_result),
        (&unchecked_ac, &blob),
        (&format!("/api/v1/object/ci/ac/{blob_hash}"), &blob),
    ] {
        let put = Request::new("PUT", path)
            .header("authorization", &writer)
            .body(body);
        assert_eq!(c.send(&put).await.unwrap().status, 201, "{path}");
    }
    let mut etag_of = async |path: &str| {
        c.send(&Request::new("HEAD", path).header("authorization", &reader))
            .await
            .unwrap()
            .header("etag")
            .unwrap()
            .to_string()
    };
    let etag = etag_of(small_path).await;
    let large_etag = etag_of(large_path).await;
    let blob_etag = etag_of(&blob_path).await;
    let action_etag = etag_of(&action_path).await;
    let missing_blob = format!("/bazel/ci/cas/{}", sha256_hex(b"never stored"));
    let wrong = "\"0000000000000000000000000000000000000000000000000000000000000000\"";
    let cases: Vec<(&str, Request)> = vec![
        ("GET 200", Request::new("GET", small_path)),
        ("HEAD 200", Request::new("HEAD", small_path)),
        (
            "GET 304",
            Request::new("GET", small_path).header("if-none-match", &etag),
        ),
        (
            "GET 200 pinned",
            Request::new("GET", small_path).header("if-match", &etag),
        ),
        (
            "GET 412",
            Request::new("GET", small_path).header("if-match", wrong),
        ),
        ("GET 404", Request::new("GET", "/api/v1/object/ci/missing")),
        (
            "HEAD 404",
            Request::new("HEAD", "/api/v1/object/ci/missing"),
        ),
        ("GET 400", Request::new("GET", "/api/v1/object/ci/a/../b")),
        ("GET 1 MiB", Request::new("GET", large_path)),
        ("HEAD 1 MiB", Request::new("HEAD", large_path)),
        (
            "GET 206 small",
            Request::new("GET", small_path)
                .header("range", "bytes=10-19")
                .header("if-match", &etag),
        ),
        (
            "GET 206 large",
            Request::new("GET", large_path)
                .header("range", "bytes=100000-299999")
                .header("if-match", &large_etag),
        ),
        (
            "GET 206 suffix",
            Request::new("GET", large_path).header("range", "bytes=-70000"),
        ),
        (
            "GET 412 range",
            Request::new("GET", large_path)
                .header("range", "bytes=0-99")
                .header("if-match", wrong),
        ),
        (
            "GET 416",
            Request::new("GET", large_path).header("range", "bytes=5000000-"),
        ),
        ("bazel blob GET 200", Request::new("GET", &blob_path)),
        ("bazel blob HEAD 200", Request::new("HEAD", &blob_path)),
        (
            "bazel blob GET 304",
            Request::new("GET", &blob_path).header("if-none-match", &blob_etag),
        ),
        (
            "bazel blob GET 206",
            Request::new("GET", &blob_path).header("range", "bytes=5-9"),
        ),
        ("bazel blob GET 404", Request::new("GET", &missing_blob)),
        (
            "bazel blob GET 400",
            Request::new("GET", "/bazel/ci/cas/ABC"),
        ),
        (
            "bazel unchecked ac GET 200",
            Request::new("GET", &unchecked_ac),
        ),
        ("bazel ac GET 200", Request::new("GET", &action_path)),
        ("bazel ac HEAD 200", Request::new("HEAD", &action_path)),
        (
            "bazel ac GET 304",
            Request::new("GET", &action_path).header("if-none-match", &action_etag),
        ),
        (
            "bazel ac GET 206",
            Request::new("GET", &action_path).header("range", "bytes=2-5"),
        ),
        (
            "bazel ac GET 412",
            Request::new("GET", &action_path).header("if-match", wrong),
        ),
        (
            "bazel ac GET 404",
            Request::new("GET", &not_an_action_result),
        ),
    ];
    // What the fast path leaves to hyper: malformed names (hyper says what is wrong).
    let not_on_fast_path = ["GET 400", "bazel blob GET 400"];
    let mut general = Client::new(&srv.addr);
    let mut scrapes = Client::new(&srv.addr);
    let mut handovers = async || {
        let r = scrapes
            .send(&Request::new("GET", "/metrics"))
            .await
            .unwrap();
        let text = String::from_utf8(r.body).unwrap();
        larder_testkit::metric(&text, "larder_fast_path_handovers_total").unwrap_or(0.0)
    };
    // The connections above are with hyper once they have sent a request.
    general
        .send(&Request::new("GET", "/_liveness"))
        .await
        .unwrap();
    handovers().await;
    for (name, request) in cases {
        for token in [Some(&reader), None] {
            let mut plain = Request::new(request.method, &request.path).header(
                "x-request-id",
                &format!("{}-{}", name.replace(' ', "-"), token.is_some()),
            );
            for (n, v) in &request.headers {
                plain = plain.header(n, v);
            }
            if let Some(token) = token {
                plain = plain.header("authorization", token);
            }
            let mut via_hyper = Request::new(plain.method, &plain.path);
            via_hyper.headers = plain.headers.clone();
            let via_hyper = via_hyper.header("x-larder-test", "not on the fast path's list");
            // A connection of its own: one the fast path handed to hyper stays there.
            let before = handovers().await;
            let a = Client::new(&srv.addr).send(&plain).await.unwrap();
            let handed_over = handovers().await - before;
            let b = general.send(&via_hyper).await.unwrap();
            assert_eq!(comparable(&a), comparable(&b), "{name}, token {token:?}");
            assert!(a.header("date").is_some(), "{name}: a Date field");
            let expected = not_on_fast_path.contains(&name);
            assert_eq!(
                handed_over,
                f64::from(u8::from(expected)),
                "{name}, token {token:?}: taken by the fast path"
            );
        }
    }
    assert_eq!(general.connects, 1);

    // Pipelined: small, large, small, then one the fast path does not take, in one write.
    let mut conn = TcpStream::connect(&srv.addr).await.unwrap();
    let mut pipelined = Vec::new();
    for request in [
        Request::new("GET", small_path),
        Request::new("GET", large_path),
        Request::new("GET", small_path).header("if-none-match", &etag),
        Request::new("GET", small_path).header("range", "bytes=0-9"),
        Request::new("GET", large_path).header("range", "bytes=1-200000"),
        Request::new("GET", large_path),
    ] {
        pipelined.extend(request.header("authorization", &reader).head());
    }
    conn.write_all(&pipelined).await.unwrap();
    let mut conn = BufReader::new(conn);
    let mut answers = Vec::new();
    for _ in 0..6 {
        let r = tokio::time::timeout(Duration::from_secs(20), read_response(&mut conn, false))
            .await
            .expect("every pipelined request is answered")
            .unwrap();
        answers.push((r.status, r.body.len()));
    }
    assert_eq!(
        answers,
        [
            (200, 4096),
            (200, 1 << 20),
            (304, 0),
            (206, 10),
            (206, 200000),
            (200, 1 << 20)
        ]
    );

    // A large answer from disk: counted once, every byte counted.
    let count = |metrics: &str| {
        larder_testkit::metric(
            metrics,
            "larder_http_requests_total{route=\"object\",method=\"GET\",status=\"200\"}",
        )
        .unwrap_or(0.0)
    };
    let served = |metrics: &str| {
        larder_testkit::metric(metrics, "larder_bytes_served_total{tier=\"disk\"}").unwrap_or(0.0)
    };
    async fn metrics(c: &mut Client) -> String {
        let r = c.send(&Request::new("GET", "/metrics")).await.unwrap();
        String::from_utf8(r.body).unwrap()
    }
    let before = metrics(&mut c).await;
    let mut once = Client::new(&srv.addr);
    let r = once
        .send(&Request::new("GET", large_path).header("authorization", &reader))
        .await
        .unwrap();
    assert!(r.body == large, "the exact bytes");
    let after = metrics(&mut c).await;
    assert_eq!(count(&after) - count(&before), 1.0, "counted once");
    assert_eq!(
        served(&after) - served(&before),
        (1 << 20) as f64,
        "bytes served"
    );
}

/// Bazel's reads are answered on the fast path, like object reads: blobs, and action results
/// checked or not (a checked one after its blobs are looked up), so a connection that sends
/// only those is never handed to hyper; a malformed one is. Counted by
/// `larder_fast_path_handovers_total`, once per connection handed over.
#[tokio::test]
async fn bazel_reads_stay_on_the_fast_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("larder.toml");
    std::fs::write(&cfg, "[bazel]\nunchecked_namespaces = [\"ccache\"]\n").unwrap();
    let srv = Launch::new(&["--config", cfg.to_str().unwrap()]).start();
    let blob = b"a bazel blob ".repeat(100);
    let hash = sha256_hex(&blob);
    let action = sha256_hex(b"an action");
    let mut c = Client::new(&srv.addr);
    for (path, body) in [
        (format!("/bazel/bz/cas/{hash}"), blob.clone()),
        (format!("/bazel/ccache/ac/{hash}"), blob.clone()),
        (
            format!("/bazel/bz/ac/{action}"),
            bazel::action_result(&[("out/blob", &blob)], b""),
        ),
        (format!("/api/v1/object/bz/ac/{hash}"), blob.clone()),
    ] {
        let put = Request::new("PUT", &path).body(&body);
        assert_eq!(c.send(&put).await.unwrap().status, 201, "{path}");
    }
    // This connection is with hyper from now on: later scrapes hand nothing over.
    let handovers = async |c: &mut Client| {
        let r = c.send(&Request::new("GET", "/metrics")).await.unwrap();
        let text = String::from_utf8(r.body).unwrap();
        larder_testkit::metric(&text, "larder_fast_path_handovers_total").unwrap_or(0.0)
    };
    let before = handovers(&mut c).await;
    let mut reads = Client::new(&srv.addr);
    for _ in 0..3 {
        for (path, want) in [
            (format!("/bazel/bz/cas/{hash}"), 200),
            (format!("/bazel/bz/cas/{}", sha256_hex(b"other")), 404),
            (format!("/bazel/ccache/ac/{hash}"), 200),
            (format!("/bazel/bz/ac/{action}"), 200),
            // Stored, but no action result: a miss.
            (format!("/bazel/bz/ac/{hash}"), 404),
        ] {
            let r = reads.send(&Request::new("GET", &path)).await.unwrap();
            assert_eq!(r.status, want, "{path}");
            if path.contains(&hash) && want == 200 {
                assert!(r.body == blob, "{path}");
            }
        }
    }
    assert_eq!(reads.connects, 1);
    assert_eq!(
        handovers(&mut c).await - before,
        0.0,
        "Bazel reads stayed off hyper"
    );
    let r = Client::new(&srv.addr)
        .send(&Request::new("GET", "/bazel/bz/cas/ABC"))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        handovers(&mut c).await - before,
        1.0,
        "a malformed hash is left to hyper"
    );
    let r = c.send(&Request::new("GET", "/metrics")).await.unwrap();
    let metrics = String::from_utf8(r.body).unwrap();
    for (route, status, n) in [
        ("bazel_cas", 200, 3.0),
        ("bazel_ac", 200, 6.0),
        ("bazel_ac", 404, 3.0),
    ] {
        let series = format!(
            "larder_http_requests_total{{route=\"{route}\",method=\"GET\",status=\"{status}\"}}"
        );
        assert_eq!(
            larder_testkit::metric(&metrics, &series),
            Some(n),
            "{series}"
        );
    }
}

/// A read the fast path decides but cannot send itself — a large body coming from S3 — is handed
/// to hyper together with its answer: executed once, counted once, the exact bytes, and the
/// connection serves the next request.
#[tokio::test]
async fn a_remote_read_handed_to_hyper_with_its_answer_runs_once() {
    if !s3::available("a_remote_read_handed_to_hyper_with_its_answer_runs_once") {
        return;
    }
    let over_s3 = s3::replica_args(&s3::unique_prefix("handover-test"));
    let args: Vec<&str> = over_s3.iter().map(String::as_str).collect();
    let writer = Launch::new(&args).start();
    let reader = Launch::new(&args).start();
    let path = "/api/v1/object/ci/remote";
    let body = larder_testkit::pattern(1 << 20, 11);
    let mut w = Client::new(&writer.addr);
    let put = w
        .send(&Request::new("PUT", path).body(&body))
        .await
        .unwrap();
    assert_eq!(put.status, 201);
    let mut metrics_client = Client::new(&reader.addr);
    let gets = async |c: &mut Client| {
        let r = c.send(&Request::new("GET", "/metrics")).await.unwrap();
        larder_testkit::metric(
            &String::from_utf8(r.body).unwrap(),
            "larder_http_requests_total{route=\"object\",method=\"GET\",status=\"200\"}",
        )
        .unwrap_or(0.0)
    };
    let before = gets(&mut metrics_client).await;
    // The reader's disk has never seen the key: the bytes come from S3.
    let mut c = Client::new(&reader.addr);
    let r = c.send(&Request::new("GET", path)).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == body, "the exact bytes");
    assert_eq!(
        gets(&mut metrics_client).await - before,
        1.0,
        "counted once"
    );
    let again = c.send(&Request::new("HEAD", path)).await.unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(c.connects, 1, "the same connection served the next request");
}

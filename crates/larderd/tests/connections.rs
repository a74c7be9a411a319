//! Connections of the real larderd under early answers and faults: every request on a
//! keep-alive connection gets its answer, and a connection ends only after an answer that said
//! `Connection: close`.
//!
//! The client here is a small raw HTTP/1.1 client, because what is tested is exactly what
//! HTTP libraries hide: whether a response announced the close, whether the next request on
//! the same connection was answered or met a reset, and when a request body is sent (after the
//! head, in its own packet, as clients that stream uploads do).

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
            name: "PUT 412 after 100-continue",
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
async fn keep_alive_rounds(srv: &Larderd, cycles: usize) {
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
    let refused_continues = 2 * cycles;
    assert_eq!(
        announced, refused_continues,
        "connections closed with an announcement"
    );
    assert_eq!(c.connects, 1 + refused_continues, "connections opened");

    // 503 for the upload limit (the server runs with --max-uploads 1): one upload held open on
    // another connection, then uploads with small bodies on this one.
    let mut held = TcpStream::connect(&srv.addr).await.unwrap();
    held.write_all(
        &Request::new("PUT", "/api/v1/object/ci/held")
            .header("authorization", &format!("Bearer {WRITER}"))
            .body(&[1; 1000])
            .head(),
    )
    .await
    .unwrap();
    held.write_all(&[1; 10]).await.unwrap();
    let probe = Request::new("PUT", "/api/v1/object/ci/probe")
        .header("authorization", &format!("Bearer {WRITER}"))
        .body(b"probe");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.send(&probe).await.unwrap();
        if r.status == 503 {
            break;
        }
        assert!(r.status == 201 || r.status == 200, "{r:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the held upload never took the slot"
        );
    }
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
    keep_alive_rounds(&srv, 25).await;
}

/// The same over S3, where a conditional PUT is refused before its body is read.
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
    keep_alive_rounds(&srv, 25).await;
}

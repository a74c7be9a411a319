//! HTTP behaviour of the real `larderd` binary on a loopback port: every route, every
//! conditional and range outcome of RFC 9110 that the README's API table names, and every kind of bad input.

use larder_testkit::Larderd;
use reqwest::{Client, Method, StatusCode};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn etag_of(data: &[u8]) -> String {
    format!("\"{}\"", blake3::hash(data).to_hex())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2654435761)
                .wrapping_add(seed as u64) as u8
        })
        .collect()
}

struct Fixture {
    srv: Larderd,
    http: Client,
}

impl Fixture {
    fn new(args: &[&str]) -> Fixture {
        Fixture {
            srv: Larderd::start(args),
            http: Client::new(),
        }
    }
    fn url(&self, ns: &str, key: &str) -> String {
        self.srv.object_url(ns, key)
    }
    async fn put(&self, ns: &str, key: &str, body: Vec<u8>) -> reqwest::Response {
        self.http
            .put(self.url(ns, key))
            .body(body)
            .send()
            .await
            .unwrap()
    }
    async fn json(&self, path: &str) -> serde_json::Value {
        let url = format!("{}{path}", self.srv.url());
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
    async fn get_with(&self, ns: &str, key: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        self.request(Method::GET, ns, key, headers).await
    }
    async fn request(
        &self,
        m: Method,
        ns: &str,
        key: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.http.request(m, self.url(ns, key));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

fn h(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn one_line_reason(r: reqwest::Response) -> String {
    let body = r.text().await.unwrap();
    assert!(
        body.ends_with('\n') && body.trim_end().lines().count() == 1,
        "one-line reason, got {body:?}"
    );
    body.trim_end().to_string()
}

#[tokio::test]
async fn put_get_head_delete_roundtrip() {
    let f = Fixture::new(&[]);
    let data = pattern(3 << 20, 1);
    let r = f
        .http
        .put(f.url("ci", "builds/x.tar.zst"))
        .header("content-type", "application/zstd")
        .header("authorization", "Bearer secret")
        .header("x-larder-meta-commit", "abc")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(h(&r, "etag"), etag_of(&data));
    let r = f.put("ci", "builds/x.tar.zst", data.clone()).await;
    assert_eq!(r.status(), StatusCode::OK, "replacing answers 200");

    let r = f.get_with("ci", "builds/x.tar.zst", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let get_headers = r.headers().clone();
    assert_eq!(h(&r, "etag"), etag_of(&data));
    assert_eq!(h(&r, "accept-ranges"), "bytes");
    assert_eq!(h(&r, "content-length"), data.len().to_string());
    assert!(!h(&r, "last-modified").is_empty());
    assert_eq!(
        h(&r, "content-type"),
        "application/octet-stream",
        "the replacing PUT stored no type"
    );
    assert!(r.headers().get("authorization").is_none());
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());

    let r = f.request(Method::HEAD, "ci", "builds/x.tar.zst", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    for name in [
        "etag",
        "last-modified",
        "content-length",
        "accept-ranges",
        "content-type",
    ] {
        assert_eq!(
            r.headers().get(name),
            get_headers.get(name),
            "HEAD {name} equals GET's"
        );
    }
    assert!(r.bytes().await.unwrap().is_empty());

    assert_eq!(
        f.request(Method::DELETE, "ci", "builds/x.tar.zst", &[])
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.request(Method::DELETE, "ci", "builds/x.tar.zst", &[])
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.get_with("ci", "builds/x.tar.zst", &[]).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn stored_headers_are_an_allow_list() {
    let f = Fixture::new(&[]);
    let r = f
        .http
        .put(f.url("ci", "h"))
        .header("content-type", "text/plain")
        .header("cookie", "a=b")
        .header("x-larder-meta-branch", "main")
        .header("cache-control", "max-age=60")
        .header("x-other", "no")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = f.get_with("ci", "h", &[]).await;
    assert_eq!(h(&r, "content-type"), "text/plain");
    assert_eq!(h(&r, "x-larder-meta-branch"), "main");
    assert_eq!(h(&r, "cache-control"), "max-age=60");
    assert!(r.headers().get("cookie").is_none() && r.headers().get("x-other").is_none());
    let etag = h(&r, "etag");
    let r = f.get_with("ci", "h", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(
        h(&r, "cache-control"),
        "max-age=60",
        "304 carries Cache-Control"
    );
}

#[tokio::test]
async fn ranges_in_all_forms() {
    let f = Fixture::new(&[]);
    let data = pattern(5_000_000, 2);
    let n = data.len();
    f.put("ci", "r", data.clone()).await;
    for (range, start, end) in [
        ("bytes=0-0".to_string(), 0, 0),
        ("bytes=100-199".to_string(), 100, 199),
        ("bytes=4999990-".to_string(), 4_999_990, n - 1),
        ("bytes=-10".to_string(), n - 10, n - 1),
        ("bytes=1000000-99999999".to_string(), 1_000_000, n - 1),
    ] {
        let r = f.get_with("ci", "r", &[("range", &range)]).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(h(&r, "content-range"), format!("bytes {start}-{end}/{n}"));
        assert_eq!(h(&r, "content-length"), (end - start + 1).to_string());
        assert_eq!(h(&r, "accept-ranges"), "bytes");
        assert_eq!(
            r.bytes().await.unwrap().as_ref(),
            &data[start..=end],
            "{range}"
        );
    }
    let r = f
        .request(Method::HEAD, "ci", "r", &[("range", "bytes=10-19")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(h(&r, "content-length"), "10");

    for unsatisfiable in ["bytes=5000000-", "bytes=9999999-10000000", "bytes=-0"] {
        let r = f.get_with("ci", "r", &[("range", unsatisfiable)]).await;
        assert_eq!(
            r.status(),
            StatusCode::RANGE_NOT_SATISFIABLE,
            "{unsatisfiable}"
        );
        assert_eq!(h(&r, "content-range"), format!("bytes */{n}"));
        one_line_reason(r).await;
    }
    for ignored in [
        "bytes=5-2",
        "bytes=0-1,5-6",
        "items=0-1",
        "bytes=abc",
        "bytes=",
    ] {
        let r = f.get_with("ci", "r", &[("range", ignored)]).await;
        assert_eq!(r.status(), StatusCode::OK, "{ignored} is ignored");
        assert_eq!(h(&r, "content-length"), n.to_string());
    }
}

#[tokio::test]
async fn preconditions_follow_rfc_9110() {
    let f = Fixture::new(&[]);
    let data = b"revision one".to_vec();
    let etag = etag_of(&data);
    f.put("ci", "p", data.clone()).await;
    let other = etag_of(b"something else");

    let r = f
        .get_with("ci", "p", &[("if-match", &other), ("range", "bytes=0-3")])
        .await;
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(h(&r, "etag"), etag, "412 carries the current ETag");
    one_line_reason(r).await;

    let r = f
        .get_with("ci", "p", &[("if-match", &etag), ("range", "bytes=0-3")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"revi");

    let weak = format!("W/{etag}");
    let r = f.get_with("ci", "p", &[("if-match", &weak)]).await;
    assert_eq!(
        r.status(),
        StatusCode::PRECONDITION_FAILED,
        "If-Match uses strong comparison"
    );

    for inm in [
        etag.clone(),
        weak.clone(),
        "*".into(),
        format!("\"x\", {etag}"),
    ] {
        let r = f.get_with("ci", "p", &[("if-none-match", &inm)]).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{inm}");
        assert_eq!(h(&r, "etag"), etag);
        assert!(!h(&r, "last-modified").is_empty());
        assert!(r.bytes().await.unwrap().is_empty());
    }

    let r = f
        .get_with("ci", "p", &[("if-range", &etag), ("range", "bytes=0-3")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let r = f
        .get_with("ci", "p", &[("if-range", &other), ("range", "bytes=0-3")])
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "If-Range mismatch sends the whole object"
    );
    let last_modified = h(&r, "last-modified");
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    let r = f
        .get_with(
            "ci",
            "p",
            &[("if-range", &last_modified), ("range", "bytes=0-3")],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "If-Range with a date never matches (a date is a weak validator)"
    );

    let r = f
        .get_with("ci", "p", &[("if-modified-since", &last_modified)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = f
        .get_with(
            "ci",
            "p",
            &[("if-unmodified-since", "Mon, 01 Jan 2001 00:00:00 GMT")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);

    for (name, v) in [
        ("if-match", other.as_str()),
        ("if-match", "*"),
        ("if-none-match", "*"),
    ] {
        let r = f.get_with("ci", "missing", &[(name, v)]).await;
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "GET of a missing key is 404 whatever {name}: {v}"
        );
        one_line_reason(r).await;
    }
}

/// Two revisions written within one second share their Last-Modified, so a client resuming a
/// download with `If-Range: <date>` could get a range of the newer revision appended to bytes of
/// the older one. A date in If-Range must never match: the whole current body comes back, while
/// the ETag still lets a range through.
#[tokio::test]
async fn if_range_with_a_date_never_splices_two_revisions_of_one_second() {
    let f = Fixture::new(&[]);
    let old = pattern(10_000, 7);
    let new = pattern(10_000, 8);
    // A client reads the start of the first revision and remembers its date; the key is
    // replaced within the same second (retried until it is, almost always the first time).
    let mut tries = 0;
    let old_date = loop {
        tries += 1;
        assert!(
            tries <= 20,
            "could not write two revisions within one second"
        );
        f.put("ci", "resumed", old.clone()).await;
        let r = f
            .get_with("ci", "resumed", &[("range", "bytes=0-4999")])
            .await;
        assert_eq!(h(&r, "etag"), etag_of(&old));
        let old_date = h(&r, "last-modified");
        assert!(r.bytes().await.unwrap().as_ref() == &old[..5000]);
        f.put("ci", "resumed", new.clone()).await;
        let r = f.request(Method::HEAD, "ci", "resumed", &[]).await;
        assert_eq!(h(&r, "etag"), etag_of(&new));
        if h(&r, "last-modified") == old_date {
            break old_date;
        }
    };
    let r = f
        .get_with(
            "ci",
            "resumed",
            &[("if-range", &old_date), ("range", "bytes=5000-")],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "a date in If-Range sends the whole body"
    );
    assert_eq!(h(&r, "etag"), etag_of(&new));
    assert!(
        r.bytes().await.unwrap().as_ref() == new.as_slice(),
        "the whole newer revision, not a splice"
    );
    let r = f
        .get_with(
            "ci",
            "resumed",
            &[("if-range", &etag_of(&new)), ("range", "bytes=5000-")],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::PARTIAL_CONTENT,
        "the ETag still matches"
    );
    assert!(r.bytes().await.unwrap().as_ref() == &new[5000..]);
    let r = f
        .get_with(
            "ci",
            "resumed",
            &[("if-range", &etag_of(&old)), ("range", "bytes=5000-")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "the older ETag does not");
}

#[tokio::test]
async fn conditional_puts() {
    let f = Fixture::new(&[]);
    let put = |key: &'static str, body: &'static str, headers: Vec<(&'static str, String)>| {
        let mut req = f.http.put(f.url("ci", key)).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    let r = put("c", "one", vec![("if-none-match", "*".into())])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let one = h(&r, "etag");
    let r = put("c", "two", vec![("if-none-match", "*".into())])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(h(&r, "etag"), one);
    let r = put("c", "two", vec![("if-match", etag_of(b"nope"))])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = put("c", "two", vec![("if-match", one.clone())])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h(&r, "etag"), etag_of(b"two"));
    let r = put("absent", "x", vec![("if-match", one.clone())])
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::PRECONDITION_FAILED,
        "PUT If-Match to a missing key is 412"
    );
    assert_eq!(
        f.get_with("ci", "absent", &[]).await.status(),
        StatusCode::NOT_FOUND
    );
    let r = f
        .http
        .post(f.url("ci", "posted"))
        .body("via post")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "POST is an alias of PUT");
    assert_eq!(
        f.get_with("ci", "posted", &[]).await.text().await.unwrap(),
        "via post"
    );
}

#[tokio::test]
async fn bad_names_are_400_with_a_reason() {
    let f = Fixture::new(&[]);
    for (ns, key) in [
        ("CI", "k"),
        ("-ci", "k"),
        (&"n".repeat(65) as &str, "k"),
        ("ci", "a//b"),
        ("ci", "a%00b"),
        ("ci", "sp%20ace"),
        ("ci", "bad%zz"),
        ("ci", &"k".repeat(513)),
    ] {
        let r = f.put(ns, key, b"x".to_vec()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{ns}/{key}");
        assert!(one_line_reason(r).await.starts_with("invalid"));
        assert_eq!(
            f.get_with(ns, key, &[]).await.status(),
            StatusCode::BAD_REQUEST
        );
    }
    // URL libraries normalise dot segments away, so these go over a raw socket.
    for path in [
        "/api/v1/object/ci/a/../b",
        "/api/v1/object/ci/a/%2e%2e/b",
        "/api/v1/object/ci/./a",
        "/api/v1/object/../x",
        "/api/v1/object/ci/",
    ] {
        let head = raw_request(
            &f.srv.addr,
            &format!(
                "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
            ),
        );
        assert!(head.starts_with("HTTP/1.1 400"), "{path}: {head}");
    }
    let r = f.put("ci", &"k".repeat(512), b"x".to_vec()).await;
    assert_eq!(r.status(), StatusCode::CREATED, "a 512-byte key is fine");
    let r = f.put("ci", "%41%2Fb", b"x".to_vec()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        f.get_with("ci", "A/b", &[]).await.status(),
        StatusCode::OK,
        "keys are percent-decoded"
    );
    let list = f.json("/api/v1/namespaces").await;
    assert_eq!(
        list["namespaces"].as_array().unwrap().len(),
        1,
        "rejected requests created nothing: {list}"
    );
}

#[tokio::test]
async fn routes_methods_and_health() {
    let f = Fixture::new(&[]);
    let base = f.srv.url();
    let r = f.http.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    one_line_reason(r).await;
    let r = f.http.patch(f.url("ci", "k")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h(&r, "allow"), "GET, HEAD, PUT, POST, DELETE");
    let r = f
        .http
        .post(format!("{base}/api/v1/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h(&r, "allow"), "GET, HEAD");
    for path in ["/_liveness", "/_readiness"] {
        assert_eq!(
            f.http
                .get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    f.put("ci", "a", vec![0; 100]).await;
    f.put("other", "b", vec![0; 10]).await;
    let list = f.json("/api/v1/namespaces").await;
    assert_eq!(list["namespaces"][0]["name"], "ci");
    assert_eq!(list["namespaces"][0]["objects"], 1);
    assert_eq!(list["namespaces"][0]["bytes"], 100);
    assert_eq!(list["namespaces"][1]["name"], "other");
    let stats = f.json("/api/v1/stats").await;
    assert_eq!(stats["tiers"][0]["tier"], "disk");
    assert_eq!(stats["tiers"][0]["objects"], 2);
    f.get_with("ci", "a", &[]).await.bytes().await.unwrap();
    let metrics = f
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "larder_http_requests_total{route=\"object\",method=\"PUT\",status=\"201\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("larder_bytes_served_total{tier=\"disk\"} 100"),
        "{metrics}"
    );
}

#[tokio::test]
async fn time_to_live_is_validated_clamped_and_enforced() {
    let f = Fixture::new(&["--max-ttl", "2s"]);
    for bad in ["0s", "10", "5 m", "-1h", "1w", "abc"] {
        let r = f
            .http
            .put(f.url("ci", "t"))
            .header("time-to-live", bad)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "Time-To-Live: {bad}");
        assert!(one_line_reason(r).await.contains("Time-To-Live"));
    }
    assert_eq!(
        f.get_with("ci", "t", &[]).await.status(),
        StatusCode::NOT_FOUND,
        "rejected PUTs stored nothing"
    );
    // 7d is clamped to the 2 s maximum.
    let r = f
        .http
        .put(f.url("ci", "t"))
        .header("time-to-live", "7d")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(f.get_with("ci", "t", &[]).await.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(
        f.get_with("ci", "t", &[]).await.status(),
        StatusCode::NOT_FOUND,
        "expired after the clamped TTL"
    );
}

#[tokio::test]
async fn too_large_bodies_get_413_and_store_nothing() {
    let f = Fixture::new(&["--max-object-size", "1MiB"]);
    f.put("ci", "big", b"old".to_vec()).await;
    let r = f.put("ci", "big", vec![0; (1 << 20) + 1]).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    one_line_reason(r).await;
    // Without Content-Length the limit is enforced while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![1u8; 100_000])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    // The server answers 413 as soon as the limit is crossed and closes the connection rather
    // than draining an unbounded body, so the client may see the reset before the answer.
    match f.http.put(f.url("ci", "big")).body(body).send().await {
        Ok(r) => assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE),
        Err(e) => eprintln!("connection closed while the body was still streaming: {e}"),
    }
    assert_eq!(
        f.get_with("ci", "big", &[]).await.text().await.unwrap(),
        "old",
        "the old revision is untouched"
    );
    let r = f.put("ci", "fits", vec![0; 1 << 20]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// Sends one request over a raw socket and returns the whole response as text.
fn raw_request(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a PUT head and part of its body over a raw socket, then hangs up.
fn abandoned_upload(addr: &str, path: &str, declared: usize, sent: usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n"
    )
    .unwrap();
    s.write_all(&vec![7u8; sent]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
}

#[tokio::test]
async fn client_disconnect_mid_upload_stores_nothing() {
    let f = Fixture::new(&[]);
    abandoned_upload(&f.srv.addr, "/api/v1/object/ci/partial", 4 << 20, 1 << 20);
    f.put("ci", "kept", b"old".to_vec()).await;
    abandoned_upload(&f.srv.addr, "/api/v1/object/ci/kept", 4 << 20, 2 << 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        f.get_with("ci", "partial", &[]).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.get_with("ci", "kept", &[]).await.text().await.unwrap(),
        "old"
    );
    let tmp = std::fs::read_dir(f.srv.data_dir.join("tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp, 0, "the aborted uploads' temp files are gone");
}

#[tokio::test]
async fn disk_full_gives_507_and_nothing_half_written() {
    if !nix_is_root() {
        eprintln!(
            "SKIPPED disk_full_gives_507_and_nothing_half_written: needs root to mount a small tmpfs"
        );
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    if !status.success() {
        eprintln!("SKIPPED disk_full_gives_507_and_nothing_half_written: cannot mount tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let data_dir = mnt.path().join("data");
    let srv = Larderd::start_in(&data_dir, &[]);
    let http = Client::new();
    let url = |k: &str| srv.object_url("ci", k);
    assert_eq!(
        http.put(url("small"))
            .body(vec![1u8; 1000])
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    let r = http
        .put(url("huge"))
        .body(vec![2u8; 8 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    assert!(one_line_reason(r).await.contains("out of space"));
    assert_eq!(
        http.get(url("huge")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        std::fs::read_dir(data_dir.join("tmp")).unwrap().count(),
        0,
        "no temp file left behind"
    );
    assert_eq!(
        http.get(url("small"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len(),
        1000
    );
    assert_eq!(
        http.put(url("after"))
            .body(vec![3u8; 1000])
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED,
        "space is usable again"
    );
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

#[tokio::test]
async fn sigterm_lets_a_download_in_flight_finish() {
    let mut f = Fixture::new(&[]);
    let data = pattern(64 << 20, 5);
    f.put("ci", "big", data.clone()).await;
    // A raw socket that reads slowly keeps the response in flight across the signal.
    let mut s = TcpStream::connect(&f.srv.addr).unwrap();
    write!(
        s,
        "GET /api/v1/object/ci/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = vec![0u8; 64 * 1024];
    s.read_exact(&mut first).unwrap();
    let pid = f.srv.pid();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    let split = first.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        first[split..] == data[..],
        "the whole body arrived after SIGTERM"
    );
    let status = f.srv.terminate();
    assert!(status.success(), "graceful exit, got {status}");
    let _ = &mut f;
}

#[test]
fn help_documents_every_setting() {
    let out = std::process::Command::new(larder_testkit::binary("larderd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--data-dir",
        "--disk-limit",
        "--max-ttl",
        "--max-object-size",
        "--config",
        "--log-format",
        "LARDER_LISTEN",
        "LARDER_DATA_DIR",
        "LARDER_DISK_LIMIT",
        "LARDER_MAX_TTL",
        "LARDER_MAX_OBJECT_SIZE",
        "--s3-bucket",
        "--s3-endpoint",
        "--s3-region",
        "--s3-prefix",
        "--revalidate-after",
        "--s3-reap-grace",
        "LARDER_S3_BUCKET",
        "LARDER_REVALIDATE_AFTER",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}:\n{help}");
    }
}

#[test]
fn bad_configuration_is_refused_with_a_reason() {
    let out = std::process::Command::new(larder_testkit::binary("larderd"))
        .args(["--disk-limit", "plenty"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--disk-limit") && err.contains("invalid size \"plenty\""),
        "{err}"
    );
}

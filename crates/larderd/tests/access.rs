//! Access control against the real larderd: bearer tokens with scopes over namespace patterns,
//! the loopback-only default without tokens, and tokens kept out of logs, metrics and stored
//! headers.

use larder_testkit::{Larderd, Launch, binary, token_sha256, wait_for_log};
use reqwest::{Client, StatusCode};
use std::process::{Command, Stdio};

const WRITER: &str = "ci-writer-3f9a1c";
const READER: &str = "ci-reader-77b2e0";
const OPS: &str = "ops-admin-c0ffee";
const NARROW: &str = "narrow-reader-5e1d";

fn config(dir: &std::path::Path, extra: &str) -> String {
    let path = dir.join("larder.toml");
    let toml = format!(
        "{extra}\n\
         [[tokens]]\nname = \"ci-writer\"\nsha256 = \"{}\"\nscopes = [\"read\", \"write\"]\nnamespaces = [\"ci-*\"]\n\
         [[tokens]]\nname = \"ci-reader\"\nsha256 = \"{}\"\nscopes = [\"read\"]\nnamespaces = [\"ci-*\", \"shared\"]\n\
         [[tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nscopes = [\"read\", \"admin\"]\n\
         [[tokens]]\nname = \"narrow\"\nsha256 = \"{}\"\nscopes = [\"read\"]\nnamespaces = [\"ci-a\"]\n",
        token_sha256(WRITER),
        token_sha256(READER),
        token_sha256(OPS),
        token_sha256(NARROW)
    );
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_string()
}

struct Fixture {
    srv: Larderd,
    http: Client,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), extra);
        Fixture {
            srv: Larderd::start(&["--config", &cfg]),
            http: Client::new(),
            _dir: dir,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.srv.url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if method == reqwest::Method::PUT {
            req = req.body(format!("body of {path}"));
        }
        req.send().await.unwrap()
    }
}

async fn reason(r: reqwest::Response) -> (StatusCode, String) {
    (r.status(), r.text().await.unwrap())
}

#[tokio::test]
async fn tokens_grant_exactly_their_scopes_on_their_namespaces() {
    use reqwest::Method;
    let f = Fixture::new("");
    let obj = "/api/v1/object/ci-main/build.tar";

    // No token, a malformed header, an unknown token: 401 with a challenge and a reason.
    let r = f.send(Method::GET, obj, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"larder\"");
    assert!(r.text().await.unwrap().contains("token is required"));
    let r = f
        .http
        .get(format!("{}{obj}", f.srv.url()))
        .header("authorization", format!("Digest {WRITER}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, text) = reason(f.send(Method::GET, obj, Some("not-a-token")).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(text.contains("unknown token"), "{text}");

    // The writer writes and reads its namespaces, nothing else.
    assert_eq!(
        f.send(Method::PUT, obj, Some(WRITER)).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        f.send(Method::GET, obj, Some(WRITER)).await.status(),
        StatusCode::OK
    );
    let (status, text) = reason(
        f.send(Method::PUT, "/api/v1/object/release/x", Some(WRITER))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        text.contains("no write scope on namespace release"),
        "{text}"
    );

    // The reader reads but cannot write or delete, even where it can read.
    assert_eq!(
        f.send(Method::GET, obj, Some(READER)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        f.send(Method::HEAD, obj, Some(READER)).await.status(),
        StatusCode::OK
    );
    for method in [Method::PUT, Method::DELETE] {
        assert_eq!(
            f.send(method, obj, Some(READER)).await.status(),
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        f.send(Method::GET, "/api/v1/object/other/x", Some(READER))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    // Refused writes changed nothing.
    let r = f.send(Method::GET, obj, Some(OPS)).await;
    assert_eq!(
        r.text().await.unwrap(),
        "body of /api/v1/object/ci-main/build.tar"
    );

    // Admin routes need admin.
    for token in [WRITER, READER] {
        assert_eq!(
            f.send(Method::GET, "/api/v1/stats", Some(token))
                .await
                .status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            f.send(
                Method::POST,
                "/api/v1/object/ci-main/build.tar/invalidate",
                Some(token)
            )
            .await
            .status(),
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        f.send(Method::GET, "/api/v1/stats", Some(OPS))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        f.send(
            Method::POST,
            "/api/v1/object/ci-main/build.tar/invalidate",
            Some(OPS)
        )
        .await
        .status(),
        StatusCode::NO_CONTENT
    );

    // Health checks and (by default) metrics need no token.
    for path in ["/_liveness", "/_readiness", "/metrics"] {
        assert_eq!(
            f.send(Method::GET, path, None).await.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    let metrics = f
        .send(Method::GET, "/metrics", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("larder_auth_denied_total{reason=\"forbidden\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("larder_auth_denied_total{reason=\"unauthenticated\"}"));
}

#[tokio::test]
async fn namespace_listing_shows_only_readable_namespaces() {
    use reqwest::Method;
    let f = Fixture::new("");
    for ns in ["ci-a", "ci-b"] {
        let path = format!("/api/v1/object/{ns}/k");
        assert!(
            f.send(Method::PUT, &path, Some(WRITER))
                .await
                .status()
                .is_success()
        );
    }
    let names = |v: serde_json::Value| -> Vec<String> {
        let mut names: Vec<String> = v["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    let list = |token| {
        let f = &f;
        async move {
            f.send(Method::GET, "/api/v1/namespaces", Some(token))
                .await
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(names(list(OPS).await), ["ci-a", "ci-b"]);
    assert_eq!(names(list(NARROW).await), ["ci-a"]);
}

#[tokio::test]
async fn private_metrics_need_admin() {
    let f = Fixture::new("public_metrics = false");
    let url = format!("{}/metrics", f.srv.url());
    let r = f.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = f.http.get(&url).bearer_auth(READER).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = f.http.get(&url).bearer_auth(OPS).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// A token must never be written anywhere: not in access logs (which are on here, as JSON),
/// not in metrics, not in the headers stored with an object.
#[tokio::test]
async fn tokens_never_appear_in_logs_metrics_or_stored_headers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let log_path = dir.path().join("stderr.log");
    let mut srv = Launch::new(&["--log-format", "json", "--config", &cfg])
        .env("LARDER_LOG", "debug")
        .stderr_to(&log_path)
        .start();
    let base = srv.url();
    let http = Client::new();
    let url = format!("{base}/api/v1/object/ci-x/obj");
    let r = http
        .put(&url)
        .bearer_auth(WRITER)
        .header("x-larder-meta-origin", "test")
        .header("x-request-id", "job-42-step-7")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["x-request-id"], "job-42-step-7");
    let r = http.get(&url).bearer_auth(READER).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("authorization").is_none());
    assert_eq!(r.headers()["x-larder-meta-origin"], "test");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = http
        .get(&url)
        .bearer_auth("wrong-token-abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // A graceful stop, so every log line is written out.
    srv.terminate();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    for secret in [WRITER, READER, "wrong-token-abc"] {
        assert!(!logs.contains(secret), "token in logs:\n{logs}");
        assert!(!metrics.contains(secret), "token in metrics");
    }
    // The access line of the read names the request, the object, the tier and the revision.
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "larderd::access")
        .collect();
    let read = access
        .iter()
        .find(|v| v["fields"]["method"] == "GET" && v["fields"]["status"] == 200)
        .unwrap_or_else(|| panic!("no access line for the GET in:\n{logs}"));
    let fields = &read["fields"];
    assert_eq!(fields["ns"], "ci-x", "{read}");
    assert_eq!(fields["key"], "obj");
    assert_eq!(fields["tier"], "disk");
    assert_eq!(fields["etag"], etag.as_str());
    assert_eq!(fields["token"], "ci-reader");
    assert!(!fields["request_id"].as_str().unwrap_or("").is_empty());
    let put = access
        .iter()
        .find(|v| v["fields"]["method"] == "PUT")
        .unwrap();
    assert_eq!(put["fields"]["request_id"], "job-42-step-7");
}

/// The line a larderd started with a piped stdout prints once it listens.
fn listening_line(child: &mut std::process::Child) -> String {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    line
}

#[test]
fn without_tokens_larderd_stays_on_loopback_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("larderd"))
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without access control"),
        "{err}"
    );
    // With --allow-anonymous it serves (it is stopped as soon as it says so).
    let mut child = Command::new(binary("larderd"))
        .args(["--listen", "0.0.0.0:0", "--allow-anonymous", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = listening_line(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("larderd listening on http://0.0.0.0:"),
        "{line}"
    );
    // Tokens and --allow-anonymous contradict each other.
    let cfg = config(dir.path(), "");
    let out = Command::new(binary("larderd"))
        .args([
            "--allow-anonymous",
            "--listen",
            "127.0.0.1:0",
            "--config",
            &cfg,
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-anonymous cannot be combined"));
}

/// Gradle and Maven send credentials only as HTTP Basic, and only after a Basic challenge: the
/// token is accepted as the password (any user name), and a 401 offers both schemes.
#[tokio::test]
async fn basic_authentication_carries_the_token_as_the_password() {
    let f = Fixture::new("");
    let url = format!("{}/api/v1/object/ci-gradle/entry", f.srv.url());
    let r = f.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenges: Vec<_> = r
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert!(
        challenges.iter().any(|c| c.starts_with("Basic realm=")),
        "{challenges:?}"
    );
    assert!(
        challenges.iter().any(|c| c.starts_with("Bearer realm=")),
        "{challenges:?}"
    );
    let put = f
        .http
        .put(&url)
        .basic_auth("gradle", Some(WRITER))
        .body("cache entry")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    let get = f
        .http
        .get(&url)
        .basic_auth("anyone", Some(READER))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(get.text().await.unwrap(), "cache entry");
    // The token's scopes still apply, and an unknown password is no token.
    let r = f
        .http
        .put(&url)
        .basic_auth("gradle", Some(READER))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = f
        .http
        .get(&url)
        .basic_auth("gradle", Some("not-a-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Token as the user name with an empty password (how some tools are configured).
    let r = f
        .http
        .get(&url)
        .basic_auth(READER, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// One request on an open HTTP/1.1 connection; the status and the body.
async fn exchange(stream: &mut tokio::net::TcpStream, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "connection closed"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn token_section(name: &str, token: &str, scopes: &str) -> String {
    format!(
        "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [{scopes}]\n",
        token_sha256(token)
    )
}

/// SIGHUP puts the file's new token set in force for the next request of every connection,
/// open ones included (the fast path's reads as much as the general path's writes), and
/// `public_metrics` with it. A file that no longer parses changes nothing.
#[tokio::test]
async fn sighup_puts_the_files_new_tokens_in_force_and_a_broken_file_changes_nothing() {
    const OLD: &str = "old-token-4e1f";
    const NEW: &str = "new-token-9a7c";
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("larder.toml");
    let log = dir.path().join("stderr.log");
    std::fs::write(&cfg, token_section("old", OLD, "\"read\", \"write\"")).unwrap();
    let srv = Launch::new(&["--config", cfg.to_str().unwrap()])
        .env("LARDER_LOG", "info")
        .stderr_to(&log)
        .start();
    let http = Client::new();
    let url = srv.object_url("ci-a", "k");
    let put = |token: &'static str| http.put(&url).bearer_auth(token).body("v").send();
    assert!(put(OLD).await.unwrap().status().is_success());
    let mut open = tokio::net::TcpStream::connect(&srv.addr).await.unwrap();
    let get = |token: &str| {
        format!(
            "GET /api/v1/object/ci-a/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
    };
    assert_eq!(exchange(&mut open, &get(OLD)).await, (200, "v".into()));
    assert_eq!(exchange(&mut open, &get(NEW)).await.0, 401);
    let metrics_url = format!("{}/metrics", srv.url());
    assert_eq!(http.get(&metrics_url).send().await.unwrap().status(), 200);

    // The old token revoked, a new one with admin, /metrics private, and a setting that only
    // a restart applies.
    std::fs::write(
        &cfg,
        format!(
            "public_metrics = false\nmax_ttl = \"1h\"\n{}",
            token_section("new", NEW, "\"read\", \"write\", \"admin\"")
        ),
    )
    .unwrap();
    srv.signal("HUP");
    // The warning comes after the reload's own line.
    let text = wait_for_log(
        &log,
        "max_ttl changed in the file and take effect at the next restart only",
    );
    assert!(
        text.contains("configuration reloaded, 1 tokens in force"),
        "{text}"
    );
    // The same connection, now under the new set: the old token is unknown.
    assert_eq!(exchange(&mut open, &get(NEW)).await, (200, "v".into()));
    let (status, reason) = exchange(&mut open, &get(OLD)).await;
    assert_eq!((status, reason.trim()), (401, "unknown token"));
    assert_eq!(put(OLD).await.unwrap().status(), 401);
    assert!(put(NEW).await.unwrap().status().is_success());
    assert_eq!(http.get(&metrics_url).send().await.unwrap().status(), 401);

    // A file that does not parse: refused, said so, and the set in force stays.
    std::fs::write(&cfg, "[[tokens]\nname = ").unwrap();
    srv.signal("HUP");
    let text = wait_for_log(&log, "configuration not reloaded");
    assert!(text.contains("invalid config file"), "{text}");
    assert_eq!(exchange(&mut open, &get(NEW)).await, (200, "v".into()));
    assert_eq!(exchange(&mut open, &get(OLD)).await.0, 401);
    let metrics = http
        .get(&metrics_url)
        .bearer_auth(NEW)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        larder_testkit::metric(&metrics, "larder_config_reloads_total{result=\"applied\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        larder_testkit::metric(&metrics, "larder_config_reloads_total{result=\"refused\"}"),
        Some(1.0),
        "{metrics}"
    );
}

/// A reload that would leave a network listener without tokens is refused like such a start,
/// and a SIGHUP to a larderd without a config file leaves it serving (the signal's default
/// action would end it).
#[tokio::test]
async fn sighup_never_opens_a_network_listener_and_never_stops_the_server() {
    const TOKEN: &str = "only-token-77d0";
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("larder.toml");
    let log = dir.path().join("stderr.log");
    std::fs::write(&cfg, token_section("only", TOKEN, "\"read\", \"write\"")).unwrap();
    let mut child = Command::new(binary("larderd"))
        .args(["--listen", "0.0.0.0:0", "--config", cfg.to_str().unwrap()])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("LARDER_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let line = listening_line(&mut child);
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let url = format!("http://127.0.0.1:{port}/api/v1/object/ci-a/k");
    let http = Client::new();
    std::fs::write(&cfg, "# every token removed\n").unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    let text = wait_for_log(&log, "configuration not reloaded");
    let anonymous = http.put(&url).body("v").send().await.map(|r| r.status());
    let with_token = http.put(&url).bearer_auth(TOKEN).body("v").send().await;
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    assert!(text.contains("refusing to listen on 0.0.0.0:"), "{text}");
    assert!(!text.contains("configuration reloaded"), "{text}");
    assert_eq!(anonymous.unwrap(), StatusCode::UNAUTHORIZED);
    assert!(with_token.unwrap().status().is_success());

    let log = dir.path().join("open.log");
    let srv = Launch::new(&[])
        .env("LARDER_LOG", "info")
        .stderr_to(&log)
        .start();
    srv.signal("HUP");
    wait_for_log(
        &log,
        "nothing to reload, larderd was started without --config",
    );
    let r = http
        .put(srv.object_url("ns", "k"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

//! Access control against the real larderd: bearer tokens with scopes over namespace patterns,
//! the loopback-only default without tokens, and tokens kept out of logs, metrics and stored
//! headers.

use larder_testkit::{Larderd, Launch, binary, token_sha256};
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
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
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

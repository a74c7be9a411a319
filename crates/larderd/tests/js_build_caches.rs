//! Turborepo and Nx against the real larderd, driven by the real clients (issue 14, items 3, 4
//! and their share of 6): turbo 2.11 through `/turbo` (Turborepo's remote cache API v8), nx 24
//! through `/nx/{ns}/v1/cache/{hash}` (its self-hosted remote cache). Each tool test stores
//! with one build, builds again in a clean copy of the workspace and checks that the tool
//! reports remote hits and that the outputs are identical; the builds write a random number
//! into their output, so only a copy from the cache can be identical. The protocol tests check
//! each status and error shape with plain HTTP.
//!
//! The tools come from npm, pinned (`scripts/install-npm-tools.sh`, which prints
//! `LARDER_TURBO` and `LARDER_NX`; scripts/test.sh exports them). The workspaces need no
//! `npm install`: turbo needs only a lock file (it runs the build scripts with npm), nx finds
//! itself through a `node_modules` symlink to the installed tree. Everything stays on
//! loopback: the tools run with a cleared environment (turbo's telemetry, nx's cloud, daemon
//! and terminal UI off; analytics off in nx.json; HOME and TMPDIR in the test's directory),
//! npm's update notifier is off in the workspace's `.npmrc` (turbo passes no unlisted variable
//! to the scripts it runs), and the turbo tests fail if npm left its update-check stamp in HOME.

use larder_testkit::{Larderd, Launch, metric, token_sha256};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WRITER: &str = "js-writer-7c1d0e";
const READER: &str = "js-reader-52aa91";
/// At least 32 bytes, as turbo wants of a signature key.
const KEY_A: &str = "larder-turbo-signature-key-a-0123456789";
const KEY_B: &str = "larder-turbo-signature-key-b-9876543210";

/// The npm-installed tool named by the environment variable `var`, or `None` with a SKIPPED
/// line (a failure under CI, which installs it).
fn npm_tool(test: &str, var: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: {var} does not name an installed tool (scripts/test.sh installs it with scripts/install-npm-tools.sh)"
        );
        println!(
            "SKIPPED {test}: {var} is not set (eval \"$(scripts/install-npm-tools.sh)\" sets it)"
        );
    }
    found
}

/// larderd with two tokens on `turbo-*` and `nx-*`: WRITER (read, write) and READER (read).
/// With `log`, one JSON access line per request goes to that file.
fn larderd(dir: &Path, log: Option<&Path>) -> Larderd {
    let cfg = dir.join("larder.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[tokens]]\nname = \"js-writer\"\nsha256 = \"{}\"\nscopes = [\"read\", \"write\"]\nnamespaces = [\"turbo-*\", \"nx-*\"]\n\
             [[tokens]]\nname = \"js-reader\"\nsha256 = \"{}\"\nscopes = [\"read\"]\nnamespaces = [\"turbo-*\", \"nx-*\"]\n",
            token_sha256(WRITER),
            token_sha256(READER)
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    match log {
        None => Larderd::start(&["--config", cfg]),
        Some(path) => Launch::new(&["--config", cfg, "--log-format", "json"])
            .env("LARDER_LOG", "warn,larderd::access=info")
            .stderr_to(path)
            .start(),
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A `node -e` program that writes `dist/out.txt`: "built NAME from SOURCE, RANDOM".
fn build_command(name: &str) -> String {
    let program = format!(
        "const fs=require('fs');fs.mkdirSync('dist',{{recursive:true}});\
         fs.writeFileSync('dist/out.txt','built {name} from '+fs.readFileSync('src/input.txt','utf8').trim()+', '+Math.random()+'\\n');\
         console.log('compiled {name}')"
    );
    format!("node -e \"{program}\"")
}

/// Runs `cmd` with stdout and stderr into one file beside `dir` (interleaved as written): its
/// exit status and that output. A tool that hangs is killed after two minutes and fails the
/// test with what it printed, rather than hanging the suite.
fn run_tool(mut cmd: Command, dir: &Path) -> (bool, String) {
    const DEADLINE: Duration = Duration::from_secs(120);
    let log = dir.with_extension(format!("{}.log", std::process::id()));
    let file = std::fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{cmd:?} ran for over {DEADLINE:?}:\n{}", read(&log));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = read(&log);
    std::fs::remove_file(&log).unwrap();
    (status.success(), output)
}

fn json_text(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Turborepo
// ---------------------------------------------------------------------------------------------

const TURBO_PACKAGES: [&str; 2] = ["app", "lib"];

/// An npm workspace of two packages whose `build` writes `dist/out.txt`; `signed` switches on
/// turbo's artifact signatures (`remoteCache.signature`).
fn turbo_workspace(dir: &Path, signed: bool) {
    write(
        &dir.join("package.json"),
        &json_text(&json!({
            "name": "larder-turbo-test",
            "private": true,
            "packageManager": "npm@10.9.0",
            "workspaces": ["packages/*"],
        })),
    );
    // The lock file npm would write for these workspaces: turbo reads it to resolve them.
    write(
        &dir.join("package-lock.json"),
        &json_text(&json!({
            "name": "larder-turbo-test",
            "lockfileVersion": 3,
            "requires": true,
            "packages": {
                "": {"name": "larder-turbo-test", "workspaces": ["packages/*"]},
                "node_modules/app": {"resolved": "packages/app", "link": true},
                "node_modules/lib": {"resolved": "packages/lib", "link": true},
                "packages/app": {"name": "app", "version": "1.0.0"},
                "packages/lib": {"name": "lib", "version": "1.0.0"},
            },
        })),
    );
    let mut turbo = json!({"tasks": {"build": {"outputs": ["dist/**"]}}});
    if signed {
        turbo["remoteCache"] = json!({"signature": true});
    }
    write(&dir.join("turbo.json"), &json_text(&turbo));
    write(&dir.join(".gitignore"), "node_modules\ndist\n.turbo\n");
    // npm checks the registry for a newer npm from inside every build script; turbo passes no
    // NPM_CONFIG_* variable to the scripts, so the switch goes into the workspace's .npmrc.
    write(&dir.join(".npmrc"), "update-notifier=false\n");
    for name in TURBO_PACKAGES {
        let pkg = dir.join("packages").join(name);
        write(
            &pkg.join("package.json"),
            &json_text(&json!({
                "name": name,
                "version": "1.0.0",
                "scripts": {"build": build_command(name)},
            })),
        );
        write(&pkg.join("src/input.txt"), &format!("the {name} source\n"));
    }
}

fn turbo_output(dir: &Path, name: &str) -> String {
    read(&dir.join("packages").join(name).join("dist/out.txt"))
}

/// How the tests run turbo: the binary, its HOME and larderd's API base.
struct Turbo {
    bin: PathBuf,
    home: PathBuf,
    api: String,
}

impl Turbo {
    fn new(bin: PathBuf, work: &Path, srv: &Larderd) -> Turbo {
        let home = work.join("home");
        std::fs::create_dir_all(&home).unwrap();
        Turbo {
            bin,
            home,
            api: format!("{}/turbo", srv.url()),
        }
    }

    /// `turbo run build --cache=remote:rw ARGS` in `dir` (the remote cache only: nothing is
    /// read from or written to a local one) as team `team` with `token`, and with `key` as the
    /// signature key; its output. The run must succeed.
    fn build(
        &self,
        dir: &Path,
        token: &str,
        team: &str,
        key: Option<&str>,
        args: &[&str],
    ) -> String {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["run", "build", "--cache=remote:rw"])
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("TURBO_TELEMETRY_DISABLED", "1")
            .env("DO_NOT_TRACK", "1")
            .env("TURBO_NO_UPDATE_NOTIFIER", "1")
            .env("NPM_CONFIG_UPDATE_NOTIFIER", "false")
            .env("TURBO_API", &self.api)
            .env("TURBO_TOKEN", token)
            .env("TURBO_TEAM", team);
        if let Some(key) = key {
            cmd.env("TURBO_REMOTE_CACHE_SIGNATURE_KEY", key);
        }
        let (ok, text) = run_tool(cmd, dir);
        assert!(ok, "turbo failed:\n{text}");
        text
    }

    /// npm leaves this stamp in HOME when it asked the registry for a newer npm.
    fn assert_offline(&self) {
        let stamp = self.home.join(".npm/_update-notifier-last-checked");
        assert!(
            !stamp.exists(),
            "npm's update notifier reached for the registry during a build"
        );
    }
}

/// What each turbo test starts with: a work directory, larderd with the two tokens, turbo and
/// an HTTP client; `None` (the test prints SKIPPED) without turbo.
struct TurboTest {
    work: tempfile::TempDir,
    srv: Larderd,
    turbo: Turbo,
    http: Client,
}

impl TurboTest {
    fn start(test: &str) -> Option<TurboTest> {
        let bin = npm_tool(test, "LARDER_TURBO")?;
        let work = tempfile::tempdir().unwrap();
        let srv = larderd(work.path(), None);
        let turbo = Turbo::new(bin, work.path(), &srv);
        Some(TurboTest {
            work,
            srv,
            turbo,
            http: Client::new(),
        })
    }
}

/// The hash of `pkg`'s build task from the line turbo prints for it, e.g. `app:build: cache
/// miss, executing 2aad5ac5ec1e54a0` for `status` "cache miss, executing".
fn task_hash(out: &str, pkg: &str, status: &str) -> String {
    let prefix = format!("{pkg}:build: {status} ");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no \"{prefix}<hash>\" line in:\n{out}"))
}

fn turbo_url(srv: &Larderd, hash: &str, team: &str) -> String {
    format!("{}/turbo/v8/artifacts/{hash}?slug={team}", srv.url())
}

#[tokio::test]
async fn turbo_replays_a_clean_copy_from_larder_with_full_turbo() {
    let Some(TurboTest {
        work,
        srv,
        turbo,
        http,
    }) = TurboTest::start("turbo_replays_a_clean_copy_from_larder_with_full_turbo")
    else {
        return;
    };

    let first = work.path().join("first");
    turbo_workspace(&first, false);
    let out = turbo.build(&first, WRITER, "web", None, &[]);
    let hashes: Vec<String> = TURBO_PACKAGES
        .iter()
        .map(|pkg| task_hash(&out, pkg, "cache miss, executing"))
        .collect();
    // Stored in the team's namespace under the task hash, with the task's duration.
    for hash in &hashes {
        let r = http
            .get(srv.object_url("turbo-web", hash))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{hash}");
        let r = http
            .head(turbo_url(&srv, hash, "web"))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let duration = r.headers()["x-artifact-duration"].to_str().unwrap();
        assert!(duration.parse::<u64>().is_ok(), "{duration}");
    }

    // Another machine: a clean copy, no local cache.
    let second = work.path().join("second");
    turbo_workspace(&second, false);
    let out = turbo.build(&second, READER, "web", None, &[]);
    for (pkg, hash) in TURBO_PACKAGES.iter().zip(&hashes) {
        assert_eq!(task_hash(&out, pkg, "cache hit, replaying logs"), *hash);
        assert_eq!(turbo_output(&first, pkg), turbo_output(&second, pkg));
    }
    assert!(out.contains(">>> FULL TURBO"), "{out}");
    assert!(
        out.contains("compiled app"),
        "the logs are replayed:\n{out}"
    );

    // A dry run asks for every task at once (the batch query) and learns hits and durations.
    let out = turbo.build(&second, READER, "web", None, &["--dry=json"]);
    let json_start = out.find('{').expect("dry run JSON");
    let dry: Value = serde_json::Deserializer::from_str(&out[json_start..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    let tasks = dry["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{dry}");
    for task in tasks {
        assert_eq!(task["cache"]["status"], "HIT", "{task}");
        assert_eq!(task["cache"]["source"], "REMOTE", "{task}");
    }
    let metrics = srv.scrape(&http).await;
    let query = r#"larder_http_requests_total{route="turbo_query",method="POST",status="200"}"#;
    assert_eq!(metric(&metrics, query), Some(1.0), "{metrics}");
    turbo.assert_offline();
}

#[tokio::test]
async fn turbo_signed_artifacts_hit_and_a_tampered_artifact_or_wrong_key_is_a_miss() {
    let Some(TurboTest {
        work,
        srv,
        turbo,
        http,
    }) = TurboTest::start(
        "turbo_signed_artifacts_hit_and_a_tampered_artifact_or_wrong_key_is_a_miss",
    )
    else {
        return;
    };
    let clean_copy = |name: &str| {
        let dir = work.path().join(name);
        turbo_workspace(&dir, true);
        dir
    };

    let first = clean_copy("first");
    let out = turbo.build(&first, WRITER, "signed", Some(KEY_A), &[]);
    let [app, lib] = TURBO_PACKAGES.map(|pkg| task_hash(&out, pkg, "cache miss, executing"));
    // larder keeps each artifact's signature and answers it with the bytes.
    let mut stored = Vec::new();
    for hash in [&app, &lib] {
        let r = http
            .get(turbo_url(&srv, hash, "signed"))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let tag = r.headers()["x-artifact-tag"].to_str().unwrap().to_string();
        assert!(!tag.is_empty());
        stored.push((tag, r.bytes().await.unwrap()));
    }

    let second = clean_copy("second");
    let out = turbo.build(&second, READER, "signed", Some(KEY_A), &[]);
    assert!(out.contains(">>> FULL TURBO"), "{out}");
    for pkg in TURBO_PACKAGES {
        assert_eq!(turbo_output(&first, pkg), turbo_output(&second, pkg));
    }

    // Tampering: lib's hash now holds app's artifact under lib's genuine tag, and app's own
    // artifact carries a tag that is not the one turbo made.
    let [(app_tag, app_body), (lib_tag, _)] = <[_; 2]>::try_from(stored).unwrap();
    let put = |hash: &str, tag: String, body: bytes::Bytes| {
        http.put(turbo_url(&srv, hash, "signed"))
            .bearer_auth(WRITER)
            .header("x-artifact-tag", tag)
            .header("x-artifact-duration", "1")
            .body(body)
            .send()
    };
    assert!(
        put(&lib, lib_tag, app_body.clone())
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let mut forged = app_tag.into_bytes();
    forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert!(
        put(&app, forged, app_body)
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let third = clean_copy("third");
    let out = turbo.build(&third, WRITER, "signed", Some(KEY_A), &[]);
    for pkg in TURBO_PACKAGES {
        // Built again, never restored from what failed verification.
        task_hash(&out, pkg, "cache miss, executing");
        let output = turbo_output(&third, pkg);
        assert!(
            output.starts_with(&format!("built {pkg} from the {pkg} source")),
            "{output}"
        );
        assert_ne!(output, turbo_output(&first, pkg));
    }

    // Another key cannot verify what larder holds (turbo uploaded it again in the third
    // build, signed with KEY_A): every task is a miss and is built.
    let fourth = clean_copy("fourth");
    let out = turbo.build(&fourth, READER, "signed", Some(KEY_B), &[]);
    for pkg in TURBO_PACKAGES {
        task_hash(&out, pkg, "cache miss, executing");
        let output = turbo_output(&fourth, pkg);
        assert!(output.starts_with(&format!("built {pkg} from")), "{output}");
    }
    turbo.assert_offline();
}

#[tokio::test]
async fn turbo_with_a_read_only_or_unknown_token_builds_and_stores_nothing() {
    let Some(TurboTest {
        work,
        srv,
        turbo,
        http,
    }) = TurboTest::start("turbo_with_a_read_only_or_unknown_token_builds_and_stores_nothing")
    else {
        return;
    };

    let first = work.path().join("first");
    turbo_workspace(&first, false);
    let out = turbo.build(&first, READER, "ro", None, &[]);
    // turbo 2.11 says so and stops uploading; the build itself succeeds.
    assert!(out.contains("rejected an upload with 403"), "{out}");
    for pkg in TURBO_PACKAGES {
        let hash = task_hash(&out, pkg, "cache miss, executing");
        let r = http
            .get(srv.object_url("turbo-ro", &hash))
            .bearer_auth(WRITER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "nothing was stored");
    }

    let second = work.path().join("second");
    turbo_workspace(&second, false);
    let out = turbo.build(&second, "not-a-token", "ro", None, &[]);
    assert!(out.contains("401"), "{out}");
    for pkg in TURBO_PACKAGES {
        task_hash(&out, pkg, "cache miss, executing");
        assert!(turbo_output(&second, pkg).starts_with(&format!("built {pkg} from")));
    }
    let metrics = srv.scrape(&http).await;
    let refused = r#"larder_http_requests_total{route="turbo_artifact",method="PUT",status="403"}"#;
    assert!(
        metric(&metrics, refused).is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    turbo.assert_offline();
}

#[tokio::test]
async fn turbo_with_preflight_requests_keeps_its_token_and_hits() {
    let Some(TurboTest {
        work,
        srv,
        turbo,
        http,
    }) = TurboTest::start("turbo_with_preflight_requests_keeps_its_token_and_hits")
    else {
        return;
    };

    // `--preflight` sends OPTIONS before each request and then sends its token only where the
    // answer allows `Authorization`: a refused preflight made every request a 401.
    let first = work.path().join("first");
    turbo_workspace(&first, false);
    let out = turbo.build(&first, WRITER, "pre", None, &["--preflight"]);
    assert!(!out.contains("failed to contact remote cache"), "{out}");
    let second = work.path().join("second");
    turbo_workspace(&second, false);
    let out = turbo.build(&second, READER, "pre", None, &["--preflight"]);
    for pkg in TURBO_PACKAGES {
        task_hash(&out, pkg, "cache hit, replaying logs");
        assert_eq!(turbo_output(&first, pkg), turbo_output(&second, pkg));
    }
    let metrics = srv.scrape(&http).await;
    let preflights =
        r#"larder_http_requests_total{route="turbo_artifact",method="OPTIONS",status="204"}"#;
    // Two uploads and two downloads, each after its own preflight.
    assert!(
        metric(&metrics, preflights).is_some_and(|n| n >= 4.0),
        "{metrics}"
    );
    let refused = r#"larder_http_requests_total{route="turbo_artifact",method="GET",status="401"}"#;
    assert_eq!(metric(&metrics, refused), None, "{metrics}");
    turbo.assert_offline();
}

/// One request through `http` with an optional bearer token, headers and body.
async fn send(
    http: &Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> reqwest::Response {
    let mut req = http.request(method, url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(body).send().await.unwrap()
}

/// Asserts turbo's error shape: `code` and `message` at the top level and under `error`.
async fn assert_turbo_error(r: reqwest::Response, status: StatusCode, code: &str) -> String {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let message = v["message"].as_str().unwrap().to_string();
    assert!(!message.is_empty(), "{v}");
    assert_eq!(v["error"]["message"], message.as_str(), "{v}");
    message
}

#[tokio::test]
async fn turbo_routes_keep_tag_and_duration_and_answer_errors_in_turbo_json() {
    let work = tempfile::tempdir().unwrap();
    let srv = larderd(work.path(), None);
    let http = Client::new();
    let base = format!("{}/turbo/v8/artifacts", srv.url());
    let artifact = format!("{base}/0123abcd?slug=web");

    // A miss; then a PUT keeps the tag and the duration, and nothing else it sent.
    let r = send(&http, Method::GET, &artifact, Some(READER), &[], b"").await;
    assert_turbo_error(r, StatusCode::NOT_FOUND, "not_found").await;
    let headers = [
        ("x-artifact-tag", "c2lnbmF0dXJl"),
        ("x-artifact-duration", "1234"),
        ("x-artifact-dirty-hash", "abc"),
        ("content-type", "application/octet-stream"),
    ];
    let r = send(
        &http,
        Method::PUT,
        &artifact,
        Some(WRITER),
        &headers,
        b"artifact-1",
    )
    .await;
    assert!(r.status().is_success(), "{}", r.status());
    for method in [Method::GET, Method::HEAD] {
        let r = send(&http, method.clone(), &artifact, Some(READER), &[], b"").await;
        assert_eq!(r.status(), StatusCode::OK, "{method}");
        assert_eq!(r.headers()["x-artifact-tag"], "c2lnbmF0dXJl");
        assert_eq!(r.headers()["x-artifact-duration"], "1234");
        assert_eq!(r.headers()["content-length"], "10");
        assert!(r.headers().get("x-artifact-dirty-hash").is_none());
        assert!(r.headers().get("authorization").is_none());
        let body = r.bytes().await.unwrap();
        let expected: &[u8] = if method == Method::GET {
            b"artifact-1"
        } else {
            b""
        };
        assert_eq!(&body[..], expected);
    }
    // The same object through the object route, in the team's namespace.
    let (status, _, body) = larder_testkit::get(
        &http,
        &srv.object_url("turbo-web", "0123abcd"),
        &[("authorization", &format!("Bearer {READER}"))],
    )
    .await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"artifact-1"[..]));
    // A later PUT replaces it (turbo uploads again after a signature it could not verify).
    let r = send(
        &http,
        Method::PUT,
        &artifact,
        Some(WRITER),
        &[("x-artifact-duration", "7")],
        b"artifact-2",
    )
    .await;
    assert!(r.status().is_success());
    let r = send(&http, Method::GET, &artifact, Some(READER), &[], b"").await;
    assert_eq!(r.headers()["x-artifact-duration"], "7");
    assert!(r.headers().get("x-artifact-tag").is_none());
    assert_eq!(&r.bytes().await.unwrap()[..], b"artifact-2");

    // teamId wins over the slug and is folded to lower case.
    let by_id = format!("{base}/77ee?teamId=team_AbC&slug=web");
    let r = send(&http, Method::PUT, &by_id, Some(WRITER), &[], b"x").await;
    assert!(r.status().is_success());
    let r = send(
        &http,
        Method::GET,
        &srv.object_url("turbo-team_abc", "77ee"),
        Some(READER),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);

    // Status, events, and the batch query.
    let r = send(
        &http,
        Method::GET,
        &format!("{base}/status?slug=web"),
        Some(READER),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status": "enabled"})
    );
    let events =
        br#"[{"sessionId":"s","source":"REMOTE","event":"HIT","hash":"0123abcd","duration":7}]"#;
    let r = send(
        &http,
        Method::POST,
        &format!("{base}/events?slug=web"),
        Some(READER),
        &[],
        events,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let query = format!("{base}?slug=web");
    let r = send(
        &http,
        Method::POST,
        &query,
        Some(READER),
        &[],
        br#"{"hashes":["0123abcd","ffff"]}"#,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"0123abcd": {"size": 10, "taskDurationMs": 7}, "ffff": null})
    );

    // Refusals, all in turbo's JSON shape.
    let r = send(
        &http,
        Method::GET,
        &format!("{base}/status"),
        Some(READER),
        &[],
        b"",
    )
    .await;
    let message = assert_turbo_error(r, StatusCode::BAD_REQUEST, "bad_request").await;
    assert!(message.starts_with("no team"), "{message}");
    let r = send(
        &http,
        Method::GET,
        &format!("{base}/0123abcd?slug=a.b"),
        Some(READER),
        &[],
        b"",
    )
    .await;
    assert_turbo_error(r, StatusCode::BAD_REQUEST, "bad_request").await;
    let r = send(
        &http,
        Method::GET,
        &format!("{base}/a%2Fb?slug=web"),
        Some(READER),
        &[],
        b"",
    )
    .await;
    let message = assert_turbo_error(r, StatusCode::BAD_REQUEST, "bad_request").await;
    assert!(message.starts_with("invalid hash"), "{message}");
    let r = send(
        &http,
        Method::PUT,
        &artifact,
        Some(WRITER),
        &[("x-artifact-duration", "soon")],
        b"x",
    )
    .await;
    assert_turbo_error(r, StatusCode::BAD_REQUEST, "bad_request").await;
    let r = send(&http, Method::POST, &query, Some(READER), &[], b"[1,2]").await;
    assert_turbo_error(r, StatusCode::BAD_REQUEST, "bad_request").await;
    let r = send(&http, Method::GET, &artifact, None, &[], b"").await;
    assert!(r.headers().contains_key("www-authenticate"));
    assert_turbo_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let r = send(&http, Method::PUT, &artifact, Some(READER), &[], b"x").await;
    let message = assert_turbo_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    assert!(message.contains("write"), "{message}");
    let r = send(
        &http,
        Method::GET,
        &format!("{base}/0123abcd?slug=elsewhere"),
        Some(READER),
        &[],
        b"",
    )
    .await;
    assert_turbo_error(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = send(&http, Method::DELETE, &artifact, Some(WRITER), &[], b"").await;
    assert_eq!(r.headers()["allow"], "GET, HEAD, PUT");
    assert_turbo_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    // A preflight (turbo --preflight) needs no token or team, allows the route's methods and
    // turbo's headers, `Authorization` among them, and changes nothing.
    for (url, methods) in [
        (format!("{base}/0123abcd"), "GET, HEAD, PUT"),
        (format!("{base}/status"), "GET, HEAD"),
        (format!("{base}/events"), "POST"),
        (base.clone(), "POST"),
    ] {
        let r = send(
            &http,
            Method::OPTIONS,
            &url,
            None,
            &[("access-control-request-method", "PUT")],
            b"",
        )
        .await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{url}");
        assert_eq!(
            r.headers()["access-control-allow-methods"],
            methods,
            "{url}"
        );
        assert_eq!(r.headers()["allow"], methods, "{url}");
        assert_eq!(r.headers()["access-control-allow-origin"], "*");
        let allowed = r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap();
        for name in ["authorization", "x-artifact-tag", "x-artifact-duration"] {
            assert!(allowed.to_ascii_lowercase().contains(name), "{allowed}");
        }
        assert!(r.bytes().await.unwrap().is_empty());
    }
    // Nothing a refusal touched changed what is stored.
    let r = send(&http, Method::GET, &artifact, Some(READER), &[], b"").await;
    assert_eq!(&r.bytes().await.unwrap()[..], b"artifact-2");
}

// ---------------------------------------------------------------------------------------------
// Nx
// ---------------------------------------------------------------------------------------------

/// An Nx workspace with one project whose cacheable `build` writes `dist/out.txt`; nx is
/// resolved through a `node_modules` symlink to the tree `nx_bin` was installed in.
fn nx_workspace(dir: &Path, nx_bin: &Path) {
    write(
        &dir.join("package.json"),
        &json_text(&json!({"name": "larder-nx-test", "private": true, "version": "0.0.0"})),
    );
    write(
        &dir.join("nx.json"),
        &json_text(&json!({"analytics": false, "useDaemonProcess": false})),
    );
    write(&dir.join(".gitignore"), "node_modules\ndist\n.nx\n");
    write(
        &dir.join("apps/hello/project.json"),
        &json_text(&json!({
            "name": "hello",
            "targets": {"build": {
                "executor": "nx:run-commands",
                "cache": true,
                "outputs": ["{projectRoot}/dist"],
                "options": {"cwd": "apps/hello", "command": build_command("hello")},
            }},
        })),
    );
    write(&dir.join("apps/hello/src/input.txt"), "the hello source\n");
    // LARDER_NX is node_modules/.bin/nx of the installed tree.
    let node_modules = nx_bin.parent().unwrap().parent().unwrap();
    std::os::unix::fs::symlink(node_modules, dir.join("node_modules")).unwrap();
}

/// `nx run hello:build` in `dir` against the cache at `server`, with `token` when given; the
/// exit status and output.
fn nx_build(
    bin: &Path,
    work: &Path,
    dir: &Path,
    server: &str,
    token: Option<&str>,
) -> (bool, String) {
    let (home, tmp) = (work.join("home"), work.join("tmp"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["run", "hello:build"])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        // Nx's plugin workers listen on sockets under the temp dir.
        .env("TMPDIR", &tmp)
        .env("NX_NO_CLOUD", "true")
        .env("NX_DAEMON", "false")
        .env("NX_TUI", "false")
        .env("NPM_CONFIG_UPDATE_NOTIFIER", "false")
        .env("NX_SELF_HOSTED_REMOTE_CACHE_SERVER", server);
    if let Some(token) = token {
        cmd.env("NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN", token);
    }
    run_tool(cmd, dir)
}

/// The access lines (`fields` of larderd's JSON log) of the nx route, once at least `expected`
/// are written. larderd hands access lines to its log in batches (within 50 ms of a request),
/// so this waits for them, then a little longer so that a line beyond `expected` would show.
fn nx_requests(log: &Path, expected: usize) -> Vec<Value> {
    let lines = || -> Vec<Value> {
        read(log)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["fields"].clone())
            .filter(|f| f["route"] == "nx")
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines().len() < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    lines()
}

#[tokio::test]
async fn nx_gets_a_remote_cache_hit_from_larder_in_a_clean_workspace() {
    let name = "nx_gets_a_remote_cache_hit_from_larder_in_a_clean_workspace";
    let Some(bin) = npm_tool(name, "LARDER_NX") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("larderd.log");
    let srv = larderd(work.path(), Some(&log));
    let server = format!("{}/nx/nx-ci", srv.url());
    let output = "apps/hello/dist/out.txt";

    let first = work.path().join("first");
    nx_workspace(&first, &bin);
    let (ok, out) = nx_build(&bin, work.path(), &first, &server, Some(WRITER));
    assert!(ok, "{out}");
    assert!(
        out.contains("compiled hello") && !out.contains("[remote cache]"),
        "{out}"
    );
    // One miss, then one upload, which larderd stored under the task hash.
    let requests = nx_requests(&log, 2);
    let methods: Vec<_> = requests
        .iter()
        .map(|f| (f["method"].clone(), f["status"].clone()))
        .collect();
    assert_eq!(
        methods,
        [(json!("GET"), json!(404)), (json!("PUT"), json!(200))],
        "{requests:?}"
    );
    let hash = requests[1]["key"].as_str().unwrap();
    assert!(hash.bytes().all(|b| b.is_ascii_digit()), "{hash}");
    let r = Client::new()
        .get(format!("{server}/v1/cache/{hash}"))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let entry = r.bytes().await.unwrap();
    assert_eq!(entry[..2], [0x1f, 0x8b], "nx stores a tar.gz");

    // Another machine: a clean workspace, an empty local cache, a read-only token.
    let second = work.path().join("second");
    nx_workspace(&second, &bin);
    let (ok, out) = nx_build(&bin, work.path(), &second, &server, Some(READER));
    assert!(ok, "{out}");
    assert!(out.contains("nx run hello:build  [remote cache]"), "{out}");
    assert!(out.contains("Nx read the output from the cache"), "{out}");
    assert_eq!(read(&first.join(output)), read(&second.join(output)));
    let requests = nx_requests(&log, 4);
    // The test's own GET, then the hit; a hit uploads nothing.
    assert_eq!(requests.len(), 4, "{requests:?}");
    assert_eq!(
        (&requests[3]["method"], &requests[3]["status"]),
        (&json!("GET"), &json!(200))
    );
}

#[tokio::test]
async fn nx_with_a_read_only_token_builds_its_upload_gets_403_and_a_refused_token_stops_the_run() {
    let name =
        "nx_with_a_read_only_token_builds_its_upload_gets_403_and_a_refused_token_stops_the_run";
    let Some(bin) = npm_tool(name, "LARDER_NX") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("larderd.log");
    let srv = larderd(work.path(), Some(&log));
    let server = format!("{}/nx/nx-ro", srv.url());

    // nx takes a 403 on its upload as "not stored" and succeeds.
    let first = work.path().join("first");
    nx_workspace(&first, &bin);
    let (ok, out) = nx_build(&bin, work.path(), &first, &server, Some(READER));
    assert!(ok, "{out}");
    assert!(out.contains("compiled hello"), "{out}");
    let requests = nx_requests(&log, 2);
    let statuses: Vec<_> = requests
        .iter()
        .map(|f| (f["method"].clone(), f["status"].clone()))
        .collect();
    assert_eq!(
        statuses,
        [(json!("GET"), json!(404)), (json!("PUT"), json!(403))],
        "{requests:?}"
    );
    // So the next workspace builds again.
    let second = work.path().join("second");
    nx_workspace(&second, &bin);
    let (ok, out) = nx_build(&bin, work.path(), &second, &server, Some(READER));
    assert!(ok && !out.contains("[remote cache]"), "{out}");

    // Without a token (or with an unknown one) larderd answers 401, and nx stops the run with
    // larder's reason; a 403 to its read (a namespace the token may not read) stops it too.
    // Nx documents both as fatal: a credential or server that is wrong.
    let outside = format!("{}/nx/other-team", srv.url());
    let refusals = [
        (&server, None, "Unauthorized: a bearer token is required"),
        (&server, Some("not-a-token"), "Unauthorized: unknown token"),
        (
            &outside,
            Some(READER),
            "Misconfigured remote cache endpoint: Unexpected response status: 403",
        ),
    ];
    for (i, (server, token, reason)) in refusals.into_iter().enumerate() {
        let dir = work.path().join(format!("refused-{i}"));
        nx_workspace(&dir, &bin);
        let (ok, out) = nx_build(&bin, work.path(), &dir, server, token);
        assert!(!ok, "{out}");
        assert!(out.contains(reason), "{out}");
        assert!(!dir.join("apps/hello/dist").exists(), "{out}");
    }
}

#[tokio::test]
async fn nx_routes_answer_with_the_statuses_nx_expects() {
    let work = tempfile::tempdir().unwrap();
    let srv = larderd(work.path(), None);
    let http = Client::new();
    let entry = format!("{}/nx/nx-ci/v1/cache/1234567890", srv.url());

    let r = send(&http, Method::GET, &entry, Some(READER), &[], b"").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Create-only: 200 (never 201, which nx takes for an error), then 409 whatever the body.
    let r = send(&http, Method::PUT, &entry, Some(WRITER), &[], b"entry-1").await;
    assert_eq!(r.status(), StatusCode::OK);
    for body in [&b"entry-1"[..], b"entry-2"] {
        let r = send(&http, Method::PUT, &entry, Some(WRITER), &[], body).await;
        assert_eq!(r.status(), StatusCode::CONFLICT);
    }
    let r = send(
        &http,
        Method::PUT,
        &entry,
        Some(WRITER),
        &[("if-match", "*")],
        b"entry-3",
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "a client's precondition cannot make it replace"
    );
    let r = send(&http, Method::GET, &entry, Some(READER), &[], b"").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.bytes().await.unwrap()[..], b"entry-1");

    // Write scope: 403 for a read-only token, nothing stored.
    let other = format!("{}/nx/nx-ci/v1/cache/42", srv.url());
    let r = send(&http, Method::PUT, &other, Some(READER), &[], b"x").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = send(&http, Method::GET, &other, Some(WRITER), &[], b"").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // 401 as text/plain exactly, the only type nx reads the reason of.
    for token in [None, Some("not-a-token")] {
        let r = send(&http, Method::PUT, &other, token, &[], b"x").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()["content-type"], "text/plain");
    }
    let r = send(&http, Method::GET, &entry, None, &[], b"").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Malformed names and methods.
    let bad = [
        (
            format!("{}/nx/NX/v1/cache/1", srv.url()),
            Method::GET,
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{}/nx/nx-ci/v1/cache/a%2Fb", srv.url()),
            Method::GET,
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{}/nx/nx-ci/v1/cache/", srv.url()),
            Method::PUT,
            StatusCode::BAD_REQUEST,
        ),
        (entry.clone(), Method::POST, StatusCode::METHOD_NOT_ALLOWED),
        (
            entry.clone(),
            Method::DELETE,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (url, method, status) in bad {
        let r = send(&http, method.clone(), &url, Some(WRITER), &[], b"x").await;
        assert_eq!(r.status(), status, "{method} {url}");
    }
    let r = send(&http, Method::GET, &entry, Some(READER), &[], b"").await;
    assert_eq!(&r.bytes().await.unwrap()[..], b"entry-1");
    let metrics = srv.scrape(&http).await;
    let conflicts = r#"larder_http_requests_total{route="nx",method="PUT",status="409"}"#;
    assert_eq!(metric(&metrics, conflicts), Some(3.0), "{metrics}");
}

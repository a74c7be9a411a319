//! Git snapshots against the real larderd: the `[git]` settings, the head route with its
//! access control, and the background generator, with a real smart-HTTP git upstream
//! (`GitHttpServer` over a `generated_repo`). Run with `LARDER_GIT=/usr/bin/git` to cover the
//! older git as well (both the upstream and the generator use it).

use larder_testkit::git::{GitHttpServer, append_commits, generated_repo, git_in, git_with};
use larder_testkit::{Larderd, etag_of, metric, token_sha256};
use reqwest::{Client, StatusCode};
use std::path::Path;
use std::time::{Duration, Instant};

const ALLOW_LOOPBACK: &str = "http://127.0.0.1:*/*";

/// An upstream with one generated repository, `app.git`.
fn upstream(root: &Path) -> GitHttpServer {
    generated_repo(&root.join("app.git"), 5, 20, 64 << 10);
    GitHttpServer::start(root)
}

fn head_url(srv: &Larderd, git: &GitHttpServer, name: &str) -> String {
    format!("{}/api/v1/git/{}/{name}/head", srv.url(), git.addr)
}

fn list_url(srv: &Larderd, git: &GitHttpServer, name: &str) -> String {
    format!("{}/api/v1/git/{}/{name}/bundles.list", srv.url(), git.addr)
}

/// The key prefix of `name` on `git` (as `larder_git::Upstream::key_prefix` spells it).
fn key_prefix(git: &GitHttpServer, name: &str) -> String {
    let port = git.addr.rsplit(':').next().unwrap();
    format!("http/127.0.0.1~3a{port}/{name}/~")
}

/// One `[bundle "<id>"]` of a bundle list.
#[derive(Debug, Clone, PartialEq)]
struct Listed {
    id: String,
    uri: String,
    token: u64,
}

/// The bundles of a list in git's format (as larderd renders it: one key per line).
fn parse_list(list: &str) -> Vec<Listed> {
    assert!(
        list.starts_with("[bundle]\n\tversion = 1\n\tmode = all\n\theuristic = creationToken\n"),
        "{list}"
    );
    let mut out: Vec<Listed> = Vec::new();
    for line in list.lines() {
        if let Some(id) = line
            .strip_prefix("[bundle \"")
            .and_then(|l| l.strip_suffix("\"]"))
        {
            out.push(Listed {
                id: id.to_string(),
                uri: String::new(),
                token: 0,
            });
        } else if let Some(uri) = line.strip_prefix("\turi = ") {
            out.last_mut().unwrap().uri = uri.to_string();
        } else if let Some(t) = line.strip_prefix("\tcreationToken = ") {
            out.last_mut().unwrap().token = t.parse().unwrap();
        }
    }
    out
}

/// Polls the bundles.list route until it answers 200 with a list `accept` takes; checks the
/// response's headers on the way. Before the first bundle it must be 404 + Retry-After.
async fn wait_for_list(
    http: &Client,
    url: &str,
    accept: impl Fn(&[Listed]) -> bool,
) -> Vec<Listed> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Vec::new();
    loop {
        let r = http.get(url).send().await.unwrap();
        if r.status() == StatusCode::OK {
            assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
            let etag = r.headers()["etag"].to_str().unwrap().to_string();
            let len: usize = r.headers()["content-length"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body = r.text().await.unwrap();
            assert_eq!(len, body.len());
            assert_eq!(
                etag,
                etag_of(body.as_bytes()),
                "the list's ETag is of its bytes"
            );
            let listed = parse_list(&body);
            if accept(&listed) {
                // Asked again with that ETag among others: 304 with the same ETag, unless a
                // new bundle was listed in between (then the new list, with another ETag).
                let again = http
                    .get(url)
                    .header("if-none-match", format!("\"0000\", W/{etag}"))
                    .send()
                    .await
                    .unwrap();
                let again_etag = again.headers()["etag"].to_str().unwrap().to_string();
                match again.status() {
                    StatusCode::NOT_MODIFIED => {
                        assert_eq!(again_etag, etag);
                        assert!(again.bytes().await.unwrap().is_empty());
                    }
                    StatusCode::OK => assert_ne!(again_etag, etag, "an unchanged list is 304"),
                    other => panic!("asked again with its ETag: {other}"),
                }
                return listed;
            }
            last = listed;
        } else {
            assert_eq!(r.status(), StatusCode::NOT_FOUND);
            assert_eq!(r.headers()["retry-after"], "5");
            assert!(r.text().await.unwrap().starts_with("no bundles of "));
        }
        assert!(
            Instant::now() < deadline,
            "no acceptable bundle list; the last one: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Polls the head route until it answers 200 with a record naming `commit`.
async fn wait_for_head(http: &Client, url: &str, commit: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http.get(url).send().await.unwrap();
        if r.status() == StatusCode::OK {
            let etag = r.headers()["etag"].to_str().unwrap().to_string();
            let body = r.bytes().await.unwrap();
            assert_eq!(
                etag,
                etag_of(&body),
                "the head record is served with its ETag"
            );
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if v["commit"] == commit {
                return v;
            }
        } else {
            assert_eq!(
                r.status(),
                StatusCode::NOT_FOUND,
                "{}",
                r.text().await.unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the head record did not reach {commit}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn generated(http: &Client, srv: &Larderd) -> f64 {
    counter(http, srv, "larder_git_snapshots_generated_total").await
}

async fn counter(http: &Client, srv: &Larderd, name: &str) -> f64 {
    metric(&srv.scrape(http).await, name).unwrap_or(0.0)
}

/// The counter once it has reached `want`, or its value after 10 s: a count goes up just after
/// what it counts can be seen (an object is gone before its removal is counted), so a test that
/// saw the change may scrape a moment too early. A count beyond `want` is returned as it is.
async fn counter_reaching(http: &Client, srv: &Larderd, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = counter(http, srv, name).await;
        if value >= want || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Downloads the snapshot named by `head` through the object API, checks its ETag and a pinned
/// range, extracts it and checks that it is a clean clone of `url` at the recorded commit.
async fn check_snapshot(http: &Client, srv: &Larderd, head: &serde_json::Value, url: &str) {
    let object = srv.object_url("git", head["snapshot_key"].as_str().unwrap());
    let r = http.get(&object).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let bytes = r.bytes().await.unwrap();
    assert_eq!(etag, etag_of(&bytes), "ETag is the BLAKE3 of the bytes");
    assert_eq!(format!("\"{}\"", head["etag"].as_str().unwrap()), etag);
    assert_eq!(head["size"].as_u64().unwrap(), bytes.len() as u64);
    let r = http
        .get(&object)
        .header("range", "bytes=10-109")
        .header("if-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.bytes().await.unwrap()[..], &bytes[10..110]);

    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("snapshot.tar.zst");
    std::fs::write(&archive, &bytes).unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let out = std::process::Command::new("tar")
        .args(["--zstd", "-xf"])
        .arg(&archive)
        .arg("-C")
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(git_in(&tree, &["status", "--porcelain"]), "");
    assert_eq!(
        git_in(&tree, &["rev-parse", "HEAD"]),
        head["commit"].as_str().unwrap()
    );
    assert_eq!(git_in(&tree, &["remote", "get-url", "origin"]), url);
}

/// A larderd whose loopback repositories live in the namespace `git-private`, with two tokens:
/// `reader` may read `git-*`, `other` may read and write `ci-*` only. The directory holding its
/// configuration goes with the returned guard.
fn private_namespace_server(reader: &str, other: &str) -> (Larderd, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("larder.toml");
    std::fs::write(
        &cfg,
        format!(
            "[git]\nallow = [\"{ALLOW_LOOPBACK}=git-private\"]\ninterval = \"1s\"\n\
             [[tokens]]\nname = \"git-reader\"\nsha256 = \"{}\"\nscopes = [\"read\"]\nnamespaces = [\"git-*\"]\n\
             [[tokens]]\nname = \"ci-reader\"\nsha256 = \"{}\"\nscopes = [\"read\", \"write\"]\nnamespaces = [\"ci-*\"]\n",
            token_sha256(reader),
            token_sha256(other)
        ),
    )
    .unwrap();
    let srv = Larderd::start(&["--config", cfg.to_str().unwrap()]);
    (srv, dir)
}

/// Objects retired at `retired_at` (a snapshot dropped by `--git-keep`, a bundle replaced by a
/// new full one): whole and readable now, within `grace`, and deleted once it has passed, not
/// before (within a second: rounds run every second).
async fn readable_within_the_grace_then_gone(
    http: &Client,
    objects: &[String],
    retired_at: Instant,
    grace: Duration,
) {
    for url in objects {
        let r = http.get(url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{url} within the grace");
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        assert_eq!(etag, etag_of(&r.bytes().await.unwrap()));
    }
    assert!(retired_at.elapsed() < grace, "checked within the grace");
    let deadline = Instant::now() + grace + Duration::from_secs(15);
    for url in objects {
        while http.head(url).send().await.unwrap().status() != StatusCode::NOT_FOUND {
            assert!(Instant::now() < deadline, "{url} was kept");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        retired_at.elapsed() >= grace - Duration::from_secs(1),
        "deleted before the grace was over: {:?}",
        retired_at.elapsed()
    );
}

#[tokio::test]
async fn snapshots_are_generated_served_and_follow_the_default_branch() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let srv = Larderd::start(&["--git-allow", ALLOW_LOOPBACK, "--git-interval", "1s"]);
    let http = Client::new();
    let url = head_url(&srv, &git, "app.git");
    let repo = root.path().join("app.git");
    let tip = git_in(&repo, &["rev-parse", "refs/heads/main"]);

    // The first request finds nothing, says when to ask again, and registers the repository.
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["retry-after"], "5");
    assert!(r.text().await.unwrap().contains("being generated"));

    let head = wait_for_head(&http, &url, &tip).await;
    assert_eq!(head["ref"], "refs/heads/main");
    // The record is served like an object: HEAD and conditional requests work on it.
    let r = http.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let record_etag = r.headers()["etag"].clone();
    let r = http
        .get(&url)
        .header("if-none-match", record_etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    check_snapshot(&http, &srv, &head, &git.url("app.git")).await;
    assert_eq!(generated(&http, &srv).await, 1.0);

    // A new upstream commit moves the head record within a few intervals; the old snapshot
    // stays readable (its key names its commit and was written create-only).
    let new_tip = append_commits(&repo, "main", 1);
    let moved = wait_for_head(&http, &url, &new_tip).await;
    assert_ne!(moved["snapshot_key"], head["snapshot_key"]);
    check_snapshot(&http, &srv, &moved, &git.url("app.git")).await;
    let old = http
        .get(srv.object_url("git", head["snapshot_key"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), StatusCode::OK);
    assert_eq!(
        old.headers()["etag"].to_str().unwrap(),
        format!("\"{}\"", head["etag"].as_str().unwrap())
    );
    // Unchanged upstream: later rounds generate nothing more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(generated(&http, &srv).await, 2.0);
    assert_eq!(
        counter(&http, &srv, "larder_git_rounds_failed_total").await,
        0.0
    );
}

#[tokio::test]
async fn refused_repositories_and_a_disabled_feature_are_explained() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let http = Client::new();

    // Not enabled: the route exists but says why it has nothing.
    let off = Larderd::start(&[]);
    let r = http
        .get(head_url(&off, &git, "app.git"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.text().await.unwrap(),
        "git snapshots are not enabled (no --git-allow)\n"
    );

    // Outside every pattern: 403 with the reason, and the upstream is never contacted.
    let srv = Larderd::start(&[
        "--git-allow",
        "https://github.com/acme/*",
        "--git-interval",
        "1s",
    ]);
    let r = http
        .get(head_url(&srv, &git, "app.git"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let reason = r.text().await.unwrap();
    assert!(
        reason.contains("matches no --git-allow pattern"),
        "{reason}"
    );
    assert_eq!(reason.lines().count(), 1, "{reason}");
    // A malformed repository path (an empty segment) is the client's error. (A dot segment
    // cannot be tested over HTTP here: the client resolves it before sending.)
    let r = http
        .get(format!("{}/api/v1/git/127.0.0.1:1/a//b/head", srv.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let reason = r.text().await.unwrap();
    assert!(reason.starts_with("invalid repository path: "), "{reason}");
    // A credential in the path is refused without being repeated.
    let r = http
        .get(format!(
            "{}/api/v1/git/bob:s3cr3t-tok@127.0.0.1:1/a.git/head",
            srv.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let reason = r.text().await.unwrap();
    assert!(!reason.contains("s3cr3t-tok"), "{reason}");
    assert!(reason.contains("user name or password"), "{reason}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(git.requests(), 0, "a refused repository is never fetched");
}

#[tokio::test]
async fn the_head_route_needs_read_scope_on_the_repositorys_namespace() {
    const READER: &str = "git-reader-1b2c3d";
    const OTHER: &str = "ci-reader-4e5f6a";
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let (srv, _config) = private_namespace_server(READER, OTHER);
    let http = Client::new();
    let url = head_url(&srv, &git, "app.git");

    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http.get(&url).bearer_auth(OTHER).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        git.requests(),
        0,
        "a caller without access registers nothing"
    );

    let r = http.get(&url).bearer_auth(READER).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["retry-after"], "5");
    let tip = git_in(
        &root.path().join("app.git"),
        &["rev-parse", "refs/heads/main"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let head: serde_json::Value = loop {
        let r = http.get(&url).bearer_auth(READER).send().await.unwrap();
        if r.status() == StatusCode::OK {
            break r.json().await.unwrap();
        }
        assert!(Instant::now() < deadline, "no head record");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(head["commit"], tip.as_str());
    // The snapshot lives in the pattern's namespace, readable with the same token only.
    let object = srv.object_url("git-private", head["snapshot_key"].as_str().unwrap());
    let r = http.get(&object).bearer_auth(READER).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http.get(&object).bearer_auth(OTHER).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_expired_snapshot_of_an_unmoved_tip_is_made_again() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let srv = Larderd::start(&[
        "--git-allow",
        ALLOW_LOOPBACK,
        "--git-interval",
        "1s",
        "--max-ttl",
        "4s",
    ]);
    let http = Client::new();
    let url = head_url(&srv, &git, "app.git");
    let tip = git_in(
        &root.path().join("app.git"),
        &["rev-parse", "refs/heads/main"],
    );
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let first = wait_for_head(&http, &url, &tip).await;
    // After the first snapshot expired, the generator stores the same commit again and the
    // head record names the new revision.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "the expired snapshot was not made again"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        if generated(&http, &srv).await < 2.0 {
            continue;
        }
        let head = wait_for_head(&http, &url, &tip).await;
        let r = http
            .get(srv.object_url("git", head["snapshot_key"].as_str().unwrap()))
            .send()
            .await
            .unwrap();
        // Found unless it expired again in between (the TTL is short): then look again.
        if r.status() == StatusCode::OK {
            assert_eq!(head["snapshot_key"], first["snapshot_key"]);
            let bytes = r.bytes().await.unwrap();
            assert_eq!(
                etag_of(&bytes),
                format!("\"{}\"", head["etag"].as_str().unwrap())
            );
            break;
        }
    }
}

/// Three replicas over one bucket, all asked for one repository at once, generate each commit
/// once: the claim object (create-only in S3) is their only coordination.
#[tokio::test]
async fn replicas_over_one_bucket_generate_each_commit_once() {
    use larder_testkit::s3;
    if !s3::available("replicas_over_one_bucket_generate_each_commit_once") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let repo = root.path().join("app.git");
    let prefix = s3::unique_prefix("git-replicas");
    let mut args: Vec<String> = vec![
        "--git-allow".into(),
        ALLOW_LOOPBACK.into(),
        "--git-interval".into(),
        "1s".into(),
    ];
    args.extend(s3::replica_args(&prefix));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let replicas: Vec<Larderd> = (0..3).map(|_| Larderd::start(&args)).collect();
    let http = Client::new();
    let urls: Vec<String> = replicas
        .iter()
        .map(|srv| head_url(srv, &git, "app.git"))
        .collect();
    let asks = urls.iter().map(|u| http.get(u).send());
    for r in futures_util::future::join_all(asks).await {
        assert_eq!(r.unwrap().status(), StatusCode::NOT_FOUND);
    }
    let tip = git_in(&repo, &["rev-parse", "refs/heads/main"]);
    let mut heads = Vec::new();
    for url in &urls {
        heads.push(wait_for_head(&http, url, &tip).await);
    }
    assert!(heads.iter().all(|h| h == &heads[0]), "one head record");

    let new_tip = append_commits(&repo, "main", 1);
    for url in &urls {
        wait_for_head(&http, url, &new_tip).await;
    }
    // A few more rounds on every replica change nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = 0.0;
    for srv in &replicas {
        total += generated(&http, srv).await;
        // Losing a claim or a compare-and-swap is a normal outcome, not a failed round.
        assert_eq!(
            counter(&http, srv, "larder_git_rounds_failed_total").await,
            0.0
        );
    }
    assert_eq!(total, 2.0, "each commit generated once over three replicas");
    // The claim holder of each commit extends the one bundle chain: a full bundle, then one
    // increment, over all replicas together.
    let list = wait_for_list(&http, &list_url(&replicas[0], &git, "app.git"), |l| {
        l.len() == 2
    })
    .await;
    assert!(
        list[0].id.starts_with("full-") && list[1].id.starts_with("inc-"),
        "{list:?}"
    );
    let mut bundles = 0.0;
    for srv in &replicas {
        for kind in ["full", "incremental"] {
            let series = format!("larder_git_bundles_generated_total{{kind=\"{kind}\"}}");
            bundles += counter(&http, srv, &series).await;
        }
        assert_eq!(
            counter(&http, srv, "larder_git_bundle_failures_total").await,
            0.0
        );
    }
    assert_eq!(bundles, 2.0, "{list:?}");
}

/// A generator that died after taking its claim (simulated by writing the claim object with a
/// short TTL through the object API) holds the commit off only until the claim expires; then
/// a replica generates it.
#[tokio::test]
async fn a_dead_generators_claim_expires_and_the_commit_is_generated() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let srv = Larderd::start(&["--git-allow", ALLOW_LOOPBACK, "--git-interval", "1s"]);
    let http = Client::new();
    let url = head_url(&srv, &git, "app.git");
    let tip = git_in(
        &root.path().join("app.git"),
        &["rev-parse", "refs/heads/main"],
    );
    let port = git.addr.rsplit(':').next().unwrap();
    let claim = format!("http/127.0.0.1~3a{port}/app.git/~/claims/{tip}");
    let r = http
        .put(srv.object_url("git", &claim))
        .header("time-to-live", "4s")
        .body("a generator that died")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let asked = Instant::now();
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // Rounds run every second but skip the claimed commit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(generated(&http, &srv).await, 0.0);
    let head = wait_for_head(&http, &url, &tip).await;
    assert!(
        asked.elapsed() >= Duration::from_secs(3),
        "not before the claim expired"
    );
    check_snapshot(&http, &srv, &head, &git.url("app.git")).await;
    assert_eq!(generated(&http, &srv).await, 1.0);
}

/// With `--git-mirror-limit` below what two mirrors take, each round removes the other
/// repository's mirror; both repositories keep being served and followed, their mirrors
/// fetched anew.
#[tokio::test]
async fn mirrors_beyond_the_limit_are_removed_and_fetched_anew() {
    let root = tempfile::tempdir().unwrap();
    for name in ["a.git", "b.git"] {
        generated_repo(&root.path().join(name), 3, 10, 16 << 10);
    }
    let git = GitHttpServer::start(root.path());
    let mirrors = tempfile::tempdir().unwrap();
    let srv = Larderd::start(&[
        "--git-allow",
        ALLOW_LOOPBACK,
        "--git-interval",
        "1s",
        "--git-mirror-limit",
        "1KiB",
        "--git-mirror-dir",
        mirrors.path().to_str().unwrap(),
    ]);
    let http = Client::new();
    for name in ["a.git", "b.git"] {
        let url = head_url(&srv, &git, name);
        assert_eq!(
            http.get(&url).send().await.unwrap().status(),
            StatusCode::NOT_FOUND
        );
        let tip = git_in(&root.path().join(name), &["rev-parse", "refs/heads/main"]);
        wait_for_head(&http, &url, &tip).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&http, &srv, "larder_git_mirrors_evicted_total").await < 1.0 {
        assert!(Instant::now() < deadline, "no mirror was removed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for name in ["a.git", "b.git"] {
        let new_tip = append_commits(&root.path().join(name), "main", 1);
        let head = wait_for_head(&http, &head_url(&srv, &git, name), &new_tip).await;
        check_snapshot(&http, &srv, &head, &git.url(name)).await;
    }
    assert_eq!(
        counter(&http, &srv, "larder_git_rounds_failed_total").await,
        0.0
    );
}

/// `--git-keep 2`: once the head record moved on twice, the first snapshot is retired: still
/// readable during `--git-grace` (a download that resolved the old head record finishes),
/// deleted after it; the two newest stay.
#[tokio::test]
async fn only_the_newest_snapshots_are_kept() {
    const GRACE: Duration = Duration::from_secs(5);
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let repo = root.path().join("app.git");
    let srv = Larderd::start(&[
        "--git-allow",
        ALLOW_LOOPBACK,
        "--git-interval",
        "1s",
        "--git-keep",
        "2",
        "--git-grace",
        "5s",
    ]);
    let http = Client::new();
    let url = head_url(&srv, &git, "app.git");
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let mut keys = Vec::new();
    let mut tip = git_in(&repo, &["rev-parse", "refs/heads/main"]);
    for round in 0..3 {
        if round > 0 {
            tip = append_commits(&repo, "main", 1);
        }
        let head = wait_for_head(&http, &url, &tip).await;
        keys.push(head["snapshot_key"].as_str().unwrap().to_string());
    }
    // The head record was seen to move at most one poll after it moved.
    let moved = Instant::now();
    let status = |key: String| {
        let http = http.clone();
        let url = srv.object_url("git", &key);
        async move { http.head(url).send().await.unwrap().status() }
    };
    assert_eq!(
        counter(&http, &srv, "larder_git_snapshots_removed_total").await,
        0.0,
        "nothing deleted before the grace"
    );
    readable_within_the_grace_then_gone(&http, &[srv.object_url("git", &keys[0])], moved, GRACE)
        .await;
    assert_eq!(status(keys[1].clone()).await, StatusCode::OK);
    assert_eq!(status(keys[2].clone()).await, StatusCode::OK);
    assert_eq!(
        counter_reaching(&http, &srv, "larder_git_snapshots_removed_total", 1.0).await,
        1.0
    );
}

/// A repository the allow list admits but the upstream does not have is fetched once per
/// request, not every interval: a failed first fetch drops it from the registry.
#[tokio::test]
async fn a_repository_that_never_fetched_is_not_retried_without_requests() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let srv = Larderd::start(&["--git-allow", ALLOW_LOOPBACK, "--git-interval", "1s"]);
    let http = Client::new();
    let url = head_url(&srv, &git, "missing.git");
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["retry-after"], "5");
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&http, &srv, "larder_git_rounds_failed_total").await < 1.0 {
        assert!(Instant::now() < deadline, "the fetch did not fail");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after_first = git.requests();
    assert!(after_first > 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        git.requests(),
        after_first,
        "no further fetches without requests"
    );
    assert_eq!(
        counter(&http, &srv, "larder_git_rounds_failed_total").await,
        1.0
    );
    // Asking again registers it again: one more attempt.
    http.get(&url).send().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&http, &srv, "larder_git_rounds_failed_total").await < 2.0 {
        assert!(Instant::now() < deadline, "asking again did not try again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Upstream body bytes for `git clone` with `bin`, with and without `--bundle-uri=<list>`; each
/// clone is checked (tip, origin, fsck).
fn clone_bytes(
    bin: &Path,
    git: &GitHttpServer,
    url: &str,
    list: Option<&str>,
    dest: &Path,
    tip: &str,
) -> u64 {
    let before = git.bytes_served();
    let mut cmd = git_with(bin);
    cmd.args(["clone", "-q"]);
    if let Some(list) = list {
        cmd.arg(format!("--bundle-uri={list}"));
    }
    let out = cmd.arg(url).arg(dest).output().unwrap();
    assert!(
        out.status.success(),
        "{} clone {list:?}: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = git.bytes_served() - before;
    let run = |args: &[&str]| {
        let out = git_with(bin).current_dir(dest).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    };
    assert_eq!(run(&["rev-parse", "HEAD"]), tip);
    assert_eq!(run(&["remote", "get-url", "origin"]), url);
    run(&["fsck", "--no-progress", "--strict"]);
    if list.is_some() {
        assert!(
            run(&["for-each-ref", "refs/bundles/"]).contains("refs/bundles/larder/"),
            "{} applied no bundle",
            bin.display()
        );
    }
    bytes
}

/// A stock `git clone --bundle-uri=<larder's list> <upstream>` with both gits of the machine
/// (`/usr/bin/git`, 2.39, and the one first on `PATH`, 2.47) is a correct clone that took
/// nearly all of its objects from larder; a new upstream commit adds an increment with a
/// higher creation token, and a clone over full + increment is correct too.
#[tokio::test]
async fn a_stock_clone_with_bundle_uri_takes_its_objects_from_larder() {
    let root = tempfile::tempdir().unwrap();
    let repo = generated_repo(&root.path().join("app.git"), 40, 30, 400_000);
    let git = GitHttpServer::start(root.path());
    let srv = Larderd::start(&["--git-allow", ALLOW_LOOPBACK, "--git-interval", "1s"]);
    let http = Client::new();
    let url = head_url(&srv, &git, "app.git");
    let list_url = list_url(&srv, &git, "app.git");
    let upstream_url = git.url("app.git");
    let tip = git_in(&repo, &["rev-parse", "refs/heads/main"]);

    let r = http.get(&list_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "no bundle yet");
    assert_eq!(r.headers()["retry-after"], "5");
    wait_for_head(&http, &url, &tip).await;
    let listed = wait_for_list(&http, &list_url, |l| !l.is_empty()).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].id.starts_with("full-"), "{listed:?}");
    let prefix = key_prefix(&git, "app.git");
    assert_eq!(
        listed[0].uri,
        srv.object_url("git", &format!("{prefix}/bundles/{}.bundle", listed[0].id)),
        "absolute, from the Host header"
    );
    // The bundle is a plain object: pinned ranges work on it.
    let r = http.get(&listed[0].uri).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/x-git-bundle");
    let bundle_etag = r.headers()["etag"].to_str().unwrap().to_string();
    let bundle = r.bytes().await.unwrap();
    assert!(bundle.starts_with(b"# v2 git bundle\n") || bundle.starts_with(b"# v3 git bundle\n"));
    let r = http
        .get(&listed[0].uri)
        .header("range", "bytes=0-9")
        .header("if-match", &bundle_etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.bytes().await.unwrap()[..], &bundle[..10]);
    // HEAD: the same headers, no body.
    let r = http.head(&list_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-length"].to_str().unwrap() != "0");
    assert!(r.bytes().await.unwrap().is_empty());

    let dests = tempfile::tempdir().unwrap();
    for (i, bin) in ["/usr/bin/git", "git"].iter().enumerate() {
        let bin = Path::new(bin);
        let version = git_with(bin).arg("--version").output().unwrap();
        let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
        let plain = clone_bytes(
            bin,
            &git,
            &upstream_url,
            None,
            &dests.path().join(format!("plain-{i}")),
            &tip,
        );
        let bundled = clone_bytes(
            bin,
            &git,
            &upstream_url,
            Some(&list_url),
            &dests.path().join(format!("bundled-{i}")),
            &tip,
        );
        println!(
            "MEASURED {version}: plain clone {plain} upstream bytes, clone --bundle-uri {bundled} upstream bytes ({:.1} %)",
            bundled as f64 * 100.0 / plain as f64
        );
        assert!(
            bundled * 10 <= plain,
            "{version}: --bundle-uri clone took {bundled} bytes from the upstream, plain {plain}"
        );
    }

    // The upstream moves on: the next snapshot's round adds an increment.
    let new_tip = append_commits(&repo, "main", 2);
    wait_for_head(&http, &url, &new_tip).await;
    let listed = wait_for_list(&http, &list_url, |l| l.len() == 2).await;
    assert!(listed[1].id.starts_with("inc-"), "{listed:?}");
    assert!(listed[1].token > listed[0].token, "{listed:?}");
    let bundled = clone_bytes(
        Path::new("git"),
        &git,
        &upstream_url,
        Some(&list_url),
        &dests.path().join("full-and-increment"),
        &new_tip,
    );
    println!("MEASURED clone --bundle-uri over full + increment: {bundled} upstream bytes");
    assert_eq!(
        counter(
            &http,
            &srv,
            "larder_git_bundles_generated_total{kind=\"full\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        counter(
            &http,
            &srv,
            "larder_git_bundles_generated_total{kind=\"incremental\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        counter(&http, &srv, "larder_git_bundle_failures_total").await,
        0.0
    );
}

/// Once the increments outweigh half the full bundle, the next round makes a new full bundle
/// that replaces the chain (with a higher creation token); the replaced bundles stay readable
/// during `--git-grace` and are deleted after it. Bundle URIs use `--git-public-url`.
#[tokio::test]
async fn a_full_bundle_replaces_the_chain_and_the_old_bundles_go_after_the_grace() {
    const GRACE: Duration = Duration::from_secs(5);
    let root = tempfile::tempdir().unwrap();
    let repo = generated_repo(&root.path().join("app.git"), 3, 10, 16 << 10);
    let git = GitHttpServer::start(root.path());
    let srv = Larderd::start(&[
        "--git-allow",
        ALLOW_LOOPBACK,
        "--git-interval",
        "1s",
        "--git-grace",
        "5s",
        "--git-public-url",
        "https://larder.example:8443/",
    ]);
    let http = Client::new();
    let url = head_url(&srv, &git, "app.git");
    let list_url = list_url(&srv, &git, "app.git");
    let prefix = key_prefix(&git, "app.git");
    let object = |id: &str| srv.object_url("git", &format!("{prefix}/bundles/{id}.bundle"));
    let tip = git_in(&repo, &["rev-parse", "refs/heads/main"]);
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    wait_for_head(&http, &url, &tip).await;
    let first = wait_for_list(&http, &list_url, |l| !l.is_empty()).await;
    assert_eq!(
        first[0].uri,
        format!(
            "https://larder.example:8443/api/v1/object/git/{prefix}/bundles/{}.bundle",
            first[0].id
        )
    );
    // (The header: reqwest's `content_length()` of a HEAD answer is that of its empty body.)
    let full_size: u64 = http
        .head(object(&first[0].id))
        .send()
        .await
        .unwrap()
        .headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();

    // An increment larger than half the full bundle: an incompressible new file.
    let big = larder_testkit::pattern(full_size as usize, 7);
    let tip = commit_file(&repo, "big.bin", &big);
    wait_for_head(&http, &url, &tip).await;
    let chain = wait_for_list(&http, &list_url, |l| l.len() == 2).await;
    assert!(chain[1].id.starts_with("inc-"), "{chain:?}");

    // The next new tip restarts the chain with a full bundle.
    let tip = append_commits(&repo, "main", 1);
    wait_for_head(&http, &url, &tip).await;
    let restarted =
        wait_for_list(&http, &list_url, |l| l.len() == 1 && l[0].id != first[0].id).await;
    let replaced_at = Instant::now();
    assert!(restarted[0].id.starts_with("full-"), "{restarted:?}");
    assert!(restarted[0].token > chain[1].token, "{restarted:?}");
    // The replaced bundles stay for the grace and go after it; the new full bundle stays.
    let replaced: Vec<String> = chain.iter().map(|old| object(&old.id)).collect();
    readable_within_the_grace_then_gone(&http, &replaced, replaced_at, GRACE).await;
    assert_eq!(
        http.head(object(&restarted[0].id))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        counter_reaching(&http, &srv, "larder_git_bundles_removed_total", 2.0).await,
        2.0
    );
    // Bundle files are removed from the scratch directory once uploaded.
    let files = walk(&srv.data_dir.join("git-mirrors"));
    assert!(
        files.iter().any(|p| p.ends_with("mirror.git/HEAD")),
        "{files:?}"
    );
    let leftovers: Vec<_> = files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "bundle"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        counter(
            &http,
            &srv,
            "larder_git_bundles_generated_total{kind=\"full\"}"
        )
        .await,
        2.0
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Adds one commit to `main` of the bare repository `repo` that adds `path` with `data`;
/// returns the new tip.
fn commit_file(repo: &Path, path: &str, data: &[u8]) -> String {
    use std::io::Write;
    let parent = git_in(repo, &["rev-parse", "refs/heads/main"]);
    let mut s = Vec::new();
    write!(
        s,
        "commit refs/heads/main\ncommitter T <t@larder.invalid> 1800000000 +0000\ndata 4\nbig\nfrom {parent}\nM 100644 inline {path}\ndata {}\n",
        data.len()
    )
    .unwrap();
    s.extend_from_slice(data);
    s.extend_from_slice(b"\n\n");
    let mut child = larder_testkit::git::git()
        .current_dir(repo)
        .args(["fast-import", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&s).unwrap();
    assert!(child.wait().unwrap().success());
    git_in(repo, &["rev-parse", "refs/heads/main"])
}

/// bundles.list answers a disabled feature, a refused repository and a caller without read
/// scope on the repository's namespace exactly as the head route does; a request without any
/// host to build bundle URIs from is refused with a reason.
#[tokio::test]
async fn the_bundle_list_is_refused_like_the_head_record() {
    const READER: &str = "git-reader-1b2c3d";
    const OTHER: &str = "ci-reader-4e5f6a";
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let http = Client::new();

    let off = Larderd::start(&[]);
    let refused = Larderd::start(&["--git-allow", "https://github.com/acme/*"]);
    for srv in [&off, &refused] {
        let head = http
            .get(head_url(srv, &git, "app.git"))
            .send()
            .await
            .unwrap();
        let list = http
            .get(list_url(srv, &git, "app.git"))
            .send()
            .await
            .unwrap();
        assert_eq!(list.status(), head.status());
        let (head, list) = (head.text().await.unwrap(), list.text().await.unwrap());
        assert_eq!(list, head);
        assert_eq!(list.lines().count(), 1, "{list}");
    }
    // Only GET and HEAD.
    let r = http
        .post(list_url(&refused, &git, "app.git"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    let (srv, dir) = private_namespace_server(READER, OTHER);
    let list = list_url(&srv, &git, "app.git");
    assert_eq!(
        http.get(&list).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        http.get(&list)
            .bearer_auth(OTHER)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        git.requests(),
        0,
        "a caller without access registers nothing"
    );

    // With access, it registers the repository like the head route does, and without a Host
    // header (HTTP/1.0) there is nothing to build absolute URIs from.
    let path = list.trim_start_matches(&srv.url()).to_string();
    let answer = raw_request(
        &srv.addr,
        &format!("GET {path} HTTP/1.0\r\nAuthorization: Bearer {READER}\r\n\r\n"),
    );
    assert!(
        answer.starts_with("HTTP/1.0 400") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert!(answer.ends_with("bundles.list needs a Host header to build absolute bundle URIs (or the server's --git-public-url)\n"), "{answer}");
    let answer = raw_request(
        &srv.addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: a b\r\nAuthorization: Bearer {READER}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(answer.contains(" 400 "), "{answer}");
    let tip = git_in(
        &root.path().join("app.git"),
        &["rev-parse", "refs/heads/main"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http.get(&list).bearer_auth(READER).send().await.unwrap();
        if r.status() == StatusCode::OK {
            let listed = parse_list(&r.text().await.unwrap());
            // Readable with the same token only, like the snapshot.
            let r = http
                .get(&listed[0].uri)
                .bearer_auth(READER)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let r = http
                .get(&listed[0].uri)
                .bearer_auth(OTHER)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN);
            // A stock clone passes the token as the README says: an extra header scoped to
            // larder's URL (the upstream never sees it).
            for bin in ["/usr/bin/git", "git"] {
                let dest = dir.path().join(format!("clone-{}", bin.len()));
                let out = git_with(Path::new(bin))
                    .arg("-c")
                    .arg(format!(
                        "http.{}/.extraHeader=Authorization: Bearer {READER}",
                        srv.url()
                    ))
                    .args(["clone", "-q"])
                    .arg(format!("--bundle-uri={list}"))
                    .arg(git.url("app.git"))
                    .arg(&dest)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(git_in(&dest, &["rev-parse", "HEAD"]), tip);
                assert!(
                    git_in(&dest, &["for-each-ref", "refs/bundles/"])
                        .contains("refs/bundles/larder/"),
                    "{bin}: the bundles were read with the token"
                );
            }
            break;
        }
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(Instant::now() < deadline, "no bundle list for {tip}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sends `request` as it is and returns the whole answer (the server closes the connection).
fn raw_request(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    answer
}

/// A real `kill -9` of a generator mid-way: replica A reaches S3 through a slow link, so its
/// snapshot upload takes seconds; it is killed once its claim exists and before its snapshot
/// does. Replica B, started afterwards over the same bucket, finds the commit claimed until
/// the claim expires (`--git-claim-ttl`), then generates it, and the head record names a
/// readable snapshot. (`a_dead_generators_claim_expires_and_the_commit_is_generated` plants a
/// claim instead of killing a process.)
// Multi-threaded: the relay's task must run while the test blocks starting larderd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_killed_mid_way_leaves_a_claim_that_expires_and_another_replica_finishes() {
    use larder_testkit::{TcpRelay, s3};
    if !s3::available(
        "a_generator_killed_mid_way_leaves_a_claim_that_expires_and_another_replica_finishes",
    ) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // About 12 MiB of snapshot (incompressible): some 20 s over a 512 KiB/s link.
    let repo = generated_repo(&root.path().join("app.git"), 5, 20, 3 << 20);
    let git = GitHttpServer::start(root.path());
    let prefix = s3::unique_prefix("git-kill9");
    let mut args: Vec<String> = [
        "--git-allow",
        ALLOW_LOOPBACK,
        "--git-interval",
        "1s",
        "--git-claim-ttl",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(s3::replica_args(&prefix));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let slow = TcpRelay::start_both_ways(&s3::endpoint_addr(), 512 << 10).await;
    let mut a = Larderd::start_with_env(&args, &[("AWS_ENDPOINT_URL", &slow.url())]);
    let http = Client::new();
    let tip = git_in(&repo, &["rev-parse", "refs/heads/main"]);
    let keys = key_prefix(&git, "app.git");
    let claim = format!("{keys}/claims/{tip}");
    let snapshot = format!("{keys}/snapshots/{tip}.tar.zst");
    assert_eq!(
        http.get(head_url(&a, &git, "app.git"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .head(a.object_url("git", &claim))
        .send()
        .await
        .unwrap()
        .status()
        != StatusCode::OK
    {
        assert!(Instant::now() < deadline, "replica A never claimed {tip}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.kill9();
    let killed = Instant::now();

    let b = Larderd::start(&args);
    assert_eq!(
        http.head(b.object_url("git", &snapshot))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND,
        "A was killed before its snapshot was stored"
    );
    let url = head_url(&b, &git, "app.git");
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let head = wait_for_head(&http, &url, &tip).await;
    println!(
        "replica B published {tip} {:?} after A was killed",
        killed.elapsed()
    );
    assert_eq!(generated(&http, &b).await, 1.0, "B generated the commit");
    assert_eq!(head["snapshot_key"], snapshot.as_str());
    check_snapshot(&http, &b, &head, &git.url("app.git")).await;
}

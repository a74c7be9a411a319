//! Git snapshots against the real larderd: the `[git]` settings, the head route with its
//! access control, and the background generator, with a real smart-HTTP git upstream
//! (`GitHttpServer` over a `generated_repo`). Run with `LARDER_GIT=/usr/bin/git` to cover the
//! older git as well (both the upstream and the generator use it).

use larder_testkit::git::{GitHttpServer, append_commits, generated_repo, git_in};
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
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("larder.toml");
    std::fs::write(
        &cfg,
        format!(
            "[git]\nallow = [\"{ALLOW_LOOPBACK}=git-private\"]\ninterval = \"1s\"\n\
             [[tokens]]\nname = \"git-reader\"\nsha256 = \"{}\"\nscopes = [\"read\"]\nnamespaces = [\"git-*\"]\n\
             [[tokens]]\nname = \"ci-reader\"\nsha256 = \"{}\"\nscopes = [\"read\", \"write\"]\nnamespaces = [\"ci-*\"]\n",
            token_sha256(READER),
            token_sha256(OTHER)
        ),
    )
    .unwrap();
    let srv = Larderd::start(&["--config", cfg.to_str().unwrap()]);
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

/// `--git-keep 2`: once the head record moved on twice, the first snapshot is deleted and the
/// two newest stay.
#[tokio::test]
async fn only_the_newest_snapshots_are_kept() {
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
    let status = |key: String| {
        let http = http.clone();
        let url = srv.object_url("git", &key);
        async move { http.head(url).send().await.unwrap().status() }
    };
    // The old snapshot goes right after the head record moved, not with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(keys[0].clone()).await != StatusCode::NOT_FOUND {
        assert!(Instant::now() < deadline, "the oldest snapshot was kept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status(keys[1].clone()).await, StatusCode::OK);
    assert_eq!(status(keys[2].clone()).await, StatusCode::OK);
    assert_eq!(
        counter(&http, &srv, "larder_git_snapshots_removed_total").await,
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

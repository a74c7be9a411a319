//! `larder git restore` and `larder git clone` end to end: a real larderd generating snapshots of
//! a real smart-HTTP upstream (`git http-backend`), the `larder` binary restoring them, and the
//! system git checking the result against what `git clone` makes. `LARDER_GIT=/usr/bin/git`
//! runs the same with the older git (the client, the generator and the checks all use it).

mod common;

use common::{Entry, Run, larder, raw_archive};
use larder_testkit::Larderd;
use larder_testkit::git::{
    GitHttpServer, append_commits, generated_repo, git_in, ripgrep_upstream,
};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ALLOW_LOOPBACK: &str = "http://127.0.0.1:*/*";

/// An upstream `app.git` (generated history of thousands of commits, two incompressible 1 MiB
/// files, branches, tags, an executable, symlinks) plus two symlinks that point outside the
/// working tree, which git stores as data.
fn upstream(root: &Path) -> GitHttpServer {
    let bare = root.join("app.git");
    generated_repo(&bare, 2000, 200, 1 << 20);
    let work = root.join("work");
    git_in(
        root,
        &[
            "clone",
            "-q",
            bare.to_str().unwrap(),
            work.to_str().unwrap(),
        ],
    );
    symlink("/etc/hostname", work.join("absolute-link")).unwrap();
    symlink("../../outside/file", work.join("upward-link")).unwrap();
    git_in(&work, &["add", "-A"]);
    git_in(&work, &["commit", "-qm", "links that leave the tree"]);
    git_in(&work, &["push", "-q", "origin", "main"]);
    std::fs::remove_dir_all(&work).unwrap();
    GitHttpServer::start(root)
}

/// Runs `larder git restore` until the server has a snapshot (exit 2 means not yet).
fn restore_when_ready(url: &str, args: &[&str]) -> Run {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let run = larder(url, args, None);
        if run.code != 2 {
            return run;
        }
        assert!(
            run.stderr.contains("no snapshot of") && run.stderr.contains("yet"),
            "exit 2 says why: {}",
            run.stderr
        );
        assert!(Instant::now() < deadline, "no snapshot within 90 s");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Waits until the head record names `commit`.
fn wait_for_head(srv: &Larderd, git: &GitHttpServer, name: &str, commit: &str) {
    let url = format!("{}/api/v1/git/{}/{name}/head", srv.url(), git.addr);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if http_get(&url).is_some_and(|(status, body)| status == 200 && body.contains(commit)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "head record never reached {commit}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A plain HTTP/1.0 GET: status and body.
fn http_get(url: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_at(rest.find('/')?);
    let mut conn = std::net::TcpStream::connect(host).ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// `larder git restore UPSTREAM DIR --commit COMMIT --json`, which must succeed; its summary.
fn restore_commit_json(url: &str, upstream: &str, dir: &Path, commit: &str) -> serde_json::Value {
    let args = [
        "git",
        "restore",
        upstream,
        dir.to_str().unwrap(),
        "--commit",
        commit,
        "--json",
    ];
    larder(url, &args, None).ok().json()
}

fn refs(dir: &Path) -> String {
    git_in(
        dir,
        &[
            "for-each-ref",
            "--format=%(refname) %(objectname) %(upstream)",
        ],
    )
}

/// Everything a CI job relies on after `git clone`: same refs, index, files and configuration
/// that matters, a clean status and a clean fsck.
fn assert_like_a_clone(restored: &Path, clone: &Path, url: &str) {
    assert_eq!(
        git_in(restored, &["status", "--porcelain"]),
        "",
        "git status is clean"
    );
    // Panics with git's message when fsck finds a problem.
    git_in(restored, &["fsck", "--no-progress", "--strict"]);
    assert_eq!(git_in(restored, &["remote", "get-url", "origin"]), url);
    assert_eq!(refs(restored), refs(clone), "the same refs as a clone");
    assert_eq!(
        git_in(restored, &["rev-parse", "--abbrev-ref", "HEAD@{upstream}"]),
        git_in(clone, &["rev-parse", "--abbrev-ref", "HEAD@{upstream}"]),
    );
    assert_eq!(
        git_in(restored, &["ls-files", "-s"]),
        git_in(clone, &["ls-files", "-s"]),
        "the same index"
    );
    let links: Vec<String> = git_in(clone, &["ls-files", "-s"])
        .lines()
        .filter(|l| l.starts_with("120000 "))
        .map(|l| l.split('\t').nth(1).unwrap().to_string())
        .collect();
    for link in &links {
        assert_eq!(
            std::fs::read_link(restored.join(link)).unwrap(),
            std::fs::read_link(clone.join(link)).unwrap(),
            "symlinks restored as git stores them"
        );
    }
}

/// A snapshot brings no hooks, not even git's samples.
fn assert_no_hooks(restored: &Path) {
    let hooks: Vec<_> = std::fs::read_dir(restored.join(".git/hooks"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(hooks.is_empty(), "no hooks: {hooks:?}");
}

fn clone_of(url: &str, dest: &Path) {
    git_in(
        Path::new("."),
        &["clone", "-q", url, dest.to_str().unwrap()],
    );
}

#[test]
fn a_restore_is_a_clone_and_catches_up_only_when_asked_for_more() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let upstream_url = git.url("app.git");
    let bare = root.path().join("app.git");
    let srv = Larderd::start(&["--git-allow", ALLOW_LOOPBACK, "--git-interval", "1s"]);
    let url = srv.url();
    let out = tempfile::tempdir().unwrap();
    let d = |name: &str| -> PathBuf { out.path().join(name) };
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();

    // First request: nothing yet (exit 2), and the repository starts being snapshotted.
    let first = larder(
        &url,
        &["git", "restore", &upstream_url, &s(&d("early"))],
        None,
    );
    assert_eq!(first.code, 2, "{}", first.stderr);
    assert!(!d("early").exists(), "a miss creates nothing");

    let run = restore_when_ready(
        &url,
        &["git", "restore", &upstream_url, &s(&d("a")), "--json"],
    )
    .ok();
    let summary = run.json();
    let tip = git_in(&bare, &["rev-parse", "main"]);
    assert_eq!(summary["source"], "snapshot");
    assert_eq!(summary["commit"], tip.as_str());
    assert_eq!(summary["snapshot_commit"], tip.as_str());
    assert_eq!(summary["branch"], "main");
    assert_eq!(summary["fetched_from_upstream"], false);
    clone_of(&upstream_url, &d("clone"));
    assert_like_a_clone(&d("a"), &d("clone"), &upstream_url);
    assert_no_hooks(&d("a"));
    for link in ["absolute-link", "upward-link"] {
        assert!(d("a").join(link).is_symlink(), "{link} restored");
    }

    // A commit newer than the snapshot: restored from the snapshot, then fetched.
    let served_before = git.bytes_served();
    let new_tip = append_commits(&bare, "main", 2);
    let summary = restore_commit_json(&url, &upstream_url, &d("b"), &new_tip);
    assert_eq!(summary["commit"], new_tip.as_str());
    assert_eq!(summary["fetched_from_upstream"], true);
    assert_eq!(git_in(&d("b"), &["rev-parse", "HEAD"]), new_tip);
    assert_eq!(git_in(&d("b"), &["status", "--porcelain"]), "");
    assert!(
        git.bytes_served() - served_before < 200_000,
        "the catch-up fetched only what is new: {} bytes",
        git.bytes_served() - served_before
    );

    // Once the server snapshotted the new tip, a plain restore lands on it without upstream.
    wait_for_head(&srv, &git, "app.git", &new_tip);
    let served_before = git.bytes_served();
    larder(&url, &["git", "restore", &upstream_url, &s(&d("c"))], None).ok();
    assert_eq!(git_in(&d("c"), &["rev-parse", "HEAD"]), new_tip);
    assert_eq!(
        git.bytes_served(),
        served_before,
        "the upstream was not asked"
    );
    clone_of(&upstream_url, &d("clone2"));
    assert_like_a_clone(&d("c"), &d("clone2"), &upstream_url);

    // A branch and a tag by name.
    larder(
        &url,
        &[
            "git",
            "restore",
            &upstream_url,
            &s(&d("f")),
            "--ref",
            "feature/a",
        ],
        None,
    )
    .ok();
    assert_eq!(
        git_in(&d("f"), &["rev-parse", "--abbrev-ref", "HEAD"]),
        "feature/a"
    );
    assert_eq!(
        git_in(&d("f"), &["rev-parse", "--abbrev-ref", "HEAD@{upstream}"]),
        "origin/feature/a"
    );
    assert_eq!(
        git_in(&d("f"), &["rev-parse", "HEAD"]),
        git_in(&bare, &["rev-parse", "feature/a"])
    );
    larder(
        &url,
        &[
            "git",
            "restore",
            &upstream_url,
            &s(&d("t")),
            "--ref",
            "v1.0",
        ],
        None,
    )
    .ok();
    assert_eq!(
        git_in(&d("t"), &["rev-parse", "HEAD"]),
        git_in(&bare, &["rev-parse", "v1.0^{commit}"])
    );
    assert_eq!(git_in(&d("t"), &["status", "--porcelain"]), "");

    // An existing directory is refused without --force and replaced with it.
    larder(&url, &["git", "restore", &upstream_url, &s(&d("c"))], None).fails(1, "already exists");
    larder(
        &url,
        &["git", "restore", &upstream_url, &s(&d("c")), "--force"],
        None,
    )
    .ok();
    assert_eq!(git_in(&d("c"), &["status", "--porcelain"]), "");
}

#[test]
fn git_clone_falls_back_to_the_upstream_when_the_cache_cannot_help() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let upstream_url = git.url("app.git");
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("repo");
    // No larderd at all: the clone still succeeds, from the upstream.
    let run = larder(
        "http://127.0.0.1:9",
        &[
            "git",
            "clone",
            &upstream_url,
            dest.to_str().unwrap(),
            "--json",
        ],
        None,
    )
    .ok();
    assert_eq!(run.json()["source"], "clone");
    assert!(run.stderr.contains("cloning"), "{}", run.stderr);
    clone_of(&upstream_url, &out.path().join("clone"));
    assert_like_a_clone(&dest, &out.path().join("clone"), &upstream_url);

    // A larderd without a snapshot yet: `restore` says so (exit 2), `clone` clones.
    let srv = Larderd::start(&["--git-allow", ALLOW_LOOPBACK, "--git-interval", "1h"]);
    let r = larder(
        &srv.url(),
        &[
            "git",
            "restore",
            &upstream_url,
            out.path().join("r").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    let tip = git_in(
        &root.path().join("app.git"),
        &["rev-parse", "v0.1^{commit}"],
    );
    let run = larder(
        &srv.url(),
        &[
            "git",
            "clone",
            &upstream_url,
            out.path().join("c").to_str().unwrap(),
            "--commit",
            &tip,
            "--json",
        ],
        None,
    )
    .ok();
    assert_eq!(run.json()["source"], "clone");
    assert_eq!(git_in(&out.path().join("c"), &["rev-parse", "HEAD"]), tip);
}

/// Stores `archive` as the snapshot of `commit` of `upstream` and a head record naming it,
/// through the object API (anyone with write access to the namespace could).
fn plant_snapshot(srv: &Larderd, upstream: &str, commit: &str, archive: &[u8]) {
    let up = larder_git::Upstream::parse(upstream).unwrap();
    let key = up.snapshot_key(&larder_git::CommitId::parse(commit).unwrap());
    let put = larder(&srv.url(), &["put", "git", key.as_str()], Some(archive)).ok();
    let etag = put.stdout_text().trim().trim_matches('"').to_string();
    let record = serde_json::json!({
        "version": 1,
        "commit": commit,
        "ref": "refs/heads/main",
        "snapshot_key": key.as_str(),
        "etag": etag,
        "size": archive.len(),
        "observed_at": 1_700_000_000u64,
        "created_at": 1_700_000_000u64,
    });
    let body = serde_json::to_vec(&record).unwrap();
    larder(
        &srv.url(),
        &["put", "git", up.head_key().as_str()],
        Some(&body),
    )
    .ok();
}

/// A one-commit working repository at `dir` with a file and `main` checked out.
fn small_repo(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    git_in(dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("README"), "hello\n").unwrap();
    git_in(dir, &["add", "README"]);
    git_in(dir, &["commit", "-qm", "one"]);
    git_in(dir, &["rev-parse", "HEAD"])
}

fn archive_of(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    larder_git::snapshot::write_archive(dir, &mut out, &larder_git::SnapshotOptions::default())
        .unwrap();
    out
}

/// Plants the snapshot of the working repository `tree` (at `commit`) for the upstream
/// `http://127.0.0.1:1/{name}.git`, `name` being the directory's name, and restores it into
/// `out/{name}`.
fn restore_planted(srv: &Larderd, tree: &Path, commit: &str, out: &Path) -> Run {
    let name = tree.file_name().unwrap().to_str().unwrap();
    let upstream = format!("http://127.0.0.1:1/{name}.git");
    plant_snapshot(srv, &upstream, commit, &archive_of(tree));
    let dest = out.join(name);
    larder(
        &srv.url(),
        &["git", "restore", &upstream, dest.to_str().unwrap()],
        None,
    )
}

#[test]
fn a_hostile_snapshot_is_neutralised_or_refused() {
    // The upstream does not exist: the server's own generator fails and never overwrites what
    // the test plants, while the allow-list admits the names.
    let srv = Larderd::start(&[
        "--git-allow",
        "http://127.0.0.1:1/*",
        "--git-interval",
        "1h",
    ]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();

    // Hooks, fsmonitor, a hooks path, filters, aliases and alternates in the snapshot's .git.
    let evil = tmp.path().join("evil");
    let commit = small_repo(&evil);
    let run_marker = format!("touch {}", marker.display());
    let hook = evil.join(".git/hooks/post-checkout");
    std::fs::write(&hook, format!("#!/bin/sh\n{run_marker}\n")).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for (k, v) in [
        ("core.fsmonitor", run_marker.as_str()),
        ("core.hooksPath", ".git/hooks"),
        ("filter.x.clean", run_marker.as_str()),
        ("filter.x.smudge", run_marker.as_str()),
        ("core.sshCommand", run_marker.as_str()),
    ] {
        git_in(&evil, &["config", k, v]);
    }
    std::fs::write(evil.join(".git/info/attributes"), "* filter=x\n").unwrap();
    std::fs::write(
        evil.join(".git/objects/info/alternates"),
        "/nonexistent/objects\n",
    )
    .unwrap();
    std::fs::write(evil.join(".git/commondir"), "/tmp\n").unwrap();
    let upstream = "http://127.0.0.1:1/evil.git";
    let dest = out.join("evil");
    restore_planted(&srv, &evil, &commit, &out).ok();
    assert!(!marker.exists(), "no program of the snapshot ran");
    assert_eq!(git_in(&dest, &["status", "--porcelain"]), "");
    assert!(
        !marker.exists(),
        "no program of the snapshot runs later either"
    );
    let config = std::fs::read_to_string(dest.join(".git/config")).unwrap();
    for bad in ["fsmonitor", "hooksPath", "filter", "sshCommand"] {
        assert!(!config.contains(bad), "{bad} survived: {config}");
    }
    assert_eq!(git_in(&dest, &["remote", "get-url", "origin"]), upstream);
    for gone in [
        "hooks",
        "commondir",
        "objects/info/alternates",
        "info/attributes",
    ] {
        assert!(
            !dest.join(".git").join(gone).exists(),
            ".git/{gone} survived"
        );
    }

    // A working tree that differs from its commit, or has extra files, is refused.
    let tampered = tmp.path().join("tampered");
    let commit = small_repo(&tampered);
    std::fs::write(tampered.join("README"), "changed\n").unwrap();
    restore_planted(&srv, &tampered, &commit, &out).fails(1, "differs from the commit");
    assert!(!out.join("tampered").exists(), "nothing placed");
    let extra = tmp.path().join("extra");
    let commit = small_repo(&extra);
    std::fs::create_dir_all(extra.join(".cargo")).unwrap();
    let wrapper = "[build]\nrustc-wrapper = \"evil\"\n";
    std::fs::write(extra.join(".cargo/config.toml"), wrapper).unwrap();
    restore_planted(&srv, &extra, &commit, &out).fails(1, "is not in the commit");

    // A symlink inside .git is refused (it could point git at any directory).
    let linked = tmp.path().join("linked");
    let commit = small_repo(&linked);
    symlink("/tmp", linked.join(".git/refs/tags/elsewhere")).unwrap();
    restore_planted(&srv, &linked, &commit, &out).fails(1, "symlink");

    // `..` entries and writes through a symlink that leaves the tree never land outside.
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = outside.to_str().unwrap();
    for (name, entries) in [
        (
            "dotdot",
            vec![Entry::Dir("."), Entry::File("../escaped", b"x")],
        ),
        (
            "through",
            vec![
                Entry::Dir("."),
                Entry::Symlink("out", target),
                Entry::File("out/pwned", b"x"),
            ],
        ),
    ] {
        let upstream = format!("http://127.0.0.1:1/{name}.git");
        plant_snapshot(&srv, &upstream, &"ab".repeat(20), &raw_archive(&entries));
        let dest = out.join(name);
        let run = larder(
            &url,
            &["git", "restore", &upstream, dest.to_str().unwrap()],
            None,
        );
        assert_eq!(run.code, 1, "{name}: {}", run.stderr);
        assert!(!dest.exists(), "{name}: nothing placed");
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
    assert!(!out.join("escaped").exists() && !tmp.path().join("escaped").exists());
}

/// Every object file (pack or loose object) under `dir`.
fn objects_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let in_objects = path.components().any(|c| c.as_os_str() == "objects");
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            found.extend(objects_under(&path));
        } else if in_objects && (name.ends_with(".pack") || name.len() == 38) {
            found.push(path);
        }
    }
    found
}

#[test]
fn a_corrupt_mirror_is_never_published_and_restores_stay_clones() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let upstream_url = git.url("app.git");
    let bare = root.path().join("app.git");
    let mirrors = root.path().join("mirrors");
    let srv = Larderd::start(&[
        "--git-allow",
        ALLOW_LOOPBACK,
        "--git-interval",
        "1s",
        "--git-mirror-dir",
        mirrors.to_str().unwrap(),
    ]);
    let out = tempfile::tempdir().unwrap();
    restore_when_ready(
        &srv.url(),
        &[
            "git",
            "restore",
            &upstream_url,
            out.path().join("first").to_str().unwrap(),
        ],
    )
    .ok();

    // Damage every object of the mirror in the middle (objects the next snapshot needs), then
    // move the upstream on so that a new snapshot is due.
    let objects = objects_under(&mirrors);
    assert!(
        !objects.is_empty(),
        "the mirror has objects under {}",
        mirrors.display()
    );
    for object in &objects {
        let mut data = std::fs::read(object).unwrap();
        let (middle, len) = (data.len() / 2, data.len());
        for b in &mut data[middle..middle + 4096.min(len.saturating_sub(middle + 20))] {
            *b ^= 0x5a;
        }
        std::fs::write(object, data).unwrap();
    }
    let new_tip = append_commits(&bare, "main", 1);
    wait_for_head(&srv, &git, "app.git", &new_tip);
    let dest = out.path().join("second");
    larder(
        &srv.url(),
        &["git", "restore", &upstream_url, dest.to_str().unwrap()],
        None,
    )
    .ok();
    assert_eq!(git_in(&dest, &["rev-parse", "HEAD"]), new_tip);
    clone_of(&upstream_url, &out.path().join("clone"));
    assert_like_a_clone(&dest, &out.path().join("clone"), &upstream_url);
    let metrics = http_get(&format!("{}/metrics", srv.url())).unwrap().1;
    let noticed = [
        "larder_git_rounds_failed_total",
        "larder_git_mirrors_rebuilt_total",
    ]
    .iter()
    .map(|m| larder_testkit::metric(&metrics, m).unwrap_or(0.0))
    .sum::<f64>();
    assert!(
        noticed >= 1.0,
        "the damage was noticed (a failed round or a rebuilt mirror)"
    );
}

/// A restore through a relay slow enough that the head record moves on (with `--git-keep 1`, so
/// the snapshot being restored is retired) before it finishes. Returns the restore's JSON
/// summary, the commits before and after, and where it restored.
fn restore_while_the_head_moves(
    grace: &str,
) -> (serde_json::Value, String, String, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    // Incompressible files make a snapshot of several MiB, which takes seconds through the
    // throttled relay below.
    let bare = root.path().join("big.git");
    generated_repo(&bare, 4, 10, 3 << 20);
    let git = GitHttpServer::start(root.path());
    let upstream_url = git.url("big.git");
    let srv = Larderd::start(&[
        "--git-allow",
        ALLOW_LOOPBACK,
        "--git-interval",
        "1s",
        "--git-keep",
        "1",
        "--git-grace",
        grace,
    ]);
    let out = tempfile::tempdir().unwrap();
    let first = git_in(&bare, &["rev-parse", "main"]);
    restore_when_ready(
        &srv.url(),
        &[
            "git",
            "restore",
            &upstream_url,
            out.path().join("warm").to_str().unwrap(),
        ],
    )
    .ok();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let server_addr = srv.url().trim_start_matches("http://").to_string();
    let relay = rt.block_on(larder_testkit::TcpRelay::start(&server_addr, Some(2 << 20)));
    let dest = out.path().join("during");
    let (relay_url, up, d) = (relay.url(), upstream_url.clone(), dest.clone());
    let restore = std::thread::spawn(move || {
        let args = [
            "git",
            "restore",
            &up,
            d.to_str().unwrap(),
            "--json",
            "--concurrency",
            "2",
            "--chunk-size",
            "1MiB",
        ];
        (larder(&relay_url, &args, None), Instant::now())
    });
    let second = append_commits(&bare, "main", 1);
    wait_for_head(&srv, &git, "big.git", &second);
    let moved_at = Instant::now();
    let (run, finished_at) = restore.join().unwrap();
    let summary = run.ok().json();
    assert!(
        moved_at < finished_at,
        "the head record moved only after the restore finished: the test did not overlap them"
    );
    assert_eq!(git_in(&dest, &["status", "--porcelain"]), "");
    assert_eq!(
        git_in(&dest, &["rev-parse", "HEAD"]),
        summary["commit"].as_str().unwrap()
    );
    (summary, first, second, out)
}

#[test]
fn a_head_record_moving_during_a_restore_changes_nothing_in_it() {
    let (summary, first, _, _dirs) = restore_while_the_head_moves("5m");
    assert_eq!(
        summary["commit"],
        first.as_str(),
        "the restore kept the snapshot it started with"
    );
}

#[test]
fn a_snapshot_deleted_during_its_restore_is_replaced_by_the_new_head() {
    // A grace shorter than the restore: the snapshot goes while it is being downloaded.
    let (summary, _, second, _dirs) = restore_while_the_head_moves("1s");
    assert_eq!(
        summary["commit"],
        second.as_str(),
        "the restore went on with the new head"
    );
}

#[test]
fn ripgrep_restored_from_the_cache_is_a_clone() {
    let name = "ripgrep_restored_from_the_cache_is_a_clone";
    let root = tempfile::tempdir().unwrap();
    if ripgrep_upstream(name, &root.path().join("ripgrep.git")).is_none() {
        return;
    }
    let git = GitHttpServer::start(root.path());
    let upstream_url = git.url("ripgrep.git");
    let srv = Larderd::start(&["--git-allow", ALLOW_LOOPBACK, "--git-interval", "1h"]);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("rg");
    let run = restore_when_ready(
        &srv.url(),
        &[
            "git",
            "restore",
            &upstream_url,
            dest.to_str().unwrap(),
            "--json",
        ],
    )
    .ok();
    assert_eq!(run.json()["fetched_from_upstream"], false);
    clone_of(&upstream_url, &out.path().join("clone"));
    assert_like_a_clone(&dest, &out.path().join("clone"), &upstream_url);
    assert_no_hooks(&dest);
}

#[test]
fn a_commit_in_a_bundle_newer_than_the_snapshot_comes_from_larder_not_the_upstream() {
    let root = tempfile::tempdir().unwrap();
    let git = upstream(root.path());
    let upstream_url = git.url("app.git");
    let bare = root.path().join("app.git");
    let srv = Larderd::start(&["--git-allow", ALLOW_LOOPBACK, "--git-interval", "1s"]);
    let out = tempfile::tempdir().unwrap();
    restore_when_ready(
        &srv.url(),
        &[
            "git",
            "restore",
            &upstream_url,
            out.path().join("a").to_str().unwrap(),
        ],
    )
    .ok();
    let head_url = format!("{}/api/v1/git/{}/app.git/head", srv.url(), git.addr);
    let old_record = http_get(&head_url).unwrap().1;

    // The upstream moves on; larder snapshots it and bundles what is new (an increment).
    let new_tip = append_commits(&bare, "main", 2);
    wait_for_head(&srv, &git, "app.git", &new_tip);
    let list_url = format!("{}/api/v1/git/{}/app.git/bundles.list", srv.url(), git.addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_get(&list_url).is_some_and(|(status, body)| status == 200 && body.contains("inc-"))
    {
        assert!(Instant::now() < deadline, "no increment bundle");
        std::thread::sleep(Duration::from_millis(300));
    }

    // A client that finds the older head record (as a replica that lags would serve it) and
    // asks for the new commit, while the upstream is down: only larder's bundle can have it.
    drop(git);
    let up = larder_git::Upstream::parse(&upstream_url).unwrap();
    larder(
        &srv.url(),
        &["put", "git", up.head_key().as_str()],
        Some(old_record.as_bytes()),
    )
    .ok();
    let dest = out.path().join("b");
    let summary = restore_commit_json(&srv.url(), &upstream_url, &dest, &new_tip);
    assert_ne!(
        summary["snapshot_commit"],
        new_tip.as_str(),
        "restored the older snapshot"
    );
    assert_eq!(summary["commit"], new_tip.as_str());
    assert_eq!(summary["fetched_from_bundles"], true);
    assert_eq!(summary["fetched_from_upstream"], false);
    assert_eq!(git_in(&dest, &["rev-parse", "HEAD"]), new_tip);
    assert_eq!(git_in(&dest, &["status", "--porcelain"]), "");
    git_in(&dest, &["fsck", "--no-progress", "--strict"]);
    let refs = git_in(&dest, &["for-each-ref", "--format=%(refname)"]);
    assert!(
        !refs.contains("larder"),
        "no ref of the bundle is left: {refs}"
    );
}

//! Mirrors against a real upstream served by `git http-backend` on loopback. Run once with the
//! default git and once with `LARDER_GIT=/usr/bin/git` to cover an older git on both sides.

use larder_git::head::lineage;
use larder_git::{CommitId, Git, Lineage, Mirror, MirrorError, MirrorOptions, Upstream};
use larder_testkit::git::{GitHttpServer, append_commits, generated_repo, git_in};
use std::path::Path;

struct Setup {
    _tmp: tempfile::TempDir,
    upstream_dir: std::path::PathBuf,
    server: GitHttpServer,
    upstream: Upstream,
    mirror_dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let upstream_dir = generated_repo(&tmp.path().join("srv/app.git"), 40, 20, 50_000);
    let server = GitHttpServer::start(&tmp.path().join("srv"));
    let upstream = Upstream::parse(&server.url("app.git")).unwrap();
    let mirror_dir = tmp.path().join("mirrors/app.git");
    Setup {
        _tmp: tmp,
        upstream_dir,
        server,
        upstream,
        mirror_dir,
    }
}

async fn open(s: &Setup) -> Mirror {
    Mirror::open_or_create(
        &Git::from_env(),
        &s.mirror_dir,
        &s.upstream,
        MirrorOptions::default(),
    )
    .await
    .unwrap()
}

fn commit(s: &str) -> CommitId {
    CommitId::parse(s).unwrap()
}

fn refs(dir: &Path) -> String {
    git_in(dir, &["for-each-ref", "--format=%(objectname) %(refname)"])
}

#[tokio::test]
async fn a_new_mirror_answers_nothing_until_it_fetched_cleanly() {
    let s = setup();
    let mirror = open(&s).await;
    assert!(!mirror.is_ready());
    assert!(matches!(
        mirror.tip("main").await,
        Err(MirrorError::NotReady(_))
    ));
    assert!(matches!(
        mirror.default_branch(),
        Err(MirrorError::NotReady(_))
    ));
}

#[tokio::test]
async fn fetch_mirrors_branches_and_tags_but_not_pull_requests() {
    let s = setup();
    let main = git_in(&s.upstream_dir, &["rev-parse", "main"]);
    let release = git_in(&s.upstream_dir, &["rev-parse", "release"]);
    git_in(
        &s.upstream_dir,
        &["update-ref", "refs/pull/1/head", &release],
    );
    git_in(&s.upstream_dir, &["update-ref", "refs/pull/1/merge", &main]);
    git_in(
        &s.upstream_dir,
        &["update-ref", "refs/changes/01/1/1", &main],
    );

    let mut mirror = open(&s).await;
    let fetched = mirror.fetch().await.unwrap();
    assert_eq!(fetched.default_branch, "main");
    assert_eq!(fetched.tip, commit(&main));
    assert!(!fetched.rebuilt);
    assert_eq!(mirror.default_branch().unwrap(), "main");
    assert_eq!(mirror.tip("main").await.unwrap(), Some(commit(&main)));
    assert!(mirror.tip("feature/a").await.unwrap().is_some());
    assert_eq!(mirror.tip("nope").await.unwrap(), None);
    assert!(mirror.tip("-bad..name").await.is_err());

    let want: String = refs(&s.upstream_dir)
        .lines()
        .filter(|l| l.contains(" refs/heads/") || l.contains(" refs/tags/"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(refs(&s.mirror_dir), want);
    assert_eq!(
        git_in(&s.mirror_dir, &["symbolic-ref", "HEAD"]),
        "refs/heads/main"
    );
    assert!(s.server.bytes_served() > 0);
}

#[tokio::test]
async fn the_next_fetch_sees_new_commits_and_deleted_branches() {
    let s = setup();
    let mut mirror = open(&s).await;
    let first = mirror.fetch().await.unwrap();
    let new_tip = append_commits(&s.upstream_dir, "main", 3);
    git_in(&s.upstream_dir, &["branch", "-D", "release"]);
    let served = s.server.bytes_served();

    let second = mirror.fetch().await.unwrap();
    assert_eq!(second.tip, commit(&new_tip));
    assert!(!second.rebuilt);
    assert!(mirror.is_ancestor(&first.tip, &second.tip).await.unwrap());
    assert!(!mirror.is_ancestor(&second.tip, &first.tip).await.unwrap());
    assert_eq!(mirror.tip("release").await.unwrap(), None, "pruned");
    // Incremental: far less than the 100 kB of big files a full fetch carries.
    assert!(s.server.bytes_served() - served < 50_000);
}

#[tokio::test]
async fn a_changed_default_branch_is_followed() {
    let s = setup();
    let mut mirror = open(&s).await;
    mirror.fetch().await.unwrap();
    git_in(
        &s.upstream_dir,
        &["symbolic-ref", "HEAD", "refs/heads/release"],
    );
    let fetched = mirror.fetch().await.unwrap();
    assert_eq!(fetched.default_branch, "release");
    assert_eq!(
        git_in(&s.mirror_dir, &["symbolic-ref", "HEAD"]),
        "refs/heads/release"
    );
}

fn files_under(dir: &Path, pred: &dyn Fn(&Path) -> bool) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p, pred));
        } else if pred(&p) {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_mirror_that_lost_its_packs_is_whole_again_after_the_next_fetch() {
    // git notices refs without objects and fetches everything again, or the check fails and
    // the mirror is rebuilt: either way nothing is answered from a mirror with holes.
    let s = setup();
    let mut mirror = open(&s).await;
    let first = mirror.fetch().await.unwrap();
    let packs = files_under(&s.mirror_dir.join("objects/pack"), &|p| {
        p.extension().is_some_and(|e| e == "pack")
    });
    assert!(!packs.is_empty(), "a full fetch of 40 commits keeps a pack");
    for p in packs {
        std::fs::remove_file(p).unwrap();
    }
    let fetched = mirror.fetch().await.unwrap();
    println!(
        "healed by {}",
        if fetched.rebuilt {
            "a rebuild"
        } else {
            "the fetch"
        }
    );
    assert_eq!(fetched.tip, first.tip);
    git_in(&s.mirror_dir, &["fsck", "--no-dangling"]);
    assert!(mirror.is_ready());
}

#[tokio::test]
async fn a_mirror_missing_an_object_that_fetch_does_not_replace_is_rebuilt() {
    let s = setup();
    let mut mirror = open(&s).await;
    mirror.fetch().await.unwrap();
    // A small fetch is unpacked into loose objects; the new file's blob is not a ref tip, so
    // fetch has no reason to ask for it again.
    let tip = append_commits(&s.upstream_dir, "main", 1);
    mirror.fetch().await.unwrap();
    let blob = git_in(
        &s.upstream_dir,
        &["rev-parse", &format!("{tip}:appended.txt")],
    );
    let loose = s
        .mirror_dir
        .join("objects")
        .join(&blob[..2])
        .join(&blob[2..]);
    assert!(loose.is_file(), "{} is loose", loose.display());
    std::fs::remove_file(&loose).unwrap();
    let fetched = mirror.fetch().await.unwrap();
    assert!(fetched.rebuilt);
    assert_eq!(fetched.tip, commit(&tip));
    git_in(&s.mirror_dir, &["fsck", "--no-dangling"]);
}

#[tokio::test]
async fn a_discarded_mirror_is_not_used_before_it_fetched_again() {
    let s = setup();
    let mut mirror = open(&s).await;
    let first = mirror.fetch().await.unwrap();
    mirror.discard().await.unwrap();
    assert!(!mirror.is_ready());
    assert!(matches!(
        mirror.tip("main").await,
        Err(MirrorError::NotReady(_))
    ));
    assert_eq!(git_in(&s.mirror_dir, &["for-each-ref"]), "");
    assert_eq!(mirror.fetch().await.unwrap().tip, first.tip);
}

#[tokio::test]
async fn an_unreachable_upstream_leaves_a_good_mirror_alone() {
    let mut s = setup();
    let mut mirror = open(&s).await;
    let first = mirror.fetch().await.unwrap();
    // Nothing listens on the old port any more.
    let tmp = tempfile::tempdir().unwrap();
    s.server = GitHttpServer::start(tmp.path());
    let err = mirror.fetch().await.unwrap_err();
    assert!(matches!(err, MirrorError::Upstream { .. }), "{err}");
    assert!(mirror.is_ready());
    assert_eq!(mirror.tip("main").await.unwrap(), Some(first.tip));
}

#[tokio::test]
async fn a_reopened_mirror_keeps_its_state_and_a_foreign_one_is_replaced() {
    let s = setup();
    let tip = {
        let mut mirror = open(&s).await;
        mirror.fetch().await.unwrap().tip
    };
    let reopened = open(&s).await;
    assert!(reopened.is_ready());
    assert_eq!(reopened.tip("main").await.unwrap(), Some(tip));

    let other = Upstream::parse(&s.server.url("other.git")).unwrap();
    let foreign = Mirror::open_or_create(
        &Git::from_env(),
        &s.mirror_dir,
        &other,
        MirrorOptions::default(),
    )
    .await
    .unwrap();
    assert!(!foreign.is_ready());
    assert_eq!(
        git_in(&s.mirror_dir, &["config", "remote.origin.url"]),
        other.url()
    );
    assert_eq!(git_in(&s.mirror_dir, &["for-each-ref"]), "");
}

#[tokio::test]
async fn garbage_in_the_mirror_directory_is_replaced() {
    let s = setup();
    std::fs::create_dir_all(&s.mirror_dir).unwrap();
    std::fs::write(s.mirror_dir.join("junk"), b"not a repository").unwrap();
    let mut mirror = open(&s).await;
    assert!(!s.mirror_dir.join("junk").exists());
    mirror.fetch().await.unwrap();
    assert!(mirror.is_ready());
}

#[tokio::test]
async fn lineage_of_a_new_tip_comes_from_the_mirror() {
    let s = setup();
    let mut mirror = open(&s).await;
    let old = mirror.fetch().await.unwrap().tip;
    let new = commit(&append_commits(&s.upstream_dir, "main", 2));
    mirror.fetch().await.unwrap();
    assert_eq!(
        lineage(&mirror, &old, &new).await.unwrap(),
        Lineage::Descendant
    );
    assert_eq!(
        lineage(&mirror, &new, &old).await.unwrap(),
        Lineage::Ancestor
    );
    // A force-push of main to another line of history.
    let feature = git_in(&s.upstream_dir, &["rev-parse", "feature/a"]);
    git_in(
        &s.upstream_dir,
        &["update-ref", "refs/heads/main", &feature],
    );
    let forced = mirror.fetch().await.unwrap().tip;
    assert_eq!(forced, commit(&feature));
    assert_eq!(
        lineage(&mirror, &new, &forced).await.unwrap(),
        Lineage::Unrelated
    );
    let gone = commit(&"2".repeat(40));
    assert_eq!(
        lineage(&mirror, &gone, &forced).await.unwrap(),
        Lineage::CurrentUnknown
    );
}

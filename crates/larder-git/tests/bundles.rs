//! Bundles and bundle lists used by a stock `git clone --bundle-uri`, against an upstream served
//! by `git http-backend` whose served bytes show where the objects came from. Run once with the
//! default git and once with `LARDER_GIT=/usr/bin/git`.

use larder_git::bundles::DEFAULT_BUNDLE_TIMEOUT;
use larder_git::{BundleChain, Git, Mirror, MirrorOptions, Upstream};
use larder_testkit::git::{
    GitHttpServer, append_commits, generated_repo, git, git_in, git_version,
};
use std::path::Path;

fn clone_with_bundles(list: &Path, url: &str, dest: &Path) {
    let out = git()
        .arg("clone")
        .arg("-q")
        .arg(format!("--bundle-uri=file://{}", list.display()))
        .arg(url)
        .arg(dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "clone --bundle-uri: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_list(chain: &BundleChain, dir: &Path) -> std::path::PathBuf {
    let list = chain
        .render_list(|b| format!("file://{}", dir.join(b.file_name()).display()))
        .unwrap();
    let path = dir.join("bundles.list");
    std::fs::write(&path, list).unwrap();
    path
}

const REFS: &[&str] = &[
    "for-each-ref",
    "--format=%(objectname) %(refname)",
    "refs/heads/",
    "refs/remotes/",
    "refs/tags/",
];

#[tokio::test]
async fn a_stock_clone_takes_its_objects_from_the_bundles_and_a_fetch_only_the_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let up = generated_repo(&tmp.path().join("srv/app.git"), 50, 30, 400_000);
    let server = GitHttpServer::start(&tmp.path().join("srv"));
    let url = server.url("app.git");
    let upstream = Upstream::parse(&url).unwrap();
    let git_bin = Git::from_env();
    let mut mirror = Mirror::open_or_create(
        &git_bin,
        &tmp.path().join("mirror.git"),
        &upstream,
        MirrorOptions::default(),
    )
    .await
    .unwrap();
    mirror.fetch().await.unwrap();
    let bundles = tmp.path().join("bundles");
    let mut chain = BundleChain::default();
    let (full, _) = chain
        .extend(&mirror, &bundles, false, DEFAULT_BUNDLE_TIMEOUT)
        .await
        .unwrap()
        .unwrap();
    assert!(full.full && full.tips.contains_key("main") && full.tips.len() == 3);
    assert!(
        chain
            .extend(&mirror, &bundles, false, DEFAULT_BUNDLE_TIMEOUT)
            .await
            .unwrap()
            .is_none(),
        "nothing new, no bundle"
    );
    let list = write_list(&chain, &bundles);

    let plain = tmp.path().join("plain");
    let before = server.bytes_served();
    git_in(tmp.path(), &["clone", "-q", &url, plain.to_str().unwrap()]);
    let plain_bytes = server.bytes_served() - before;

    let c = tmp.path().join("with-bundles");
    let before = server.bytes_served();
    clone_with_bundles(&list, &url, &c);
    let bundle_bytes = server.bytes_served() - before;
    println!(
        "MEASURED upstream bytes served: plain clone {plain_bytes}, clone --bundle-uri \
         {bundle_bytes} (full bundle {} bytes)",
        full.size
    );
    assert!(
        bundle_bytes * 4 < plain_bytes,
        "{bundle_bytes} vs {plain_bytes}"
    );
    assert_eq!(git_in(&c, REFS), git_in(&plain, REFS));
    assert_eq!(git_in(&c, &["status", "--porcelain"]), "");
    git_in(&c, &["fsck", "--no-progress"]);

    // The upstream moves on; the chain gets an increment with only the new objects.
    let tip = append_commits(&up, "main", 3);
    mirror.fetch().await.unwrap();
    let (inc, _) = chain
        .extend(&mirror, &bundles, false, DEFAULT_BUNDLE_TIMEOUT)
        .await
        .unwrap()
        .unwrap();
    assert!(!inc.full);
    assert_eq!(inc.tips.keys().collect::<Vec<_>>(), ["main"]);
    assert!(inc.size * 10 < full.size, "{} vs {}", inc.size, full.size);
    assert_eq!(inc.creation_token, full.creation_token + 1);
    write_list(&chain, &bundles);

    // A fresh clone applies the full bundle and the increment.
    let c2 = tmp.path().join("with-two-bundles");
    let before = server.bytes_served();
    clone_with_bundles(&list, &url, &c2);
    println!(
        "MEASURED clone --bundle-uri with full + increment: {} upstream bytes",
        server.bytes_served() - before
    );
    assert_eq!(git_in(&c2, &["rev-parse", "HEAD"]), tip);
    assert!(
        git_in(&c2, &["for-each-ref", "refs/bundles/"]).contains("refs/bundles/larder/inc-2/main")
    );

    // A new full bundle restarts the chain with the next token and retires what it replaces
    // (deleted later by the server, after its grace period).
    let mut restarted = chain.clone();
    let (refull, _) = restarted
        .extend(
            &mirror,
            &tmp.path().join("refull"),
            true,
            DEFAULT_BUNDLE_TIMEOUT,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(refull.full);
    assert_eq!(refull.creation_token, inc.creation_token + 1);
    assert_eq!(restarted.bundles, vec![refull]);
    assert_eq!(
        restarted
            .retired
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        [full.id.as_str(), inc.id.as_str()]
    );

    // git ≥ 2.42 remembers the list and, on fetch, downloads only bundles newer than it saw.
    if git_version() < (2, 42) {
        println!(
            "SKIPPED fetch part of a_stock_clone_takes_its_objects_from_the_bundles_and_a_fetch_only_the_new_one: \
             git {:?} does not record fetch.bundleURI",
            git_version()
        );
        return;
    }
    assert_eq!(git_in(&c, &["config", "fetch.bundleCreationToken"]), "1");
    // Gone, so that the fetch can only succeed if it does not ask for the full bundle again.
    std::fs::remove_file(bundles.join(full.file_name())).unwrap();
    let before = server.bytes_served();
    git_in(&c, &["fetch", "-q", "origin"]);
    let fetch_bytes = server.bytes_served() - before;
    assert_eq!(git_in(&c, &["rev-parse", "origin/main"]), tip);
    assert_eq!(git_in(&c, &["config", "fetch.bundleCreationToken"]), "2");
    assert!(
        git_in(&c, &["for-each-ref", "refs/bundles/"]).contains("refs/bundles/larder/inc-2/main")
    );
    println!(
        "MEASURED fetch after a new increment: {fetch_bytes} upstream bytes (increment {} bytes)",
        inc.size
    );
}

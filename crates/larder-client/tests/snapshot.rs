//! `larder save` / `larder restore` end to end against a real larderd: what a build depends on
//! survives the round trip, a restore appears only complete and verified, and a hostile archive
//! cannot write outside its target.

mod common;

use common::{Entry, Fault, FaultServer, Hook, Proxy, data, dir_entries, larder, raw_archive};
use filetime::FileTime;
use larder_testkit::{Larderd, binary};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const SMALL: &[&str] = &["--chunk-size", "64KiB", "--concurrency", "4"];

fn restore_args<'a>(key: &'a str, dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["restore", "ci", key, dir.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args
}

fn set_mtime(path: &Path, secs: i64) {
    let t = FileTime::from_unix_time(secs, 0);
    filetime::set_symlink_file_times(path, t, t).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with what build caches contain: modes, symlinks (relative, dangling, to a parent),
/// empty and read-only directories, long names, and files to be excluded.
fn build_tree(root: &Path) {
    let mk = |rel: &str, body: &[u8], mode: u32| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        chmod(&p, mode);
    };
    std::fs::create_dir_all(root).unwrap();
    mk("bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
    mk("secret.txt", b"s3cr3t", 0o600);
    mk("docs/readme.md", b"# readme\n", 0o644);
    mk("big.bin", &data(700_001, 5), 0o644);
    mk("src/main.o", b"object", 0o644);
    mk("src/lib.rs", b"fn main() {}", 0o644);
    mk("node_modules/pkg/index.js", b"module.exports = 1", 0o644);
    mk("deep/node_modules/x", b"nested", 0o644);
    let long = format!("{}/{}", "d".repeat(90), "f".repeat(120));
    mk(&long, b"long name", 0o640);
    mk("ro/file", b"read-only", 0o444);
    // Bits a usual umask (022) removes: restore must set them explicitly.
    mk("shared/everyone.txt", b"group and others write", 0o666);
    mk("bin/anyone", b"#!/bin/sh\n", 0o777);
    std::fs::create_dir_all(root.join("empty")).unwrap();
    chmod(&root.join("empty"), 0o700);
    symlink("docs/readme.md", root.join("link-rel")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("..", root.join("docs/up")).unwrap();
    // mtimes last, deepest first, so creating children does not disturb them.
    let mut all: Vec<PathBuf> = walk(root).into_keys().map(|rel| root.join(rel)).collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, 1_600_000_000 + i as i64 * 37);
    }
    chmod(&root.join("ro"), 0o555);
    set_mtime(root, 1_500_000_000);
}

/// Everything a restore must reproduce, keyed by relative path ("" is the root).
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    mtime: i64,
    content: Vec<u8>,
}

fn walk(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    fn visit(root: &Path, rel: &Path, out: &mut BTreeMap<String, Node>) {
        let path = root.join(rel);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let (kind, content) = if ft.is_symlink() {
            (
                "symlink",
                std::fs::read_link(&path)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
                    .into_bytes(),
            )
        } else if ft.is_dir() {
            ("dir", Vec::new())
        } else {
            ("file", std::fs::read(&path).unwrap())
        };
        out.insert(
            rel.to_string_lossy().into_owned(),
            Node {
                kind,
                // Symlink modes are meaningless on Linux.
                mode: if ft.is_symlink() {
                    0
                } else {
                    meta.mode() & 0o7777
                },
                mtime: meta.mtime(),
                content,
            },
        );
        if ft.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                visit(root, &rel.join(e.unwrap().file_name()), out);
            }
        }
    }
    visit(root, Path::new(""), &mut out);
    out
}

#[test]
fn save_and_restore_round_trip_preserves_modes_links_mtimes_and_empty_dirs() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src);
    let run = larder(
        &url,
        &[
            "save",
            "ci",
            "snap",
            src.to_str().unwrap(),
            "--exclude",
            "*.o",
            "--exclude",
            "node_modules/",
            "--json",
        ],
        None,
    )
    .ok();
    let saved = run.json();
    assert_eq!(saved["skipped"], 0);
    assert!(saved["archive_size"].as_u64().unwrap() > 0);

    let dst = tmp.path().join("restored");
    let run = larder(&url, &restore_args("snap", &dst, &["--json"]), None).ok();
    let restored = run.json();
    assert_eq!(restored["etag"], saved["etag"]);
    assert_eq!(restored["files"], saved["files"]);

    let mut want = walk(&src);
    want.retain(|rel, _| !rel.ends_with(".o") && !rel.split('/').any(|seg| seg == "node_modules"));
    let got = walk(&dst);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (rel, node) in &want {
        assert_eq!(&got[rel], node, "{rel:?} differs");
    }
    assert!(got.contains_key("empty") && got["ro"].mode == 0o555);

    // Without the final flush the tree is the same; only its durability differs.
    let fast = tmp.path().join("restored-no-sync");
    larder(&url, &restore_args("snap", &fast, &["--no-sync"]), None).ok();
    assert_eq!(walk(&fast), got);
    assert_eq!(
        dir_entries(tmp.path()),
        ["restored", "restored-no-sync", "src"],
        "no staging left"
    );
}

#[test]
fn save_of_selected_paths_and_a_bare_ttl() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src);
    let etag = larder(
        &url,
        &[
            "save",
            "--ttl",
            "1h",
            "ci",
            "part",
            src.to_str().unwrap(),
            "docs",
            "./bin/tool",
        ],
        None,
    )
    .ok()
    .stdout_text();
    assert_eq!(etag.trim().len(), 64, "prints the ETag: {etag}");
    let dst = tmp.path().join("out");
    larder(&url, &restore_args("part", &dst, &[]), None).ok();
    let got: Vec<String> = walk(&dst).into_keys().collect();
    assert_eq!(
        got,
        ["", "bin", "bin/tool", "docs", "docs/readme.md", "docs/up"]
    );
    larder(
        &url,
        &["save", "ci", "bad", src.to_str().unwrap(), "../etc"],
        None,
    )
    .fails(1, "must be relative to the directory and stay inside it");
    larder(
        &url,
        &[
            "save",
            "ci",
            "bad",
            src.to_str().unwrap(),
            "--exclude",
            "a[b",
        ],
        None,
    )
    .fails(1, "invalid --exclude pattern");
    larder(&url, &["save", "ci", "bad", "/nonexistent/dir"], None).fails(1, "cannot read");
    // A refused upload says why, even though the archiver was still writing.
    larder(
        &url,
        &[
            "save",
            "--if-none-match",
            "ci",
            "part",
            src.to_str().unwrap(),
        ],
        None,
    )
    .fails(1, "already exists and --if-none-match only creates");
}

#[test]
fn restore_of_a_missing_snapshot_exits_2_and_creates_nothing() {
    let srv = Larderd::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("a/b/c");
    larder(&srv.url(), &restore_args("nothing", &dst, &[]), None).fails(2, "ci/nothing not found");
    assert!(dir_entries(tmp.path()).is_empty());
}

#[test]
fn restore_refuses_an_existing_target_without_force_and_replaces_read_only_trees_with_it() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src);
    larder(&url, &["save", "ci", "s", src.to_str().unwrap()], None).ok();

    let dst = tmp.path().join("dst");
    std::fs::create_dir_all(dst.join("locked/inner")).unwrap();
    std::fs::write(dst.join("locked/inner/old.txt"), b"old").unwrap();
    std::fs::write(dst.join("keep.txt"), b"old").unwrap();
    chmod(&dst.join("locked/inner"), 0o555);
    chmod(&dst.join("locked"), 0o555);
    chmod(&dst, 0o555);
    let before = walk(&dst);

    larder(&url, &restore_args("s", &dst, &[]), None).fails(1, "already exists; pass --force");
    assert_eq!(walk(&dst), before, "untouched without --force");

    larder(&url, &restore_args("s", &dst, &["--force"]), None).ok();
    let mut want = walk(&src);
    let got = walk(&dst);
    want.remove("");
    let mut got_without_root = got;
    got_without_root.remove("");
    assert_eq!(got_without_root, want);
    assert_eq!(
        dir_entries(tmp.path()),
        ["dst", "src"],
        "old tree and staging removed"
    );

    // A file in the way is replaced too.
    let file_target = tmp.path().join("was-a-file");
    std::fs::write(&file_target, b"x").unwrap();
    larder(&url, &restore_args("s", &file_target, &["--force"]), None).ok();
    assert!(file_target.join("bin/tool").is_file());
}

fn put_archive(url: &str, key: &str, archive: &[u8]) {
    larder(url, &["put", "ci", key], Some(archive)).ok();
}

#[test]
fn a_malicious_archive_is_refused_and_writes_nothing_outside() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"do not touch").unwrap();
    let abs = format!("{}/abs-evil", outside.display());
    let cases: Vec<(&str, Vec<Entry<'_>>, &str)> = vec![
        (
            "dotdot",
            vec![
                Entry::File("ok.txt", b"fine"),
                Entry::File("../outside/evil", b"x"),
            ],
            "contains `..`",
        ),
        (
            "absolute",
            vec![Entry::File(&abs, b"x")],
            "is an absolute path",
        ),
        (
            "symlink-up",
            vec![Entry::Symlink("esc", "../outside")],
            "points outside the restored tree",
        ),
        (
            "symlink-absolute",
            vec![Entry::Symlink("esc", "/etc")],
            "which is an absolute path",
        ),
        (
            // Each link looks harmless alone; together they climb out.
            "symlink-chain",
            vec![
                Entry::Dir("a/b"),
                Entry::Symlink("a/b/up", ".."),
                Entry::Symlink("a/b/z", "up/../.."),
            ],
            "through other links, resolves outside",
        ),
        (
            "write-through-symlink",
            vec![Entry::Symlink("here", "."), Entry::File("here/x", b"x")],
            "would be written through the symlink",
        ),
        (
            // A directory replaced by a later symlink is no longer trusted as a directory.
            "directory-replaced-by-symlink",
            vec![
                Entry::Dir("a/b"),
                Entry::Symlink("a/b/up", ".."),
                Entry::Dir("esc"),
                Entry::Symlink("esc", "a/b/up/.."),
                Entry::File("esc/evil", b"x"),
            ],
            "would be written through the symlink",
        ),
        (
            "hardlink-up",
            vec![Entry::Hardlink("hl", "../outside/secret")],
            "is a hard link to",
        ),
        (
            "hardlink-absolute",
            vec![Entry::Hardlink("hl", "/etc/passwd")],
            "is a hard link to",
        ),
    ];
    for (key, entries, message) in cases {
        put_archive(&url, key, &raw_archive(&entries));
        let dst = tmp.path().join("dst");
        let run = larder(&url, &restore_args(key, &dst, &[]), None).fails(1, message);
        assert!(run.stderr.contains("refusing"), "{key}: {}", run.stderr);
        assert!(
            run.stderr.contains("nothing was restored"),
            "{key}: {}",
            run.stderr
        );
        assert_eq!(
            dir_entries(tmp.path()),
            ["outside"],
            "{key}: nothing placed or left"
        );
        assert_eq!(
            dir_entries(&outside),
            ["secret"],
            "{key}: nothing written outside"
        );
        assert_eq!(
            std::fs::read(outside.join("secret")).unwrap(),
            b"do not touch"
        );
    }
    // A harmless hard link and an inside symlink are fine.
    put_archive(
        &url,
        "fine",
        &raw_archive(&[
            Entry::File("a.txt", b"A"),
            Entry::Hardlink("b.txt", "a.txt"),
            Entry::Symlink("c", "a.txt"),
        ]),
    );
    let dst = tmp.path().join("fine");
    larder(&url, &restore_args("fine", &dst, &[]), None).ok();
    assert_eq!(std::fs::read(dst.join("b.txt")).unwrap(), b"A");
    assert_eq!(std::fs::read(dst.join("c")).unwrap(), b"A");
}

/// What a tree restored from `entries` must hold by tar's rule that a later entry of a path
/// replaces the earlier one: each path's kind and content ("" is left out). A hard link holds
/// what its target held when the link was made.
fn later_entries_win(entries: &[Entry<'_>]) -> BTreeMap<String, (&'static str, Vec<u8>)> {
    let mut tree: BTreeMap<String, (&'static str, Vec<u8>)> = BTreeMap::new();
    for e in entries {
        let (path, node) = match e {
            Entry::File(p, body) => (p, ("file", body.to_vec())),
            Entry::Dir(p) => (p, ("dir", Vec::new())),
            Entry::Symlink(p, t) => (p, ("symlink", t.as_bytes().to_vec())),
            Entry::Hardlink(p, t) => (p, tree[*t].clone()),
        };
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            tree.insert(dir.to_str().unwrap().to_string(), ("dir", Vec::new()));
            parent = dir.parent();
        }
        tree.insert(path.to_string(), node);
    }
    tree
}

/// Issue 10, item 9: small files were written by several threads without waiting for an earlier
/// entry of the same path, so with duplicate entries the earlier one could win, or the restore
/// failed with "File exists". Archives appended to (`tar -r`) hold such duplicates; tar's rule
/// is that the later entry wins, also when it is of another kind (GNU tar replaces files,
/// links and empty directories).
#[test]
fn restore_of_duplicate_entries_keeps_the_later_one_every_time() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    // One writer's run of small files (512 of one directory), then the same files again in
    // reverse order: the second pass is dealt to another writer, whose first write is the path
    // the first writer writes last.
    let names: Vec<String> = (0..512).map(|i| format!("dup/f{i:03}")).collect();
    let old: Vec<Vec<u8>> = (0..512).map(|i| format!("old {i}").into_bytes()).collect();
    let new: Vec<Vec<u8>> = (0..512).map(|i| format!("new {i}!").into_bytes()).collect();
    let (big1, big2) = (data(300_000, 1), data(310_000, 2));
    let mut entries: Vec<Entry<'_>> = Vec::new();
    entries.extend(names.iter().zip(&old).map(|(n, b)| Entry::File(n, b)));
    entries.extend(names.iter().zip(&new).rev().map(|(n, b)| Entry::File(n, b)));
    entries.extend([
        // Large (written by the tar thread) and small, in every order.
        Entry::File("big.bin", &big1),
        Entry::File("big.bin", &big2),
        Entry::File("grows", b"small"),
        Entry::File("grows", &big1),
        Entry::File("shrinks", &big2),
        Entry::File("shrinks", b"small again"),
        // Another kind later.
        Entry::File("becomes-link", b"a file first"),
        Entry::Symlink("becomes-link", "dup/f001"),
        Entry::Symlink("becomes-file", "dup/f002"),
        Entry::File("becomes-file", b"a file now"),
        Entry::Dir("becomes-file-too"),
        Entry::File("becomes-file-too", b"an empty directory before"),
        Entry::Dir("dir-becomes-link"),
        Entry::Symlink("dir-becomes-link", "dup"),
        Entry::File("becomes-dir", b"a file first"),
        Entry::Dir("becomes-dir"),
        Entry::File("becomes-dir/inside", b"inside"),
        // Hard links: to the revision of their time, and replaced themselves.
        Entry::File("linked", b"first revision"),
        Entry::Hardlink("link-to-first", "linked"),
        Entry::File("linked", b"second revision"),
        Entry::File("link-replaced", b"a file first"),
        Entry::Hardlink("link-replaced", "linked"),
        Entry::Hardlink("file-over-link", "linked"),
        Entry::File("file-over-link", b"not the link's target"),
    ]);
    put_archive(&url, "dups", &raw_archive(&entries));
    let want = later_entries_win(&entries);
    for round in 0..10 {
        let dst = tmp.path().join(format!("dst{round}"));
        larder(&url, &restore_args("dups", &dst, &["--no-sync"]), None).ok();
        let got: BTreeMap<String, (&'static str, Vec<u8>)> = walk(&dst)
            .into_iter()
            .filter(|(path, _)| !path.is_empty())
            .map(|(path, node)| (path, (node.kind, node.content)))
            .collect();
        let wrong: Vec<String> = want
            .iter()
            .filter(|(path, node)| got.get(*path) != Some(node))
            .map(|(path, node)| {
                let shown = |n: Option<&(&str, Vec<u8>)>| {
                    n.map(|(k, c)| {
                        format!("{k} {:?}", String::from_utf8_lossy(&c[..c.len().min(40)]))
                    })
                };
                format!(
                    "{path}: want {:?}, got {:?}",
                    shown(Some(node)),
                    shown(got.get(path))
                )
            })
            .collect();
        assert!(
            wrong.is_empty() && got.len() == want.len(),
            "round {round}: {} paths differ, e.g.\n{}",
            wrong.len(),
            wrong[..wrong.len().min(10)].join("\n")
        );
        std::fs::remove_dir_all(&dst).unwrap();
    }
}

/// A later entry never replaces a directory that has something in it (GNU tar refuses too):
/// the restore is refused, and nothing is placed.
#[test]
fn restore_refuses_to_replace_a_non_empty_directory_with_a_later_entry() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    for (key, last) in [
        ("dir-then-file", Entry::File("d", b"file")),
        ("dir-then-link", Entry::Symlink("d", "e")),
    ] {
        let entries = [
            Entry::Dir("d"),
            Entry::File("d/kept", b"x"),
            Entry::Dir("e"),
            last,
        ];
        put_archive(&url, key, &raw_archive(&entries));
        let dst = tmp.path().join("dst");
        larder(&url, &restore_args(key, &dst, &[]), None)
            .fails(1, "would replace a non-empty directory");
        assert_eq!(
            dir_entries(tmp.path()),
            Vec::<String>::new(),
            "{key}: nothing placed"
        );
    }
}

#[test]
fn a_corrupt_snapshot_is_not_placed() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    put_archive(&url, "junk", &data(100_000, 3));
    let dst = tmp.path().join("dst");
    larder(&url, &restore_args("junk", &dst, &[]), None).fails(1, "not a valid tar + zstd archive");
    assert!(dir_entries(tmp.path()).is_empty());
}

#[test]
fn a_snapshot_that_does_not_match_its_etag_is_not_placed() {
    // A valid archive served under an ETag that is not its digest: the extraction succeeds,
    // the verification does not, and nothing may appear.
    let srv = Larderd::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    build_tree(&src);
    larder(
        &srv.url(),
        &["save", "ci", "s", src.to_str().unwrap()],
        None,
    )
    .ok();
    let archive = larder(&srv.url(), &["get", "ci", "s"], None).ok().stdout;
    let server = FaultServer::start(archive, Some(Fault::Lie));
    let dst = tmp.path().join("dst");
    let run = larder(&server.url, &restore_args("s", &dst, &[]), None).fails(1, "digest");
    assert!(
        run.stderr.contains("nothing was restored"),
        "{}",
        run.stderr
    );
    assert_eq!(dir_entries(tmp.path()), ["src"]);
}

#[test]
fn a_snapshot_replaced_mid_restore_restarts_into_a_clean_staging_dir() {
    let srv = Larderd::start(&[]);
    let upstream = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for (dir, seed) in [(&a, 1u64), (&b, 2)] {
        std::fs::create_dir_all(dir).unwrap();
        for i in 0..8 {
            std::fs::write(
                dir.join(format!("f{i}-{seed}")),
                data(100_000, seed * 100 + i),
            )
            .unwrap();
        }
    }
    larder(&upstream, &["save", "ci", "s", a.to_str().unwrap()], None).ok();
    let hook: Hook = {
        let (upstream, b) = (upstream.clone(), b.clone());
        Arc::new(move |n, _| {
            if n == 4 {
                let out = Command::new(binary("larder"))
                    .args(["--url", &upstream, "--quiet", "save", "ci", "s"])
                    .arg(&b)
                    .output()
                    .unwrap();
                assert!(out.status.success());
            }
        })
    };
    let proxy = Proxy::start(&upstream, None, Some(hook));
    let dst = tmp.path().join("dst");
    let run = larder(&proxy.url, &restore_args("s", &dst, &["--json"]), None).ok();
    assert_eq!(run.json()["restarts"], 1);
    let mut got = dir_entries(&dst);
    got.sort();
    assert_eq!(got, dir_entries(&b), "exactly the second snapshot");
    assert_eq!(dir_entries(tmp.path()), ["a", "b", "dst"]);
}

#[test]
fn an_aborted_upload_stores_nothing() {
    // The library path `save` relies on: a body stream that fails mid-way must not leave an
    // object (or a truncated one) behind.
    let srv = Larderd::start(&[]);
    let client = larder_client::Client::new(&srv.url()).unwrap();
    let name = larder_client::ObjectName::parse("ci", "aborted").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let pieces: Vec<std::io::Result<bytes::Bytes>> = vec![
            Ok(bytes::Bytes::from(data(1 << 20, 1))),
            Err(std::io::Error::other("the disk went away")),
        ];
        client
            .put_stream(
                &name,
                futures_util::stream::iter(pieces),
                None,
                "the test stream",
                &Default::default(),
            )
            .await
    });
    let err = result.unwrap_err().to_string();
    assert!(err.contains("the disk went away"), "{err}");
    larder(&srv.url(), &["stat", "ci", "aborted"], None).fails(2, "not found");
}

#[test]
fn force_replaces_read_only_trees_for_an_unprivileged_user() {
    // Root ignores directory permissions, so as root the test above proves little about them;
    // run the restore as `nobody` here. (Unprivileged, the test above already covers it.)
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    const NOBODY: u32 = 65534;
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("ro/inner")).unwrap();
    std::fs::write(src.join("ro/inner/f"), b"new").unwrap();
    chmod(&src.join("ro/inner"), 0o555);
    chmod(&src.join("ro"), 0o555);
    larder(&url, &["save", "ci", "s", src.to_str().unwrap()], None).ok();

    let work = tmp.path().join("work");
    let dst = work.join("dst");
    std::fs::create_dir_all(dst.join("locked/deep")).unwrap();
    std::fs::write(dst.join("locked/deep/old"), b"old").unwrap();
    let mut paths = vec![tmp.path().to_path_buf()];
    paths.extend(walk(&work).into_keys().map(|rel| work.join(rel)));
    for p in &paths {
        std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    chmod(&dst.join("locked/deep"), 0o555);
    chmod(&dst.join("locked"), 0o555);

    let restore = |force: bool| {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(binary("larder"));
        cmd.args(["--url", &url, "restore", "ci", "s"]).arg(&dst);
        if force {
            cmd.arg("--force");
        }
        cmd.uid(NOBODY).gid(NOBODY).output().unwrap()
    };
    let out = restore(false);
    assert_eq!(out.status.code(), Some(1));
    assert!(dst.join("locked/deep/old").exists());
    let out = restore(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dst.join("ro/inner/f")).unwrap(), b"new");
    assert!(!dst.join("locked").exists());
    // Again, now replacing a tree whose read-only directories came from the snapshot.
    let out = restore(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dir_entries(&work), ["dst"], "old trees and staging removed");
}

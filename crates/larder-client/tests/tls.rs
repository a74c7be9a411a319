//! `https://` server URLs and `--ca-cert`/`LARDER_CA_CERT`, against larderd's own TLS.
//!
//! A throw-away CA and a server certificate for 127.0.0.1 come from the testkit. The client must
//! refuse the server without the CA (its certificate is not in the system's roots) and work with
//! it, for uploads, parallel range downloads and snapshots alike.

mod common;

use common::{Run, data, etag_of, larder_env};
use larder_testkit::{Larderd, TestPki};
use std::path::{Path, PathBuf};

fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

#[track_caller]
fn untrusted(run: Run) {
    let run = run.fails(1, "certificate");
    assert!(
        run.stderr
            .contains("--ca-cert FILE (or set LARDER_CA_CERT)"),
        "{}",
        run.stderr
    );
}

#[test]
fn https_works_with_the_ca_and_is_refused_without_it() {
    let pki = TestPki::new("larder");
    let srv = Larderd::start(&pki.server_args());
    let url = srv.url();
    let url = url.as_str();
    assert!(url.starts_with("https://"), "{url}");
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.ca.to_str().unwrap();
    let body = data(1_000_003, 3);
    let src = dir.path().join("src");
    std::fs::write(&src, &body).unwrap();
    let s = src.to_str().unwrap();

    // Without the CA: no request gets through, nothing is written.
    untrusted(larder_env(&["--url", url, "put", "ci", "k", s], &[]));
    untrusted(larder_env(&["--url", url, "stat", "ci", "k"], &[]));
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    untrusted(larder_env(&["--url", url, "get", "ci", "k", "-o", o], &[]));
    assert!(!out.exists());

    // With it, by flag or environment.
    let put = larder_env(&["--url", url, "--ca-cert", ca, "put", "ci", "k", s], &[]).ok();
    assert_eq!(put.stdout_text().trim(), etag_of(&body));
    let ranges = ["--chunk-size", "64KiB", "--concurrency", "4"];
    let mut get = vec!["--url", url, "get", "ci", "k", "-o", o, "--json"];
    get.extend(ranges);
    let run = larder_env(&get, &[("LARDER_CA_CERT", ca)]).ok();
    assert!(
        std::fs::read(&out).unwrap() == body,
        "bytes differ over https"
    );
    assert_eq!(run.json()["etag"], etag_of(&body));
    larder_env(&["--url", url, "--ca-cert", ca, "stat", "ci", "k"], &[]).ok();

    // Snapshots take the same path.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/c.txt"), b"over tls").unwrap();
    let restored = dir.path().join("restored");
    larder_env(
        &[
            "--url",
            url,
            "--ca-cert",
            ca,
            "save",
            "ci",
            "snap",
            tree.to_str().unwrap(),
        ],
        &[],
    )
    .ok();
    let mut restore = vec![
        "--url",
        url,
        "restore",
        "ci",
        "snap",
        restored.to_str().unwrap(),
    ];
    restore.extend(ranges);
    larder_env(&restore, &[("LARDER_CA_CERT", ca)]).ok();
    assert_eq!(
        std::fs::read(restored.join("a/b/c.txt")).unwrap(),
        b"over tls".to_vec()
    );
}

#[test]
fn another_ca_or_a_file_that_is_not_a_ca_is_refused() {
    let pki = TestPki::new("larder");
    let srv = Larderd::start(&pki.server_args());
    let url = srv.url();
    let url = url.as_str();
    let dir = tempfile::tempdir().unwrap();

    let other = TestPki::new("other");
    let other = &other.ca;
    untrusted(larder_env(
        &[
            "--url",
            url,
            "--ca-cert",
            other.to_str().unwrap(),
            "stat",
            "ci",
            "k",
        ],
        &[],
    ));

    let junk = write_pem(dir.path(), "junk.pem", "not a certificate\n");
    larder_env(
        &[
            "--url",
            url,
            "--ca-cert",
            junk.to_str().unwrap(),
            "stat",
            "ci",
            "k",
        ],
        &[],
    )
    .fails(1, "holds no PEM certificate");
    let missing = dir.path().join("missing.pem");
    larder_env(
        &[
            "--url",
            url,
            "--ca-cert",
            missing.to_str().unwrap(),
            "stat",
            "ci",
            "k",
        ],
        &[],
    )
    .fails(1, "cannot read the CA file");
}

//! The client against larderd's own access control and TLS (not a stand-in): tokens with scopes
//! over namespace patterns, and HTTPS with a private CA, for get, put, save and restore.

mod common;

use common::{data, etag_of, larder_env as run};
use larder_testkit::{Larderd, TestPki, token_sha256};

const WRITER: &str = "e2e-writer-6b1f0c9a2d";
const READER: &str = "e2e-reader-3a7e5d1c8b";

fn token_line(token: &str) -> String {
    format!("sha256 = \"{}\"\n", token_sha256(token))
}

#[test]
fn a_secured_larderd_serves_the_client_with_tokens_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let (ca, cert, key) = (
        pki.ca.to_str().unwrap(),
        pki.cert.to_str().unwrap(),
        pki.key.to_str().unwrap(),
    );
    let cfg = dir.path().join("larder.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[tokens]]\nname = \"writer\"\n{}scopes = [\"read\", \"write\"]\nnamespaces = [\"ci-*\"]\n\
             [[tokens]]\nname = \"reader\"\n{}scopes = [\"read\"]\nnamespaces = [\"ci-*\"]\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            token_line(WRITER),
            token_line(READER)
        ),
    )
    .unwrap();
    let srv = Larderd::start(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(srv.scheme, "https");
    let url = srv.url();
    let src = dir.path().join("artifact");
    let body = data((5 << 20) + 17, 9);
    std::fs::write(&src, &body).unwrap();
    let src = src.to_str().unwrap();

    // Without the CA nothing gets through, whatever the token.
    let r = run(
        &["--url", &url, "--token", WRITER, "put", "ci-main", "a", src],
        &[],
    );
    assert_ne!(r.code, 0);
    // With the CA but without a token, or with a read-only token: refused with exit 3.
    let secure = [("LARDER_CA_CERT", ca)];
    run(&["--url", &url, "put", "ci-main", "a", src], &secure).fails(3, "401");
    run(
        &["--url", &url, "--token", READER, "put", "ci-main", "a", src],
        &secure,
    )
    .fails(3, "403");
    // The writer stores, the reader downloads in parallel pinned chunks, bytes identical.
    let put = run(
        &["--url", &url, "--token", WRITER, "put", "ci-main", "a", src],
        &secure,
    )
    .ok();
    assert_eq!(put.stdout_text().trim(), etag_of(&body));
    let out = dir.path().join("out");
    let reader_env = [("LARDER_CA_CERT", ca), ("LARDER_TOKEN", READER)];
    run(
        &[
            "--url",
            &url,
            "get",
            "--chunk-size",
            "1MiB",
            "ci-main",
            "a",
            "-o",
            out.to_str().unwrap(),
        ],
        &reader_env,
    )
    .ok();
    assert!(std::fs::read(&out).unwrap() == body);
    // Outside the token's namespaces: 403, exit 3, nothing written.
    let other = dir.path().join("other");
    run(
        &[
            "--url",
            &url,
            "get",
            "release",
            "a",
            "-o",
            other.to_str().unwrap(),
        ],
        &reader_env,
    )
    .fails(3, "403");
    assert!(!other.exists());
    // Snapshots too.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/file"), b"snapshot contents").unwrap();
    run(
        &[
            "--url",
            &url,
            "--token",
            WRITER,
            "save",
            "ci-main",
            "snap",
            tree.to_str().unwrap(),
        ],
        &secure,
    )
    .ok();
    let restored = dir.path().join("restored");
    run(
        &[
            "--url",
            &url,
            "restore",
            "ci-main",
            "snap",
            restored.to_str().unwrap(),
        ],
        &reader_env,
    )
    .ok();
    assert_eq!(
        std::fs::read(restored.join("sub/file")).unwrap(),
        b"snapshot contents"
    );
    assert!(!put.stderr.contains(WRITER) && !put.stdout_text().contains(WRITER));
}

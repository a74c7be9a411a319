//! `https://` server URLs and `--ca-cert`/`LARDER_CA_CERT`.
//!
//! A test CA and a server certificate for 127.0.0.1 are generated per test (rcgen), and a small
//! TLS front end (tokio-rustls, ring) terminates TLS and passes the bytes to a real larderd, so
//! the client talks HTTPS to larderd's real HTTP behaviour. The client must refuse the server
//! without the CA (its certificate is not in the system's roots) and work with it, for uploads,
//! parallel range downloads and snapshots alike.

mod common;

use common::{Run, data, etag_of, larder_env};
use larder_testkit::Larderd;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA certificate (PEM) and a server certificate for 127.0.0.1 signed by it.
struct TestPki {
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

fn test_pki(name: &str) -> TestPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        server_chain: vec![server.der().clone()],
        server_key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

/// TLS in front of a larderd: every accepted connection is decrypted and piped to upstream.
struct TlsFront {
    url: String,
    _runtime: tokio::runtime::Runtime,
}

impl TlsFront {
    fn start(upstream: &str, pki: &TestPki) -> TlsFront {
        let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_string();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate aborts the handshake here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        TlsFront {
            url,
            _runtime: runtime,
        }
    }
}

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
    let srv = Larderd::start(&[]);
    let pki = test_pki("larder");
    let front = TlsFront::start(&srv.url(), &pki);
    let url = front.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pem(dir.path(), "ca.pem", &pki.ca_pem);
    let ca = ca.to_str().unwrap();
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
    let srv = Larderd::start(&[]);
    let pki = test_pki("larder");
    let front = TlsFront::start(&srv.url(), &pki);
    let url = front.url.as_str();
    let dir = tempfile::tempdir().unwrap();

    let other = write_pem(dir.path(), "other.pem", &test_pki("other").ca_pem);
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

//! Throw-away TLS material and access tokens for tests of larderd's HTTPS and access control.
//!
//! Every test that talks HTTPS needs a CA the client can be told to trust and a server
//! certificate for 127.0.0.1 signed by it; every test of access control needs the config line
//! for a token, produced the documented way (`larderd --hash-token`) so that way is tested too.

use crate::binary;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A CA and a server certificate for `127.0.0.1` and `localhost` signed by it, written as PEM
/// files into a directory that lives as long as this value.
pub struct TestPki {
    /// The CA certificate, for clients that should trust the server.
    pub ca_pem: String,
    pub ca: PathBuf,
    /// The server's certificate and private key, for `--tls-cert` / `--tls-key`.
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestPki {
    /// `name` goes into the CA's common name, so that two CAs of one test are told apart in
    /// error messages.
    pub fn new(name: &str) -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("server key");
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server parameters")
            .signed_by(&leaf_key, &issuer)
            .expect("server certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |file: &str, pem: &str| {
            let path = dir.path().join(file);
            std::fs::write(&path, pem).expect("write PEM");
            path
        };
        TestPki {
            ca: write("ca.pem", &ca_cert.pem()),
            cert: write("cert.pem", &leaf.pem()),
            key: write("key.pem", &leaf_key.serialize_pem()),
            ca_pem: ca_cert.pem(),
            _dir: dir,
        }
    }

    /// `--tls-cert CERT --tls-key KEY`, for [`crate::Larderd::start`].
    pub fn server_args(&self) -> [&str; 4] {
        [
            "--tls-cert",
            path_str(&self.cert),
            "--tls-key",
            path_str(&self.key),
        ]
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// The SHA-256 hex digest larderd stores for `token`, from `larderd --hash-token` (which prints
/// the config line `sha256 = "…"`).
pub fn token_sha256(token: &str) -> String {
    let mut child = Command::new(binary("larderd"))
        .arg("--hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn larderd --hash-token");
    writeln!(child.stdin.take().expect("stdin"), "{token}").expect("write the token");
    let out = child.wait_with_output().expect("larderd --hash-token");
    assert!(out.status.success(), "larderd --hash-token failed");
    let line = String::from_utf8(out.stdout).expect("UTF-8 output");
    line.trim()
        .strip_prefix("sha256 = \"")
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("unexpected --hash-token output {line:?}"))
        .to_string()
}

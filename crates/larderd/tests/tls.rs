//! HTTPS on the real larderd: HTTP/2 and HTTP/1.1 offered through ALPN, pinned range reads and
//! uploads over both, clients that do not trust the CA refused, bad certificate files refused
//! at start-up with a reason.

use larder_testkit::{Larderd, TestPki, binary, wait_for_log};
use reqwest::{Certificate, Client, StatusCode, Version};
use std::path::Path;
use std::process::Command;

fn start(pki: &TestPki) -> Larderd {
    Larderd::start(&pki.server_args())
}

fn trusting(pki: &TestPki) -> reqwest::ClientBuilder {
    Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
}

#[tokio::test]
async fn https_serves_pinned_ranges_over_http2_and_http1() {
    let pki = TestPki::new("larderd");
    let srv = start(&pki);
    assert_eq!(srv.scheme, "https");
    let url = srv.object_url("ci", "artifact");
    let body: Vec<u8> = (0..(3 << 20) as u32)
        .map(|i| (i * 31 % 251) as u8)
        .collect();

    let h2 = trusting(&pki).build().unwrap();
    let r = h2.put(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.version(), Version::HTTP_2, "ALPN should pick h2");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();

    let h1 = trusting(&pki).http1_only().build().unwrap();
    for client in [&h2, &h1] {
        let r = client
            .get(&url)
            .header("range", "bytes=1000000-1999999")
            .header("if-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
        let got = r.bytes().await.unwrap();
        assert_eq!(&got[..], &body[1_000_000..2_000_000]);
        let r = client
            .get(&url)
            .header("range", "bytes=0-9")
            .header(
                "if-match",
                "\"0000000000000000000000000000000000000000000000000000000000000000\"",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    }
    let r = h1.get(&url).send().await.unwrap();
    assert_eq!(r.version(), Version::HTTP_11);
    assert_eq!(r.bytes().await.unwrap().len(), body.len());
}

#[tokio::test]
async fn clients_without_the_ca_and_plain_http_are_refused() {
    let pki = TestPki::new("larderd");
    let srv = start(&pki);
    let untrusting = Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let e = untrusting
        .get(format!("{}/_liveness", srv.url()))
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    let plain = Client::new()
        .get(format!("http://{}/_liveness", srv.addr))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.unwrap().status() != StatusCode::OK,
        "plain HTTP must not be served on the TLS port"
    );
    // The server keeps serving trusted clients after those failures.
    let ok = trusting(&pki)
        .build()
        .unwrap()
        .get(format!("{}/_liveness", srv.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

fn start_error(cert: &Path, key: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("larderd"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .output()
        .unwrap();
    assert!(!out.status.success(), "larderd should refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_certificate_files_are_refused_with_a_reason() {
    let pki = TestPki::new("larderd");
    let other = TestPki::new("other");
    let err = start_error(&pki.cert, &other.key);
    assert!(err.contains("does not fit the certificate"), "{err}");
    let err = start_error(&pki.key, &pki.key);
    assert!(err.contains("holds no PEM certificate"), "{err}");
    let err = start_error(Path::new("/nonexistent/cert.pem"), &pki.key);
    assert!(err.contains("cannot read a PEM certificate chain"), "{err}");
    let err = start_error(&pki.cert, &pki.cert);
    assert!(err.contains("cannot read a PEM private key"), "{err}");
}

/// A renewed certificate is put in force by SIGHUP, without a config file: new handshakes get
/// it, a connection opened before keeps serving. A key that does not fit the new certificate
/// is refused and the certificate in force stays.
#[tokio::test]
async fn sighup_serves_a_renewed_certificate_and_refuses_a_mismatched_key() {
    let serving = TestPki::new("first");
    let renewed = TestPki::new("renewed");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let srv = larder_testkit::Launch::new(&serving.server_args())
        .env("LARDER_LOG", "info")
        .stderr_to(&log)
        .start();
    let liveness = format!("{}/_liveness", srv.url());
    let status = |pki: &TestPki| {
        let client = trusting(pki).build().unwrap();
        let url = liveness.clone();
        async move { client.get(url).send().await.map(|r| r.status()) }
    };
    let opened_before = trusting(&serving).http1_only().build().unwrap();
    assert_eq!(
        opened_before.get(&liveness).send().await.unwrap().status(),
        200
    );
    assert!(status(&renewed).await.is_err(), "not renewed yet");

    std::fs::copy(&renewed.cert, &serving.cert).unwrap();
    std::fs::copy(&renewed.key, &serving.key).unwrap();
    srv.signal("HUP");
    let text = wait_for_log(&log, "configuration reloaded");
    assert!(text.contains("certificate read again from"), "{text}");
    assert_eq!(status(&renewed).await.unwrap(), StatusCode::OK);
    assert!(
        status(&serving).await.is_err(),
        "the old CA's certificate is gone"
    );
    // The connection opened under the first certificate carries on.
    assert_eq!(
        opened_before.get(&liveness).send().await.unwrap().status(),
        200
    );

    // A key of another certificate: refused, the renewed certificate stays.
    let other = TestPki::new("other");
    std::fs::copy(&other.key, &serving.key).unwrap();
    srv.signal("HUP");
    let text = wait_for_log(&log, "configuration not reloaded");
    assert!(text.contains("does not fit the certificate"), "{text}");
    assert_eq!(status(&renewed).await.unwrap(), StatusCode::OK);
}

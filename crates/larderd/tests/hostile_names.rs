//! Hostile namespaces and keys against the real `larderd`: path traversal in every spelling,
//! NUL bytes, over-long names and odd percent-encodings must each get a 400 with a one-line
//! reason, for every method, and must leave nothing behind — no file in the data directory and
//! nothing in the namespace listing (docs/ARCHITECTURE.md, invariant 5).
//!
//! Requests go over a raw socket because HTTP client libraries normalise dot segments and
//! re-encode paths, which would hide exactly the spellings under test.

use larder_testkit::Larderd;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

const PREFIX: &str = "/api/v1/object/";

/// `{namespace}/{key}` parts of the request target, exactly as sent on the wire.
fn hostile_targets() -> Vec<String> {
    let long_ns = "n".repeat(65);
    let long_key = "k".repeat(513);
    let long_escaped_key = "%6B".repeat(513);
    let mut targets: Vec<String> = [
        // Traversal with plain dot segments.
        "ci/..",
        "ci/../x",
        "ci/a/../../x",
        "ci/./x",
        "ci/a/.",
        "../ci/x",
        "../../etc/passwd",
        "ci/../../../etc/passwd",
        // Traversal spelled with escapes, alone and mixed with literal dots.
        "ci/%2e%2e",
        "ci/%2E%2E/x",
        "ci/.%2e/x",
        "ci/%2e./x",
        "ci/%2e",
        "ci/a/%2e%2e/%2e%2e/x",
        "%2e%2e/x",
        "ci%2F..%2Fx/k",
        "ci/%2F..%2Fx",
        "ci/a%2F..%2F..%2Fx",
        "ci/%2F%2Fetc%2Fpasswd",
        "ci/%2Fetc",
        "ci/a%2F",
        "ci/a%2F%2Fb",
        // Backslashes, raw and escaped.
        "ci/..\\x",
        "ci/a\\b",
        "ci/..%5Cx",
        "ci/..%5C..%5Cx",
        "ci/%5C",
        "ci\\x/k",
        // NUL bytes.
        "ci/a%00",
        "ci/%00",
        "ci/a%00.tar",
        "ci/a%00/../b",
        "ci%00/k",
        // Overlong UTF-8 encodings of `.` and `/`, and other invalid UTF-8.
        "ci/%c0%ae%c0%ae/x",
        "ci/%c0%ae",
        "ci/%c0%af",
        "ci/a%c0%afb",
        "ci/%e0%80%ae%e0%80%ae/x",
        "ci/%ff",
        "ci/%80",
        "ci/a%c3",
        "ci/%ed%a0%80",
        // A `%` that is not an escape.
        "ci/a%",
        "ci/a%2",
        "ci/%",
        "ci/a%zz",
        "ci/a%%2e",
        // Double encoding: decoded once it is a literal `%`, which keys cannot hold.
        "ci/%252e%252e/x",
        "ci/%25",
        "ci/a%252F..%252Fb",
        "ci/%2525",
        // Characters outside the key alphabet.
        "ci/caf%C3%A9",
        "ci/a%20b",
        "ci/a;b",
        "ci/a:b",
        "ci/a%7Cb",
        "ci/a%0Ab",
        "ci/a%0D%0AX-Injected:%201",
        // Empty names and segments.
        "ci/",
        "ci//a",
        "ci/a/",
        "ci/a//b",
        "/k",
        "ci",
        // Namespaces: escapes are never decoded there, case and charset are strict.
        "c%69/k",
        "CI/k",
        "ci.x/k",
        "-ci/k",
        "ci%2Fk",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    targets.push(format!("{long_ns}/k"));
    targets.push(format!("ci/{long_key}"));
    targets.push(format!("ci/{long_escaped_key}"));
    targets.push(format!("ci/a/{}", "b/".repeat(300)));
    targets
}

/// One request over a fresh connection; returns the status code and the body.
fn raw(addr: &str, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Every file and directory under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out
}

fn namespaces(addr: &str) -> serde_json::Value {
    let (status, body) = raw(addr, "GET", "/api/v1/namespaces", b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["namespaces"].clone()
}

#[test]
fn hostile_names_are_400_with_a_reason_and_create_nothing() {
    let srv = Larderd::start(&[]);
    let before = tree(&srv.data_dir);
    let mut failures = Vec::new();
    for target in hostile_targets() {
        let path = format!("{PREFIX}{target}");
        for method in ["PUT", "POST", "GET", "HEAD", "DELETE"] {
            let body: &[u8] = if matches!(method, "PUT" | "POST") {
                b"poison"
            } else {
                b""
            };
            let (status, reason) = raw(&srv.addr, method, &path, body);
            let one_line = reason.trim_end_matches('\n');
            let ok = status == 400
                && (method == "HEAD"
                    || (one_line.starts_with("invalid ") && !one_line.contains('\n')));
            if !ok {
                failures.push(format!("{method} {path}: {status} {reason:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} hostile requests were not a 400 with a one-line reason:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        tree(&srv.data_dir),
        before,
        "a hostile request left files behind"
    );
    assert_eq!(namespaces(&srv.addr), serde_json::json!([]));

    // The two checks above can see a write: a valid PUT shows up in both.
    let (status, _) = raw(&srv.addr, "PUT", &format!("{PREFIX}ci/a/b"), b"fine");
    assert_eq!(status, 201);
    assert_ne!(tree(&srv.data_dir), before);
    assert_eq!(namespaces(&srv.addr)[0]["name"], "ci");
}

#[test]
fn names_at_the_limits_are_accepted() {
    let srv = Larderd::start(&[]);
    let ns64 = "n".repeat(64);
    let key512 = "k".repeat(512);
    let escaped512 = "%6B".repeat(512);
    for target in [
        format!("{ns64}/k"),
        format!("ci/{key512}"),
        format!("ci/{escaped512}"),
        "ci/...".to_owned(),
        "ci/.hidden/..x/x..".to_owned(),
        "ci/a%2Fb".to_owned(),
        "ci/%7E~".to_owned(),
    ] {
        let path = format!("{PREFIX}{target}");
        let (status, body) = raw(&srv.addr, "PUT", &path, b"ok");
        assert!(
            status == 201 || status == 200,
            "PUT {path}: {status} {body}"
        );
        let (status, body) = raw(&srv.addr, "GET", &path, b"");
        assert_eq!((status, body.as_str()), (200, "ok"), "GET {path}");
    }
}

//! The README's promises, checked against the real binary: its curl examples produce the
//! statuses printed beside them, and `larderd` without arguments serves the embedded default.

use larder_testkit::Larderd;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap()
}

#[test]
fn readme_curl_examples_work_as_printed() {
    let text = readme();
    let section = text
        .split("## HTTP API by example")
        .nth(1)
        .expect("example section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let expected: Vec<&str> = block
        .lines()
        .filter_map(|l| l.strip_prefix("# HTTP/1.1 "))
        .collect();
    assert!(expected.len() >= 10, "the examples print their statuses");

    let srv = Larderd::start(&[]);
    let script = block.replace("127.0.0.1:8080", &srv.addr);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "examples failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A ranged body has no trailing newline, so a status line may start mid-line.
    let statuses: Vec<String> = stdout
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|s| s.lines().next().unwrap_or("").trim_end().to_string())
        .collect();
    assert_eq!(statuses, expected, "statuses in order:\n{stdout}");
}

#[test]
fn larderd_without_arguments_serves_the_embedded_default() {
    if std::net::TcpListener::bind("127.0.0.1:8080").is_err() {
        eprintln!(
            "SKIPPED larderd_without_arguments_serves_the_embedded_default: 127.0.0.1:8080 is in use"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(larder_testkit::binary("larderd"))
        .current_dir(dir.path())
        .env_remove("LARDER_LISTEN")
        .env_remove("LARDER_DATA_DIR")
        .env_remove("LARDER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        line.trim_end(),
        "larderd listening on http://127.0.0.1:8080"
    );
    assert!(
        dir.path().join("larder-data/objects").is_dir(),
        "disk tier in ./larder-data"
    );
}

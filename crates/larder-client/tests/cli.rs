//! End-to-end tests of the `larder` CLI against a real `larderd`.
//!
//! They run the built binaries as a user would, so they cover argument parsing, exit codes and
//! messages as well as the library, and they check what scripts depend on: stdout carries only
//! data, exit 2 means "not found", and a failed download leaves no file behind.

mod common;

use common::{data, dead_url, dir_entries, etag_of, larder};
use larder_proto::ETag;
use larder_testkit::{Larderd, binary};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

#[test]
fn put_and_get_round_trip_from_file_and_stdin() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let dir = tempfile::tempdir().unwrap();
    for (i, len) in [0usize, 1, (1 << 20) + 3].into_iter().enumerate() {
        let body = data(len, i as u64);
        let want = etag_of(&body);

        let src = dir.path().join(format!("src-{len}"));
        std::fs::write(&src, &body).unwrap();
        let key_file = format!("file/{len}");
        let run = larder(&url, &["put", "ci", &key_file, src.to_str().unwrap()], None).ok();
        assert_eq!(
            run.stdout_text(),
            format!("{want}\n"),
            "put prints the ETag only"
        );

        let key_stdin = format!("stdin/{len}");
        let run = larder(&url, &["put", "ci", &key_stdin], Some(&body)).ok();
        assert_eq!(run.stdout_text(), format!("{want}\n"));
        let key_dash = format!("dash/{len}");
        larder(&url, &["put", "ci", &key_dash, "-"], Some(&body)).ok();

        for key in [&key_file, &key_stdin, &key_dash] {
            let run = larder(&url, &["get", "ci", key], None).ok();
            assert!(
                run.stdout == body,
                "stdout of get ci/{key} differs ({} bytes)",
                run.stdout.len()
            );
            let run = larder(&url, &["get", "ci", key, "-o", "-"], None).ok();
            assert!(run.stdout == body, "get -o - of ci/{key} differs");

            let out = dir.path().join("out").join(key.replace('/', "_"));
            std::fs::create_dir_all(out.parent().unwrap()).unwrap();
            let run = larder(&url, &["get", "ci", key, "-o", out.to_str().unwrap()], None).ok();
            assert!(
                run.stdout.is_empty(),
                "nothing on stdout when writing a file"
            );
            assert!(
                std::fs::read(&out).unwrap() == body,
                "file from get ci/{key} differs"
            );
        }
    }
    // Staging files never outlive a download.
    let leftovers: Vec<_> = dir_entries(&dir.path().join("out"))
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn get_replaces_an_existing_file_and_quiet_silences_status() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("artifact.bin");
    std::fs::write(&out, b"old contents that are longer than the new ones").unwrap();
    larder(&url, &["put", "ci", "a", "-"], Some(b"new")).ok();
    let run = larder(
        &url,
        &["--quiet", "get", "ci", "a", "-o", out.to_str().unwrap()],
        None,
    )
    .ok();
    assert_eq!(run.stderr, "");
    assert_eq!(std::fs::read(&out).unwrap(), b"new");
    assert_eq!(dir_entries(dir.path()), ["artifact.bin"]);
    let run = larder(&url, &["get", "ci", "a", "-o", out.to_str().unwrap()], None).ok();
    assert!(run.stderr.contains("verified"), "{}", run.stderr);
}

#[test]
fn get_of_a_missing_key_exits_2_and_creates_no_file() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.bin");
    let run = larder(
        &url,
        &["get", "ci", "foo", "-o", out.to_str().unwrap()],
        None,
    )
    .fails(2, "ci/foo not found");
    assert!(run.stdout.is_empty());
    assert!(
        dir_entries(dir.path()).is_empty(),
        "no file, not even a temporary one"
    );
    larder(&url, &["get", "ci", "foo"], None).fails(2, "ci/foo not found");
    larder(&url, &["stat", "ci", "foo"], None).fails(2, "ci/foo not found");
}

#[test]
fn if_none_match_creates_only() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let run = larder(&url, &["put", "--if-none-match", "ci", "k"], Some(b"first")).ok();
    assert!(run.stderr.contains("(new)"), "{}", run.stderr);
    let first = etag_of(b"first");
    let run = larder(
        &url,
        &["put", "--if-none-match", "ci", "k"],
        Some(b"second"),
    )
    .fails(1, "precondition failed");
    assert!(
        run.stderr.contains(&first),
        "names the current ETag: {}",
        run.stderr
    );
    assert!(run.stderr.contains("already exists"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert_eq!(
        larder(&url, &["get", "ci", "k"], None).ok().stdout,
        b"first"
    );
}

#[test]
fn if_match_is_compare_and_swap() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let v1 = larder(&url, &["put", "ci", "k"], Some(b"v1"))
        .ok()
        .stdout_text()
        .trim()
        .to_string();
    // Both the bare form that put prints and the quoted header form are accepted.
    let quoted = format!("\"{v1}\"");
    let run = larder(
        &url,
        &["put", "--if-match", &quoted, "ci", "k"],
        Some(b"v2"),
    )
    .ok();
    assert!(run.stderr.contains("(replaced)"), "{}", run.stderr);
    let v2 = run.stdout_text().trim().to_string();
    assert_eq!(v2, etag_of(b"v2"));

    let run = larder(&url, &["put", "--if-match", &v1, "ci", "k"], Some(b"v3"))
        .fails(1, "precondition failed");
    assert!(
        run.stderr.contains(&format!("current ETag is \"{v2}\"")),
        "{}",
        run.stderr
    );
    assert_eq!(larder(&url, &["get", "ci", "k"], None).ok().stdout, b"v2");

    larder(
        &url,
        &["put", "--if-match", &v2, "ci", "missing"],
        Some(b"x"),
    )
    .fails(1, "does not exist");
    larder(&url, &["put", "--if-match", "nope", "ci", "k"], Some(b"x"))
        .fails(1, "invalid --if-match \"nope\"");
    larder(
        &url,
        &["put", "--if-match", &v2, "--if-none-match", "ci", "k"],
        Some(b"x"),
    )
    .fails(1, "cannot be used with");
}

#[test]
fn stat_prints_validators_as_text_and_json() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let body = data(5000, 7);
    larder(
        &url,
        &[
            "put",
            "--content-type",
            "text/plain",
            "--ttl",
            "30m",
            "ci",
            "dir/obj.txt",
        ],
        Some(&body),
    )
    .ok();

    let text = larder(&url, &["stat", "ci", "dir/obj.txt"], None)
        .ok()
        .stdout_text();
    let etag = etag_of(&body);
    assert!(text.contains(&format!("etag:          {etag}\n")), "{text}");
    assert!(text.contains("size:          5000 (4.9 KiB)\n"), "{text}");
    assert!(text.contains("last-modified: "), "{text}");
    assert!(text.contains(" GMT\n"), "{text}");
    assert!(text.contains("content-type:  text/plain\n"), "{text}");

    let json = larder(&url, &["stat", "--json", "ci", "dir/obj.txt"], None)
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_slice(&json).expect("stat --json is JSON");
    assert_eq!(v["namespace"], "ci");
    assert_eq!(v["key"], "dir/obj.txt");
    assert_eq!(v["etag"], etag.as_str());
    assert_eq!(v["size"], 5000);
    assert_eq!(v["content_type"], "text/plain");
    let modified = v["last_modified"].as_str().expect("last_modified");
    assert!(httpdate::parse_http_date(modified).is_ok(), "{modified}");
}

#[test]
fn rm_then_get_exits_2() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    larder(&url, &["put", "ci", "gone"], Some(b"bye")).ok();
    let run = larder(&url, &["rm", "ci", "gone"], None).ok();
    assert!(run.stderr.contains("removed ci/gone"), "{}", run.stderr);
    larder(&url, &["get", "ci", "gone"], None).fails(2, "ci/gone not found");
    // Deleting is idempotent.
    larder(&url, &["rm", "ci", "gone"], None).ok();
}

#[test]
fn ls_lists_namespaces_with_counts_and_sizes() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    larder(&url, &["put", "builds", "a"], Some(&data(2048, 1))).ok();
    larder(&url, &["put", "builds", "b"], Some(&data(1024, 2))).ok();
    larder(&url, &["put", "ci", "c"], Some(b"x")).ok();

    let text = larder(&url, &["ls"], None).ok().stdout_text();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["NAMESPACE", "OBJECTS", "SIZE"], "{text}");
    assert!(lines.contains(&vec!["builds", "2", "3", "KiB"]), "{text}");
    assert!(lines.contains(&vec!["ci", "1", "1", "B"]), "{text}");

    let json = larder(&url, &["ls", "--json"], None).ok().stdout;
    let v: serde_json::Value = serde_json::from_slice(&json).expect("ls --json is JSON");
    let builds = v["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "builds")
        .expect("builds");
    assert_eq!(builds["objects"], 2);
    assert_eq!(builds["bytes"], 3072);
}

#[test]
fn a_server_that_is_not_running_gets_a_helpful_message() {
    let url = dead_url();
    for args in [
        &["get", "ci", "k"][..],
        &["put", "ci", "k", "-"],
        &["stat", "ci", "k"],
        &["rm", "ci", "k"],
        &["ls"],
    ] {
        let run = larder(&url, args, Some(b"x")).fails(1, &format!("cannot connect to {url}"));
        assert!(
            run.stderr
                .contains("is larderd running? set --url or LARDER_URL"),
            "{}",
            run.stderr
        );
    }
    // LARDER_URL is honoured when --url is absent.
    let out = Command::new(binary("larder"))
        .args(["stat", "ci", "k"])
        .env("LARDER_URL", &url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cannot connect to {url}")));
}

#[test]
fn invalid_names_are_refused_locally() {
    // A listener that must never see a connection.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cases: &[(&[&str], &str)] = &[
        (
            &["get", "ci", "a b"],
            "invalid key: only A-Z a-z 0-9 . _ ~ - and / are allowed (got \"a b\")",
        ),
        (
            &["put", "ci", "../etc/passwd", "-"],
            "invalid key: empty, '.' or '..' path segment",
        ),
        (
            &["stat", "ci", "a//b"],
            "invalid key: empty, '.' or '..' path segment",
        ),
        (
            &["rm", "Bad", "k"],
            "invalid namespace: must match [a-z0-9][a-z0-9_-]{0,63} (got \"Bad\")",
        ),
        (&["get", "ci", ""], "invalid key: empty"),
        (
            &["put", "--ttl", "5 minutes", "ci", "k", "-"],
            "--ttl: invalid duration",
        ),
        (
            &["put", "--content-type", "a\u{e9}", "ci", "k", "-"],
            "invalid content type",
        ),
    ];
    for (args, message) in cases {
        let run = larder(&url, args, Some(b"x")).fails(1, message);
        assert!(!run.stderr.contains("cannot connect"), "{}", run.stderr);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f");
    larder(
        &url,
        &["get", "ci", "a b", "-o", out.to_str().unwrap()],
        None,
    )
    .fails(1, "invalid key");
    assert!(dir_entries(dir.path()).is_empty());

    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a request was sent for an invalid name: {other:?}"),
    }
}

#[test]
fn usage_errors_exit_1_not_2() {
    let url = dead_url();
    larder(&url, &["get", "ci"], None).fails(1, "KEY");
    larder(&url, &["frobnicate"], None).fails(1, "unrecognized subcommand");
    let help = larder(&url, &["--help"], None).ok().stdout_text();
    assert!(
        help.contains("put") && help.contains("LARDER_URL"),
        "{help}"
    );
    // Every --url is checked, not only the first.
    larder(&url, &["--url", "not a url", "ls"], None).fails(1, "invalid server URL \"not a url\"");
    let out = Command::new(binary("larder"))
        .args(["--url", "not a url", "ls"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid server URL \"not a url\""));
}

#[test]
fn server_reasons_are_shown_for_refused_uploads() {
    let srv = Larderd::start(&["--max-object-size", "1KiB"]);
    let url = srv.url();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, data(4096, 3)).unwrap();
    let run = larder(&url, &["put", "ci", "big", big.to_str().unwrap()], None).fails(1, "413");
    assert!(
        run.stderr.contains("exceeds the maximum object size"),
        "{}",
        run.stderr
    );
    // The same limit applies when the size is not known up front.
    larder(&url, &["put", "ci", "big"], Some(&data(4096, 3))).fails(1, "maximum object size");
    larder(&url, &["get", "ci", "big"], None).fails(2, "not found");
    larder(
        &url,
        &[
            "put",
            "ci",
            "missing-file",
            dir.path().join("nope").to_str().unwrap(),
        ],
        None,
    )
    .fails(1, "cannot open");
}

/// A one-shot HTTP server whose body does not match its ETag, as a corrupting proxy would.
fn lying_server(body: &'static [u8], claimed: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nETag: \"{}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                ETag::of(claimed).as_str(),
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    url
}

#[test]
fn a_download_that_does_not_match_its_etag_is_refused() {
    let url = lying_server(b"tampered", b"original");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("artifact");
    let run =
        larder(&url, &["get", "ci", "k", "-o", out.to_str().unwrap()], None).fails(1, "digest");
    assert!(run.stderr.contains(&etag_of(b"original")), "{}", run.stderr);
    assert!(run.stderr.contains("was not written"), "{}", run.stderr);
    assert!(
        dir_entries(dir.path()).is_empty(),
        "no file and no temporary file"
    );
    // To stdout the bytes are already out, so the error says to discard them.
    larder(&url, &["get", "ci", "k"], None).fails(1, "discard what was written to stdout");
}

#[test]
fn put_json_summary_and_ttl() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let v: serde_json::Value = serde_json::from_slice(
        &larder(
            &url,
            &["put", "--json", "--ttl", "2h", "ci", "j"],
            Some(b"abc"),
        )
        .ok()
        .stdout,
    )
    .expect("put --json is JSON");
    assert_eq!(v["etag"], etag_of(b"abc").as_str());
    assert_eq!(v["size"], 3);
    assert_eq!(v["created"], true);
    assert_eq!(v["namespace"], "ci");
    assert_eq!(v["key"], "j");
    let etag = v["etag"].as_str().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_slice(
        &larder(
            &url,
            &["put", "--json", "--if-match", &etag, "ci", "j"],
            Some(b"abcd"),
        )
        .ok()
        .stdout,
    )
    .unwrap();
    assert_eq!(v["created"], false);
    assert_eq!(v["size"], 4);
    larder(&url, &["put", "--ttl", "0s", "ci", "j"], Some(b"x")).fails(1, "--ttl");
}

#[test]
fn url_before_and_after_the_subcommand_add_up() {
    let replicas: Vec<Larderd> = (0..3).map(|_| Larderd::start(&[])).collect();
    let urls: Vec<String> = replicas.iter().map(Larderd::url).collect();
    let body = common::data(900_001, 9);
    for u in &urls {
        larder(u, &["put", "ci", "k"], Some(&body)).ok();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let small = ["--chunk-size", "64KiB", "--concurrency", "4"];

    // `larder` puts the first --url before the subcommand; two more follow it.
    let mut args = vec!["get", "ci", "k", "-o", o, "--json", "--url", &urls[1]];
    args.extend(small);
    args.extend(["--url", &urls[2]]);
    let run = larder(&urls[0], &args, None).ok();
    assert!(std::fs::read(&out).unwrap() == body);
    let v = run.json();
    let used: Vec<&str> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["url"].as_str().unwrap())
        .collect();
    assert_eq!(used, urls, "{v}");
    assert!(
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["bytes"].as_u64().unwrap() > 0),
        "{v}"
    );

    // A --url after the subcommand replaces LARDER_URL, as one before it does.
    let dead = common::dead_url();
    let mut args = vec!["get", "ci", "k", "-o", o, "--json", "--url", &urls[2]];
    args.extend(small);
    let run = common::larder_env(&args, &[("LARDER_URL", &dead)]).ok();
    assert_eq!(run.json()["replicas"].as_array().unwrap().len(), 1);
    assert_eq!(run.json()["replicas"][0]["url"], urls[2].as_str());
    let run = common::larder_env(
        &[
            "--url", &urls[0], "get", "ci", "k", "-o", o, "--json", "--url", &urls[1],
        ],
        &[("LARDER_URL", &dead)],
    )
    .ok();
    let v = run.json();
    let used: Vec<&str> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["url"].as_str().unwrap())
        .collect();
    assert_eq!(used, [&urls[0], &urls[1]]);
}

//! The client's side of larderd's access control: `--token`/`LARDER_TOKEN` on every request of
//! every subcommand, clear errors and exit status 3 for 401 and 403, and a token that never
//! shows up in anything the client prints.
//!
//! Every request goes to a real larderd through a gate (the `common` proxy with a [`Gate`]) that
//! plays larderd's access-control layer: 401 with `WWW-Authenticate: Bearer` without a token or
//! with an unknown one, 403 for a read-only token asked to write, and otherwise forwards. The
//! gate records the `Authorization` header of every request it sees, so "every request" is
//! checked rather than assumed. End-to-end tests against larderd's own access control belong
//! with the server.

mod common;

use common::{Gate, Proxy, Request, Run, data, etag_of, larder_env as run};
use larder_testkit::Larderd;
use std::sync::{Arc, Mutex};

/// Long and distinctive, so a leak anywhere in the output is found by a plain substring search.
const FULL: &str = "lt_full_9c1f6e2ab7d04e3f8a5b";
const READER: &str = "lt_read_04b7e9d2c6f1a8e3b5c0";
const UNKNOWN: &str = "lt_nope_7e3a1c9f5b2d8e6a4c0f";

/// What the gate saw: each request line with its `Authorization` header (`None` when absent).
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct Gated {
    _srv: Larderd,
    proxy: Proxy,
    seen: Seen,
}

fn response(status: &str, extra: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    out.into_bytes()
}

fn gated() -> Gated {
    let srv = Larderd::start(&[]);
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    let gate: Gate = Arc::new(move |req: &Request| {
        let auth = req.header("authorization").map(str::to_string);
        log.lock()
            .unwrap()
            .push((format!("{} {}", req.method, req.path), auth.clone()));
        let head = req.method == "HEAD";
        let read_only = matches!(req.method.as_str(), "GET" | "HEAD");
        match auth.as_deref() {
            None => Some(response(
                "401 Unauthorized",
                "WWW-Authenticate: Bearer realm=\"larder\"\r\n",
                "a token is required\n",
                head,
            )),
            Some(v) if v == format!("Bearer {FULL}") => None,
            Some(v) if v == format!("Bearer {READER}") && read_only => None,
            Some(v) if v == format!("Bearer {READER}") => Some(response(
                "403 Forbidden",
                "",
                "the token has no write scope for namespace ci\n",
                head,
            )),
            // Echo what was sent, as a careless server might: the client must not repeat it.
            Some(v) => Some(response(
                "401 Unauthorized",
                "WWW-Authenticate: Bearer error=\"invalid_token\"\r\n",
                &format!("unknown token in {v}\n"),
                head,
            )),
        }
    });
    let proxy = Proxy::start_gated(&srv.url(), None, None, Some(gate));
    Gated {
        _srv: srv,
        proxy,
        seen,
    }
}

#[track_caller]
fn no_leak(run: &Run, token: &str) {
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        !out.contains(token) && !run.stderr.contains(token),
        "the token leaked:\nstdout: {out}\nstderr: {}",
        run.stderr
    );
}

#[test]
fn every_request_of_every_subcommand_carries_the_token() {
    let g = gated();
    let url = g.proxy.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let body = data(700_001, 5);
    let src = dir.path().join("src");
    std::fs::write(&src, &body).unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/a.txt"), b"alpha").unwrap();
    let out = dir.path().join("out");
    let restored = dir.path().join("restored");
    let (s, o, t, r) = (
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        tree.to_str().unwrap(),
        restored.to_str().unwrap(),
    );
    let small = ["--chunk-size", "64KiB", "--concurrency", "4"];
    let mut runs: Vec<Run> = Vec::new();
    // The token from the flag (before and after the subcommand) and from the environment.
    let by_flag = [
        vec!["--url", url, "--token", FULL, "put", "ci", "k", s, "--json"],
        vec!["--url", url, "stat", "ci", "k", "--json", "--token", FULL],
        vec!["--url", url, "--token", FULL, "ls", "--json"],
    ];
    for args in &by_flag {
        runs.push(run(args, &[]).ok());
    }
    let by_env: Vec<Vec<&str>> = vec![
        [
            vec!["--url", url, "get", "ci", "k", "-o", o, "--json"],
            small.to_vec(),
        ]
        .concat(),
        [
            vec!["--url", url, "get", "ci", "k", "-o", "-"],
            small.to_vec(),
        ]
        .concat(),
        vec!["--url", url, "save", "ci", "snap", t, "--json"],
        [
            vec!["--url", url, "restore", "ci", "snap", r, "--json"],
            small.to_vec(),
        ]
        .concat(),
        vec!["--url", url, "rm", "ci", "k"],
    ];
    for args in &by_env {
        runs.push(run(args, &[("LARDER_TOKEN", FULL)]).ok());
    }
    assert_eq!(runs[0].json()["etag"], etag_of(&body));
    assert!(std::fs::read(&out).unwrap() == body);
    assert!(runs[4].stdout == body);
    assert_eq!(
        std::fs::read(restored.join("sub/a.txt")).unwrap(),
        b"alpha".to_vec()
    );
    for r in &runs {
        no_leak(r, FULL);
    }
    let seen = g.seen.lock().unwrap();
    // put, HEAD, ls, 11 ranges + 11 ranges, save, a few ranges, delete.
    assert!(seen.len() >= 25, "only {} requests: {seen:?}", seen.len());
    for (what, auth) in seen.iter() {
        assert_eq!(
            auth.as_deref(),
            Some(format!("Bearer {FULL}").as_str()),
            "{what} was sent without the token"
        );
    }
    for m in ["PUT ", "HEAD ", "GET /api/v1/namespaces", "DELETE "] {
        assert!(
            seen.iter().any(|(w, _)| w.starts_with(m)),
            "no {m}: {seen:?}"
        );
    }
}

#[test]
fn no_token_and_an_unknown_token_are_told_apart_and_exit_3() {
    let g = gated();
    let url = g.proxy.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, b"payload").unwrap();
    let out = dir.path().join("out");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let restored = dir.path().join("restored");
    let r = restored.to_str().unwrap();

    for args in [
        vec!["--url", url, "put", "ci", "k", s],
        vec!["--url", url, "get", "ci", "k", "-o", o],
        vec!["--url", url, "stat", "ci", "k"],
        vec!["--url", url, "restore", "ci", "k", r],
        vec!["--url", url, "ls"],
    ] {
        let missing = run(&args, &[]).fails(3, "the server requires a token (401 Unauthorized");
        assert!(missing.stderr.contains("--token"), "{}", missing.stderr);

        let mut with = args.clone();
        with.extend(["--token", UNKNOWN]);
        let unknown = run(&with, &[]).fails(3, "the server did not accept the token");
        assert!(
            unknown.stderr.contains("401 Unauthorized"),
            "{}",
            unknown.stderr
        );
        no_leak(&unknown, UNKNOWN);
        let env = run(&args, &[("LARDER_TOKEN", UNKNOWN)])
            .fails(3, "the server did not accept the token");
        no_leak(&env, UNKNOWN);
    }
    // The gate did echo the token; the client blanked it out.
    let echoed = run(
        &["--url", url, "--token", UNKNOWN, "get", "ci", "k", "-o", o],
        &[],
    );
    assert!(
        echoed.stderr.contains("unknown token in Bearer ***"),
        "{}",
        echoed.stderr
    );
    assert!(
        !out.exists() && !restored.exists(),
        "nothing may be written"
    );
}

#[test]
fn a_token_without_the_scope_gets_403_and_exit_3() {
    let g = gated();
    let url = g.proxy.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, b"payload").unwrap();
    let s = src.to_str().unwrap();
    run(&["--url", url, "--token", FULL, "put", "ci", "k", s], &[]).ok();

    let put = run(&["--url", url, "--token", READER, "put", "ci", "k", s], &[]).fails(
        3,
        "PUT ci/k: the token is not allowed to do this (403 Forbidden: the token has no write \
         scope for namespace ci)",
    );
    assert!(put.stderr.contains("the write scope"), "{}", put.stderr);
    no_leak(&put, READER);
    run(&["--url", url, "--token", READER, "rm", "ci", "k"], &[])
        .fails(3, "DELETE ci/k: the token is not allowed to do this");
    // Reading is within its scopes.
    let got = run(
        &["--url", url, "--token", READER, "get", "ci", "k", "-o", "-"],
        &[],
    )
    .ok();
    assert_eq!(got.stdout, b"payload");
}

#[test]
fn help_documents_the_exit_statuses_and_never_shows_the_token() {
    let help = run(&["--help"], &[("LARDER_TOKEN", FULL)]).ok();
    let text = help.stdout_text();
    assert!(
        text.contains("--token <TOKEN>") && text.contains("LARDER_TOKEN"),
        "{text}"
    );
    assert!(
        text.contains("--ca-cert <FILE>") && text.contains("LARDER_CA_CERT"),
        "{text}"
    );
    assert!(text.contains("Exit status:"), "{text}");
    assert!(
        text.contains("3  refused by the server's access control: 401"),
        "{text}"
    );
    no_leak(&help, FULL);
    let sub = run(&["get", "--help"], &[("LARDER_TOKEN", FULL)]).ok();
    assert!(
        sub.stdout_text().contains("--token"),
        "{}",
        sub.stdout_text()
    );
    no_leak(&sub, FULL);
    // A token that cannot be sent is refused without quoting it.
    let bad = run(&["--token", "secret with spaces", "stat", "ci", "k"], &[])
        .fails(1, "the token has a character that cannot be sent");
    assert!(!bad.stderr.contains("secret"), "{}", bad.stderr);
    // One line, words separated by single spaces (a lost line continuation once left a run of
    // 18 spaces in this message).
    assert!(
        bad.stderr.contains("at position 7 (only visible ASCII") && !bad.stderr.contains("  "),
        "{}",
        bad.stderr
    );
}

#[test]
fn debug_output_of_a_client_never_shows_the_token() {
    let conn = larder_client::Connection {
        token: Some(larder_client::Token::new(FULL).unwrap()),
        ca_certs: Vec::new(),
    };
    let loaded = conn.load().unwrap();
    let client = larder_client::Client::with_connection("http://127.0.0.1:1", &loaded).unwrap();
    for text in [
        format!("{conn:?}"),
        format!("{loaded:?}"),
        format!("{client:?}"),
        format!("{:?}", conn.token.as_ref().unwrap()),
        conn.token.as_ref().unwrap().to_string(),
    ] {
        assert!(!text.contains(FULL), "leaked in {text}");
    }
}

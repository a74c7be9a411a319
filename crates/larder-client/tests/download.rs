//! Parallel pinned downloads (`larder get`) end to end: chunk boundaries, several replicas, an
//! object overwritten mid-download, a replica killed mid-download, and servers that break the
//! protocol in each way the client must catch. Correct behaviour is always checked against real
//! larderd processes; the fault servers of `common` stand in only where larderd would have to
//! misbehave.

mod common;

use common::{Fault, FaultServer, Hook, OnceFault, Proxy, data, dir_entries, etag_of, larder};
use larder_testkit::{Larderd, binary};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 * 1024;

/// Small chunks keep the tests fast while still producing many ranges.
const SMALL: &[&str] = &["--chunk-size", "64KiB", "--concurrency", "4"];

fn get_args<'a>(key: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["get", "ci", key, "-o", out];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args
}

fn put_file(url: &str, key: &str, path: &Path) -> String {
    larder(url, &["put", "ci", key, path.to_str().unwrap()], None)
        .ok()
        .stdout_text()
        .trim()
        .to_string()
}

#[test]
fn bytes_are_identical_at_every_chunk_boundary() {
    let srv = Larderd::start(&[]);
    let url = srv.url();
    let dir = tempfile::tempdir().unwrap();
    for (i, len) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5_000_003]
        .into_iter()
        .enumerate()
    {
        let body = data(len, 100 + i as u64);
        let src = dir.path().join(format!("src-{len}"));
        std::fs::write(&src, &body).unwrap();
        let key = format!("sizes/{len}");
        assert_eq!(put_file(&url, &key, &src), etag_of(&body));

        let out = dir.path().join(format!("out-{len}"));
        let run = larder(
            &url,
            &get_args(&key, out.to_str().unwrap(), &["--json"]),
            None,
        )
        .ok();
        assert!(
            std::fs::read(&out).unwrap() == body,
            "file of {len} bytes differs"
        );
        let v = run.json();
        assert_eq!(v["size"], len as u64);
        assert_eq!(v["etag"], etag_of(&body));
        assert_eq!(v["restarts"], 0);

        let mut args = vec!["get", "ci", &key, "-o", "-"];
        args.extend_from_slice(SMALL);
        let run = larder(&url, &args, None).ok();
        assert!(run.stdout == body, "stdout of {len} bytes differs");
    }
    // Large chunks and a single connection take the same path.
    let body = data(5_000_003, 7);
    let src = dir.path().join("one");
    std::fs::write(&src, &body).unwrap();
    put_file(&url, "one", &src);
    let out = dir.path().join("one-out");
    larder(
        &url,
        &[
            "get",
            "ci",
            "one",
            "-o",
            out.to_str().unwrap(),
            "--concurrency",
            "1",
            "--chunk-size",
            "1MiB",
        ],
        None,
    )
    .ok();
    assert!(std::fs::read(&out).unwrap() == body);
    // Without the flush (the environment form a CI runner would set) the bytes are the same.
    let fast = dir.path().join("one-no-sync");
    let mut args = get_args("one", fast.to_str().unwrap(), &[]);
    args.insert(0, "--url");
    args.insert(1, &url);
    common::larder_env(&args, &[("LARDER_NO_SYNC", "1")]).ok();
    assert!(std::fs::read(&fast).unwrap() == body);
    let leftovers: Vec<_> = dir_entries(dir.path())
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn a_download_spreads_over_every_replica() {
    // Identical bytes get identical ETags on every replica, so three independent larderds
    // holding the same upload are a faithful set of replicas.
    let replicas: Vec<Larderd> = (0..3).map(|_| Larderd::start(&[])).collect();
    let dir = tempfile::tempdir().unwrap();
    let body = data(3_000_017, 11);
    let src = dir.path().join("src");
    std::fs::write(&src, &body).unwrap();
    for r in &replicas {
        assert_eq!(put_file(&r.url(), "spread", &src), etag_of(&body));
    }
    let urls: Vec<String> = replicas.iter().map(Larderd::url).collect();
    let out = dir.path().join("out");
    // The comma form and the repeated form are the same list.
    let run = larder(
        &urls.join(","),
        &get_args("spread", out.to_str().unwrap(), &["--json"]),
        None,
    )
    .ok();
    assert!(std::fs::read(&out).unwrap() == body);
    let v = run.json();
    let per_replica: Vec<u64> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(per_replica.len(), 3, "{v}");
    assert!(per_replica.iter().all(|&b| b > 0), "{per_replica:?}");
    assert_eq!(per_replica.iter().sum::<u64>(), body.len() as u64);

    let out2 = dir.path().join("out2");
    let mut args = vec!["--url", &urls[1], "--url", &urls[2]];
    args.extend(get_args("spread", out2.to_str().unwrap(), &["--json"]));
    let run = larder(&urls[0], &args, None).ok();
    assert!(std::fs::read(&out2).unwrap() == body);
    assert_eq!(run.json()["replicas"].as_array().unwrap().len(), 3);
}

#[test]
fn ranges_stuck_on_a_slow_replica_are_hedged_to_another() {
    // The same larderd twice: directly, and behind a proxy that trickles every body at 32 KiB/s
    // (a replica reading through from a slow S3, say), so a 64 KiB range there takes 2 s
    // while the direct one answers in milliseconds.
    let srv = Larderd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let body = data(2 * 1024 * 1024 + 17, 41);
    let src = dir.path().join("src");
    std::fs::write(&src, &body).unwrap();
    put_file(&srv.url(), "hedged", &src);
    let slow = Proxy::start(&srv.url(), Some(32 * 1024), None);
    let out = dir.path().join("out");
    let mut args = vec!["--url", &slow.url];
    args.extend(get_args("hedged", out.to_str().unwrap(), &["--json"]));
    let run = larder(&srv.url(), &args, None).ok();
    assert!(std::fs::read(&out).unwrap() == body);
    let v = run.json();
    let (hedged, won) = (
        v["hedged"].as_u64().unwrap(),
        v["hedges_won"].as_u64().unwrap(),
    );
    // Round-robin sends every other range to the slow replica; each is asked again from the
    // direct one once it takes 3 × the median (at least 200 ms) and the direct answer wins.
    assert!(won >= 1 && hedged >= won, "{v}");
    // Once outpaced, the slow replica gets no new ranges for a while: far fewer hedges than
    // its round-robin share of 16 ranges (every one of them was hedged before steering).
    assert!(hedged <= 8, "{v}");
    assert_eq!(v["retries"], 0, "a slow replica is not a failed one: {v}");

    // One replica: nothing to hedge to.
    let single = dir.path().join("single");
    let run = larder(
        &srv.url(),
        &get_args("hedged", single.to_str().unwrap(), &["--json"]),
        None,
    )
    .ok();
    assert_eq!(run.json()["hedged"], 0);
}

/// Runs `larder put` directly against larderd (never through the proxy).
fn put_bytes(url: &str, key: &str, body: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("v");
    std::fs::write(&src, body).unwrap();
    let out = Command::new(binary("larder"))
        .args(["--url", url, "--quiet", "put", "ci", key])
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_overwrite_mid_download_restarts_and_yields_one_revision() {
    let srv = Larderd::start(&[]);
    let upstream = srv.url();
    let v1 = data(1_000_003, 21);
    let v2 = data(900_001, 22);
    put_bytes(&upstream, "k", &v1);
    // Request 1 is the discovery, 2.. are pinned ranges: the overwrite lands after a few ranges
    // of v1 were already fetched.
    let hook: Hook = {
        let (upstream, v2) = (upstream.clone(), v2.clone());
        Arc::new(move |n, _req| {
            if n == 4 {
                put_bytes(&upstream, "k", &v2);
            }
        })
    };
    let proxy = Proxy::start(&upstream, None, Some(hook));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = larder(
        &proxy.url,
        &get_args("k", out.to_str().unwrap(), &["--json"]),
        None,
    )
    .ok();
    let got = std::fs::read(&out).unwrap();
    assert!(got == v2, "not exactly v2 ({} bytes)", got.len());
    let v = run.json();
    assert_eq!(v["restarts"], 1);
    assert_eq!(v["etag"], etag_of(&v2));
    assert!(
        run.stderr.contains("changed during the download") && run.stderr.contains("restarting"),
        "{}",
        run.stderr
    );
    assert_eq!(dir_entries(dir.path()), ["out"]);
}

#[test]
fn an_object_that_keeps_changing_fails_after_bounded_restarts() {
    let srv = Larderd::start(&[]);
    let upstream = srv.url();
    put_bytes(&upstream, "k", &data(500_000, 1));
    // Every pinned range lands after yet another overwrite.
    let hook: Hook = {
        let upstream = upstream.clone();
        Arc::new(move |n, req| {
            if req.header("if-match").is_some() {
                put_bytes(&upstream, "k", &data(500_000, 1000 + n));
            }
        })
    };
    let proxy = Proxy::start(&upstream, None, Some(hook));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = larder(&proxy.url, &get_args("k", out.to_str().unwrap(), &[]), None)
        .fails(1, "changed during the download 4 times in a row");
    assert!(run.stderr.contains("was not written"), "{}", run.stderr);
    assert!(dir_entries(dir.path()).is_empty(), "nothing at the target");
}

#[test]
fn stdout_cannot_restart_once_bytes_are_out() {
    let srv = Larderd::start(&[]);
    let upstream = srv.url();
    put_bytes(&upstream, "k", &data(1_000_000, 31));
    let hook: Hook = {
        let upstream = upstream.clone();
        Arc::new(move |n, _| {
            if n == 6 {
                put_bytes(&upstream, "k", &data(1_000_000, 32));
            }
        })
    };
    let proxy = Proxy::start(&upstream, None, Some(hook));
    let mut args = vec!["get", "ci", "k", "-o", "-"];
    args.extend_from_slice(SMALL);
    larder(&proxy.url, &args, None).fails(1, "cannot be taken back; use -o FILE");
}

#[test]
fn a_replica_killed_mid_download_is_finished_by_the_others() {
    let mut replicas: Vec<Larderd> = (0..3).map(|_| Larderd::start(&[])).collect();
    let body = data(4_000_037, 41);
    for r in &replicas {
        put_bytes(&r.url(), "k", &body);
    }
    // Throttled so that the download takes a couple of seconds and the kill lands inside it.
    let proxies: Vec<Proxy> = replicas
        .iter()
        .map(|r| Proxy::start(&r.url(), Some(512 << 10), None))
        .collect();
    let urls: Vec<&str> = proxies.iter().map(|p| p.url.as_str()).collect();
    let urls = urls.join(",");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_arg = out.to_str().unwrap().to_string();
    let runner = std::thread::spawn(move || {
        larder(
            &urls,
            &[
                "get",
                "ci",
                "k",
                "-o",
                &out_arg,
                "--chunk-size",
                "64KiB",
                "--concurrency",
                "6",
                "--json",
            ],
            None,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxies[1].requests.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "the download never reached replica 2"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    replicas[1].kill9();
    let run = runner.join().unwrap().ok();
    assert!(std::fs::read(&out).unwrap() == body);
    let v = run.json();
    let reps = v["replicas"].as_array().unwrap();
    assert!(reps[1]["failures"].as_u64().unwrap() >= 1, "{v}");
    assert!(reps[0]["bytes"].as_u64().unwrap() > 0 && reps[2]["bytes"].as_u64().unwrap() > 0);
    assert!(v["retries"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn a_diverged_replica_is_dropped_and_the_others_finish_without_a_restart() {
    // Three independent larderds stand for replicas of one cache; the third holds another
    // revision of the key (a replica that lags behind, or a stale local copy).
    let replicas: Vec<Larderd> = (0..3).map(|_| Larderd::start(&[])).collect();
    let pinned = data(2_000_003, 71);
    let other = data(2_000_003, 72);
    put_bytes(&replicas[0].url(), "k", &pinned);
    put_bytes(&replicas[1].url(), "k", &pinned);
    put_bytes(&replicas[2].url(), "k", &other);
    let urls: Vec<String> = replicas.iter().map(Larderd::url).collect();
    let dir = tempfile::tempdir().unwrap();

    // The first URL answers the discovery, so the pin is `pinned`; replica 3 gets ranges too
    // (round robin) and answers 412 to each.
    let out = dir.path().join("out");
    let run = larder(
        &urls.join(","),
        &get_args("k", out.to_str().unwrap(), &["--json"]),
        None,
    )
    .ok();
    assert!(
        std::fs::read(&out).unwrap() == pinned,
        "not the pinned bytes"
    );
    let v = run.json();
    assert_eq!(v["restarts"], 0, "a diverged replica must not restart: {v}");
    assert_eq!(v["etag"], etag_of(&pinned));
    let reps = v["replicas"].as_array().unwrap();
    assert_eq!(reps[2]["diverged"], true, "{v}");
    assert_eq!(reps[2]["bytes"], 0, "{v}");
    assert_eq!(reps[0]["diverged"], false, "{v}");
    assert_eq!(reps[1]["diverged"], false, "{v}");
    assert!(reps[0]["bytes"].as_u64().unwrap() > 0 && reps[1]["bytes"].as_u64().unwrap() > 0);
    assert!(
        run.stderr
            .contains("finishing the download of ci/k from the other replicas"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("restarting"), "{}", run.stderr);

    // Both other replicas diverged: the discovery replica alone still serves the pin.
    put_bytes(&replicas[1].url(), "k", &other);
    let out2 = dir.path().join("out2");
    let run = larder(
        &urls.join(","),
        &get_args("k", out2.to_str().unwrap(), &["--json"]),
        None,
    )
    .ok();
    assert!(std::fs::read(&out2).unwrap() == pinned);
    let v = run.json();
    assert_eq!(v["restarts"], 0, "{v}");
    assert_eq!(v["replicas"][0]["bytes"], pinned.len() as u64, "{v}");
    assert_eq!(v["replicas"][1]["diverged"], true, "{v}");
    assert_eq!(v["replicas"][2]["diverged"], true, "{v}");
}

#[test]
fn when_no_replica_left_serves_the_pin_the_download_restarts() {
    // The discovery replica pins v1 and dies mid-download; the only other replica holds v2 and
    // was dropped as diverged. Nobody can finish v1, so a fresh discovery pins v2.
    let mut replicas: Vec<Larderd> = (0..2).map(|_| Larderd::start(&[])).collect();
    let v1 = data(2_000_003, 81);
    let v2 = data(1_500_001, 82);
    put_bytes(&replicas[0].url(), "k", &v1);
    put_bytes(&replicas[1].url(), "k", &v2);
    // Throttled so that the kill lands inside the download.
    let proxies: Vec<Proxy> = replicas
        .iter()
        .map(|r| Proxy::start(&r.url(), Some(512 << 10), None))
        .collect();
    let urls = format!("{},{}", proxies[0].url, proxies[1].url);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_arg = out.to_str().unwrap().to_string();
    let runner = std::thread::spawn(move || {
        larder(
            &urls,
            &get_args("k", &out_arg, &["--json", "--retries", "2"]),
            None,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxies[0].requests.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the download never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    replicas[0].kill9();
    let run = runner.join().unwrap().ok();
    let got = std::fs::read(&out).unwrap();
    assert!(got == v2, "not exactly v2 ({} bytes)", got.len());
    let v = run.json();
    assert_eq!(v["restarts"], 1, "{v}");
    assert_eq!(v["etag"], etag_of(&v2));
    assert!(
        run.stderr.contains("finishing the download") && run.stderr.contains("restarting"),
        "{}",
        run.stderr
    );
}

#[test]
fn an_unreachable_replica_among_live_ones_is_avoided() {
    let srv = Larderd::start(&[]);
    let body = data(700_001, 51);
    put_bytes(&srv.url(), "k", &body);
    let dead = common::dead_url();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = larder(
        &format!("{dead},{}", srv.url()),
        &get_args("k", out.to_str().unwrap(), &["--json"]),
        None,
    )
    .ok();
    assert!(std::fs::read(&out).unwrap() == body);
    let v = run.json();
    assert_eq!(v["replicas"][0]["bytes"], 0);
    assert_eq!(v["replicas"][1]["bytes"], body.len() as u64);
}

/// Runs a download from a fault server and expects a clean failure: exit 1, `message` in
/// stderr, and nothing in the output directory.
fn fails_cleanly(fault: Fault, message: &str) {
    let body = data(300_007, 61);
    let server = FaultServer::start(body, Some(fault));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = larder(
        &server.url,
        &get_args(
            "k",
            out.to_str().unwrap(),
            &["--retries", "1", "--idle-timeout", "1s"],
        ),
        None,
    )
    .fails(1, message);
    assert!(run.stderr.contains("was not written"), "{}", run.stderr);
    assert!(
        dir_entries(dir.path()).is_empty(),
        "{fault:?} left files behind: {:?}",
        dir_entries(dir.path())
    );
}

#[test]
fn a_wrong_content_length_is_never_written() {
    // Which range exhausts its retries first is a race; every one is off by one byte.
    fails_cleanly(Fault::WrongLength, "answered Content-Length ");
}

#[test]
fn a_wrong_content_range_is_never_written() {
    fails_cleanly(Fault::WrongContentRange, "answered Content-Range \"bytes ");
}

#[test]
fn a_wrong_etag_on_a_pinned_range_is_never_written() {
    fails_cleanly(Fault::WrongETag, "to a request pinned to");
}

#[test]
fn a_stalled_body_times_out() {
    let started = Instant::now();
    fails_cleanly(Fault::Stall, "the body stalled: no data for 1s");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_server_whose_etag_is_not_the_digest_is_caught() {
    fails_cleanly(Fault::Lie, "digest");
}

#[test]
fn transient_failures_are_retried() {
    for once in [
        OnceFault::Short,
        OnceFault::Reset,
        OnceFault::Unavailable,
        OnceFault::Stall,
    ] {
        let body = data(400_009, 71);
        let server = FaultServer::start(body.clone(), Some(Fault::Once(once)));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let run = larder(
            &server.url,
            &get_args(
                "k",
                out.to_str().unwrap(),
                &["--json", "--idle-timeout", "1s"],
            ),
            None,
        );
        let run = run.ok();
        assert!(std::fs::read(&out).unwrap() == body, "{once:?}");
        let v = run.json();
        // Ranges 2..=7 each failed once.
        assert!(v["retries"].as_u64().unwrap() >= 6, "{once:?}: {v}");
        assert_eq!(v["restarts"], 0, "{once:?}");
    }
}

#[test]
fn a_dead_server_still_gets_the_helpful_message() {
    let url = common::dead_url();
    let run = larder(&url, &["get", "ci", "k", "--retries", "1"], None)
        .fails(1, &format!("cannot connect to {url}"));
    assert!(run.stderr.contains("is larderd running?"), "{}", run.stderr);
}

#[test]
fn json_needs_an_output_file() {
    larder(&common::dead_url(), &["get", "ci", "k", "--json"], None)
        .fails(1, "--json needs -o FILE");
}

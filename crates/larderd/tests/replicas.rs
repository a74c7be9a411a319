//! Several `larderd` replicas sharing one bucket of a real S3 server (Ceph RGW, started by
//! `scripts/test.sh`): what one replica stores the others serve; a download pinned with
//! `If-Match` and spread over all replicas never mixes revisions while the key is overwritten;
//! replicas converge within the revalidation window; and S3 going away and coming back.
//!
//! Without `AWS_ENDPOINT_URL` / `S3_BUCKET` / credentials every test says SKIPPED.

use larder_testkit::{Larderd, TcpRelay, etag_of, get, pattern, s3};
use reqwest::{Client, StatusCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const WINDOW: &str = "1s";

fn replicas(n: usize, extra: &[&str]) -> Vec<Larderd> {
    let prefix = s3::unique_prefix("replica-test");
    let bucket = std::env::var("S3_BUCKET").unwrap();
    (0..n)
        .map(|_| {
            let mut args = vec![
                "--s3-bucket",
                &bucket,
                "--s3-prefix",
                &prefix,
                "--revalidate-after",
                WINDOW,
            ];
            args.extend_from_slice(extra);
            Larderd::start(&args)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_written_through_one_replica_is_served_identically_by_the_others() {
    if !s3::available("an_object_written_through_one_replica_is_served_identically_by_the_others") {
        return;
    }
    let rs = replicas(3, &[]);
    let http = Client::new();
    let data = pattern(20 << 20, 1);
    let r = http
        .put(rs[0].object_url("ci", "shared/blob"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    for (i, replica) in rs.iter().enumerate() {
        let (status, etag, body) = get(&http, &replica.object_url("ci", "shared/blob"), &[]).await;
        assert_eq!(status, StatusCode::OK, "replica {i}");
        assert_eq!(etag, etag_of(&data), "replica {i}: same ETag");
        assert!(body == data, "replica {i}: same bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_the_new_revision_within_the_revalidation_window() {
    if !s3::available("every_replica_serves_the_new_revision_within_the_revalidation_window") {
        return;
    }
    let rs = replicas(3, &[]);
    let http = Client::new();
    http.put(rs[0].object_url("ci", "conv"))
        .body("version one")
        .send()
        .await
        .unwrap();
    for r in &rs {
        assert_eq!(
            get(&http, &r.object_url("ci", "conv"), &[]).await.2,
            b"version one"
        );
    }
    http.put(rs[0].object_url("ci", "conv"))
        .body("version two")
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (i, r) in rs.iter().enumerate() {
        let (_, etag, body) = get(&http, &r.object_url("ci", "conv"), &[]).await;
        assert_eq!(
            body, b"version two",
            "replica {i} converged within the window"
        );
        assert_eq!(etag, etag_of(b"version two"));
    }
    http.post(format!("{}/invalidate", rs[1].object_url("ci", "conv")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        get(&http, &rs[1].object_url("ci", "conv"), &[]).await.2,
        b"version two",
        "invalidate drops only the local copy"
    );
    http.delete(rs[2].object_url("ci", "conv"))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for r in &rs {
        assert_eq!(
            get(&http, &r.object_url("ci", "conv"), &[]).await.0,
            StatusCode::NOT_FOUND
        );
    }
}

enum Trial {
    Complete(String),
    PreconditionFailed,
}

/// One download as the larder client does it: discover ETag and size, then fetch 8 chunks in
/// parallel, each pinned with `If-Match`, round-robin over the replicas. Returns what was
/// assembled, checked against its digest by the caller.
async fn pinned_download(http: &Client, urls: &[String], first: usize) -> (Trial, Option<Vec<u8>>) {
    let head = http.head(&urls[first % urls.len()]).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let etag = head.headers()["etag"].to_str().unwrap().to_string();
    let size: usize = head.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let chunk = size.div_ceil(8);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (http, url, etag) = (
                http.clone(),
                urls[(first + i) % urls.len()].clone(),
                etag.clone(),
            );
            tokio::spawn(async move {
                let (start, end) = (i * chunk, ((i + 1) * chunk).min(size) - 1);
                let range = format!("bytes={start}-{end}");
                let r = http
                    .get(url)
                    .header("if-match", &etag)
                    .header("range", range)
                    .send()
                    .await
                    .unwrap();
                match r.status() {
                    StatusCode::PARTIAL_CONTENT => {
                        assert_eq!(
                            r.headers()["etag"].to_str().unwrap(),
                            etag,
                            "a 206 carries the pinned ETag"
                        );
                        let body = r.bytes().await.unwrap();
                        assert_eq!(body.len(), end - start + 1, "a 206 is never short");
                        Some(body)
                    }
                    StatusCode::PRECONDITION_FAILED => None,
                    other => panic!("unexpected status {other} for a pinned range"),
                }
            })
        })
        .collect();
    let mut parts = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Some(p) => parts.push(p),
            None => return (Trial::PreconditionFailed, None),
        }
    }
    (Trial::Complete(etag), Some(parts.concat()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_parallel_downloads_over_three_replicas_never_mix_revisions_during_overwrites() {
    let test =
        "pinned_parallel_downloads_over_three_replicas_never_mix_revisions_during_overwrites";
    if !s3::available(test) {
        return;
    }
    let trials: usize = std::env::var("LARDER_REPLICA_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let size: usize = std::env::var("LARDER_REPLICA_OBJECT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
        << 20;
    let rs = replicas(3, &["--s3-reap-grace", "30s"]);
    let http = Client::new();
    let urls: Vec<String> = rs
        .iter()
        .map(|r| r.object_url("ci", "hot/snapshot"))
        .collect();
    let versions = [pattern(size, 1), pattern(size, 2)];
    let etags = [etag_of(&versions[0]), etag_of(&versions[1])];
    http.put(&urls[0])
        .body(versions[0].clone())
        .send()
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (http, url, stop, versions) = (
            http.clone(),
            urls[0].clone(),
            stop.clone(),
            versions.clone(),
        );
        tokio::spawn(async move {
            let mut writes = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .put(&url)
                    .body(versions[(writes + 1) % 2].clone())
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "overwrite failed: {}", r.status());
                writes += 1;
            }
            writes
        })
    };
    let (mut complete, mut refused, mut seen) = (0, 0, [0usize; 2]);
    for trial in 0..trials {
        match pinned_download(&http, &urls, trial).await {
            (Trial::Complete(etag), Some(bytes)) => {
                assert_eq!(
                    etag_of(&bytes),
                    etag,
                    "trial {trial}: the assembled bytes are exactly the pinned revision"
                );
                let which = etags
                    .iter()
                    .position(|e| *e == etag)
                    .expect("one of the two revisions");
                seen[which] += 1;
                complete += 1;
            }
            _ => refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    println!(
        "{test}: {trials} trials of {} MiB, {writes} overwrites: {complete} complete ({} old-pattern, {} new-pattern), {refused} restarted after 412, 0 mixed",
        size >> 20,
        seen[0],
        seen[1]
    );
    assert!(writes >= 2, "the key was overwritten during the trials");
    assert_eq!(complete + refused, trials);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_down_disk_hits_are_served_misses_get_503_and_service_resumes() {
    if !s3::available("with_s3_down_disk_hits_are_served_misses_get_503_and_service_resumes") {
        return;
    }
    let mut switch = TcpRelay::start(&s3::endpoint_addr(), None).await;
    let endpoint = switch.url();
    let bucket = std::env::var("S3_BUCKET").unwrap();
    let prefix = s3::unique_prefix("fault-test");
    let srv = Larderd::start(&[
        "--s3-bucket",
        &bucket,
        "--s3-prefix",
        &prefix,
        "--s3-endpoint",
        &endpoint,
        "--revalidate-after",
        "30s",
    ]);
    let http = Client::new();
    let url = |k: &str| srv.object_url("ci", k);
    http.put(url("hot"))
        .body("cached bytes")
        .send()
        .await
        .unwrap();
    let etag = etag_of(b"cached bytes");
    let ready = |http: Client, base: String| async move {
        http.get(format!("{base}/_readiness"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(ready(http.clone(), srv.url()).await, StatusCode::OK);

    switch.off();
    let (status, _, body) = get(&http, &url("hot"), &[("if-match", &etag)]).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, &b"cached bytes"[..]),
        "pinned disk hit"
    );
    let (status, _, body) = get(&http, &url("hot"), &[]).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, &b"cached bytes"[..]),
        "unpinned within the window"
    );
    for (key, headers) in [
        ("cold", vec![]),
        ("hot", vec![("if-match", etag_of(b"other"))]),
    ] {
        let started = Instant::now();
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, body) = get(&http, &url(key), &hdrs).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{key}: a miss with S3 down is 503, never 404 or 412"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{key}: answered in {:?}",
            started.elapsed()
        );
        assert!(
            String::from_utf8_lossy(&body).contains("S3"),
            "the reason names S3"
        );
    }
    assert_eq!(
        ready(http.clone(), srv.url()).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready while S3 is unreachable"
    );

    switch.on().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http.put(url("after")).body("back").send().await.unwrap();
        if r.status() == StatusCode::CREATED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service did not resume: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(&http, &url("after"), &[]).await.2, b"back");
    assert_eq!(ready(http, srv.url()).await, StatusCode::OK);
}

/// Regression, bug (a) of the original implementation: a small object was read from S3 with a
/// plain GET after a HEAD, so an overwrite in between sent the new bytes (and put them in the
/// disk tier) under the old ETag. Here one replica overwrites a small key in a loop while
/// another, with its local copy dropped before every read, serves it from S3: every response's
/// bytes must hash to the ETag it carries, and so must what the disk tier was filled with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_new_bytes_never_go_out_under_an_old_etag() {
    if !s3::available("regression_new_bytes_never_go_out_under_an_old_etag") {
        return;
    }
    let rs = replicas(2, &[]);
    let http = Client::new();
    let (writer_url, reader_url) = (
        rs[0].object_url("ci", "small"),
        rs[1].object_url("ci", "small"),
    );
    http.put(&writer_url)
        .body("revision 0")
        .send()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (http, url, stop) = (http.clone(), writer_url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                http.put(&url)
                    .body(format!("revision {n}"))
                    .send()
                    .await
                    .unwrap();
            }
            n
        })
    };
    for i in 0..150 {
        if i % 2 == 0 {
            http.post(format!("{reader_url}/invalidate"))
                .send()
                .await
                .unwrap();
        }
        let (status, etag, body) = get(&http, &reader_url, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            etag,
            etag_of(&body),
            "read {i}: bytes {:?} served under ETag {etag}",
            String::from_utf8_lossy(&body)
        );
    }
    stop.store(true, Ordering::Relaxed);
    assert!(
        writer.await.unwrap() > 10,
        "the key was overwritten while it was read"
    );
    // Whatever the fills left on the reader's disk is self-consistent too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, etag, _) = get(&http, &reader_url, &[("if-match", &etag_of(b"never"))]).await;
    assert_eq!(
        status,
        StatusCode::PRECONDITION_FAILED,
        "a 412 names the current revision"
    );
    let (_, etag, body) = get(&http, &reader_url, &[("if-match", &etag)]).await;
    assert_eq!(etag, etag_of(&body));
}

/// Regression, bug (b) of the original implementation: a `206` status line was written before
/// the lazy S3 GET ran, so when S3 answered 412 the client saw a truncated 206. A replica with
/// no local copy asked for a range pinned to a revision that S3 no longer has must answer 412
/// with the current ETag and no body — decided before any status line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_206_is_never_written_before_s3_has_decided() {
    if !s3::available("regression_a_206_is_never_written_before_s3_has_decided") {
        return;
    }
    let rs = replicas(2, &[]);
    let http = Client::new();
    let (a, b) = (
        rs[0].object_url("ci", "pinned"),
        rs[1].object_url("ci", "pinned"),
    );
    let old = pattern(3 << 20, 7);
    http.put(&a).body(old.clone()).send().await.unwrap();
    let old_etag = etag_of(&old);
    for round in 0..5u64 {
        let new = pattern(3 << 20, 100 + round);
        http.put(&a).body(new.clone()).send().await.unwrap();
        http.post(format!("{b}/invalidate")).send().await.unwrap();
        let r = http
            .get(&b)
            .header("if-match", &old_etag)
            .header("range", "bytes=1000-2000000")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED, "round {round}");
        assert_eq!(
            r.headers()["etag"].to_str().unwrap(),
            etag_of(&new),
            "the 412 names the current revision"
        );
        assert!(r.headers().get("content-range").is_none());
        let current = etag_of(&new);
        let r = http
            .get(&b)
            .header("if-match", &current)
            .header("range", "bytes=1000-2000000")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert!(
            r.bytes().await.unwrap() == new[1000..=2_000_000],
            "round {round}: the pinned range, whole"
        );
    }
}

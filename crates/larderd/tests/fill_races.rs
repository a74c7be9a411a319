//! Fills racing everything else, against real larderd replicas over a real S3 server (Ceph RGW,
//! started by scripts/test.sh): a replica copying an object from S3 into its disk tier while the
//! key is deleted, overwritten, or while its own disk runs full.
//!
//! The replica under test reaches S3 through a throttled relay, so that its fill of a 16 MiB
//! object takes seconds and the race can be staged deterministically; the other replica talks to
//! S3 directly. Without `AWS_ENDPOINT_URL` / `S3_BUCKET` / credentials every test says SKIPPED.

use larder_testkit::{Larderd, TcpRelay, etag_of, get, metric, pattern, s3};
use reqwest::{Client, StatusCode};
use std::path::Path;
use std::time::{Duration, Instant};

/// S3 → replica rate through the relay: a 16 MiB fill takes about 4 s.
const SLOW_LINK: u64 = 4 << 20;
const BIG: usize = 16 << 20;

/// The replica under test has a long revalidation window (60 s), so that a stale or resurrected
/// local copy would be served for the whole test if the fill bookkeeping let it in; the other
/// one a short one, to check convergence.
const LONG_WINDOW: &str = "60s";
const SHORT_WINDOW: &str = "1s";

fn replica(prefix: &str, window: &str, endpoint: Option<&str>) -> Larderd {
    let mut args = s3::replica_args(prefix);
    args.extend(["--revalidate-after".into(), window.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match endpoint {
        Some(url) => Larderd::start_with_env(&args, &[("AWS_ENDPOINT_URL", url)]),
        None => Larderd::start(&args),
    }
}

/// Starts an unpinned GET that starts the replica's fill, and reads its body in the background.
async fn start_fill(http: &Client, url: &str) {
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    tokio::spawn(async move {
        let _ = r.bytes().await;
    });
}

/// Waits until no fill is in flight on the replica: its spool files live in `DATA/tmp`.
async fn wait_for_fills_to_end(data_dir: &Path) {
    let tmp = data_dir.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut empty_in_a_row = 0;
    while empty_in_a_row < 3 {
        assert!(Instant::now() < deadline, "fills still running after 60 s");
        let busy = std::fs::read_dir(&tmp).unwrap().next().is_some();
        empty_in_a_row = if busy { 0 } else { empty_in_a_row + 1 };
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_while_its_fill_runs_stays_deleted() {
    let test = "a_key_deleted_while_its_fill_runs_stays_deleted";
    if !s3::available(test) {
        return;
    }
    let prefix = s3::unique_prefix(test);
    let relay = TcpRelay::start(&s3::endpoint_addr(), Some(SLOW_LINK)).await;
    let slow = replica(&prefix, LONG_WINDOW, Some(&relay.url()));
    let other = replica(&prefix, SHORT_WINDOW, None);
    let http = Client::new();
    let data = pattern(BIG, 1);
    let etag = etag_of(&data);
    let r = http
        .put(other.object_url("ci", "doomed"))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    start_fill(&http, &slow.object_url("ci", "doomed")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = http
        .delete(slow.object_url("ci", "doomed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let pinned = [("if-match", etag.as_str())];
    let url = slow.object_url("ci", "doomed");
    assert_eq!(get(&http, &url, &[]).await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&http, &url, &pinned).await.0, StatusCode::NOT_FOUND);

    wait_for_fills_to_end(&slow.data_dir).await;
    for round in 0..3 {
        assert_eq!(
            get(&http, &url, &[]).await.0,
            StatusCode::NOT_FOUND,
            "round {round}: an unpinned read after the fill ended brought the key back"
        );
        assert_eq!(
            get(&http, &url, &pinned).await.0,
            StatusCode::NOT_FOUND,
            "round {round}: a pinned read after the fill ended brought the key back"
        );
    }
    // Every other replica within its revalidation window.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let other_url = other.object_url("ci", "doomed");
    assert_eq!(get(&http, &other_url, &[]).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&http, &other_url, &pinned).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_go_backwards_when_an_older_fill_finishes_late() {
    let test = "reads_never_go_backwards_when_an_older_fill_finishes_late";
    if !s3::available(test) {
        return;
    }
    let prefix = s3::unique_prefix(test);
    let relay = TcpRelay::start(&s3::endpoint_addr(), Some(SLOW_LINK)).await;
    let slow = replica(&prefix, LONG_WINDOW, Some(&relay.url()));
    let other = replica(&prefix, SHORT_WINDOW, None);
    let http = Client::new();
    let url = slow.object_url("ci", "moving");
    let first = pattern(BIG, 2);
    http.put(other.object_url("ci", "moving"))
        .body(first)
        .send()
        .await
        .unwrap();
    start_fill(&http, &url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let second = pattern(64 << 10, 3);
    let r = http
        .put(other.object_url("ci", "moving"))
        .body(second.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (status, etag, body) = get(&http, &url, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        etag,
        etag_of(&second),
        "the replica revalidated and served the new revision"
    );
    assert!(body == second);

    wait_for_fills_to_end(&slow.data_dir).await;
    for round in 0..10 {
        let (status, etag, body) = get(&http, &url, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            etag,
            etag_of(&second),
            "round {round}: after serving the new revision the replica went back to the old one"
        );
        assert!(body == second);
    }
}

/// A small tmpfs mounted for the life of the test (needs root; the test says SKIPPED without).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_a_fill_costs_only_the_copy() {
    let test = "a_full_disk_during_a_fill_costs_only_the_copy";
    if !s3::available(test) {
        return;
    }
    let Some(small) = SmallDisk::mount(3 << 20) else {
        println!("SKIPPED {test}: cannot mount a tmpfs here (needs root)");
        return;
    };
    let prefix = s3::unique_prefix(test);
    let mut args = s3::replica_args(&prefix);
    args.extend(["--revalidate-after".into(), LONG_WINDOW.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let full = Larderd::start_in(&small.dir.path().join("data"), &args);
    let other = replica(&prefix, SHORT_WINDOW, None);
    let http = Client::new();
    let data = pattern(BIG, 4);
    let etag = etag_of(&data);
    http.put(other.object_url("ci", "big"))
        .body(data.clone())
        .send()
        .await
        .unwrap();

    // Whole reads and pinned ranges at once, all following the one fill that runs out of space.
    let url = full.object_url("ci", "big");
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let (http, url, etag) = (http.clone(), url.clone(), etag.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    get(&http, &url, &[]).await
                } else {
                    let range = format!("bytes={}-{}", i << 20, (10 << 20) - 1);
                    get(&http, &url, &[("if-match", &etag), ("range", &range)]).await
                }
            })
        })
        .collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let (status, got_etag, body) = reader.await.unwrap();
        assert_eq!(got_etag, etag, "reader {i}");
        if i % 2 == 0 {
            assert_eq!(status, StatusCode::OK, "reader {i}");
            assert!(
                body == data,
                "reader {i}: every byte, although the disk filled up"
            );
        } else {
            let start = i << 20;
            assert_eq!(status, StatusCode::PARTIAL_CONTENT, "reader {i}");
            assert!(body == data[start..10 << 20], "reader {i}: the exact range");
        }
    }
    wait_for_fills_to_end(&full.data_dir).await;
    let metrics = full.scrape(&http).await;
    assert!(
        metric(&metrics, "larder_fills_total{result=\"failed\"}").unwrap_or(0.0) >= 1.0,
        "the fill that ran out of space is counted as failed:\n{metrics}"
    );
    // And still served afterwards, from S3.
    let (status, _, body) = get(&http, &url, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);

    // A write through the full replica: S3 takes it, the local copy is given up.
    let update = pattern(BIG, 5);
    let r = http.put(&url).body(update.clone()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The other replica may serve its copy of the first revision for its revalidation window
    // (one second) after it last asked S3; then it must see the update.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, got, body) = get(&http, &other.object_url("ci", "big"), &[]).await;
        assert_eq!(status, StatusCode::OK);
        if got == etag_of(&update) {
            assert!(body == update);
            break;
        }
        assert_eq!(got, etag, "either revision, never another");
        assert!(
            Instant::now() < deadline,
            "the other replica never saw the update S3 took"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A cold read through the S3 tier streams: its first bytes leave larderd as soon as they
/// arrive from S3, not after a whole read part (8 MiB by default) has been collected or spooled
/// to disk. Seen through the throttled relay: when the client has its first body bytes, the
/// relay has carried far less than one part; and the whole body is the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_read_gets_its_first_bytes_before_a_whole_part_arrives_from_s3() {
    let test = "a_cold_read_gets_its_first_bytes_before_a_whole_part_arrives_from_s3";
    if !s3::available(test) {
        return;
    }
    const PART: u64 = 8 << 20;
    let prefix = s3::unique_prefix(test);
    // 1 MiB/s: a whole part takes 8 s to come through, so the check below has seconds of
    // margin for a busy machine, and the 9 MiB body (one part and a bit) about 9 s in all.
    let relay = TcpRelay::start(&s3::endpoint_addr(), Some(1 << 20)).await;
    let slow = replica(&prefix, LONG_WINDOW, Some(&relay.url()));
    let other = replica(&prefix, SHORT_WINDOW, None);
    let http = Client::new();
    let data = pattern(9 << 20, 9);
    let r = http
        .put(other.object_url("ci", "cold"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let before = relay.bytes_down();
    let mut r = http
        .get(slow.object_url("ci", "cold"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let first = r.chunk().await.unwrap().expect("a body");
    let carried = relay.bytes_down() - before;
    assert!(
        carried < PART * 3 / 4,
        "the first {} body bytes reached the client only after {carried} bytes came from S3 \
         (a read part is {PART})",
        first.len()
    );
    let mut body = first.to_vec();
    while let Some(chunk) = r.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert!(body == data, "the streamed body differs from the object");
}

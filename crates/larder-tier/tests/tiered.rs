//! The tiered cache (disk over S3): the whole conformance suite, and the behaviour only a tier
//! made of tiers has — write-through, fills, pinned reads served locally, convergence of
//! replicas within the revalidation window, and service while S3 is down.
//!
//! The S3 tests need a real server (`scripts/s3-server.sh`, started by `scripts/test.sh`);
//! without one they say SKIPPED. The conformance suite also runs on disk over disk, which needs
//! nothing and checks the composition itself.

use larder_proto::{ByteRange, ETag, Key, Namespace, ReadConditions, ReadOutcome};
use larder_tier::conformance::{TierRef, pattern, upload};
use larder_tier::{
    AtHandBody, DiskConfig, DiskTier, ErrorKind, GetOptions, GetResponse, NamespaceUsage,
    PutOptions, PutResult, S3Config, S3Tier, Tier, TierError, TierStats, TieredTier, UploadStream,
    body_to_bytes,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn s3_config(test: &str) -> Option<S3Config> {
    // Credentials are required too: without them the AWS client would ask the instance
    // metadata service, which tests must never reach.
    let configured = std::env::var_os("AWS_ENDPOINT_URL").is_some()
        && std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
    let Some(mut config) = S3Config::from_env().filter(|_| configured) else {
        println!("SKIPPED {test}: no S3 server (run scripts/s3-server.sh)");
        return None;
    };
    config.prefix = format!("larder-tiered-test/{:016x}", rand::random::<u64>());
    config.read_part_size = 1 << 20;
    Some(config)
}

async fn disk() -> Arc<DiskTier> {
    let dir = larder_tier::conformance::lasting_dir();
    Arc::new(DiskTier::open(DiskConfig::new(dir)).await.unwrap())
}

fn tiered(local: Arc<DiskTier>, remote: Arc<dyn Tier>, window: Duration) -> Arc<TieredTier> {
    Arc::new(TieredTier::new(local, remote, window))
}

mod disk_over_disk {
    use super::*;
    larder_tier::conformance_suite!({
        let t: TierRef = tiered(disk().await, disk().await, Duration::from_secs(5));
        t
    });
}

mod disk_over_s3 {
    use super::*;
    larder_tier::conformance_suite!({
        let Some(config) = s3_config("conformance") else {
            return;
        };
        let remote = Arc::new(S3Tier::connect(config).await.unwrap());
        let t: TierRef = tiered(disk().await, remote, Duration::from_secs(5));
        t
    });
}

fn ns() -> Namespace {
    Namespace::parse("tiered").unwrap()
}

fn key(s: &str) -> Key {
    Key::parse(s).unwrap()
}

/// What a read got: its outcome, the revision and the bytes, or the kind of failure.
type ReadResult = Result<(ReadOutcome, ETag, Vec<u8>), ErrorKind>;

async fn read(t: &dyn Tier, k: &Key, conditions: ReadConditions) -> ReadResult {
    let r = t
        .get(
            &ns(),
            k,
            GetOptions {
                conditions,
                head: false,
            },
        )
        .await
        .map_err(|e| e.kind)?;
    let body = match r.body {
        Some(b) => body_to_bytes(b).await.unwrap(),
        None => Vec::new(),
    };
    Ok((r.outcome, r.meta.etag, body))
}

async fn local_etag(local: &DiskTier, k: &Key) -> Option<ETag> {
    local
        .get(
            &ns(),
            k,
            GetOptions {
                head: true,
                ..Default::default()
            },
        )
        .await
        .ok()
        .map(|r| r.meta.etag)
}

async fn wait_for_fill(local: &DiskTier, k: &Key, etag: &ETag) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while local_etag(local, k).await.as_ref() != Some(etag) {
        assert!(Instant::now() < deadline, "fill of {k} did not complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_through_to_both_tiers_with_one_etag() {
    let Some(config) = s3_config("writes_go_through_to_both_tiers_with_one_etag") else {
        return;
    };
    let remote = Arc::new(S3Tier::connect(config).await.unwrap());
    let local = disk().await;
    let t = tiered(local.clone(), remote.clone(), Duration::from_secs(5));
    let data = pattern(3 << 20, 1);
    let put = t
        .put(
            &ns(),
            &key("w"),
            upload(data.clone()),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(local_etag(&local, &key("w")).await, Some(put.etag.clone()));
    let (_, etag, body) = read(remote.as_ref(), &key("w"), ReadConditions::default())
        .await
        .unwrap();
    assert_eq!(etag, put.etag);
    assert!(body == data);
}

async fn last_modified(t: &dyn Tier, k: &Key) -> std::time::SystemTime {
    t.get(
        &ns(),
        k,
        GetOptions {
            head: true,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .meta
    .last_modified
}

/// Found by REDbot on a replica reading through S3: the disk tier stamped a revision with the
/// time its upload started (or, for a fill, the time of the fill) and S3 with the time of its
/// commit, so one revision had several Last-Modified dates, and `If-Modified-Since` with the
/// date a client had just been given returned the full body instead of 304.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_modified_is_one_date_per_revision_on_every_tier_and_after_a_fill() {
    let Some(config) = s3_config("last_modified_is_one_date_per_revision") else {
        return;
    };
    let remote = Arc::new(S3Tier::connect(config).await.unwrap());
    let local = disk().await;
    let t = tiered(local.clone(), remote.clone(), Duration::from_secs(5));
    // An upload that spans more than a second, so its start and its commit fall in different
    // seconds.
    let data = pattern(2 << 20, 7);
    let (first, second) = (data[..1 << 20].to_vec(), data[1 << 20..].to_vec());
    let slow: UploadStream = Box::pin(futures_util::stream::unfold(0, move |step| {
        let (first, second) = (first.clone(), second.clone());
        async move {
            match step {
                0 => Some((Ok(bytes::Bytes::from(first)), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Some((Ok(bytes::Bytes::from(second)), 2))
                }
                _ => None,
            }
        }
    }));
    let etag = t
        .put(&ns(), &key("lm"), slow, PutOptions::default())
        .await
        .unwrap()
        .etag;
    let on_s3 = last_modified(remote.as_ref(), &key("lm")).await;
    assert_eq!(
        last_modified(local.as_ref(), &key("lm")).await,
        on_s3,
        "write-through"
    );
    assert_eq!(last_modified(t.as_ref(), &key("lm")).await, on_s3);

    // Another replica fills its disk tier a second later: the copy keeps the revision's date.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let other_local = disk().await;
    let other = tiered(other_local.clone(), remote.clone(), Duration::from_secs(5));
    let (_, got, _) = read(other.as_ref(), &key("lm"), ReadConditions::default())
        .await
        .unwrap();
    assert_eq!(got, etag);
    wait_for_fill(&other_local, &key("lm"), &etag).await;
    assert_eq!(
        last_modified(other_local.as_ref(), &key("lm")).await,
        on_s3,
        "fill"
    );
    assert_eq!(last_modified(other.as_ref(), &key("lm")).await, on_s3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_miss_fills_the_disk_tier_once_and_pinned_reads_then_hit_it() {
    let Some(config) = s3_config("a_range_miss_fills_the_disk_tier_once") else {
        return;
    };
    let remote = Arc::new(S3Tier::connect(config).await.unwrap());
    let local = disk().await;
    let t = tiered(local.clone(), remote.clone(), Duration::from_secs(5));
    let data = pattern(5 << 20, 2);
    // Written through another replica: only S3 has it.
    let etag = remote
        .put(
            &ns(),
            &key("f"),
            upload(data.clone()),
            PutOptions::default(),
        )
        .await
        .unwrap()
        .etag;
    let range = ByteRange {
        start: 1 << 20,
        len: 1000,
    };
    let (outcome, got, body) = read(
        t.as_ref(),
        &key("f"),
        ReadConditions::pinned(&etag, Some(range)),
    )
    .await
    .unwrap();
    assert_eq!((outcome, got), (ReadOutcome::Partial(range), etag.clone()));
    assert!(body == data[1 << 20..(1 << 20) + 1000]);
    wait_for_fill(&local, &key("f"), &etag).await;
    // Remove it from S3 behind the tier's back: a pinned read must now come from disk.
    remote.delete(&ns(), &key("f")).await.unwrap();
    let (outcome, _, body) = read(t.as_ref(), &key("f"), ReadConditions::pinned(&etag, None))
        .await
        .unwrap();
    assert_eq!(outcome, ReadOutcome::Full);
    assert!(body == data, "pinned read served from the disk tier");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_within_the_revalidation_window() {
    let Some(config) = s3_config("replicas_converge_within_the_revalidation_window") else {
        return;
    };
    let window = Duration::from_millis(800);
    let a = tiered(
        disk().await,
        Arc::new(S3Tier::connect(config.clone()).await.unwrap()),
        window,
    );
    let b_local = disk().await;
    let b = tiered(
        b_local.clone(),
        Arc::new(S3Tier::connect(config).await.unwrap()),
        window,
    );
    let v1 = a
        .put(
            &ns(),
            &key("c"),
            upload(b"one".to_vec()),
            PutOptions::default(),
        )
        .await
        .unwrap()
        .etag;
    assert_eq!(
        read(b.as_ref(), &key("c"), ReadConditions::default())
            .await
            .unwrap()
            .1,
        v1
    );
    wait_for_fill(&b_local, &key("c"), &v1).await;
    let v2 = a
        .put(
            &ns(),
            &key("c"),
            upload(b"two".to_vec()),
            PutOptions::default(),
        )
        .await
        .unwrap()
        .etag;
    // Pinned to the old revision, B may still serve it from its disk; pinned to the new one, S3 does.
    let (_, etag, body) = read(b.as_ref(), &key("c"), ReadConditions::pinned(&v2, None))
        .await
        .unwrap();
    assert_eq!((etag, body.as_slice()), (v2.clone(), &b"two"[..]));
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    let (_, etag, body) = read(b.as_ref(), &key("c"), ReadConditions::default())
        .await
        .unwrap();
    assert_eq!(
        (etag, body.as_slice()),
        (v2, &b"two"[..]),
        "B serves the new revision after the window"
    );
    a.delete(&ns(), &key("c")).await.unwrap();
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    assert_eq!(
        read(b.as_ref(), &key("c"), ReadConditions::default())
            .await
            .unwrap_err(),
        ErrorKind::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_down_disk_hits_are_served_and_misses_fail_fast_with_503() {
    // Nothing listens on port 1: every S3 request fails at connect.
    let mut config = S3Config::new("unreachable");
    config.endpoint = Some("http://127.0.0.1:1".into());
    config.allow_http = true;
    // Explicit credentials: without them the AWS client would ask the instance metadata service.
    config.access_key_id = Some("unused".into());
    config.secret_access_key = Some("unused".into());
    let remote = Arc::new(S3Tier::new(config).unwrap());
    let local = disk().await;
    let t = tiered(local.clone(), remote, Duration::from_secs(5));
    let etag = local
        .put(
            &ns(),
            &key("hot"),
            upload(b"cached".to_vec()),
            PutOptions::default(),
        )
        .await
        .unwrap()
        .etag;

    let (outcome, _, body) = read(t.as_ref(), &key("hot"), ReadConditions::pinned(&etag, None))
        .await
        .unwrap();
    assert_eq!(
        (outcome, body.as_slice()),
        (ReadOutcome::Full, &b"cached"[..]),
        "a pinned disk hit needs no S3"
    );
    for k in ["hot", "cold"] {
        let started = Instant::now();
        let err = read(t.as_ref(), &key(k), ReadConditions::default())
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ErrorKind::Unavailable,
            "{k}: S3 down is a 503, never a 404 or 412"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{k}: failed in {:?}",
            started.elapsed()
        );
    }
    let err = read(
        t.as_ref(),
        &key("hot"),
        ReadConditions::pinned(&ETag::of(b"other"), None),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err,
        ErrorKind::Unavailable,
        "a pinned miss with S3 down is a 503, not a 412"
    );
    let err = t
        .put(
            &ns(),
            &key("new"),
            upload(b"x".to_vec()),
            PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(
        local_etag(&local, &key("new")).await.is_none(),
        "no local copy of a write S3 did not take"
    );
}

/// A remote tier as a network makes it: it counts the body reads that reach the tier it wraps,
/// and can answer writes late (so that acknowledgements arrive in another order than the
/// commits), answer reads after a random delay (so that one replica's checks, reads and fills
/// overlap in every order), and hold body reads until a gate opens (an S3 server slow to answer).
struct Networked {
    inner: Arc<dyn Tier>,
    body_reads: AtomicUsize,
    body_requests: AtomicUsize,
    head_requests: AtomicUsize,
    late_acks: bool,
    jitter: bool,
    gate: Option<tokio::sync::watch::Sender<bool>>,
}

impl Networked {
    fn over(inner: Arc<dyn Tier>) -> Networked {
        Networked {
            inner,
            body_reads: AtomicUsize::new(0),
            body_requests: AtomicUsize::new(0),
            head_requests: AtomicUsize::new(0),
            late_acks: false,
            jitter: false,
            gate: None,
        }
    }
}

#[async_trait::async_trait]
impl Tier for Networked {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn get(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: GetOptions,
    ) -> Result<GetResponse, TierError> {
        if opts.head {
            self.head_requests.fetch_add(1, Ordering::SeqCst);
        } else {
            self.body_requests.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                let _ = gate.subscribe().wait_for(|open| *open).await;
            }
        }
        let r = self.inner.get(ns, key, opts).await;
        if r.as_ref().is_ok_and(|r| r.body.is_some()) {
            self.body_reads.fetch_add(1, Ordering::SeqCst);
        }
        if self.jitter {
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..15))).await;
        }
        r
    }
    async fn put(
        &self,
        ns: &Namespace,
        key: &Key,
        body: UploadStream,
        opts: PutOptions,
    ) -> Result<PutResult, TierError> {
        let result = self.inner.put(ns, key, body, opts).await;
        if self.late_acks {
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..20))).await;
        }
        result
    }
    async fn delete(&self, ns: &Namespace, key: &Key) -> Result<bool, TierError> {
        self.inner.delete(ns, key).await
    }
    async fn list_namespaces(&self) -> Result<Vec<NamespaceUsage>, TierError> {
        self.inner.list_namespaces().await
    }
    async fn stats(&self) -> Result<Vec<TierStats>, TierError> {
        self.inner.stats().await
    }
}

/// Each request to the remote before a miss's first byte is a round trip: an unpinned miss asks
/// which revision is current (the revalidation every unpinned read makes) and is decided against
/// that answer, then its fill asks for the body; a HEAD that misses asks once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_miss_asks_the_remote_once_before_its_body() {
    cold_misses_ask_once(disk().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_miss_asks_s3_once_before_its_body() {
    let Some(config) = s3_config("a_cold_miss_asks_s3_once_before_its_body") else {
        return;
    };
    cold_misses_ask_once(Arc::new(S3Tier::connect(config).await.unwrap())).await;
}

async fn cold_misses_ask_once(remote: Arc<dyn Tier>) {
    let counting = Arc::new(Networked::over(remote.clone()));
    let t = tiered(disk().await, counting.clone(), Duration::from_secs(5));
    let data = pattern(3 << 20, 5);
    for k in ["whole", "range", "head"] {
        remote
            .put(&ns(), &key(k), upload(data.clone()), PutOptions::default())
            .await
            .unwrap();
    }
    let asked = |what: &str| {
        let heads = counting.head_requests.swap(0, Ordering::SeqCst);
        let bodies = counting.body_requests.swap(0, Ordering::SeqCst);
        assert_eq!((heads, bodies), (1, usize::from(what != "head")), "{what}");
    };

    let (outcome, _, body) = read(t.as_ref(), &key("whole"), ReadConditions::default())
        .await
        .unwrap();
    assert_eq!(outcome, ReadOutcome::Full);
    assert!(body == data);
    asked("whole");

    let range = ByteRange {
        start: 1 << 20,
        len: 5,
    };
    let conditions = ReadConditions {
        range: Some(larder_proto::RangeSpec::FromTo(range.start, range.last())),
        ..Default::default()
    };
    let (outcome, _, body) = read(t.as_ref(), &key("range"), conditions).await.unwrap();
    assert_eq!(outcome, ReadOutcome::Partial(range));
    assert!(body == data[1 << 20..(1 << 20) + 5]);
    asked("range");

    let head = GetOptions {
        head: true,
        ..Default::default()
    };
    let r = t.get(&ns(), &key("head"), head).await.unwrap();
    assert_eq!(
        (r.outcome, r.meta.size),
        (ReadOutcome::Full, data.len() as u64)
    );
    asked("head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_readers_cost_one_s3_body_read() {
    let Some(config) = s3_config("concurrent_cold_readers_cost_one_s3_body_read") else {
        return;
    };
    let s3: Arc<dyn Tier> = Arc::new(S3Tier::connect(config).await.unwrap());
    let counting = Arc::new(Networked::over(s3.clone()));
    let local = disk().await;
    let t = tiered(local.clone(), counting.clone(), Duration::from_secs(5));
    let data = Arc::new(pattern(24 << 20, 9));
    let etag = s3
        .put(
            &ns(),
            &key("cold"),
            upload(data.to_vec()),
            PutOptions::default(),
        )
        .await
        .unwrap()
        .etag;
    let readers: Vec<_> = (0..16u64)
        .map(|i| {
            let (t, data, etag) = (t.clone(), data.clone(), etag.clone());
            tokio::spawn(async move {
                // Half read the whole object, half a pinned range, as parallel downloaders do.
                let (conditions, start, len) = if i % 2 == 0 {
                    (ReadConditions::default(), 0, data.len() as u64)
                } else {
                    let r = ByteRange {
                        start: i * (1 << 20),
                        len: 3 << 20,
                    };
                    (ReadConditions::pinned(&etag, Some(r)), r.start, r.len)
                };
                let (_, got, body) = read(t.as_ref(), &key("cold"), conditions).await.unwrap();
                assert_eq!(got, etag);
                assert!(
                    body == data[start as usize..(start + len) as usize],
                    "reader {i}: exact bytes"
                );
            })
        })
        .collect();
    for r in readers {
        r.await.unwrap();
    }
    wait_for_fill(&local, &key("cold"), &etag).await;
    assert_eq!(
        counting.body_reads.load(Ordering::SeqCst),
        1,
        "16 concurrent cold readers, one S3 body read"
    );
    let (_, _, body) = read(
        t.as_ref(),
        &key("cold"),
        ReadConditions::pinned(&etag, None),
    )
    .await
    .unwrap();
    assert!(body == *data);
    assert_eq!(
        counting.body_reads.load(Ordering::SeqCst),
        1,
        "later reads come from disk"
    );
}

/// Concurrent writes of one key through one replica: whatever order the remote acknowledges
/// them in, the local copy left afterwards is the revision the remote holds (or none), so
/// unpinned reads within the revalidation window never serve a superseded revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_leave_the_local_copy_the_remote_kept() {
    let remote_disk = disk().await;
    let remote = Arc::new(Networked {
        late_acks: true,
        ..Networked::over(remote_disk.clone())
    });
    let local = disk().await;
    let t = tiered(local.clone(), remote, Duration::from_secs(60));
    let k = key("contended");
    let mut stale = 0;
    for round in 0..30u64 {
        let writes = (0..4u64).map(|i| {
            let t = t.clone();
            let k = k.clone();
            async move {
                t.put(
                    &ns(),
                    &k,
                    upload(pattern(64 << 10, round * 8 + i)),
                    PutOptions::default(),
                )
                .await
                .unwrap()
            }
        });
        futures_util::future::join_all(writes).await;
        let kept = local_etag(&remote_disk, &k).await.unwrap();
        let cached = local_etag(&local, &k).await;
        if cached.as_ref().is_some_and(|c| *c != kept) {
            stale += 1;
        }
        // What an unpinned reader gets is what the remote kept.
        let (_, etag, _) = read(t.as_ref(), &k, ReadConditions::default())
            .await
            .unwrap();
        assert_eq!(
            etag, kept,
            "round {round}: an unpinned read served a superseded revision"
        );
    }
    assert_eq!(stale, 0, "rounds that left a superseded local copy");
}

/// An unpinned read of `name` through a replica whose remote holds body reads (the fill's
/// request to "S3" is in flight, unanswered), with everything around it.
struct HeldRead {
    remote_disk: Arc<DiskTier>,
    remote: Arc<Networked>,
    local: Arc<DiskTier>,
    t: Arc<TieredTier>,
    k: Key,
    reader: tokio::task::JoinHandle<ReadResult>,
}

impl HeldRead {
    /// Writes a newer revision straight to the remote (another replica's write), then lets the
    /// remote answer the held body read.
    async fn overwrite_then_answer(&mut self) -> (Vec<u8>, ETag) {
        let new = pattern(256 << 10, 2);
        let etag = self
            .remote_disk
            .put(&ns(), &self.k, upload(new.clone()), PutOptions::default())
            .await
            .unwrap()
            .etag;
        self.remote.gate.as_ref().unwrap().send_replace(true);
        (new, etag)
    }
}

async fn a_read_held_at_its_fill(name: &str) -> HeldRead {
    let remote_disk = disk().await;
    let remote = Arc::new(Networked {
        gate: Some(tokio::sync::watch::channel(false).0),
        ..Networked::over(remote_disk.clone())
    });
    let local = disk().await;
    let t = tiered(local.clone(), remote.clone(), Duration::from_secs(60));
    let k = key(name);
    remote_disk
        .put(
            &ns(),
            &k,
            upload(pattern(256 << 10, 1)),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let reader = {
        let (t, k) = (t.clone(), k.clone());
        tokio::spawn(async move { read(t.as_ref(), &k, ReadConditions::default()).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while remote.body_requests.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the fill never asked the remote");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    HeldRead {
        remote_disk,
        remote,
        local,
        t,
        k,
        reader,
    }
}

/// Regression (issue 10, item 7): the fill's bookkeeping belonged to the request that started
/// it; when that request was dropped while waiting for S3, the entry stayed, and once the key
/// changed every later miss read S3 directly and the key was never cached on that replica again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_goes_away_never_blocks_later_fills_of_its_key() {
    let mut held = a_read_held_at_its_fill("abandoned").await;
    let HeldRead {
        local,
        t,
        k,
        reader,
        ..
    } = &mut held;
    let (local, t, k) = (local.clone(), t.clone(), k.clone());
    reader.abort(); // the client went away while S3 had not answered yet
    let _ = reader.await;

    let (new, new_etag) = held.overwrite_then_answer().await;
    let (_, etag, body) = read(t.as_ref(), &k, ReadConditions::default())
        .await
        .unwrap();
    assert_eq!(etag, new_etag);
    assert!(body == new);
    wait_for_fill(&local, &k, &new_etag).await;
}

/// A read whose fill loses to a newer revision before S3 sent a byte (the key was overwritten
/// through another replica meanwhile) is served the newer revision through a fill of it, so
/// this replica holds the newer revision afterwards instead of having read it past its disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_fill_was_superseded_fills_the_newer_revision() {
    let mut held = a_read_held_at_its_fill("overwritten-while-filling").await;
    let (new, new_etag) = held.overwrite_then_answer().await;
    let HeldRead {
        remote,
        local,
        k,
        reader,
        ..
    } = held;

    let (_, etag, body) = reader.await.unwrap().unwrap();
    assert_eq!(etag, new_etag, "the read serves the revision now current");
    assert!(body == new);
    let deadline = Instant::now() + Duration::from_secs(5);
    while local_etag(&local, &k).await.as_ref() != Some(&new_etag) {
        assert!(
            Instant::now() < deadline,
            "the newer revision was read from the remote without a fill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        remote.body_reads.load(Ordering::SeqCst),
        1,
        "one body read from the remote: the fill the reader followed"
    );
}

/// Monotonic reads per replica: while another replica overwrites a key with ever newer
/// revisions, concurrent unpinned reads through one replica (checks, fills and reads of S3
/// overlapping in random order) never return a revision older than one a read that ended
/// earlier already returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_reads_on_one_replica_never_go_backwards_under_overwrites() {
    let remote_disk = disk().await;
    let remote: Arc<dyn Tier> = Arc::new(Networked {
        jitter: true,
        ..Networked::over(remote_disk.clone())
    });
    let t = tiered(disk().await, remote, Duration::from_secs(60));
    let k = key("moving");
    let version = |v: u64| {
        let mut body = v.to_le_bytes().to_vec();
        body.extend(pattern(64 << 10, v));
        body
    };
    remote_disk
        .put(&ns(), &k, upload(version(0)), PutOptions::default())
        .await
        .unwrap();
    let writer = {
        let (remote_disk, k) = (remote_disk.clone(), k.clone());
        tokio::spawn(async move {
            for v in 1..=40u64 {
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..20))).await;
                remote_disk
                    .put(&ns(), &k, upload(version(v)), PutOptions::default())
                    .await
                    .unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (t, k) = (t.clone(), k.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..60 {
                    let started = Instant::now();
                    let (_, _, body) = read(t.as_ref(), &k, ReadConditions::default())
                        .await
                        .unwrap();
                    let v = u64::from_le_bytes(body[..8].try_into().unwrap());
                    assert!(body == version(v), "a whole revision");
                    seen.push((started, Instant::now(), v));
                }
                seen
            })
        })
        .collect();
    writer.await.unwrap();
    let mut reads = Vec::new();
    for r in readers {
        reads.extend(r.await.unwrap());
    }
    for (_, ended, v) in &reads {
        for (started, _, w) in &reads {
            assert!(
                started <= ended || w >= v,
                "a read that began after another returned revision {v} returned revision {w}"
            );
        }
    }
}

/// A read is answered at hand only while the key is known current within the window and the
/// local tier holds that revision: what `get` would serve without asking the remote. Past the
/// window the read must go to `get`, which revalidates.
#[tokio::test]
async fn reads_are_answered_at_hand_only_while_the_key_is_known_current() {
    let window = Duration::from_millis(300);
    let (local, remote) = (disk().await, disk().await);
    let t = tiered(local, remote.clone(), window);
    let k = key("at-hand");
    let at_hand = |conditions: ReadConditions| {
        let opts = GetOptions {
            conditions,
            head: false,
        };
        t.read_at_hand(&ns(), &k, &opts).map(|r| {
            r.map(|r| match r.body {
                AtHandBody::Bytes(body) => (r.outcome, r.meta.etag, body),
                other => panic!("a small body not in memory: {other:?}"),
            })
        })
    };
    let v1 = t
        .put(&ns(), &k, upload(b"one".to_vec()), PutOptions::default())
        .await
        .unwrap()
        .etag;
    let got = at_hand(ReadConditions::default()).expect("known current after the write");
    assert_eq!(got.unwrap(), (ReadOutcome::Full, v1.clone(), "one".into()));
    // Another replica writes; within the window this one still serves what it knows.
    let v2 = remote
        .put(&ns(), &k, upload(b"two".to_vec()), PutOptions::default())
        .await
        .unwrap()
        .etag;
    assert!(at_hand(ReadConditions::default()).is_some());
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    assert!(
        at_hand(ReadConditions::default()).is_none(),
        "past the window"
    );
    // `get` revalidates, finds the newer revision and fills it; then it is at hand again.
    assert_eq!(
        read(t.as_ref(), &k, ReadConditions::default())
            .await
            .unwrap()
            .1,
        v2
    );
    let pinned_v2 =
        ReadConditions::from_headers(Some(&v2.to_string()), None, None, None, None, None);
    for _ in 0..100 {
        if at_hand(pinned_v2.clone()).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = at_hand(pinned_v2).expect("the fill of the current revision is local");
    assert_eq!(got.unwrap(), (ReadOutcome::Full, v2, "two".into()));
    // Pinned to the replaced revision: not at hand (the local copy is gone), `get` decides.
    let pinned_v1 =
        ReadConditions::from_headers(Some(&v1.to_string()), None, None, None, None, None);
    assert!(at_hand(pinned_v1).is_none());
}

//! The S3 tier against a real S3-compatible server: the whole conformance suite, plus what only
//! the S3 tier has — a bucket shared by several replicas, the reaper, and reads that race with
//! overwrites and reaping.
//!
//! Needs `AWS_ENDPOINT_URL`, `S3_BUCKET` and credentials in the environment, as printed by
//! `scripts/s3-server.sh`; without them every test says SKIPPED and passes. No mocks: an S3
//! stand-in would agree with our assumptions, and the point is to check them against a server.
//! Every test works under its own random key prefix, so tests run in parallel on one bucket.

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use larder_proto::{
    ByteRange, ETag, Key, Namespace, ReadConditions, ReadOutcome, WritePrecondition,
};
use larder_tier::conformance::{TierRef, pattern, upload};
use larder_tier::{
    ConditionalPut, ErrorKind, GetOptions, PutOptions, S3Config, S3Tier, Tier, body_to_bytes,
};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The environment's S3 settings under a fresh prefix, or `None` (after saying so) when no
/// server is configured.
fn config() -> Option<S3Config> {
    // Credentials are required too: without them the AWS client would ask the instance
    // metadata service, which tests must never reach.
    let configured = std::env::var_os("AWS_ENDPOINT_URL").is_some()
        && std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
    let Some(mut config) = S3Config::from_env().filter(|_| configured) else {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("s3 test");
        println!("SKIPPED {name}: no S3 server (run scripts/s3-server.sh)");
        return None;
    };
    config.prefix = format!("larder-test/{:016x}", rand::random::<u64>());
    // Small read parts so that the conformance scenarios' multi-MiB objects and ranges that
    // cross 1 MiB boundaries go through the parallel ranged-GET path.
    config.read_part_size = 1 << 20;
    config.read_concurrency = 3;
    Some(config)
}

/// [`config`] with every body in an object of its own, for tests of what happens to body objects
/// (small bodies otherwise travel inside their reference).
fn config_with_body_objects() -> Option<S3Config> {
    let mut config = config()?;
    config.inline_body_max = 0;
    Some(config)
}

async fn connect(config: S3Config) -> S3Tier {
    S3Tier::connect(config).await.expect("connect to S3")
}

async fn fresh() -> Option<TierRef> {
    Some(Arc::new(connect(config()?).await))
}

larder_tier::conformance_suite!(match fresh().await {
    Some(tier) => tier,
    None => return,
});

fn ns(s: &str) -> Namespace {
    Namespace::parse(s).unwrap()
}

fn key(s: &str) -> Key {
    Key::parse(s).unwrap()
}

fn bucket(config: &S3Config) -> Arc<dyn ObjectStore> {
    Arc::new(config.build_store().unwrap())
}

fn at(config: &S3Config, relative: &str) -> Path {
    Path::parse(format!("{}/{relative}", config.prefix)).unwrap()
}

/// Relative names of the objects under `dir` (e.g. "bodies").
async fn names(store: &Arc<dyn ObjectStore>, config: &S3Config, dir: &str) -> Vec<String> {
    let mut out: Vec<String> = store
        .list(Some(&at(config, dir)))
        .map_ok(|m| m.location.as_ref()[config.prefix.len() + 1..].to_string())
        .try_collect()
        .await
        .unwrap();
    out.sort();
    out
}

/// The body object a key's reference names.
async fn body_of(store: &Arc<dyn ObjectStore>, config: &S3Config, n: &str, k: &str) -> String {
    let r = store
        .get(&at(config, &format!("refs/{n}/{k}")))
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    doc["body"].as_str().unwrap().to_string()
}

async fn put(t: &S3Tier, n: &Namespace, k: &Key, data: Vec<u8>) -> ETag {
    t.put(n, k, upload(data), PutOptions::default())
        .await
        .unwrap()
        .etag
}

async fn read_verified(t: &S3Tier, n: &Namespace, k: &Key) -> (ETag, Vec<u8>) {
    let r = t.get(n, k, GetOptions::default()).await.unwrap();
    let body = body_to_bytes(r.body.unwrap()).await.unwrap();
    assert_eq!(
        ETag::of(&body),
        r.meta.etag,
        "bytes hash to the served ETag"
    );
    (r.meta.etag, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_probe_finds_conditional_put() {
    let Some(config) = config() else { return };
    let tier = connect(config.clone()).await;
    assert_eq!(
        tier.check_conditional_put().await.unwrap(),
        ConditionalPut::Supported
    );
    tier.ready().await.expect("ready");
    let store = bucket(&config);
    assert!(
        names(&store, &config, "probe").await.is_empty(),
        "the probe cleans up after itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_an_upstream_failure_not_a_404() {
    let Some(mut config) = config() else { return };
    config.bucket = format!("no-such-bucket-{:08x}", rand::random::<u32>());
    let err = S3Tier::connect(config.clone()).await.unwrap_err();
    assert!(
        matches!(err.kind, ErrorKind::Upstream | ErrorKind::Unavailable),
        "{err:?}"
    );
    let tier = S3Tier::new(config).unwrap();
    assert_eq!(tier.ready().await.unwrap_err().kind, ErrorKind::Unavailable);
    let err = tier
        .get(&ns("ci"), &key("k"), GetOptions::default())
        .await
        .unwrap_err();
    assert_ne!(err.kind, ErrorKind::NotFound, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_written_through_one_replica_is_served_by_another() {
    let Some(config) = config() else { return };
    let (a, b) = (connect(config.clone()).await, connect(config).await);
    let (n, k) = (ns("shared"), key("snapshots/main.tar.zst"));
    let data = pattern(3 << 20, 1);
    let v1 = put(&a, &n, &k, data.clone()).await;
    let (etag, body) = read_verified(&b, &n, &k).await;
    assert_eq!((etag, body == data), (v1.clone(), true));

    let swap = PutOptions {
        precondition: WritePrecondition::replace_if(&v1),
        ..Default::default()
    };
    let v2 = b
        .put(&n, &k, upload(b"second".to_vec()), swap.clone())
        .await
        .unwrap();
    assert!(!v2.created);
    let err = a
        .put(&n, &k, upload(b"lost".to_vec()), swap)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::PreconditionFailed);
    assert_eq!(err.current_etag, Some(v2.etag.clone()));

    let pinned = GetOptions {
        conditions: ReadConditions::pinned(&v1, Some(ByteRange { start: 0, len: 10 })),
        head: false,
    };
    let r = a.get(&n, &k, pinned).await.unwrap();
    assert_eq!(r.outcome, ReadOutcome::PreconditionFailed);
    assert_eq!(
        r.meta.etag, v2.etag,
        "the 412 names the other replica's revision"
    );
    assert!(r.body.is_none());

    assert!(b.delete(&n, &k).await.unwrap());
    let err = a.get(&n, &k, GetOptions::default()).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_swap_across_replicas_has_one_winner() {
    let Some(config) = config() else { return };
    let replicas = [connect(config.clone()).await, connect(config).await];
    let (n, k) = (ns("cas"), key("k"));
    let v1 = put(&replicas[0], &n, &k, b"v1".to_vec()).await;
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let (t, n, k, v1) = (
                replicas[i as usize % 2].clone(),
                n.clone(),
                k.clone(),
                v1.clone(),
            );
            tokio::spawn(async move {
                let opts = PutOptions {
                    precondition: WritePrecondition::replace_if(&v1),
                    ..Default::default()
                };
                t.put(&n, &k, upload(pattern(100_000, i)), opts).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => winners.push(r.etag),
            Err(e) => assert_eq!(e.kind, ErrorKind::PreconditionFailed, "{e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one compare-and-swap wins");
    assert_eq!(read_verified(&replicas[1], &n, &k).await.0, winners[0]);
}

/// Regression for the original implementation's bug (a): metadata read first, bytes fetched
/// with a plain GET later, so an overwrite in between sent the new bytes under the old ETag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_between_reading_the_ref_and_the_body_never_mixes_revisions() {
    let Some(mut config) = config() else { return };
    // One part in flight: every later part is fetched only after the overwrite below.
    config.read_concurrency = 1;
    let (reader, writer) = (connect(config.clone()).await, connect(config).await);
    let (n, k) = (ns("race"), key("big"));
    let old = pattern(6 << 20, 1);
    let v1 = put(&writer, &n, &k, old.clone()).await;

    let open = reader.get(&n, &k, GetOptions::default()).await.unwrap();
    assert_eq!(open.meta.etag, v1);
    let v2 = put(&writer, &n, &k, pattern(5 << 20, 2)).await;
    assert_ne!(v1, v2);
    let body = body_to_bytes(open.body.unwrap()).await.unwrap();
    assert!(
        body == old,
        "a read opened before an overwrite delivers the old revision, whole"
    );

    // Small objects too: the reference names an immutable body, so there is nothing to mix.
    let small_old = b"small, old".to_vec();
    let s1 = put(&writer, &n, &key("small"), small_old.clone()).await;
    let open = reader
        .get(&n, &key("small"), GetOptions::default())
        .await
        .unwrap();
    put(&writer, &n, &key("small"), b"small, new!".to_vec()).await;
    assert_eq!(open.meta.etag, s1);
    assert_eq!(body_to_bytes(open.body.unwrap()).await.unwrap(), small_old);
}

/// A body reaped under a read that has already started: the stream fails (the server aborts
/// the connection) instead of ending cleanly short or continuing with other bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_reaped_during_a_read_fails_the_stream() {
    let Some(mut config) = config() else { return };
    config.read_concurrency = 1;
    let tier = connect(config).await;
    let (n, k) = (ns("reaped"), key("k"));
    put(&tier, &n, &k, pattern(6 << 20, 3)).await;
    let open = tier.get(&n, &k, GetOptions::default()).await.unwrap();
    put(&tier, &n, &k, b"replacement".to_vec()).await;
    let report = tier.reap(Duration::ZERO).await.unwrap();
    assert_eq!(report.bodies_deleted, 1);
    let mut body = open.body.unwrap();
    let mut received = 0usize;
    let err = loop {
        match body.next().await {
            Some(Ok(chunk)) => received += chunk.len(),
            Some(Err(e)) => break e,
            None => panic!(
                "the stream ended cleanly after {received} of {} bytes",
                6 << 20
            ),
        }
    };
    assert_eq!(err.kind, ErrorKind::Upstream, "{err:?}");
    assert!(received < 6 << 20);
    assert_eq!(read_verified(&tier, &n, &k).await.1, b"replacement");
}

/// Also the tier's half of the regression for the original implementation's bug (b), where the
/// body GET ran lazily after a 206 had been written: here `get` itself fails, before any status
/// line could be written, because the first body GET is answered before `get` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_body_object_is_an_upstream_error_never_a_404() {
    let Some(config) = config_with_body_objects() else {
        return;
    };
    let tier = connect(config.clone()).await;
    let store = bucket(&config);
    let (n, k) = (ns("lost"), key("k"));
    let etag = put(&tier, &n, &k, b"bytes".to_vec()).await;
    let body = body_of(&store, &config, "lost", "k").await;
    store.delete(&at(&config, &body)).await.unwrap();

    let err = tier.get(&n, &k, GetOptions::default()).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Upstream, "{err:?}");
    // Decisions that need no bytes are still made from the reference.
    let head = GetOptions {
        head: true,
        ..Default::default()
    };
    assert_eq!(tier.get(&n, &k, head).await.unwrap().meta.etag, etag);
    let stale = GetOptions {
        conditions: ReadConditions::pinned(&ETag::of(b"old"), None),
        head: false,
    };
    assert_eq!(
        tier.get(&n, &k, stale).await.unwrap().outcome,
        ReadOutcome::PreconditionFailed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_go_up_in_parts_and_come_back_in_parallel_ranges() {
    let Some(mut config) = config() else { return };
    config.part_size = 5 << 20;
    config.upload_concurrency = 2;
    let tier = connect(config.clone()).await;
    let store = bucket(&config);
    let (n, k) = (ns("large"), key("k"));
    let data = pattern((13 << 20) + 1, 4);
    let r = tier
        .put(&n, &k, upload(data.clone()), PutOptions::default())
        .await
        .unwrap();
    assert_eq!((r.size, &r.etag), (data.len() as u64, &ETag::of(&data)));
    let body = body_of(&store, &config, "large", "k").await;
    assert_eq!(
        store.head(&at(&config, &body)).await.unwrap().size,
        data.len() as u64
    );
    let (_, got) = read_verified(&tier, &n, &k).await;
    assert!(got == data);
    let range = ByteRange {
        start: (5 << 20) - 7,
        len: (5 << 20) + 100,
    };
    let pinned = GetOptions {
        conditions: ReadConditions::pinned(&r.etag, Some(range)),
        head: false,
    };
    let resp = tier.get(&n, &k, pinned).await.unwrap();
    assert_eq!(resp.outcome, ReadOutcome::Partial(range));
    let got = body_to_bytes(resp.body.unwrap()).await.unwrap();
    assert!(got == data[range.start as usize..(range.start + range.len) as usize]);

    // Failures after the multipart upload started store nothing.
    let too_large = PutOptions {
        max_size: Some(11 << 20),
        ..Default::default()
    };
    let err = tier
        .put(
            &n,
            &key("too-large"),
            upload(pattern(12 << 20, 5)),
            too_large,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::TooLarge);
    let mut items: Vec<Result<Bytes, std::io::Error>> = (0..12)
        .map(|i| Ok(Bytes::from(pattern(1 << 20, i))))
        .collect();
    items.push(Err(std::io::Error::other("client went away")));
    let err = tier
        .put(
            &n,
            &key("aborted"),
            futures_util::stream::iter(items).boxed(),
            PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BodyAborted);
    assert_eq!(
        names(&store, &config, "bodies").await.len(),
        1,
        "only the committed body exists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_deletes_unreferenced_bodies_after_grace_and_keeps_referenced_ones() {
    let Some(config) = config_with_body_objects() else {
        return;
    };
    let tier = connect(config.clone()).await;
    let store = bucket(&config);
    let n = ns("reap");

    // Written now: the first revision of k1 (replaced later) and an orphan, as left by an
    // upload that died before writing its reference.
    put(&tier, &n, &key("k1"), b"k1 v1".to_vec()).await;
    let v1_body = body_of(&store, &config, "reap", "k1").await;
    let orphan = format!("bodies/reap/{:032x}", rand::random::<u128>());
    store
        .put(&at(&config, &orphan), b"orphan".to_vec().into())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Now: k1 replaced (v1 retired just now), k2 deleted, k3 expiring soon.
    put(&tier, &n, &key("k1"), b"k1 v2".to_vec()).await;
    let v2_body = body_of(&store, &config, "reap", "k1").await;
    put(&tier, &n, &key("k2"), b"k2".to_vec()).await;
    let k2_body = body_of(&store, &config, "reap", "k2").await;
    assert!(tier.delete(&n, &key("k2")).await.unwrap());
    let short = PutOptions {
        ttl: Duration::from_millis(300),
        ..Default::default()
    };
    tier.put(&n, &key("k3"), upload(b"k3".to_vec()), short)
        .await
        .unwrap();
    let k3_body = body_of(&store, &config, "reap", "k3").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(names(&store, &config, "bodies").await.len(), 5);

    // Grace 2 s: only the orphan is older than that. v1 is as old, but it stopped being
    // current just now, and a download of it may still be running.
    let report = tier.reap(Duration::from_secs(2)).await.unwrap();
    assert_eq!(report.bodies_deleted, 1, "{report:?}");
    assert_eq!(report.expired_refs_deleted, 1, "{report:?}");
    assert_eq!(report.bodies_in_grace, 3, "{report:?}");
    let left = names(&store, &config, "bodies").await;
    assert!(!left.contains(&orphan));
    for body in [&v1_body, &v2_body, &k2_body, &k3_body] {
        assert!(left.contains(body), "{body} is kept");
    }
    assert!(
        matches!(
            store.head(&at(&config, "refs/reap/k3")).await,
            Err(object_store::Error::NotFound { .. })
        ),
        "the expired reference is gone"
    );

    // Grace over: everything unreferenced goes, the current revision stays readable.
    let report = tier.reap(Duration::ZERO).await.unwrap();
    assert_eq!(report.bodies_deleted, 3, "{report:?}");
    assert_eq!(names(&store, &config, "bodies").await, vec![v2_body]);
    assert!(names(&store, &config, "retired").await.is_empty());
    assert_eq!(read_verified(&tier, &n, &key("k1")).await.1, b"k1 v2");
    let again = tier.reap(Duration::ZERO).await.unwrap();
    assert_eq!(again.bodies_deleted + again.markers_deleted, 0, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_put_on_an_existing_key_uploads_nothing() {
    let Some(config) = config_with_body_objects() else {
        return;
    };
    let tier = connect(config.clone()).await;
    let store = bucket(&config);
    let (n, k) = (ns("co"), key("k"));
    let first = put(&tier, &n, &k, b"first".to_vec()).await;
    let create = PutOptions {
        precondition: WritePrecondition::create_only(),
        ..Default::default()
    };
    let started = Instant::now();
    // A body that would take long to stream: the precondition is refused before reading it.
    let endless = futures_util::stream::repeat_with(|| Ok(Bytes::from(vec![0u8; 1 << 20]))).boxed();
    let err = tier.put(&n, &k, endless, create).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::PreconditionFailed);
    assert_eq!(err.current_etag, Some(first));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(names(&store, &config, "bodies").await.len(), 1);
}

/// Bodies are never rewritten by larder, but if anything else rewrites one, the `If-Match` on
/// S3's ETag of the body keeps its bytes from going out under the old revision's ETag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_object_changed_behind_our_back_is_never_served() {
    let Some(config) = config_with_body_objects() else {
        return;
    };
    let tier = connect(config.clone()).await;
    let store = bucket(&config);
    let (n, k) = (ns("tamper"), key("k"));
    for (name, size) in [("small", 1000usize), ("multi-part read", 3 << 20)] {
        put(&tier, &n, &k, pattern(size, 1)).await;
        let body = body_of(&store, &config, "tamper", "k").await;
        store
            .put(&at(&config, &body), pattern(size, 2).into())
            .await
            .unwrap();
        let err = tier.get(&n, &k, GetOptions::default()).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Upstream, "{name}: {err:?}");
    }
}

/// A revision whose reference this replica read moments ago is opened by `get_revision` without
/// reading the reference again (a cold miss's fill then costs one reference read, not two):
/// with the reference object removed behind its back, the revision's bytes still come, while a
/// pinned get, which must read the reference, finds no key. A revision it never read is asked
/// of the reference like a pinned get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_revision_opens_a_revision_read_moments_ago_without_its_reference() {
    let Some(config) = config() else { return };
    let tier = connect(config.clone()).await;
    let store = bucket(&config);
    let (n, k) = (ns("recent"), key("k"));
    let data = pattern(3 << 20, 11);
    let etag = put(&tier, &n, &k, data.clone()).await;
    let head = GetOptions {
        head: true,
        ..Default::default()
    };
    assert_eq!(tier.get(&n, &k, head).await.unwrap().meta.etag, etag);

    store.delete(&at(&config, "refs/recent/k")).await.unwrap();
    let range = ByteRange {
        start: (1 << 20) - 5,
        len: 1 << 20,
    };
    let r = tier.get_revision(&n, &k, &etag, Some(range)).await.unwrap();
    assert_eq!(r.outcome, ReadOutcome::Partial(range));
    let body = body_to_bytes(r.body.unwrap()).await.unwrap();
    assert!(body == data[range.start as usize..(range.start + range.len) as usize]);
    let pinned = GetOptions::pinned(&etag, Some(range));
    let err = tier.get(&n, &k, pinned).await.unwrap_err();
    assert_eq!(
        err.kind,
        ErrorKind::NotFound,
        "the pinned get read the reference"
    );

    // Never read here: the reference decides, and there is none.
    let other = ETag::of(b"another revision");
    let err = tier.get_revision(&n, &k, &other, None).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
}

/// The raw reference object of `n/k`: its JSON line, and the inline body after it if any.
async fn raw_ref(store: &Arc<dyn ObjectStore>, config: &S3Config, n: &str, k: &str) -> Vec<u8> {
    let r = store
        .get(&at(config, &format!("refs/{n}/{k}")))
        .await
        .unwrap();
    r.bytes().await.unwrap().to_vec()
}

/// A body of at most `inline_body_max` bytes is written inside its reference: no body object,
/// nothing to retire when it is replaced or deleted, and another replica reads it back whole.
/// One byte more and it gets a body object of its own, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_travel_inside_their_reference() {
    let Some(mut config) = config() else { return };
    config.inline_body_max = 1000;
    let tier = connect(config.clone()).await;
    let other = connect(config.clone()).await;
    let store = bucket(&config);
    let n = ns("inline");

    let small = pattern(1000, 1);
    let etag = put(&tier, &n, &key("small"), small.clone()).await;
    assert!(names(&store, &config, "bodies").await.is_empty());
    let raw = raw_ref(&store, &config, "inline", "small").await;
    assert!(
        raw.ends_with(&small),
        "the bytes follow the reference's JSON"
    );
    assert_eq!(
        read_verified(&other, &n, &key("small")).await,
        (etag, small)
    );
    let range = GetOptions {
        conditions: ReadConditions {
            range: Some(larder_proto::RangeSpec::FromTo(10, 19)),
            ..Default::default()
        },
        head: false,
    };
    let got = other.get(&n, &key("small"), range).await.unwrap();
    assert_eq!(
        got.outcome,
        ReadOutcome::Partial(ByteRange { start: 10, len: 10 })
    );
    assert_eq!(
        body_to_bytes(got.body.unwrap()).await.unwrap(),
        &pattern(1000, 1)[10..20]
    );

    let big = pattern(1001, 2);
    put(&tier, &n, &key("big"), big.clone()).await;
    assert_eq!(names(&store, &config, "bodies").await.len(), 1);
    assert_eq!(read_verified(&other, &n, &key("big")).await.1, big);

    // Replacing or deleting an inline revision leaves nothing for the reaper; replacing a body
    // object with an inline revision retires that body.
    put(&tier, &n, &key("small"), b"v2".to_vec()).await;
    assert!(tier.delete(&n, &key("small")).await.unwrap());
    assert!(names(&store, &config, "retired").await.is_empty());
    let big_body = body_of(&store, &config, "inline", "big").await;
    put(&tier, &n, &key("big"), b"small now".to_vec()).await;
    assert_eq!(
        names(&store, &config, "retired").await,
        vec![format!("retired/{}", &big_body["bodies/".len()..])]
    );
    assert_eq!(read_verified(&other, &n, &key("big")).await.1, b"small now");
    // An expired inline revision is reaped like any expired reference, with no body to delete.
    let short = PutOptions {
        ttl: Duration::from_millis(300),
        ..Default::default()
    };
    tier.put(&n, &key("brief"), upload(b"brief".to_vec()), short)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let report = tier.reap(Duration::ZERO).await.unwrap();
    assert_eq!(report.bodies_deleted, 1, "{report:?}");
    assert_eq!(report.expired_refs_deleted, 1, "{report:?}");
    assert!(names(&store, &config, "bodies").await.is_empty());
    assert_eq!(
        names(&store, &config, "refs").await,
        vec!["refs/inline/big"]
    );
    assert_eq!(read_verified(&other, &n, &key("big")).await.1, b"small now");
}

/// An inline body changed in the bucket behind larder's back no longer matches its ETag: the
/// read fails as a corrupt reference (an upstream error), and no byte of it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_body_changed_behind_our_back_is_never_served() {
    let Some(config) = config() else { return };
    let tier = connect(config.clone()).await;
    let store = bucket(&config);
    let (n, k) = (ns("tamper-inline"), key("k"));
    put(&tier, &n, &k, pattern(500, 1)).await;
    let mut raw = raw_ref(&store, &config, "tamper-inline", "k").await;
    *raw.last_mut().unwrap() ^= 0xff;
    store
        .put(&at(&config, "refs/tamper-inline/k"), raw.into())
        .await
        .unwrap();
    let err = connect(config.clone())
        .await
        .get(&n, &k, GetOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Upstream, "{err:?}");
    assert!(err.message.contains("corrupt"), "{err:?}");
}

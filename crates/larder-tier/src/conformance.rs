//! Scenarios every tier must pass, written once and run against each tier.
//!
//! A tier's test file calls [`conformance_suite!`](crate::conformance_suite) with an async
//! expression that builds a fresh tier; the macro expands to one `#[tokio::test]` per scenario.
//! Scenarios use their own random namespace, so tiers that share a backend (one S3 bucket) can
//! run them in parallel. Every read checks that the bytes served hash to the ETag served with
//! them: the invariant that a response never mixes revisions.

use crate::{ErrorKind, GetOptions, GetResponse, PutOptions, Tier, TierError, UploadStream};
use bytes::Bytes;
use futures_util::StreamExt;
use larder_proto::{
    ByteRange, ETag, Key, Namespace, ReadConditions, ReadOutcome, TagList, WritePrecondition,
};
use std::sync::Arc;
use std::time::Duration;

/// The tier under test, as every scenario takes it.
pub type TierRef = Arc<dyn Tier>;

/// A new empty directory for one test's tier, kept until the test process exits. A tier must
/// outlive its test's last await (its background tasks hold it until the runtime ends), so the
/// directory cannot go with a guard dropped at the end of the test; leaking the guards left a
/// directory per test in the temp directory, hundreds per run. All of a process's directories
/// are under one parent, removed when the process exits (`atexit`), and a parent left by a
/// killed run is removed by the next one.
pub fn lasting_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let parent = LASTING_PARENT.get_or_init(|| {
        let temp = std::env::temp_dir();
        remove_parents_of_ended_runs(&temp);
        let parent = temp.join(format!("{LASTING_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&parent).expect("a test directory in the temp directory");
        // SAFETY: registers a plain function, run once at exit.
        unsafe { libc::atexit(remove_lasting_parent) };
        parent
    });
    let dir = parent.join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    std::fs::create_dir(&dir).expect("a test directory");
    dir
}

const LASTING_PREFIX: &str = "larder-tier-tests-";
static LASTING_PARENT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

extern "C" fn remove_lasting_parent() {
    if let Some(parent) = LASTING_PARENT.get() {
        let _ = std::fs::remove_dir_all(parent);
    }
}

fn remove_parents_of_ended_runs(temp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(LASTING_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The list of scenarios; the macro below must name each of them.
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@each $make;
            roundtrip_of_various_sizes, missing_key_is_not_found_whatever_preconditions,
            etag_is_the_content_digest, overwrite_reports_replaced_and_serves_new_revision,
            range_reads_in_all_forms, unsatisfiable_range, pinned_read_of_stale_etag_fails_with_current,
            pinned_range_read_of_current_etag_succeeds, if_none_match_gives_not_modified,
            head_decides_like_get_without_body, create_only_put, compare_and_swap_put,
            delete_is_idempotent, ttl_expiry_hides_revision, stored_headers_roundtrip,
            too_large_upload_stores_nothing, aborted_upload_stores_nothing,
            list_namespaces_counts_objects, concurrent_create_only_has_one_winner,
            concurrent_writers_and_readers_never_mix_revisions
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let tier: $crate::conformance::TierRef = $make;
                $crate::conformance::$name(tier).await;
            }
        )*
    };
}

fn ns() -> Namespace {
    Namespace::parse(&format!("t{:016x}", rand::random::<u64>())).unwrap()
}

fn key(s: &str) -> Key {
    Key::parse(s).unwrap()
}

/// Deterministic pseudo-random bytes, distinct per seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `data` as an [`UploadStream`] of 64 KiB chunks.
pub fn upload(data: Vec<u8>) -> UploadStream {
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures_util::stream::iter(chunks).boxed()
}

async fn put(t: &TierRef, ns: &Namespace, k: &Key, data: Vec<u8>) -> ETag {
    t.put(ns, k, upload(data), PutOptions::default())
        .await
        .expect("put")
        .etag
}

fn conds(
    if_match: Option<&str>,
    if_none_match: Option<&str>,
    range: Option<&str>,
) -> ReadConditions {
    ReadConditions::from_headers(if_match, if_none_match, None, None, None, range)
}

async fn get(
    t: &TierRef,
    ns: &Namespace,
    k: &Key,
    c: ReadConditions,
) -> Result<(GetResponse, Vec<u8>), TierError> {
    let opts = GetOptions {
        conditions: c,
        head: false,
    };
    let (r, body) = get_both(t, ns, k, opts).await?;
    Ok((r, body.unwrap_or_default()))
}

/// `t.get`, its body read, and the same read through [`Tier::read_at_hand`]: whenever the tier
/// answers at hand, it must answer what `get` answers (outcome, revision, bytes, or the kind
/// of error).
async fn get_both(
    t: &TierRef,
    ns: &Namespace,
    k: &Key,
    opts: GetOptions,
) -> Result<(GetResponse, Option<Vec<u8>>), TierError> {
    let at_hand = t.read_at_hand(ns, k, &opts);
    let got = match t.get(ns, k, opts).await {
        Ok(mut r) => match r.body.take() {
            Some(b) => crate::body_to_bytes(b).await.map(|body| (r, Some(body))),
            None => Ok((r, None)),
        },
        Err(e) => Err(e),
    };
    match (&at_hand, &got) {
        (None, _) => {}
        (Some(Ok(a)), Ok((r, body))) => {
            assert_eq!(a.outcome, r.outcome, "read at hand: outcome");
            assert_eq!(a.meta, r.meta, "read at hand: revision");
            let at_hand = match &a.body {
                crate::AtHandBody::None => None,
                crate::AtHandBody::Bytes(bytes) => Some(bytes.to_vec()),
                crate::AtHandBody::File(region) => {
                    let mut bytes = vec![0; region.len as usize];
                    std::os::unix::fs::FileExt::read_exact_at(
                        region.file.as_ref(),
                        &mut bytes,
                        region.offset,
                    )
                    .expect("the region of an answer at hand is readable");
                    Some(bytes)
                }
            };
            assert!(at_hand == *body, "read at hand: bytes");
        }
        (Some(Err(a)), Err(e)) => assert_eq!(a.kind, e.kind, "read at hand: error"),
        (Some(a), got) => panic!(
            "read at hand gave {:?}, get gave {:?}",
            a.as_ref().map(|a| a.outcome),
            got.as_ref().map(|(r, _)| r.outcome)
        ),
    }
    got
}

/// Reads the whole object and asserts that its bytes hash to the ETag served with them.
async fn get_verified(t: &TierRef, ns: &Namespace, k: &Key) -> Result<(ETag, Vec<u8>), TierError> {
    let (r, body) = get(t, ns, k, ReadConditions::default()).await?;
    assert_eq!(r.outcome, ReadOutcome::Full);
    assert_eq!(
        body.len() as u64,
        r.meta.size,
        "body length equals the size in the metadata"
    );
    assert_eq!(
        ETag::of(&body),
        r.meta.etag,
        "bytes served hash to the ETag served with them"
    );
    Ok((r.meta.etag, body))
}

/// Bodies from 0 bytes to 3 MiB come back byte for byte with the ETag the write returned.
pub async fn roundtrip_of_various_sizes(t: TierRef) {
    let ns = ns();
    for (i, size) in [0usize, 1, 4095, 64 * 1024, (1 << 20) + 17, 3 << 20]
        .into_iter()
        .enumerate()
    {
        let k = key(&format!("size/{size}"));
        let data = pattern(size, i as u64);
        let etag = put(&t, &ns, &k, data.clone()).await;
        let (got_etag, body) = get_verified(&t, &ns, &k).await.expect("get");
        assert_eq!(got_etag, etag);
        assert!(body == data, "size {size}: bytes differ");
    }
}

/// A missing key is `NotFound` whatever the `If-Match`, `If-None-Match` or `Range` of the read.
pub async fn missing_key_is_not_found_whatever_preconditions(t: TierRef) {
    let ns = ns();
    let k = key("missing");
    let some = ETag::of(b"x").to_string();
    for c in [
        ReadConditions::default(),
        conds(Some(&some), None, None),
        conds(Some("*"), None, None),
        conds(None, Some("*"), None),
        conds(None, None, Some("bytes=0-10")),
    ] {
        let opts = GetOptions {
            conditions: c,
            head: false,
        };
        let Err(err) = get_both(&t, &ns, &k, opts).await else {
            panic!("a missing key was found");
        };
        assert_eq!(err.kind, ErrorKind::NotFound);
    }
}

/// The ETag is the BLAKE3 digest of the body, so identical bytes under two keys share it.
pub async fn etag_is_the_content_digest(t: TierRef) {
    let ns = ns();
    let data = pattern(100_000, 7);
    let a = put(&t, &ns, &key("a"), data.clone()).await;
    let b = put(&t, &ns, &key("b/c"), data.clone()).await;
    assert_eq!(a, ETag::of(&data));
    assert_eq!(a, b, "identical bytes get identical ETags");
}

/// A second write of a key reports `created: false`, and reads then serve the new revision.
pub async fn overwrite_reports_replaced_and_serves_new_revision(t: TierRef) {
    let ns = ns();
    let k = key("k");
    let first = t
        .put(&ns, &k, upload(b"one".to_vec()), PutOptions::default())
        .await
        .unwrap();
    assert!(first.created);
    let second = t
        .put(&ns, &k, upload(b"two!".to_vec()), PutOptions::default())
        .await
        .unwrap();
    assert!(!second.created);
    assert_eq!(second.size, 4);
    let (etag, body) = get_verified(&t, &ns, &k).await.unwrap();
    assert_eq!(body, b"two!");
    assert_eq!(etag, second.etag);
}

/// `first-last`, `first-`, `-suffix` and over-long ranges are served as 206 with the right bytes,
/// also across read-chunk boundaries; a malformed range gets the whole body.
pub async fn range_reads_in_all_forms(t: TierRef) {
    let ns = ns();
    let k = key("r");
    let data = pattern((2 << 20) + 123, 3);
    let n = data.len() as u64;
    put(&t, &ns, &k, data.clone()).await;
    let cases: Vec<(String, u64, u64)> = vec![
        ("bytes=0-0".into(), 0, 1),
        ("bytes=10-19".into(), 10, 10),
        (format!("bytes={}-", n - 5), n - 5, 5),
        ("bytes=-7".into(), n - 7, 7),
        (format!("bytes=100-{}", n * 2), 100, n - 100),
        (format!("bytes=-{}", n + 10), 0, n),
        (
            "bytes=1048570-2097160".into(),
            1_048_570,
            2_097_160 - 1_048_570 + 1,
        ),
    ];
    for (h, start, len) in cases {
        let (r, body) = get(&t, &ns, &k, conds(None, None, Some(&h))).await.unwrap();
        assert_eq!(
            r.outcome,
            ReadOutcome::Partial(ByteRange { start, len }),
            "{h}"
        );
        assert!(
            body == data[start as usize..(start + len) as usize],
            "{h}: bytes differ"
        );
    }
    let (r, body) = get(&t, &ns, &k, conds(None, None, Some("bytes=5-2")))
        .await
        .unwrap();
    assert_eq!(r.outcome, ReadOutcome::Full, "a malformed range is ignored");
    assert_eq!(body.len() as u64, n);
}

/// Ranges starting at or past the end, and `bytes=-0`, are 416 with no body.
pub async fn unsatisfiable_range(t: TierRef) {
    let ns = ns();
    let k = key("u");
    put(&t, &ns, &k, pattern(100, 1)).await;
    for h in ["bytes=100-", "bytes=1000-2000", "bytes=-0"] {
        let (r, body) = get(&t, &ns, &k, conds(None, None, Some(h))).await.unwrap();
        assert_eq!(r.outcome, ReadOutcome::RangeNotSatisfiable, "{h}");
        assert!(body.is_empty());
        assert_eq!(r.meta.size, 100);
    }
}

/// A read pinned to a replaced revision is 412 with the current ETag and no byte of either.
pub async fn pinned_read_of_stale_etag_fails_with_current(t: TierRef) {
    let ns = ns();
    let k = key("p");
    let old = put(&t, &ns, &k, b"old".to_vec()).await;
    let new = put(&t, &ns, &k, b"new".to_vec()).await;
    let c = ReadConditions::pinned(&old, Some(ByteRange { start: 0, len: 2 }));
    let (r, body) = get(&t, &ns, &k, c).await.unwrap();
    assert_eq!(r.outcome, ReadOutcome::PreconditionFailed);
    assert_eq!(r.meta.etag, new, "a 412 carries the current ETag");
    assert!(
        body.is_empty(),
        "no byte of any revision is sent with a 412"
    );
}

/// A ranged read pinned to the current revision is 206 with that revision's bytes.
pub async fn pinned_range_read_of_current_etag_succeeds(t: TierRef) {
    let ns = ns();
    let k = key("pin/ok");
    let data = pattern(3 << 20, 9);
    let etag = put(&t, &ns, &k, data.clone()).await;
    let range = ByteRange {
        start: (1 << 20) - 3,
        len: (1 << 20) + 6,
    };
    let (r, body) = get(&t, &ns, &k, ReadConditions::pinned(&etag, Some(range)))
        .await
        .unwrap();
    assert_eq!(r.outcome, ReadOutcome::Partial(range));
    assert_eq!(r.meta.etag, etag);
    assert!(body == data[range.start as usize..(range.start + range.len) as usize]);
}

/// `If-None-Match` with the ETag (strong or weak), `*` or a list containing it is 304; another
/// tag gets the whole body.
pub async fn if_none_match_gives_not_modified(t: TierRef) {
    let ns = ns();
    let k = key("inm");
    let etag = put(&t, &ns, &k, b"hello".to_vec()).await;
    let weak = format!("W/{etag}");
    for h in [
        etag.to_string(),
        weak,
        "*".to_string(),
        format!("\"nope\", {etag}"),
    ] {
        let (r, body) = get(&t, &ns, &k, conds(None, Some(&h), None)).await.unwrap();
        assert_eq!(r.outcome, ReadOutcome::NotModified, "{h}");
        assert!(body.is_empty());
        assert_eq!(r.meta.etag, etag);
    }
    let (r, body) = get(&t, &ns, &k, conds(None, Some("\"other\""), None))
        .await
        .unwrap();
    assert_eq!(r.outcome, ReadOutcome::Full);
    assert_eq!(body, b"hello");
}

/// A HEAD gets the outcome a GET would get, and never a body.
pub async fn head_decides_like_get_without_body(t: TierRef) {
    let ns = ns();
    let k = key("h");
    let etag = put(&t, &ns, &k, pattern(1000, 2)).await;
    for (c, outcome) in [
        (ReadConditions::default(), ReadOutcome::Full),
        (
            conds(None, None, Some("bytes=0-9")),
            ReadOutcome::Partial(ByteRange { start: 0, len: 10 }),
        ),
        (
            conds(Some("\"zz\""), None, None),
            ReadOutcome::PreconditionFailed,
        ),
        (
            conds(None, Some(&etag.to_string()), None),
            ReadOutcome::NotModified,
        ),
    ] {
        let opts = GetOptions {
            conditions: c,
            head: true,
        };
        let (r, body) = get_both(&t, &ns, &k, opts).await.unwrap();
        assert_eq!(r.outcome, outcome);
        assert!(body.is_none());
        assert_eq!(r.meta.size, 1000);
    }
}

/// A second create-only write is 412 with the current ETag and changes nothing.
pub async fn create_only_put(t: TierRef) {
    let ns = ns();
    let k = key("c");
    let opts = PutOptions {
        precondition: WritePrecondition::create_only(),
        ..Default::default()
    };
    let first = t
        .put(&ns, &k, upload(b"1".to_vec()), opts.clone())
        .await
        .unwrap();
    assert!(first.created);
    let err = t
        .put(&ns, &k, upload(b"2".to_vec()), opts)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::PreconditionFailed);
    assert_eq!(err.current_etag, Some(first.etag));
    assert_eq!(
        get_verified(&t, &ns, &k).await.unwrap().1,
        b"1",
        "the failed write changed nothing"
    );
}

/// `If-Match` writes: 412 on a missing key or a stale ETag (with the current one), success on the
/// current ETag or `*`.
pub async fn compare_and_swap_put(t: TierRef) {
    let ns = ns();
    let k = key("cas");
    let missing = PutOptions {
        precondition: WritePrecondition::replace_if(&ETag::of(b"whatever")),
        ..Default::default()
    };
    let err = t
        .put(&ns, &k, upload(b"x".to_vec()), missing)
        .await
        .unwrap_err();
    assert_eq!(
        err.kind,
        ErrorKind::PreconditionFailed,
        "If-Match on a missing key is 412"
    );
    assert!(
        matches!(t.get(&ns, &k, GetOptions::default()).await, Err(e) if e.kind == ErrorKind::NotFound)
    );

    let v1 = put(&t, &ns, &k, b"v1".to_vec()).await;
    let swap = |e: &ETag| PutOptions {
        precondition: WritePrecondition::replace_if(e),
        ..Default::default()
    };
    let v2 = t
        .put(&ns, &k, upload(b"v2".to_vec()), swap(&v1))
        .await
        .unwrap()
        .etag;
    let err = t
        .put(&ns, &k, upload(b"v3".to_vec()), swap(&v1))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::PreconditionFailed);
    assert_eq!(err.current_etag, Some(v2.clone()));
    let any = PutOptions {
        precondition: WritePrecondition {
            if_match: Some(TagList::Any),
            if_none_match: None,
        },
        ..Default::default()
    };
    t.put(&ns, &k, upload(b"v4".to_vec()), any).await.unwrap();
    assert_eq!(get_verified(&t, &ns, &k).await.unwrap().1, b"v4");
}

/// Deleting reports whether there was something to delete; afterwards the key is not found.
pub async fn delete_is_idempotent(t: TierRef) {
    let ns = ns();
    let k = key("d");
    put(&t, &ns, &k, b"x".to_vec()).await;
    assert!(t.delete(&ns, &k).await.unwrap());
    assert!(!t.delete(&ns, &k).await.unwrap());
    let Err(err) = get_both(&t, &ns, &k, GetOptions::default()).await else {
        panic!("the key was found");
    };
    assert_eq!(err.kind, ErrorKind::NotFound);
}

/// An expired revision is not served, and a create-only write treats its key as absent.
pub async fn ttl_expiry_hides_revision(t: TierRef) {
    let ns = ns();
    let k = key("ttl");
    let opts = PutOptions {
        ttl: Duration::from_millis(1200),
        ..Default::default()
    };
    t.put(&ns, &k, upload(b"short-lived".to_vec()), opts)
        .await
        .unwrap();
    get_verified(&t, &ns, &k)
        .await
        .expect("readable before expiry");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let Err(err) = get_both(&t, &ns, &k, GetOptions::default()).await else {
        panic!("the key was found");
    };
    assert_eq!(
        err.kind,
        ErrorKind::NotFound,
        "expired revisions are not served"
    );
    let create = PutOptions {
        precondition: WritePrecondition::create_only(),
        ..Default::default()
    };
    t.put(&ns, &k, upload(b"again".to_vec()), create)
        .await
        .expect("an expired key counts as absent");
}

/// Headers stored with a revision come back in its metadata, in order.
pub async fn stored_headers_roundtrip(t: TierRef) {
    let ns = ns();
    let k = key("hdr");
    let headers = vec![
        ("content-type".to_string(), "application/zstd".to_string()),
        ("x-larder-meta-commit".to_string(), "abc123".to_string()),
    ];
    let opts = PutOptions {
        headers: headers.clone(),
        ..Default::default()
    };
    t.put(&ns, &k, upload(b"z".to_vec()), opts).await.unwrap();
    let r = t
        .get(
            &ns,
            &k,
            GetOptions {
                head: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(*r.meta.headers, headers);
}

/// A body over `max_size` fails with `TooLarge` and leaves the previous revision in place.
pub async fn too_large_upload_stores_nothing(t: TierRef) {
    let ns = ns();
    let k = key("big");
    let old = put(&t, &ns, &k, b"small".to_vec()).await;
    let opts = PutOptions {
        max_size: Some(1000),
        ..Default::default()
    };
    let err = t
        .put(&ns, &k, upload(pattern(5000, 1)), opts)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::TooLarge);
    let (etag, body) = get_verified(&t, &ns, &k).await.unwrap();
    assert_eq!(
        (etag, body.as_slice()),
        (old, &b"small"[..]),
        "the old revision is untouched"
    );
}

/// A body stream that ends in an error fails with `BodyAborted`, and nothing becomes visible.
pub async fn aborted_upload_stores_nothing(t: TierRef) {
    let ns = ns();
    let k = key("abort");
    let mut items: Vec<Result<Bytes, std::io::Error>> = (0..10)
        .map(|i| Ok(Bytes::from(pattern(64 * 1024, i))))
        .collect();
    items.push(Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "client went away",
    )));
    let err = t
        .put(
            &ns,
            &k,
            futures_util::stream::iter(items).boxed(),
            PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BodyAborted);
    let Err(err) = get_both(&t, &ns, &k, GetOptions::default()).await else {
        panic!("the key was found");
    };
    assert_eq!(
        err.kind,
        ErrorKind::NotFound,
        "nothing half-written is visible"
    );
}

/// A namespace's listing counts its keys and the bytes of their bodies.
pub async fn list_namespaces_counts_objects(t: TierRef) {
    let ns = ns();
    put(&t, &ns, &key("a"), vec![1; 10]).await;
    put(&t, &ns, &key("b"), vec![2; 20]).await;
    let list = t.list_namespaces().await.unwrap();
    let mine = list
        .iter()
        .find(|u| u.name == ns.as_str())
        .expect("namespace listed");
    assert_eq!((mine.objects, mine.bytes), (2, 30));
}

/// Of eight concurrent create-only writes of one key exactly one wins, and its revision is served.
pub async fn concurrent_create_only_has_one_winner(t: TierRef) {
    let ns = ns();
    let k = key("race");
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let (t, ns, k) = (t.clone(), ns.clone(), k.clone());
            tokio::spawn(async move {
                let opts = PutOptions {
                    precondition: WritePrecondition::create_only(),
                    ..Default::default()
                };
                t.put(&ns, &k, upload(pattern(200_000, i)), opts).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => winners.push(r.etag),
            Err(e) => assert_eq!(e.kind, ErrorKind::PreconditionFailed),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one create-only writer wins");
    assert_eq!(get_verified(&t, &ns, &k).await.unwrap().0, winners[0]);
}

/// Readers racing writers of one key always get bytes that hash to the ETag served with them,
/// and a pinned range read either matches its revision or is 412 without a body.
pub async fn concurrent_writers_and_readers_never_mix_revisions(t: TierRef) {
    let ns = ns();
    let k = key("hot/key");
    put(&t, &ns, &k, pattern(1 << 20, 0)).await;
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (t, ns, k) = (t.clone(), ns.clone(), k.clone());
            tokio::spawn(async move {
                for i in 0..6u64 {
                    let size = ((w * 7 + i * 13) % 5 + 1) as usize * 700_000;
                    put(&t, &ns, &k, pattern(size, 100 + w * 100 + i)).await;
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (t, ns, k) = (t.clone(), ns.clone(), k.clone());
            tokio::spawn(async move {
                let mut reads = 0;
                for _ in 0..15 {
                    get_verified(&t, &ns, &k)
                        .await
                        .expect("a key being overwritten is always readable");
                    // A pinned range read either matches its revision or fails cleanly.
                    let etag = t
                        .get(
                            &ns,
                            &k,
                            GetOptions {
                                head: true,
                                ..Default::default()
                            },
                        )
                        .await
                        .unwrap()
                        .meta
                        .etag;
                    let c = ReadConditions::pinned(
                        &etag,
                        Some(ByteRange {
                            start: 1000,
                            len: 500_000,
                        }),
                    );
                    if let Ok((r, body)) = get(&t, &ns, &k, c).await {
                        match r.outcome {
                            ReadOutcome::Partial(_) => assert_eq!(r.meta.etag, etag),
                            ReadOutcome::PreconditionFailed => assert!(body.is_empty()),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), 15);
    }
}

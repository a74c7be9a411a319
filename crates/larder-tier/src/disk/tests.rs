//! The conformance suite against the disk tier, plus what only a disk tier has: restart,
//! start-up clean-up, eviction by last read.

use super::*;
use crate::conformance::{TierRef, pattern, upload};
use larder_proto::ReadOutcome;
use tempfile::TempDir;

async fn fresh() -> TierRef {
    let dir = crate::conformance::lasting_dir();
    Arc::new(DiskTier::open(DiskConfig::new(dir)).await.unwrap())
}

crate::conformance_suite!(fresh().await);

fn ns(s: &str) -> Namespace {
    Namespace::parse(s).unwrap()
}
fn key(s: &str) -> Key {
    Key::parse(s).unwrap()
}

async fn read_all(t: &DiskTier, n: &Namespace, k: &Key) -> Option<Vec<u8>> {
    match t.get(n, k, GetOptions::default()).await {
        Ok(r) => Some(crate::body_to_bytes(r.body.unwrap()).await.unwrap()),
        Err(e) if e.kind == ErrorKind::NotFound => None,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn committed_objects_survive_restart() {
    let dir = TempDir::new().unwrap();
    let data = pattern(3 << 20, 5);
    {
        let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
        t.put(
            &ns("ci"),
            &key("a/b"),
            upload(data.clone()),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    assert_eq!(
        read_all(&t, &ns("ci"), &key("a/b")).await.unwrap(),
        data,
        "readable before the index loads"
    );
    t.index_loaded().await;
    let stats = t.stats().await.unwrap();
    assert_eq!(stats[0].objects, 1);
    assert!(stats[0].bytes > data.len() as u64);
}

#[tokio::test]
async fn start_up_removes_temp_files_and_orphans() {
    let dir = TempDir::new().unwrap();
    {
        let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
        t.put(
            &ns("ci"),
            &key("keep"),
            upload(b"keep".to_vec()),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let tmp = dir.path().join("tmp/deadbeef.tmp");
    fs::write(&tmp, b"half an upload").unwrap();
    let orphan_dir = dir.path().join("objects/ci/ab");
    fs::create_dir_all(&orphan_dir).unwrap();
    let garbage = orphan_dir.join("not-a-hash");
    fs::write(&garbage, b"junk").unwrap();
    let truncated = orphan_dir.join("ab".to_string() + &"0".repeat(62));
    fs::write(
        &truncated,
        &format::encode_header(
            &MetaJson {
                ns: "ci".into(),
                key: "x".into(),
                headers: vec![],
            },
            u64::MAX,
            0,
        )
        .unwrap()[..40],
    )
    .unwrap();

    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    assert!(
        !tmp.exists(),
        "temp files are removed before the tier serves"
    );
    t.index_loaded().await;
    assert!(
        !garbage.exists(),
        "unknown files in the object tree are removed"
    );
    assert!(!truncated.exists(), "incomplete revision files are removed");
    assert_eq!(
        read_all(&t, &ns("ci"), &key("keep")).await.unwrap(),
        b"keep"
    );
}

#[tokio::test]
async fn eviction_removes_least_recently_read_first() {
    let dir = TempDir::new().unwrap();
    let mut config = DiskConfig::new(dir.path());
    config.limit = Some(350_000);
    let t = DiskTier::open(config).await.unwrap();
    let n = ns("ev");
    for name in ["a", "b", "c"] {
        t.put(
            &n,
            &key(name),
            upload(pattern(100_000, 1)),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    // Reading "a" makes "b" the coldest.
    read_all(&t, &n, &key("a")).await.unwrap();
    t.put(
        &n,
        &key("d"),
        upload(pattern(100_000, 2)),
        PutOptions::default(),
    )
    .await
    .unwrap();
    assert!(
        read_all(&t, &n, &key("b")).await.is_none(),
        "b was least recently read"
    );
    for name in ["a", "c", "d"] {
        assert!(read_all(&t, &n, &key(name)).await.is_some(), "{name} kept");
    }
    assert!(t.used_bytes() <= 350_000);
    assert_eq!(t.stats().await.unwrap()[0].evictions, 1);
}

#[tokio::test]
async fn object_larger_than_the_limit_is_refused_with_insufficient_storage() {
    let dir = TempDir::new().unwrap();
    let mut config = DiskConfig::new(dir.path());
    config.limit = Some(10_000);
    let t = DiskTier::open(config).await.unwrap();
    let err = t
        .put(
            &ns("ci"),
            &key("huge"),
            upload(pattern(20_000, 1)),
            PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InsufficientStorage);
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "no temp file left"
    );
}

#[tokio::test]
async fn reader_keeps_its_revision_while_it_is_replaced_and_evicted() {
    let dir = TempDir::new().unwrap();
    let mut config = DiskConfig::new(dir.path());
    config.read_chunk = 64 * 1024;
    let t = DiskTier::open(config).await.unwrap();
    let (n, k) = (ns("ci"), key("k"));
    let old = pattern(2 << 20, 1);
    t.put(&n, &k, upload(old.clone()), PutOptions::default())
        .await
        .unwrap();
    let mut r = t.get(&n, &k, GetOptions::default()).await.unwrap();
    let mut body = r.body.take().unwrap();
    let mut got = body.next().await.unwrap().unwrap().to_vec();
    t.put(&n, &k, upload(pattern(1 << 20, 2)), PutOptions::default())
        .await
        .unwrap();
    t.delete(&n, &k).await.unwrap();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        got == old,
        "the open revision is read to its end, unchanged"
    );
    assert_eq!(ETag::of(&got), r.meta.etag);
}

#[tokio::test]
async fn expired_revisions_are_swept() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    let opts = PutOptions {
        ttl: Duration::from_millis(10),
        ..Default::default()
    };
    t.put(&ns("ci"), &key("gone"), upload(b"x".to_vec()), opts)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(t.sweep_expired().await, 1);
    assert_eq!(t.stats().await.unwrap()[0].objects, 0);
    assert_eq!(t.stats().await.unwrap()[0].expirations, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_is_readable_while_written_and_a_failed_writer_fails_its_readers() {
    let dir = TempDir::new().unwrap();
    let mut config = DiskConfig::new(dir.path());
    config.read_chunk = 64 * 1024;
    let t = DiskTier::open(config).await.unwrap();
    let data = pattern(1 << 20, 3);
    for fail in [false, true] {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let body =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|i| (i, rx)) },
            )
            .boxed();
        let k = key(if fail { "spool/fail" } else { "spool/ok" });
        let (spool, write) = t.spool(&ns("ci"), &k, body, PutOptions::default()).unwrap();
        let committer = t.clone();
        let write = tokio::spawn(async move {
            let staged = write.await?;
            committer.commit_staged(staged, Box::new(|| true)).await
        });
        let mut reader = t
            .read_spool(&spool, 1000, data.len() as u64 - 2000)
            .await
            .unwrap();
        let feed = data.clone();
        let feeder = tokio::spawn(async move {
            for (i, c) in feed.chunks(100_000).enumerate() {
                if fail && i == 5 {
                    let _ = tx.send(Err(std::io::Error::other("upstream cut"))).await;
                    return;
                }
                tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let mut got = Vec::new();
        let mut failed = false;
        while let Some(chunk) = reader.next().await {
            match chunk {
                Ok(c) => got.extend_from_slice(&c),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        feeder.await.unwrap();
        let result = write.await.unwrap();
        if fail {
            assert!(
                failed,
                "a reader of a failed spool gets an error, never a clean short body"
            );
            assert!(result.is_err());
            assert!(
                read_all(&t, &ns("ci"), &k).await.is_none(),
                "nothing committed"
            );
        } else {
            assert!(!failed);
            assert!(
                got == data[1000..data.len() - 1000],
                "the reader saw exactly the range"
            );
            assert_eq!(result.unwrap().etag, ETag::of(&data));
            assert_eq!(read_all(&t, &ns("ci"), &k).await.unwrap(), data);
            let late = t.read_spool(&spool, 0, 10).await.err().map(|e| e.kind);
            assert_eq!(
                late,
                Some(ErrorKind::NotFound),
                "a committed spool is gone; read the revision"
            );
        }
    }
}

#[tokio::test]
async fn a_cached_open_revision_never_outlives_its_replacement() {
    let dir = TempDir::new().unwrap();
    let mut config = DiskConfig::new(dir.path());
    config.limit = Some(250_000);
    let t = DiskTier::open(config).await.unwrap();
    let (n, k) = (ns("ci"), key("hot"));
    for round in 0..3u64 {
        let data = pattern(1000 + round as usize, round);
        t.put(&n, &k, upload(data.clone()), PutOptions::default())
            .await
            .unwrap();
        for _ in 0..2 {
            assert_eq!(
                read_all(&t, &n, &k).await.unwrap(),
                data,
                "round {round}: the new revision, read twice"
            );
        }
    }
    t.delete(&n, &k).await.unwrap();
    assert!(
        read_all(&t, &n, &k).await.is_none(),
        "deleted, even though it was cached"
    );
    t.put(&n, &k, upload(pattern(100_000, 9)), PutOptions::default())
        .await
        .unwrap();
    read_all(&t, &n, &k).await.unwrap();
    for other in ["a", "b", "c"] {
        t.put(
            &n,
            &key(other),
            upload(pattern(100_000, 1)),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    assert!(
        read_all(&t, &n, &k).await.is_none(),
        "evicted, even though it was cached"
    );
    let opts = PutOptions {
        ttl: Duration::from_millis(50),
        ..Default::default()
    };
    t.put(&n, &key("brief"), upload(b"x".to_vec()), opts)
        .await
        .unwrap();
    assert!(read_all(&t, &n, &key("brief")).await.is_some());
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(
        read_all(&t, &n, &key("brief")).await.is_none(),
        "expired, even though it was cached"
    );
}

/// The key's id and path, for tests that drive the tier's internals.
fn id_and_path(t: &DiskTier, n: &Namespace, k: &Key) -> (EntryId, PathBuf) {
    let id: EntryId = (Arc::from(n.as_str()), key_hash(k));
    let path = t.inner.path_of(&id.0, &id.1);
    (id, path)
}

/// Issue 10, item 4: identical bytes rewritten with a long TTL keep the ETag. A reader that had
/// opened the short-lived file could cache it after the rewrite was committed (the cache checked
/// the ETag), serve the short TTL, and once that passed, remove the key's file: the rewrite.
#[tokio::test]
async fn a_same_etag_rewrite_is_not_removed_by_the_expiry_of_the_revision_it_replaced() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    t.index_loaded().await;
    let (n, k) = (ns("ci"), key("same-bytes"));
    let (id, path) = id_and_path(&t, &n, &k);
    let data = pattern(1000, 7);
    let short = PutOptions {
        ttl: Duration::from_millis(300),
        ..Default::default()
    };
    t.put(&n, &k, upload(data.clone()), short).await.unwrap();
    // A reader opens the short-lived revision…
    let old = Arc::new(t.inner.open_revision((&id).into(), &path).unwrap().unwrap());
    // …the same bytes are rewritten with a long TTL…
    let put = t
        .put(&n, &k, upload(data.clone()), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(put.etag, ETag::of(&data), "the rewrite has the same ETag");
    // …and only then does the reader offer what it opened to the cache.
    t.inner.cache_if_current((&id).into(), &old);
    assert!(read_all(&t, &n, &k).await.is_some());
    tokio::time::sleep(Duration::from_millis(400)).await; // the short TTL passes

    let r = t.get(&n, &k, GetOptions::default()).await;
    let r = r.expect("the rewrite is still there after the short TTL");
    assert!(
        r.meta.expires > SystemTime::now() + Duration::from_secs(3600),
        "and is served with its own, long TTL"
    );
    assert_eq!(
        crate::body_to_bytes(r.body.unwrap()).await.unwrap(),
        data,
        "and its bytes"
    );
    assert!(path.exists(), "its file was not removed");
    assert_eq!(t.sweep_expired().await, 0, "nothing is expired");
    assert_eq!(read_all(&t, &n, &k).await.unwrap(), data);
}

/// Issue 10, item 4, the sweeper's side: it picks expired revisions under the index lock and
/// removes them one by one afterwards. A same-ETag rewrite committed in between is another,
/// unexpired revision and stays.
#[tokio::test]
async fn the_sweeper_spares_a_same_etag_rewrite_committed_after_it_chose_its_victims() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    t.index_loaded().await;
    let (n, k) = (ns("ci"), key("swept"));
    let data = pattern(1000, 8);
    let short = PutOptions {
        ttl: Duration::from_millis(10),
        ..Default::default()
    };
    t.put(&n, &k, upload(data.clone()), short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let victims = t.inner.index.lock().unwrap().expired(SystemTime::now());
    assert_eq!(victims.len(), 1, "the short-lived revision is expired");
    t.put(&n, &k, upload(data.clone()), PutOptions::default())
        .await
        .unwrap();
    let removed = victims
        .iter()
        .filter(|(id, file)| t.inner.remove_expired(id, *file))
        .count();
    assert_eq!(removed, 0, "the victim was replaced before it was removed");
    assert_eq!(
        read_all(&t, &n, &k).await.unwrap(),
        data,
        "the rewrite stays"
    );
    assert_eq!(t.stats().await.unwrap()[0].expirations, 0);
}

/// Issue 10, item 5: the start-up scan runs while the tier serves. It used to remove expired
/// or invalid files by path, without a lock, so a commit renamed onto that path after the scan
/// read the old file was deleted (and the index kept an entry for a file that was gone). Now
/// the scan only collects, and each removal checks, under the index lock, that the path still
/// names the file the scan examined.
#[tokio::test]
async fn the_start_up_scan_removes_only_the_file_it_examined() {
    let dir = TempDir::new().unwrap();
    let n = ns("ci");
    let (expired, truncated) = (key("expired"), key("truncated"));
    {
        let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
        let short = PutOptions {
            ttl: Duration::from_millis(10),
            ..Default::default()
        };
        t.put(&n, &expired, upload(pattern(500, 1)), short)
            .await
            .unwrap();
        t.put(
            &n,
            &truncated,
            upload(pattern(500, 2)),
            PutOptions::default(),
        )
        .await
        .unwrap();
        let (_, path) = id_and_path(&t, &n, &truncated);
        let len = fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;

    // A tier whose start-up scan the test drives step by step (`DiskTier::open` would run it).
    let inner = Arc::new(Inner::open(DiskConfig::new(dir.path())).unwrap());
    let t = DiskTier {
        inner: inner.clone(),
    };
    let scanned = scan::scan(&inner.objects).unwrap();
    assert_eq!(scanned.doomed.len(), 2, "both files are found wanting");
    assert!(scanned.found.is_empty());
    // New revisions are committed onto both paths before the scan's removals run.
    let fresh = |seed| pattern(700, seed);
    for (k, seed) in [(&expired, 3), (&truncated, 4)] {
        t.put(&n, k, upload(fresh(seed)), PutOptions::default())
            .await
            .unwrap();
    }
    assert_eq!(inner.remove_scanned(&scanned.doomed), 0, "nothing removed");
    assert_eq!(inner.index_scanned(&scanned.found), 0);

    for (k, seed) in [(&expired, 3), (&truncated, 4)] {
        assert_eq!(
            read_all(&t, &n, k).await.as_deref(),
            Some(&fresh(seed)[..]),
            "{k}: the new revision survives the scan"
        );
        let (id, path) = id_and_path(&t, &n, k);
        let entry = inner.index.lock().unwrap().get(&id).cloned();
        let entry = entry.unwrap_or_else(|| panic!("{k}: indexed"));
        assert!(
            names(&path, entry.file),
            "{k}: the index names the file on disk, not a dangling one"
        );
    }
    assert_eq!(t.stats().await.unwrap()[0].objects, 2);
}

/// A reader following a spool gets each chunk as it arrives, before the writer has it in the
/// file (it sits in the writer's buffer here until the end); a reader that joins late, after
/// more chunks than the live broadcast keeps, gets the same bytes through the file.
#[tokio::test]
async fn spool_followers_get_chunks_live_and_late_joiners_from_the_file() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    let chunks: Vec<Bytes> = (0..200)
        .map(|i| Bytes::from(pattern(1000 + i, i as u64)))
        .collect();
    let data: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
            .boxed();
    let k = key("spool/live");
    let (spool, write) = t.spool(&ns("ci"), &k, body, PutOptions::default()).unwrap();
    let write = tokio::spawn(write);
    let len = data.len() as u64;
    let mut first = t.read_spool(&spool, 0, len).await.unwrap();

    tx.send(Ok(chunks[0].clone())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), first.next())
        .await
        .expect("the first chunk never reached the follower")
        .unwrap()
        .unwrap();
    assert_eq!(got, chunks[0]);
    assert_eq!(
        *spool.progress.borrow(),
        0,
        "the chunk came from the file, not live"
    );

    // Keeps up for 150 chunks: each is read before the next is sent.
    let mut first_got = got.to_vec();
    for c in &chunks[1..150] {
        tx.send(Ok(c.clone())).await.unwrap();
        let sent = first_got.len() + c.len();
        while first_got.len() < sent {
            first_got.extend_from_slice(&first.next().await.unwrap().unwrap());
        }
    }
    // Joins after 150 chunks, more than the broadcast keeps, and reads from the middle.
    let mut late = t.read_spool(&spool, 500, len - 500).await.unwrap();
    let feeder = tokio::spawn(async move {
        for c in &chunks[150..] {
            tx.send(Ok(c.clone())).await.unwrap();
        }
    });
    while let Some(c) = first.next().await {
        first_got.extend_from_slice(&c.unwrap());
    }
    let mut late_got = Vec::new();
    while let Some(c) = late.next().await {
        late_got.extend_from_slice(&c.unwrap());
    }
    feeder.await.unwrap();
    write.await.unwrap().unwrap();
    assert!(first_got == data, "the live follower's bytes differ");
    assert!(late_got == data[500..], "the late joiner's bytes differ");
}

/// A revision file damaged after it was committed (its header overwritten, or the file cut short)
/// reads as absent instead of failing every read and write of its key until a restart: it is
/// removed with its index entry (the size accounting follows), and the key takes new writes,
/// also create-only ones.
#[tokio::test]
async fn a_damaged_revision_file_reads_as_absent_and_takes_new_writes() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    t.index_loaded().await;
    let damage = |path: &Path, how: &str| {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        match how {
            "header" => std::os::unix::fs::FileExt::write_all_at(&file, b"garbage!", 0).unwrap(),
            _ => file.set_len(file.metadata().unwrap().len() - 100).unwrap(),
        }
    };
    for how in ["header", "length"] {
        let (n, k) = (ns("ci"), key(how));
        let (id, path) = id_and_path(&t, &n, &k);
        t.put(&n, &k, upload(pattern(5000, 1)), PutOptions::default())
            .await
            .unwrap();
        damage(&path, how);
        let err = t.get(&n, &k, GetOptions::default()).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound, "{how}: {err}");
        assert!(!path.exists(), "{how}: the damaged file is removed");
        assert!(
            t.inner.index.lock().unwrap().get(&id).is_none(),
            "{how}: with its index entry"
        );
        assert_eq!(t.used_bytes(), 0, "{how}: and its bytes");
        t.put(&n, &k, upload(pattern(300, 2)), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(read_all(&t, &n, &k).await, Some(pattern(300, 2)), "{how}");
        t.delete(&n, &k).await.unwrap();
    }
    // Written over without being read first: the damaged file is no revision, so even a
    // create-only write replaces it.
    let (n, k) = (ns("ci"), key("overwritten"));
    let (_, path) = id_and_path(&t, &n, &k);
    t.put(&n, &k, upload(pattern(5000, 3)), PutOptions::default())
        .await
        .unwrap();
    damage(&path, "header");
    let create_only = PutOptions {
        precondition: larder_proto::WritePrecondition::create_only(),
        ..Default::default()
    };
    t.put(&n, &k, upload(pattern(700, 4)), create_only)
        .await
        .unwrap();
    assert_eq!(read_all(&t, &n, &k).await, Some(pattern(700, 4)));
    assert_eq!(t.used_bytes(), std::fs::metadata(&path).unwrap().len());
}

/// Reads `k` until this thread serves it from a copy of its own.
async fn read_until_copied(t: &DiskTier, n: &Namespace, k: &Key) -> Vec<u8> {
    let first = read_all(t, n, k).await.unwrap();
    assert_eq!(read_all(t, n, k).await.unwrap(), first);
    let copied = thread_copies::with_copy(t.inner.serial, n.as_str(), k.as_str(), |copy| {
        copy.info.etag.clone()
    });
    assert_eq!(
        copied,
        Some(ETag::of(&first)),
        "the second read made a copy"
    );
    first
}

#[tokio::test]
async fn a_threads_copy_of_a_revision_never_outlives_it() {
    let dir = TempDir::new().unwrap();
    let mut config = DiskConfig::new(dir.path());
    config.limit = Some(250_000);
    let t = DiskTier::open(config).await.unwrap();
    let (n, k) = (ns("ci"), key("hot"));
    let put = |data: Vec<u8>, opts| t.put(&n, &k, upload(data), opts);

    put(pattern(1000, 1), PutOptions::default()).await.unwrap();
    read_until_copied(&t, &n, &k).await;
    put(pattern(1001, 2), PutOptions::default()).await.unwrap();
    assert_eq!(
        read_all(&t, &n, &k).await.unwrap(),
        pattern(1001, 2),
        "replaced"
    );

    read_until_copied(&t, &n, &k).await;
    t.delete(&n, &k).await.unwrap();
    assert!(read_all(&t, &n, &k).await.is_none(), "deleted");

    let brief = PutOptions {
        ttl: Duration::from_millis(100),
        ..Default::default()
    };
    put(pattern(1002, 3), brief).await.unwrap();
    read_until_copied(&t, &n, &k).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(read_all(&t, &n, &k).await.is_none(), "expired");

    put(pattern(100_000, 4), PutOptions::default())
        .await
        .unwrap();
    read_until_copied(&t, &n, &k).await;
    for other in ["a", "b", "c"] {
        t.put(
            &n,
            &key(other),
            upload(pattern(100_000, 5)),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    assert!(read_all(&t, &n, &k).await.is_none(), "evicted");
}

/// A thread copies a hot key of `size` bytes, `others` keys of that size read once push its
/// revision out of the shared cache (from then on no change of the key reaches it there), and
/// the key is replaced: the next read must see the new revision, not the thread's copy.
async fn copy_dies_with_revision_pushed_out(config: DiskConfig, size: usize, others: usize) {
    let t = DiskTier::open(config).await.unwrap();
    let (n, k) = (ns("ci"), key("hot"));
    t.put(&n, &k, upload(pattern(size, 1)), PutOptions::default())
        .await
        .unwrap();
    read_until_copied(&t, &n, &k).await;
    for i in 0..others {
        let other = key(&format!("cold-{i}"));
        t.put(&n, &other, upload(pattern(size, 3)), PutOptions::default())
            .await
            .unwrap();
        read_all(&t, &n, &other).await.unwrap();
    }
    let shared = t
        .inner
        .open_cache
        .lock()
        .unwrap()
        .get(EntryRef(n.as_str(), &key_hash(&k)));
    assert!(shared.is_none(), "pushed out of the shared cache");
    t.put(&n, &k, upload(pattern(size, 2)), PutOptions::default())
        .await
        .unwrap();
    // A HEAD first: it needs no byte of the body, so not the file either, which a copy of a
    // large revision could not reach any more.
    let head = GetOptions {
        head: true,
        ..Default::default()
    };
    assert_eq!(
        t.get(&n, &k, head).await.unwrap().meta.etag,
        ETag::of(&pattern(size, 2)),
        "the new revision's ETag, not the thread's copy's"
    );
    assert_eq!(
        read_all(&t, &n, &k).await.unwrap(),
        pattern(size, 2),
        "the new revision, not the thread's copy of the old"
    );
}

#[tokio::test]
async fn a_copy_dies_with_its_small_revision_pushed_out_of_memory() {
    let dir = TempDir::new().unwrap();
    let mut config = DiskConfig::new(dir.path());
    // Room for about eight small revisions.
    config.memory_cache = 8 * (IN_MEMORY_ENTRY_OVERHEAD as u64 + 500);
    copy_dies_with_revision_pushed_out(config, 500, 24).await;
}

#[tokio::test]
async fn a_copy_dies_with_its_large_revision_pushed_out_of_the_open_files() {
    let dir = TempDir::new().unwrap();
    let mut config = DiskConfig::new(dir.path());
    config.open_files = 8;
    copy_dies_with_revision_pushed_out(config, FIRST_READ + 1000, 24).await;
}

#[test]
fn a_copy_on_one_thread_sees_a_replacement_made_on_another() {
    let dir = TempDir::new().unwrap();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let t = Arc::new(
        runtime()
            .block_on(DiskTier::open(DiskConfig::new(dir.path())))
            .unwrap(),
    );
    let (n, k) = (ns("ci"), key("hot"));
    let (to_reader, reads) = std::sync::mpsc::channel::<()>();
    let (to_writer, answers) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = {
        let (t, n, k) = (t.clone(), n.clone(), k.clone());
        std::thread::spawn(move || {
            let runtime = runtime();
            let mut first = true;
            while reads.recv().is_ok() {
                let got = if first {
                    first = false;
                    runtime.block_on(read_until_copied(&t, &n, &k))
                } else {
                    runtime.block_on(read_all(&t, &n, &k)).unwrap()
                };
                to_writer.send(got).unwrap();
            }
        })
    };
    let writer = runtime();
    for round in 0..5u64 {
        let data = pattern(300, round);
        writer
            .block_on(t.put(&n, &k, upload(data.clone()), PutOptions::default()))
            .unwrap();
        to_reader.send(()).unwrap();
        assert_eq!(answers.recv().unwrap(), data, "round {round}");
    }
    drop(to_reader);
    reader.join().unwrap();
}

/// This process's descriptors open on `path` (or on what it was, once unlinked).
fn descriptors_open_on(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| {
            target
                .to_string_lossy()
                .starts_with(&*path.to_string_lossy())
        })
        .count()
}

#[tokio::test]
async fn a_small_revision_kept_in_memory_holds_no_descriptor() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    let n = ns("ci");
    for (name, size, descriptors) in [("small", 4000, 0), ("large", FIRST_READ + 1, 1)] {
        let k = key(name);
        t.put(&n, &k, upload(pattern(size, 1)), PutOptions::default())
            .await
            .unwrap();
        read_until_copied(&t, &n, &k).await;
        let (_, path) = id_and_path(&t, &n, &k);
        assert_eq!(descriptors_open_on(&path), descriptors, "{name}");
    }
}

#[tokio::test]
async fn a_threads_copy_does_not_keep_a_removed_revisions_file_open() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    let (n, k) = (ns("ci"), key("big"));
    t.put(&n, &k, upload(pattern(100_000, 1)), PutOptions::default())
        .await
        .unwrap();
    read_until_copied(&t, &n, &k).await;
    let (_, path) = id_and_path(&t, &n, &k);
    let open_on_path = || descriptors_open_on(&path);
    assert_eq!(
        open_on_path(),
        1,
        "the shared cache holds the revision open"
    );
    t.delete(&n, &k).await.unwrap();
    assert_eq!(
        open_on_path(),
        0,
        "deleted: its disk space is free although this thread copied it"
    );
}

#[tokio::test]
async fn a_key_read_often_gets_a_copy_after_the_threads_copies_are_full() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    let n = ns("ci");
    for i in 0..thread_copies::COPIES_PER_THREAD {
        let k = key(&format!("early-{i}"));
        t.put(&n, &k, upload(pattern(100, 1)), PutOptions::default())
            .await
            .unwrap();
        read_until_copied(&t, &n, &k).await;
    }
    let hot = key("late");
    t.put(&n, &hot, upload(pattern(100, 2)), PutOptions::default())
        .await
        .unwrap();
    let copied = |t: &DiskTier| {
        thread_copies::with_copy(t.inner.serial, n.as_str(), hot.as_str(), |_| ()).is_some()
    };
    let mut reads = 0;
    while !copied(&t) {
        assert_eq!(read_all(&t, &n, &hot).await.unwrap(), pattern(100, 2));
        reads += 1;
        assert!(
            reads <= 1 + thread_copies::REPLACE_ONE_IN,
            "no copy after {reads} reads"
        );
    }
    assert!(
        reads > 2,
        "a full thread copies a key only now and then ({reads} reads)"
    );
}

/// The disk tier answers every read at hand: a small object's bytes from memory, a larger
/// one's as a region of its file (the conformance suite checks every answer at hand against
/// `get`).
#[tokio::test]
async fn every_read_is_answered_at_hand_from_memory_or_a_file() {
    let dir = TempDir::new().unwrap();
    let t = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
    let n = ns("ci");
    let (small, large) = (pattern(4000, 1), pattern(FIRST_READ + 1, 2));
    for (name, data) in [("small", &small), ("large", &large)] {
        t.put(&n, &key(name), upload(data.clone()), PutOptions::default())
            .await
            .unwrap();
    }
    let read = |name: &str, range: Option<&str>, head: bool| {
        let opts = GetOptions {
            conditions: larder_proto::ReadConditions::from_headers(
                None, None, None, None, None, range,
            ),
            head,
        };
        t.read_at_hand(&n, &key(name), &opts).expect("at hand")
    };
    let file_bytes = |body: AtHandBody| match body {
        AtHandBody::File(region) => {
            let mut bytes = vec![0; region.len as usize];
            region
                .file
                .read_exact_at(&mut bytes, region.offset)
                .unwrap();
            bytes
        }
        other => panic!("not in a file: {other:?}"),
    };
    // The first read opens the revision, later ones find it cached, then copied.
    for _ in 0..3 {
        let whole = read("small", None, false).unwrap();
        assert_eq!(whole.outcome, ReadOutcome::Full);
        assert!(matches!(whole.body, AtHandBody::Bytes(b) if b == small));
        let part = read("small", Some("bytes=10-19"), false).unwrap();
        assert!(matches!(part.body, AtHandBody::Bytes(b) if b == small[10..20]));
        assert_eq!(file_bytes(read("large", None, false).unwrap().body), large);
        let part = read("large", Some("bytes=100-199"), false).unwrap();
        assert_eq!(
            part.outcome,
            ReadOutcome::Partial(ByteRange {
                start: 100,
                len: 100
            })
        );
        assert_eq!(file_bytes(part.body), large[100..200]);
        let head = read("large", None, true).unwrap();
        assert_eq!(head.outcome, ReadOutcome::Full);
        assert!(matches!(head.body, AtHandBody::None));
        let missing = read("missing", None, false).unwrap_err();
        assert_eq!(missing.kind, ErrorKind::NotFound);
    }
}

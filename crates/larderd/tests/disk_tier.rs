//! The disk tier's promises under races and faults, checked against the real `larderd` binary
//! in disk-only mode: a revision is identified by its file, not by its ETag, what was
//! acknowledged survives a power loss, and small objects read again come from memory.
//!
//! Durability cannot be tested by cutting the power, so the durability tests run larderd under
//! `strace` and read from the trace that every directory change was fsynced before the answer
//! went out, and make the fsync fail (strace's fault injection) to see that the answer is then
//! an error. They need strace (scripts/test.sh installs it) and print SKIPPED without it, or
//! fail when `CI` is set.

use futures_util::StreamExt;
use larder_testkit::{Larderd, etag_of, metric};
use reqwest::{Client, StatusCode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

fn body_of(key: usize) -> Vec<u8> {
    (0..4096u64)
        .map(|i| {
            (i.wrapping_mul(2_654_435_761)
                .wrapping_add(key as u64 * 7919)
                >> 5) as u8
        })
        .collect()
}

/// A build reads the same few thousand small blobs over and over. Once read, they come from
/// memory, with no open of their file, within `[disk] memory_cache` (16 MiB by default); with it
/// at 0, every read opens the file again. A thousand 4 KiB objects read in turn are more than
/// the 256 open files kept for larger objects: a cache bounded by count would open each again.
#[tokio::test]
async fn small_objects_read_again_come_from_memory_not_their_files() {
    const KEYS: usize = 1000;
    for (memory_cache, opens_per_reread) in [(None, 0), (Some("0"), KEYS)] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("larder.toml");
        let mut args = vec![];
        if let Some(size) = memory_cache {
            std::fs::write(&config, format!("[disk]\nmemory_cache = \"{size}\"\n")).unwrap();
            args = vec!["--config", config.to_str().unwrap()];
        }
        let srv = Larderd::start(&args);
        let http = Client::new();
        let each_key = |read: bool| {
            let (http, srv) = (&http, &srv);
            futures_util::stream::iter(0..KEYS)
                .map(move |k| async move {
                    let url = srv.object_url("build", &format!("blob-{k}"));
                    if read {
                        let r = http.get(url).send().await.unwrap();
                        assert_eq!(r.status(), StatusCode::OK);
                        assert_eq!(r.bytes().await.unwrap(), body_of(k), "key {k}");
                    } else {
                        let r = http.put(url).body(body_of(k)).send().await.unwrap();
                        assert_eq!(r.status(), StatusCode::CREATED);
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<()>>()
        };
        let opens = || async {
            metric(&srv.scrape(&http).await, "larder_disk_revision_opens_total").unwrap_or(0.0)
        };
        each_key(false).await;
        assert_eq!(
            opens().await,
            0.0,
            "writes open no revision file to read it"
        );
        each_key(true).await;
        assert_eq!(
            opens().await,
            KEYS as f64,
            "the first read of each key opens it"
        );
        for round in 1..=2 {
            each_key(true).await;
            assert_eq!(
                opens().await,
                (KEYS + round * opens_per_reread) as f64,
                "memory_cache {memory_cache:?}, read again {round} times"
            );
        }
        let kept = metric(&srv.scrape(&http).await, "larder_disk_memory_cache_bytes").unwrap();
        if memory_cache.is_none() {
            assert!(kept >= (KEYS * 4096) as f64, "{kept} bytes in memory");
            assert!(kept <= (16 << 20) as f64, "{kept} bytes in memory");
        } else {
            assert_eq!(kept, 0.0);
        }
    }
}

/// Issue 10, item 4. Rewriting identical bytes with a longer TTL keeps the ETag. A GET that had
/// opened the short-lived file could keep it open for the next reads of the key just after the
/// rewrite was committed (the ETag matched), and once the short TTL passed, the next GET found
/// that revision expired and removed the key's file: the new revision, acknowledged, gone.
///
/// For many keys: GETs loop on each key while it is written with a short TTL and rewritten with
/// the same bytes and a long TTL; after the short TTL no key may be missing, and no GET that
/// started after the rewrite was acknowledged may answer 404. The rewrite is sent together with
/// the short-lived write (both bodies released at once, so that the two commits land close to
/// each other: that is when a GET can open the short-lived file and cache it after the
/// rewrite) as a compare-and-swap on the short-lived revision's ETag, so it can only apply
/// after it; if it came first, it is sent again once the short-lived write was acknowledged.
/// A missing key is then a lost write, never a legitimate reordering.
///
/// The race is one of microseconds, so this test catches it by volume: without the fix, 7 of 9
/// rounds (three runs on a loaded 2-core machine) lost one or two of their 240 keys, and every
/// run failed. `disk::tests::a_same_etag_rewrite_is_not_removed_by_the_expiry_of_the_revision_
/// it_replaced` (larder-tier) builds the interleaving deterministically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_bytes_rewritten_with_a_long_ttl_survive_the_short_ttl_under_concurrent_gets() {
    const ROUNDS: usize = 3;
    // Fewer keys than larderd keeps open revisions for (256), so that none of them is pushed
    // out of that cache before the short TTL passes: that would hide a lost write, not prevent
    // it. Each round deletes its keys, which also empties the cache for the next.
    const KEYS: usize = 240;
    const PARALLEL: usize = 8;
    const READERS_PER_KEY: usize = 2;
    const SHORT_TTL_S: u64 = 2;
    let srv = Larderd::start(&[]);
    let http = Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let urls: Arc<Vec<String>> = Arc::new(
            (0..KEYS)
                .map(|k| srv.object_url("revs", &format!("r{round}/{k}")))
                .collect(),
        );
        let etags: Vec<String> = (0..KEYS).map(|k| etag_of(&body_of(k))).collect();
        let rewritten: Arc<Vec<AtomicBool>> =
            Arc::new((0..KEYS).map(|_| AtomicBool::new(false)).collect());
        let lost = Arc::new(AtomicUsize::new(0));
        let get_loop = |k: usize, stop: Arc<AtomicBool>| {
            let (http, urls, rewritten, lost) =
                (http.clone(), urls.clone(), rewritten.clone(), lost.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let acknowledged = rewritten[k].load(Ordering::SeqCst);
                    let r = http.get(&urls[k]).send().await.unwrap();
                    let status = r.status();
                    assert!(
                        status == StatusCode::OK || status == StatusCode::NOT_FOUND,
                        "GET {}: {status}",
                        urls[k]
                    );
                    let _ = r.bytes().await.unwrap();
                    if acknowledged && status == StatusCode::NOT_FOUND {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        let write = |k: usize| {
            let (http, url, etag, rewritten) = (
                http.clone(),
                urls[k].clone(),
                etags[k].clone(),
                rewritten.clone(),
            );
            async move {
                let (go, gate) = tokio::sync::watch::channel(false);
                let gated = |mut gate: tokio::sync::watch::Receiver<bool>| {
                    reqwest::Body::wrap_stream(futures_util::stream::once(async move {
                        let _ = gate.wait_for(|go| *go).await;
                        Ok::<_, std::io::Error>(body_of(k))
                    }))
                };
                let short = http
                    .put(&url)
                    .header("time-to-live", format!("{SHORT_TTL_S}s"))
                    .body(gated(gate.clone()))
                    .send();
                let long = |body: reqwest::Body, if_match: bool| {
                    let req = http.put(&url).header("time-to-live", "1h");
                    let req = if if_match {
                        req.header("if-match", &etag)
                    } else {
                        req
                    };
                    req.body(body).send()
                };
                let first_long = long(gated(gate), true);
                let release = async {
                    // Both requests are in by then; their bodies go together.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    go.send_replace(true);
                };
                let (short, long_first, ()) = tokio::join!(short, first_long, release);
                assert!(short.unwrap().status().is_success(), "short-TTL PUT {url}");
                let mut status = long_first.unwrap().status();
                if status == StatusCode::PRECONDITION_FAILED {
                    // The rewrite came first and found nothing to replace. The short-lived
                    // revision is acknowledged now, so a plain PUT is ordered after it (and
                    // cannot fail because that revision expired meanwhile on a slow machine).
                    status = long(body_of(k).into(), false).await.unwrap().status();
                }
                assert!(status.is_success(), "long-TTL PUT {url}: {status}");
                rewritten[k].store(true, Ordering::SeqCst);
            }
        };

        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(PARALLEL) {
            for &k in chunk {
                readers.extend((0..READERS_PER_KEY).map(|_| get_loop(k, stop.clone())));
            }
            futures_util::future::join_all(chunk.iter().map(|&k| write(k))).await;
        }
        // Every short-lived revision expires while the GETs go on.
        tokio::time::sleep(Duration::from_millis(SHORT_TTL_S * 1000 + 500)).await;
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.await.unwrap();
        }

        let mut missing = Vec::new();
        for (k, url) in urls.iter().enumerate() {
            let r = http.get(url).send().await.unwrap();
            if r.status() != StatusCode::OK {
                missing.push(k);
                continue;
            }
            let etag = r.headers()["etag"].to_str().unwrap().to_string();
            let bytes = r.bytes().await.unwrap();
            assert!(bytes[..] == body_of(k)[..], "{url}: the bytes written");
            assert_eq!(etag, etags[k], "{url}");
        }
        let lost = lost.load(Ordering::SeqCst);
        if !missing.is_empty() || lost > 0 {
            failures.push(format!(
                "round {round}: {} of {KEYS} keys missing ({:?}), {lost} GETs after an \
                 acknowledged rewrite answered 404",
                missing.len(),
                &missing[..missing.len().min(10)],
            ));
        }
        for url in urls.iter() {
            let r = http.delete(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::NO_CONTENT, "DELETE {url}");
        }
    }
    assert!(
        failures.is_empty(),
        "acknowledged long-TTL rewrites were lost after the short TTL:\n{}",
        failures.join("\n")
    );
}

/// Whether strace can run larderd here; if not, says SKIPPED, or fails under CI.
fn strace_available(test: &str) -> bool {
    let works = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        let why = "strace is missing or cannot trace here (scripts/test.sh installs it)";
        assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
        println!("SKIPPED {test}: {why}");
    }
    works
}

/// Where the disk tier keeps `key`'s revision: `objects/<ns>/<hh>/<BLAKE3 of the key>`.
fn object_path(data_dir: &Path, ns: &str, key: &str) -> PathBuf {
    let h = blake3::hash(key.as_bytes()).to_hex().to_string();
    data_dir.join("objects").join(ns).join(&h[..2]).join(&h)
}

/// A key of `ns` whose directory differs from those of `others`.
fn key_in_another_dir(data_dir: &Path, ns: &str, stem: &str, others: &[&str]) -> String {
    let dir_of = |k: &str| object_path(data_dir, ns, k).parent().unwrap().to_path_buf();
    (0..)
        .map(|i| format!("{stem}{i}"))
        .find(|k| others.iter().all(|o| dir_of(o) != dir_of(k)))
        .unwrap()
}

/// One system call of an `strace -f -y -o FILE` log. A call during which another thread's call
/// was logged takes two lines, `<unfinished ...>` and `<... name resumed>`: `start` and `end`
/// are the lines where it began and returned, so `a.end < b.start` means that `a` returned
/// before `b` began.
#[derive(Debug)]
struct Call {
    name: String,
    text: String,
    start: usize,
    end: usize,
}

impl Call {
    fn succeeded(&self) -> bool {
        // strace pads the space before " = " to align the results of short calls.
        self.text
            .rsplit_once(" = ")
            .is_some_and(|(_, ret)| !ret.starts_with('-'))
    }
    /// Whether the call names `path`, as a string argument or as the path `-y` prints for a
    /// descriptor.
    fn names(&self, path: &Path) -> bool {
        let p = path.display();
        self.text.contains(&format!("\"{p}\"")) || self.text.contains(&format!("<{p}>"))
    }
    fn is(&self, names: &[&str]) -> bool {
        names.contains(&self.name.as_str())
    }
}

fn parse_trace(log: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut unfinished: HashMap<(String, String), (usize, String)> = HashMap::new();
    for (i, line) in log.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let name = resumed.split(' ').next().unwrap_or_default().to_string();
            if let Some((start, text)) = unfinished.remove(&(pid.to_string(), name.clone())) {
                let tail = resumed.split_once("resumed>").map_or("", |(_, t)| t);
                let text = format!("{}{tail}", text.trim_end_matches("<unfinished ...>"));
                calls.push(Call {
                    name,
                    text,
                    start,
                    end: i,
                });
            }
        } else if let Some((name, _)) = rest.split_once('(') {
            let name = name.to_string();
            if rest.ends_with("<unfinished ...>") {
                unfinished.insert((pid.to_string(), name), (i, rest.to_string()));
            } else {
                calls.push(Call {
                    name,
                    text: rest.to_string(),
                    start: i,
                    end: i,
                });
            }
        }
    }
    calls.sort_by_key(|c| c.start);
    calls
}

const FSYNC: &[&str] = &["fsync", "fdatasync"];
const WRITE: &[&str] = &["write", "writev", "sendto", "sendmsg"];

fn mkdir_of(dir: &Path) -> impl Fn(&Call) -> bool + '_ {
    move |c| c.is(&["mkdir", "mkdirat"]) && c.names(dir) && c.succeeded()
}

fn fsync_of(dir: &Path) -> impl Fn(&Call) -> bool + '_ {
    move |c| c.is(FSYNC) && c.names(dir) && c.succeeded()
}

/// The first call that began after line `after` and satisfies `pred`.
fn first_after(calls: &[Call], after: usize, pred: impl Fn(&Call) -> bool) -> Option<&Call> {
    calls.iter().find(|c| c.start > after && pred(c))
}

/// The first response with `status` written after line `after`.
fn response_after<'a>(calls: &'a [Call], after: usize, status: &str) -> &'a Call {
    first_after(calls, after, |c| {
        c.is(WRITE) && c.text.contains(&format!("HTTP/1.1 {status}"))
    })
    .unwrap_or_else(|| panic!("no {status} response after line {after}"))
}

/// Issue 10, item 8: a PUT into a new object directory makes the new directories durable
/// (their parents fsynced) before the rename, and the rename durable (the directory fsynced)
/// before it answers; a DELETE fsyncs the directory after the unlink before it answers, also
/// when the key had been evicted already (an unlink nobody synced yet).
#[tokio::test]
async fn directory_changes_are_fsynced_before_the_answer() {
    let test = "directory_changes_are_fsynced_before_the_answer";
    if !strace_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap(); // strace -y prints resolved paths
    let data = root.join("data");
    let log = root.join("strace.log");
    let wrapper = [
        "strace",
        "-f",
        "-qq",
        "-y",
        "-s",
        "24",
        "-o",
        log.to_str().unwrap(),
        "-e",
        "trace=mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,fsync,fdatasync,\
         write,writev,sendto,sendmsg",
        "--",
    ];
    // Room for one of the two 100 KiB objects below, so that the second evicts the first.
    let mut srv = Larderd::start_wrapped_in(&wrapper, &data, &["--disk-limit", "150KiB"]);
    let http = Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let ns = "durable";
    let evicted = "evicted";
    let evicting = key_in_another_dir(&data, ns, "evicting", &[evicted]);
    let put = |key: &str, len: usize| {
        let req = http.put(srv.object_url(ns, key)).body(vec![7u8; len]);
        async move { req.send().await.unwrap().status() }
    };
    let delete = |key: &str| {
        let req = http.delete(srv.object_url(ns, key));
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(put("new", 1000).await, StatusCode::CREATED);
    assert_eq!(delete("new").await, StatusCode::NO_CONTENT);
    assert_eq!(put(evicted, 100 << 10).await, StatusCode::CREATED);
    assert_eq!(put(&evicting, 100 << 10).await, StatusCode::CREATED);
    let gone = http.get(srv.object_url(ns, evicted)).send().await.unwrap();
    let gone = gone.status();
    assert_eq!(gone, StatusCode::NOT_FOUND, "evicted by the size limit");
    assert_eq!(delete(evicted).await, StatusCode::NO_CONTENT);
    srv.terminate();
    let calls = parse_trace(&std::fs::read_to_string(&log).unwrap());

    // The PUT into a new namespace: objects/durable and objects/durable/<hh> are new.
    let file = object_path(&data, ns, "new");
    let hh = file.parent().unwrap();
    let ns_dir = hh.parent().unwrap();
    let objects = ns_dir.parent().unwrap();
    // What the tier did to its object tree, for the failure messages.
    let story: Vec<String> = calls
        .iter()
        .filter(|c| {
            c.text.contains(&*objects.to_string_lossy())
                || c.is(WRITE) && c.text.contains("HTTP/1.1")
        })
        .map(|c| format!("{}-{}: {}", c.start, c.end, c.text))
        .collect();
    let story = story.join("\n");
    let call = |what: &str, pred: &dyn Fn(&Call) -> bool, after: usize| {
        first_after(&calls, after, pred)
            .unwrap_or_else(|| panic!("no {what} after line {after} in:\n{story}"))
    };
    let made_ns = call("mkdir of the namespace directory", &mkdir_of(ns_dir), 0);
    let synced_objects = call(
        "fsync of objects/ after it",
        &fsync_of(objects),
        made_ns.end,
    );
    let made_hh = call("mkdir of the key's directory", &mkdir_of(hh), made_ns.end);
    let synced_ns = call(
        "fsync of the namespace directory after it",
        &fsync_of(ns_dir),
        made_hh.end,
    );
    let renamed = call(
        "rename of the revision into place",
        &|c: &Call| c.is(&["rename", "renameat", "renameat2"]) && c.names(&file) && c.succeeded(),
        0,
    );
    assert!(
        synced_objects.end < renamed.start && synced_ns.end < renamed.start,
        "the new directories are durable before a revision is renamed into them"
    );
    let synced_hh = call(
        "fsync of the key's directory after the rename",
        &fsync_of(hh),
        renamed.end,
    );
    let created = response_after(&calls, renamed.end, "201");
    assert!(
        synced_hh.end < created.start,
        "the rename is durable before the 201: {synced_hh:?} {created:?}"
    );

    // The DELETE: unlink, then fsync of the directory, then 204.
    let unlinked = call(
        "unlink of the deleted revision",
        &|c: &Call| c.is(&["unlink", "unlinkat"]) && c.names(&file) && c.succeeded(),
        renamed.end,
    );
    let synced = call("fsync after the unlink", &fsync_of(hh), unlinked.end);
    let no_content = response_after(&calls, unlinked.end, "204");
    assert!(
        synced.end < no_content.start,
        "the removal is durable before the 204"
    );

    // The DELETE of the evicted key finds nothing to unlink; the eviction's unlink was not
    // synced, so the DELETE syncs the directory before its 204.
    let file = object_path(&data, ns, evicted);
    let unlink_of = |c: &Call| c.is(&["unlink", "unlinkat"]) && c.names(&file);
    let evicted_at = call(
        "unlink by the eviction",
        &|c: &Call| unlink_of(c) && c.succeeded(),
        0,
    );
    let missed = call(
        "the DELETE's unlink of the evicted key",
        &|c: &Call| unlink_of(c) && !c.succeeded(),
        evicted_at.end,
    );
    let synced = call(
        "fsync of the evicted key's directory",
        &fsync_of(file.parent().unwrap()),
        missed.end,
    );
    let no_content = response_after(&calls, missed.end, "204");
    assert!(
        synced.end < no_content.start,
        "the eviction's unlink is durable before the DELETE's 204"
    );
}

/// Issue 10, item 8: when the directory fsync after a PUT's rename or a DELETE's unlink fails,
/// the client gets an error, not an acknowledgement (the rename or unlink has happened and
/// cannot be undone, so readers may already see it; the message says so). strace makes every
/// fsync of that one directory fail with EIO.
#[tokio::test]
async fn a_write_or_delete_whose_directory_fsync_fails_is_not_acknowledged() {
    let test = "a_write_or_delete_whose_directory_fsync_fails_is_not_acknowledged";
    if !strace_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().canonicalize().unwrap().join("data");
    let ns = "faulty";
    let failing_dir = object_path(&data, ns, "k").parent().unwrap().to_path_buf();
    let wrapper = [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-P",
        failing_dir.to_str().unwrap(),
        "-e",
        "trace=fsync",
        "-e",
        "inject=fsync:error=EIO",
        "--",
    ];
    let mut srv = Larderd::start_wrapped_in(&wrapper, &data, &[]);
    let http = Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    let r = http
        .put(srv.object_url(ns, "k"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let reason = r.text().await.unwrap();
    assert!(reason.contains("may not survive a power loss"), "{reason}");
    // What a failed fsync cannot undo: the revision was renamed into place.
    let r = http.get(srv.object_url(ns, "k")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the rename happened");

    let r = http.delete(srv.object_url(ns, "k")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let reason = r.text().await.unwrap();
    assert!(
        reason.contains("may come back after a power loss"),
        "{reason}"
    );

    // Writes into other directories are not affected.
    let other = key_in_another_dir(&data, ns, "other", &["k"]);
    let r = http
        .put(srv.object_url(ns, &other))
        .body("y")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    srv.terminate();
}

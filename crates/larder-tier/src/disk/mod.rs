//! The disk tier: one immutable file per revision under `DIR/objects/<ns>/<hh>/<hash(key)>`.
//!
//! A revision is written to `DIR/tmp`, fsynced, and renamed over the key's file, so opening the
//! key's path yields one complete revision, and a reader keeps reading its revision through its
//! file descriptor even while a writer replaces it or eviction unlinks it. Nothing else is ever
//! written in place, so a `kill -9` at any instant leaves either the old or the new revision,
//! plus temp files that the next start removes.
//!
//! Durability: the temp file is fsynced before the rename, the key's directory after it, and a
//! directory created for a key is made durable (its parent fsynced) before anything is renamed
//! into it; a DELETE fsyncs the directory it removed from. Only then is a write or delete
//! acknowledged, so a power loss neither loses an acknowledged revision nor brings back a key
//! whose DELETE was acknowledged. Eviction, expiry and the start-up scan remove without a sync
//! (what comes back after a power loss is expired, invalid, or a revision the cache may hold
//! until it is evicted again), but they note the directory, so that a DELETE which finds the key
//! already gone still syncs it.
//!
//! Reads are positioned reads of large chunks (`read_chunk`, 1 MiB by default) on the blocking
//! pool with a little read-ahead, so memory stays flat in the object size; small objects come
//! back from the very read that decoded the header.
//!
//! Files: this one holds the tier itself (reads, commits, deletes, eviction, expiry); `format`
//! the revision file's header; `index` the in-memory index; `files` temp files, positioned reads
//! and durable directory changes; `block_writer` writing a temp file mostly past the page cache;
//! `scan` the start-up scan; `spool` the `CacheTier` capability (spooling a copy from another
//! tier while readers follow it); `pool` the read buffers; `open_cache` the revisions kept for
//! recently read keys (small ones in memory, larger ones open); `thread_copies` each thread's
//! copies of the hot ones.

mod block_writer;
mod files;
mod format;
mod index;
mod open_cache;
mod pool;
mod scan;
mod spool;
mod thread_copies;

use files::{
    TempFile, create_dir_all_synced, names, read_cached_at, read_full_at, sync_dir, write_temp,
};
pub use spool::{Spool, StagedRevision};

use crate::error::{ErrorKind, TierError};
use crate::tier::{
    AtHand, AtHandBody, BodyStream, CacheTier, FileRegion, GetOptions, GetResponse, NamespaceUsage,
    ObjectMeta, PutOptions, PutResult, Tier, TierStats, UploadStream,
};
use async_trait::async_trait;
use bytes::Bytes;
use format::{Fixed, MetaJson};
use futures_util::{FutureExt, StreamExt};
use index::{Entry, EntryId, EntryRef, FileId, Index};
use larder_proto::{ByteRange, ETag, Key, Namespace, WriteOutcome, decide_read, decide_write};
use open_cache::{OpenCache, OpenRevisions};
use pool::BufferPool;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// What a revision kept in memory costs beyond its body and stored headers, counted against
/// `DiskConfig::memory_cache` (the entry, its ETag, its slots in the cache): a cache of empty
/// bodies is bounded too.
const IN_MEMORY_ENTRY_OVERHEAD: usize = 512;

/// `DiskConfig::memory_cache` unless configured: the working set of small blobs a build reads
/// over and over (thousands of them), at a memory cost any machine running a cache can afford.
pub const DEFAULT_MEMORY_CACHE: u64 = 16 << 20;

/// How much of a file the first read takes: the header plus, for small objects, the whole body.
const FIRST_READ: usize = 16 * 1024;

/// Settings of a [`DiskTier`]; [`DiskConfig::new`] gives the defaults for a directory.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Directory the tier owns (created if missing): revision files under `objects/`, temp files
    /// under `tmp/`. Nothing else may write there.
    pub dir: PathBuf,
    /// Total bytes of revision files allowed; the least recently read are evicted beyond it.
    pub limit: Option<u64>,
    /// Size of each positioned read when streaming a body.
    pub read_chunk: usize,
    /// Chunks read ahead of the one being sent. One is enough to keep the socket busy (hyper
    /// queues up to two more); each extra one costs a chunk of memory per download.
    pub read_ahead: usize,
    /// How often expired revisions are swept (they are also refused at read time).
    pub sweep_interval: Duration,
    /// Write bodies of 1 MiB and more with `O_DIRECT` (see `block_writer`). Off, everything
    /// goes through the page cache: for a device whose direct writes are slow one at a time
    /// (high-latency network block storage), where the kernel's writeback keeps more in flight.
    pub direct_writes: bool,
    /// Bytes of small revisions (whose whole body comes with the read of their header, up to
    /// about 16 KiB) kept in memory for the keys read recently, each counting its body, its
    /// stored headers and `IN_MEMORY_ENTRY_OVERHEAD`. A hit costs no syscall; 0 keeps none.
    pub memory_cache: u64,
    /// Revisions of larger objects kept open for the keys read recently, one descriptor each:
    /// a re-read costs no open, read, fstat or close. By default a quarter of the process's
    /// descriptor limit, between 256 and 8192 (`default_open_files`).
    pub open_files: usize,
}

impl DiskConfig {
    /// Defaults for `dir`: no size limit, 1 MiB reads, one chunk of read-ahead, a sweep every
    /// minute, direct writes, 16 MiB of small revisions in memory, `default_open_files()`
    /// larger ones open.
    pub fn new(dir: impl Into<PathBuf>) -> DiskConfig {
        DiskConfig {
            dir: dir.into(),
            limit: None,
            read_chunk: 1 << 20,
            read_ahead: 1,
            sweep_interval: Duration::from_secs(60),
            direct_writes: true,
            memory_cache: DEFAULT_MEMORY_CACHE,
            open_files: default_open_files(),
        }
    }
}

/// A quarter of the process's soft descriptor limit (`RLIMIT_NOFILE`), between 256 and 8192:
/// the rest is for connections, uploads and fills. Beyond the working set it holds, larger
/// objects read in turn cost an open per read; 1000 objects of 64 KiB read in turn ran at 0.58x
/// nginx's requests/s with 256 kept open, against 1.01x for 200 (BENCHMARKS.md, round 12).
pub fn default_open_files() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    (soft / 4).clamp(256, 8192) as usize
}

struct Inner {
    config: DiskConfig,
    objects: PathBuf,
    tmp: PathBuf,
    index: Mutex<Index>,
    buffers: Arc<BufferPool>,
    /// Recently read revisions, open: a hot key is served without open/read/fstat/close, and a
    /// small object straight from the bytes of its first read.
    open_cache: Mutex<OpenRevisions<Arc<OpenRevision>>>,
    /// Which tier this is among those of the process, for the threads' copies of its revisions
    /// (`thread_copies`).
    serial: u64,
    /// Becomes true once the start-up scan has filled the index.
    loaded: watch::Sender<bool>,
    /// Object directories whose entry in their parent this process has made durable.
    durable_dirs: Mutex<HashSet<PathBuf>>,
    unsynced: UnsyncedUnlinks,
}

/// Directories where a file was unlinked without an fsync of the directory since, each with the
/// sequence number of its latest such unlink. Whoever syncs a directory afterwards clears what
/// it covered; a DELETE that finds its key already gone syncs the directory if it is listed, so
/// that a power loss cannot bring back an evicted or concurrently deleted revision of a key
/// whose DELETE was acknowledged.
#[derive(Default)]
struct UnsyncedUnlinks(Mutex<(u64, HashMap<PathBuf, u64>)>);

impl UnsyncedUnlinks {
    fn record(&self, dir: &Path) {
        let mut state = self.0.lock().unwrap();
        state.0 += 1;
        let seq = state.0;
        state.1.insert(dir.to_path_buf(), seq);
    }

    /// The latest unsynced unlink in `dir`, to hand to `synced` once `dir` was synced.
    fn pending(&self, dir: &Path) -> Option<u64> {
        self.0.lock().unwrap().1.get(dir).copied()
    }

    /// `dir` was synced after `pending` returned `seq`: unlinks up to `seq` are durable.
    fn synced(&self, dir: &Path, seq: u64) {
        let mut state = self.0.lock().unwrap();
        if state.1.get(dir) == Some(&seq) {
            state.1.remove(dir);
        }
    }
}

/// The local disk tier (see the [module documentation](crate::disk)): one immutable file per
/// revision, an in-memory index for the size limit and eviction, and a background sweeper of
/// expired revisions. Cloning is cheap and shares the same tier.
#[derive(Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

enum Upload {
    Chunk(Bytes),
    /// The body ended cleanly; without it the writer discards the temp file.
    Finish,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A revision file that cannot be read as one: an operator should hear of it (a failing disk,
/// something else writing under the data directory), once per file.
fn report_damaged(path: &Path, why: &dyn std::fmt::Display) {
    metrics::counter!("larder_disk_damaged_revisions_total").increment(1);
    tracing::error!(
        path = %path.display(),
        reason = %why,
        "damaged revision file: the key reads as absent"
    );
}

fn key_hash(key: &Key) -> [u8; 32] {
    *blake3::hash(key.as_str().as_bytes()).as_bytes()
}

fn parse_hex32(name: &str) -> Option<[u8; 32]> {
    ETag::parse(name).map(|e| e.to_bytes())
}

impl DiskTier {
    /// Opens (creating if needed) the tier at `config.dir`: removes temp files and anything in
    /// the object tree that is not a complete, unexpired revision, and rebuilds the index.
    pub async fn open(config: DiskConfig) -> Result<DiskTier, TierError> {
        let inner = tokio::task::spawn_blocking(move || Inner::open(config))
            .await
            .map_err(|e| TierError::internal("disk tier start-up", e))??;
        let tier = DiskTier {
            inner: Arc::new(inner),
        };
        let loader = tier.inner.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = loader.load_index() {
                tracing::error!(error = %e, "disk tier index could not be loaded; size limit not enforced");
            }
        });
        tier.spawn_sweeper();
        Ok(tier)
    }

    /// Waits until the start-up scan has loaded the index (stats and the size limit are then
    /// complete; reads and writes never wait for it).
    pub async fn index_loaded(&self) {
        let mut rx = self.inner.loaded.subscribe();
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    fn spawn_sweeper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.config.sweep_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || inner.sweep_expired()).await;
            }
        });
    }

    /// Removes every expired revision now (also runs periodically).
    pub async fn sweep_expired(&self) -> usize {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.sweep_expired())
            .await
            .unwrap_or(0)
    }

    /// Total bytes of revision files (header + body) counted against the limit.
    pub fn used_bytes(&self) -> u64 {
        self.inner.index.lock().unwrap().total_bytes
    }
}

impl Inner {
    fn open(config: DiskConfig) -> Result<Inner, TierError> {
        let objects = config.dir.join("objects");
        let tmp = config.dir.join("tmp");
        let create = |d: &Path| {
            create_dir_all_synced(d)
                .map_err(|e| TierError::io(&format!("create {}", d.display()), &e))
        };
        create(&objects)?;
        create(&tmp)?;
        // Also when `objects` already existed: a previous process may have died before it made
        // the directory's entry durable. Once per start, so cheap.
        sync_dir(&config.dir)
            .map_err(|e| TierError::io(&format!("sync {}", config.dir.display()), &e))?;
        // Uploads that were in flight when the previous process died.
        let mut removed_tmp = 0;
        for entry in fs::read_dir(&tmp).map_err(|e| TierError::io("read tmp dir", &e))? {
            let entry = entry.map_err(|e| TierError::io("read tmp dir", &e))?;
            if fs::remove_file(entry.path()).is_ok() {
                removed_tmp += 1;
            }
        }
        if removed_tmp > 0 {
            tracing::info!(
                removed_temp_files = removed_tmp,
                "removed uploads of a previous process"
            );
        }
        // Enough idle buffers for a few dozen downloads' read-ahead; beyond that, buffers are freed.
        let buffers = BufferPool::new(config.read_chunk, 8);
        Ok(Inner {
            open_cache: Mutex::new(OpenRevisions::new(
                OpenCache::new(
                    usize::MAX,
                    usize::try_from(config.memory_cache).unwrap_or(usize::MAX),
                ),
                OpenCache::new(config.open_files, usize::MAX),
            )),
            serial: {
                static TIERS: AtomicU64 = AtomicU64::new(0);
                TIERS.fetch_add(1, Ordering::Relaxed)
            },
            buffers,
            config,
            tmp,
            index: Mutex::new(Index::default()),
            loaded: watch::channel(false).0,
            durable_dirs: Mutex::new(HashSet::from([objects.clone()])),
            unsynced: UnsyncedUnlinks::default(),
            objects,
        })
    }

    /// The current revision's validators, from its file: the truth even while the index loads.
    /// A damaged file is no revision: the commit about to be decided replaces it.
    fn current_validators(
        &self,
        path: &Path,
        now_ms: u64,
    ) -> Result<Option<larder_proto::Validators>, TierError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TierError::io("open current revision", &e)),
        };
        let mut buf = [0u8; format::FIXED_LEN];
        let n = read_full_at(&file, &mut buf, 0)
            .map_err(|e| TierError::io("read current revision", &e))?;
        let fixed = match Fixed::decode(&buf[..n]) {
            Ok(fixed) => fixed,
            Err(e) => {
                report_damaged(path, &e);
                return Ok(None);
            }
        };
        if fixed.expires_ms <= now_ms {
            return Ok(None); // an expired revision is not current, even before the sweeper runs
        }
        Ok(Some(larder_proto::Validators {
            etag: fixed.etag(),
            size: fixed.body_len,
            last_modified: fixed.last_modified(),
        }))
    }

    fn path_of(&self, ns: &str, hash: &[u8; 32]) -> PathBuf {
        // Built at its final capacity: three `join`s reallocated twice, on every read of a key
        // that is not cached.
        let hash = ETag::from_bytes(*hash);
        let h = hash.as_str();
        let parts: [&OsStr; 7] = [
            self.objects.as_os_str(),
            "/".as_ref(),
            ns.as_ref(),
            "/".as_ref(),
            h[..2].as_ref(),
            "/".as_ref(),
            h.as_ref(),
        ];
        let mut path = std::ffi::OsString::with_capacity(parts.iter().map(|p| p.len()).sum());
        for part in parts {
            path.push(part);
        }
        PathBuf::from(path)
    }

    /// Refuses a conditional write that already fails, before a byte of its body is read (CI
    /// clients save caches with `If-None-Match: *` over and over, and a refused body is then
    /// never sent). Only a shortcut: the commit's check under the index lock decides.
    fn precheck(
        &self,
        ns: &Namespace,
        key: &Key,
        precondition: &larder_proto::WritePrecondition,
    ) -> Result<(), TierError> {
        if precondition.if_match.is_none() && precondition.if_none_match.is_none() {
            return Ok(());
        }
        let path = self.path_of(ns.as_str(), &key_hash(key));
        let current = self.current_validators(&path, now_ms())?;
        if decide_write(precondition, current.as_ref()) == WriteOutcome::PreconditionFailed {
            return Err(TierError::precondition_failed(current.map(|v| v.etag)));
        }
        Ok(())
    }

    /// Reads the current revision's header and a first slice of its body from one descriptor.
    /// A damaged file (its header unreadable, its length not the one the header gives) is
    /// removed and the key reads as absent — a tier above fills it again — instead of failing
    /// every read of the key until a restart's scan.
    fn open_revision(
        &self,
        id: EntryRef<'_>,
        path: &Path,
    ) -> Result<Option<OpenRevision>, TierError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TierError::io("open revision", &e)),
        };
        metrics::counter!("larder_disk_revision_opens_total").increment(1);
        // The first read lands in this thread's scratch buffer and only the bytes read are kept:
        // a zeroed 16 KiB allocation per open was a third of the instructions of a read that
        // opens its file, and a cached revision held all of it however small its body.
        thread_local! {
            static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut scratch = SCRATCH.take();
        scratch.resize(FIRST_READ, 0);
        let opened = self.decode_revision(id, path, file, &mut scratch);
        SCRATCH.set(scratch);
        opened
    }

    /// `open_revision` past the open, `scratch` being `FIRST_READ` bytes to read into.
    fn decode_revision(
        &self,
        id: EntryRef<'_>,
        path: &Path,
        file: File,
        scratch: &mut [u8],
    ) -> Result<Option<OpenRevision>, TierError> {
        let n = read_full_at(&file, scratch, 0).map_err(|e| TierError::io("read revision", &e))?;
        let fixed = match Fixed::decode(&scratch[..n]) {
            Ok(f) => f,
            Err(e) => {
                self.remove_damaged(id, path, &file, &e);
                return Ok(None);
            }
        };
        let longer_header;
        let first: &[u8] = if fixed.header_len as usize > n {
            let mut all = scratch[..n].to_vec();
            all.resize(fixed.header_len as usize, 0);
            let m = read_full_at(&file, &mut all[n..], n as u64)
                .map_err(|e| TierError::io("read revision", &e))?;
            all.truncate(n + m);
            longer_header = all;
            &longer_header
        } else {
            &scratch[..n]
        };
        let (fixed, meta) = match format::decode_header(first) {
            Ok(decoded) => decoded,
            Err(e) => {
                self.remove_damaged(id, path, &file, &e);
                return Ok(None);
            }
        };
        let md = file
            .metadata()
            .map_err(|e| TierError::io("stat revision", &e))?;
        if md.len() != fixed.file_len() {
            self.remove_damaged(id, path, &file, &"file length does not match its header");
            return Ok(None);
        }
        // A body that came whole with the header needs its file no more. Of a larger one nothing
        // is kept: it is sent from the file (sendfile, or positioned reads of the page cache),
        // and thousands of revisions kept open then cost a few hundred bytes each, not 16 KiB.
        let body = &first[fixed.header_len as usize..];
        let (small_body, file) = if body.len() as u64 == fixed.body_len {
            (Bytes::copy_from_slice(body), None)
        } else {
            (Bytes::new(), Some(Arc::new(file)))
        };
        Ok(Some(OpenRevision {
            file,
            info: RevisionInfo {
                file_id: FileId::of(&md),
                etag: fixed.etag(),
                fixed,
                headers: meta.headers.into(),
                small_body,
            },
            retired: Arc::new(AtomicBool::new(false)),
        }))
    }

    fn get_blocking(
        self: &Arc<Self>,
        ns: &Namespace,
        key: &Key,
        opts: &GetOptions,
    ) -> Result<GetResponse, TierError> {
        let AtHand {
            outcome,
            meta,
            body,
            source,
        } = self.read_at_hand(ns, key, opts)?;
        let (body, file) = match body {
            AtHandBody::None => (None, None),
            AtHandBody::Bytes(bytes) => (Some(crate::tier::bytes_stream(bytes)), None),
            AtHandBody::File(region) => (Some(self.body_stream(&region)), Some(region)),
        };
        Ok(GetResponse {
            outcome,
            meta,
            body,
            source,
            file,
        })
    }

    /// Looks the key's revision up (in this thread's copies, the open-revision cache, or on
    /// disk) and decides the read against it: every read is answered at hand, its body in
    /// memory or in the revision's file.
    fn read_at_hand(
        self: &Arc<Self>,
        ns: &Namespace,
        key: &Key,
        opts: &GetOptions,
    ) -> Result<AtHand, TierError> {
        let now = now_ms();
        let from_copy = thread_copies::with_copy(self.serial, ns.as_str(), key.as_str(), |copy| {
            let revision = Revision {
                info: &copy.info,
                file: RevisionFile::OfCopy(&copy.revision),
            };
            self.decide((&copy.id).into(), revision, opts, now, &mut copy.touched_ms)
        });
        // `None` inside: the revision went while the copy was read; the shared path decides.
        if let Some(Some(decided)) = from_copy {
            return decided;
        }
        let hash = key_hash(key);
        let id = EntryRef(ns.as_str(), &hash);
        let rev = match self.cached(id) {
            Some(rev) => {
                // Read before: worth a copy of the thread's own.
                thread_copies::keep(self.serial, ns.as_str(), key.as_str(), id, &rev);
                rev
            }
            None => {
                let path = self.path_of(ns.as_str(), &hash);
                let Some(rev) = self.open_revision(id, &path)? else {
                    return Err(TierError::not_found());
                };
                let rev = Arc::new(rev);
                self.cache_if_current(id, &rev);
                rev
            }
        };
        let revision = Revision {
            info: &rev.info,
            file: RevisionFile::Open(rev.file.as_ref()),
        };
        self.decide(id, revision, opts, now, &mut 0)
            .expect("an open revision has its file, or its whole body in memory")
    }

    /// Decides a read of `revision`, the key's revision when it was looked up; `None` when the
    /// body needs the file and a thread's copy finds its revision gone. A read of the body is
    /// recorded in the index unless this thread did so for the key less than
    /// `TOUCH_INTERVAL_MS` before (`touched_ms`, which it updates).
    fn decide(
        &self,
        id: EntryRef<'_>,
        revision: Revision<'_>,
        opts: &GetOptions,
        now: u64,
        touched_ms: &mut u64,
    ) -> Option<Result<AtHand, TierError>> {
        let info = revision.info;
        let fixed = &info.fixed;
        if fixed.expires_ms <= now {
            self.remove_expired(&id.to_owned(), info.file_id);
            return Some(Err(TierError::not_found()));
        }
        let meta = ObjectMeta {
            etag: info.etag.clone(),
            size: fixed.body_len,
            last_modified: fixed.last_modified(),
            expires: fixed.expires(),
            headers: info.headers.clone(),
        };
        let outcome = decide_read(&opts.conditions, Some(&meta.validators()));
        let body = match outcome.body_range(meta.size) {
            Some(ByteRange { start, len }) if !opts.head => {
                let body = if start + len <= info.small_body.len() as u64 {
                    // Bytes already in memory need no file for the kernel to send them from.
                    AtHandBody::Bytes(
                        info.small_body
                            .slice(start as usize..(start + len) as usize),
                    )
                } else {
                    AtHandBody::File(FileRegion {
                        file: revision.file.get()?,
                        offset: fixed.header_len as u64 + start,
                        len,
                    })
                };
                if now.saturating_sub(*touched_ms) >= thread_copies::TOUCH_INTERVAL_MS {
                    *touched_ms = now;
                    self.index.lock().unwrap().touch(id, info.file_id);
                    // The shared cache's own LRU sees the key as read too, or it would push a
                    // key out that only the threads' copies serve.
                    self.open_cache.lock().unwrap().refresh(id);
                }
                body
            }
            _ => AtHandBody::None,
        };
        Some(Ok(AtHand {
            outcome,
            meta,
            body,
            source: "disk",
        }))
    }

    /// The bytes of `region`, read in chunks of `read_chunk`.
    fn body_stream(&self, region: &FileRegion) -> BodyStream {
        let chunk = self.config.read_chunk as u64;
        let (file, start, end) = (
            region.file.clone(),
            region.offset,
            region.offset + region.len,
        );
        let offsets = (0..region.len.div_ceil(chunk)).map(move |i| start + i * chunk);
        let pool = self.buffers.clone();
        let reads = futures_util::stream::iter(offsets).map(move |off| {
            let (file, pool) = (file.clone(), pool.clone());
            let n = chunk.min(end - off) as usize;
            async move {
                // Page-cached bytes are copied right here; only what would wait for the disk
                // goes to the blocking pool (the hop costs more than the copy).
                let mut buf = pool.take();
                let cached = read_cached_at(&file, &mut buf[..n], off);
                if cached == n {
                    return Ok(pool.freeze(buf, n));
                }
                tokio::task::spawn_blocking(move || {
                    let got = cached
                        + read_full_at(&file, &mut buf[cached..n], off + cached as u64)
                            .map_err(|e| TierError::io("read body", &e))?;
                    if got != n {
                        // Revision files are immutable; a short read means the disk lied.
                        return Err(TierError::internal(
                            "read body",
                            "revision file is shorter than its header says",
                        ));
                    }
                    Ok(pool.freeze(buf, n))
                })
                .await
                .map_err(|e| TierError::internal("read body", e))?
            }
        });
        reads.buffered(self.config.read_ahead.max(1)).boxed()
    }

    fn cached(&self, id: EntryRef<'_>) -> Option<Arc<OpenRevision>> {
        self.open_cache.lock().unwrap().get(id)
    }

    /// Keeps an opened revision for the next reads of its key, but only while the index still
    /// names it current: the check and the insert happen under the index lock, which every
    /// commit, delete and eviction holds while it also drops the key's cached revision, so a
    /// replaced revision can never be cached after its replacement. Current means the same
    /// file, not the same ETag: identical bytes rewritten with a new TTL keep the ETag, and
    /// caching the old file would serve its TTL and headers, and expire the key with it.
    fn cache_if_current(&self, id: EntryRef<'_>, rev: &Arc<OpenRevision>) {
        let index = self.index.lock().unwrap();
        if index.get(&id).is_none_or(|e| e.file != rev.info.file_id) {
            return;
        }
        let in_memory = rev.file.is_none();
        let headers: usize = rev
            .info
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum();
        let weight = rev.info.small_body.len() + headers + IN_MEMORY_ENTRY_OVERHEAD;
        let (pushed_out, replaced) = {
            let mut cache = self.open_cache.lock().unwrap();
            let left = cache.insert(id.to_owned(), rev.clone(), weight, in_memory);
            report_memory_cache(&cache);
            left
        };
        // Copies of a revision are only valid while the shared cache holds it: once it has let
        // go, nothing would retire it when its key changes. Retired before the index lock goes,
        // so that no commit of the key can be acknowledged while a copy still passes for current.
        for left in pushed_out.iter().chain(&replaced) {
            left.retire();
        }
        drop(index);
    }

    /// Must be called with the index lock held, whenever the key's file changes.
    fn uncache(&self, id: &EntryId) {
        let mut cache = self.open_cache.lock().unwrap();
        if let Some(rev) = cache.remove(id) {
            report_memory_cache(&cache);
            drop(cache);
            rev.retire();
        }
    }

    /// Removes the expired revision in `file`, if it is still the key's current revision and
    /// still expired, both checked under the lock: a revision committed since (even with the
    /// same ETag) is another file, and a removal decided before the lock was taken must not
    /// fall on it. Returns whether it removed anything.
    fn remove_expired(&self, id: &EntryId, file: FileId) -> bool {
        let mut index = self.index.lock().unwrap();
        let now = now_ms();
        if !index
            .get(id)
            .is_some_and(|e| e.file == file && e.expires_ms <= now)
        {
            return false;
        }
        self.uncache(id);
        self.unlink_if_same(&index, &self.path_of(&id.0, &id.1), file);
        index.remove(id);
        index.expirations += 1;
        metrics::counter!("larder_disk_expirations_total").increment(1);
        true
    }

    /// Removes the damaged revision file `file`, opened at `path`, if the path still names it
    /// (a commit may have replaced it meanwhile), with its index entry.
    fn remove_damaged(
        &self,
        id: EntryRef<'_>,
        path: &Path,
        file: &File,
        why: &dyn std::fmt::Display,
    ) {
        report_damaged(path, why);
        let Ok(md) = file.metadata() else {
            return;
        };
        let damaged = FileId::of(&md);
        let mut index = self.index.lock().unwrap();
        self.unlink_if_same(&index, path, damaged);
        if index.get(&id).is_some_and(|e| e.file == damaged) {
            let id = id.to_owned();
            self.uncache(&id);
            index.remove(&id);
        }
    }

    fn sweep_expired(&self) -> usize {
        let expired = self.index.lock().unwrap().expired(SystemTime::now());
        expired
            .into_iter()
            .filter(|(id, file)| self.remove_expired(id, *file))
            .count()
    }

    /// Unlinks `path` if it still names `file`, and notes the directory as not synced. Takes
    /// the index (its lock held) because every rename onto an object path happens under that
    /// lock: the check and the unlink are then one step, and nothing but the examined file is
    /// ever removed.
    fn unlink_if_same(&self, _locked: &Index, path: &Path, file: FileId) -> bool {
        if !names(path, file) || fs::remove_file(path).is_err() {
            return false;
        }
        if let Some(dir) = path.parent() {
            self.unsynced.record(dir);
        }
        true
    }

    /// Creates an object directory (`objects/<ns>` or `objects/<ns>/<hh>`) if needed and makes
    /// its entry in its parent durable before a revision is published in it: a power loss must
    /// not take an acknowledged revision away with a directory that never reached the disk.
    /// The parent is synced once per directory and process, also when the directory already
    /// existed: it may be another commit's, still between its creation and that sync, or a
    /// previous process may have died in between.
    fn ensure_object_dir(&self, dir: &Path) -> Result<(), TierError> {
        if dir == self.objects || self.durable_dirs.lock().unwrap().contains(dir) {
            return Ok(());
        }
        let parent = dir.parent().expect("object directories are under objects/");
        self.ensure_object_dir(parent)?;
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(TierError::io("create object directory", &e)),
        }
        sync_dir(parent).map_err(|e| TierError::io("sync object directory", &e))?;
        self.durable_dirs.lock().unwrap().insert(dir.to_path_buf());
        Ok(())
    }

    fn evict_over_limit(&self, keep: Option<&EntryId>) {
        let Some(limit) = self.config.limit else {
            return;
        };
        let mut index = self.index.lock().unwrap();
        while index.total_bytes > limit {
            let Some(victim) = index.coldest(keep) else {
                break;
            };
            self.uncache(&victim);
            if let Some(e) = index.remove(&victim) {
                self.unlink_if_same(&index, &self.path_of(&victim.0, &victim.1), e.file);
                tracing::debug!(ns = %victim.0, bytes = e.file_len, "evicted");
            }
            index.evictions += 1;
            metrics::counter!("larder_disk_evictions_total").increment(1);
        }
        metrics::gauge!("larder_disk_bytes").set(index.total_bytes as f64);
    }

    /// Checks the precondition against the current revision and renames the temp file into
    /// place, atomically with respect to every other commit, delete and eviction.
    fn commit(
        &self,
        ns: &Namespace,
        key: &Key,
        mut temp: TempFile,
        fixed: &Fixed,
        opts: &PutOptions,
        still_wanted: &dyn Fn() -> bool,
    ) -> Result<bool, TierError> {
        let hash = key_hash(key);
        let id: EntryId = (Arc::from(ns.as_str()), hash);
        let path = self.path_of(ns.as_str(), &hash);
        let dir = path.parent().expect("object path has a parent");
        self.ensure_object_dir(dir)?;
        // The index names a revision by its file; the rename keeps it.
        let file = fs::symlink_metadata(&temp.path)
            .map(|md| FileId::of(&md))
            .map_err(|e| TierError::io("stat temp file", &e))?;
        let created = {
            let mut index = self.index.lock().unwrap();
            let current = self.current_validators(&path, now_ms())?;
            if decide_write(&opts.precondition, current.as_ref())
                == WriteOutcome::PreconditionFailed
            {
                return Err(TierError::precondition_failed(current.map(|v| v.etag)));
            }
            if !still_wanted() {
                return Err(TierError::new(
                    ErrorKind::PreconditionFailed,
                    "the revision was superseded or deleted before it was committed",
                ));
            }
            fs::rename(&temp.path, &path).map_err(|e| TierError::io("publish revision", &e))?;
            self.uncache(&id);
            temp.armed = false;
            let entry = Entry::new(fixed.file_len(), fixed.body_len, file, fixed.expires_ms);
            index.insert(id.clone(), entry);
            current.is_none()
        };
        // The new revision is visible from here on (readers open it, the index names it) and
        // the one it replaced is gone; neither can be undone. What is left is making the rename
        // durable, and if that fails the write must not be acknowledged: the client hears an
        // error although readers may already see the revision. Retrying the PUT is harmless.
        let pending = self.unsynced.pending(dir);
        let synced = sync_dir(dir);
        self.evict_over_limit(Some(&id));
        synced.map_err(|e| {
            TierError::io(
                "sync object directory (the new revision is visible but may not survive a \
                 power loss)",
                &e,
            )
        })?;
        if let Some(seq) = pending {
            self.unsynced.synced(dir, seq);
        }
        Ok(created)
    }

    /// Removes the key's revision, and acknowledges only once the removal is durable; also
    /// when the key was already gone but an unlink in its directory is not synced yet (an
    /// eviction, or a concurrent DELETE still syncing), which a power loss could undo.
    fn delete(&self, id: &EntryId) -> Result<bool, TierError> {
        let path = self.path_of(&id.0, &id.1);
        let dir = path.parent().expect("object path has a parent");
        let (existed, pending) = {
            let mut index = self.index.lock().unwrap();
            self.uncache(id);
            index.remove(id);
            let existed = match fs::remove_file(&path) {
                Ok(()) => {
                    self.unsynced.record(dir);
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(TierError::io("delete revision", &e)),
            };
            (existed, self.unsynced.pending(dir))
        };
        if let Some(seq) = pending {
            sync_dir(dir).map_err(|e| {
                TierError::io(
                    "sync object directory (the object is gone but may come back after a \
                     power loss)",
                    &e,
                )
            })?;
            self.unsynced.synced(dir, seq);
        }
        Ok(existed)
    }
}

/// The open-revision cache's size, for the operator sizing `[disk] memory_cache`.
fn report_memory_cache(cache: &OpenRevisions<Arc<OpenRevision>>) {
    metrics::gauge!("larder_disk_memory_cache_bytes").set(cache.in_memory.weight() as f64);
    metrics::gauge!("larder_disk_open_revisions").set(cache.with_file.len() as f64);
}

/// What a read is answered from: an open revision, or a thread's copy of one.
struct Revision<'a> {
    info: &'a RevisionInfo,
    file: RevisionFile<'a>,
}

/// The revision's file, for the bytes its first read did not bring.
enum RevisionFile<'a> {
    /// `None` for a revision whose whole body is in memory.
    Open(Option<&'a Arc<File>>),
    /// A thread's copy does not keep the file open: a revision the shared cache has let go of
    /// must not hold its disk space for as long as some thread keeps a copy.
    OfCopy(&'a std::sync::Weak<OpenRevision>),
}

impl RevisionFile<'_> {
    fn get(&self) -> Option<Arc<File>> {
        match self {
            RevisionFile::Open(file) => file.cloned(),
            RevisionFile::OfCopy(revision) => revision.upgrade()?.file.clone(),
        }
    }
}

/// A revision as a read needs it, but for its file: the decoded header and the body bytes that
/// came with the first read.
struct RevisionInfo {
    fixed: Fixed,
    /// Which revision this is, beyond its ETag (see `FileId`).
    file_id: FileId,
    /// The revision's ETag, spelled out once rather than on every read of a hot key.
    etag: ETag,
    headers: Arc<[(String, String)]>,
    /// The whole body of a small object, which came with the read of its header; empty for a
    /// larger one, whose body is read from its file.
    small_body: Bytes,
}

struct OpenRevision {
    /// `None` when the whole body is in `info.small_body`: such a revision holds no descriptor.
    file: Option<Arc<File>>,
    info: RevisionInfo,
    /// Set once the open-revision cache lets go of it: the threads' copies of it are void.
    /// An allocation of its own, which copies hold and nobody writes until then.
    retired: Arc<AtomicBool>,
}

impl OpenRevision {
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

#[async_trait]
impl Tier for DiskTier {
    fn name(&self) -> &'static str {
        "disk"
    }

    async fn get(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: GetOptions,
    ) -> Result<GetResponse, TierError> {
        // Opening a revision is an open, one 16 KiB positioned read and an fstat, served from the
        // page cache for hot objects; a hop to the blocking pool costs more than that and halves
        // small-object throughput. nginx makes the same trade. Body chunks beyond the first read
        // do go to the blocking pool.
        self.inner.get_blocking(ns, key, &opts)
    }

    fn read_at_hand(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: &GetOptions,
    ) -> Option<Result<AtHand, TierError>> {
        Some(self.inner.read_at_hand(ns, key, opts))
    }

    async fn put(
        &self,
        ns: &Namespace,
        key: &Key,
        body: UploadStream,
        opts: PutOptions,
    ) -> Result<PutResult, TierError> {
        self.inner.precheck(ns, key, &opts.precondition)?;
        let staged = self.stage(ns, key, body, opts).await?;
        self.commit_staged(staged, Box::new(|| true)).await
    }

    async fn delete(&self, ns: &Namespace, key: &Key) -> Result<bool, TierError> {
        let inner = self.inner.clone();
        let id: EntryId = (Arc::from(ns.as_str()), key_hash(key));
        tokio::task::spawn_blocking(move || inner.delete(&id))
            .await
            .map_err(|e| TierError::internal("disk delete", e))?
    }

    async fn list_namespaces(&self) -> Result<Vec<NamespaceUsage>, TierError> {
        let usage = self.inner.index.lock().unwrap().usage();
        let mut out: Vec<NamespaceUsage> = usage
            .into_iter()
            .map(|(name, (objects, bytes))| NamespaceUsage {
                name: name.to_string(),
                objects,
                bytes,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn stats(&self) -> Result<Vec<TierStats>, TierError> {
        let index = self.inner.index.lock().unwrap();
        Ok(vec![TierStats {
            tier: "disk".into(),
            objects: index.len() as u64,
            bytes: index.total_bytes,
            limit: self.inner.config.limit,
            evictions: index.evictions,
            expirations: index.expirations,
        }])
    }
}

#[cfg(test)]
mod tests;

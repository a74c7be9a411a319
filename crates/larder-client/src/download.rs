//! Parallel pinned downloads across one or several larderd replicas (docs/ARCHITECTURE.md, "Client").
//!
//! One TCP stream rarely fills a fast link, and CI artifacts are several GiB, so an object is
//! fetched as many byte ranges over a pool of HTTP/1.1 connections, optionally spread over
//! replicas. Parallel ranges bring a hazard a single GET does not have: if the key is replaced
//! mid-download, a naive client splices old and new bytes. Hence the pin: the first range request
//! (discovery) yields the first chunk, the size (from `Content-Range`) and the ETag, and every
//! further range carries `If-Match: <etag>`. A server that no longer has that revision answers
//! `412` before sending a byte. When the replica that answered the discovery says so, the object
//! was replaced and the whole download restarts from a fresh discovery (a bounded number of
//! times), discarding what was staged. When another replica says so while the discovery replica
//! still serves the pin, that replica has diverged (it lags behind or ran ahead of the others):
//! it is dropped for the rest of this download and its ranges go to the replicas that still
//! serve the pinned revision, so one stale cache does not cost everyone a restart. Only when no
//! replica left can serve the pin does the download restart. Every response is checked against
//! what was asked (status, `Content-Range`, `Content-Length`, `ETag`, body length) before any
//! byte of it is written; a mismatch is a failed attempt, never data.
//!
//! Verification without a second pass: chunks complete in any order, but BLAKE3 must see the
//! bytes in order. Completed chunks wait in a reorder buffer and are handed, in order, to one
//! verifier thread that hashes them and passes them to the [`Sink`] (stdout, a tar extractor).
//! No chunk is fetched more than `2 × concurrency` chunks ahead of the hashing point, which bounds
//! memory to about `2 × concurrency × chunk size` whatever the output. File outputs additionally
//! receive each chunk as soon as it arrives, as a positioned write into a staged temporary file
//! (so a slow hole does not delay the disk), and the file is renamed into place only after the
//! digest matched.
//!
//! Failures are sorted by what can help. Transient ones (connection refused or reset, 5xx, a
//! stalled body, a short or malformed 206) are retried with exponential backoff and jitter, up to
//! a bound, on another replica when there is one; a replica that fails is avoided for a while, so
//! the chunks of a dead replica move to the others. A changed revision restarts. Everything else
//! (404 at discovery, a 4xx) is final.
//!
//! Hedging: bytes are verified in order, so one slow range holds back everything behind it once
//! the window is full — a replica that reads through from S3 while another has the object on
//! disk, or one on a congested link, sets the pace of the whole download without failing. When
//! there is more than one replica, a range still unfinished after three times the median time of
//! recent ranges (at least [`MIN_HEDGE_DELAY`]) is asked again from another replica; the first
//! complete, checked answer wins and the other request is dropped; a replica that lost such a
//! race gets no new ranges for [`SLOW_PENALTY`] while others are available, so a persistently
//! slow replica costs a few hedges per period rather than one per range. At most a quarter of the
//! concurrency (at least one) is hedged at a time, which bounds the extra connections; the
//! extra buffer of each running hedge counts against the fetch window, so memory stays within
//! the same bound as without hedging.

use crate::output::{FileSink, WriterSink};
use crate::progress::Progress;
use crate::{Client, Error, ObjectInfo, ObjectName};
use bytes::{Bytes, BytesMut};
use larder_proto::range::parse_content_range;
use larder_proto::{ByteRange, ETag};
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, Response, StatusCode};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Enough connections to fill a 10 Gbit/s link from a server that streams ~1 GB/s per
/// connection, few enough to be polite to a shared cache.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Large enough that per-request overhead (a round trip, headers, a pool checkout) is noise,
/// small enough that 2 × 8 chunks in memory stay near 128 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;
/// A connection that delivers nothing for this long is presumed dead.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Retries of one range (after the first attempt) before the download fails.
pub const DEFAULT_RETRIES: u32 = 5;
/// Fresh discoveries after the object changed under the download.
pub const DEFAULT_MAX_RESTARTS: u32 = 3;

/// How to download; `Default` gives the CLI's defaults and no progress output.
#[derive(Clone, Debug)]
pub struct DownloadOptions {
    /// Ranges in flight at once, over all replicas.
    pub concurrency: usize,
    /// Bytes per range request.
    pub chunk_size: u64,
    /// Longest wait for a response's headers or its next body bytes.
    pub idle_timeout: Duration,
    /// Retries per range (and for discovery) after transient failures.
    pub retries: u32,
    /// Restarts after the object changed (412 or another ETag).
    pub max_restarts: u32,
    /// Flush a file or restored tree to disk before it becomes visible, so that a power loss
    /// soon after never leaves a visible result with missing data. Off saves the time of the
    /// flush (30–50 % of a 100,000-file restore on 2 cores) where the disk does not outlive
    /// the machine, as on ephemeral CI runners; the kernel then writes the data back later.
    pub sync: bool,
    pub progress: Progress,
}

impl Default for DownloadOptions {
    fn default() -> DownloadOptions {
        DownloadOptions {
            concurrency: DEFAULT_CONCURRENCY,
            chunk_size: DEFAULT_CHUNK_SIZE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            retries: DEFAULT_RETRIES,
            max_restarts: DEFAULT_MAX_RESTARTS,
            sync: true,
            progress: Progress::hidden(),
        }
    }
}

/// Where downloaded bytes go. The engine calls `begin` after every discovery (again after a
/// restart, when whatever the earlier attempt delivered must be discarded), hands over the bytes
/// in order through `ordered` on the verifier thread, and calls `finish` only once the whole
/// object arrived and matched its ETag. Dropping a sink that was not finished must leave nothing
/// behind.
pub trait Sink: Send + 'static {
    fn begin(&mut self, info: &ObjectInfo) -> Result<(), Error>;

    /// A file to receive every chunk by positioned write as soon as it arrives, in any order.
    fn positioned(&self) -> Option<Arc<File>> {
        None
    }

    /// The next bytes of the object, in order, already hashed.
    fn ordered(&mut self, _data: &Bytes) -> Result<(), Error> {
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Error>;

    /// What a failure means for the destination, e.g. "out.bin was not written".
    fn failure_consequence(&self) -> String;

    /// The progress bar's label.
    fn phase(&self) -> &'static str {
        "downloading"
    }
}

/// One replica's share of a download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaUsage {
    pub url: String,
    /// Body bytes received from it, including those of attempts that later failed.
    pub bytes: u64,
    pub failures: u64,
    /// It served another revision than the one pinned, so the (last) attempt went on without it.
    pub diverged: bool,
}

/// What a finished download did.
#[derive(Clone, Debug)]
pub struct DownloadSummary {
    pub info: ObjectInfo,
    /// Fresh discoveries after the object changed.
    pub restarts: u32,
    /// Range attempts that failed transiently and were tried again.
    pub retries: u64,
    /// Slow ranges asked again from another replica, and how many of those second requests
    /// answered first.
    pub hedged: u64,
    pub hedges_won: u64,
    pub elapsed: Duration,
    pub replicas: Vec<ReplicaUsage>,
}

/// Downloads objects from a set of replicas holding the same objects.
#[derive(Clone, Debug)]
pub struct Downloader {
    replicas: Vec<Client>,
    opts: DownloadOptions,
}

/// Far beyond any useful chunk; also keeps `2 × concurrency × chunk` within memory.
const MAX_CHUNK_SIZE: u64 = 1 << 30;
const MAX_CONCURRENCY: usize = 256;

impl Downloader {
    pub fn new(replicas: Vec<Client>, opts: DownloadOptions) -> Result<Downloader, Error> {
        if replicas.is_empty() {
            return Err(Error::InvalidInput("no server URL given".into()));
        }
        if opts.concurrency == 0 || opts.concurrency > MAX_CONCURRENCY {
            return Err(Error::InvalidInput(format!(
                "invalid concurrency {}: must be 1 to {MAX_CONCURRENCY}",
                opts.concurrency
            )));
        }
        if opts.chunk_size == 0 || opts.chunk_size > MAX_CHUNK_SIZE {
            return Err(Error::InvalidInput(format!(
                "invalid chunk size {}: must be 1 byte to 1 GiB",
                opts.chunk_size
            )));
        }
        if opts.idle_timeout.is_zero() {
            return Err(Error::InvalidInput(
                "invalid idle timeout: must be positive".into(),
            ));
        }
        Ok(Downloader { replicas, opts })
    }

    pub fn options(&self) -> &DownloadOptions {
        &self.opts
    }

    /// Downloads to `path`, which is replaced only once the whole object arrived and matched its
    /// ETag; on any failure `path` is left as it was and no temporary file remains.
    pub async fn download_to_file(
        &self,
        name: &ObjectName,
        path: &Path,
    ) -> Result<DownloadSummary, Error> {
        let (summary, _) = self
            .download(name, FileSink::new(path, self.opts.sync))
            .await?;
        Ok(summary)
    }

    /// Writes the object to `out` in order. Bytes written cannot be taken back, so a digest
    /// mismatch or a change of the object after output began is an error that says to discard
    /// the output.
    pub async fn download_to_writer<W>(
        &self,
        name: &ObjectName,
        out: W,
        label: &str,
    ) -> Result<DownloadSummary, Error>
    where
        W: std::io::Write + Send + 'static,
    {
        let (summary, _) = self
            .download(name, WriterSink::new(out, label.to_string()))
            .await?;
        Ok(summary)
    }

    /// Downloads `name` into `sink` and returns the sink after its `finish`.
    pub async fn download<S: Sink>(
        &self,
        name: &ObjectName,
        sink: S,
    ) -> Result<(DownloadSummary, S), Error> {
        let started = Instant::now();
        let shared = Arc::new(Shared {
            name: name.clone(),
            replicas: self
                .replicas
                .iter()
                .map(|client| Replica {
                    client: client.clone(),
                    health: Mutex::new(Health::default()),
                    bytes: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    diverged: AtomicBool::new(false),
                })
                .collect(),
            origin: AtomicUsize::new(0),
            chunk_size: self.opts.chunk_size,
            idle: self.opts.idle_timeout,
            retries: self.opts.retries,
            progress: self.opts.progress.clone(),
            retried: AtomicU64::new(0),
            hedging: Hedging::new(self.opts.concurrency),
            pool: Arc::new(BufferPool {
                free: Mutex::new(Vec::new()),
                keep: 2 * self.opts.concurrency,
            }),
        });
        let sink = Arc::new(Mutex::new(sink));
        let mut restarts = 0u32;
        let info = loop {
            let result = match shared.discover(restarts).await {
                Ok(found) => self.attempt(&shared, found, &sink).await,
                Err(e) => Err(Stop::Fatal(e)),
            };
            match result {
                Ok(info) => break info,
                Err(Stop::Restart(why)) => {
                    restarts += 1;
                    if restarts > self.opts.max_restarts {
                        let consequence = lock(&sink).failure_consequence();
                        return Err(Error::Transport {
                            op: "GET",
                            target: name.to_string(),
                            cause: format!(
                                "the object changed during the download {restarts} times in a row \
                                 (last: {why}); {consequence}; retry when its writers are done"
                            ),
                        });
                    }
                    shared.progress.note(&format!(
                        "{name} changed during the download ({why}); restarting ({restarts} of \
                         at most {})",
                        self.opts.max_restarts
                    ));
                }
                Err(Stop::Fatal(e)) => {
                    let consequence = lock(&sink).failure_consequence();
                    return Err(with_consequence(e, &consequence));
                }
            }
        };
        lock(&sink).finish()?;
        let sink = match Arc::try_unwrap(sink) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(_) => unreachable!("the verifier thread has ended, so the sink has one owner"),
        };
        let summary = DownloadSummary {
            info,
            restarts,
            retries: shared.retried.load(Ordering::Relaxed),
            hedged: shared.hedging.started.load(Ordering::Relaxed),
            hedges_won: shared.hedging.won.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            replicas: shared
                .replicas
                .iter()
                .map(|r| ReplicaUsage {
                    url: r.client.base_url().to_string(),
                    bytes: r.bytes.load(Ordering::Relaxed),
                    failures: r.failures.load(Ordering::Relaxed),
                    diverged: r.diverged.load(Ordering::Relaxed),
                })
                .collect(),
        };
        Ok((summary, sink))
    }

    /// One pass over the object pinned to the discovered ETag: fetch, write, hash, verify.
    async fn attempt<S: Sink>(
        &self,
        shared: &Arc<Shared>,
        found: Discovered,
        sink: &Arc<Mutex<S>>,
    ) -> Result<ObjectInfo, Stop> {
        let info = found.info;
        let total = info.size;
        let chunk = self.opts.chunk_size;
        let chunks = total.div_ceil(chunk);
        lock(sink).begin(&info).map_err(Stop::Fatal)?;
        let positioned = lock(sink).positioned();
        let phase = lock(sink).phase();
        shared.progress.bytes_phase(phase, Some(total));
        shared.progress.inc(found.first.len() as u64);

        // The verifier: hashes in order and feeds the sink. It reports each chunk it is done
        // with, which is what moves the fetch window forward.
        let (to_verify, verify_rx) = std::sync::mpsc::channel::<Bytes>();
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<Result<(), Error>>();
        let verifier_sink = Arc::clone(sink);
        let pool = Arc::clone(&shared.pool);
        let verifier = std::thread::Builder::new()
            .name("larder-verify".into())
            .spawn(move || {
                let mut hasher = blake3::Hasher::new();
                for data in verify_rx {
                    hasher.update(&data);
                    let result = lock(&verifier_sink).ordered(&data);
                    pool.recycle(data);
                    let failed = result.is_err();
                    let _ = done_tx.send(result);
                    if failed {
                        return None;
                    }
                }
                Some(hasher.finalize())
            })
            .map_err(|e| Stop::Fatal(Error::io("cannot start the verifier thread", e)))?;

        let pin = Arc::new(Pin {
            etag: info.etag.clone(),
            total,
        });
        let window = 2 * self.opts.concurrency as u64;
        let mut fetching: JoinSet<(u64, Result<Bytes, Stop>)> = JoinSet::new();
        let mut writer = match positioned {
            Some(file) => Some(Writer::start(file, chunk, self.opts.sync).map_err(Stop::Fatal)?),
            None => None,
        };
        let mut ready: BTreeMap<u64, Bytes> = BTreeMap::new();
        let (mut next_fetch, mut next_verify, mut verified) = (0u64, 0u64, 0u64);
        if chunks > 0 {
            arrived(0, found.first, &mut writer, &mut ready);
            next_fetch = 1;
        }
        let outcome: Result<(), Stop> = loop {
            while let Some(data) = ready.remove(&next_verify) {
                // A send fails only if the verifier stopped, which it reports through `done`.
                let _ = to_verify.send(data);
                next_verify += 1;
            }
            if verified == chunks {
                break Ok(());
            }
            // A running hedge holds a second buffer for its range: it counts against the window,
            // so hedging never lifts memory above the bound.
            while fetching.len() < self.opts.concurrency
                && next_fetch < chunks
                && next_fetch + shared.hedging.running() < verified + window
            {
                let start = next_fetch * chunk;
                let range = ByteRange {
                    start,
                    len: chunk.min(total - start),
                };
                let index = next_fetch;
                let (shared, pin) = (Arc::clone(shared), Arc::clone(&pin));
                fetching.spawn(async move { (index, shared.fetch(index, range, &pin).await) });
                next_fetch += 1;
            }
            tokio::select! {
                Some(joined) = fetching.join_next(), if !fetching.is_empty() => {
                    match joined.expect("a range task panicked") {
                        (i, Ok(data)) => arrived(i, data, &mut writer, &mut ready),
                        (_, Err(stop)) => break Err(stop),
                    }
                }
                Some(written) = Writer::next(&mut writer), if Writer::busy(&writer) => {
                    match written {
                        Ok((i, data)) => {
                            ready.insert(i, data);
                        }
                        Err(e) => break Err(Stop::Fatal(e)),
                    }
                }
                event = done.recv() => match event {
                    Some(Ok(())) => verified += 1,
                    Some(Err(e)) => break Err(Stop::Fatal(e)),
                    None => break Err(Stop::Fatal(Error::Protocol(
                        "internal error: the verifier thread stopped".into(),
                    ))),
                },
            }
        };

        // Stop everything this attempt started before anyone reuses the sink: a positioned write
        // of this attempt landing after the next attempt's write would corrupt the file
        // unnoticed, since the digest is computed from memory.
        fetching.abort_all();
        while fetching.join_next().await.is_some() {}
        if let Some(w) = writer {
            w.stop().await;
        }
        drop(to_verify);
        let digest = tokio::task::spawn_blocking(move || verifier.join())
            .await
            .expect("joining the verifier")
            .expect("the verifier thread panicked");
        outcome?;
        let digest = digest.expect("the verifier finished every chunk");
        let actual = ETag::from_digest(&digest);
        if actual != info.etag {
            return Err(Stop::Fatal(Error::DigestMismatch {
                target: shared.name.to_string(),
                expected: info.etag.clone(),
                actual,
                consequence: lock(sink).failure_consequence(),
            }));
        }
        Ok(info)
    }
}

/// Files a completed chunk: for file outputs a positioned write right away, and then the reorder
/// buffer until the verifier's turn comes. A chunk reaches the verifier only once written, so the
/// window (counted in verified chunks) also bounds the writes still in flight.
fn arrived(index: u64, data: Bytes, writer: &mut Option<Writer>, ready: &mut BTreeMap<u64, Bytes>) {
    match writer {
        Some(w) => w.write(index, data),
        None => {
            ready.insert(index, data);
        }
    }
}

/// The positioned writes of one attempt, on one thread in arrival order. Buffered writes to one
/// file serialize on its inode lock anyway, so more threads would only add wake-ups; and one
/// thread makes "no write of this attempt is still running" a simple join.
struct Writer {
    tx: std::sync::mpsc::Sender<(u64, Bytes)>,
    done: tokio::sync::mpsc::UnboundedReceiver<Result<(u64, Bytes), Error>>,
    thread: std::thread::JoinHandle<()>,
    pending: usize,
}

impl Writer {
    /// `early_writeback`: start each chunk's writeback right away (for a final `fsync`).
    fn start(file: Arc<File>, chunk: u64, early_writeback: bool) -> Result<Writer, Error> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Bytes)>();
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("larder-write".into())
            .spawn(move || {
                for (index, data) in rx {
                    let offset = index * chunk;
                    let result = file
                        .write_all_at(&data, offset)
                        .map(|()| {
                            if early_writeback {
                                start_writeback(&file, offset, data.len());
                            }
                            (index, data)
                        })
                        .map_err(|e| Error::io("cannot write the download to disk", e));
                    let failed = result.is_err();
                    let _ = done_tx.send(result);
                    if failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the writer thread", e))?;
        Ok(Writer {
            tx,
            done,
            thread,
            pending: 0,
        })
    }

    fn write(&mut self, index: u64, data: Bytes) {
        // A failed send means the thread stopped after an error, which `next` reports.
        let _ = self.tx.send((index, data));
        self.pending += 1;
    }

    fn busy(writer: &Option<Writer>) -> bool {
        writer.as_ref().is_some_and(|w| w.pending > 0)
    }

    async fn next(writer: &mut Option<Writer>) -> Option<Result<(u64, Bytes), Error>> {
        let w = writer.as_mut()?;
        let result = w.done.recv().await;
        w.pending = w.pending.saturating_sub(1);
        Some(result.unwrap_or_else(|| {
            Err(Error::Protocol(
                "internal error: the writer thread stopped".into(),
            ))
        }))
    }

    /// Waits until no write of this attempt can still land.
    async fn stop(self) {
        drop(self.tx);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Starts writing a chunk to the device without waiting for it, so the final `fsync` (which
/// makes the file durable before it is renamed into place) finds little left to do instead of
/// flushing the whole object at the end. Only a hint: errors surface at the `fsync`.
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a file descriptor this process owns; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the sink is already being propagated; the data is still usable
    // for cleanup.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends what the failure means for the output to messages that do not carry it yet.
fn with_consequence(e: Error, consequence: &str) -> Error {
    match e {
        Error::Transport { op, target, cause } => Error::Transport {
            op,
            target,
            cause: format!("{cause}; {consequence}"),
        },
        Error::Protocol(msg) => Error::Protocol(format!("{msg}; {consequence}")),
        other => other,
    }
}

/// Why an attempt ended early.
enum Stop {
    /// The pinned revision is gone: discover again.
    Restart(String),
    Fatal(Error),
}

/// Why one request failed.
enum Fail {
    /// Worth another try, here or elsewhere. `connect` holds the cause when no connection could
    /// be made at all, so an exhausted retry can say "is larderd running?".
    Transient {
        why: String,
        connect: Option<String>,
    },
    /// The pinned revision is no longer served.
    Changed(String),
    /// Retrying cannot help.
    Fatal(Error),
}

fn transient(why: String) -> Fail {
    Fail::Transient { why, connect: None }
}

/// The revision every range is pinned to.
struct Pin {
    etag: ETag,
    total: u64,
}

struct Discovered {
    info: ObjectInfo,
    /// The first chunk (or the whole object when it fits in one).
    first: Bytes,
}

struct Replica {
    client: Client,
    health: Mutex<Health>,
    bytes: AtomicU64,
    failures: AtomicU64,
    /// Serves another revision than the current attempt's pin: not asked again in this attempt.
    diverged: AtomicBool,
}

/// A replica that just failed is avoided for a while, longer after each further failure, so a
/// dead one costs a few connection attempts rather than one per chunk.
#[derive(Default)]
struct Health {
    consecutive: u32,
    down_until: Option<Instant>,
    /// Another replica just answered one of its ranges first (a hedge won): new ranges go
    /// elsewhere until then, when it gets another chance.
    slow_until: Option<Instant>,
}

/// How long a replica that lost a hedge race gets no new ranges while others are available.
const SLOW_PENALTY: Duration = Duration::from_secs(2);

const FIRST_QUARANTINE: Duration = Duration::from_millis(250);
const MAX_QUARANTINE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(4);

impl Replica {
    fn succeeded(&self) {
        let mut h = lock(&self.health);
        h.consecutive = 0;
        h.down_until = None;
    }

    /// Its request for a range lost the race against a hedge: it works, but slowly.
    fn outpaced(&self) {
        lock(&self.health).slow_until = Some(Instant::now() + SLOW_PENALTY);
    }

    fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut h = lock(&self.health);
        h.consecutive = h.consecutive.saturating_add(1);
        let factor = 1u32 << (h.consecutive - 1).min(6);
        h.down_until = Some(Instant::now() + (FIRST_QUARANTINE * factor).min(MAX_QUARANTINE));
    }
}

/// State of one download shared by its range tasks.
struct Shared {
    name: ObjectName,
    replicas: Vec<Replica>,
    /// The replica whose discovery set the current pin; it is never dropped as diverged, since
    /// its 412 means the object itself changed.
    origin: AtomicUsize,
    chunk_size: u64,
    idle: Duration,
    retries: u32,
    progress: Progress,
    retried: AtomicU64,
    hedging: Hedging,
    pool: Arc<BufferPool>,
}

/// A range is hedged no sooner than this: below it, a second request costs more than it can
/// save, and a loopback or LAN download never waits that long for a healthy range.
pub const MIN_HEDGE_DELAY: Duration = Duration::from_millis(200);
/// How many times the median range time a range may take before it is hedged.
const HEDGE_FACTOR: u32 = 3;
/// Range times remembered for the median, and how many are needed before hedging starts: few,
/// because when one replica is slow, its ranges soon take every connection and the fast replica
/// gets no chance to add more (the floor guards against hedging on a lucky first sample).
const LATENCY_WINDOW: usize = 64;
const LATENCY_MIN_SAMPLES: usize = 2;

/// When to hedge, and how many hedges may run (see the module comment).
struct Hedging {
    /// Durations of the latest successful range requests, oldest first.
    recent: Mutex<std::collections::VecDeque<Duration>>,
    slots: tokio::sync::Semaphore,
    max_slots: usize,
    started: AtomicU64,
    won: AtomicU64,
}

impl Hedging {
    fn new(concurrency: usize) -> Hedging {
        Hedging {
            recent: Mutex::new(std::collections::VecDeque::with_capacity(LATENCY_WINDOW)),
            slots: tokio::sync::Semaphore::new((concurrency / 4).max(1)),
            max_slots: (concurrency / 4).max(1),
            started: AtomicU64::new(0),
            won: AtomicU64::new(0),
        }
    }

    /// Hedges under way, each holding an extra chunk buffer.
    fn running(&self) -> u64 {
        self.max_slots
            .saturating_sub(self.slots.available_permits()) as u64
    }

    fn record(&self, took: Duration) {
        let mut recent = lock(&self.recent);
        if recent.len() == LATENCY_WINDOW {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    /// How long a range may run before it is hedged; `None` until enough ranges finished to
    /// know what is normal.
    fn delay(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = lock(&self.recent).iter().copied().collect();
        if times.len() < LATENCY_MIN_SAMPLES {
            return None;
        }
        let mid = times.len() / 2;
        let (_, median, _) = times.select_nth_unstable(mid);
        Some((*median * HEDGE_FACTOR).max(MIN_HEDGE_DELAY))
    }
}

/// Chunk buffers handed back by the verifier for the next ranges. Reusing them keeps the
/// process at its working set: fresh multi-MiB allocations would be page-faulted in again for
/// every chunk, and the allocator would keep freed ones around anyway, so peak RSS would drift
/// well past `2 × concurrency × chunk`.
struct BufferPool {
    free: Mutex<Vec<BytesMut>>,
    keep: usize,
}

impl BufferPool {
    fn take(&self, len: usize) -> BytesMut {
        match lock(&self.free).pop() {
            Some(buf) if buf.capacity() >= len => buf,
            _ => {
                let mut buf = BytesMut::with_capacity(len);
                advise_huge_pages(buf.spare_capacity_mut());
                buf
            }
        }
    }

    /// Takes the buffer back if nobody else holds a reference to it.
    fn recycle(&self, data: Bytes) {
        if let Ok(mut buf) = data.try_into_mut() {
            buf.clear();
            let mut free = lock(&self.free);
            if free.len() < self.keep {
                free.push(buf);
            }
        }
    }
}

/// Asks for transparent huge pages on a fresh chunk buffer: filling 8 MiB through 4 KiB page
/// faults costs 2048 faults per buffer, a measurable share of a loopback download's CPU time.
/// Only advice; the kernel may ignore it.
fn advise_huge_pages(buf: &mut [std::mem::MaybeUninit<u8>]) {
    const HUGE: usize = 2 << 20;
    const PAGE: usize = 4096;
    if buf.len() < HUGE {
        return;
    }
    let start = (buf.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (buf.as_ptr() as usize + buf.len()) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies within an allocation this function has exclusive access to;
        // MADV_HUGEPAGE changes no contents and cannot invalidate memory.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

impl Shared {
    /// The replica for the `index`th range: spread round-robin, skipping quarantined replicas
    /// and, when there is a choice, the one that just failed this range and those that just
    /// lost a hedge race (slow ones come next, quarantined ones last).
    fn pick(&self, index: u64, avoid: Option<usize>) -> usize {
        let n = self.replicas.len();
        let now = Instant::now();
        let mut soonest: Option<(Instant, usize)> = None;
        let mut slow: Option<usize> = None;
        for k in 0..n {
            let r = ((index % n as u64) as usize + k) % n;
            if (Some(r) == avoid && n > 1) || self.replicas[r].diverged.load(Ordering::Relaxed) {
                continue;
            }
            let h = lock(&self.replicas[r].health);
            match h.down_until {
                Some(until) if until > now => {
                    if soonest.is_none_or(|(t, _)| until < t) {
                        soonest = Some((until, r));
                    }
                }
                _ if h.slow_until.is_some_and(|until| until > now) => {
                    slow.get_or_insert(r);
                }
                _ => return r,
            }
        }
        if let Some(r) = slow {
            return r;
        }
        // Everyone left is quarantined: try the one that comes back first. The origin is never
        // dropped, so when nothing else is left it is the one.
        soonest.map_or_else(
            || match avoid {
                Some(a) if !self.replicas[a].diverged.load(Ordering::Relaxed) => a,
                _ => self.origin.load(Ordering::Relaxed),
            },
            |(_, r)| r,
        )
    }

    /// How long to wait before retrying on `next` after `failed` failed `attempt` times.
    fn backoff(&self, attempt: u32, failed: usize, next: usize) -> Duration {
        if next != failed && lock(&self.replicas[next].health).down_until.is_none() {
            // A healthy replica is available: go at once, with a little jitter so that chunks
            // leaving a dead replica do not arrive in one burst.
            return Duration::from_millis(rand::random_range(0..=20));
        }
        let exp = FIRST_BACKOFF * (1u32 << attempt.saturating_sub(1).min(8));
        let cap = exp.min(MAX_BACKOFF).as_millis() as u64;
        Duration::from_millis(rand::random_range(cap / 2..=cap))
    }

    /// The first range request: size, ETag and first chunk of the current revision.
    async fn discover(&self, restarts: u32) -> Result<Discovered, Error> {
        // A fresh pin: every replica may serve it, whatever it served before.
        for replica in &self.replicas {
            replica.diverged.store(false, Ordering::Relaxed);
        }
        let mut attempts = 0u32;
        let mut avoid = None;
        loop {
            let r = self.pick(u64::from(restarts) + u64::from(attempts), avoid);
            let started = Instant::now();
            match self.try_discover(r).await {
                Ok(found) => {
                    // A full range request like the others: the first hint of what is normal.
                    if found.first.len() as u64 == self.chunk_size {
                        self.hedging.record(started.elapsed());
                    }
                    self.replicas[r].succeeded();
                    self.origin.store(r, Ordering::Relaxed);
                    return Ok(found);
                }
                Err(Fail::Transient { why, connect }) => {
                    self.replicas[r].failed();
                    attempts += 1;
                    if attempts > self.retries {
                        return Err(self.exhausted(r, attempts, "the first range", why, connect));
                    }
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    let next = self.pick(u64::from(restarts) + u64::from(attempts), Some(r));
                    tokio::time::sleep(self.backoff(attempts, r, next)).await;
                    avoid = Some(r);
                }
                // Nothing is pinned yet, so a "change" is just another failure to report.
                Err(Fail::Changed(why)) => return Err(Error::Protocol(why)),
                Err(Fail::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Fetches one pinned range, retrying transient failures.
    async fn fetch(&self, index: u64, range: ByteRange, pin: &Pin) -> Result<Bytes, Stop> {
        let mut attempts = 0u32;
        let mut r = self.pick(index, None);
        loop {
            let (answered, result) = self.try_range_hedged(index, r, range, pin).await;
            r = answered;
            match result {
                Ok(data) => {
                    self.replicas[r].succeeded();
                    return Ok(data);
                }
                Err(Fail::Transient { why, connect }) => {
                    self.replicas[r].failed();
                    attempts += 1;
                    if attempts > self.retries {
                        if self.any_diverged() {
                            // Those left cannot deliver the pin and the others no longer have
                            // it: a fresh discovery pins what the live replicas serve.
                            return Err(Stop::Restart(format!(
                                "the replicas that still serve the pinned revision failed \
                                 ({why})"
                            )));
                        }
                        let what = format!("bytes {}-{}", range.start, range.last());
                        return Err(Stop::Fatal(
                            self.exhausted(r, attempts, &what, why, connect),
                        ));
                    }
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    let next = self.pick(index, Some(r));
                    tokio::time::sleep(self.backoff(attempts, r, next)).await;
                    r = self.pick(index, Some(r));
                }
                Err(Fail::Changed(why)) => {
                    if r == self.origin.load(Ordering::Relaxed) {
                        return Err(Stop::Restart(why));
                    }
                    // Another replica than the origin: it diverged, the pin is still served.
                    if !self.replicas[r].diverged.swap(true, Ordering::Relaxed) {
                        self.progress.note(&format!(
                            "{why}; finishing the download of {} from the other replicas",
                            self.name
                        ));
                    }
                    r = self.pick(index, Some(r));
                }
                Err(Fail::Fatal(e)) => return Err(Stop::Fatal(e)),
            }
        }
    }

    fn any_diverged(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.diverged.load(Ordering::Relaxed))
    }

    /// The error after the last allowed attempt failed.
    fn exhausted(
        &self,
        r: usize,
        attempts: u32,
        what: &str,
        why: String,
        connect: Option<String>,
    ) -> Error {
        let url = self.replicas[r].client.base_url().to_string();
        if let Some(cause) = connect
            && self.replicas.len() == 1
        {
            return Error::Connect { url, cause };
        }
        Error::Transport {
            op: "GET",
            target: self.name.to_string(),
            cause: format!("{what} failed {attempts} times, last from {url}: {why}"),
        }
    }

    async fn send(&self, r: usize, req: reqwest::RequestBuilder) -> Result<Response, Fail> {
        let url = self.replicas[r].client.base_url();
        match tokio::time::timeout(self.idle, req.send()).await {
            Err(_) => Err(transient(format!(
                "{url} sent no response within {}s",
                self.idle.as_secs_f64()
            ))),
            // No replica will present a certificate this client trusts more than this one did.
            Ok(Err(e)) if crate::error::is_certificate_error(&e) => Err(Fail::Fatal(
                Error::request("GET", &self.name.to_string(), url, e),
            )),
            // Only a refused or unroutable connection means "not running"; a reset after
            // connecting is an ordinary transient failure.
            Ok(Err(e)) if e.is_connect() => {
                let cause = crate::error::innermost_cause(&e);
                Err(Fail::Transient {
                    why: format!("cannot connect ({cause})"),
                    connect: Some(cause),
                })
            }
            Ok(Err(e)) => Err(transient(format!(
                "{url}: the request failed ({})",
                crate::error::causes(&e)
            ))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    async fn try_discover(&self, r: usize) -> Result<Discovered, Fail> {
        let client = &self.replicas[r].client;
        let url = client.base_url();
        let want = ByteRange {
            start: 0,
            len: self.chunk_size,
        };
        let req = client
            .request(Method::GET, &self.name)
            .header(header::RANGE, want.to_header());
        let resp = self.send_checked(r, req, false).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let etag = response_etag(&headers)
            .ok_or_else(|| transient(format!("{url} answered {status} without a larder ETag")))?;
        let base = |size: u64| ObjectInfo {
            etag: etag.clone(),
            size,
            last_modified: text(&headers, header::LAST_MODIFIED)
                .and_then(|v| httpdate::parse_http_date(v).ok()),
            content_type: text(&headers, header::CONTENT_TYPE).map(str::to_string),
        };
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let raw = text(&headers, header::CONTENT_RANGE).unwrap_or("");
                let (got, total) = parse_content_range(raw).ok_or_else(|| {
                    transient(format!(
                        "{url} answered 206 with an invalid Content-Range {raw:?}"
                    ))
                })?;
                let expect = ByteRange {
                    start: 0,
                    len: self.chunk_size.min(total),
                };
                check_range(url, got, expect, total, raw)?;
                check_length(url, &headers, got.len)?;
                let first = self.read_body(r, resp, got.len).await?;
                Ok(Discovered {
                    info: base(total),
                    first,
                })
            }
            StatusCode::OK => {
                // The whole object: larderd sends this only when it ignores the Range header.
                let size = content_length(&headers).ok_or_else(|| {
                    transient(format!("{url} answered 200 without a Content-Length"))
                })?;
                if size > self.chunk_size {
                    return Err(Fail::Fatal(Error::Protocol(format!(
                        "{url} ignored the Range request (it answered 200 with all {size} bytes); \
                         parallel downloads need range support: is --url pointing at larderd?"
                    ))));
                }
                let first = self.read_body(r, resp, size).await?;
                Ok(Discovered {
                    info: base(size),
                    first,
                })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // `bytes=0-…` is unsatisfiable only for an empty object.
                let raw = text(&headers, header::CONTENT_RANGE).unwrap_or("");
                if raw.trim() == "bytes */0" {
                    Ok(Discovered {
                        info: base(0),
                        first: Bytes::new(),
                    })
                } else {
                    Err(transient(format!(
                        "{url} answered 416 to a request for the first bytes, with Content-Range \
                         {raw:?}"
                    )))
                }
            }
            other => Err(transient(format!(
                "{url} answered {other} to a range request"
            ))),
        }
    }

    /// One request for the range on replica `r`, and a second one on another replica if the
    /// first is slow (see the module comment). Returns the replica whose answer counts: the
    /// winner's, or the one that failed last.
    async fn try_range_hedged(
        &self,
        index: u64,
        r: usize,
        range: ByteRange,
        pin: &Pin,
    ) -> (usize, Result<Bytes, Fail>) {
        use futures_util::future::{Either, select};
        let started = Instant::now();
        let first = Box::pin(self.timed_range(r, range, pin));
        if self.replicas.len() == 1 {
            return (r, first.await);
        }
        let first = match select(first, Box::pin(self.hedge_time(started))).await {
            Either::Left((result, _)) => return (r, result),
            Either::Right(((), first)) => first,
        };
        if self.hedge_target(index, r).is_none() {
            return (r, first.await);
        }
        // Slow ranges often come in groups (all those on one replica): they queue for a hedge
        // slot rather than give up on hedging when another holds it.
        let (slot, first) = match select(first, Box::pin(self.hedging.slots.acquire())).await {
            Either::Left((result, _)) => return (r, result),
            Either::Right((slot, first)) => (slot, first),
        };
        // Replicas may have failed while this range waited for the slot.
        let (slot, other) = match (slot, self.hedge_target(index, r)) {
            (Ok(slot), Some(other)) => (slot, other),
            // Not hedged after all: the slot goes back before the long wait.
            (slot, _) => {
                drop(slot);
                return (r, first.await);
            }
        };
        self.hedging.started.fetch_add(1, Ordering::Relaxed);
        let second = Box::pin(self.timed_range(other, range, pin));
        let outcome = match select(first, second).await {
            Either::Left((Ok(data), _)) => (r, Ok(data)),
            Either::Right((Ok(data), _)) => {
                self.hedging.won.fetch_add(1, Ordering::Relaxed);
                self.replicas[r].outpaced();
                (other, Ok(data))
            }
            // One failed transiently: the other may still make it. Its failure is booked now,
            // since the caller only hears of the request that counts.
            Either::Left((Err(Fail::Transient { .. }), second)) => {
                self.replicas[r].failed();
                let result = second.await;
                if result.is_ok() {
                    self.hedging.won.fetch_add(1, Ordering::Relaxed);
                }
                (other, result)
            }
            Either::Right((Err(Fail::Transient { .. }), first)) => {
                self.replicas[other].failed();
                (r, first.await)
            }
            // A changed revision or a fatal answer decides at once, as without a hedge.
            Either::Left((Err(fail), _)) => (r, Err(fail)),
            Either::Right((Err(fail), _)) => (other, Err(fail)),
        };
        drop(slot);
        outcome
    }

    /// Another replica than `r` that may take over the `index`th range now: serving the pin
    /// and not in quarantine.
    fn hedge_target(&self, index: u64, r: usize) -> Option<usize> {
        let other = self.pick(index, Some(r));
        let healthy = lock(&self.replicas[other].health)
            .down_until
            .is_none_or(|until| until <= Instant::now());
        let serves_pin = !self.replicas[other].diverged.load(Ordering::Relaxed);
        (other != r && healthy && serves_pin).then_some(other)
    }

    /// Returns once a range started at `started` counts as slow. Until enough ranges finished
    /// to know what is normal, it keeps looking, so the first ranges can be hedged too.
    async fn hedge_time(&self, started: Instant) {
        loop {
            match self.hedging.delay().map(|d| started + d) {
                Some(due) if due <= Instant::now() => return,
                // The median may grow meanwhile: look again when this deadline comes.
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => tokio::time::sleep(MIN_HEDGE_DELAY).await,
            }
        }
    }

    /// [`Shared::try_range`], remembering how long successful requests take.
    async fn timed_range(&self, r: usize, range: ByteRange, pin: &Pin) -> Result<Bytes, Fail> {
        let started = Instant::now();
        let result = self.try_range(r, range, pin).await;
        if result.is_ok() {
            self.hedging.record(started.elapsed());
        }
        result
    }

    async fn try_range(&self, r: usize, range: ByteRange, pin: &Pin) -> Result<Bytes, Fail> {
        let client = &self.replicas[r].client;
        let url = client.base_url();
        let req = client
            .request(Method::GET, &self.name)
            .header(header::RANGE, range.to_header())
            .header(header::IF_MATCH, pin.etag.header_value());
        let resp = self.send_checked(r, req, true).await?;
        let status = resp.status();
        let headers = resp.headers();
        match status {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::PRECONDITION_FAILED => {
                let now =
                    response_etag(headers).map_or_else(|| "unknown".to_string(), |e| e.to_string());
                return Err(Fail::Changed(format!(
                    "{url} no longer serves ETag {}, the current one is {now}",
                    pin.etag
                )));
            }
            // With If-Match a server must answer 412 before 416; either way the revision is gone.
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(Fail::Changed(format!(
                    "{url} answered 416 for bytes {}-{} of ETag {}",
                    range.start,
                    range.last(),
                    pin.etag
                )));
            }
            StatusCode::OK => {
                return Err(transient(format!(
                    "{url} answered 200 (the whole object) to a request for bytes {}-{}",
                    range.start,
                    range.last()
                )));
            }
            other => {
                return Err(transient(format!(
                    "{url} answered {other} to a request for bytes {}-{}",
                    range.start,
                    range.last()
                )));
            }
        }
        match response_etag(headers) {
            Some(e) if e == pin.etag => {}
            // The server ignored If-Match: what it sends is of another revision.
            Some(e) => {
                return Err(Fail::Changed(format!(
                    "{url} answered ETag {e} to a request pinned to {}",
                    pin.etag
                )));
            }
            None => {
                return Err(transient(format!(
                    "{url} answered 206 without a larder ETag"
                )));
            }
        }
        let raw = text(headers, header::CONTENT_RANGE).unwrap_or("");
        let (got, total) = parse_content_range(raw).ok_or_else(|| {
            transient(format!(
                "{url} answered 206 with an invalid Content-Range {raw:?}"
            ))
        })?;
        check_range(url, got, range, pin.total, raw)?;
        if total != pin.total {
            return Err(transient(format!(
                "{url} answered Content-Range {raw:?} but ETag {} has {} bytes",
                pin.etag, pin.total
            )));
        }
        check_length(url, headers, range.len)?;
        self.read_body(r, resp, range.len).await
    }

    /// Sends, and sorts the statuses that are never worth a retry (404, other 4xx) from the rest.
    async fn send_checked(
        &self,
        r: usize,
        req: reqwest::RequestBuilder,
        pinned: bool,
    ) -> Result<Response, Fail> {
        let resp = self.send(r, req).await?;
        let status = resp.status();
        if status.is_success()
            || status == StatusCode::PRECONDITION_FAILED
            || status == StatusCode::RANGE_NOT_SATISFIABLE
        {
            return Ok(resp);
        }
        let url = self.replicas[r].client.base_url();
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            let reason = self.replicas[r].client.reason(status, resp).await;
            return Err(transient(format!("{url} answered {status}: {reason}")));
        }
        if status == StatusCode::NOT_FOUND && pinned {
            // Deleted since discovery: a fresh discovery reports the miss properly.
            return Err(Fail::Changed(format!("{url} no longer has the object")));
        }
        Err(Fail::Fatal(
            self.replicas[r]
                .client
                .failure("GET", &self.name, resp)
                .await,
        ))
    }

    /// Reads exactly `len` body bytes, each wait bounded by the idle timeout.
    async fn read_body(&self, r: usize, mut resp: Response, len: u64) -> Result<Bytes, Fail> {
        let url = self.replicas[r].client.base_url();
        let mut buf = self.pool.take(len as usize);
        // Bytes shown on the progress bar are taken back unless the range is delivered: after
        // a failure, and when a hedge race drops this request half-way.
        let mut shown = ShownBytes {
            progress: &self.progress,
            bytes: 0,
        };
        let fail = |why: String| Err(transient(format!("{url}: {why}")));
        loop {
            let next = match tokio::time::timeout(self.idle, resp.chunk()).await {
                Err(_) => {
                    return fail(format!(
                        "the body stalled: no data for {}s after {} of {len} bytes",
                        self.idle.as_secs_f64(),
                        buf.len()
                    ));
                }
                Ok(Err(e)) => {
                    let cause = crate::error::causes(&e);
                    return fail(format!(
                        "the body broke off after {} of {len} bytes ({cause})",
                        buf.len()
                    ));
                }
                Ok(Ok(next)) => next,
            };
            let Some(bytes) = next else { break };
            if buf.len() as u64 + bytes.len() as u64 > len {
                return fail(format!("the body is longer than the {len} bytes announced"));
            }
            buf.extend_from_slice(&bytes);
            self.replicas[r]
                .bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.progress.inc(bytes.len() as u64);
            shown.bytes += bytes.len() as u64;
        }
        if buf.len() as u64 != len {
            return fail(format!("the body ended after {} of {len} bytes", buf.len()));
        }
        shown.bytes = 0;
        Ok(buf.freeze())
    }
}

/// Progress of a range still being read; see [`Shared::read_body`].
struct ShownBytes<'a> {
    progress: &'a Progress,
    bytes: u64,
}

impl Drop for ShownBytes<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.progress.dec(self.bytes);
        }
    }
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn response_etag(headers: &HeaderMap) -> Option<ETag> {
    text(headers, header::ETAG).and_then(ETag::parse)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    text(headers, header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

/// A 206 must cover exactly the range asked for; a shorter one (same start) is a server that
/// gave up early, anything else is confusion. Both are retried, neither is written.
fn check_range(
    url: &str,
    got: ByteRange,
    want: ByteRange,
    total: u64,
    raw: &str,
) -> Result<(), Fail> {
    if got == want {
        return Ok(());
    }
    let asked = format!("bytes {}-{}/{total}", want.start, want.last());
    if got.start == want.start && got.len < want.len {
        return Err(transient(format!(
            "{url} answered a short 206 (Content-Range {raw:?}) to a request for {asked}"
        )));
    }
    Err(transient(format!(
        "{url} answered Content-Range {raw:?} to a request for {asked}"
    )))
}

fn check_length(url: &str, headers: &HeaderMap, want: u64) -> Result<(), Fail> {
    match content_length(headers) {
        Some(n) if n == want => Ok(()),
        Some(n) => Err(transient(format!(
            "{url} answered Content-Length {n} for a {want}-byte range"
        ))),
        None => Err(transient(format!(
            "{url} answered a range without a Content-Length"
        ))),
    }
}

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

mod buffers;
mod driver;
mod fetch;
mod hedging;
mod replicas;
mod response;
mod writer;

use crate::output::{FileSink, Sink, WriterSink};
use crate::progress::Progress;
use crate::{Client, Error, ObjectInfo, ObjectName};
use buffers::BufferPool;
use bytes::{Bytes, BytesMut};
use hedging::Hedging;
use larder_proto::range::parse_content_range;
use larder_proto::{ByteRange, ETag};
use replicas::{Health, Replica};
use reqwest::header::{self};
use reqwest::{Method, Response, StatusCode};
use response::{Fail, check_length, check_range, content_length, response_etag, text, transient};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use writer::Writer;

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
    /// Shows bytes received; hidden by default.
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

/// One replica's share of a download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaUsage {
    /// The replica's server URL, as used in messages.
    pub url: String,
    /// Body bytes received from it, including those of attempts that later failed.
    pub bytes: u64,
    /// Requests to it that failed; after each one it is given no range for a while.
    pub failures: u64,
    /// It served another revision than the one pinned, so the (last) attempt went on without it.
    pub diverged: bool,
}

/// What a finished download did.
#[derive(Clone, Debug)]
pub struct DownloadSummary {
    /// The revision that was downloaded (after the last restart).
    pub info: ObjectInfo,
    /// Fresh discoveries after the object changed.
    pub restarts: u32,
    /// Range attempts that failed transiently and were tried again.
    pub retries: u64,
    /// Slow ranges asked again from another replica, and how many of those second requests
    /// answered first.
    pub hedged: u64,
    /// Hedged requests that answered before the request they duplicated.
    pub hedges_won: u64,
    /// Wall-clock time of the whole download, restarts included.
    pub elapsed: Duration,
    /// Each replica's share, in the order the replicas were given.
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
    /// Checks the options (1 to 256 concurrent ranges, chunks of 1 byte to 1 GiB, a positive idle
    /// timeout) and that there is at least one replica; `InvalidInput` otherwise.
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

    /// The options downloads run with.
    pub fn options(&self) -> &DownloadOptions {
        &self.opts
    }

    pub(crate) fn replicas(&self) -> &[Client] {
        &self.replicas
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

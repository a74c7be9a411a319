//! Spooling for the tiered cache: a revision copied from another tier is written to a temp file
//! while readers follow it (`Spool`), staged whole and verified (`StagedRevision`), and committed
//! only if the caller still wants it, under the index lock (the `CacheTier` capability).
//!
//! A reader following a spool gets the bytes as they arrive from the other tier, before they are
//! hashed and written: each chunk is also broadcast, without waiting for anyone, to the readers
//! following the spool. A reader that falls behind that broadcast (it keeps only the last
//! [`LIVE_CHUNKS`] chunks), or that joins late, reads the same bytes back from the temp file;
//! so a slow client never slows the copy, and a fast one never waits for the disk.

use super::*;
use crate::tier::SpoolWrite;
use tokio::sync::{broadcast, mpsc};

/// Chunks of a spool kept for readers that follow it live (memory per fill: this many chunks
/// of the other tier's body, a few MiB).
const LIVE_CHUNKS: usize = 64;

/// A chunk of a spool's body and its offset in the body.
type LiveChunk = (u64, Bytes);

/// A new revision's temp file name and encoded header, decided before any byte arrives.
pub(super) struct Prepared {
    pub(super) temp: TempFile,
    pub(super) file: File,
    pub(super) header: Vec<u8>,
}

/// A revision being written that readers may follow: the body of the temp file at `path`
/// starting at `body_offset`, of which `progress` bytes are in the file. The file is renamed
/// into place when complete, which does not disturb a reader holding it open.
#[derive(Clone)]
pub struct Spool {
    pub(super) path: PathBuf,
    pub(super) body_offset: u64,
    pub(super) progress: watch::Receiver<u64>,
    /// The chunks as they arrive, while the spool is being written (weak: the channel closes
    /// when the writer is done, whoever still holds the spool).
    live: broadcast::WeakSender<LiveChunk>,
    /// Subscribed when the spool was made, for its first reader (usually the request that
    /// started the fill), which then misses none of the first bytes.
    first_live: Arc<Mutex<Option<broadcast::Receiver<LiveChunk>>>>,
}

/// What the writer of a spool tells its readers: how much of the body is in the file, and each
/// chunk as it arrives.
pub(super) struct Followers {
    progress: watch::Sender<u64>,
    live: broadcast::Sender<LiveChunk>,
}

impl Inner {
    pub(super) fn prepare(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: &PutOptions,
    ) -> Result<Prepared, TierError> {
        let now = now_ms();
        let expires_ms = now.saturating_add(opts.ttl.as_millis() as u64);
        let meta = MetaJson {
            ns: ns.as_str().to_string(),
            key: key.as_str().to_string(),
            headers: opts.headers.clone(),
        };
        let last_modified_s = opts.last_modified.map_or(now / 1000, |t| {
            t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
        });
        let header = format::encode_header(&meta, expires_ms, last_modified_s)
            .map_err(|e| TierError::new(ErrorKind::InvalidInput, e))?;
        let path = self.tmp.join(format!("{:016x}.tmp", rand::random::<u64>()));
        // Created before any byte arrives, so that a reader following a spool finds the file.
        let file = File::create_new(&path).map_err(|e| TierError::io("create temp file", &e))?;
        Ok(Prepared {
            temp: TempFile { path, armed: true },
            file,
            header,
        })
    }

    pub(super) async fn stage(
        self: Arc<Self>,
        ns: Namespace,
        key: Key,
        mut body: UploadStream,
        opts: PutOptions,
        prepared: Prepared,
        followers: Option<Followers>,
    ) -> Result<StagedRevision, TierError> {
        let Prepared { temp, file, header } = prepared;
        let (progress, live) = followers.map(|f| (f.progress, f.live)).unzip();
        let (tx, rx) = mpsc::channel(8);
        let direct = self.config.direct_writes;
        let writer = tokio::task::spawn_blocking(move || {
            write_temp(temp, file, header, rx, progress, direct)
        });
        let max = opts
            .max_size
            .unwrap_or(u64::MAX)
            .min(self.config.limit.unwrap_or(u64::MAX));
        let mut received = 0u64;
        let mut failure = None;
        while let Some(item) = body.next().await {
            match item {
                Ok(chunk) => {
                    received += chunk.len() as u64;
                    if received > max {
                        failure = Some(if opts.max_size.is_some_and(|m| received > m) {
                            TierError::new(
                                ErrorKind::TooLarge,
                                format!(
                                    "body exceeds the maximum object size of {} bytes",
                                    opts.max_size.unwrap_or(0)
                                ),
                            )
                        } else {
                            TierError::new(
                                ErrorKind::InsufficientStorage,
                                "object is larger than the disk tier's size limit",
                            )
                        });
                        break;
                    }
                    if let Some(live) = &live {
                        // No receiver is not an error: nobody follows the spool right now.
                        let _ = live.send((received - chunk.len() as u64, chunk.clone()));
                    }
                    if tx.send(Upload::Chunk(chunk)).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    failure = Some(TierError::new(
                        ErrorKind::BodyAborted,
                        format!("request body failed: {e}"),
                    ));
                    break;
                }
            }
        }
        if failure.is_none() {
            let _ = tx.send(Upload::Finish).await;
        }
        drop(tx);
        drop(live);
        let written = writer
            .await
            .map_err(|e| TierError::internal("disk write", e))?;
        if let Some(f) = failure {
            return Err(f);
        }
        let (temp, fixed) = written?;
        if let Some(expected) = &opts.expect_etag
            && fixed.etag() != *expected
        {
            return Err(TierError::new(
                ErrorKind::Upstream,
                format!(
                    "copied body has ETag {} instead of {expected}",
                    fixed.etag()
                ),
            ));
        }
        Ok(StagedRevision {
            ns,
            key,
            temp,
            fixed,
            opts,
        })
    }
}

/// A revision written to a temp file and verified, not yet committed. Dropping it removes the
/// temp file.
pub struct StagedRevision {
    pub(super) ns: Namespace,
    pub(super) key: Key,
    pub(super) temp: TempFile,
    pub(super) fixed: Fixed,
    pub(super) opts: PutOptions,
}

/// Spooling and staging for the tiered cache: a spool is the temp file a revision is being
/// written to (readers open it by path and wait on the writer's progress), a staged revision the
/// complete, fsynced temp file waiting for its commit.
#[async_trait]
impl CacheTier for DiskTier {
    type Spool = Spool;
    type Staged = StagedRevision;

    fn capacity(&self) -> Option<u64> {
        self.inner.config.limit
    }

    fn spool(
        &self,
        ns: &Namespace,
        key: &Key,
        body: UploadStream,
        opts: PutOptions,
    ) -> Result<(Spool, SpoolWrite<StagedRevision>), TierError> {
        let prepared = self.inner.prepare(ns, key, &opts)?;
        let (tx, rx) = watch::channel(0u64);
        let (live, first_live) = broadcast::channel(LIVE_CHUNKS);
        let spool = Spool {
            path: prepared.temp.path.clone(),
            body_offset: prepared.header.len() as u64,
            progress: rx,
            live: live.downgrade(),
            first_live: Arc::new(Mutex::new(Some(first_live))),
        };
        let write = self
            .inner
            .clone()
            .stage(
                ns.clone(),
                key.clone(),
                body,
                opts,
                prepared,
                Some(Followers { progress: tx, live }),
            )
            .boxed();
        Ok((spool, write))
    }

    async fn stage(
        &self,
        ns: &Namespace,
        key: &Key,
        body: UploadStream,
        opts: PutOptions,
    ) -> Result<StagedRevision, TierError> {
        let prepared = self.inner.prepare(ns, key, &opts)?;
        self.inner
            .clone()
            .stage(ns.clone(), key.clone(), body, opts, prepared, None)
            .await
    }

    fn staged_etag(staged: &StagedRevision) -> ETag {
        staged.fixed.etag()
    }

    async fn commit_staged(
        &self,
        staged: StagedRevision,
        still_wanted: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<PutResult, TierError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let StagedRevision {
                ns,
                key,
                temp,
                fixed,
                opts,
            } = staged;
            let created = inner.commit(&ns, &key, temp, &fixed, &opts, still_wanted.as_ref())?;
            Ok(PutResult {
                etag: fixed.etag(),
                size: fixed.body_len,
                created,
            })
        })
        .await
        .map_err(|e| TierError::internal("disk commit", e))?
    }

    async fn read_spool(
        &self,
        spool: &Spool,
        start: u64,
        len: u64,
    ) -> Result<BodyStream, TierError> {
        // Subscribed before the file is opened: whatever arrives from now on comes live, and
        // everything before it is in the file by the time the writer's progress says so.
        let first = spool
            .first_live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let live = first.or_else(|| spool.live.upgrade().map(|sender| sender.subscribe()));
        let path = spool.path.clone();
        let file = tokio::task::spawn_blocking(move || File::open(path))
            .await
            .map_err(|e| TierError::internal("open spool", e))?;
        let file = match file {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TierError::not_found()),
            Err(e) => return Err(TierError::io("open spool", &e)),
        };
        let follower = Follower {
            file,
            body_offset: spool.body_offset,
            read_chunk: self.inner.config.read_chunk as u64,
            progress: spool.progress.clone(),
            live,
            pending: None,
            pos: start,
            end: start + len,
        };
        let stream = futures_util::stream::unfold(follower, |mut f| async move {
            if f.pos >= f.end {
                return None;
            }
            let next = f.next_chunk().await;
            if next.is_err() {
                f.pos = f.end;
            }
            Some((next, f))
        });
        Ok(stream.boxed())
    }
}

/// A reader following a spool from `pos` to `end`: live chunks while it keeps up, the temp file
/// otherwise.
struct Follower {
    file: Arc<File>,
    body_offset: u64,
    read_chunk: u64,
    progress: watch::Receiver<u64>,
    /// `None` once the writer is done (or was when the reader subscribed).
    live: Option<broadcast::Receiver<LiveChunk>>,
    /// A live chunk received ahead of `pos`, waiting for the file to catch up to it.
    pending: Option<LiveChunk>,
    pos: u64,
    end: u64,
}

impl Follower {
    /// The next bytes from `pos` (`pos < end`).
    async fn next_chunk(&mut self) -> Result<Bytes, TierError> {
        loop {
            if let Some(chunk) = self.take_live() {
                return Ok(chunk);
            }
            let in_file = *self.progress.borrow_and_update();
            if in_file > self.pos {
                return self.read_file(in_file).await;
            }
            // Nothing at `pos` yet: wait for the next live chunk or for the writer's progress.
            let waiting_live = self.pending.is_none();
            match self.live.as_mut().filter(|_| waiting_live) {
                Some(live) => tokio::select! {
                    received = live.recv() => match received {
                        Ok(chunk) => self.pending = Some(chunk),
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => self.live = None,
                    },
                    changed = self.progress.changed() => {
                        if changed.is_err() {
                            self.writer_gone()?;
                        }
                    }
                },
                None => {
                    if self.progress.changed().await.is_err() {
                        self.writer_gone()?;
                    }
                }
            }
        }
    }

    /// The bytes at `pos` from the live chunks, if one received so far covers it.
    fn take_live(&mut self) -> Option<Bytes> {
        loop {
            if self.pending.is_none() {
                let live = self.live.as_mut()?;
                match live.try_recv() {
                    Ok(chunk) => self.pending = Some(chunk),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(broadcast::error::TryRecvError::Empty) => return None,
                    Err(broadcast::error::TryRecvError::Closed) => {
                        self.live = None;
                        return None;
                    }
                }
            }
            let (offset, bytes) = self.pending.as_ref()?;
            let chunk_end = offset + bytes.len() as u64;
            if chunk_end <= self.pos {
                self.pending = None; // already delivered from the file
                continue;
            }
            if *offset > self.pos {
                return None; // the bytes before it come from the file
            }
            let from = (self.pos - offset) as usize;
            let to = (chunk_end.min(self.end) - offset) as usize;
            let out = bytes.slice(from..to);
            self.pos += out.len() as u64;
            self.pending = None;
            return Some(out);
        }
    }

    /// Reads from `pos` up to `in_file` (what the writer has in the file), one chunk at most.
    async fn read_file(&mut self, in_file: u64) -> Result<Bytes, TierError> {
        let n = self.read_chunk.min(in_file.min(self.end) - self.pos);
        let (file, at) = (self.file.clone(), self.body_offset + self.pos);
        let bytes = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n as usize];
            let got =
                read_full_at(&file, &mut buf, at).map_err(|e| TierError::io("read spool", &e))?;
            if got as u64 != n {
                return Err(TierError::internal(
                    "read spool",
                    "spool shorter than its progress",
                ));
            }
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| TierError::internal("read spool", e))??;
        self.pos += n;
        Ok(bytes)
    }

    /// The writer dropped its progress: fine if the bytes at `pos` made it to the file.
    fn writer_gone(&self) -> Result<(), TierError> {
        if *self.progress.borrow() > self.pos {
            return Ok(());
        }
        Err(TierError::new(
            ErrorKind::Upstream,
            "the fill this read follows failed",
        ))
    }
}

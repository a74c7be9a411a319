//! Spooling for the tiered cache: a revision copied from another tier is written to a temp file
//! while readers follow it (`Spool`), staged whole and verified (`StagedRevision`), and committed
//! only if the caller still wants it, under the index lock (the `CacheTier` capability).

use super::*;
use crate::tier::SpoolWrite;
use tokio::sync::mpsc;

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
        progress: Option<watch::Sender<u64>>,
    ) -> Result<StagedRevision, TierError> {
        let Prepared { temp, file, header } = prepared;
        let (tx, rx) = mpsc::channel(8);
        let writer =
            tokio::task::spawn_blocking(move || write_temp(temp, file, header, rx, progress));
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
        let spool = Spool {
            path: prepared.temp.path.clone(),
            body_offset: prepared.header.len() as u64,
            progress: rx,
        };
        let write = self
            .inner
            .clone()
            .stage(ns.clone(), key.clone(), body, opts, prepared, Some(tx))
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
        let path = spool.path.clone();
        let file = tokio::task::spawn_blocking(move || File::open(path))
            .await
            .map_err(|e| TierError::internal("open spool", e))?;
        let file = match file {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TierError::not_found()),
            Err(e) => return Err(TierError::io("open spool", &e)),
        };
        let chunk = self.inner.config.read_chunk as u64;
        let base = spool.body_offset;
        let state = (file, spool.progress.clone(), start, start + len);
        let stream =
            futures_util::stream::unfold(state, move |(file, mut progress, pos, end)| async move {
                if pos >= end {
                    return None;
                }
                let n = chunk.min(end - pos);
                // Wait until the writer has these bytes in the file.
                while *progress.borrow_and_update() < pos + n {
                    if progress.changed().await.is_err() {
                        if *progress.borrow() >= pos + n {
                            break;
                        }
                        let err = TierError::new(
                            ErrorKind::Upstream,
                            "the fill this read follows failed",
                        );
                        return Some((Err(err), (file, progress, end, end)));
                    }
                }
                let f = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n as usize];
                    let got = read_full_at(&f, &mut buf, base + pos)
                        .map_err(|e| TierError::io("read spool", &e))?;
                    if got as u64 != n {
                        return Err(TierError::internal(
                            "read spool",
                            "spool shorter than its progress",
                        ));
                    }
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| TierError::internal("read spool", e))
                .and_then(|r| r);
                let next = if read.is_ok() { pos + n } else { end };
                Some((read, (file, progress, next, end)))
            });
        Ok(stream.boxed())
    }
}

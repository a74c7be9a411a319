//! The tiered cache: a fast local tier (disk) in front of an authoritative remote tier (S3),
//! itself a [`Tier`], so the server and the conformance suite treat it like any other.
//!
//! Reads:
//! - **Pinned** (`If-Match` naming one ETag): the local tier serves it if it holds exactly that
//!   revision; otherwise the remote tier decides (its current revision, or `412` with the
//!   current ETag). A 412 from the local tier never reaches the client: local copies may lag.
//! - **Unpinned**: the local copy is served while it is fresh — validated against the remote
//!   tier less than `revalidate_after` ago. After that one small remote read (the reference)
//!   tells whether the local copy is still current; replicas therefore converge on the newest
//!   revision within the window, and a remote failure outside it is a 503, never stale bytes
//!   presented as current.
//! - Whatever the remote tier serves starts one background fill of the local tier per key
//!   (single-flight), pinned to the served ETag, verified against the digest and committed only
//!   when complete and only if the local tier still holds what it held when the fill began.
//!
//! Writes stream to both tiers at once; the remote tier commits first and decides the
//! preconditions, and only then is the local copy allowed to commit. A local failure after a
//! remote success drops the local copy rather than leaving an older one behind.

use crate::disk::{DiskTier, Spool};
use crate::error::{ErrorKind, TierError};
use crate::tier::{
    GetOptions, GetResponse, NamespaceUsage, ObjectMeta, PutOptions, PutResult, Tier, TierStats,
    UploadStream,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use larder_proto::{ETag, Key, Namespace, ReadConditions, ReadOutcome, WritePrecondition};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{OnceCell, mpsc, oneshot};

type KeyId = (Namespace, Key);

pub struct TieredTier {
    inner: Arc<Inner>,
}

struct Inner {
    local: Arc<DiskTier>,
    remote: Arc<dyn Tier>,
    revalidate_after: Duration,
    /// When each key's local copy was last known to be the remote's current revision.
    validated: Mutex<HashMap<KeyId, (ETag, Instant)>>,
    /// Keys with a fill in flight, and the revision each is copying.
    fills: Mutex<HashMap<KeyId, Arc<ActiveFill>>>,
    /// Writes in flight per key, and whether any two of them overlapped.
    writes: Mutex<HashMap<KeyId, WritesInFlight>>,
}

#[derive(Default)]
struct WritesInFlight {
    active: usize,
    overlapped: bool,
}

/// Registers one write of a key for as long as it runs, also when the request is cancelled.
struct WriteInFlight<'a> {
    inner: &'a Inner,
    id: KeyId,
    ended: bool,
}

impl<'a> WriteInFlight<'a> {
    fn start(inner: &'a Inner, id: KeyId) -> WriteInFlight<'a> {
        let mut writes = inner.writes.lock().unwrap();
        let w = writes.entry(id.clone()).or_default();
        w.active += 1;
        w.overlapped |= w.active > 1;
        drop(writes);
        WriteInFlight {
            inner,
            id,
            ended: false,
        }
    }

    /// Whether this write overlapped another write of the key at any time.
    fn end(mut self) -> bool {
        self.ended = true;
        self.release()
    }

    fn release(&self) -> bool {
        let mut writes = self.inner.writes.lock().unwrap();
        let Some(w) = writes.get_mut(&self.id) else {
            return false;
        };
        let overlapped = w.overlapped;
        w.active -= 1;
        if w.active == 0 {
            writes.remove(&self.id);
        }
        overlapped
    }
}

impl Drop for WriteInFlight<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.release();
        }
    }
}

/// One fill: the revision it copies and, once its first S3 response is in, the spool that
/// readers of that revision follow instead of reading S3 themselves.
struct ActiveFill {
    etag: ETag,
    spool: OnceCell<Result<Spool, TierError>>,
}

impl TieredTier {
    pub fn new(
        local: Arc<DiskTier>,
        remote: Arc<dyn Tier>,
        revalidate_after: Duration,
    ) -> TieredTier {
        TieredTier {
            inner: Arc::new(Inner {
                local,
                remote,
                revalidate_after,
                validated: Mutex::new(HashMap::new()),
                fills: Mutex::new(HashMap::new()),
                writes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether a fill of this key is running (for tests and metrics).
    pub fn fill_in_flight(&self, ns: &Namespace, key: &Key) -> bool {
        self.inner
            .fills
            .lock()
            .unwrap()
            .contains_key(&(ns.clone(), key.clone()))
    }
}

fn hit(tier: &'static str) {
    metrics::counter!("larder_tier_hits_total", "tier" => tier).increment(1);
}

fn miss(tier: &'static str) {
    metrics::counter!("larder_tier_misses_total", "tier" => tier).increment(1);
}

impl Inner {
    fn fresh_etag(&self, id: &KeyId) -> Option<ETag> {
        let validated = self.validated.lock().unwrap();
        validated
            .get(id)
            .filter(|(_, at)| at.elapsed() < self.revalidate_after)
            .map(|(etag, _)| etag.clone())
    }

    fn mark_validated(&self, id: KeyId, etag: ETag) {
        self.validated
            .lock()
            .unwrap()
            .insert(id, (etag, Instant::now()));
    }

    /// The remote's current revision of a key; `None` when there is none or it cannot say.
    async fn remote_etag(&self, ns: &Namespace, key: &Key) -> Option<ETag> {
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        match self.remote.get(ns, key, head).await {
            Ok(r) if r.outcome != ReadOutcome::NotFound => Some(r.meta.etag),
            _ => None,
        }
    }

    fn forget(&self, id: &KeyId) {
        self.validated.lock().unwrap().remove(id);
    }

    /// The local tier's answer if it holds revision `etag`; local failures only cost a miss.
    async fn local_if(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: &GetOptions,
        etag: &str,
    ) -> Option<GetResponse> {
        match self.local.get(ns, key, opts.clone()).await {
            Ok(r) if r.meta.etag.as_str() == etag => Some(r),
            Ok(_) => None,
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(%ns, %key, error = %e, "local tier failed; reading the remote tier");
                None
            }
        }
    }

    /// Serves what only the remote tier can: the remote decides, and a body is streamed from the
    /// fill of that revision into the local tier (started here if none runs), so concurrent
    /// misses of one key cost a single remote body read per replica. Objects the local tier
    /// cannot hold, and fills that cannot start, are read from the remote directly.
    async fn from_remote(
        self: &Arc<Self>,
        ns: &Namespace,
        key: &Key,
        opts: GetOptions,
    ) -> Result<GetResponse, TierError> {
        miss(self.local.name());
        let head = GetOptions {
            conditions: opts.conditions.clone(),
            head: true,
        };
        let decided = self.remote.get(ns, key, head).await?;
        let range = match decided.outcome {
            ReadOutcome::Full => (0, decided.meta.size),
            ReadOutcome::Partial(r) => (r.start, r.len),
            _ => return Ok(decided),
        };
        if opts.head {
            return Ok(decided);
        }
        let fits = self
            .local
            .limit()
            .is_none_or(|limit| decided.meta.size < limit);
        if fits {
            match self.follow_fill(ns, key, &decided.meta).await {
                Ok(spool) => match self.local.read_spool(&spool, range.0, range.1).await {
                    Ok(body) => {
                        return Ok(GetResponse {
                            outcome: decided.outcome,
                            meta: decided.meta,
                            body: Some(body),
                            // The bytes come from the S3 body being copied in.
                            source: self.remote.name(),
                        });
                    }
                    // The fill finished first: the revision is local now.
                    Err(e) if e.kind == ErrorKind::NotFound => {
                        if let Some(r) = self
                            .local_if(ns, key, &opts, decided.meta.etag.as_str())
                            .await
                        {
                            return Ok(r);
                        }
                    }
                    Err(e) => tracing::warn!(%ns, %key, error = %e, "cannot follow the fill"),
                },
                Err(e) => {
                    tracing::debug!(%ns, %key, error = %e, "no fill to follow; reading the remote tier")
                }
            }
        }
        self.remote.get(ns, key, opts).await
    }

    /// The spool of the fill copying revision `meta.etag` of this key, starting the fill if
    /// none runs. Fails when another revision's fill is running or the fill cannot start.
    async fn follow_fill(
        self: &Arc<Self>,
        ns: &Namespace,
        key: &Key,
        meta: &ObjectMeta,
    ) -> Result<Spool, TierError> {
        let id = (ns.clone(), key.clone());
        let fill = {
            let mut fills = self.fills.lock().unwrap();
            let fill = fills
                .entry(id.clone())
                .or_insert_with(|| {
                    Arc::new(ActiveFill {
                        etag: meta.etag.clone(),
                        spool: OnceCell::new(),
                    })
                })
                .clone();
            if fill.etag != meta.etag {
                return Err(TierError::new(
                    ErrorKind::Unavailable,
                    "a fill of another revision is running",
                ));
            }
            fill
        };
        fill.spool
            .get_or_init(|| self.begin_fill(id, fill.clone(), meta.clone()))
            .await
            .clone()
    }

    /// Opens the remote body pinned to the revision and starts writing it into the local tier.
    /// Returns once the remote has answered, so that a reader following the spool has its first
    /// byte source open before it answers its client.
    async fn begin_fill(
        self: &Arc<Self>,
        id: KeyId,
        fill: Arc<ActiveFill>,
        meta: ObjectMeta,
    ) -> Result<Spool, TierError> {
        let started = self.clone().start_fill_write(&id, &meta).await;
        let (spool, write) = match started {
            Ok(started) => started,
            Err(e) => {
                self.end_fill(&id, &fill);
                metrics::counter!("larder_fills_total", "result" => "failed").increment(1);
                return Err(e);
            }
        };
        let inner = self.clone();
        tokio::spawn(async move {
            let result = write.await;
            inner.end_fill(&id, &fill);
            let label = match &result {
                Ok(_) => {
                    inner.mark_validated(id.clone(), meta.etag.clone());
                    "filled"
                }
                Err(e) if e.kind == ErrorKind::PreconditionFailed => "superseded",
                Err(_) => "failed",
            };
            metrics::counter!("larder_fills_total", "result" => label).increment(1);
            match result {
                Ok(_) => tracing::debug!(ns = %id.0, key = %id.1, etag = %meta.etag, "filled"),
                Err(e) => {
                    tracing::warn!(ns = %id.0, key = %id.1, etag = %meta.etag, error = %e, "fill not committed")
                }
            }
        });
        Ok(spool)
    }

    fn end_fill(&self, id: &KeyId, fill: &Arc<ActiveFill>) {
        let mut fills = self.fills.lock().unwrap();
        if fills.get(id).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            fills.remove(id);
        }
    }

    async fn start_fill_write(
        self: Arc<Self>,
        id: &KeyId,
        meta: &ObjectMeta,
    ) -> Result<
        (
            Spool,
            impl Future<Output = Result<PutResult, TierError>> + Send + 'static + use<>,
        ),
        TierError,
    > {
        let (ns, key) = id;
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        let local_current = match self.local.get(ns, key, head).await {
            Ok(r) => Some(r.meta.etag),
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let ttl = meta
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if ttl.is_zero() || local_current.as_ref() == Some(&meta.etag) {
            return Err(TierError::not_found());
        }
        let pinned = GetOptions {
            conditions: ReadConditions::pinned(&meta.etag, None),
            head: false,
        };
        let r = self.remote.get(ns, key, pinned).await?;
        let Some(body) = r.body.filter(|_| r.outcome == ReadOutcome::Full) else {
            return Err(TierError::precondition_failed(Some(r.meta.etag)));
        };
        // Commit only over what the local tier held when the fill began: a local write that
        // landed meanwhile is newer than this fill and must win.
        let precondition = match &local_current {
            Some(current) => WritePrecondition::replace_if(current),
            None => WritePrecondition::create_only(),
        };
        let upload = body
            .map(|chunk| chunk.map_err(std::io::Error::other))
            .boxed();
        let opts = PutOptions {
            ttl,
            precondition,
            headers: meta.headers.clone(),
            max_size: None,
            expect_etag: Some(meta.etag.clone()),
            last_modified: Some(meta.last_modified),
        };
        self.local.put_spooled(ns, key, upload, opts)
    }
}

/// An upload stream fed from a channel; with `gate`, its end waits for the gate's verdict, so the
/// consuming tier commits only once the gate opens (and discards on `false`).
fn channel_stream(
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    gate: Option<oneshot::Receiver<bool>>,
) -> UploadStream {
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let end = futures_util::stream::once(async move {
        match gate {
            None => None,
            Some(gate) => match gate.await {
                Ok(true) => None,
                _ => Some(Err(std::io::Error::other(
                    "the authoritative tier did not commit",
                ))),
            },
        }
    })
    .filter_map(|item| async move { item });
    body.chain(end).boxed()
}

#[async_trait]
impl Tier for TieredTier {
    fn name(&self) -> &'static str {
        "tiered"
    }

    async fn get(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: GetOptions,
    ) -> Result<GetResponse, TierError> {
        let inner = &self.inner;
        let id = (ns.clone(), key.clone());
        let local_name = inner.local.name();
        if let Some(pinned) = opts.conditions.pinned_etag().map(str::to_owned) {
            if let Some(r) = inner.local_if(ns, key, &opts, &pinned).await {
                hit(local_name);
                return Ok(r);
            }
            return inner.from_remote(ns, key, opts).await;
        }
        if let Some(fresh) = inner.fresh_etag(&id)
            && let Some(r) = inner.local_if(ns, key, &opts, fresh.as_str()).await
        {
            hit(local_name);
            return Ok(r);
        }
        // Revalidate: one small read of the remote tier names the current revision.
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        let current = match inner.remote.get(ns, key, head).await {
            Ok(r) => r.meta.etag,
            Err(e) if e.kind == ErrorKind::NotFound => {
                // Deleted through another replica: drop the local copy too.
                inner.forget(&id);
                let _ = inner.local.delete(ns, key).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if let Some(r) = inner.local_if(ns, key, &opts, current.as_str()).await {
            inner.mark_validated(id, current);
            hit(local_name);
            return Ok(r);
        }
        inner.from_remote(ns, key, opts).await
    }

    async fn put(
        &self,
        ns: &Namespace,
        key: &Key,
        mut body: UploadStream,
        opts: PutOptions,
    ) -> Result<PutResult, TierError> {
        let inner = &self.inner;
        let (remote_tx, remote_rx) = mpsc::channel(4);
        let (local_tx, local_rx) = mpsc::channel(4);
        let (gate_tx, gate_rx) = oneshot::channel();
        let remote_body = channel_stream(remote_rx, None);
        let local_body = channel_stream(local_rx, Some(gate_rx));
        // Both tiers stamp the revision with one date (the disk tier would otherwise take the
        // time the upload started, S3 the time of its commit).
        let opts = PutOptions {
            last_modified: Some(opts.last_modified.unwrap_or_else(SystemTime::now)),
            ..opts
        };
        let local_opts = PutOptions {
            precondition: WritePrecondition::default(),
            ..opts.clone()
        };
        let pump = async move {
            let mut local_tx = Some(local_tx);
            while let Some(item) = body.next().await {
                let (for_remote, for_local) = match item {
                    Ok(chunk) => (Ok(chunk.clone()), Ok(chunk)),
                    Err(e) => (Err(std::io::Error::new(e.kind(), e.to_string())), Err(e)),
                };
                let failed = for_remote.is_err();
                if let Some(tx) = &local_tx
                    && tx.send(for_local).await.is_err()
                {
                    local_tx = None; // the local copy failed; the remote write goes on
                }
                if remote_tx.send(for_remote).await.is_err() || failed {
                    break;
                }
            }
        };
        let remote = async {
            let result = inner.remote.put(ns, key, remote_body, opts).await;
            let _ = gate_tx.send(result.is_ok());
            result
        };
        let local = inner.local.put(ns, key, local_body, local_opts);
        let id = (ns.clone(), key.clone());
        let in_flight = WriteInFlight::start(inner, id.clone());
        let ((), remote_result, local_result) = tokio::join!(pump, remote, local);
        let overlapped = in_flight.end();
        let put = remote_result?;
        // Overlapping writes of one key commit remotely in one order but may reach the local
        // commit in another (acknowledgements travel at their own pace): then only the remote
        // knows which revision won, and a local copy of the loser must not be served.
        let local_result = match local_result {
            Ok(l) if overlapped => match inner.remote_etag(ns, key).await {
                Some(current) if current == l.etag => Ok(l),
                _ => Err(TierError::new(
                    ErrorKind::PreconditionFailed,
                    "a concurrent write of this key won",
                )),
            },
            other => other,
        };
        match local_result {
            Ok(l) if l.etag == put.etag => inner.mark_validated(id, put.etag.clone()),
            other => {
                if let Err(e) = other {
                    tracing::warn!(%ns, %key, error = %e, "local copy not stored; dropping any older one");
                }
                inner.forget(&id);
                let _ = inner.local.delete(ns, key).await;
            }
        }
        Ok(put)
    }

    async fn delete(&self, ns: &Namespace, key: &Key) -> Result<bool, TierError> {
        let existed = self.inner.remote.delete(ns, key).await?;
        self.invalidate(ns, key).await?;
        Ok(existed)
    }

    async fn invalidate(&self, ns: &Namespace, key: &Key) -> Result<bool, TierError> {
        self.inner.forget(&(ns.clone(), key.clone()));
        self.inner.local.delete(ns, key).await
    }

    async fn list_namespaces(&self) -> Result<Vec<NamespaceUsage>, TierError> {
        self.inner.remote.list_namespaces().await
    }

    async fn stats(&self) -> Result<Vec<TierStats>, TierError> {
        let mut stats = self.inner.local.stats().await?;
        stats.extend(self.inner.remote.stats().await?);
        Ok(stats)
    }

    async fn ready(&self) -> Result<(), TierError> {
        self.inner.remote.ready().await
    }
}

//! The tiered cache: a fast local tier (disk) in front of an authoritative remote tier (S3),
//! itself a [`Tier`], so the server and the conformance suite treat it like any other.
//!
//! Reads:
//! - **Pinned** (`If-Match` naming one ETag): the local tier serves it if it holds exactly that
//!   revision and the key was seen to exist in the remote within the revalidation window (else
//!   one small remote read checks that it was not deleted); otherwise the remote tier decides
//!   (its current revision, or `412` with the current ETag). A 412 from the local tier never
//!   reaches the client: local copies may lag.
//! - **Unpinned**: the local copy is served while the remote was seen holding that very revision
//!   less than `revalidate_after` ago. After that one small remote read (the reference) tells
//!   whether the local copy is still current; replicas therefore converge on the newest
//!   revision within the window, and a remote failure outside it is a 503, never stale bytes
//!   presented as current. Reads never go backwards on one replica (see `knowledge`).
//! - Whatever the remote tier serves starts one background fill of the local tier per key and
//!   revision (see `fill`), pinned to the served ETag, verified against the digest, and
//!   committed only when complete and only if no delete or newer revision was seen meanwhile.
//!
//! Writes stream to both tiers at once; the remote tier commits first and decides the
//! preconditions, and the local copy, staged meanwhile, is committed only if the key's record
//! still names that revision afterwards; otherwise the local copy is dropped.

mod fill;
mod knowledge;

use crate::disk::DiskTier;
use crate::error::{ErrorKind, TierError};
use crate::tier::{
    AtHand, CacheTier, GetOptions, GetResponse, NamespaceUsage, ObjectMeta, PutOptions, PutResult,
    Tier, TierStats, UploadStream,
};
use async_trait::async_trait;
use bytes::Bytes;
use fill::{Fill, FillContext, Following};
use futures_util::StreamExt;
use knowledge::{Freshness, KeyId, Keys, Observation};
use larder_proto::{ByteRange, Key, Namespace, WritePrecondition, decide_read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// A local [`CacheTier`] (the disk tier by default) in front of an authoritative remote tier.
pub struct TieredTier<L: CacheTier = DiskTier> {
    inner: Arc<Inner<L>>,
}

struct Inner<L: CacheTier> {
    local: Arc<L>,
    remote: Arc<dyn Tier>,
    /// What is known about each key's current revision, and its fill in flight.
    keys: Arc<Keys<Fill<L>>>,
    fills: Arc<FillContext<L>>,
    /// Set when the remote could not be reached: until then, pinned reads of local copies skip
    /// the check for a delete instead of each waiting for the remote to time out.
    remote_down_until: Mutex<Option<Instant>>,
}

/// How long an unreachable remote is not asked again by pinned reads the local tier can serve.
const REMOTE_DOWN_BACKOFF: Duration = Duration::from_secs(1);

impl<L: CacheTier> TieredTier<L> {
    /// Puts `local` in front of `remote`. An unpinned read serves a local copy without asking the
    /// remote while the remote was seen holding that revision less than `revalidate_after` ago.
    pub fn new(local: Arc<L>, remote: Arc<dyn Tier>, revalidate_after: Duration) -> TieredTier<L> {
        let keys = Arc::new(Keys::new(revalidate_after));
        let fills = Arc::new(FillContext {
            local: local.clone(),
            remote: remote.clone(),
            keys: keys.clone(),
        });
        TieredTier {
            inner: Arc::new(Inner {
                local,
                remote,
                keys,
                fills,
                remote_down_until: Mutex::new(None),
            }),
        }
    }

    /// Whether a fill of this key is running (for tests and metrics).
    pub fn fill_in_flight(&self, ns: &Namespace, key: &Key) -> bool {
        self.inner.keys.fill(&(ns.clone(), key.clone())).is_some()
    }
}

fn hit(tier: &'static str) {
    metrics::counter!("larder_tier_hits_total", "tier" => tier).increment(1);
}

fn miss(tier: &'static str) {
    metrics::counter!("larder_tier_misses_total", "tier" => tier).increment(1);
}

impl<L: CacheTier> Inner<L> {
    /// Asks the remote tier and records what it said about the key's current revision.
    async fn observe(&self, id: &KeyId, opts: GetOptions) -> Result<GetResponse, TierError> {
        let started = Instant::now();
        let result = self.remote.get(&id.0, &id.1, opts).await;
        let etag = match &result {
            Ok(r) => Some(r.meta.etag.clone()),
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(_) => return result,
        };
        self.keys.observe(
            id,
            Observation {
                etag,
                started,
                completed: Instant::now(),
            },
        );
        result
    }

    fn remote_seems_down(&self) -> bool {
        self.remote_down_until
            .lock()
            .unwrap()
            .is_some_and(|until| Instant::now() < until)
    }

    fn remote_is_down(&self) {
        *self.remote_down_until.lock().unwrap() = Some(Instant::now() + REMOTE_DOWN_BACKOFF);
    }

    /// One small remote read naming the current revision; a deleted key loses its local copy.
    async fn revalidate(&self, id: &KeyId) -> Result<GetResponse, TierError> {
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        let result = self.observe(id, head).await;
        if let Err(e) = &result
            && e.kind == ErrorKind::NotFound
        {
            // Deleted through another replica: drop the local copy too.
            let _ = self.local.delete(&id.0, &id.1).await;
        }
        result
    }

    /// The local tier's answer if it holds revision `etag`; local failures only cost a miss.
    async fn local_if(&self, id: &KeyId, opts: &GetOptions, etag: &str) -> Option<GetResponse> {
        let (ns, key) = id;
        match self.local.get(ns, key, opts.clone()).await {
            Ok(r) if r.meta.etag.as_str() == etag => Some(r),
            Ok(_) => None,
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(%ns, %key, error = %e.chain(), "local tier failed; reading the remote tier");
                None
            }
        }
    }

    /// Serves what only the remote tier can: the remote decides, and a body is streamed from the
    /// fill of that revision into the local tier (started here if none runs), so concurrent
    /// misses of one key cost a single remote body read per replica. Objects the local tier
    /// cannot hold, and fills that cannot start, are read from the remote directly.
    ///
    /// `current` is the key's current revision if the caller has just read it from the remote
    /// (an unpinned read revalidates first): the read is then decided against it rather than
    /// by asking the remote again, which on a cold miss is a round trip before the first byte.
    async fn serve_from_remote(
        &self,
        id: &KeyId,
        opts: GetOptions,
        mut current: Option<ObjectMeta>,
    ) -> Result<GetResponse, TierError> {
        miss(self.local.name());
        // A newer revision can land between deciding and filling; the fill of the older one
        // then ends unused, and the newer one deserves a fill of its own rather than a direct
        // read (which would leave this replica cold for it).
        for _ in 0..MAX_SUPERSEDED_FILLS {
            match self.serve_through_fill(id, &opts, current.take()).await? {
                Through::Served(r) => return Ok(r),
                Through::Superseded => continue,
                Through::NoFill => break,
            }
        }
        self.observe(id, opts).await
    }

    async fn serve_through_fill(
        &self,
        id: &KeyId,
        opts: &GetOptions,
        current: Option<ObjectMeta>,
    ) -> Result<Through, TierError> {
        let decided = match current {
            Some(meta) => GetResponse {
                outcome: decide_read(&opts.conditions, Some(&meta.validators())),
                meta,
                body: None,
                source: self.remote.name(),
                file: None,
            },
            None => {
                let head = GetOptions {
                    conditions: opts.conditions.clone(),
                    head: true,
                };
                self.observe(id, head).await?
            }
        };
        let Some(ByteRange { start, len }) = decided
            .outcome
            .body_range(decided.meta.size)
            .filter(|_| !opts.head)
        else {
            return Ok(Through::Served(decided));
        };
        let fits = self
            .local
            .capacity()
            .is_none_or(|limit| decided.meta.size < limit);
        if !fits {
            return Ok(Through::NoFill);
        }
        let etag = decided.meta.etag.clone();
        let fill = Fill::of(&self.fills, id, &decided.meta);
        let spool = match fill.follow().await {
            Some(Following::Whole(bytes)) => {
                let range = bytes.slice(start as usize..(start + len) as usize);
                return Ok(Through::Served(GetResponse {
                    outcome: decided.outcome,
                    meta: decided.meta,
                    body: Some(futures_util::stream::once(async move { Ok(range) }).boxed()),
                    source: self.remote.name(),
                    file: None,
                }));
            }
            Some(Following::Spool(spool)) => Some(spool),
            None => None,
        };
        if let Some(spool) = spool {
            match self.local.read_spool(&spool, start, len).await {
                Ok(body) => {
                    let body = fill::follow_or_fall_back(
                        body,
                        self.remote.clone(),
                        id.clone(),
                        etag,
                        start,
                        len,
                    );
                    return Ok(Through::Served(GetResponse {
                        outcome: decided.outcome,
                        meta: decided.meta,
                        body: Some(body),
                        // The bytes come from the S3 body being copied in.
                        source: self.remote.name(),
                        file: None,
                    }));
                }
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(ns = %id.0, key = %id.1, error = %e.chain(), "cannot follow the fill")
                }
            }
        }
        // The fill finished first (the revision is local now), or could not run.
        if let Some(r) = self.local_if(id, opts, etag.as_str()).await {
            return Ok(Through::Served(r));
        }
        if fill.superseded() || !self.keys.names(id, &etag) {
            Ok(Through::Superseded)
        } else {
            Ok(Through::NoFill)
        }
    }
}

/// How [`Inner::serve_through_fill`] went.
enum Through {
    Served(GetResponse),
    /// The revision decided on stopped being current before its fill could serve it.
    Superseded,
    /// The fill could not run (or the object does not fit): read the remote directly.
    NoFill,
}

/// Fills in a row that may end superseded before one read gives up on the local tier (a key
/// overwritten faster than it can be copied is read directly).
const MAX_SUPERSEDED_FILLS: usize = 3;

/// An upload stream fed from a channel.
fn channel_stream(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> UploadStream {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}

#[async_trait]
impl<L: CacheTier> Tier for TieredTier<L> {
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
        let freshness = inner.keys.freshness(&id);
        if let Some(pinned) = opts.conditions.pinned_etag().map(str::to_owned) {
            // A pinned read may be served an older revision the local tier still holds (a
            // download in flight keeps its revision), but never one of a deleted key.
            if freshness != Freshness::Deleted
                && let Some(r) = inner.local_if(&id, &opts, &pinned).await
            {
                // Only a delete stops it; with the remote unreachable the copy is still exactly
                // the revision asked for.
                if freshness == Freshness::Stale && !inner.remote_seems_down() {
                    match inner.revalidate(&id).await {
                        Err(e) if e.kind == ErrorKind::NotFound => return Err(e),
                        Err(e) if e.kind == ErrorKind::Unavailable => inner.remote_is_down(),
                        _ => {}
                    }
                }
                hit(local_name);
                return Ok(r);
            }
            return inner.serve_from_remote(&id, opts, None).await;
        }
        if let Freshness::Current(fresh) = &freshness
            && let Some(r) = inner.local_if(&id, &opts, fresh.as_str()).await
        {
            hit(local_name);
            return Ok(r);
        }
        let current = inner.revalidate(&id).await?.meta;
        if let Some(r) = inner.local_if(&id, &opts, current.etag.as_str()).await {
            hit(local_name);
            return Ok(r);
        }
        inner.serve_from_remote(&id, opts, Some(current)).await
    }

    /// What [`Tier::get`] answers from the local tier without asking the remote: a key seen
    /// current within the window, held locally at that revision (or, for a pinned read, at the
    /// pinned one). Anything else waits for the async path.
    fn read_at_hand(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: &GetOptions,
    ) -> Option<Result<AtHand, TierError>> {
        let inner = &self.inner;
        let Freshness::Current(fresh) = inner.keys.freshness(&(ns.clone(), key.clone())) else {
            return None;
        };
        let wanted = opts.conditions.pinned_etag().unwrap_or(fresh.as_str());
        match inner.local.read_at_hand(ns, key, opts)? {
            Ok(r) if r.meta.etag.as_str() == wanted => {
                hit(inner.local.name());
                Some(Ok(r))
            }
            // Another revision, none, or a failure: `get` decides (and logs the failure).
            _ => None,
        }
    }

    async fn put(
        &self,
        ns: &Namespace,
        key: &Key,
        mut body: UploadStream,
        opts: PutOptions,
    ) -> Result<PutResult, TierError> {
        let inner = &self.inner;
        let id = (ns.clone(), key.clone());
        let (local_tx, local_rx) = mpsc::channel(4);
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
        let started = Instant::now();
        let (remote_tx, remote_body, remote_demand) = crate::upload_channel();
        let pump = async move {
            // Not a byte is read before the remote tier asks for one: S3 refuses a write whose
            // precondition already fails before its body, and then the client's body stays
            // unread (and, behind `Expect: 100-continue`, unsent).
            if remote_demand.await.is_err() {
                return Instant::now();
            }
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
            // The remote cannot commit before it has the whole body: a lower bound of when the
            // new revision became current.
            Instant::now()
        };
        let remote = inner.remote.put(ns, key, remote_body, opts);
        let local = inner
            .local
            .stage(ns, key, channel_stream(local_rx), local_opts);
        let (body_ended, remote_result, staged) = tokio::join!(pump, remote, local);
        let put = match remote_result {
            Ok(put) => put,
            // Refused before anything was committed: nothing changed remotely.
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::PreconditionFailed
                        | ErrorKind::BodyAborted
                        | ErrorKind::TooLarge
                        | ErrorKind::InvalidInput
                ) =>
            {
                return Err(e);
            }
            Err(e) => {
                // It may or may not have landed: what was known before is no longer to be trusted.
                inner.keys.forget(&id);
                return Err(e);
            }
        };
        inner.keys.observe(
            &id,
            Observation {
                etag: Some(put.etag.clone()),
                started: body_ended.max(started),
                completed: Instant::now(),
            },
        );
        // Overlapping writes of one key commit remotely in one order but may reach this point in
        // another: the record then is unknown (or names the winner), and only the copy of the
        // revision it names may become local.
        let committed = match staged {
            Ok(staged) if L::staged_etag(&staged) == put.etag => {
                let (keys, etag) = (inner.keys.clone(), put.etag.clone());
                let id = id.clone();
                inner
                    .local
                    .commit_staged(staged, Box::new(move || keys.names(&id, &etag)))
                    .await
            }
            Ok(_) => Err(TierError::internal(
                "write-through",
                "the local copy has another ETag than the remote one",
            )),
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            if e.kind != ErrorKind::PreconditionFailed {
                tracing::warn!(%ns, %key, error = %e.chain(), "local copy not stored; dropping any older one");
            }
            let _ = inner.local.delete(ns, key).await;
        }
        Ok(put)
    }

    async fn delete(&self, ns: &Namespace, key: &Key) -> Result<bool, TierError> {
        let inner = &self.inner;
        let id = (ns.clone(), key.clone());
        let started = Instant::now();
        let existed = match inner.remote.delete(ns, key).await {
            Ok(existed) => existed,
            Err(e) => {
                inner.keys.forget(&id);
                return Err(e);
            }
        };
        // Recorded before the local copy goes, so that a fill or write-through finishing now
        // cannot commit it back (see `knowledge`).
        inner.keys.observe(
            &id,
            Observation {
                etag: None,
                started,
                completed: Instant::now(),
            },
        );
        inner.local.delete(ns, key).await?;
        Ok(existed)
    }

    async fn invalidate(&self, ns: &Namespace, key: &Key) -> Result<bool, TierError> {
        self.inner.keys.forget(&(ns.clone(), key.clone()));
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

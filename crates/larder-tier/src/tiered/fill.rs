//! Fills: copying a revision that only the remote tier had into the local tier, while readers of
//! that revision follow the copy instead of each reading the remote themselves.
//!
//! A fill is one object with one owner, its own task, so nothing about it depends on the request
//! that started it staying connected. It moves through explicit phases — opening the remote body,
//! spooling (readers follow the temp file as it grows), ended — and commits its copy only if the
//! key's record still names its revision at the moment of the commit (see
//! [`super::knowledge`]): a delete, a newer write or a newer revision seen by any read is an
//! event recorded there, and the fill that lost to it discards its copy instead of bringing the
//! old revision back.
//!
//! A local disk failure (full, I/O error) costs only the copy: a reader following the spool
//! continues from the remote tier, pinned to the same revision, from the byte it had reached.
//!
//! A small revision (at most [`WHOLE_IN_MEMORY`] bytes, a build tool's typical cache entry) is
//! read whole and checked against its ETag before readers get it, from memory: following a
//! spool file costs a small read more than the bytes (the file's creation and first write on
//! blocking threads before the first byte), about a millisecond on a cold GET.

use super::knowledge::{KeyId, Keys};
use crate::error::{ErrorKind, TierError};
use crate::tier::{BodyStream, CacheTier, GetOptions, ObjectMeta, PutOptions, Tier};
use bytes::Bytes;
use futures_util::StreamExt;
use larder_proto::{ByteRange, ETag, ReadOutcome, WritePrecondition};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;
use tracing::Instrument;

pub(super) struct Fill<L: CacheTier> {
    pub etag: ETag,
    phase: watch::Receiver<Phase<L::Spool>>,
}

/// Revisions up to this size are read whole before readers get them (see the module comment).
const WHOLE_IN_MEMORY: u64 = 64 << 10;

#[derive(Clone)]
enum Phase<S> {
    /// Waiting for the remote body to open and the local temp file to exist.
    Opening,
    /// Readers may follow the spool.
    Spooling(S),
    /// A small revision's bytes, checked against its ETag, while its copy is written.
    Whole(Bytes),
    /// Committed, discarded or failed: readers look at the local tier, then the remote.
    Ended,
    /// Ended without copying anything because the revision stopped being current before its
    /// body could be read: readers ask the remote again which revision to serve.
    Superseded,
}

/// What a fill needs from the tiered cache.
pub(super) struct FillContext<L: CacheTier> {
    pub local: Arc<L>,
    pub remote: Arc<dyn Tier>,
    pub keys: Arc<Keys<Fill<L>>>,
}

impl<L: CacheTier> Fill<L> {
    /// The fill of revision `meta` of this key: the one in flight if it copies that revision,
    /// else a new one (which takes over from a fill of another revision: the caller has just
    /// seen `meta` current, and the older fill will not commit anyway).
    pub fn of(ctx: &Arc<FillContext<L>>, id: &KeyId, meta: &ObjectMeta) -> Arc<Fill<L>> {
        ctx.keys.fill_or_start(
            id,
            |f| f.etag == meta.etag,
            || {
                let (tx, rx) = watch::channel(Phase::Opening);
                let fill = Arc::new(Fill {
                    etag: meta.etag.clone(),
                    phase: rx,
                });
                let span = tracing::info_span!(
                    "fill", ns = %id.0, key = %id.1, etag = %meta.etag
                );
                let owner = Owner {
                    ctx: ctx.clone(),
                    id: id.clone(),
                    fill: fill.clone(),
                    phase: tx,
                };
                tokio::spawn(owner.run(meta.clone()).instrument(span));
                fill
            },
        )
    }

    /// Where a reader gets the revision's bytes while the fill runs: its spool, or its whole
    /// body when it is small. `None` when the fill ended without either (the revision may be
    /// local already, or the fill could not start).
    pub async fn follow(&self) -> Option<Following<L::Spool>> {
        let mut phase = self.phase.clone();
        let phase = phase
            .wait_for(|p| !matches!(p, Phase::Opening))
            .await
            .ok()?;
        match &*phase {
            Phase::Spooling(spool) => Some(Following::Spool(spool.clone())),
            Phase::Whole(bytes) => Some(Following::Whole(bytes.clone())),
            _ => None,
        }
    }

    /// Whether the fill ended because its revision was no longer current when it started.
    pub fn superseded(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Superseded)
    }
}

/// What [`Fill::follow`] gives a reader.
pub(super) enum Following<S> {
    Spool(S),
    Whole(Bytes),
}

/// The task that owns a fill. Dropping it (the fill ended, or its task panicked) ends the fill
/// for readers and for the key's bookkeeping.
struct Owner<L: CacheTier> {
    ctx: Arc<FillContext<L>>,
    id: KeyId,
    fill: Arc<Fill<L>>,
    phase: watch::Sender<Phase<L::Spool>>,
}

impl<L: CacheTier> Drop for Owner<L> {
    fn drop(&mut self) {
        self.phase.send_if_modified(|phase| {
            if matches!(phase, Phase::Superseded) {
                return false;
            }
            *phase = Phase::Ended;
            true
        });
        self.ctx.keys.fill_ended(&self.id, &self.fill);
    }
}

/// How a fill ended, for the `larder_fills_total{result}` counter.
enum Ended {
    /// The local copy is committed.
    Filled,
    /// Nothing to copy: the revision is local already, or expired.
    Unneeded,
    /// The key was deleted, or a newer revision was seen, before the copy could commit.
    Superseded,
    /// The remote or the local tier failed; readers were served from the remote.
    Failed(TierError),
}

impl<L: CacheTier> Owner<L> {
    async fn run(self, meta: ObjectMeta) {
        let ended = self.copy(&meta).await;
        let label = match &ended {
            Ended::Filled => "filled",
            Ended::Unneeded => "unneeded",
            Ended::Superseded => "superseded",
            Ended::Failed(_) => "failed",
        };
        metrics::counter!("larder_fills_total", "result" => label).increment(1);
        match ended {
            Ended::Failed(e) => tracing::warn!(error = %e.chain(), "fill abandoned"),
            _ => tracing::debug!(result = label, "fill ended"),
        }
    }

    fn superseded_before_reading(&self) -> Ended {
        self.phase.send_replace(Phase::Superseded);
        Ended::Superseded
    }

    async fn copy(&self, meta: &ObjectMeta) -> Ended {
        let (ns, key) = &self.id;
        let ctx = &self.ctx;
        let ttl = meta
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if ttl.is_zero() {
            return Ended::Unneeded;
        }
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        if let Ok(r) = ctx.local.get(ns, key, head).await
            && r.meta.etag == meta.etag
        {
            return Ended::Unneeded;
        }
        // The reader that started this fill decided on this revision moments ago, so its bytes
        // are all the fill needs (whether the copy may commit is decided by the key's record at
        // commit time, as for a revision superseded while it is copied); asking for exactly
        // them spares S3 a second reference read before the first byte.
        let body = match ctx.remote.get_revision(ns, key, &meta.etag, None).await {
            Ok(r) if r.outcome == ReadOutcome::Full => r.body,
            Ok(_) => return self.superseded_before_reading(),
            Err(e) if e.kind == ErrorKind::NotFound => return self.superseded_before_reading(),
            Err(e) => return Ended::Failed(e),
        };
        let Some(body) = body else {
            return Ended::Failed(TierError::internal("fill", "the remote sent no body"));
        };
        let whole = meta.size <= WHOLE_IN_MEMORY;
        let upload = if whole {
            let bytes = match read_whole(body, meta).await {
                Ok(bytes) => bytes,
                Err(e) => return Ended::Failed(e),
            };
            self.phase.send_replace(Phase::Whole(bytes.clone()));
            // The reader that started this fill runs on this thread (a current-thread runtime):
            // let it answer before the copy creates its file.
            tokio::task::yield_now().await;
            futures_util::stream::once(async move { Ok(bytes) }).boxed()
        } else {
            body.map(|chunk| chunk.map_err(std::io::Error::other))
                .boxed()
        };
        // No precondition against the local tier: whether this copy may commit is decided by
        // the key's record at commit time, which every delete and newer revision updates.
        let opts = PutOptions {
            ttl,
            precondition: WritePrecondition::default(),
            headers: meta.headers.to_vec(),
            max_size: None,
            expect_etag: Some(meta.etag.clone()),
            last_modified: Some(meta.last_modified),
        };
        let (spool, write) = match ctx.local.spool(ns, key, upload, opts) {
            Ok(started) => started,
            Err(e) => return Ended::Failed(e),
        };
        if !whole {
            self.phase.send_replace(Phase::Spooling(spool));
        }
        let staged = match write.await {
            Ok(staged) => staged,
            Err(e) => return Ended::Failed(e),
        };
        let (keys, id, etag) = (ctx.keys.clone(), self.id.clone(), meta.etag.clone());
        match ctx
            .local
            .commit_staged(staged, Box::new(move || keys.names(&id, &etag)))
            .await
        {
            Ok(_) => Ended::Filled,
            Err(e) if e.kind == ErrorKind::PreconditionFailed => Ended::Superseded,
            Err(e) => Ended::Failed(e),
        }
    }
}

/// The whole body of the small revision `meta`, checked against its size and ETag: readers get
/// it before the copy's own check, so a damaged body must not reach them.
async fn read_whole(mut body: BodyStream, meta: &ObjectMeta) -> Result<Bytes, TierError> {
    let mut chunks = Vec::new();
    let mut len = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        len += chunk.len() as u64;
        if len > meta.size {
            break;
        }
        chunks.push(chunk);
    }
    let bytes = match chunks.len() {
        1 => chunks.pop().expect("one chunk"),
        _ => chunks.concat().into(),
    };
    if len != meta.size || ETag::of(&bytes) != meta.etag {
        return Err(TierError::new(
            ErrorKind::Upstream,
            format!(
                "the remote sent a body that is not revision {} ({len} bytes of {})",
                meta.etag, meta.size
            ),
        ));
    }
    Ok(bytes)
}

/// A body that follows a fill's spool and, if the spool fails (the local disk filled up or
/// failed), continues from the remote tier with a read pinned to the same revision, starting at
/// the first byte not yet delivered.
pub(super) fn follow_or_fall_back(
    spool_body: BodyStream,
    remote: Arc<dyn Tier>,
    id: KeyId,
    etag: ETag,
    start: u64,
    len: u64,
) -> BodyStream {
    struct Follow {
        body: BodyStream,
        delivered: u64,
        fell_back: bool,
        remote: Arc<dyn Tier>,
        id: KeyId,
        etag: ETag,
        start: u64,
        len: u64,
    }
    let state = Follow {
        body: spool_body,
        delivered: 0,
        fell_back: false,
        remote,
        id,
        etag,
        start,
        len,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            match st.body.next().await {
                Some(Ok(chunk)) => {
                    st.delivered += chunk.len() as u64;
                    return Some((Ok(chunk), st));
                }
                None => return None,
                Some(Err(e)) if !st.fell_back && st.delivered < st.len => {
                    st.fell_back = true;
                    metrics::counter!("larder_fill_follower_fallbacks_total").increment(1);
                    tracing::warn!(
                        ns = %st.id.0, key = %st.id.1, error = %e.chain(),
                        "the fill this read follows failed; continuing from the remote tier"
                    );
                    let rest = ByteRange {
                        start: st.start + st.delivered,
                        len: st.len - st.delivered,
                    };
                    match open_pinned_range(st.remote.as_ref(), &st.id, &st.etag, rest).await {
                        Ok(body) => st.body = body,
                        Err(e) => {
                            st.body = futures_util::stream::empty().boxed();
                            return Some((Err(e), st));
                        }
                    }
                }
                Some(Err(e)) => {
                    st.body = futures_util::stream::empty().boxed();
                    return Some((Err(e), st));
                }
            }
        }
    })
    .boxed()
}

async fn open_pinned_range(
    remote: &dyn Tier,
    (ns, key): &KeyId,
    etag: &ETag,
    range: ByteRange,
) -> Result<BodyStream, TierError> {
    let r = remote.get_revision(ns, key, etag, Some(range)).await?;
    let exact = match r.outcome {
        ReadOutcome::Partial(got) => got == range,
        ReadOutcome::Full => range.start == 0 && range.len == r.meta.size,
        _ => false,
    };
    match r.body {
        Some(body) if exact => Ok(body),
        _ => Err(TierError::new(
            ErrorKind::Upstream,
            format!(
                "the revision {etag} being served changed in the remote tier before its fill \
                 could be replaced by a remote read"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{pattern, upload};
    use crate::disk::{DiskConfig, DiskTier};
    use bytes::Bytes;
    use larder_proto::{Key, Namespace};

    /// What a reader following a fill sees when the local disk fails half-way: the bytes it
    /// already had from the spool, then the rest from the remote, pinned to the same revision.
    #[tokio::test]
    async fn a_failed_spool_is_continued_from_the_remote_at_the_next_byte() {
        let dir = tempfile::tempdir().unwrap();
        let remote = DiskTier::open(DiskConfig::new(dir.path())).await.unwrap();
        let id = (Namespace::parse("ci").unwrap(), Key::parse("k").unwrap());
        let data = pattern(3 << 20, 7);
        let etag = remote
            .put(&id.0, &id.1, upload(data.clone()), PutOptions::default())
            .await
            .unwrap()
            .etag;
        let (start, len) = (1000u64, (2 << 20) as u64);
        let first = Bytes::copy_from_slice(&data[1000..1000 + 300_000]);
        let spool: BodyStream = futures_util::stream::iter(vec![
            Ok(first),
            Err(TierError::new(ErrorKind::InsufficientStorage, "disk full")),
        ])
        .boxed();
        let body = follow_or_fall_back(spool, Arc::new(remote), id, etag, start, len);
        let got = crate::body_to_bytes(body).await.unwrap();
        assert!(got == data[1000..1000 + len as usize]);
    }

    /// A small revision reaches its readers whole from memory, a larger one through its spool;
    /// both copies commit.
    #[tokio::test]
    async fn a_small_revision_is_handed_to_readers_whole_and_a_larger_one_spooled() {
        use super::super::knowledge::{Keys, Observation};
        let (local_dir, remote_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let local = Arc::new(
            DiskTier::open(DiskConfig::new(local_dir.path()))
                .await
                .unwrap(),
        );
        let remote = Arc::new(
            DiskTier::open(DiskConfig::new(remote_dir.path()))
                .await
                .unwrap(),
        );
        let keys = Arc::new(Keys::new(std::time::Duration::from_secs(60)));
        let ctx = Arc::new(FillContext {
            local: local.clone(),
            remote: remote.clone(),
            keys: keys.clone(),
        });
        let ns = Namespace::parse("ci").unwrap();
        for (name, size) in [("small", WHOLE_IN_MEMORY), ("larger", WHOLE_IN_MEMORY + 1)] {
            let id = (ns.clone(), Key::parse(name).unwrap());
            let data = pattern(size as usize, size);
            let started = std::time::Instant::now();
            remote
                .put(&ns, &id.1, upload(data.clone()), PutOptions::default())
                .await
                .unwrap();
            let meta = remote.get(&ns, &id.1, head_options()).await.unwrap().meta;
            keys.observe(
                &id,
                Observation {
                    etag: Some(meta.etag.clone()),
                    started,
                    completed: std::time::Instant::now(),
                },
            );
            let fill = Fill::of(&ctx, &id, &meta);
            match (name, fill.follow().await) {
                ("small", Some(Following::Whole(bytes))) => assert!(bytes == data),
                ("larger", Some(Following::Spool(_))) => {}
                (_, Some(Following::Whole(_))) => panic!("{name}: handed over whole"),
                (_, Some(Following::Spool(_))) => panic!("{name}: spooled"),
                (_, None) => panic!("{name}: the fill ended with nothing to follow"),
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let local_etag = local
                    .get(&ns, &id.1, head_options())
                    .await
                    .map(|r| r.meta.etag);
                if local_etag.as_ref().ok() == Some(&meta.etag) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name}: never committed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }

    fn head_options() -> GetOptions {
        GetOptions {
            head: true,
            ..Default::default()
        }
    }

    /// A small body is checked before readers get it: a damaged, short or long one is an
    /// upstream error, and one that arrives in pieces is joined.
    #[tokio::test]
    async fn a_whole_body_must_be_the_revision() {
        let data = pattern(1000, 3);
        let meta = ObjectMeta {
            etag: ETag::of(&data),
            size: 1000,
            last_modified: SystemTime::now(),
            expires: SystemTime::now(),
            headers: Vec::new().into(),
        };
        let body = |pieces: Vec<Vec<u8>>| -> BodyStream {
            futures_util::stream::iter(pieces.into_iter().map(|p| Ok(Bytes::from(p)))).boxed()
        };
        let got = read_whole(body(vec![data[..10].to_vec(), data[10..].to_vec()]), &meta)
            .await
            .unwrap();
        assert!(got == data);
        let mut damaged = data.clone();
        damaged[500] ^= 1;
        let mut long = data.clone();
        long.push(0);
        for (what, bytes) in [
            ("damaged", damaged),
            ("short", data[..999].to_vec()),
            ("long", long),
        ] {
            let err = read_whole(body(vec![bytes]), &meta).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::Upstream, "{what}");
        }
    }
}

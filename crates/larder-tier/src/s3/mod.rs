//! The S3 tier: the authoritative store that every replica shares, on any S3-compatible server.
//!
//! S3 offers no way to change an object's metadata and bytes together under a precondition
//! except by rewriting the whole object, and no way to read a key pinned to a revision except
//! `If-Match` on S3's own ETag. So a key is split in two (see `layout`): its bytes go into an
//! immutable body object with a name used exactly once, and its revision — larder's ETag, size,
//! headers, expiry and the body's name — into a small reference object that is written last with
//! a conditional PUT. Committing a revision is therefore one atomic compare-and-swap of a small
//! object, whatever the body's size, and every body read is pinned by construction: a reader
//! that got a body name from a reference reads that revision's bytes or fails, never another
//! revision's bytes.
//!
//! A small body travels inside its reference instead (`S3Config::inline_body_max`): a write of a
//! small cache entry is then one conditional PUT (see `put` for when the reference is read
//! first), and its first read on a replica one GET, where a body object costs a round trip more
//! each way.
//!
//! Replaced and deleted bodies are not removed at once, because downloads in flight (on this or
//! another replica) may still be reading them; [`S3Tier::reap`] removes them after a grace period.

mod config;
mod error;
mod instrumented;
mod layout;
mod per_thread;
mod read;
mod reap;
mod recent;
mod upload;

pub use config::{MAX_INLINE_BODY, MIN_PART_SIZE, S3Config};
pub use reap::ReapReport;

use crate::error::{ErrorKind, TierError};
use crate::tier::{
    GetOptions, GetResponse, NamespaceUsage, PutOptions, PutResult, Tier, TierStats, UploadStream,
};
use async_trait::async_trait;
use error::{s3_error, timed_out};
use futures_util::{StreamExt, TryStreamExt};
use larder_proto::{ByteRange, ETag, Key, Namespace, WriteOutcome, decide_read, decide_write};
use layout::{BODIES, Layout, PROBE, REFS, RETIRED, RefDoc};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};
use read::{BodyReader, OpenError};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use upload::Uploader;

/// Compare-and-swap attempts on one reference before a write gives up with a 503: each failed
/// attempt means another writer committed in between, so this only trips under heavy
/// contention on a single key.
const MAX_CAS_ATTEMPTS: u32 = 20;

/// Reference objects read at once when listing (namespaces, stats, reaping).
const LIST_READ_CONCURRENCY: usize = 16;

/// What the start-up probe found out about conditional PUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionalPut {
    /// `If-None-Match: *` and `If-Match` on PUT are honoured.
    Supported,
    /// The server silently overwrites despite the preconditions (Garage), or refuses `If-Match`
    /// even with the right ETag: create-only and compare-and-swap cannot be atomic.
    Unsupported,
}

/// The authoritative S3 tier (see the [module documentation](crate::s3)); built with
/// [`S3Tier::connect`]. Cloning is cheap and shares the same client.
#[derive(Clone)]
pub struct S3Tier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Tier")
            .field("bucket", &self.inner.config.bucket)
            .field("prefix", &self.inner.config.prefix)
            .finish()
    }
}

struct Inner {
    config: S3Config,
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    /// RGW compares `If-Match` on PUT against the bare ETag, other servers against the quoted
    /// header form; the probe finds out which (unquoted until then).
    quoted_update_etag: AtomicBool,
    /// Off only after the probe found conditional PUT unusable and the configuration accepted
    /// that: references are then written unconditionally (last writer wins).
    conditional_put: AtomicBool,
    expirations: AtomicU64,
    /// Bumped whenever this process finished (or gave up) changing a reference, so that a
    /// cached usage scan from before is not served again.
    ref_changes: AtomicU64,
    /// The last usage scan; the lock also makes concurrent callers share one scan.
    usage_cache: tokio::sync::Mutex<Option<UsageScan>>,
    /// References read moments ago, for [`Tier::get_revision`].
    recent: recent::RecentRefs,
}

/// Namespace → (objects, bytes) of the live references.
type Usage = BTreeMap<String, (u64, u64)>;

/// How long a usage scan (one S3 request per key) answers namespace listings and stats. Any
/// reader may list namespaces, and without reuse each listing would cost the bucket as many
/// requests as it holds keys; writes through this replica are seen at once (they invalidate
/// the scan), other replicas' writes within this delay.
const USAGE_TTL: Duration = Duration::from_secs(10);

struct UsageScan {
    started: std::time::Instant,
    generation: u64,
    usage: Usage,
}

/// Marks the end of a reference change when dropped, however the change ended (done, failed,
/// or cancelled half-way, when it may still have landed).
struct RefChange<'a>(&'a AtomicU64);

impl Drop for RefChange<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A reference object as read, with S3's ETag of it (the CAS token for replacing it).
struct Current {
    doc: RefDoc,
    s3_etag: String,
}

impl S3Tier {
    /// Builds the client without talking to S3 (a server may start while S3 is down; requests
    /// then fail with 503 until it is back). Prefer [`S3Tier::connect`].
    pub fn new(config: S3Config) -> Result<S3Tier, TierError> {
        let first = Arc::new(config.build_store()?);
        let for_threads = config.clone();
        let store = per_thread::PerThreadStore::new(first, move || {
            let client = for_threads.build_store().ok()?;
            Some(Arc::new(client) as Arc<dyn ObjectStore>)
        });
        Ok(S3Tier::over(config, Arc::new(store)))
    }

    /// The tier over any object store (unit tests give it one that misbehaves on cue).
    fn over(config: S3Config, store: Arc<dyn ObjectStore>) -> S3Tier {
        let store: Arc<dyn ObjectStore> = Arc::new(instrumented::InstrumentedStore::new(store));
        S3Tier {
            inner: Arc::new(Inner {
                layout: Layout::new(&config.prefix),
                config,
                store,
                quoted_update_etag: AtomicBool::new(false),
                conditional_put: AtomicBool::new(true),
                expirations: AtomicU64::new(0),
                ref_changes: AtomicU64::new(0),
                usage_cache: tokio::sync::Mutex::new(None),
                recent: recent::RecentRefs::default(),
            }),
        }
    }

    /// Builds the client and checks that the bucket is reachable and honours conditional PUT;
    /// refuses a server that ignores it unless `require_conditional_put` is off.
    pub async fn connect(config: S3Config) -> Result<S3Tier, TierError> {
        let tier = S3Tier::new(config)?;
        match tier.check_conditional_put().await? {
            ConditionalPut::Supported => tracing::info!(
                bucket = %tier.inner.config.bucket,
                prefix = %tier.inner.config.prefix,
                quoted_if_match = tier.inner.quoted_update_etag.load(Ordering::Relaxed),
                "S3 tier ready; conditional PUT supported"
            ),
            ConditionalPut::Unsupported if tier.inner.config.require_conditional_put => {
                return Err(TierError::new(
                    ErrorKind::Upstream,
                    format!(
                        "the S3 server behind bucket {:?} ignores conditional PUT \
                         (If-None-Match / If-Match): create-only and compare-and-swap writes \
                         would silently overwrite; use a server that supports it (AWS S3, \
                         MinIO, Ceph RGW) or turn off require_conditional_put",
                        tier.inner.config.bucket
                    ),
                ));
            }
            ConditionalPut::Unsupported => {
                tier.inner.conditional_put.store(false, Ordering::Relaxed);
                tracing::warn!(
                    bucket = %tier.inner.config.bucket,
                    "the S3 server does not support conditional PUT: references are written \
                     unconditionally, so concurrent writers to one key may lose updates and \
                     If-None-Match / If-Match writes are checked but not atomic"
                )
            }
        }
        Ok(tier)
    }

    /// The settings the tier was connected with.
    pub fn config(&self) -> &S3Config {
        &self.inner.config
    }

    /// Writes and rewrites a probe object with create-only and If-Match PUTs to see whether the
    /// server enforces them, and which ETag form it wants in `If-Match`.
    pub async fn check_conditional_put(&self) -> Result<ConditionalPut, TierError> {
        let inner = &self.inner;
        let path = inner
            .layout
            .path(&format!("{PROBE}/{:032x}", rand::random::<u128>()))?;
        let put = |body: &'static str, mode: PutMode| {
            let path = path.clone();
            async move {
                inner
                    .small("conditional PUT probe", async {
                        inner
                            .store
                            .put_opts(&path, PutPayload::from_static(body.as_bytes()), mode.into())
                            .await
                    })
                    .await
            }
        };
        let unexpected = |e: object_store::Error| Err(s3_error("conditional PUT probe", e));
        let verdict = async {
            match put("1", PutMode::Create).await? {
                Ok(_) => {}
                Err(e) => return unexpected(e),
            }
            match put("2", PutMode::Create).await? {
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Ok(_) => return Ok(ConditionalPut::Unsupported),
                Err(e) => return unexpected(e),
            }
            let wrong = UpdateVersion {
                e_tag: Some("00000000000000000000000000000000".into()),
                version: None,
            };
            match put("3", PutMode::Update(wrong)).await? {
                Err(object_store::Error::Precondition { .. }) => {}
                Ok(_) => return Ok(ConditionalPut::Unsupported),
                Err(e) => return unexpected(e),
            }
            let head = inner
                .small("conditional PUT probe", inner.store.head(&path))
                .await?;
            let quoted = match head {
                Ok(meta) => meta.e_tag.unwrap_or_default(),
                Err(e) => return unexpected(e),
            };
            for (form, quote) in [(unquote(&quoted).to_string(), false), (quoted, true)] {
                let version = UpdateVersion {
                    e_tag: Some(form),
                    version: None,
                };
                match put("4", PutMode::Update(version)).await? {
                    Ok(_) => {
                        inner.quoted_update_etag.store(quote, Ordering::Relaxed);
                        return Ok(ConditionalPut::Supported);
                    }
                    Err(object_store::Error::Precondition { .. }) => continue,
                    Err(e) => return unexpected(e),
                }
            }
            // It refuses even the right ETag: If-Match on PUT cannot be used.
            Ok(ConditionalPut::Unsupported)
        }
        .await;
        let _ = inner
            .small("probe clean-up", inner.store.delete(&path))
            .await;
        verdict
    }
}

/// A reference write that failed without an answer may still have landed (S3 took it and the
/// answer was lost, or it lands later), and the look afterwards could not tell: the client must
/// hear that the write is in doubt, not that it failed — a retry with `If-None-Match: *` would
/// otherwise meet its own write as a 412.
fn outcome_unknown(failure: TierError) -> TierError {
    if failure.kind != ErrorKind::Unavailable {
        return failure;
    }
    failure.reworded(|why| {
        format!(
            "the write may or may not have been stored: S3 did not confirm it and could not be \
             asked afterwards; read the key to find out ({why})"
        )
    })
}

fn unquote(etag: &str) -> &str {
    etag.strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or(etag)
}

/// When S3 says an object was last written.
fn modified(m: &object_store::ObjectMeta) -> SystemTime {
    let ms = m.last_modified.timestamp_millis();
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl Inner {
    /// Runs one small S3 operation under the metadata deadline; the inner result is left to
    /// the caller, who knows which S3 errors are answers (404 on a reference) and which are
    /// failures.
    async fn small<T>(
        &self,
        what: &str,
        fut: impl Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>, TierError> {
        tokio::time::timeout(self.config.metadata_timeout, fut)
            .await
            .map_err(|_| timed_out(what))
    }

    async fn read_ref(&self, path: &Path) -> Result<Option<Current>, TierError> {
        let fetched = self
            .small("reference read", async {
                let r = self.store.get(path).await?;
                let e_tag = r.meta.e_tag.clone();
                Ok((e_tag, r.bytes().await?))
            })
            .await?;
        match fetched {
            Ok((Some(s3_etag), bytes)) => Ok(Some(Current {
                doc: RefDoc::parse(&bytes)?,
                s3_etag,
            })),
            Ok((None, _)) => Err(TierError::new(
                ErrorKind::Upstream,
                "S3 answered a reference read without an ETag",
            )),
            Err(e) if error::is_missing_bucket(&e) => Err(s3_error("reference read", e)),
            // The one place where an S3 404 is an answer: there is no such key.
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("reference read", e)),
        }
    }

    /// Decides `opts` against the revision `doc` describes and, for a body outcome, opens the
    /// first part of its body (or serves it from the reference, when it is inline).
    async fn serve(&self, doc: &RefDoc, opts: &GetOptions) -> Result<GetResponse, OpenError> {
        if doc.expired_at(SystemTime::now()) {
            return Err(OpenError::Failed(TierError::not_found()));
        }
        let meta = doc.meta();
        let outcome = decide_read(&opts.conditions, Some(&meta.validators()));
        let Some(ByteRange { start, len }) = outcome.body_range(meta.size).filter(|_| !opts.head)
        else {
            return Ok(GetResponse {
                outcome,
                meta,
                body: None,
                source: "s3",
                file: None,
            });
        };
        if len == 0 {
            return Ok(GetResponse {
                outcome,
                meta,
                body: Some(futures_util::stream::empty().boxed()),
                source: "s3",
                file: None,
            });
        }
        if let Some(inline) = &doc.inline {
            let bytes = inline.slice(start as usize..(start + len) as usize);
            return Ok(GetResponse {
                outcome,
                meta,
                body: Some(futures_util::stream::once(async move { Ok(bytes) }).boxed()),
                source: "s3",
                file: None,
            });
        }
        let reader = BodyReader {
            store: self.store.clone(),
            path: self.layout.path(&doc.body).map_err(OpenError::Failed)?,
            if_match: doc.body_etag.clone(),
            part_size: self.config.read_part_size,
            concurrency: self.config.read_concurrency,
        };
        let body = reader.open(start, len).await?;
        // Counted so operators (and the fill benchmark) can see how often bodies come from the
        // bucket rather than from a disk tier.
        metrics::counter!("larder_s3_body_reads_total").increment(1);
        Ok(GetResponse {
            outcome,
            meta,
            body: Some(body),
            source: "s3",
            file: None,
        })
    }

    async fn delete_object(&self, path: &Path, what: &str) -> Result<(), TierError> {
        match self.small(what, self.store.delete(path)).await? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error(what, e)),
        }
    }

    /// Deletes an (expired) reference unless it changed since it was read. S3 has no
    /// conditional DELETE everywhere, so this re-reads first; a writer that replaces it in the
    /// few milliseconds between loses its write (a cache miss later, never wrong bytes).
    async fn delete_ref_if_unchanged(&self, path: &Path, s3_etag: &str) -> Result<bool, TierError> {
        let _change = RefChange(&self.ref_changes);
        match self.read_ref(path).await? {
            Some(current) if current.s3_etag == s3_etag => {
                self.delete_object(path, "reference delete").await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Records when a body stopped being current, so the reaper gives downloads in flight a
    /// full grace period from now rather than from the body's upload time.
    async fn retire(&self, body: &str) {
        let Some(marker) = Layout::retired_name(body) else {
            return;
        };
        let Ok(path) = self.layout.path(&marker) else {
            return;
        };
        match self
            .small("retire body", self.store.put(&path, PutPayload::new()))
            .await
        {
            Ok(Ok(_)) => {}
            // Not fatal: the reaper then dates the body by its upload time, which only
            // shortens the grace of downloads that started before the replacement.
            Ok(Err(e)) => tracing::warn!(error = %e, body, "could not write retirement marker"),
            Err(e) => tracing::warn!(error = %e, body, "could not write retirement marker"),
        }
    }

    /// Deletes a body nobody references (its write lost a precondition race).
    async fn discard_body(&self, body: &Path) {
        if let Err(e) = self.delete_object(body, "body delete").await {
            tracing::warn!(error = %e, body = %body, "left an unreferenced body for the reaper");
        }
    }

    fn update_version(&self, s3_etag: &str) -> UpdateVersion {
        let e_tag = if self.quoted_update_etag.load(Ordering::Relaxed) {
            s3_etag.to_string()
        } else {
            unquote(s3_etag).to_string()
        };
        UpdateVersion {
            e_tag: Some(e_tag),
            version: None,
        }
    }

    async fn list(&self, dir: &str) -> Result<Vec<object_store::ObjectMeta>, TierError> {
        let prefix = self.layout.path(dir)?;
        self.store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| s3_error("list", e))
    }

    /// Every reference object under the prefix with its content (`None` if it vanished between
    /// listing and reading).
    async fn scan_refs(&self) -> Result<Vec<(Path, Option<Current>)>, TierError> {
        let listed = self.list(REFS).await?;
        futures_util::stream::iter(listed)
            .map(|m| async move {
                let current = self.read_ref(&m.location).await?;
                Ok::<_, TierError>((m.location, current))
            })
            .buffer_unordered(LIST_READ_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Namespace → (objects, bytes) of the live references, from a scan at most [`USAGE_TTL`]
    /// old and newer than this process's last reference change.
    async fn usage(&self) -> Result<Usage, TierError> {
        let mut cache = self.usage_cache.lock().await;
        // Read before scanning: a change finishing during the scan outdates its result.
        let generation = self.ref_changes.load(Ordering::SeqCst);
        if let Some(scan) = cache.as_ref()
            && scan.generation == generation
            && scan.started.elapsed() < USAGE_TTL
        {
            return Ok(scan.usage.clone());
        }
        let started = std::time::Instant::now();
        let usage = self.scan_usage().await?;
        *cache = Some(UsageScan {
            started,
            generation,
            usage: usage.clone(),
        });
        Ok(usage)
    }

    async fn scan_usage(&self) -> Result<Usage, TierError> {
        let now = SystemTime::now();
        let mut usage = Usage::new();
        for (path, current) in self.scan_refs().await? {
            let Some(current) = current.filter(|c| !c.doc.expired_at(now)) else {
                continue;
            };
            let Some(ns) = self
                .layout
                .relative(&path)
                .and_then(Layout::namespace_of_ref)
            else {
                continue;
            };
            let entry = usage.entry(ns.to_string()).or_default();
            entry.0 += 1;
            entry.1 += current.doc.size;
        }
        Ok(usage)
    }

    /// Commits `doc` as the key's revision if `opts.precondition` holds against the current one
    /// at the moment of the conditional PUT. Returns whether the key had no live revision.
    /// `body_path` is the body object uploaded for it (`None` for an inline body), deleted when
    /// the revision is refused.
    ///
    /// `believed` is what the caller takes the current reference to be (`Some(None)`: no
    /// reference), read earlier or assumed; the first attempt is made against it instead of a
    /// fresh read, which saves a round trip when it is right. When it is wrong the conditional
    /// PUT fails and the next attempt reads, so it never decides anything.
    async fn commit_ref(
        &self,
        ref_path: &Path,
        body_path: Option<&Path>,
        mut make_doc: impl FnMut(SystemTime) -> RefDoc,
        opts: &PutOptions,
        mut believed: Option<Option<Current>>,
    ) -> Result<bool, TierError> {
        let _change = RefChange(&self.ref_changes);
        // The outcome of a PUT whose answer was lost: if the reference now names our body, it
        // landed, and this is what it replaced.
        let mut landed: Option<(bool, Option<String>)> = None;
        let mut backoff = Duration::from_millis(5);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let read_now = believed.is_none();
            let current = match believed.take() {
                Some(current) => current,
                None => self.read_ref(ref_path).await?,
            };
            let now = SystemTime::now();
            let doc = make_doc(now);
            if let (Some(c), Some((created, replaced))) = (&current, &landed)
                && c.doc.body == doc.body
            {
                if let Some(old) = replaced {
                    self.retire(old).await;
                }
                return Ok(*created);
            }
            let live = current
                .as_ref()
                .filter(|c| !c.doc.expired_at(now))
                .map(|c| c.doc.meta().validators());
            if decide_write(&opts.precondition, live.as_ref()) == WriteOutcome::PreconditionFailed {
                if let Some(body) = body_path {
                    self.discard_body(body).await;
                }
                return Err(TierError::precondition_failed(live.map(|v| v.etag)));
            }
            let created = live.is_none();
            // An expired reference still exists in S3, so replacing it is an Update too.
            let mode = match &current {
                _ if !self.conditional_put.load(Ordering::Relaxed) => PutMode::Overwrite,
                Some(c) => PutMode::Update(self.update_version(&c.s3_etag)),
                None => PutMode::Create,
            };
            // Only a body object needs retiring; an inline body goes with its reference.
            let replaced = current.and_then(|c| c.doc.body_object().map(str::to_owned));
            let payload = PutPayload::from(doc.to_bytes());
            let put = self
                .small("reference write", async {
                    self.store.put_opts(ref_path, payload, mode.into()).await
                })
                .await;
            match put {
                Ok(Ok(_)) => {
                    self.recent.wrote(ref_path);
                    if let Some(old) = replaced {
                        self.retire(&old).await;
                    }
                    return Ok(created);
                }
                Ok(Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                )) if !read_now => {
                    // The belief was out of date: nobody to back off from. (Our own PUT may
                    // still have landed with its answer lost, as below.)
                    landed = Some((created, replaced));
                }
                Ok(Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                )) => {
                    // Another writer committed between our read and our PUT — or our own PUT
                    // landed and only its answer was lost (then the retry sees a conflict).
                    metrics::counter!("larder_s3_cas_conflicts_total").increment(1);
                    landed = Some((created, replaced));
                    let jitter = Duration::from_micros(rand::random::<u64>() % 5_000);
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                other => {
                    // The PUT may or may not have landed: look once before reporting failure.
                    let failure = match other {
                        Ok(Err(e)) => s3_error("reference write", e),
                        Err(e) => e,
                        Ok(Ok(_)) => unreachable!("handled above"),
                    };
                    if let Ok(Some(c)) = self.read_ref(ref_path).await
                        && c.doc.body == doc.body
                    {
                        if let Some(old) = replaced {
                            self.retire(&old).await;
                        }
                        return Ok(created);
                    }
                    // The body stays: if the PUT is still in flight it may yet be referenced.
                    return Err(outcome_unknown(failure));
                }
            }
        }
        if let Some(body) = body_path {
            self.discard_body(body).await;
        }
        Err(TierError::new(
            ErrorKind::Unavailable,
            "too many concurrent writers to this key; try again",
        ))
    }
}

#[async_trait]
impl Tier for S3Tier {
    fn name(&self) -> &'static str {
        "s3"
    }

    async fn get(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: GetOptions,
    ) -> Result<GetResponse, TierError> {
        let inner = &self.inner;
        let ref_path = inner
            .layout
            .path(&Layout::ref_name(ns.as_str(), key.as_str()))?;
        let mut current = inner.read_ref(&ref_path).await?;
        for attempt in 0..2 {
            let Some(c) = current.take() else {
                return Err(TierError::not_found());
            };
            inner.recent.remember(&ref_path, &c.doc);
            match inner.serve(&c.doc, &opts).await {
                Ok(r) => return Ok(r),
                // The reference moved on and the reaper took the old body between our two
                // reads: decide again against the revision that is current now.
                Err(OpenError::Missing(_)) if attempt == 0 => {
                    current = inner.read_ref(&ref_path).await?;
                }
                Err(OpenError::Missing(e) | OpenError::Failed(e)) => return Err(e),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn get_revision(
        &self,
        ns: &Namespace,
        key: &Key,
        etag: &ETag,
        range: Option<ByteRange>,
    ) -> Result<GetResponse, TierError> {
        let inner = &self.inner;
        let ref_path = inner
            .layout
            .path(&Layout::ref_name(ns.as_str(), key.as_str()))?;
        let opts = GetOptions::pinned(etag, range);
        if let Some(doc) = inner.recent.revision(&ref_path, etag) {
            match inner.serve(&doc, &opts).await {
                Ok(r) => return Ok(r),
                // Reaped since: the reference says whether another body holds the revision.
                Err(OpenError::Missing(_)) => {}
                Err(OpenError::Failed(e)) => return Err(e),
            }
        }
        self.get(ns, key, opts).await
    }

    async fn put(
        &self,
        ns: &Namespace,
        key: &Key,
        body: UploadStream,
        opts: PutOptions,
    ) -> Result<PutResult, TierError> {
        let inner = &self.inner;
        let ref_path = inner
            .layout
            .path(&Layout::ref_name(ns.as_str(), key.as_str()))?;
        // A conditional write that already fails needs no upload (CI clients save caches with
        // If-None-Match: * over and over). The decisive check is the conditional PUT below.
        let pre = &opts.precondition;
        let believed = if pre.if_match.is_some() || pre.if_none_match.is_some() {
            let current = inner.read_ref(&ref_path).await?;
            let now = SystemTime::now();
            let live = current
                .as_ref()
                .filter(|c| !c.doc.expired_at(now))
                .map(|c| c.doc.meta().validators());
            if decide_write(pre, live.as_ref()) == WriteOutcome::PreconditionFailed {
                return Err(TierError::precondition_failed(live.map(|v| v.etag)));
            }
            Some(current)
        } else if inner.conditional_put.load(Ordering::Relaxed) && !inner.recent.knows(&ref_path) {
            // Most keys a build tool writes are new (their names are digests): try a
            // create-only PUT straight away. If the key exists after all, that PUT fails and
            // costs one round trip more than reading first would have.
            Some(None)
        } else {
            None
        };
        let body_name = Layout::new_body_name(ns.as_str());
        let body_path = inner.layout.path(&body_name)?;
        let uploaded = Uploader {
            store: &inner.store,
            path: &body_path,
            part_size: inner.config.part_size,
            concurrency: inner.config.upload_concurrency,
            max_size: opts.max_size,
            metadata_timeout: inner.config.metadata_timeout,
            inline_max: inner.config.inline_body_max,
        }
        .run(body)
        .await?;
        let make_doc = |now| {
            let mut doc = RefDoc::new(
                &uploaded.etag,
                uploaded.size,
                now,
                opts.ttl,
                opts.headers.clone(),
                body_name.clone(),
                uploaded.s3_etag.clone(),
            );
            if let Some(t) = opts.last_modified {
                doc.last_modified_ms = layout::unix_ms(t);
            }
            match &uploaded.inline {
                Some(bytes) => doc.with_inline_body(bytes.clone()),
                None => doc,
            }
        };
        let uploaded_body = uploaded.inline.is_none().then_some(&body_path);
        let created = inner
            .commit_ref(&ref_path, uploaded_body, make_doc, &opts, believed)
            .await?;
        Ok(PutResult {
            etag: uploaded.etag,
            size: uploaded.size,
            created,
        })
    }

    async fn delete(&self, ns: &Namespace, key: &Key) -> Result<bool, TierError> {
        let inner = &self.inner;
        let ref_path = inner
            .layout
            .path(&Layout::ref_name(ns.as_str(), key.as_str()))?;
        let Some(current) = inner.read_ref(&ref_path).await? else {
            return Ok(false);
        };
        let _change = RefChange(&inner.ref_changes);
        inner.delete_object(&ref_path, "reference delete").await?;
        // The body stays for the reaper: another replica may be streaming it right now.
        if let Some(body) = current.doc.body_object() {
            inner.retire(body).await;
        }
        Ok(!current.doc.expired_at(SystemTime::now()))
    }

    /// Lists and reads every reference object: one request per key, so the result is reused
    /// for a few seconds (see `USAGE_TTL`).
    async fn list_namespaces(&self) -> Result<Vec<NamespaceUsage>, TierError> {
        Ok(self
            .inner
            .usage()
            .await?
            .into_iter()
            .map(|(name, (objects, bytes))| NamespaceUsage {
                name,
                objects,
                bytes,
            })
            .collect())
    }

    /// Shares the (reused) usage scan of [`Tier::list_namespaces`].
    async fn stats(&self) -> Result<Vec<TierStats>, TierError> {
        let usage = self.inner.usage().await?;
        Ok(vec![TierStats {
            tier: "s3".into(),
            objects: usage.values().map(|u| u.0).sum(),
            bytes: usage.values().map(|u| u.1).sum(),
            limit: None,
            evictions: 0,
            expirations: self.inner.expirations.load(Ordering::Relaxed),
        }])
    }

    /// One listing of an empty prefix: proves the endpoint, the credentials and the bucket.
    async fn ready(&self) -> Result<(), TierError> {
        let inner = &self.inner;
        let path = inner.layout.path(&format!("{PROBE}/ready"))?;
        match inner
            .small(
                "readiness check",
                inner.store.list_with_delimiter(Some(&path)),
            )
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                let err = s3_error("readiness check", e);
                let message = err.message.clone();
                Err(TierError::new(ErrorKind::Unavailable, message).with_source(err))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquote_strips_one_pair_of_quotes() {
        assert_eq!(unquote("\"abc\""), "abc");
        assert_eq!(unquote("abc"), "abc");
        assert_eq!(unquote("\"abc"), "\"abc");
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_unavailable_quickly() {
        // Port 9 (discard) on loopback: nothing listens, so the connection is refused.
        let mut config = S3Config::new("bucket");
        config.endpoint = Some("http://127.0.0.1:9".into());
        config.allow_http = true;
        config.access_key_id = Some("id".into());
        config.secret_access_key = Some("secret".into());
        let started = std::time::Instant::now();
        let err = S3Tier::connect(config.clone()).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
        let tier = S3Tier::new(config).unwrap();
        let ns = Namespace::parse("ci").unwrap();
        let key = Key::parse("k").unwrap();
        let err = tier
            .get(&ns, &key, GetOptions::default())
            .await
            .unwrap_err();
        assert_eq!(
            err.kind,
            ErrorKind::Unavailable,
            "an S3 failure is never a 404"
        );
        assert_eq!(tier.ready().await.unwrap_err().kind, ErrorKind::Unavailable);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn config_rejects_bad_settings() {
        let mut c = S3Config::new("b");
        c.part_size = 1 << 20;
        assert_eq!(c.validate().unwrap_err().kind, ErrorKind::InvalidInput);
        let mut c = S3Config::new("b");
        c.prefix = "/x".into();
        assert!(c.validate().is_err());
        let mut c = S3Config::new("b");
        c.inline_body_max = MAX_INLINE_BODY + 1;
        assert!(c.validate().is_err());
        c.inline_body_max = MAX_INLINE_BODY;
        assert!(c.validate().is_ok());
        let mut c = S3Config::new("b");
        c.secret_access_key = Some("hunter2".into());
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "secrets are not logged"
        );
    }

    /// An in-memory object store that counts reference reads and, once armed, takes a
    /// reference write and then stops answering anything about references: S3 overloaded right
    /// after it committed, so the write landed but nobody hears so.
    #[derive(Debug, Default)]
    struct ScriptedStore {
        inner: object_store::memory::InMemory,
        armed: AtomicBool,
        quiet: AtomicBool,
        ref_reads: AtomicU64,
        ref_writes: AtomicU64,
    }

    impl ScriptedStore {
        fn is_ref(path: &Path) -> bool {
            path.as_ref().starts_with(&format!("{REFS}/"))
        }
    }

    impl std::fmt::Display for ScriptedStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("ScriptedStore")
        }
    }

    #[async_trait]
    impl ObjectStore for ScriptedStore {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            if Self::is_ref(location) {
                self.ref_writes.fetch_add(1, Ordering::SeqCst);
            }
            let r = self.inner.put_opts(location, payload, opts).await;
            if Self::is_ref(location) && self.armed.load(Ordering::SeqCst) {
                self.quiet.store(true, Ordering::SeqCst);
            }
            if Self::is_ref(location) && self.quiet.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            r
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            if Self::is_ref(location) {
                self.ref_reads.fetch_add(1, Ordering::SeqCst);
                if self.quiet.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
            }
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures_util::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    fn body(bytes: &'static [u8]) -> crate::UploadStream {
        futures_util::stream::iter([Ok(bytes::Bytes::from_static(bytes))]).boxed()
    }

    /// The fleet benchmark found both: a PUT answered "S3 is unreachable" that had in fact been
    /// stored, and the timed-out S3 requests behind it missing from every metric.
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_s3_took_but_never_confirmed_is_reported_as_in_doubt_and_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _recording = metrics::set_default_local_recorder(&recorder);
        let store = Arc::new(ScriptedStore::default());
        let mut config = S3Config::new("bucket");
        config.metadata_timeout = Duration::from_millis(300);
        let tier = S3Tier::over(config, store.clone());
        // As `connect` does: learns the ETag form this store wants in If-Match.
        tier.check_conditional_put().await.unwrap();
        let (ns, key) = (Namespace::parse("ci").unwrap(), Key::parse("k").unwrap());
        tier.put(&ns, &key, body(b"first"), PutOptions::default())
            .await
            .unwrap();

        store.armed.store(true, Ordering::SeqCst);
        let err = tier
            .put(&ns, &key, body(b"second"), PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
        assert!(
            err.message.contains("may or may not have been stored"),
            "the answer must not claim the write failed: {}",
            err.message
        );

        // It had landed: once S3 answers again, the key holds the second body.
        store.armed.store(false, Ordering::SeqCst);
        store.quiet.store(false, Ordering::SeqCst);
        let got = tier.get(&ns, &key, GetOptions::default()).await.unwrap();
        let bytes = crate::body_to_bytes(got.body.unwrap()).await.unwrap();
        assert_eq!(bytes, b"second");

        let text = metrics.render();
        for op in ["put", "get"] {
            let line = format!("larder_s3_errors_total{{op=\"{op}\"}} 1");
            assert!(
                text.lines().any(|l| l == line),
                "the timed-out reference {op} is counted as an S3 error:\n{text}"
            );
        }
    }

    /// A miss decides on a revision (one reference read), then its fill asks for exactly that
    /// revision's bytes: they come without a second reference read, and they stay that
    /// revision's bytes after the key has moved on.
    #[tokio::test(flavor = "current_thread")]
    async fn a_revision_read_moments_ago_opens_without_reading_its_reference_again() {
        // With its body in an object of its own, and inside its reference.
        for inline_body_max in [0, 64 << 10] {
            revision_read_moments_ago(inline_body_max).await;
        }
    }

    async fn revision_read_moments_ago(inline_body_max: usize) {
        let store = Arc::new(ScriptedStore::default());
        let mut config = S3Config::new("bucket");
        config.inline_body_max = inline_body_max;
        let tier = S3Tier::over(config, store.clone());
        tier.check_conditional_put().await.unwrap();
        let (ns, key) = (Namespace::parse("ci").unwrap(), Key::parse("k").unwrap());
        tier.put(&ns, &key, body(b"first"), PutOptions::default())
            .await
            .unwrap();
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        let first = tier.get(&ns, &key, head).await.unwrap().meta.etag;
        let reads = store.ref_reads.load(Ordering::SeqCst);
        let got = tier.get_revision(&ns, &key, &first, None).await.unwrap();
        assert_eq!(got.outcome, larder_proto::ReadOutcome::Full);
        assert_eq!(
            crate::body_to_bytes(got.body.unwrap()).await.unwrap(),
            b"first"
        );
        assert_eq!(
            store.ref_reads.load(Ordering::SeqCst),
            reads,
            "the reference was read again"
        );

        // Replaced since (the old body awaits the reaper): still the first revision's bytes.
        let second = tier
            .put(&ns, &key, body(b"second"), PutOptions::default())
            .await
            .unwrap()
            .etag;
        let range = ByteRange { start: 1, len: 3 };
        let got = tier
            .get_revision(&ns, &key, &first, Some(range))
            .await
            .unwrap();
        assert_eq!(got.outcome, larder_proto::ReadOutcome::Partial(range));
        assert_eq!(
            crate::body_to_bytes(got.body.unwrap()).await.unwrap(),
            b"irs"
        );

        // A revision not read lately is asked of the reference, as a pinned get is.
        let reads = store.ref_reads.load(Ordering::SeqCst);
        let got = tier.get_revision(&ns, &key, &second, None).await.unwrap();
        assert_eq!(
            crate::body_to_bytes(got.body.unwrap()).await.unwrap(),
            b"second"
        );
        assert_eq!(store.ref_reads.load(Ordering::SeqCst), reads + 1);
        let unknown = ETag::parse(&"ab".repeat(32)).unwrap();
        let got = tier.get_revision(&ns, &key, &unknown, None).await.unwrap();
        assert_eq!(got.outcome, larder_proto::ReadOutcome::PreconditionFailed);
        assert!(got.body.is_none());
    }

    /// With inline bodies off (`inline_body_max = 0`, for a fleet still running replicas that
    /// know only format version 1), every body gets an object of its own, the empty one too,
    /// and every reference is a bare JSON line.
    #[tokio::test(flavor = "current_thread")]
    async fn with_inline_bodies_off_every_body_has_an_object_of_its_own() {
        let store = Arc::new(ScriptedStore::default());
        let mut config = S3Config::new("bucket");
        config.inline_body_max = 0;
        let tier = S3Tier::over(config, store.clone());
        tier.check_conditional_put().await.unwrap();
        let ns = Namespace::parse("ci").unwrap();
        for (key, bytes) in [("empty", &b""[..]), ("one", &b"x"[..])] {
            let key = Key::parse(key).unwrap();
            let bytes: &'static [u8] = bytes;
            tier.put(&ns, &key, body(bytes), PutOptions::default())
                .await
                .unwrap();
            let reference = store
                .inner
                .get(
                    &tier
                        .inner
                        .layout
                        .path(&Layout::ref_name(ns.as_str(), key.as_str()))
                        .unwrap(),
                )
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert!(!reference.contains(&b'\n'), "{key}: a bare JSON line");
            let doc = RefDoc::parse(&reference).unwrap();
            assert_eq!(doc.v, 1, "{key}");
            let object = doc.body_object().expect("a body object");
            let stored = store
                .inner
                .get(&tier.inner.layout.path(object).unwrap())
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(&stored[..], bytes, "{key}");
        }
    }

    /// A write reads the key's reference only when it must: never for a new key, once for a key
    /// this replica saw lately or for a conditional write (the check before the upload is the
    /// first attempt's belief), and once more, after a refused create-only PUT, for a key that
    /// exists without this replica knowing. Each way the outcome is what reading first gives:
    /// the right `created`, and a replaced body object retired.
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_reads_the_reference_only_when_it_must() {
        use larder_proto::WritePrecondition;
        let store = Arc::new(ScriptedStore::default());
        let mut config = S3Config::new("bucket");
        config.inline_body_max = 4;
        let tier = S3Tier::over(config.clone(), store.clone());
        let other = S3Tier::over(config, store.clone());
        tier.check_conditional_put().await.unwrap();
        other.check_conditional_put().await.unwrap();
        let ns = Namespace::parse("ci").unwrap();
        // (reference reads, reference PUTs) so far
        let reads = || {
            (
                store.ref_reads.load(Ordering::SeqCst),
                store.ref_writes.load(Ordering::SeqCst),
            )
        };
        let since = |before: (u64, u64)| {
            let now = reads();
            (now.0 - before.0, now.1 - before.1)
        };
        let put = |tier: &S3Tier, key: &str, bytes: &'static [u8], pre: WritePrecondition| {
            let (ns, key, tier) = (ns.clone(), Key::parse(key).unwrap(), tier.clone());
            async move {
                let opts = PutOptions {
                    precondition: pre,
                    ..Default::default()
                };
                tier.put(&ns, &key, body(bytes), opts).await
            }
        };
        let none = WritePrecondition::default;

        let before = reads();
        assert!(put(&tier, "new", b"v1", none()).await.unwrap().created);
        assert_eq!(since(before), (0, 1), "a new key: one create-only PUT");

        let before = reads();
        assert!(!put(&tier, "new", b"v2", none()).await.unwrap().created);
        assert_eq!(
            since(before),
            (1, 1),
            "a key written here lately: read, then swap"
        );

        // Replaced through a replica that never saw the key: its create-only PUT is refused,
        // then it reads and swaps, and retires the body object it replaced.
        let before = reads();
        let r = put(&other, "new", b"v3", none()).await.unwrap();
        assert!(!r.created);
        assert_eq!(since(before), (1, 2), "refused create, read, swap");
        let retired = || async {
            let markers = store.inner.list(Some(&Path::from(RETIRED)));
            markers.try_collect::<Vec<_>>().await.unwrap().len()
        };
        assert_eq!(
            retired().await,
            0,
            "v1 and v2 were inline: nothing to retire"
        );
        put(&tier, "big", b"a body object", none()).await.unwrap();
        put(&other, "big", b"another one", none()).await.unwrap();
        assert_eq!(retired().await, 1, "the replaced body object is retired");
        let got = tier
            .get(&ns, &Key::parse("big").unwrap(), GetOptions::default())
            .await
            .unwrap();
        assert_eq!(
            crate::body_to_bytes(got.body.unwrap()).await.unwrap(),
            b"another one"
        );

        let before = reads();
        let create = WritePrecondition::create_only();
        assert!(
            put(&tier, "fresh", b"x", create.clone())
                .await
                .unwrap()
                .created
        );
        assert_eq!(
            since(before),
            (1, 1),
            "create-only: the check before the upload, only"
        );
        let err = put(&other, "fresh", b"y", create).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::PreconditionFailed);

        let current = ETag::of(b"v3");
        let before = reads();
        let swap = WritePrecondition {
            if_match: Some(larder_proto::TagList::parse(&current.to_string())),
            ..Default::default()
        };
        assert!(!put(&other, "new", b"v4", swap).await.unwrap().created);
        assert_eq!(since(before), (1, 1), "compare-and-swap: one read");
    }
}

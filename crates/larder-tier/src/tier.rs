//! The `Tier` trait and the option and result types its methods use.

use crate::error::TierError;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use larder_proto::{
    ByteRange, ETag, Key, Namespace, ReadConditions, ReadOutcome, Validators, WritePrecondition,
};
use serde::Serialize;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The bytes of one revision (or a range of it). A stream that ends early always ends with an
/// `Err`, never with a clean short end, so a server can abort the connection.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, TierError>> + Send>>;

/// A request body being uploaded. An `Err` item means the client went away or the body was
/// malformed: the tier stores nothing.
pub type UploadStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// An upload stream fed through the returned sender (a few chunks buffered), and its demand:
/// resolved when the tier first polls the stream, failed when the tier drops it unpolled — a
/// write refused before its body (S3 checks a failing precondition first). Whoever feeds the
/// stream waits for the demand before reading the bytes from their source, so a refused body is
/// never read (nor, behind `Expect: 100-continue`, sent by the client).
pub fn upload_channel() -> (
    tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    UploadStream,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (demand_tx, demand) = tokio::sync::oneshot::channel();
    let stream =
        futures_util::stream::unfold((rx, Some(demand_tx)), |(mut rx, demand)| async move {
            if let Some(demand) = demand {
                let _ = demand.send(());
            }
            rx.recv().await.map(|item| (item, (rx, None)))
        });
    (tx, Box::pin(stream), demand)
}

/// The metadata of one revision. It travels with the bytes as a unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Strong ETag: the BLAKE3 digest of the revision's bytes, identical on every tier.
    pub etag: ETag,
    /// Length of the whole body in bytes (not of the range being served).
    pub size: u64,
    /// Commit time, whole seconds.
    pub last_modified: SystemTime,
    /// When the revision expires (write time plus its TTL); from then on the key reads as not
    /// found.
    pub expires: SystemTime,
    /// Stored response headers (already filtered by the allow-list), lower-case names. Shared:
    /// every read of a hot revision hands them out.
    pub headers: Arc<[(String, String)]>,
}

impl ObjectMeta {
    /// The validators [`larder_proto::decide_read`] and [`larder_proto::decide_write`] decide on.
    pub fn validators(&self) -> Validators {
        Validators {
            etag: self.etag.clone(),
            size: self.size,
            last_modified: self.last_modified,
        }
    }
}

/// Options of [`Tier::get`]; the default is an unconditional GET of the whole body.
#[derive(Clone, Debug, Default)]
pub struct GetOptions {
    /// The conditional and range headers the read is decided against.
    pub conditions: ReadConditions,
    /// HEAD: decide exactly as for GET, but open no body.
    pub head: bool,
}

impl GetOptions {
    /// A GET of revision `etag`'s bytes (all of them, or `range`), and only of that revision.
    pub fn pinned(etag: &ETag, range: Option<ByteRange>) -> GetOptions {
        GetOptions {
            conditions: ReadConditions::pinned(etag, range),
            head: false,
        }
    }
}

/// A decided read. `outcome` is never `NotFound` (that is `Err(ErrorKind::NotFound)`); `body`
/// is present exactly when the outcome is `Full` or `Partial` and the request is not a HEAD.
pub struct GetResponse {
    /// How the read was decided; never [`ReadOutcome::NotFound`].
    pub outcome: ReadOutcome,
    /// Metadata of the revision the outcome was decided against (for a 412, the current one).
    pub meta: ObjectMeta,
    /// The bytes of `outcome.body_range(meta.size)`, from that same revision; `None` for a HEAD or
    /// an outcome without a body.
    pub body: Option<BodyStream>,
    /// The tier the answer came from (`"disk"`, `"s3"`): for logs and per-tier byte counts.
    pub source: &'static str,
    /// The same bytes as `body`, as a region of an open file, when the tier keeps them in one
    /// (the disk tier): a server may hand them to the kernel (`sendfile`) instead of reading
    /// them. Whoever uses it drops `body` unread.
    pub file: Option<FileRegion>,
}

/// A read answered at once ([`Tier::read_at_hand`]): a [`GetResponse`] whose body, if any, is
/// in hand (in memory, or a region of an open file) rather than behind a stream.
#[derive(Debug)]
pub struct AtHand {
    /// How the read was decided; never [`ReadOutcome::NotFound`].
    pub outcome: ReadOutcome,
    /// Metadata of the revision the outcome was decided against.
    pub meta: ObjectMeta,
    /// Where the bytes of `outcome.body_range(meta.size)` are.
    pub body: AtHandBody,
    /// The tier the answer came from, as in [`GetResponse::source`].
    pub source: &'static str,
}

/// Where the bytes of a read answered at hand are.
#[derive(Debug)]
pub enum AtHandBody {
    /// A HEAD, or an outcome without a body.
    None,
    /// In memory (a small object).
    Bytes(Bytes),
    /// In an open revision file, for a server to hand to the kernel (`sendfile`); a caller
    /// that wants them as a stream asks [`Tier::get`].
    File(FileRegion),
}

/// A body stream of bytes in memory: one chunk, or none when they are empty.
pub(crate) fn bytes_stream(bytes: Bytes) -> BodyStream {
    if bytes.is_empty() {
        return futures_util::stream::empty().boxed();
    }
    futures_util::stream::once(std::future::ready(Ok(bytes))).boxed()
}

/// Bytes of an open, never-modified revision file.
#[derive(Clone, Debug)]
pub struct FileRegion {
    /// The revision's file, kept open (an unlinked revision stays readable through it).
    pub file: Arc<std::fs::File>,
    /// Where the bytes start in the file (past the revision's header).
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
}

impl std::fmt::Debug for GetResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetResponse")
            .field("outcome", &self.outcome)
            .field("meta", &self.meta)
            .field("body", &self.body.is_some())
            .field("source", &self.source)
            .field("file", &self.file.is_some())
            .finish()
    }
}

/// Options of [`Tier::put`]. The default is an unconditional write with a 7-day TTL, no stored
/// headers and no size limit.
#[derive(Clone, Debug)]
pub struct PutOptions {
    /// Time to live, already clamped to the configured maximum.
    pub ttl: Duration,
    /// `If-Match` / `If-None-Match` of the write, checked at commit time; a failure stores nothing.
    pub precondition: WritePrecondition,
    /// Headers to store with the revision (already filtered by the allow-list).
    pub headers: Vec<(String, String)>,
    /// Bodies longer than this fail with `TooLarge` and store nothing.
    pub max_size: Option<u64>,
    /// When set, the revision is committed only if the body's digest is this ETag: a fill from
    /// another tier must copy exactly the revision it was asked for.
    pub expect_etag: Option<ETag>,
    /// The revision's Last-Modified date; `None` means now. A revision keeps one date on every
    /// tier (a write-through stamps both tiers alike, a fill copies the source's date), so that
    /// date-based preconditions answer the same wherever the revision is read.
    pub last_modified: Option<SystemTime>,
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions {
            ttl: Duration::from_secs(7 * 24 * 3600),
            precondition: WritePrecondition::default(),
            headers: Vec::new(),
            max_size: None,
            expect_etag: None,
            last_modified: None,
        }
    }
}

/// The revision a successful [`Tier::put`] committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResult {
    /// Strong ETag of the new revision: the BLAKE3 digest of the bytes received.
    pub etag: ETag,
    /// Length of the stored body in bytes.
    pub size: u64,
    /// True when the key had no current revision before this write.
    pub created: bool,
}

/// One namespace and what its current revisions occupy, as [`Tier::list_namespaces`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamespaceUsage {
    /// The namespace.
    pub name: String,
    /// Number of keys with a current revision.
    pub objects: u64,
    /// Sum of the body sizes of those revisions, in bytes.
    pub bytes: u64,
}

/// Occupancy and counters of one tier, as [`Tier::stats`] reports them (serialised for the stats
/// endpoint).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TierStats {
    /// The tier's name (`"disk"`, `"s3"`).
    pub tier: String,
    /// Number of revisions held.
    pub objects: u64,
    /// Bytes those revisions occupy.
    pub bytes: u64,
    /// The configured size limit in bytes, if the tier has one (omitted from JSON when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Revisions evicted to stay under `limit` since the process started.
    pub evictions: u64,
    /// Expired revisions removed since the process started.
    pub expirations: u64,
}

/// A store of object revisions under `(namespace, key)`: the disk tier, the S3 tier and the
/// tiered cache all implement it, and the server only talks to a `dyn Tier`. Every read is
/// decided against the revision actually opened, and every write commits whole or not at all.
#[async_trait]
pub trait Tier: Send + Sync + 'static {
    /// A short name for logs, metrics and stats ("disk", "s3", "tiered").
    fn name(&self) -> &'static str;

    /// Opens the current revision, decides the request against it, and (for a body outcome)
    /// returns with the first byte source already open.
    async fn get(
        &self,
        ns: &Namespace,
        key: &Key,
        opts: GetOptions,
    ) -> Result<GetResponse, TierError>;

    /// Answers a read at once, without waiting on anything, when this tier has all it needs at
    /// hand: the revision's metadata and, for an outcome with a body, its bytes in memory or in
    /// an open file. `None` when it has not, and the caller uses [`Tier::get`], which answers
    /// exactly as this would have. A server answers most reads of a local tier this way: a `get`
    /// costs an allocated future and a body stream, each more than the lookup of a small object.
    /// By default, never.
    fn read_at_hand(
        &self,
        _ns: &Namespace,
        _key: &Key,
        _opts: &GetOptions,
    ) -> Option<Result<AtHand, TierError>> {
        None
    }

    /// Opens the bytes of revision `etag` (all of them, or `range`) for a caller that decided
    /// its read against that revision moments ago and now wants only its bytes: a fill copying
    /// the revision, a read continuing from this tier after its fill failed. Unlike a pinned
    /// [`Tier::get`], a tier may serve them without checking that the revision is still the
    /// key's current one (the S3 tier then skips a reference read); a `PreconditionFailed`
    /// outcome or `NotFound` means they are gone. By default, the pinned get.
    async fn get_revision(
        &self,
        ns: &Namespace,
        key: &Key,
        etag: &ETag,
        range: Option<ByteRange>,
    ) -> Result<GetResponse, TierError> {
        self.get(ns, key, GetOptions::pinned(etag, range)).await
    }

    /// Streams `body` into a new revision and commits it only when complete and only if the
    /// precondition holds at commit time.
    async fn put(
        &self,
        ns: &Namespace,
        key: &Key,
        body: UploadStream,
        opts: PutOptions,
    ) -> Result<PutResult, TierError>;

    /// Removes the key; `Ok(false)` when there was nothing to remove.
    async fn delete(&self, ns: &Namespace, key: &Key) -> Result<bool, TierError>;

    /// The namespaces the tier holds objects in, each with its object count and total bytes.
    async fn list_namespaces(&self) -> Result<Vec<NamespaceUsage>, TierError>;

    /// One [`TierStats`] per underlying tier (a tiered cache reports its local tier, then its
    /// remote).
    async fn stats(&self) -> Result<Vec<TierStats>, TierError>;

    /// Drops copies held locally (a cache tier's copy), leaving the authoritative tier alone.
    /// Tiers that are their own authority hold nothing to drop.
    async fn invalidate(&self, _ns: &Namespace, _key: &Key) -> Result<bool, TierError> {
        Ok(false)
    }

    /// Whether the tier can serve requests right now.
    async fn ready(&self) -> Result<(), TierError> {
        Ok(())
    }
}

/// A revision written to a [`CacheTier`] while readers follow it: the future that finishes the
/// write (without committing) and what readers follow meanwhile.
pub type SpoolWrite<S> = futures_util::future::BoxFuture<'static, Result<S, TierError>>;

/// The capability a tier needs to be the local tier of a tiered cache ([`crate::TieredTier`]),
/// beyond storing revisions: to *spool* a revision (write it while readers follow it as it
/// grows, so that concurrent misses cost one read of the remote tier) and to *stage* one (write
/// and verify it now, decide later whether it becomes the key's revision). As pingora's cache
/// storage hands out a miss handle to write and finish, this hands out a spool and a staged
/// revision; the tiered cache decides when, and whether, they are committed.
#[async_trait]
pub trait CacheTier: Tier {
    /// A revision being written that readers may follow.
    type Spool: Clone + Send + Sync + 'static;
    /// A revision written and verified but not committed; dropping it discards it.
    type Staged: Send + 'static;

    /// The largest object the tier can hold (its size limit); larger ones are never copied in.
    fn capacity(&self) -> Option<u64>;

    /// Starts storing a revision (as [`Tier::put`] would) that readers can follow while it is
    /// written. Nothing happens until the returned future is polled; it ends with the revision
    /// staged, not committed.
    fn spool(
        &self,
        ns: &Namespace,
        key: &Key,
        body: UploadStream,
        opts: PutOptions,
    ) -> Result<(Self::Spool, SpoolWrite<Self::Staged>), TierError>;

    /// Streams `len` body bytes at `start` of a spooled revision, each chunk as soon as it is
    /// written. `NotFound` when the spool is gone (committed or discarded): read the committed
    /// revision instead. A writer that fails before the range is complete ends the stream with
    /// an error, never a clean short end.
    async fn read_spool(
        &self,
        spool: &Self::Spool,
        start: u64,
        len: u64,
    ) -> Result<BodyStream, TierError>;

    /// Writes and verifies a revision without committing it.
    async fn stage(
        &self,
        ns: &Namespace,
        key: &Key,
        body: UploadStream,
        opts: PutOptions,
    ) -> Result<Self::Staged, TierError>;

    /// The ETag of a staged revision.
    fn staged_etag(staged: &Self::Staged) -> ETag;

    /// Commits a staged revision (checking its precondition as [`Tier::put`] does) if
    /// `still_wanted` says yes at the moment of the commit, asked under the same lock as every
    /// other change of the tier, so a caller whose own records say no (the key was deleted or
    /// superseded meanwhile) can never lose that race. `false` discards it with
    /// `PreconditionFailed`.
    async fn commit_staged(
        &self,
        staged: Self::Staged,
        still_wanted: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<PutResult, TierError>;
}

/// Collects a body stream into memory (tests and small bodies only).
pub async fn body_to_bytes(mut body: BodyStream) -> Result<Vec<u8>, TierError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

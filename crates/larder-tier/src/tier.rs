//! The `Tier` trait and the option and result types its methods use.

use crate::error::TierError;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use larder_proto::{
    ETag, Key, Namespace, ReadConditions, ReadOutcome, Validators, WritePrecondition,
};
use serde::Serialize;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

/// The bytes of one revision (or a range of it). A stream that ends early always ends with an
/// `Err`, never with a clean short end, so a server can abort the connection.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, TierError>> + Send>>;

/// A request body being uploaded. An `Err` item means the client went away or the body was
/// malformed: the tier stores nothing.
pub type UploadStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// The metadata of one revision. It travels with the bytes as a unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub etag: ETag,
    pub size: u64,
    /// Commit time, whole seconds.
    pub last_modified: SystemTime,
    pub expires: SystemTime,
    /// Stored response headers (already filtered by the allow-list), lower-case names.
    pub headers: Vec<(String, String)>,
}

impl ObjectMeta {
    pub fn validators(&self) -> Validators {
        Validators {
            etag: self.etag.clone(),
            size: self.size,
            last_modified: self.last_modified,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct GetOptions {
    pub conditions: ReadConditions,
    /// HEAD: decide exactly as for GET, but open no body.
    pub head: bool,
}

/// A decided read. `outcome` is never `NotFound` (that is `Err(ErrorKind::NotFound)`); `body`
/// is present exactly when the outcome is `Full` or `Partial` and the request is not a HEAD.
pub struct GetResponse {
    pub outcome: ReadOutcome,
    pub meta: ObjectMeta,
    pub body: Option<BodyStream>,
    /// The tier the answer came from (`"disk"`, `"s3"`): for logs and per-tier byte counts.
    pub source: &'static str,
}

impl std::fmt::Debug for GetResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetResponse")
            .field("outcome", &self.outcome)
            .field("meta", &self.meta)
            .field("body", &self.body.is_some())
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct PutOptions {
    /// Time to live, already clamped to the configured maximum.
    pub ttl: Duration,
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResult {
    pub etag: ETag,
    pub size: u64,
    /// True when the key had no current revision before this write.
    pub created: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamespaceUsage {
    pub name: String,
    pub objects: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TierStats {
    pub tier: String,
    pub objects: u64,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    pub evictions: u64,
    pub expirations: u64,
}

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

    async fn list_namespaces(&self) -> Result<Vec<NamespaceUsage>, TierError>;

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

/// Collects a body stream into memory (tests and small bodies only).
pub async fn body_to_bytes(mut body: BodyStream) -> Result<Vec<u8>, TierError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#![warn(missing_docs)]

//! The storage tiers of larder and the one abstraction they share.
//!
//! A [`Tier`] stores revisions of objects under `(namespace, key)`. Every method takes an
//! options struct (in the spirit of the `object_store` crate) so that new options break nobody,
//! and every read is decided by `larder_proto::decide_read` against the revision the tier
//! actually opened — the revision's metadata and bytes come from the same open handle, so a
//! reader can never see the metadata of one revision with the bytes of another.
//!
//! Tiers compose by wrapping: the tiered cache (disk over S3) is itself a `Tier`. The
//! `conformance` module (behind the `conformance` feature) holds the scenarios every tier must
//! pass; each tier's tests run all of them through its `conformance_suite!` macro.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod disk;
mod error;
pub mod s3;
mod tier;
pub mod tiered;

pub use disk::{DiskConfig, DiskTier, Spool, StagedRevision};
pub use error::{ErrorKind, Fault, TierError};
pub use s3::{ConditionalPut, ReapReport, S3Config, S3Tier};
pub use tier::{
    AtHand, AtHandBody, BodyStream, CacheTier, FileRegion, GetOptions, GetResponse, NamespaceUsage,
    ObjectMeta, PutOptions, PutResult, SpoolWrite, Tier, TierStats, UploadStream, body_to_bytes,
    upload_channel,
};
pub use tiered::TieredTier;

#![warn(missing_docs)]

//! Git snapshots for larder (docs/ARCHITECTURE.md, "Crates"): CI jobs restore a repository from a
//! tar + zstd snapshot laid out exactly as `git clone` leaves it, instead of cloning it.
//!
//! This crate holds the pieces that do not depend on HTTP or on a tier, so that the server (which
//! generates snapshots) and the client (which restores them) share one definition of each:
//!
//! - [`upstream`]: which URLs are acceptable upstreams, their one normalised spelling, their
//!   route and storage-key names, and the `--git-allow` list;
//! - [`command`]: the system `git` in a child process group with a timeout, and the scrubbing
//!   that keeps upstream credentials out of errors and logs;
//! - [`mirror`]: a bare mirror per upstream (branches and tags only), fetched, checked, and
//!   rebuilt from scratch when it is corrupt;
//! - [`snapshot`]: a clone-identical checkout of one commit, streamed as tar + zstd;
//! - [`head`]: the per-repository head record and the rule that it only moves forward;
//! - [`bundles`]: full and incremental git bundles and the bundle list for `git clone
//!   --bundle-uri`.

pub mod bundles;
pub mod command;
pub mod head;
pub mod mirror;
pub mod pieces;
pub mod snapshot;
pub mod upstream;

pub use bundles::{Bundle, BundleChain, BundleError, RetiredBundle};
pub use command::{Git, GitError};
pub use head::{Decision, HeadRecord, Lineage};
pub use mirror::{Fetched, Mirror, MirrorError, MirrorOptions};
pub use snapshot::{ArchiveStats, Checkout, SnapshotError, SnapshotOptions, SnapshotStream};
pub use upstream::{AllowList, Refusal, Scheme, Upstream, UpstreamError};

use serde::{Deserialize, Serialize};

/// A commit's object id: 40 (SHA-1) or 64 (SHA-256) lower-case hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitId(String);

impl CommitId {
    /// Accepts exactly 40 or 64 lower-case hex digits; `None` for anything else (upper case, an
    /// abbreviated id, a ref name).
    pub fn parse(s: &str) -> Option<CommitId> {
        let hex = s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (hex && (s.len() == 40 || s.len() == 64)).then(|| CommitId(s.to_string()))
    }

    /// The full hex id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CommitId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CommitId {
    type Error = String;

    fn try_from(s: String) -> Result<CommitId, String> {
        CommitId::parse(&s).ok_or_else(|| format!("not a commit id: {s:?}"))
    }
}

impl From<CommitId> for String {
    fn from(c: CommitId) -> String {
        c.0
    }
}

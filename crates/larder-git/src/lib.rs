//! Git snapshots for larder (DESIGN.md "Git snapshots"): CI jobs restore a repository from a
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
//! - [`head`]: the per-repository head record and the rule that it only moves forward.

pub mod command;
pub mod upstream;

pub use command::{Git, GitError};
pub use upstream::{AllowList, Refusal, Scheme, Upstream, UpstreamError};

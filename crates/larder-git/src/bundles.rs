//! Bundles for stock git: a chain of git bundles (one full, then increments holding only what is
//! new) and a bundle list in git's own format, so that `git clone --bundle-uri=<list>` takes most
//! objects from larder and only the rest from the upstream, and a later `git fetch` (git ≥ 2.42,
//! which remembers `fetch.bundleURI`) downloads only the increments it has not seen.
//!
//! The list is `[bundle] version = 1, mode = all, heuristic = creationToken` with one
//! `[bundle "<id>"]` per bundle carrying an absolute `uri` (git 2.39 ignores relative ones) and a
//! `creationToken` that only grows, also across a new full bundle, since clients remember the
//! largest token they applied and skip everything at or below it.
//!
//! Ref names inside bundles matter more than they seem. git copies only `refs/heads/*` out of a
//! bundle (into `refs/bundles/*`), so tips must be stored under `refs/heads/`; and before git 2.46
//! a bundle unpacked after another one under the same ref name does not take part in negotiation
//! with the upstream, which then sends those objects again. Every bundle therefore stores its
//! tips under its own names, `refs/heads/larder/<id>/<branch>`. Tags are not bundled: git would
//! not copy their refs, and the few tag objects come from the upstream.
//!
//! Bundles are made with `git bundle create` in a throw-away repository that borrows the
//! mirror's objects (alternates) and holds only the `larder/<id>/…` refs, so the mirror's refs
//! are never touched. An increment's prerequisites are every tip the chain carries already
//! (those the mirror still holds: a rebuilt mirror may have lost unreachable old commits, and an
//! increment without them is only bigger, never wrong).
//!
//! Trade-off left for later: a new full bundle restarts the chain, so a client that fetches
//! across it downloads the full bundle once (its token is higher than what the client saw).

use crate::CommitId;
use crate::command::{Git, GitError};
use crate::mirror::{Mirror, MirrorError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Why a bundle could not be made or a bundle list could not be rendered.
#[derive(Debug, Error)]
pub enum BundleError {
    /// The mirror could not be opened, fetched or queried.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// `git bundle create` (or another git command) failed.
    #[error("{0}")]
    Git(#[from] GitError),
    /// A bundle URI without a scheme: git 2.39 ignores relative URIs in a bundle list.
    #[error("bundle URI {0:?} is not absolute (git 2.39 ignores relative bundle URIs)")]
    RelativeUri(String),
    /// A bundle URI with whitespace, a control character or one of `"\;#`, which the list's
    /// config syntax cannot carry.
    #[error("bundle URI {0:?} cannot be written into a bundle list")]
    UnsafeUri(String),
    /// A file or directory of the bundle store could not be created or written.
    #[error("{what} {path}")]
    Io {
        /// What was being done (`"cannot create"`, …); the message is `"{what} {path}"`.
        what: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// One bundle of a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// `full-<token>` or `inc-<token>`: the list's section name and the ref namespace inside.
    pub id: String,
    /// The bundle's `creationToken` in the list: increases along the chain, so git applies bundles
    /// in order and fetches only those newer than it already has.
    pub creation_token: u64,
    /// True for a full bundle (no prerequisites), false for an increment on top of earlier bundles.
    pub full: bool,
    /// Branch tips it carries (branch name → commit).
    pub tips: BTreeMap<String, CommitId>,
    /// Commits a receiver must have already.
    pub prerequisites: Vec<CommitId>,
    /// Size of the bundle file.
    pub size: u64,
}

impl Bundle {
    /// File name of the bundle, e.g. `inc-7.bundle`.
    pub fn file_name(&self) -> String {
        format!("{}.bundle", self.id)
    }
}

/// A full bundle and the increments made on top of it, oldest first; stored as JSON beside the
/// bundles so that any replica can extend it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleChain {
    /// The current chain: the full bundle first, then its increments in creation order; empty
    /// before the first bundle.
    pub bundles: Vec<Bundle>,
    /// The last token handed out (kept across a new full bundle).
    pub last_token: u64,
    /// Bundles a new full bundle replaced: no longer listed, but a client that read the list
    /// just before may still be downloading them, so their owner deletes them only after a
    /// grace period. (Absent in chains written before it existed.)
    #[serde(default)]
    pub retired: Vec<RetiredBundle>,
}

/// A bundle that left the chain, and when (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredBundle {
    /// The bundle's id (as in [`Bundle::id`]); its file is `<id>.bundle`.
    pub id: String,
    /// Unix seconds when it left the chain; the grace period before deleting it counts from here.
    pub since: u64,
}

/// A new full bundle is made once the chain holds this many increments: a clone applies every
/// bundle of the list one after the other (each one a download and an index-pack), so a long
/// chain costs clients more than the one larger full bundle that replaces it.
pub const MAX_INCREMENTS: usize = 8;

/// …or once the increments together are larger than this fraction (1/N) of the full bundle:
/// increments repeat objects that later commits replaced (old versions of often-changed files)
/// which a fresh full bundle, holding only what is reachable now, leaves out.
pub const INCREMENTS_FRACTION_OF_FULL: u64 = 2;

/// Deadline of one `git bundle create`.
pub const DEFAULT_BUNDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl BundleChain {
    /// Whether the next bundle should be a full one that restarts the chain (see
    /// [`MAX_INCREMENTS`] and [`INCREMENTS_FRACTION_OF_FULL`]); an empty chain always starts
    /// with one.
    pub fn wants_full(&self) -> bool {
        let Some(full) = self.bundles.first() else {
            return true;
        };
        let increments = &self.bundles[1..];
        let increments_size: u64 = increments.iter().map(|b| b.size).sum();
        increments.len() >= MAX_INCREMENTS
            || increments_size > full.size / INCREMENTS_FRACTION_OF_FULL
    }

    /// Every tip the chain carries.
    fn covered(&self) -> BTreeSet<CommitId> {
        self.bundles
            .iter()
            .flat_map(|b| b.tips.values().cloned())
            .collect()
    }

    /// Makes the next bundle from the mirror's branches into `dir` and adds it to the chain: a
    /// full bundle when `full` is asked or the chain is empty (the chain then restarts with it,
    /// and the bundles it replaces are recorded in `retired`), else an increment with the branch tips the chain does not carry yet. `None` when there
    /// is nothing new.
    pub async fn extend(
        &mut self,
        mirror: &Mirror,
        dir: &Path,
        full: bool,
        timeout: Duration,
    ) -> Result<Option<(Bundle, PathBuf)>, BundleError> {
        let full = full || self.bundles.is_empty();
        let git = mirror.git();
        let branches = mirror_branches(git, mirror).await?;
        let covered = if full {
            BTreeSet::new()
        } else {
            self.covered()
        };
        let tips: BTreeMap<String, CommitId> = branches
            .into_iter()
            .filter(|(_, c)| !covered.contains(c))
            .collect();
        if tips.is_empty() {
            return Ok(None);
        }
        let prerequisites = existing(git, mirror, &covered).await?;
        let token = self.last_token + 1;
        let id = format!("{}-{token}", if full { "full" } else { "inc" });
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| BundleError::Io { what, path, source }
        };
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(io("cannot create", dir))?;
        let scratch = tempfile::Builder::new()
            .prefix(".bundle-")
            .tempdir_in(dir)
            .map_err(io("cannot create a directory in", dir))?;
        let view = scratch.path().join("view.git");
        let template = scratch.path().join("template");
        tokio::fs::create_dir(&template)
            .await
            .map_err(io("cannot create", &template))?;
        git.cmd(["init", "--quiet", "--bare"])
            .arg(format!("--template={}", template.display()))
            .arg(&view)
            .output()
            .await?;
        let mirror_objects = std::path::absolute(mirror.dir())
            .map_err(io("cannot resolve", mirror.dir()))?
            .join("objects");
        let alternates = view.join("objects/info/alternates");
        tokio::fs::create_dir_all(view.join("objects/info"))
            .await
            .map_err(io("cannot create", &view))?;
        tokio::fs::write(&alternates, format!("{}\n", mirror_objects.display()))
            .await
            .map_err(io("cannot write", &alternates))?;
        let mut refs = String::new();
        let mut revs = String::new();
        for (branch, commit) in &tips {
            let name = format!("refs/heads/larder/{id}/{branch}");
            refs.push_str(&format!("create {name} {commit}\n"));
            revs.push_str(&format!("{name}\n"));
        }
        for p in &prerequisites {
            revs.push_str(&format!("^{p}\n"));
        }
        git.cmd(["update-ref", "--stdin"])
            .current_dir(&view)
            .stdin(refs.into_bytes())
            .output()
            .await?;
        let staged = scratch.path().join("bundle");
        git.cmd(["bundle", "create", "--quiet"])
            .arg(&staged)
            .arg("--stdin")
            .current_dir(&view)
            .stdin(revs.into_bytes())
            .timeout(timeout)
            .output()
            .await?;
        let path = dir.join(format!("{id}.bundle"));
        tokio::fs::rename(&staged, &path)
            .await
            .map_err(io("cannot move the bundle to", &path))?;
        let size = tokio::fs::metadata(&path)
            .await
            .map_err(io("cannot stat", &path))?
            .len();
        let bundle = Bundle {
            id,
            creation_token: token,
            full,
            tips,
            prerequisites: prerequisites.into_iter().collect(),
            size,
        };
        if full {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.retired.extend(
                self.bundles
                    .drain(..)
                    .map(|b| RetiredBundle { id: b.id, since }),
            );
        }
        self.bundles.push(bundle.clone());
        self.last_token = token;
        Ok(Some((bundle, path)))
    }

    /// The bundle list in git's format, with `uri(bundle)` as each bundle's absolute URI.
    pub fn render_list(&self, uri: impl Fn(&Bundle) -> String) -> Result<String, BundleError> {
        let mut out =
            String::from("[bundle]\n\tversion = 1\n\tmode = all\n\theuristic = creationToken\n");
        for b in &self.bundles {
            let u = uri(b);
            if !u.contains("://") {
                return Err(BundleError::RelativeUri(u));
            }
            if u.chars()
                .any(|c| c.is_control() || c.is_whitespace() || "\"\\;#".contains(c))
            {
                return Err(BundleError::UnsafeUri(u));
            }
            out.push_str(&format!(
                "[bundle \"{}\"]\n\turi = {u}\n\tcreationToken = {}\n",
                b.id, b.creation_token
            ));
        }
        Ok(out)
    }
}

/// The mirror's branches and their tips.
async fn mirror_branches(
    git: &Git,
    mirror: &Mirror,
) -> Result<BTreeMap<String, CommitId>, BundleError> {
    mirror.default_branch()?;
    let out = git
        .cmd([
            "for-each-ref",
            "--format=%(objectname) %(refname:strip=2)",
            "refs/heads/",
        ])
        .current_dir(mirror.dir())
        .stdout_string()
        .await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (oid, name) = l.split_once(' ')?;
            Some((name.to_string(), CommitId::parse(oid)?))
        })
        .collect())
}

/// Those of `commits` the mirror holds.
async fn existing(
    git: &Git,
    mirror: &Mirror,
    commits: &BTreeSet<CommitId>,
) -> Result<BTreeSet<CommitId>, BundleError> {
    if commits.is_empty() {
        return Ok(BTreeSet::new());
    }
    let input: String = commits.iter().map(|c| format!("{c}\n")).collect();
    let out = git
        .cmd(["cat-file", "--batch-check=%(objectname) %(objecttype)"])
        .current_dir(mirror.dir())
        .stdin(input.into_bytes())
        .stdout_string()
        .await?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(" commit").and_then(CommitId::parse))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(id: &str, token: u64) -> Bundle {
        Bundle {
            id: id.into(),
            creation_token: token,
            full: id.starts_with("full"),
            tips: BTreeMap::new(),
            prerequisites: Vec::new(),
            size: 0,
        }
    }

    #[test]
    fn the_list_is_in_gits_format_with_absolute_uris() {
        let chain = BundleChain {
            bundles: vec![bundle("full-3", 3), bundle("inc-4", 4)],
            last_token: 4,
            ..BundleChain::default()
        };
        let list = chain
            .render_list(|b| {
                format!(
                    "https://larder.example/api/v1/git/h/r.git/bundles/{}",
                    b.file_name()
                )
            })
            .unwrap();
        assert_eq!(
            list,
            "[bundle]\n\tversion = 1\n\tmode = all\n\theuristic = creationToken\n\
             [bundle \"full-3\"]\n\turi = https://larder.example/api/v1/git/h/r.git/bundles/full-3.bundle\n\
             \tcreationToken = 3\n\
             [bundle \"inc-4\"]\n\turi = https://larder.example/api/v1/git/h/r.git/bundles/inc-4.bundle\n\
             \tcreationToken = 4\n"
        );
    }

    #[test]
    fn a_long_or_heavy_chain_of_increments_wants_a_new_full_bundle() {
        let sized = |id: &str, token: u64, size: u64| Bundle {
            size,
            ..bundle(id, token)
        };
        assert!(BundleChain::default().wants_full(), "an empty chain starts");
        let mut chain = BundleChain {
            bundles: vec![sized("full-1", 1, 1000)],
            last_token: 1,
            ..BundleChain::default()
        };
        for t in 2..2 + MAX_INCREMENTS as u64 {
            assert!(
                !chain.wants_full(),
                "{} increments",
                chain.bundles.len() - 1
            );
            chain.bundles.push(sized(&format!("inc-{t}"), t, 10));
        }
        assert!(chain.wants_full(), "{MAX_INCREMENTS} increments");
        chain.bundles.truncate(2);
        chain.bundles[1].size = 500;
        assert!(!chain.wants_full(), "exactly half the full bundle");
        chain.bundles[1].size = 501;
        assert!(chain.wants_full(), "more than half the full bundle");
        // Chains stored before `retired` existed still read.
        let old: BundleChain = serde_json::from_str(r#"{"bundles":[],"last_token":3}"#).unwrap();
        assert!(old.retired.is_empty() && old.last_token == 3);
    }

    #[test]
    fn relative_or_unsafe_uris_are_refused() {
        let chain = BundleChain {
            bundles: vec![bundle("full-1", 1)],
            last_token: 1,
            ..BundleChain::default()
        };
        assert!(matches!(
            chain.render_list(|b| b.file_name()),
            Err(BundleError::RelativeUri(_))
        ));
        for bad in [
            "https://h/a b",
            "https://h/a#b",
            "https://h/a\n[x]",
            "https://h/\"a",
        ] {
            assert!(
                matches!(
                    chain.render_list(|_| bad.to_string()),
                    Err(BundleError::UnsafeUri(_))
                ),
                "{bad:?}"
            );
        }
    }
}

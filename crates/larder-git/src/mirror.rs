//! A bare mirror of one upstream, kept with the system git: what snapshots and bundles are made
//! from, so that upstream pays for one incremental fetch per interval however many CI jobs
//! restore.
//!
//! Only branches and tags are mirrored (`+refs/heads/*:refs/heads/*`,
//! `+refs/tags/*:refs/tags/*`, pruned): exactly what `git clone` of the upstream would copy.
//! `refs/pull/*`, `refs/changes/*` and the like are often the largest part of a hosted repository
//! and are untrusted contributions, so `git clone --mirror` (which takes every ref) is not used.
//! The upstream's default branch is asked for with `ls-remote --symref` on each fetch and kept
//! as the mirror's own `HEAD`, which is how a clone made from the mirror gets `origin/HEAD` right.
//!
//! A mirror is trusted only after a fetch followed by a connectivity check succeeded; that is
//! recorded in `larder-mirror.json` inside the repository, and every query refuses to answer
//! before it. When the upstream answers but the fetch into the mirror or the check fails, the
//! mirror itself is the suspect (a lost pack, a truncated object, a crash mid-write), so it is
//! deleted and rebuilt from scratch by a full fetch, which must itself pass the check before
//! anything is read from it. When the upstream does not answer, the mirror is kept as it is:
//! an outage upstream must not throw away a good mirror.
//!
//! The connectivity check (`fsck --connectivity-only`) proves that every object reachable from a
//! ref exists, not that its content is intact; content is verified when a snapshot is cloned
//! from the mirror (index-pack hashes every object it receives), and a failure there should be
//! reported with [`Mirror::discard`].

use crate::CommitId;
use crate::command::{Git, GitError};
use crate::upstream::Upstream;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// The file inside the bare repository that says what the mirror is and whether it is trusted.
const STATE_FILE: &str = "larder-mirror.json";

/// Why a mirror could not be opened, fetched or queried.
#[derive(Debug, Error)]
pub enum MirrorError {
    /// The upstream did not answer (network, authentication, missing repository); the mirror
    /// was left as it was.
    #[error("upstream {upstream} did not answer")]
    Upstream {
        /// The upstream's URL.
        upstream: String,
        /// The failed `ls-remote` of its `HEAD`.
        source: GitError,
    },
    /// The mirror could not be brought up to date even after a rebuild.
    #[error("mirror of {upstream} could not be fetched cleanly")]
    Fetch {
        /// The upstream's URL.
        upstream: String,
        /// The last failed fetch or connectivity check.
        source: GitError,
    },
    /// The mirror has not fetched cleanly since it was (re)built, so it answers nothing.
    #[error("mirror of {0} has not fetched cleanly yet")]
    NotReady(String),
    /// A query to a trusted mirror failed.
    #[error(transparent)]
    Git(#[from] GitError),
    /// The upstream or the mirror's answer makes no sense for a mirror: for example the upstream's
    /// `HEAD` is not a branch, or a name is not a valid branch name.
    #[error("{0}")]
    Invalid(String),
    /// The mirror's directory or its state file could not be created, read or written.
    #[error("mirror directory {path}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// Deadlines of a mirror's git commands.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// `ls-remote` of the upstream's `HEAD`.
    pub ls_remote_timeout: Duration,
    /// One fetch (a first, full fetch of a big repository takes long).
    pub fetch_timeout: Duration,
    /// The connectivity check after a fetch.
    pub check_timeout: Duration,
}

impl Default for MirrorOptions {
    fn default() -> MirrorOptions {
        MirrorOptions {
            ls_remote_timeout: Duration::from_secs(60),
            fetch_timeout: Duration::from_secs(30 * 60),
            check_timeout: Duration::from_secs(30 * 60),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    upstream: String,
    /// Set only by a fetch whose connectivity check passed.
    clean: bool,
    default_branch: Option<String>,
    /// Unix seconds of the last clean fetch.
    fetched_at: Option<u64>,
}

/// What a fetch found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The upstream's default branch (`main`, not `refs/heads/main`).
    pub default_branch: String,
    /// Its tip after the fetch.
    pub tip: CommitId,
    /// Whether the mirror was deleted and rebuilt by this fetch.
    pub rebuilt: bool,
    /// Unix seconds at which the fetch finished (when `tip` was observed to be the tip).
    pub fetched_at: u64,
}

/// A bare mirror of one upstream.
pub struct Mirror {
    git: Git,
    dir: PathBuf,
    upstream: Upstream,
    opts: MirrorOptions,
    state: State,
}

impl Mirror {
    /// Opens the mirror in `dir`, or creates an empty one (not ready until it fetched). A
    /// directory that is not a mirror of `upstream` is replaced.
    pub async fn open_or_create(
        git: &Git,
        dir: &Path,
        upstream: &Upstream,
        opts: MirrorOptions,
    ) -> Result<Mirror, MirrorError> {
        let mut mirror = Mirror {
            git: git.clone(),
            dir: dir.to_path_buf(),
            upstream: upstream.clone(),
            opts,
            state: State::default(),
        };
        match mirror.read_state().await {
            Some(state) => mirror.state = state,
            None => mirror.rebuild_empty().await?,
        }
        Ok(mirror)
    }

    /// The directory of the bare repository.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The upstream this mirrors.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The git binary and defaults the mirror runs its commands with.
    pub fn git(&self) -> &Git {
        &self.git
    }

    /// Whether the mirror has fetched cleanly since it was (re)built.
    pub fn is_ready(&self) -> bool {
        self.state.clean
    }

    /// The state file, if `dir` holds a bare repository mirroring our upstream.
    async fn read_state(&self) -> Option<State> {
        let text = tokio::fs::read_to_string(self.dir.join(STATE_FILE))
            .await
            .ok()?;
        let state: State = serde_json::from_str(&text).ok()?;
        if state.upstream != self.upstream.url() {
            return None;
        }
        let bare = self
            .git_here(["rev-parse", "--is-bare-repository"])
            .stdout_string()
            .await
            .ok()?;
        let url = self
            .git_here(["config", "--get", "remote.origin.url"])
            .stdout_string()
            .await
            .ok()?;
        (bare == "true" && url == self.upstream.url()).then_some(state)
    }

    async fn write_state(&self) -> Result<(), MirrorError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(&self.state).expect("state serialises");
        let io = |source| MirrorError::Io {
            path: path.clone(),
            source,
        };
        tokio::fs::write(&tmp, json).await.map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)
    }

    fn git_here<I, S>(&self, args: I) -> crate::command::GitCommand<'_>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.git.cmd(args).current_dir(&self.dir)
    }

    /// Deletes the mirror and makes an empty, untrusted one in its place. The new repository is
    /// prepared beside the old one and renamed into place, so a crash leaves either the old
    /// directory or the complete new one (and a temporary directory to clean).
    async fn rebuild_empty(&mut self) -> Result<(), MirrorError> {
        let parent = self
            .dir
            .parent()
            .ok_or_else(|| MirrorError::Invalid(format!("{} has no parent", self.dir.display())))?
            .to_path_buf();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MirrorError::Io { path, source }
        };
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(io(&parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".mirror-")
            .tempdir_in(&parent)
            .map_err(io(&parent))?;
        let repo = staging.path().join("repo.git");
        let empty_template = staging.path().join("template");
        tokio::fs::create_dir(&empty_template)
            .await
            .map_err(io(&empty_template))?;
        let url = self.upstream.url();
        self.git
            .cmd(["init", "--quiet", "--bare"])
            .env("GIT_TEMPLATE_DIR", &empty_template)
            .current_dir(staging.path())
            .arg(&repo)
            .output()
            .await?;
        let config: &[(&str, &str)] = &[
            ("remote.origin.url", &url),
            ("remote.origin.fetch", "+refs/heads/*:refs/heads/*"),
            ("remote.origin.prune", "true"),
            ("remote.origin.tagOpt", "--no-tags"),
            ("core.logAllRefUpdates", "false"),
            // Detached gc and maintenance would escape the command's process group and deadline.
            ("gc.autoDetach", "false"),
            ("maintenance.autoDetach", "false"),
        ];
        for (k, v) in config {
            self.git
                .cmd(["config", k, v])
                .current_dir(&repo)
                .output()
                .await?;
        }
        self.git
            .cmd([
                "config",
                "--add",
                "remote.origin.fetch",
                "+refs/tags/*:refs/tags/*",
            ])
            .current_dir(&repo)
            .output()
            .await?;
        self.state = State {
            upstream: url,
            ..State::default()
        };
        let json = serde_json::to_vec_pretty(&self.state).expect("state serialises");
        tokio::fs::write(repo.join(STATE_FILE), json)
            .await
            .map_err(io(&repo))?;
        if tokio::fs::try_exists(&self.dir).await.unwrap_or(false) {
            // Moved aside first so that the rename below never meets a half-deleted tree.
            let old = staging.path().join("old");
            tokio::fs::rename(&self.dir, &old)
                .await
                .map_err(io(&self.dir))?;
        }
        tokio::fs::rename(&repo, &self.dir)
            .await
            .map_err(io(&self.dir))?;
        // The staging directory (with the old mirror) is removed when `staging` drops.
        Ok(())
    }

    /// Deletes the mirror and leaves an empty, untrusted one: for callers that found it corrupt
    /// (a clone from it failed). The next [`Mirror::fetch`] fills it again.
    pub async fn discard(&mut self) -> Result<(), MirrorError> {
        tracing::warn!(upstream = %self.upstream, dir = %self.dir.display(), "discarding mirror");
        self.rebuild_empty().await
    }

    /// Asks the upstream for its default branch, fetches branches and tags, and checks the
    /// mirror; a mirror that fails is rebuilt and fetched in full once.
    pub async fn fetch(&mut self) -> Result<Fetched, MirrorError> {
        let default_branch = self.remote_default_branch().await?;
        match self.fetch_and_check(&default_branch).await {
            Ok(tip) => Ok(self.record_clean(default_branch, tip, false).await?),
            Err(first) => {
                tracing::warn!(upstream = %self.upstream, error = %first, "mirror failed its fetch or check; rebuilding it");
                self.rebuild_empty().await?;
                let tip = self
                    .fetch_and_check(&default_branch)
                    .await
                    .map_err(|source| MirrorError::Fetch {
                        upstream: self.upstream.url(),
                        source,
                    })?;
                Ok(self.record_clean(default_branch, tip, true).await?)
            }
        }
    }

    async fn record_clean(
        &mut self,
        default_branch: String,
        tip: CommitId,
        rebuilt: bool,
    ) -> Result<Fetched, MirrorError> {
        let fetched_at = unix_now();
        self.state.clean = true;
        self.state.default_branch = Some(default_branch.clone());
        self.state.fetched_at = Some(fetched_at);
        self.write_state().await?;
        Ok(Fetched {
            default_branch,
            tip,
            rebuilt,
            fetched_at,
        })
    }

    /// `ls-remote --symref <upstream> HEAD`: the branch a clone would check out.
    async fn remote_default_branch(&self) -> Result<String, MirrorError> {
        let url = self.upstream.url();
        let out = self
            .git_here(["ls-remote", "--symref", &url, "HEAD"])
            .timeout(self.opts.ls_remote_timeout)
            .stdout_string()
            .await
            .map_err(|source| MirrorError::Upstream {
                upstream: url.clone(),
                source,
            })?;
        // "ref: refs/heads/main\tHEAD"
        out.lines()
            .find_map(|l| {
                l.strip_prefix("ref: refs/heads/")
                    .and_then(|rest| rest.strip_suffix("\tHEAD"))
            })
            .map(str::to_string)
            .ok_or_else(|| {
                MirrorError::Invalid(format!(
                    "upstream {url} names no default branch (its HEAD is not a branch)"
                ))
            })
    }

    async fn fetch_and_check(&mut self, default_branch: &str) -> Result<CommitId, GitError> {
        // The state says "untrusted" until the check below has passed.
        if self.state.clean {
            self.state.clean = false;
            self.write_state().await.map_err(|e| GitError {
                command: "write mirror state".into(),
                kind: crate::command::ErrorKind::Output(e.to_string()),
                stderr: String::new(),
            })?;
        }
        self.git_here(["fetch", "--quiet", "--prune", "--no-auto-gc", "origin"])
            .timeout(self.opts.fetch_timeout)
            .output()
            .await?;
        let head = format!("refs/heads/{default_branch}");
        self.git_here(["symbolic-ref", "HEAD", &head])
            .output()
            .await?;
        self.git_here([
            "fsck",
            "--connectivity-only",
            "--no-dangling",
            "--no-progress",
        ])
        .timeout(self.opts.check_timeout)
        .output()
        .await?;
        let tip = self
            .git_here(["rev-parse", "--verify", &format!("{head}^{{commit}}")])
            .stdout_string()
            .await?;
        CommitId::parse(&tip).ok_or_else(|| GitError {
            command: "git rev-parse".into(),
            kind: crate::command::ErrorKind::Output(format!("not an object id: {tip:?}")),
            stderr: String::new(),
        })
    }

    fn ready(&self) -> Result<(), MirrorError> {
        if self.state.clean {
            Ok(())
        } else {
            Err(MirrorError::NotReady(self.upstream.url()))
        }
    }

    /// The upstream's default branch as of the last clean fetch.
    pub fn default_branch(&self) -> Result<&str, MirrorError> {
        self.ready()?;
        self.state
            .default_branch
            .as_deref()
            .ok_or_else(|| MirrorError::NotReady(self.upstream.url()))
    }

    /// Unix seconds of the last clean fetch.
    pub fn fetched_at(&self) -> Option<u64> {
        self.state.fetched_at.filter(|_| self.state.clean)
    }

    /// The tip of `branch` as of the last clean fetch, `None` if there is no such branch.
    pub async fn tip(&self, branch: &str) -> Result<Option<CommitId>, MirrorError> {
        self.ready()?;
        let full = format!("refs/heads/{branch}");
        let valid = self.git_here(["check-ref-format", &full]).run().await?.code == Some(0);
        if !valid {
            return Err(MirrorError::Invalid(format!(
                "not a branch name: {branch:?}"
            )));
        }
        let done = self
            .git_here([
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{full}^{{commit}}"),
            ])
            .run()
            .await?;
        if done.code != Some(0) {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&done.stdout);
        Ok(CommitId::parse(text.trim()))
    }

    /// Whether `ancestor` is reachable from `descendant` (both must be in the mirror).
    pub async fn is_ancestor(
        &self,
        ancestor: &CommitId,
        descendant: &CommitId,
    ) -> Result<bool, MirrorError> {
        self.ready()?;
        let done = self
            .git_here([
                "merge-base",
                "--is-ancestor",
                ancestor.as_str(),
                descendant.as_str(),
            ])
            .run()
            .await?;
        match done.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            code => Err(MirrorError::Git(GitError {
                command: format!("git merge-base --is-ancestor {ancestor} {descendant}"),
                kind: code.map_or(
                    crate::command::ErrorKind::Killed,
                    crate::command::ErrorKind::Exit,
                ),
                stderr: done.stderr,
            })),
        }
    }

    /// Whether the mirror holds `commit`.
    pub async fn has_commit(&self, commit: &CommitId) -> Result<bool, MirrorError> {
        self.ready()?;
        let done = self
            .git_here(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .run()
            .await?;
        Ok(done.code == Some(0))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

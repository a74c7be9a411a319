//! Git snapshots, client side (README "Git snapshots"): `larder git restore` turns a CI job's
//! `git clone` into a restore of the snapshot larderd keeps of the upstream, followed by a
//! catch-up that touches the upstream only when the snapshot lacks what was asked for.
//!
//! The steps: read the repository's head record (`GET /api/v1/git/{host}/{path}/head`, whose
//! `Larder-Namespace` header says where the snapshot lives), restore the snapshot it names with
//! the ordinary pinned, verified, parallel restore, and — in the restore's staging directory,
//! before anything is visible at the target — make the tree safe and current (see
//! `prepare_checkout`). The target then appears in one rename, as with `larder restore`.
//!
//! **A snapshot is untrusted input.** Whoever can write the repository's namespace can write its
//! snapshot, so nothing in it may make git run a program or write outside the target:
//!
//! - `.git` must be a real directory without symlinks; everything in it except the object
//!   store, refs, logs, `HEAD`, `description`, `packed-refs` and `info/exclude` is removed
//!   (hooks, `commondir`, `worktrees/`, `config.worktree`, `objects/info/alternates`, …);
//! - `.git/config` is written here from scratch (`origin` = the URL given, the branch tracking
//!   it), so no `core.fsmonitor`, `core.hooksPath`, filter or alias of the snapshot survives;
//! - the index is rebuilt from the commit by git (`read-tree`), never trusted, and the working
//!   tree must then match the commit exactly with no extra file, or the restore is refused;
//! - symlinks in the working tree are restored as git stores them (also ones pointing outside,
//!   which are data to git), but no entry is ever written through one.
//!
//! The result is what `git clone` leaves: `git status` clean, `git fsck` clean.

mod runner;
mod sanitize;

use crate::restore::{Prepare, RestoreOptions, RestoreSummary};
use crate::{Client, Downloader, Error, ObjectName};
use larder_git::{CommitId, HeadRecord, Upstream};
use larder_proto::{Key, Namespace};
use reqwest::StatusCode;
use runner::Git;
use sanitize::{sanitize_git_dir, write_file, write_git_config};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The header of the head route naming the namespace the repository's snapshots live in.
pub const NAMESPACE_HEADER: &str = "larder-namespace";

/// What the server says about an upstream: its head record and where its objects live.
#[derive(Clone, Debug)]
pub struct GitHead {
    /// The upstream's current head record: commit, snapshot key and ETag.
    pub record: HeadRecord,
    /// The namespace the snapshot (and the head record) live in.
    pub namespace: Namespace,
}

impl Client {
    /// The head record of `upstream`. A repository the server has no snapshot of yet (it starts
    /// making one on this request) is [`Error::NoSnapshotYet`].
    pub async fn git_head(&self, upstream: &Upstream) -> Result<GitHead, Error> {
        let mut url = reqwest::Url::parse(&self.base)
            .map_err(|e| Error::InvalidInput(format!("invalid server URL {}: {e}", self.base)))?;
        {
            let mut segments = url
                .path_segments_mut()
                .map_err(|_| Error::InvalidInput(format!("invalid server URL {}", self.base)))?;
            segments.pop_if_empty().extend(["api", "v1", "git"]);
            segments.push(upstream.authority());
            segments.extend(upstream.path().split('/'));
            segments.push("head");
        }
        let target = format!("the head record of {upstream}");
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| Error::request("GET", &target, &self.base, e))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND
            && let Some(retry) = resp.headers().get(reqwest::header::RETRY_AFTER)
        {
            let retry_after = retry.to_str().ok().and_then(|v| v.trim().parse().ok());
            return Err(Error::NoSnapshotYet {
                upstream: upstream.url(),
                retry_after,
            });
        }
        if !status.is_success() {
            return Err(self.status_error("GET", &target, status, resp).await);
        }
        let namespace = resp
            .headers()
            .get(NAMESPACE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Namespace::parse(v).ok())
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "{url}: the answer names no namespace ({NAMESPACE_HEADER} header); is the \
                     server a larderd with git snapshots?"
                ))
            })?;
        let body = resp
            .bytes()
            .await
            .map_err(|e| Error::request("GET", &target, &self.base, e))?;
        let record = HeadRecord::from_json(&body)
            .map_err(|e| Error::Protocol(format!("{url}: not a head record: {e}")))?;
        Ok(GitHead { record, namespace })
    }
}

/// What to check out after the restore.
#[derive(Clone, Debug, Default)]
pub struct GitRestoreOptions {
    /// This commit, detached; fetched from the upstream when the snapshot lacks it.
    pub commit: Option<CommitId>,
    /// This branch (tracking `origin`) or tag; fetched when the snapshot lacks it. Without
    /// `commit` and `git_ref`: the snapshot's branch at the snapshot's commit.
    pub git_ref: Option<String>,
    /// Replace an existing target.
    pub force: bool,
    /// The git program (default `git` on PATH).
    pub git: Option<PathBuf>,
}

/// What a git restore (or clone) left in the target.
#[derive(Clone, Debug)]
pub struct GitRestoreSummary {
    /// The commit the snapshot held.
    pub snapshot_commit: Option<CommitId>,
    /// The commit checked out.
    pub commit: CommitId,
    /// The branch checked out, or `None` when HEAD is detached.
    pub branch: Option<String>,
    /// Whether the catch-up fetched from the upstream.
    pub fetched_from_upstream: bool,
    /// Whether the catch-up took what it needed from larder's bundles newer than the snapshot.
    pub fetched_from_bundles: bool,
    /// The snapshot restore; `None` after a fallback clone.
    pub restore: Option<RestoreSummary>,
}

/// How the catch-up went, filled in by the prepare step.
#[derive(Clone, Debug)]
struct CheckedOut {
    commit: CommitId,
    branch: Option<String>,
    fetched: bool,
    from_bundles: bool,
}

impl GitRestoreOptions {
    fn git(&self) -> PathBuf {
        self.git.clone().unwrap_or_else(|| PathBuf::from("git"))
    }

    fn check(&self) -> Result<(), Error> {
        if self.commit.is_some() && self.git_ref.is_some() {
            return Err(Error::InvalidInput(
                "give --commit or --ref, not both".into(),
            ));
        }
        if let Some(r) = &self.git_ref {
            check_ref_name(r)?;
        }
        Ok(())
    }
}

/// Parses an upstream URL as `git clone` would be given it.
pub fn parse_upstream(url: &str) -> Result<Upstream, Error> {
    Upstream::parse(url).map_err(|e| Error::InvalidInput(format!("upstream {url:?}: {e}")))
}

impl Downloader {
    /// Restores the snapshot of the upstream `url` into `dir` and checks out what `opts` asks
    /// for; see the module comment.
    pub async fn git_restore(
        &self,
        url: &str,
        dir: &Path,
        opts: &GitRestoreOptions,
    ) -> Result<GitRestoreSummary, Error> {
        opts.check()?;
        let upstream = parse_upstream(url)?;
        let head = self.git_head(&upstream).await?;
        match self
            .restore_head(&upstream, url, head.clone(), dir, opts)
            .await
        {
            // The snapshot was deleted between reading the head record and downloading it (a
            // restore that started longer than `--git-grace` after the record moved on): the
            // record now names a newer one.
            Err(e) if e.is_not_found() => {
                let newer = self.git_head(&upstream).await?;
                if newer.record.snapshot_key == head.record.snapshot_key {
                    return Err(e);
                }
                self.options()
                    .progress
                    .note("the snapshot was replaced while being restored; restoring the new one");
                self.restore_head(&upstream, url, newer, dir, opts).await
            }
            other => other,
        }
    }

    async fn restore_head(
        &self,
        upstream: &Upstream,
        url: &str,
        head: GitHead,
        dir: &Path,
        opts: &GitRestoreOptions,
    ) -> Result<GitRestoreSummary, Error> {
        let record = head.record;
        if record.snapshot_key != upstream.snapshot_key(&record.commit).as_str() {
            return Err(Error::Protocol(format!(
                "the head record of {upstream} names {:?}, not a snapshot of this repository",
                record.snapshot_key
            )));
        }
        let branch = record
            .git_ref
            .strip_prefix("refs/heads/")
            .filter(|b| check_ref_name(b).is_ok())
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "the head record of {upstream} names the ref {:?}, not a branch",
                    record.git_ref
                ))
            })?
            .to_string();
        let name = ObjectName {
            ns: head.namespace.clone(),
            key: Key::parse(&record.snapshot_key)
                .map_err(|e| Error::Protocol(format!("bad snapshot key in head record: {e}")))?,
        };
        // Bundles newer than the snapshot, for a commit the snapshot may not have: fetched
        // before the upstream is asked. Only `--commit` can use them (a ref's value is the
        // upstream's to say).
        let bundles =
            tempfile::tempdir().map_err(|e| Error::io("cannot create a temporary directory", e))?;
        let newer = match &opts.commit {
            Some(c) if c != &record.commit => {
                self.newer_bundles(upstream, &head.namespace, &record.commit, bundles.path())
                    .await
            }
            _ => Vec::new(),
        };
        let outcome = Arc::new(Mutex::new(None));
        let step = {
            let (git, url, commit, outcome) = (
                opts.git(),
                url.to_string(),
                record.commit.clone(),
                outcome.clone(),
            );
            let (want_commit, want_ref) = (opts.commit.clone(), opts.git_ref.clone());
            move |root: &Path| {
                let git = Git::new(&git, root);
                let snapshot = Snapshot {
                    url: &url,
                    commit: &commit,
                    branch: &branch,
                };
                let wanted = Wanted {
                    commit: want_commit.as_ref(),
                    git_ref: want_ref.as_deref(),
                    newer_bundles: &newer,
                };
                let done = prepare_checkout(&git, root, &snapshot, &wanted)?;
                *outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(done);
                Ok(())
            }
        };
        let restore = self
            .restore(
                &name,
                dir,
                &RestoreOptions {
                    force: opts.force,
                    symlinks_may_leave: true,
                    prepare: Some(Prepare(Arc::new(step))),
                },
            )
            .await?;
        let done = outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                Error::Protocol("internal error: the checkout step did not run".into())
            })?;
        drop(bundles);
        Ok(GitRestoreSummary {
            snapshot_commit: Some(record.commit),
            commit: done.commit,
            branch: done.branch,
            fetched_from_upstream: done.fetched,
            fetched_from_bundles: done.from_bundles,
            restore: Some(restore),
        })
    }

    /// Downloads into `dir` the bundles of the repository's chain made after the one that
    /// carries `snapshot_commit`, oldest first. Best effort: without a chain, without that
    /// bundle in it, or on any failure, none (the upstream is asked instead).
    async fn newer_bundles(
        &self,
        upstream: &Upstream,
        ns: &larder_proto::Namespace,
        snapshot_commit: &CommitId,
        dir: &Path,
    ) -> Vec<PathBuf> {
        let found: Result<Vec<PathBuf>, Error> = async {
            let chain_file = dir.join("chain.json");
            let chain_name = ObjectName {
                ns: ns.clone(),
                key: upstream.bundle_chain_key(),
            };
            self.download_to_file(&chain_name, &chain_file).await?;
            let text = std::fs::read(&chain_file)
                .map_err(|e| Error::io("cannot read the bundle chain", e))?;
            let chain: larder_git::BundleChain = serde_json::from_slice(&text)
                .map_err(|e| Error::Protocol(format!("not a bundle chain: {e}")))?;
            let Some(carrier) = chain
                .bundles
                .iter()
                .rposition(|b| b.tips.values().any(|t| t == snapshot_commit))
            else {
                return Ok(Vec::new());
            };
            let mut paths = Vec::new();
            for bundle in &chain.bundles[carrier + 1..] {
                let key = upstream
                    .bundle_key(&bundle.id)
                    .map_err(|e| Error::Protocol(format!("bad bundle id {:?}: {e}", bundle.id)))?;
                let path = dir.join(bundle.file_name());
                let name = ObjectName {
                    ns: ns.clone(),
                    key,
                };
                self.download_to_file(&name, &path).await?;
                paths.push(path);
            }
            Ok(paths)
        }
        .await;
        found.unwrap_or_else(|e| {
            self.options().progress.note(&format!(
                "newer bundles not used ({e}); asking the upstream"
            ));
            Vec::new()
        })
    }

    /// The head record from the first replica that answers; a replica that cannot be reached
    /// is skipped, any answer (also "no snapshot yet") counts.
    pub async fn git_head(&self, upstream: &Upstream) -> Result<GitHead, Error> {
        let mut last = None;
        for client in self.replicas() {
            match client.git_head(upstream).await {
                Err(e @ (Error::Connect { .. } | Error::Transport { .. })) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Error::InvalidInput("no server URL given".into())))
    }
}

/// `git clone` of the upstream itself, for `larder git clone` when the cache cannot help. The
/// clone is made beside `dir` and moved into place only when complete, like a restore.
pub fn clone_from_upstream(
    url: &str,
    dir: &Path,
    opts: &GitRestoreOptions,
) -> Result<GitRestoreSummary, Error> {
    opts.check()?;
    parse_upstream(url)?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(file_name) = dir.file_name() else {
        return Err(Error::InvalidInput(format!(
            "{} does not name a directory to clone into",
            dir.display()
        )));
    };
    if !opts.force && std::fs::symlink_metadata(dir).is_ok() {
        return Err(Error::InvalidInput(format!(
            "{} already exists; pass --force to replace it, or clone somewhere else",
            dir.display()
        )));
    }
    std::fs::create_dir_all(&parent)
        .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name.to_string_lossy()))
        .suffix(".larder-clone")
        .tempdir_in(&parent)
        .map_err(|e| {
            Error::io(
                format!("cannot create a directory in {}", parent.display()),
                e,
            )
        })?;
    let tree = staging.path().join("tree");
    let git = Git::new(&opts.git(), staging.path());
    let mut args: Vec<&OsStr> = vec![OsStr::new("clone"), OsStr::new("--quiet")];
    if let Some(r) = &opts.git_ref {
        args.extend([OsStr::new("--branch"), OsStr::new(short_ref(r))]);
    }
    args.extend([OsStr::new("--"), OsStr::new(url), tree.as_os_str()]);
    git.run(&args)?;
    let git = Git::new(&opts.git(), &tree);
    if let Some(c) = &opts.commit {
        if !git.has_commit(c.as_str())? {
            git.run(&["fetch", "--quiet", "origin", c.as_str()])?;
        }
        git.run(&["checkout", "--quiet", "--detach", c.as_str()])?;
    }
    let summary = summarize(&git, None, true)?;
    crate::restore::place(&tree, dir, opts.force, &crate::Progress::hidden())?;
    Ok(summary)
}

/// What the restored snapshot is of: the upstream URL given, its commit and branch.
struct Snapshot<'a> {
    url: &'a str,
    commit: &'a CommitId,
    branch: &'a str,
}

/// What the caller asked to check out, and the bundles that may have it.
struct Wanted<'a> {
    commit: Option<&'a CommitId>,
    git_ref: Option<&'a str>,
    newer_bundles: &'a [PathBuf],
}

/// Makes the restored tree at `root` safe and current: sanitises `.git`, writes its config,
/// rebuilds the index from the snapshot's commit and checks the working tree against it, then
/// fetches (from newer bundles first, then the upstream) and checks out what was asked for.
fn prepare_checkout(
    git: &Git,
    root: &Path,
    snapshot: &Snapshot<'_>,
    wanted: &Wanted<'_>,
) -> Result<CheckedOut, Error> {
    let (url, snapshot_commit, branch) = (snapshot.url, snapshot.commit, snapshot.branch);
    let (want_commit, want_ref, newer_bundles) =
        (wanted.commit, wanted.git_ref, wanted.newer_bundles);
    let dot_git = root.join(".git");
    sanitize_git_dir(&dot_git)?;
    write_git_config(&dot_git, url, branch, snapshot_commit)?;
    write_file(
        &dot_git.join("HEAD"),
        &format!("ref: refs/heads/{branch}\n"),
    )?;
    let tip = git.rev_parse(&format!("refs/heads/{branch}^{{commit}}"))?;
    if tip.as_deref() != Some(snapshot_commit.as_str()) {
        return Err(Error::UnsafeArchive(format!(
            "the snapshot's branch {branch} is at {}, not at the commit {snapshot_commit} its \
             head record names; nothing was restored",
            tip.as_deref().unwrap_or("nothing")
        )));
    }
    // The index is rebuilt from the commit, never taken from the snapshot: git trusts the
    // index's paths when it later removes or rewrites files.
    git.run(&["read-tree", "HEAD"])?;
    // Exit status 1 means "some files need updating", which diff-files reports below.
    git.output(&["update-index", "-q", "--refresh"])?;
    let changed = git.output(&["diff-files", "--name-only", "-z"])?;
    let untracked = git.output(&["ls-files", "--others", "--directory", "-z"])?;
    for (list, what) in [(&changed, "differs from"), (&untracked, "is not in")] {
        if let Some(first) = list.stdout.split(|b| *b == 0).find(|p| !p.is_empty()) {
            return Err(Error::UnsafeArchive(format!(
                "the snapshot's file {:?} {what} the commit {snapshot_commit}; nothing was restored",
                String::from_utf8_lossy(first)
            )));
        }
    }
    let mut fetched = false;
    let mut from_bundles = false;
    if let Some(c) = want_commit {
        // Newer bundles first: their objects come from larder, not from the upstream. A bundle
        // whose prerequisites are missing is skipped (`bundle verify`).
        for bundle in newer_bundles {
            if git.has_commit(c.as_str())? {
                break;
            }
            if git
                .output(&[
                    OsStr::new("bundle"),
                    OsStr::new("verify"),
                    OsStr::new("-q"),
                    bundle.as_os_str(),
                ])?
                .status
                .success()
            {
                git.run(&[
                    OsStr::new("fetch"),
                    OsStr::new("--quiet"),
                    bundle.as_os_str(),
                    OsStr::new(&format!("refs/heads/*:{BUNDLE_REFS}*")),
                ])?;
                // The objects stay; the bundle's refs would make the repository unlike a clone.
                let refs = git.run(&["for-each-ref", "--format=%(refname)", BUNDLE_REFS])?;
                for name in String::from_utf8_lossy(&refs).lines() {
                    git.run(&["update-ref", "-d", name])?;
                }
                from_bundles = git.has_commit(c.as_str())?;
            }
        }
        if !git.has_commit(c.as_str())? {
            git.run(&["fetch", "--quiet", "origin"])?;
            fetched = true;
            if !git.has_commit(c.as_str())? {
                git.run(&["fetch", "--quiet", "origin", c.as_str()])?;
            }
            if !git.has_commit(c.as_str())? {
                return Err(Error::Git(format!(
                    "commit {c} is neither in the snapshot nor on {url}"
                )));
            }
        }
        if c != snapshot_commit {
            git.run(&["checkout", "--quiet", "--detach", c.as_str()])?;
        }
    } else if let Some(r) = want_ref {
        fetched = checkout_ref(git, url, branch, r)?;
    }
    summarize(git, Some(snapshot_commit), fetched).map(|s| CheckedOut {
        commit: s.commit,
        branch: s.branch,
        fetched,
        from_bundles,
    })
}

/// Checks out the branch or tag `r`, fetching when the snapshot does not have it. Returns
/// whether it fetched.
fn checkout_ref(git: &Git, url: &str, snapshot_branch: &str, r: &str) -> Result<bool, Error> {
    let find = |git: &Git| -> Result<Option<(String, bool)>, Error> {
        let (heads, tags): (Vec<String>, Vec<String>) =
            if let Some(b) = r.strip_prefix("refs/heads/") {
                (vec![b.to_string()], vec![])
            } else if let Some(t) = r.strip_prefix("refs/tags/") {
                (vec![], vec![t.to_string()])
            } else {
                (vec![r.to_string()], vec![r.to_string()])
            };
        for b in heads {
            if git
                .rev_parse(&format!("refs/remotes/origin/{b}^{{commit}}"))?
                .is_some()
            {
                return Ok(Some((b, true)));
            }
        }
        for t in tags {
            if git
                .rev_parse(&format!("refs/tags/{t}^{{commit}}"))?
                .is_some()
            {
                return Ok(Some((t, false)));
            }
        }
        Ok(None)
    };
    let mut fetched = false;
    let found = match find(git)? {
        Some(f) => f,
        None => {
            git.run(&["fetch", "--quiet", "--tags", "origin"])?;
            fetched = true;
            find(git)?
                .ok_or_else(|| Error::Git(format!("{r} is neither a branch nor a tag of {url}")))?
        }
    };
    match found {
        (b, true) if b == snapshot_branch => {
            if fetched {
                git.run(&[
                    "reset",
                    "--quiet",
                    "--hard",
                    &format!("refs/remotes/origin/{b}"),
                ])?;
            }
        }
        (b, true) => {
            git.run(&[
                "checkout",
                "--quiet",
                "-b",
                &b,
                "--track",
                &format!("origin/{b}"),
            ])?;
        }
        (t, false) => {
            git.run(&[
                "checkout",
                "--quiet",
                "--detach",
                &format!("refs/tags/{t}^{{commit}}"),
            ])?;
        }
    }
    Ok(fetched)
}

fn summarize(
    git: &Git,
    snapshot_commit: Option<&CommitId>,
    fetched: bool,
) -> Result<GitRestoreSummary, Error> {
    let commit = git
        .rev_parse("HEAD^{commit}")?
        .and_then(|c| CommitId::parse(&c))
        .ok_or_else(|| Error::Git("HEAD names no commit after the checkout".into()))?;
    let symref = git.output(&["symbolic-ref", "--quiet", "--short", "HEAD"])?;
    let branch = symref
        .status
        .success()
        .then(|| String::from_utf8_lossy(&symref.stdout).trim().to_string());
    Ok(GitRestoreSummary {
        snapshot_commit: snapshot_commit.cloned(),
        commit,
        branch,
        fetched_from_upstream: fetched,
        fetched_from_bundles: false,
        restore: None,
    })
}

/// Where a bundle's branches are fetched to for a moment (git needs a destination for a glob).
const BUNDLE_REFS: &str = "refs/larder-bundle/";

/// Rejects what git would not take as a ref name, before it reaches a command line.
fn check_ref_name(r: &str) -> Result<(), Error> {
    let bad = r.is_empty()
        || r.starts_with('-')
        || r.starts_with('/')
        || r.ends_with('/')
        || r.ends_with(".lock")
        || r.contains("..")
        || r.contains("@{")
        || r.contains("//")
        || r.chars()
            .any(|c| c.is_control() || " ~^:?*[\\\"".contains(c));
    if bad {
        return Err(Error::InvalidInput(format!(
            "{r:?} is not a valid git ref name"
        )));
    }
    Ok(())
}

fn short_ref(r: &str) -> &str {
    r.strip_prefix("refs/heads/")
        .or_else(|| r.strip_prefix("refs/tags/"))
        .unwrap_or(r)
}

//! Snapshots: one commit of an upstream's default branch, laid out exactly as `git clone
//! <upstream>` leaves it, archived as tar + multi-threaded zstd.
//!
//! **Why a real clone.** The snapshot is made by the same `git` that CI jobs would otherwise
//! run, cloning through git's own transport: `git clone <upstream>` with
//! `url.file://<view>.insteadOf=<upstream>` given on the command line only. Everything git writes
//! is then what a clone of the upstream writes (`remote.origin.url` and its refspec,
//! `refs/remotes/origin/*` and `origin/HEAD`, tags in `packed-refs`, `branch.<default>`
//! tracking, one pack with its index, the reflog's `clone: from <upstream>`), and nothing names
//! where the objects came from: the rewrite is not saved, and the transport is not a local-path
//! clone (no hard links, no `objects/info/alternates`). `index-pack` re-hashes every object on
//! the way, so a mirror whose objects are damaged fails here instead of being published.
//!
//! The *view* cloned from is a throw-away bare repository that borrows the mirror's objects
//! through alternates and holds a copy of the mirror's branch and tag refs, with the default
//! branch set to the commit asked for and `HEAD` on the default branch. So a snapshot of an
//! older tip is exactly the clone made when it was the tip (its pack holds only what is
//! reachable then), and a fetch into the mirror while the clone runs changes nothing the clone
//! sees but new objects. Rejected alternatives: copying the mirror and rewriting refs by hand
//! (every git version lays `.git` out a little differently, and the copy would carry the mirror's
//! packs and configuration), cloning the mirror and moving refs back afterwards (loose refs and
//! reflogs then differ from a clone's, and the pack carries newer objects), and `clone --local`
//! (hard links or alternates into the mirror).
//!
//! The clone runs with no system or global git configuration (`GIT_CONFIG_NOSYSTEM`,
//! `GIT_CONFIG_GLOBAL=/dev/null`): the service's configuration is where upstream credentials
//! live, and settings such as `core.autocrlf` would change the working tree. It uses an empty
//! template directory, so there are no hooks, not even samples (a snapshot is untrusted input to
//! the client, which drops hooks anyway).
//!
//! **Why stream.** Archives of big repositories are GiB; the server pipes the archive into
//! `Tier::put` as it is produced (a blocking thread writes tar into the zstd encoder, whose
//! output travels in 1 MiB pieces over a bounded channel), so memory stays bounded and a slow
//! upload slows the archiver. An error ends the stream with `Err`, so the tier stores nothing.
//! Entries are sorted, owned by uid/gid 0 with no names (an extracting root must not hand files
//! to the generator's user), and keep their modes, modification times and symlinks.

use crate::CommitId;
use crate::command::{GitCommand, GitError};
use crate::mirror::{Mirror, MirrorError};
use crate::pieces::PieceWriter;
use bytes::Bytes;
use futures_util::Stream;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;

/// Why a snapshot could not be made.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The mirror could not be opened, fetched or queried.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// A git command failed; a failed clone can mean the mirror is corrupt.
    #[error("{0}")]
    Git(#[from] GitError),
    /// The mirror does not hold `commit` (not fetched yet, or not in the upstream).
    #[error("commit {commit} is not in the mirror of {upstream}")]
    UnknownCommit {
        /// The commit asked for.
        commit: CommitId,
        /// The upstream's URL.
        upstream: String,
    },
    /// `commit` is in the mirror but not reachable from the default branch, so it is not
    /// snapshotted.
    #[error("commit {commit} is not on {upstream}'s default branch {branch}")]
    NotOnDefaultBranch {
        /// The commit asked for.
        commit: CommitId,
        /// The upstream's default branch.
        branch: String,
        /// The upstream's URL.
        upstream: String,
    },
    /// A file in `.git` names the mirror: publishing it would leak a server path and break
    /// the clone elsewhere. Never expected; checked because it is cheap.
    #[error("the snapshot's {0} refers to the mirror")]
    RefersToMirror(String),
    /// A file of the checkout could not be created, read or listed.
    #[error("{what} {path}")]
    Io {
        /// What was being done (`"cannot list"`, …); the message is `"{what} {path}"`.
        what: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
}

/// How snapshots are made.
#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// The clone from the mirror and the checkout.
    pub clone_timeout: Duration,
    /// zstd level (1–19); 3 is zstd's default.
    pub zstd_level: i32,
    /// zstd worker threads; 0 means one per CPU.
    pub zstd_threads: u32,
}

impl Default for SnapshotOptions {
    fn default() -> SnapshotOptions {
        SnapshotOptions {
            clone_timeout: Duration::from_secs(30 * 60),
            zstd_level: 3,
            zstd_threads: 0,
        }
    }
}

/// A clone-identical checkout of one commit in a temporary directory (deleted on drop).
pub struct Checkout {
    tmp: tempfile::TempDir,
    commit: CommitId,
    branch: String,
}

impl Checkout {
    /// Clones `commit` of the mirror's default branch into a new temporary directory under
    /// `work_dir` (on the same file system as the mirror is best: nothing is linked, but the
    /// clone is as large as the repository).
    pub async fn build(
        mirror: &Mirror,
        commit: &CommitId,
        work_dir: &Path,
        opts: &SnapshotOptions,
    ) -> Result<Checkout, SnapshotError> {
        let upstream = mirror.upstream().url();
        let branch = mirror.default_branch()?.to_string();
        if !mirror.has_commit(commit).await? {
            return Err(SnapshotError::UnknownCommit {
                commit: commit.clone(),
                upstream,
            });
        }
        let tip = mirror
            .tip(&branch)
            .await?
            .ok_or_else(|| MirrorError::Invalid(format!("the mirror has no branch {branch}")))?;
        if !mirror.is_ancestor(commit, &tip).await? {
            return Err(SnapshotError::NotOnDefaultBranch {
                commit: commit.clone(),
                branch,
                upstream,
            });
        }
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { what, path, source }
        };
        tokio::fs::create_dir_all(work_dir)
            .await
            .map_err(io("cannot create", work_dir))?;
        let tmp = tempfile::Builder::new()
            .prefix(".snapshot-")
            .tempdir_in(work_dir)
            .map_err(io("cannot create a directory in", work_dir))?;
        let template = tmp.path().join("template");
        tokio::fs::create_dir(&template)
            .await
            .map_err(io("cannot create", &template))?;
        let repo = tmp.path().join("repo");
        let view = tmp.path().join("view.git");
        let mirror_dir =
            std::path::absolute(mirror.dir()).map_err(io("cannot resolve", mirror.dir()))?;
        let template_arg = format!("--template={}", template.display());
        let timeout = opts.clone_timeout;
        let git = mirror.git();

        // The view: the mirror's objects (through alternates) under the refs the upstream had
        // when `commit` was the tip of its default branch.
        isolated(
            git.cmd(["init", "--quiet", "--bare", &template_arg]),
            timeout,
        )
        .arg(&view)
        .output()
        .await?;
        let alternates = view.join("objects/info/alternates");
        tokio::fs::create_dir_all(view.join("objects/info"))
            .await
            .map_err(io("cannot create", &view))?;
        tokio::fs::write(
            &alternates,
            format!("{}\n", mirror_dir.join("objects").display()),
        )
        .await
        .map_err(io("cannot write", &alternates))?;
        let refs = git
            .cmd([
                "for-each-ref",
                "--format=%(objectname) %(refname)",
                "refs/heads/",
                "refs/tags/",
            ])
            .current_dir(&mirror_dir)
            .stdout_string()
            .await?;
        let head = format!("refs/heads/{branch}");
        let mut updates = String::new();
        for line in refs.lines() {
            if let Some((oid, name)) = line.split_once(' ') {
                let oid = if name == head { commit.as_str() } else { oid };
                updates.push_str(&format!("create {name} {oid}\n"));
            }
        }
        isolated(git.cmd(["update-ref", "--stdin"]), timeout)
            .current_dir(&view)
            .stdin(updates.into_bytes())
            .output()
            .await?;
        isolated(git.cmd(["symbolic-ref", "HEAD", &head]), timeout)
            .current_dir(&view)
            .output()
            .await?;

        let view_url = format!("file://{}", view.display());
        isolated(
            git.cmd([
                "-c",
                &format!("url.{view_url}.insteadOf={upstream}"),
                "-c",
                "protocol.file.allow=always",
                "-c",
                "core.hooksPath=/dev/null",
                "clone",
                "--quiet",
                &template_arg,
                &upstream,
            ]),
            timeout,
        )
        .arg(&repo)
        .current_dir(tmp.path())
        .output()
        .await?;
        for dir in [&view, &template] {
            tokio::fs::remove_dir_all(dir)
                .await
                .map_err(io("cannot remove", dir))?;
        }
        let checkout = Checkout {
            tmp,
            commit: commit.clone(),
            branch,
        };
        let path = checkout.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            refers_to(&path, &mirror_dir)?;
            refers_to(&path, &view)
        })
        .await
        .expect("the mirror-reference check panicked")?;
        Ok(checkout)
    }

    /// The repository: its working tree with `.git` inside.
    pub fn path(&self) -> PathBuf {
        self.tmp.path().join("repo")
    }

    /// The commit checked out.
    pub fn commit(&self) -> &CommitId {
        &self.commit
    }

    /// The default branch checked out.
    pub fn branch(&self) -> &str {
        &self.branch
    }

    /// Writes the tar + zstd archive of the checkout into `out` (blocking).
    pub fn write_archive<W: Write>(
        &self,
        out: W,
        opts: &SnapshotOptions,
    ) -> Result<ArchiveStats, SnapshotError> {
        write_archive(&self.path(), out, opts)
    }

    /// The archive as a stream of pieces (the item type of `larder_tier::UploadStream`), made
    /// by a blocking task that owns the checkout and deletes it when done; `finished` says how
    /// it went. When archiving fails the stream's last item is the error.
    pub fn into_stream(self, opts: &SnapshotOptions) -> SnapshotStream {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let opts = opts.clone();
        let finished = tokio::task::spawn_blocking(move || {
            let out = PieceWriter::new(
                tx.clone(),
                "the archive's reader stopped before the archive was complete",
            );
            let result = self.write_archive(out, &opts);
            if let Err(e) = &result {
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
            }
            result
        });
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        SnapshotStream {
            body: Box::pin(body),
            finished,
        }
    }
}

/// A command that sees no system or global git configuration, with the service's identity for
/// the reflog entries it writes.
fn isolated(cmd: GitCommand<'_>, timeout: Duration) -> GitCommand<'_> {
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_COMMITTER_NAME", "larder")
        .env("GIT_COMMITTER_EMAIL", "larder@localhost")
        .timeout(timeout)
}

/// Fails if any file of `.git` outside the object store names `needle` (the mirror's path).
fn refers_to(repo: &Path, needle: &Path) -> Result<(), SnapshotError> {
    let git_dir = repo.join(".git");
    let needle = needle.as_os_str().as_encoded_bytes();
    let mut stack = vec![git_dir.clone()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| SnapshotError::Io {
            what: "cannot list",
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| SnapshotError::Io {
                what: "cannot list",
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let rel = path.strip_prefix(&git_dir).unwrap_or(&path);
            if rel.starts_with("objects/pack") || rel == Path::new("index") {
                // Packs and the index hold object contents and tree paths, not locations; an
                // alternates file (which would name the mirror) lives in objects/info.
                continue;
            }
            let ft = entry.file_type().map_err(|source| SnapshotError::Io {
                what: "cannot stat",
                path: path.clone(),
                source,
            })?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let data = std::fs::read(&path).map_err(|source| SnapshotError::Io {
                    what: "cannot read",
                    path: path.clone(),
                    source,
                })?;
                let hit = rel == Path::new("objects/info/alternates")
                    || data.windows(needle.len()).any(|w| w == needle);
                if hit {
                    return Err(SnapshotError::RefersToMirror(
                        Path::new(".git").join(rel).display().to_string(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The archive as pieces, ready to be an upload body.
pub type ArchiveStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// An archive being made: read `body`; `finished` ends when the archiver does.
pub struct SnapshotStream {
    /// The tar + zstd archive as it is produced; if archiving fails, its last item is the error.
    pub body: ArchiveStream,
    /// Resolves when the archiver is done, with what went into the archive or why it failed.
    pub finished: tokio::task::JoinHandle<Result<ArchiveStats, SnapshotError>>,
}

/// What went into an archive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Regular files archived.
    pub files: u64,
    /// Directories archived.
    pub dirs: u64,
    /// Symbolic links archived.
    pub symlinks: u64,
    /// Sum of the regular files' sizes.
    pub input_bytes: u64,
    /// Size of the compressed archive.
    pub archive_bytes: u64,
}

/// Pieces of the archive queued for its reader: a few MiB.
const QUEUE: usize = 8;

/// Writes `dir`'s tree as tar + zstd into `out`, entries sorted by name, root first (`.`).
pub fn write_archive<W: Write>(
    dir: &Path,
    out: W,
    opts: &SnapshotOptions,
) -> Result<ArchiveStats, SnapshotError> {
    let at = |path: &Path| {
        let path = dir.join(path);
        move |source| SnapshotError::Io {
            what: "cannot archive",
            path,
            source,
        }
    };
    let threads = if opts.zstd_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        opts.zstd_threads
    };
    let mut stats = ArchiveStats::default();
    let counter = CountingWriter {
        inner: out,
        count: 0,
    };
    let mut encoder =
        zstd::stream::write::Encoder::new(counter, opts.zstd_level).map_err(at(dir))?;
    encoder.multithread(threads).map_err(at(dir))?;
    let mut tar = tar::Builder::new(encoder);
    let mut stack = vec![PathBuf::from(".")];
    while let Some(rel) = stack.pop() {
        let full = dir.join(&rel);
        let meta = std::fs::symlink_metadata(&full).map_err(at(&rel))?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(meta.mtime().max(0) as u64);
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(&full).map_err(at(&rel))?;
            header.set_size(0);
            tar.append_link(&mut header, &rel, &target)
                .map_err(at(&rel))?;
            stats.symlinks += 1;
        } else if ft.is_dir() {
            header.set_size(0);
            tar.append_data(&mut header, &rel, io::empty())
                .map_err(at(&rel))?;
            stats.dirs += 1;
            let mut children: Vec<_> = std::fs::read_dir(&full)
                .map_err(at(&rel))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(at(&rel))?;
            // Reversed onto the stack, so that entries come out in name order.
            children.sort_by(|a, b| b.cmp(a));
            for name in children {
                stack.push(if rel == Path::new(".") {
                    PathBuf::from(name)
                } else {
                    rel.join(name)
                });
            }
        } else if ft.is_file() {
            let file = std::fs::File::open(&full).map_err(at(&rel))?;
            // The size in the header is the one read, even if the file changed meanwhile.
            header.set_size(meta.len());
            tar.append_data(&mut header, &rel, file.take(meta.len()))
                .map_err(at(&rel))?;
            stats.files += 1;
            stats.input_bytes += meta.len();
        }
        // Sockets, FIFOs and devices do not occur in a fresh clone.
    }
    let encoder = tar.into_inner().map_err(at(dir))?;
    let mut counter = encoder.finish().map_err(at(dir))?;
    counter.flush().map_err(at(dir))?;
    stats.archive_bytes = counter.count;
    Ok(stats)
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

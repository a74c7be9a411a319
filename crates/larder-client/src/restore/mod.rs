//! Snapshot restore: a parallel download piped in order into zstd and tar extraction, into a
//! staging directory that replaces the target only when everything succeeded.
//!
//! Why staging: a CI job that restores a cache and then builds must never see half a tree, nor a
//! tree from a corrupt or tampered archive. The archive is extracted beside the target (same file
//! system, so the final step is a rename), the download's digest is verified, the file system is
//! synced (one `syncfs`, no per-file `fsync`; writeback is started early, see `writers::EarlySync`;
//! skipped with `--no-sync`), and only then is the staging directory renamed into place — with
//! `renameat2(RENAME_NOREPLACE)` so a target that appeared meanwhile is not silently replaced, or
//! with `RENAME_EXCHANGE` under `--force`, which swaps old and new in one step (there is no
//! instant without a target) before the old tree is deleted. A failure at any point removes the
//! staging directory; the target is untouched.
//!
//! Why stream: the archive is as big as the cache, and writing it to a temporary file first
//! would double the disk traffic and the time. The download engine hands over bytes in order
//! (see `download/`), a bounded channel carries them to the extraction thread, and the
//! extraction runs while later chunks are still arriving.
//!
//! Why so suspicious: an archive is input from whoever could write the key. Entries with an
//! absolute path or `..` are refused rather than rewritten (a renamed file is a silent
//! surprise); so are symlinks whose target leaves the tree (checked once on the name as written,
//! and again after extraction by resolving each link through the links actually created, since a
//! chain of individually harmless links can climb out), hard links to anything but a regular file
//! restored earlier, writes through a symlink, and device or FIFO entries. Ownership is not
//! restored and set-id bits are dropped. Directory modes and times are applied last, deepest
//! first, so read-only directories in the archive do not stop their own contents from being
//! written and mtimes are not disturbed by later entries. A path that appears more than once
//! (an archive appended to) ends as its last entry says, whatever the kinds, as with GNU tar:
//! a later entry replaces a file, a link or an empty directory, and a non-empty directory is
//! refused rather than deleted.
//!
//! Files: this one holds the API and the sink that feeds the extraction thread; `unpack.rs` the
//! checked tar extraction; `writers.rs` the threads that write small files and start writeback
//! early; `place.rs` the final flush and rename (shared with `larder git clone`).

mod place;
mod unpack;
mod writers;

use crate::download::Downloader;
use crate::output::Sink;
use crate::progress::Progress;
use crate::{DownloadSummary, Error, ObjectInfo, ObjectName};
use bytes::Bytes;
use place::{already_exists, exists, sync_tree};
pub(crate) use place::{place, remove_tree};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;
use unpack::{Stats, extract};

/// Options of [`Downloader::restore`](crate::Downloader::restore); the default refuses an existing
/// target, refuses symlinks that leave the tree, and runs no [`Prepare`] step.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Replace an existing target (file or directory); without it an existing target is an
    /// error and is left untouched.
    pub force: bool,
    /// Restore symlinks whatever they point at, as git does for a working tree (a link to
    /// `/etc/hosts` or `../sibling` is data there). Writing *through* a symlink stays refused,
    /// so no file ever lands outside the tree.
    pub symlinks_may_leave: bool,
    /// Runs on the complete, checked tree in its staging directory before it is flushed and
    /// placed; an error discards the tree and leaves the target untouched.
    pub prepare: Option<Prepare>,
}

/// A step run on the staging directory of a restore (see [`RestoreOptions::prepare`]).
#[derive(Clone)]
pub struct Prepare(pub Arc<PrepareFn>);

/// The function of a [`Prepare`]: given the staging directory.
pub type PrepareFn = dyn Fn(&Path) -> Result<(), Error> + Send + Sync;

impl std::fmt::Debug for Prepare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepare(..)")
    }
}

/// What a restore placed.
#[derive(Clone, Debug)]
pub struct RestoreSummary {
    /// How the archive was downloaded.
    pub download: DownloadSummary,
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Hard links created (to files of the archive already written).
    pub hardlinks: u64,
    /// Sum of the regular files' sizes.
    pub bytes: u64,
}

impl Downloader {
    /// Restores the snapshot `name` into the directory `target`.
    pub async fn restore(
        &self,
        name: &ObjectName,
        target: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreSummary, Error> {
        if target.file_name().is_none() {
            return Err(Error::InvalidInput(format!(
                "{} does not name a directory to restore into (give e.g. ./cache)",
                target.display()
            )));
        }
        // Refuse before the download, not after minutes of it.
        if !opts.force && exists(target) {
            return Err(already_exists(target));
        }
        let sink = RestoreSink {
            target: target.to_path_buf(),
            force: opts.force,
            symlinks_may_leave: opts.symlinks_may_leave,
            prepare: opts.prepare.clone(),
            sync: self.options().sync,
            progress: self.options().progress.clone(),
            run: None,
            stats: None,
        };
        let (download, sink) = self.download(name, sink).await?;
        let stats = sink.stats.clone().expect("finished");
        Ok(RestoreSummary {
            download,
            files: stats.files,
            dirs: stats.dirs,
            symlinks: stats.symlinks,
            hardlinks: stats.hardlinks,
            bytes: stats.bytes,
        })
    }
}

/// Chunks queued between the verifier and the extractor, on top of the download window.
const QUEUE: usize = 2;

struct RestoreSink {
    target: PathBuf,
    force: bool,
    symlinks_may_leave: bool,
    prepare: Option<Prepare>,
    /// Flush the tree before placing it (see `DownloadOptions::sync`).
    sync: bool,
    progress: Progress,
    run: Option<Extraction>,
    stats: Option<Stats>,
}

/// One attempt's extraction thread and its staging directory.
struct Extraction {
    staging: PathBuf,
    tx: Option<SyncSender<Bytes>>,
    thread: Option<JoinHandle<Result<Stats, Error>>>,
}

impl Extraction {
    /// Ends the input and waits for the thread's verdict.
    fn join(&mut self) -> Result<Stats, Error> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(Error::Protocol(
                    "internal error: the extraction thread panicked".into(),
                ))
            }),
            None => Err(Error::Protocol(
                "internal error: extraction already ended".into(),
            )),
        }
    }
}

impl Drop for Extraction {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = remove_tree(&self.staging);
    }
}

impl RestoreSink {
    fn parent(&self) -> PathBuf {
        match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

impl Sink for RestoreSink {
    fn begin(&mut self, _info: &ObjectInfo) -> Result<(), Error> {
        // A restart: whatever the previous attempt extracted goes (Extraction's Drop).
        self.run = None;
        if !self.force && exists(&self.target) {
            return Err(already_exists(&self.target));
        }
        let parent = self.parent();
        std::fs::create_dir_all(&parent)
            .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
        let name = self.target.file_name().expect("checked").to_string_lossy();
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".larder-restore")
            .tempdir_in(&parent)
            .map_err(|e| {
                Error::io(
                    format!("cannot create a staging directory in {}", parent.display()),
                    e,
                )
            })?
            .keep();
        let (tx, rx) = sync_channel::<Bytes>(QUEUE);
        let (root, progress, target, sync, symlinks_may_leave) = (
            staging.clone(),
            self.progress.clone(),
            self.target.clone(),
            self.sync,
            self.symlinks_may_leave,
        );
        let thread = std::thread::Builder::new()
            .name("larder-extract".into())
            .spawn(move || extract(rx, &root, &target, &progress, sync, symlinks_may_leave));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = remove_tree(&staging);
                return Err(Error::io("cannot start the extraction thread", e));
            }
        };
        self.run = Some(Extraction {
            staging,
            tx: Some(tx),
            thread: Some(thread),
        });
        Ok(())
    }

    fn ordered(&mut self, data: &Bytes) -> Result<(), Error> {
        let run = self.run.as_mut().expect("begun");
        let sent = run.tx.as_ref().map(|tx| tx.send(data.clone()));
        if let Some(Ok(())) = sent {
            return Ok(());
        }
        // The extractor stopped early: its verdict is the error to report.
        match run.join() {
            Err(e) => Err(e),
            Ok(_) => Err(Error::Protocol(format!(
                "the snapshot has data after the end of its archive; nothing was restored to {}",
                self.target.display()
            ))),
        }
    }

    fn finish(&mut self) -> Result<(), Error> {
        let mut run = self.run.take().expect("begun");
        let stats = run.join()?;
        if let Some(prepare) = &self.prepare {
            (prepare.0)(&run.staging)?;
        }
        if self.sync {
            self.progress.set_message("syncing");
            sync_tree(&run.staging)?;
        }
        self.progress.set_message("placing");
        place(&run.staging, &self.target, self.force, &self.progress)?;
        // Placed: the staging path now holds nothing of ours (or the old tree, already removed).
        run.staging = PathBuf::new();
        self.stats = Some(stats);
        Ok(())
    }

    fn failure_consequence(&self) -> String {
        format!("nothing was restored to {}", self.target.display())
    }

    fn phase(&self) -> &'static str {
        "restoring"
    }
}

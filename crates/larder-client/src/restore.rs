//! Snapshot restore: a parallel download piped in order into zstd and tar extraction, into a
//! staging directory that replaces the target only when everything succeeded.
//!
//! Why staging: a CI job that restores a cache and then builds must never see half a tree, nor a
//! tree from a corrupt or tampered archive. The archive is extracted beside the target (same file
//! system, so the final step is a rename), the download's digest is verified, the file system is
//! synced (one `syncfs`, no per-file `fsync`; writeback is started early, see [`EarlySync`];
//! skipped with `--no-sync`), and only then is the staging directory renamed into place — with
//! `renameat2(RENAME_NOREPLACE)` so a target that appeared meanwhile is not silently replaced, or
//! with `RENAME_EXCHANGE` under `--force`, which swaps old and new in one step (there is no
//! instant without a target) before the old tree is deleted. A failure at any point removes the
//! staging directory; the target is untouched.
//!
//! Why stream: the archive is as big as the cache, and writing it to a temporary file first
//! would double the disk traffic and the time. The download engine hands over bytes in order
//! (see `download.rs`), a bounded channel carries them to the extraction thread, and the
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

use crate::archive_path::{lexically_inside, relative};
use crate::download::Downloader;
use crate::output::Sink;
use crate::progress::Progress;
use crate::{DownloadSummary, Error, ObjectInfo, ObjectName};
use bytes::{Buf, Bytes};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, BufRead, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

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
    pub download: DownloadSummary,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
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

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

fn already_exists(target: &Path) -> Error {
    Error::InvalidInput(format!(
        "{} already exists; pass --force to replace it, or restore somewhere else",
        target.display()
    ))
}

#[derive(Clone, Debug, Default)]
struct Stats {
    files: u64,
    dirs: u64,
    symlinks: u64,
    hardlinks: u64,
    bytes: u64,
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

/// Reads the ordered download as a byte stream, without copying it.
struct ChannelReader {
    rx: Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                // The sender is gone: the end of the object (or an abort, which discards all).
                Err(_) => break,
            }
        }
        Ok(&self.cur[..])
    }

    fn consume(&mut self, n: usize) {
        self.cur.advance(n);
    }
}

/// The extraction thread: zstd → tar → checked entries under `root`.
fn extract(
    rx: Receiver<Bytes>,
    root: &Path,
    target: &Path,
    progress: &Progress,
    sync: bool,
    symlinks_may_leave: bool,
) -> Result<Stats, Error> {
    let input = ChannelReader {
        rx,
        cur: Bytes::new(),
    };
    let corrupt = |e: io::Error| {
        Error::Protocol(format!(
            "the snapshot is not a valid tar + zstd archive ({e}); nothing was restored to {}; \
             was it stored with `larder save`?",
            target.display()
        ))
    };
    let decoder = zstd::stream::read::Decoder::with_buffer(input).map_err(corrupt)?;
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let mut unpacker = Unpacker {
        root,
        target,
        dirs: Vec::new(),
        known_dirs: HashSet::new(),
        symlinks: Vec::new(),
        symlinks_may_leave,
        stats: Stats::default(),
        progress,
        writers: Writers::start(root, workers).map_err(|e| Error::io("cannot start writers", e))?,
    };
    // Without the final flush there is nothing to prepare for: writeback is the kernel's affair.
    let _early_sync = sync.then(|| EarlySync::start(root, EARLY_SYNC_EVERY));
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        unpacker.entry(&mut entry)?;
    }
    // Read to the end of the zstd stream, so corruption or junk after the tar end is noticed
    // and the whole object passes through the verifier before anything is placed.
    let mut decoder = archive.into_inner();
    io::copy(&mut decoder, &mut io::sink()).map_err(corrupt)?;
    unpacker.settle()?;
    if !unpacker.symlinks_may_leave {
        unpacker.check_symlinks()?;
    }
    unpacker.apply_dir_metadata()?;
    Ok(unpacker.stats)
}

struct Unpacker<'a> {
    root: &'a Path,
    target: &'a Path,
    /// Directory entries: relative path, mode, mtime; applied at the end.
    dirs: Vec<(PathBuf, u32, u64)>,
    /// Directories verified (or created) as real directories, to skip re-checking ancestors.
    known_dirs: HashSet<PathBuf>,
    symlinks: Vec<PathBuf>,
    /// See [`RestoreOptions::symlinks_may_leave`].
    symlinks_may_leave: bool,
    stats: Stats,
    progress: &'a Progress,
    writers: Writers,
}

impl Unpacker<'_> {
    fn refuse(&self, entry: &Path, why: impl std::fmt::Display) -> Error {
        Error::UnsafeArchive(format!(
            "refusing to restore the snapshot: entry {:?} {why}; nothing was restored to {}",
            entry.display().to_string(),
            self.target.display()
        ))
    }

    fn io(&self, entry: &Path, e: io::Error) -> Error {
        Error::io(
            format!(
                "cannot restore {:?} into {}",
                entry.display().to_string(),
                self.target.display()
            ),
            e,
        )
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), Error> {
        use tar::EntryType as T;
        let raw = entry
            .path()
            .map_err(|e| self.io(Path::new("?"), e))?
            .into_owned();
        let rel = relative(&raw).map_err(|why| self.refuse(&raw, why))?;
        let kind = entry.header().entry_type();
        self.no_symlink_on_the_way(&raw, &rel)?;
        let dest = self.root.join(&rel);
        match kind {
            T::Directory => {
                self.wait_for(&rel)?;
                if !rel.as_os_str().is_empty() {
                    match std::fs::symlink_metadata(&dest) {
                        Ok(m) if m.is_dir() => {}
                        // A link or file of the same name earlier in the archive: the later
                        // entry wins, as with tar.
                        Ok(_) => std::fs::remove_file(&dest).map_err(|e| self.io(&raw, e))?,
                        Err(_) => {}
                    }
                    std::fs::create_dir_all(&dest).map_err(|e| self.io(&raw, e))?;
                    self.note_dirs(&rel);
                }
                let header = entry.header();
                let mode = header.mode().map_err(|e| self.io(&raw, e))?;
                let mtime = header.mtime().map_err(|e| self.io(&raw, e))?;
                self.dirs.push((rel, mode, mtime));
                self.stats.dirs += 1;
            }
            T::Regular | T::Continuous if entry.size() <= SMALL_FILE => {
                // An earlier small file of this path needs no wait: the writers keep the
                // order of one path's writes (see `Writers::submit`).
                self.replace_dir(&raw, &rel)?;
                self.create_parent(&raw, &rel)?;
                let header = entry.header();
                let mode = header.mode().map_err(|e| self.io(&raw, e))?;
                let mtime = header.mtime().map_err(|e| self.io(&raw, e))?;
                let mut data = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut data).map_err(|e| self.io(&raw, e))?;
                let job = FileJob {
                    rel,
                    data,
                    mode,
                    mtime,
                };
                self.writers
                    .submit(job)
                    .map_err(|(rel, e)| self.io(&rel, e))?;
                self.stats.files += 1;
                self.stats.bytes += entry.size();
                if self.stats.files.is_multiple_of(512) {
                    self.progress
                        .set_message(format!("{} files", self.stats.files));
                }
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.wait_for(&rel)?;
                self.replace_dir(&raw, &rel)?;
                self.create_parent(&raw, &rel)?;
                entry.unpack(&dest).map_err(|e| self.io(&raw, e))?;
                self.stats.files += 1;
                self.stats.bytes += entry.size();
                if self.stats.files.is_multiple_of(512) {
                    self.progress
                        .set_message(format!("{} files", self.stats.files));
                }
            }
            T::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| self.io(&raw, e))?
                    .ok_or_else(|| self.refuse(&raw, "is a symlink without a target"))?
                    .into_owned();
                if !self.symlinks_may_leave
                    && let Err(why) = lexically_inside(&rel, &link)
                {
                    return Err(self.refuse(&raw, format_args!("is a symlink to {link:?}, {why}")));
                }
                self.wait_for(&rel)?;
                self.replace_dir(&raw, &rel)?;
                self.create_parent(&raw, &rel)?;
                entry.unpack(&dest).map_err(|e| self.io(&raw, e))?;
                self.symlinks.push(rel);
                self.stats.symlinks += 1;
            }
            T::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| self.io(&raw, e))?
                    .ok_or_else(|| self.refuse(&raw, "is a hard link without a target"))?
                    .into_owned();
                let src_rel = relative(&link).map_err(|why| {
                    self.refuse(
                        &raw,
                        format_args!("is a hard link to {link:?}, which {why}"),
                    )
                })?;
                self.no_symlink_on_the_way(&raw, &src_rel)?;
                self.wait_for(&src_rel)?;
                self.wait_for(&rel)?;
                let src = self.root.join(&src_rel);
                match std::fs::symlink_metadata(&src) {
                    Ok(m) if m.is_file() => {}
                    _ => {
                        return Err(self.refuse(
                            &raw,
                            format_args!(
                                "is a hard link to {link:?}, which is not a regular file restored \
                                 earlier"
                            ),
                        ));
                    }
                }
                self.replace_dir(&raw, &rel)?;
                self.create_parent(&raw, &rel)?;
                if let Ok(m) = std::fs::symlink_metadata(&dest)
                    && !m.is_dir()
                {
                    std::fs::remove_file(&dest).map_err(|e| self.io(&raw, e))?;
                }
                std::fs::hard_link(&src, &dest).map_err(|e| self.io(&raw, e))?;
                self.stats.hardlinks += 1;
            }
            // Metadata records; `entries()` already applied them to the entry that follows.
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
            other => {
                return Err(self.refuse(
                    &raw,
                    format_args!("has type {other:?}, which restore does not create"),
                ));
            }
        }
        Ok(())
    }

    /// A later entry that is not a directory replaces a directory of its path, as GNU tar does:
    /// an empty one is removed, a non-empty one refused (tar fails there too, and removing a
    /// whole subtree on the word of a later entry would be a surprise). What was known about
    /// the directory goes with it: its recorded mode and time, and the assurance that it and
    /// its subdirectories are real directories, so nothing is later written through whatever
    /// takes its place.
    fn replace_dir(&mut self, raw: &Path, rel: &Path) -> Result<(), Error> {
        if !self.known_dirs.contains(rel) {
            return Ok(());
        }
        // Pending writes inside it would fail or land in a removed directory.
        self.settle()?;
        match std::fs::remove_dir(self.root.join(rel)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                return Err(self.refuse(
                    raw,
                    "would replace a non-empty directory of the same name restored earlier",
                ));
            }
            Err(e) => return Err(self.io(raw, e)),
        }
        self.known_dirs.retain(|d| !d.starts_with(rel));
        self.dirs.retain(|(d, _, _)| !d.starts_with(rel));
        Ok(())
    }

    /// Records `rel` and every ancestor as real directories (`create_dir_all` made them all), so
    /// that `replace_dir` knows every directory restored.
    fn note_dirs(&mut self, rel: &Path) {
        let mut dir = Some(rel);
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if !self.known_dirs.insert(d.to_path_buf()) {
                break;
            }
            dir = d.parent();
        }
    }

    /// Entries after a small file at the same path must not overtake its pending write.
    fn wait_for(&mut self, rel: &Path) -> Result<(), Error> {
        self.writers
            .wait_for(rel)
            .map_err(|(rel, e)| self.io(&rel, e))
    }

    /// Waits for every pending file write.
    fn settle(&mut self) -> Result<(), Error> {
        self.writers.settle().map_err(|(rel, e)| self.io(&rel, e))
    }

    /// Refuses an entry whose existing ancestors include a symlink: writing through it would
    /// land wherever the link points.
    fn no_symlink_on_the_way(&mut self, raw: &Path, rel: &Path) -> Result<(), Error> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut prefix = PathBuf::new();
        for c in parent.components() {
            prefix.push(c);
            if self.known_dirs.contains(&prefix) {
                continue;
            }
            match std::fs::symlink_metadata(self.root.join(&prefix)) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.refuse(
                        raw,
                        format_args!("would be written through the symlink {:?}", prefix),
                    ));
                }
                Ok(m) if m.is_dir() => {
                    self.known_dirs.insert(prefix.clone());
                }
                // A file in the way fails the write itself; a missing one is created.
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn create_parent(&mut self, raw: &Path, rel: &Path) -> Result<(), Error> {
        match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() && !self.known_dirs.contains(p) => {
                // A small file still being written where a directory is wanted: fail the same
                // way whichever comes first.
                for ancestor in p.ancestors() {
                    self.wait_for(ancestor)?;
                }
                std::fs::create_dir_all(self.root.join(p)).map_err(|e| self.io(raw, e))?;
                self.note_dirs(p);
                Ok(())
            }
            Some(_) => Ok(()),
            None => Err(self.refuse(raw, "names the top directory but is not a directory")),
        }
    }

    /// Resolves every symlink through the links actually created; one that leaves the tree is
    /// refused even if its own text looked harmless.
    fn check_symlinks(&self) -> Result<(), Error> {
        for rel in &self.symlinks {
            let path = self.root.join(rel);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {}
                // Replaced by a later entry.
                _ => continue,
            }
            if let Err(why) = resolves_inside(self.root, rel) {
                return Err(self.refuse(rel, why));
            }
        }
        Ok(())
    }

    /// Modes and mtimes of directories, deepest first, once nothing more is written into them.
    fn apply_dir_metadata(&mut self) -> Result<(), Error> {
        self.dirs
            .sort_by_key(|(rel, _, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, mode, mtime) in &self.dirs {
            let path = self.root.join(rel);
            let time = filetime::FileTime::from_unix_time(*mtime as i64, 0);
            filetime::set_file_times(&path, time, time).map_err(|e| self.io(rel, e))?;
            // Sticky and set-group-id matter for directories; set-user-id does not.
            let perm = std::fs::Permissions::from_mode(mode & 0o3777);
            std::fs::set_permissions(&path, perm).map_err(|e| self.io(rel, e))?;
        }
        Ok(())
    }
}

/// Files up to this size are read into memory and written by the worker threads.
const SMALL_FILE: u64 = 256 << 10;
/// File data queued for the workers at most: enough for the tar thread to run ahead of them,
/// small next to the download window, so that the client stays within its memory bound of
/// 2 × concurrency × chunk + 64 MiB (32 MiB here measured 191 of the 192 MiB allowed).
const QUEUED_BYTES: usize = 8 << 20;
/// Files queued at most, whatever their size (empty files cost an inode each, not bytes).
const QUEUED_FILES: usize = 2048;
/// Consecutive files of one directory handed to one worker before the next worker's turn.
const RUN: usize = 512;

/// One small file to write.
struct FileJob {
    rel: PathBuf,
    data: Vec<u8>,
    mode: u32,
    mtime: u64,
}

/// Writes small files on several threads. Restoring 100,000 files is dominated by the file
/// system's per-inode work (allocate, link into the directory, write, set times), which one
/// thread cannot overlap with decompression and parsing and which a second core does in
/// parallel. Files are dealt to the workers by runs in archive order: each directory's run of
/// files (at most [`RUN`] of them) goes to the next worker, so that workers mostly create files
/// in different directories (creation takes the directory's lock) and none waits while another
/// works through a long directory. The queue is shared and deep ([`QUEUED_FILES`],
/// [`QUEUED_BYTES`]), so the tar thread runs several directories ahead of the workers: hashing
/// directories to workers behind a short per-worker queue, done before, blocked the tar thread
/// on one worker while the other sat idle. A small file whose path already has a write queued
/// goes to that write's worker, behind it, so duplicate entries keep archive order (the later
/// wins, as in tar) without a wait. The tar thread still does everything that orders or checks
/// (directories, links, refusals); it waits for a pending write when a later entry of another
/// kind touches the same path, and for all of them before links and the final checks.
struct Writers {
    queues: Vec<std::sync::mpsc::Sender<FileJob>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<WritersShared>,
    /// Paths with a write queued since the writers were last idle, and the worker each went to.
    pending: HashMap<PathBuf, usize>,
    /// The directory of the last file dealt, and how many of its files in a row went to the
    /// current worker.
    last_dir: PathBuf,
    dealt: usize,
    next: usize,
}

#[derive(Default)]
struct Queued {
    files: usize,
    bytes: usize,
    /// The tar thread waits for room or for idleness: only then are completions worth a wake-up.
    waiting: bool,
}

struct WritersShared {
    queued: Mutex<Queued>,
    changed: Condvar,
    failed: Mutex<Option<(PathBuf, io::Error)>>,
    abort: AtomicBool,
    /// The staging directory, opened once: files are created relative to it (`openat`) instead
    /// of resolving its full path again for each of them.
    root: std::fs::File,
    /// Permission bits the process umask removes from a new file; when a file's mode has none of
    /// them, creating it with that mode is enough and the `fchmod` is saved.
    umask: u32,
}

type WriteError = (PathBuf, io::Error);

impl WritersShared {
    /// Blocks until the queue is in a state `ready` accepts, and returns it locked.
    fn wait_until(&self, ready: impl Fn(&Queued) -> bool) -> std::sync::MutexGuard<'_, Queued> {
        let mut q = lock(&self.queued);
        while !ready(&q) {
            q.waiting = true;
            q = self.changed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        q
    }
}

impl Writers {
    fn start(root: &Path, n: usize) -> io::Result<Writers> {
        let shared = Arc::new(WritersShared {
            queued: Mutex::new(Queued::default()),
            changed: Condvar::new(),
            failed: Mutex::new(None),
            abort: AtomicBool::new(false),
            root: std::fs::File::open(root)?,
            umask: current_umask(),
        });
        let mut queues = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::channel::<FileJob>();
            let shared = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name(format!("larder-files-{i}"))
                .spawn(move || {
                    for job in rx {
                        if !shared.abort.load(Ordering::Relaxed)
                            && let Err(e) = write_file(&shared, &job)
                        {
                            shared.abort.store(true, Ordering::Relaxed);
                            lock(&shared.failed).get_or_insert((job.rel.clone(), e));
                        }
                        let mut q = lock(&shared.queued);
                        q.files -= 1;
                        q.bytes -= job.data.len();
                        if q.waiting {
                            q.waiting = false;
                            shared.changed.notify_all();
                        }
                    }
                })?;
            queues.push(tx);
            threads.push(thread);
        }
        Ok(Writers {
            queues,
            threads,
            shared,
            pending: HashMap::new(),
            last_dir: PathBuf::new(),
            dealt: 0,
            next: 0,
        })
    }

    fn submit(&mut self, job: FileJob) -> Result<(), WriteError> {
        self.check()?;
        {
            let len = job.data.len();
            let mut q = self.shared.wait_until(|q| {
                q.files == 0 || (q.files < QUEUED_FILES && q.bytes + len <= QUEUED_BYTES)
            });
            if q.files == 0 {
                self.pending.clear();
            }
            q.files += 1;
            q.bytes += job.data.len();
        }
        // A path written again while its earlier write is queued goes to the same worker,
        // behind it: each worker writes in queue order, so the later entry wins, as in tar, and
        // two workers never race to create one name.
        let worker = match self.pending.get(&job.rel) {
            Some(&w) => w,
            None => {
                let dir = job.rel.parent().unwrap_or(Path::new(""));
                if dir != self.last_dir || self.dealt == RUN {
                    self.last_dir = dir.to_path_buf();
                    self.dealt = 0;
                    self.next = (self.next + 1) % self.queues.len();
                }
                self.dealt += 1;
                self.pending.insert(job.rel.clone(), self.next);
                self.next
            }
        };
        if self.queues[worker].send(job).is_err() {
            // A worker thread is gone (it panicked): report rather than hang in `settle`.
            return Err((
                PathBuf::new(),
                io::Error::other("a file writer thread stopped"),
            ));
        }
        Ok(())
    }

    fn check(&self) -> Result<(), WriteError> {
        match lock(&self.shared.failed).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn wait_for(&mut self, rel: &Path) -> Result<(), WriteError> {
        if self.pending.contains_key(rel) {
            self.settle()?;
        }
        Ok(())
    }

    fn settle(&mut self) -> Result<(), WriteError> {
        drop(self.shared.wait_until(|q| q.files == 0));
        self.pending.clear();
        self.check()
    }
}

impl Drop for Writers {
    /// No write may outlive the extraction: the staging directory is removed right after.
    fn drop(&mut self) {
        self.shared.abort.store(true, Ordering::Relaxed);
        self.queues.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How often the file system is flushed while a restore is still creating files.
const EARLY_SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Flushes the staging file system every [`EARLY_SYNC_EVERY`] while files are still being
/// created, so that the kernel's writeback (allocating blocks for 100,000 small files and
/// writing them out, a second or more of a flusher thread's time on this kind of machine)
/// overlaps the extraction instead of following it in the final `syncfs`, which then finds
/// little left to do. Measured on a 100,000-file restore on a busy 2-core machine: the final
/// `syncfs` went from 1.1–2.1 s to 0.01–0.3 s, the whole restore from 7.8–8.0 s to 5.1–5.3 s.
/// The final `syncfs` stays: durability before the rename is what it promises.
struct EarlySync {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl EarlySync {
    fn start(root: &Path, every: std::time::Duration) -> EarlySync {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let dir = std::fs::File::open(root).ok();
        let thread = std::thread::Builder::new()
            .name("larder-sync".into())
            .spawn(move || {
                use std::os::fd::AsRawFd;
                let Some(dir) = dir else { return };
                let (m, cv) = &*flag;
                let mut stopped = lock(m);
                loop {
                    let (g, _) = cv
                        .wait_timeout(stopped, every)
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = g;
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    // SAFETY: plain syscall on a descriptor this thread owns.
                    unsafe { libc::syncfs(dir.as_raw_fd()) };
                    stopped = lock(m);
                }
            })
            .ok();
        EarlySync { stop, thread }
    }
}

impl Drop for EarlySync {
    fn drop(&mut self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The process umask, read by setting it and putting it back at once (the only portable way).
fn current_umask() -> u32 {
    // SAFETY: umask cannot fail; the original value is restored immediately.
    unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old as u32
    }
}

/// What tar's own unpacking does for a regular file: a new inode (an existing file or link of
/// that name is replaced, never written through), the data, the mtime, the permission bits.
/// Four system calls in the common case: create (with its mode), write, set times, close.
fn write_file(shared: &WritersShared, job: &FileJob) -> io::Result<()> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    let path = CString::new(job.rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mode = job.mode & 0o777;
    let open = || {
        // SAFETY: `path` is a valid NUL-terminated string and the directory fd is open for as
        // long as `shared` lives.
        let fd = unsafe {
            libc::openat(
                shared.root.as_raw_fd(),
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                mode as libc::c_uint,
            )
        };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: a fresh descriptor that nothing else owns.
            Ok(unsafe { std::fs::File::from_raw_fd(fd) })
        }
    };
    let mut f = match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // SAFETY: as above; unlinks the name only, never follows it.
            if unsafe { libc::unlinkat(shared.root.as_raw_fd(), path.as_ptr(), 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            open()?
        }
        other => other?,
    };
    if !job.data.is_empty() {
        f.write_all(&job.data)?;
    }
    let time = filetime::FileTime::from_unix_time(job.mtime as i64, 0);
    filetime::set_file_handle_times(&f, Some(time), Some(time))?;
    if mode & shared.umask != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows the symlink at `rel` (and every link met on the way) within `root`, failing if the
/// walk ever climbs above it. A component that does not exist ends the walk: nothing can be
/// created there any more once extraction is over, so the rest is judged by its text.
fn resolves_inside(root: &Path, rel: &Path) -> Result<(), String> {
    const MAX_HOPS: u32 = 40;
    let outside = || "is a symlink that, through other links, resolves outside the restored tree";
    let mut at: Vec<OsString> = rel
        .parent()
        .map(|p| p.iter().map(OsStr::to_os_string).collect())
        .unwrap_or_default();
    let mut queue: VecDeque<OsString> = VecDeque::new();
    let prepend = |queue: &mut VecDeque<OsString>, link: &Path| {
        if link.has_root() {
            return Err(format!(
                "is a symlink that resolves to the absolute path {link:?}"
            ));
        }
        for c in link.components().rev() {
            queue.push_front(c.as_os_str().to_os_string());
        }
        Ok(())
    };
    let first = std::fs::read_link(root.join(rel)).map_err(|e| e.to_string())?;
    prepend(&mut queue, &first)?;
    let mut hops = 0u32;
    while let Some(c) = queue.pop_front() {
        if c == "." {
            continue;
        }
        if c == ".." {
            at.pop().ok_or_else(|| outside().to_string())?;
            continue;
        }
        at.push(c);
        let path = root.join(at.iter().collect::<PathBuf>());
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err("is a symlink in a loop".into());
                }
                let next = std::fs::read_link(&path).map_err(|e| e.to_string())?;
                at.pop();
                prepend(&mut queue, &next)?;
            }
            Ok(_) => {}
            Err(_) => {
                let mut depth = at.len();
                for c in &queue {
                    if c == ".." {
                        depth = depth.checked_sub(1).ok_or_else(|| outside().to_string())?;
                    } else if c != "." {
                        depth += 1;
                    }
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Moves the staging directory to `target`; see the module comment for the rename flavours.
pub(crate) fn place(
    staging: &Path,
    target: &Path,
    force: bool,
    progress: &Progress,
) -> Result<(), Error> {
    let rename_err = |e: io::Error| {
        Error::io(
            format!("cannot move the restored tree to {}", target.display()),
            e,
        )
    };
    if force && exists(target) {
        match renameat2(staging, target, libc::RENAME_EXCHANGE) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                // No atomic swap here (an old kernel or an exotic file system): move the old
                // target aside first; a crash in between leaves it under the staging name.
                let aside = staging.with_extension("larder-old");
                std::fs::rename(target, &aside).map_err(rename_err)?;
                if let Err(e) = std::fs::rename(staging, target) {
                    let _ = std::fs::rename(&aside, target);
                    return Err(rename_err(e));
                }
                std::fs::rename(&aside, staging).map_err(rename_err)?;
            }
            Err(e) => return Err(rename_err(e)),
        }
        // The old tree now sits at the staging path.
        if let Err(e) = remove_tree(staging) {
            progress.note(&format!(
                "restored {}, but could not remove the old tree now at {}: {e}",
                target.display(),
                staging.display()
            ));
        }
        return Ok(());
    }
    match renameat2(staging, target, libc::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = remove_tree(staging);
            Err(Error::InvalidInput(format!(
                "{} appeared while the snapshot was being restored; nothing was placed; pass \
                 --force to replace it",
                target.display()
            )))
        }
        Err(e) if unsupported(&e) => {
            if exists(target) {
                let _ = remove_tree(staging);
                return Err(already_exists(target));
            }
            std::fs::rename(staging, target).map_err(rename_err)
        }
        Err(e) => {
            let _ = remove_tree(staging);
            Err(rename_err(e))
        }
    }
}

/// Durable before visible, as for `larder get -o`: otherwise a crash soon after the rename could
/// leave the target with files whose data never reached the disk. One `syncfs` flushes the
/// whole tree (and anything else dirty on that file system) far faster than an fsync per file.
fn sync_tree(staging: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(staging)
        .map_err(|e| Error::io(format!("cannot open {}", staging.display()), e))?;
    // SAFETY: plain syscall on a file descriptor this function owns.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(Error::io(
            "cannot flush the restored files to disk",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Deletes a file or tree, first making read-only directories writable (which `remove_dir_all`
/// needs when not running as root). Symlinks are removed, never followed.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    if path.as_os_str().is_empty() {
        return Ok(());
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

fn make_writable(dir: &Path) {
    if let Ok(m) = std::fs::symlink_metadata(dir)
        && m.is_dir()
    {
        let mode = m.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
        }
        if let Ok(children) = std::fs::read_dir(dir) {
            for child in children.flatten() {
                make_writable(&child.path());
            }
        }
    }
}

//! The extraction thread of a restore: zstd → tar → entries checked one by one (see the module
//! comment of `restore`) and written under the staging directory.

use super::writers::{EARLY_SYNC_EVERY, EarlySync, FileJob, SMALL_FILE, Writers};
use crate::Error;
use crate::archive_path::{lexically_inside, relative};
use crate::progress::Progress;
use bytes::{Buf, Bytes};
use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

/// The extraction thread: zstd → tar → checked entries under `root`.
pub(super) fn extract(
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

#[derive(Clone, Debug, Default)]
pub(super) struct Stats {
    pub(super) files: u64,
    pub(super) dirs: u64,
    pub(super) symlinks: u64,
    pub(super) hardlinks: u64,
    pub(super) bytes: u64,
}

/// Reads the ordered download as a byte stream, without copying it.
pub(super) struct ChannelReader {
    pub(super) rx: Receiver<Bytes>,
    pub(super) cur: Bytes,
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

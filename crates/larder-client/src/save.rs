//! Snapshot save: a directory tree becomes one tar + zstd object, streamed straight into a PUT.
//!
//! CI caches (dependency trees, build outputs) are many small files, which one archive object
//! moves far faster than thousands of requests, and restoring them must reproduce what a build
//! depends on: file modes, symlinks (as links, never followed), modification times (build tools
//! compare them) and empty directories. tar carries all of that; zstd's multi-threaded encoder
//! keeps compression off the critical path on multi-core machines.
//!
//! Nothing touches the disk on the way: a blocking thread walks the tree and writes tar into the
//! zstd encoder, whose output goes in 1 MiB pieces over a small bounded channel into the body of
//! the upload, so memory stays bounded and a slow network slows the archiver instead of filling
//! RAM. If anything fails mid-way (an unreadable file), the body stream ends with an error, the
//! upload is aborted and the server stores nothing (docs/ARCHITECTURE.md, invariant 5); the previous snapshot
//! under the key stays intact. The upload's digest is checked against the server's ETag as for any
//! `put`.
//!
//! The tree is listed before archiving: it gives the progress bar a total (so the ETA means
//! something) and makes the archive deterministic (sorted names), so unchanged trees produce
//! unchanged ETags.

use crate::progress::Progress;
use crate::{Client, Error, ObjectName, PutOptions, PutResult};
use bytes::Bytes;
use globset::{GlobSet, GlobSetBuilder};
use larder_git::pieces::{PIECE, PieceWriter};
use larder_proto::units::format_size;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// How to save a snapshot.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Paths inside the directory to include; empty means the whole directory.
    pub paths: Vec<PathBuf>,
    /// Globs of paths to leave out. Without a `/` a pattern matches a name at any depth
    /// (`*.o`, `node_modules`); with one it matches the path from the directory's top
    /// (`build/tmp/**`). A trailing `/` matches directories only.
    pub exclude: Vec<String>,
    /// zstd level (1–19); 3 is zstd's default and a good speed/size trade for CI caches.
    pub level: i32,
    /// zstd worker threads; 0 means one per CPU.
    pub threads: u32,
    /// How to store the archive (precondition, TTL).
    pub put: PutOptions,
    /// Phases "scanning" and "saving".
    pub progress: Progress,
}

impl Default for SaveOptions {
    fn default() -> SaveOptions {
        SaveOptions {
            paths: Vec::new(),
            exclude: Vec::new(),
            level: 3,
            threads: 0,
            put: PutOptions::default(),
            progress: Progress::hidden(),
        }
    }
}

/// What a save stored.
#[derive(Clone, Debug)]
pub struct SaveSummary {
    /// What the server stored: the archive's ETag and size.
    pub put: PutResult,
    /// Regular files archived.
    pub files: u64,
    /// Directories archived.
    pub dirs: u64,
    /// Symbolic links archived.
    pub symlinks: u64,
    /// Sockets, FIFOs and devices, which a cache has no use for.
    pub skipped: u64,
    /// Sum of the regular files' sizes (the archive's size is `put.size`).
    pub input_bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

struct Entry {
    /// Path inside the archive, `.` for the directory itself.
    rel: PathBuf,
    kind: Kind,
    size: u64,
}

/// Pieces of the archive queued for the uploader: a few MiB.
const QUEUE: usize = 8;

impl Client {
    /// Archives `dir` (or `opts.paths` inside it) and stores it as `name`.
    pub async fn save(
        &self,
        name: &ObjectName,
        dir: &Path,
        opts: &SaveOptions,
    ) -> Result<SaveSummary, Error> {
        let meta = std::fs::metadata(dir)
            .map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(Error::InvalidInput(format!(
                "{} is not a directory; `larder save` archives a directory (use `larder put` for \
                 a single file)",
                dir.display()
            )));
        }
        let excludes = Excludes::new(&opts.exclude)?;
        let roots = roots(&opts.paths)?;
        let progress = opts.progress.clone();

        progress.count_phase("scanning");
        let (root, scan_progress) = (dir.to_path_buf(), progress.clone());
        let scanned =
            tokio::task::spawn_blocking(move || scan(&root, &roots, &excludes, &scan_progress))
                .await
                .expect("the scan panicked")?;
        let input_bytes: u64 = scanned.entries.iter().map(|e| e.size).sum();
        if scanned.skipped > 0 {
            progress.note(&format!(
                "skipped {} socket(s), FIFO(s) or device(s), which cannot be cached",
                scanned.skipped
            ));
        }

        progress.bytes_phase("saving", Some(input_bytes));
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let archiver = {
            let (dir, archive_tx) = (dir.to_path_buf(), tx.clone());
            let (level, threads, progress) = (opts.level, opts.threads, progress.clone());
            let entries = scanned.entries;
            let counts = (
                entries.iter().filter(|e| e.kind == Kind::File).count() as u64,
                entries.iter().filter(|e| e.kind == Kind::Dir).count() as u64,
                entries.iter().filter(|e| e.kind == Kind::Symlink).count() as u64,
            );
            let handle = tokio::task::spawn_blocking(move || {
                let out = PieceWriter::new(
                    archive_tx.clone(),
                    "the upload stopped before the archive was complete",
                );
                let result = archive(&dir, &entries, out, level, threads, &progress);
                if let Err((_, e)) = &result {
                    // Ends the upload with an error, so the server stores nothing.
                    let _ = archive_tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
                }
                result
            });
            drop(tx);
            (handle, counts)
        };
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut put_opts = opts.put.clone();
        // The bar counts input bytes (their total is known); the upload is shown as a message.
        put_opts.progress = Progress::hidden();
        let uploaded = self
            .put_stream(name, body, None, "the archive", &put_opts)
            .await;
        let (handle, (files, dirs, symlinks)) = archiver;
        let archived = handle.await.expect("the archiver panicked");
        progress.finish();
        let put = match (archived, uploaded) {
            (Ok(()), uploaded) => uploaded?,
            // The upload ended first (refused, connection lost) and the archiver only noticed
            // that nobody was reading any more: the upload's error is the one that explains.
            (Err((_, e)), Err(up)) if e.kind() == io::ErrorKind::BrokenPipe => return Err(up),
            (Err((path, e)), _) => {
                return Err(Error::io(
                    format!(
                        "cannot archive {}, so nothing was stored",
                        dir.join(path).display()
                    ),
                    e,
                ));
            }
        };
        Ok(SaveSummary {
            put,
            files,
            dirs,
            symlinks,
            skipped: scanned.skipped,
            input_bytes,
        })
    }
}

/// Which PATH arguments to walk, checked to stay inside the directory.
fn roots(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    if paths.is_empty() {
        return Ok(vec![PathBuf::from(".")]);
    }
    let mut out = Vec::new();
    for p in paths {
        let mut clean = PathBuf::new();
        for c in p.components() {
            match c {
                Component::Normal(n) => clean.push(n),
                Component::CurDir => {}
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "{}: paths to save must be relative to the directory and stay inside it",
                        p.display()
                    )));
                }
            }
        }
        out.push(if clean.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            clean
        });
    }
    Ok(out)
}

/// The `--exclude` patterns, compiled once.
struct Excludes {
    any: GlobSet,
    dirs_only: GlobSet,
}

impl Excludes {
    fn new(patterns: &[String]) -> Result<Excludes, Error> {
        let mut any = GlobSetBuilder::new();
        let mut dirs_only = GlobSetBuilder::new();
        for raw in patterns {
            let (pattern, dir_only) = match raw.strip_suffix('/') {
                Some(p) => (p, true),
                None => (raw.as_str(), false),
            };
            let pattern = pattern.trim_start_matches("./");
            let full = if pattern.contains('/') {
                pattern.trim_start_matches('/').to_string()
            } else {
                format!("**/{pattern}")
            };
            let glob = globset::GlobBuilder::new(&full)
                .literal_separator(true)
                .build()
                .map_err(|e| {
                    Error::InvalidInput(format!("invalid --exclude pattern {raw:?}: {e}"))
                })?;
            if dir_only {
                dirs_only.add(glob);
            } else {
                any.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build()
                .map_err(|e| Error::InvalidInput(format!("invalid --exclude pattern: {e}")))
        };
        Ok(Excludes {
            any: build(any)?,
            dirs_only: build(dirs_only)?,
        })
    }

    fn excluded(&self, rel: &Path, is_dir: bool) -> bool {
        self.any.is_match(rel) || (is_dir && self.dirs_only.is_match(rel))
    }
}

struct Scanned {
    entries: Vec<Entry>,
    skipped: u64,
}

/// Lists the tree depth-first in name order, leaving out excluded paths and their contents.
fn scan(
    dir: &Path,
    roots: &[PathBuf],
    excludes: &Excludes,
    progress: &Progress,
) -> Result<Scanned, Error> {
    let mut out = Scanned {
        entries: Vec::new(),
        skipped: 0,
    };
    for root in roots {
        let full = dir.join(root);
        let meta = std::fs::symlink_metadata(&full)
            .map_err(|e| Error::io(format!("cannot read {}", full.display()), e))?;
        visit(dir, root.clone(), meta, excludes, &mut out, progress)?;
    }
    Ok(out)
}

fn visit(
    dir: &Path,
    rel: PathBuf,
    meta: std::fs::Metadata,
    excludes: &Excludes,
    out: &mut Scanned,
    progress: &Progress,
) -> Result<(), Error> {
    let ft = meta.file_type();
    let is_root = rel == Path::new(".");
    if !is_root && excludes.excluded(&rel, ft.is_dir()) {
        return Ok(());
    }
    progress.inc(1);
    if ft.is_symlink() {
        out.entries.push(Entry {
            rel,
            kind: Kind::Symlink,
            size: 0,
        });
    } else if ft.is_file() {
        out.entries.push(Entry {
            rel,
            kind: Kind::File,
            size: meta.len(),
        });
    } else if ft.is_dir() {
        let full = dir.join(&rel);
        let read = |e| Error::io(format!("cannot list {}", full.display()), e);
        let mut children: Vec<_> = std::fs::read_dir(&full)
            .map_err(read)?
            .collect::<Result<_, _>>()
            .map_err(read)?;
        children.sort_by_key(|c| c.file_name());
        out.entries.push(Entry {
            rel: rel.clone(),
            kind: Kind::Dir,
            size: 0,
        });
        for child in children {
            let child_rel = if is_root {
                PathBuf::from(child.file_name())
            } else {
                rel.join(child.file_name())
            };
            let meta = std::fs::symlink_metadata(child.path())
                .map_err(|e| Error::io(format!("cannot read {}", child.path().display()), e))?;
            visit(dir, child_rel, meta, excludes, out, progress)?;
        }
    } else {
        out.skipped += 1;
    }
    Ok(())
}

/// Writes the tar + zstd stream of `entries` into `out`. On failure, says which path.
fn archive(
    dir: &Path,
    entries: &[Entry],
    out: PieceWriter,
    level: i32,
    threads: u32,
    progress: &Progress,
) -> Result<(), (PathBuf, io::Error)> {
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e: io::Error| (p, e)
    };
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        threads
    };
    let sent = out.sent();
    let mut encoder = zstd::stream::write::Encoder::new(out, level).map_err(at(dir))?;
    // zstd's worker pool compresses while this thread reads files and writes tar.
    encoder.multithread(threads).map_err(at(dir))?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    let mut shown = 0u64;
    for entry in entries {
        let full = dir.join(&entry.rel);
        tar.append_path_with_name(&full, &entry.rel)
            .map_err(at(&entry.rel))?;
        progress.inc(entry.size);
        let now = sent.load(Ordering::Relaxed);
        if now - shown >= PIECE as u64 {
            shown = now;
            progress.set_message(format!("{} compressed", format_size(now)));
        }
    }
    let encoder = tar.into_inner().map_err(at(dir))?;
    let mut out = encoder.finish().map_err(at(dir))?;
    out.flush().map_err(at(dir))?;
    Ok(())
}

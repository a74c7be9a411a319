//! The start-up scan: every revision file under `objects/` is examined once, in the background
//! while larderd already serves, and either indexed or (expired, unreadable, superseded) removed.

use super::*;

impl Inner {
    pub(super) fn load_index(&self) -> Result<(), TierError> {
        let started = std::time::Instant::now();
        let scanned = scan(&self.objects)?;
        let removed = self.remove_scanned(&scanned.doomed);
        let added = self.index_scanned(&scanned.found);
        let (objects, bytes) = {
            let index = self.index.lock().unwrap();
            (index.len(), index.total_bytes)
        };
        tracing::info!(
            dir = %self.config.dir.display(),
            objects,
            bytes,
            scanned = added,
            removed_orphans = removed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "disk tier index loaded"
        );
        self.evict_over_limit(None);
        self.loaded.send_replace(true);
        Ok(())
    }

    /// Removes what the scan found wanting, each file only if its path still names it: the
    /// scan ran without the index lock, and a commit may have renamed a new revision onto the
    /// path since.
    pub(super) fn remove_scanned(&self, doomed: &[(PathBuf, FileId)]) -> usize {
        doomed
            .iter()
            .filter(|(path, file)| {
                let index = self.index.lock().unwrap();
                self.unlink_if_same(&index, path, *file)
            })
            .count()
    }

    /// Indexes what the scan found, unless a commit indexed the key since, or the path no
    /// longer names the file the scan read (an entry must name the file its path holds).
    pub(super) fn index_scanned(&self, found: &[(EntryId, Entry)]) -> usize {
        let mut added = 0;
        for batch in found.chunks(1024) {
            let mut index = self.index.lock().unwrap();
            for (id, entry) in batch {
                if index.get(id).is_none() && names(&self.path_of(&id.0, &id.1), entry.file) {
                    index.insert(id.clone(), entry.clone());
                    added += 1;
                }
            }
        }
        added
    }
}

/// What the start-up scan found: complete, unexpired revisions to index (oldest commit first),
/// and every other file with the file that was examined at its path, to be removed only if the
/// path still names it.
#[derive(Default)]
pub(super) struct Scanned {
    pub(super) found: Vec<(EntryId, Entry)>,
    pub(super) doomed: Vec<(PathBuf, FileId)>,
}

/// What one scanning thread found, with each revision's mtime for the LRU order.
pub(super) type ScanResult = (Vec<(EntryId, Entry, SystemTime)>, Vec<(PathBuf, FileId)>);

/// Reads the object tree: which files are complete, unexpired revisions and which are not. It
/// removes nothing itself (see `Inner::remove_scanned`). Directories are scanned on all cores:
/// start-up time is what an operator waits for.
pub(super) fn scan(objects: &Path) -> Result<Scanned, TierError> {
    let mut dirs = Vec::new();
    for ns_entry in fs::read_dir(objects).map_err(|e| TierError::io("scan objects", &e))? {
        let ns_entry = ns_entry.map_err(|e| TierError::io("scan objects", &e))?;
        let ns_name = ns_entry.file_name().to_string_lossy().into_owned();
        if Namespace::parse(&ns_name).is_err() {
            tracing::warn!(path = %ns_entry.path().display(), "ignoring unexpected entry in object tree");
            continue;
        }
        let ns: Arc<str> = Arc::from(ns_name.as_str());
        for sub in fs::read_dir(ns_entry.path()).map_err(|e| TierError::io("scan objects", &e))? {
            let sub = sub.map_err(|e| TierError::io("scan objects", &e))?;
            dirs.push((ns.clone(), sub.path()));
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    let now = now_ms();
    let chunks: Vec<_> = dirs.chunks(dirs.len().div_ceil(threads).max(1)).collect();
    let results: Vec<ScanResult> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| s.spawn(move || scan_dirs(chunk, now)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut found = Vec::new();
    let mut doomed = Vec::new();
    for (entries, d) in results {
        found.extend(entries);
        doomed.extend(d);
    }
    // Last access is not persisted; commit time is the best estimate of recency after a restart.
    found.sort_by_key(|(_, _, mtime)| *mtime);
    Ok(Scanned {
        found: found
            .into_iter()
            .map(|(id, entry, _)| (id, entry))
            .collect(),
        doomed,
    })
}

pub(super) fn scan_dirs(dirs: &[(Arc<str>, PathBuf)], now_ms: u64) -> ScanResult {
    let mut found = Vec::new();
    let mut doomed = Vec::new();
    let mut buf = [0u8; format::FIXED_LEN];
    for (ns, dir) in dirs {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for entry in rd.flatten() {
            let path = entry.path();
            let hash = parse_hex32(&entry.file_name().to_string_lossy());
            // The tier never makes symlinks; one is not a revision (and not followed).
            let file = hash.and_then(|_| {
                File::options()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .ok()
            });
            let md = match &file {
                Some(f) => f.metadata(),
                None => fs::symlink_metadata(&path),
            };
            let Ok(md) = md else { continue };
            let examined = FileId::of(&md);
            let valid = hash.zip(file).and_then(|(hash, file)| {
                let n = read_full_at(&file, &mut buf, 0).ok()?;
                let fixed = Fixed::decode(&buf[..n]).ok()?;
                if md.len() != fixed.file_len() || fixed.expires_ms <= now_ms {
                    return None;
                }
                let entry =
                    Entry::new(fixed.file_len(), fixed.body_len, examined, fixed.expires_ms);
                Some(((ns.clone(), hash), entry))
            });
            match valid {
                Some((id, entry)) => {
                    found.push((id, entry, md.modified().unwrap_or(UNIX_EPOCH)));
                }
                None => doomed.push((path, examined)),
            }
        }
    }
    (found, doomed)
}

//! The disk tier's in-memory index: which revisions exist, how big they are, when they expire
//! and when they were last read, so that eviction (least recently read first) and the size limit
//! need no file-system scan. The files are the truth; the index is rebuilt from them at start.
//!
//! Every mutation of the object tree (commit rename, delete, eviction, expiry, the start-up
//! scan's removals) happens while holding the index lock, which makes "check precondition, then
//! rename" a compare-and-swap, and "check the path still names this file, then unlink" too.
//!
//! An entry names its revision by file ([`FileId`]), not by ETag: rewriting identical bytes
//! with another TTL or other headers keeps the ETag, and a decision about the old revision
//! (cache it, refresh it, expire it) must not fall on the new one.

use hashbrown::HashMap;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// `(namespace, BLAKE3 of the key)`: the key's file is named by its hash.
pub type EntryId = (Arc<str>, [u8; 32]);

/// An [`EntryId`] borrowed from the request, for lookups: building the owned id allocated an
/// `Arc<str>` on every read. Hashes exactly as the tuple does, field by field.
#[derive(Clone, Copy, Hash)]
pub struct EntryRef<'a>(pub &'a str, pub &'a [u8; 32]);

impl EntryRef<'_> {
    pub fn to_owned(self) -> EntryId {
        (Arc::from(self.0), *self.1)
    }
}

impl<'a> From<&'a EntryId> for EntryRef<'a> {
    fn from(id: &'a EntryId) -> EntryRef<'a> {
        EntryRef(&id.0, &id.1)
    }
}

impl hashbrown::Equivalent<EntryId> for EntryRef<'_> {
    fn equivalent(&self, id: &EntryId) -> bool {
        *self.0 == *id.0 && self.1 == &id.1
    }
}

/// The file that holds one revision: its device and inode. `rename` keeps it, and a number is
/// only reused once its file is both unlinked and closed, so two files that exist at the same
/// time (the one an index entry names, which is linked; one a reader holds open) have the same
/// `FileId` only if they are the same file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(md: &std::fs::Metadata) -> FileId {
        FileId {
            dev: md.dev(),
            ino: md.ino(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    /// File length (header + body): what counts against the limit.
    pub file_len: u64,
    pub body_len: u64,
    /// The revision's file, which the key's path names while this entry is in the index.
    pub file: FileId,
    pub expires_ms: u64,
    pub last_access: u64,
    /// Where the entry sits in the LRU set: its last access when it was last placed there,
    /// which later reads (see [`Index::touch`]) may have overtaken.
    lru_position: u64,
}

impl Entry {
    pub fn new(file_len: u64, body_len: u64, file: FileId, expires_ms: u64) -> Entry {
        Entry {
            file_len,
            body_len,
            file,
            expires_ms,
            last_access: 0,
            lru_position: 0,
        }
    }
}

#[derive(Default)]
pub struct Index {
    entries: HashMap<EntryId, Entry>,
    /// (lru_position, id), one element per entry; ordered by last access once the stale
    /// positions at the front are moved (see [`Index::coldest`]).
    lru: BTreeSet<(u64, EntryId)>,
    tick: u64,
    pub total_bytes: u64,
    pub evictions: u64,
    pub expirations: u64,
}

impl Index {
    pub fn get<Q>(&self, id: &Q) -> Option<&Entry>
    where
        Q: std::hash::Hash + hashbrown::Equivalent<EntryId> + ?Sized,
    {
        self.entries.get(id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Inserts or replaces; returns the replaced entry.
    pub fn insert(&mut self, id: EntryId, mut entry: Entry) -> Option<Entry> {
        let old = self.remove(&id);
        entry.last_access = self.next_tick();
        entry.lru_position = entry.last_access;
        self.total_bytes += entry.file_len;
        self.lru.insert((entry.lru_position, id.clone()));
        self.entries.insert(id, entry);
        old
    }

    pub fn remove(&mut self, id: &EntryId) -> Option<Entry> {
        let old = self.entries.remove(id)?;
        self.lru.remove(&(old.lru_position, id.clone()));
        self.total_bytes -= old.file_len;
        Some(old)
    }

    /// Marks a read of the revision in `file` (a reader of an older revision that was replaced
    /// meanwhile does not refresh the new one, even when both have the same ETag).
    ///
    /// Only the entry's last access changes: moving it in the LRU set on every read cost as
    /// much as serving a small object. [`Index::coldest`] moves the entries it finds out of
    /// place, so each read costs at most one move, and only when eviction gets to the entry.
    pub fn touch(&mut self, id: EntryRef<'_>, file: FileId) {
        if let Some(e) = self.entries.get_mut(&id)
            && e.file == file
        {
            self.tick += 1;
            e.last_access = self.tick;
        }
    }

    /// The least recently used entry, skipping `keep`.
    pub fn coldest(&mut self, keep: Option<&EntryId>) -> Option<EntryId> {
        loop {
            let mut out_of_place = None;
            for (position, id) in &self.lru {
                let e = &self.entries[id];
                if e.last_access != *position {
                    out_of_place = Some((*position, id.clone(), e.last_access));
                    break;
                }
                if Some(id) != keep {
                    return Some(id.clone());
                }
            }
            let (position, id, last_access) = out_of_place?;
            self.lru.remove(&(position, id.clone()));
            self.lru.insert((last_access, id.clone()));
            if let Some(e) = self.entries.get_mut(&id) {
                e.lru_position = last_access;
            }
        }
    }

    /// The revisions expired at `now`, each with its file: a candidate for removal once the
    /// lock was let go, to be removed only if it is still that file and still expired.
    pub fn expired(&self, now: SystemTime) -> Vec<(EntryId, FileId)> {
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.entries
            .iter()
            .filter(|(_, e)| e.expires_ms <= now_ms)
            .map(|(id, e)| (id.clone(), e.file))
            .collect()
    }

    /// Per-namespace (objects, body bytes).
    pub fn usage(&self) -> HashMap<Arc<str>, (u64, u64)> {
        let mut out: HashMap<Arc<str>, (u64, u64)> = HashMap::new();
        for ((ns, _), e) in &self.entries {
            let u = out.entry(ns.clone()).or_default();
            u.0 += 1;
            u.1 += e.body_len;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> EntryId {
        (Arc::from("ns"), [n; 32])
    }

    fn file(ino: u64) -> FileId {
        FileId { dev: 1, ino }
    }

    fn entry(len: u64) -> Entry {
        Entry::new(len, len, file(len), u64::MAX)
    }

    #[test]
    fn lru_order_follows_reads_not_writes() {
        let mut idx = Index::default();
        idx.insert(id(1), entry(10));
        idx.insert(id(2), entry(20));
        idx.insert(id(3), entry(30));
        assert_eq!(idx.total_bytes, 60);
        assert_eq!(idx.coldest(None), Some(id(1)));
        idx.touch((&id(1)).into(), file(10));
        assert_eq!(idx.coldest(None), Some(id(2)));
        assert_eq!(idx.coldest(Some(&id(2))), Some(id(3)));
        idx.remove(&id(2));
        assert_eq!(idx.total_bytes, 40);
        assert_eq!(idx.coldest(None), Some(id(3)));
    }

    #[test]
    fn eviction_order_is_exact_lru_however_often_entries_were_read() {
        let mut idx = Index::default();
        for n in 1..=5 {
            idx.insert(id(n), entry(u64::from(n)));
        }
        // Reads in this order, some entries several times: the last read decides.
        for n in [3, 1, 3, 5, 2, 1, 3] {
            idx.touch((&id(n)).into(), file(u64::from(n)));
        }
        let mut order = Vec::new();
        while let Some(victim) = idx.coldest(None) {
            order.push(victim.1[0]);
            idx.remove(&victim);
        }
        assert_eq!(order, [4, 5, 2, 1, 3]);
    }

    #[test]
    fn touch_of_a_replaced_revision_is_ignored() {
        let mut idx = Index::default();
        idx.insert(id(1), entry(10));
        idx.insert(id(2), entry(10));
        // Another file than the entry's: a replaced revision, whatever its ETag.
        idx.touch((&id(1)).into(), file(9));
        assert_eq!(idx.coldest(None), Some(id(1)));
    }

    #[test]
    fn replacing_adjusts_total() {
        let mut idx = Index::default();
        idx.insert(id(1), entry(10));
        let old = idx.insert(id(1), entry(25));
        assert_eq!(old.unwrap().file_len, 10);
        assert_eq!(idx.total_bytes, 25);
        assert_eq!(idx.len(), 1);
    }
}

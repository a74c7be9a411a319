//! Each thread's own copies of the revisions it reads most: a hot key is served without touching
//! memory that another core writes.
//!
//! Through the shared open-revision cache alone, every read of a hot key took its lock, moved its
//! LRU stamp, took the index lock to record the read, and counted references to the revision, its
//! ETag, its headers and its body bytes: a dozen atomic operations on cache lines that the other
//! workers were writing too, since under load they read the same hot keys. A thread reading its
//! own copy makes none of them; it only loads one flag that nobody writes until the revision
//! stops being current, and records the read in the index at most every [`TOUCH_INTERVAL_MS`]
//! (memcached bumps an item in its LRU at most once a minute for the same reason).
//!
//! A copy is made on a key's second read through the shared cache (a key read once, as most of
//! a build's blobs are, costs no copy), and is valid while its shared revision is not retired.
//! Once a thread's copies are at their limit, only one read in [`REPLACE_ONE_IN`] through the
//! shared cache replaces a copy: a working set larger than the limit is then mostly served from
//! the shared cache instead of copying a key on every read.
//! The shared cache retires a revision whenever it lets go of it: replaced, deleted, expired,
//! evicted, or pushed out of the cache. So a copy never outlives the revision being current.

use super::index::{EntryId, EntryRef};
use super::{OpenRevision, RevisionInfo};
use bytes::Bytes;
use hashbrown::HashMap;
use larder_proto::ETag;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// Copies kept per thread (and tier). Fewer made a thread that read a few hundred keys in turn
/// copy one on nearly every read, half again the instructions of a GET.
pub(super) const COPIES_PER_THREAD: usize = 256;

/// Body bytes a thread copies, over all its copies; a small object beyond it gets no copy.
const COPIED_BYTES_PER_THREAD: usize = 1 << 20;

/// When a thread's copies are at their limit, one read in this many through the shared cache
/// replaces one of them (any) with a copy of the key read. Replacing on every read made a
/// thread reading 600 keys in turn spend a sixth of each GET's instructions copying.
pub(super) const REPLACE_ONE_IN: u32 = 16;

/// Tiers whose copies a thread keeps (a process has one; tests open many).
const TIERS_PER_THREAD: usize = 4;

/// How often a thread records a read of a key it serves from its copy in the index (for LRU
/// eviction): eviction order is by last read to within this.
pub(super) const TOUCH_INTERVAL_MS: u64 = 100;

/// A thread's copy of one open revision. It keeps neither the revision nor its file: once the
/// shared cache lets go of a revision, its disk space must not wait for every thread that copied
/// it to read the key again.
pub(super) struct ThreadCopy {
    /// Set when the copy is void.
    retired: Arc<AtomicBool>,
    /// For the bytes of a large body, read from the file.
    pub revision: Weak<OpenRevision>,
    pub id: EntryId,
    /// Its `small_body` is a copy of the shared revision's.
    pub info: RevisionInfo,
    /// When this thread last recorded a read of the key in the index (0: never).
    pub touched_ms: u64,
}

impl ThreadCopy {
    /// A copy of `shared` whose ETag, headers and small body are allocations of its own, so
    /// that handing them out counts references on this core only.
    fn of(id: EntryId, shared: &Arc<OpenRevision>) -> ThreadCopy {
        let info = &shared.info;
        ThreadCopy {
            retired: shared.retired.clone(),
            revision: Arc::downgrade(shared),
            id,
            info: RevisionInfo {
                fixed: info.fixed.clone(),
                file_id: info.file_id,
                etag: ETag::from_bytes(info.etag.to_bytes()),
                headers: info.headers.iter().cloned().collect(),
                small_body: Bytes::copy_from_slice(&info.small_body),
            },
            touched_ms: 0,
        }
    }
}

/// A borrowed `(namespace, key)`, hashed as the owned pair is.
#[derive(Hash)]
struct NameRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(Box<str>, Box<str>)> for NameRef<'_> {
    fn equivalent(&self, name: &(Box<str>, Box<str>)) -> bool {
        self.0 == &*name.0 && self.1 == &*name.1
    }
}

/// One thread's copies of one tier's revisions, by namespace and key (not by the key's hash:
/// a hit costs no BLAKE3).
struct TierCopies {
    tier: u64,
    copies: HashMap<(Box<str>, Box<str>), ThreadCopy>,
    copied_bytes: usize,
    /// Reads through the shared cache that found the copies at their limit.
    reads_when_full: u32,
}

impl TierCopies {
    fn remove(&mut self, name: &NameRef<'_>) {
        if let Some(gone) = self.copies.remove(name) {
            self.copied_bytes -= gone.info.small_body.len();
        }
    }
}

thread_local! {
    static COPIES: RefCell<Vec<TierCopies>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's valid copy of `ns`/`key` in tier `tier`; `None` when there is none
/// (a retired copy is dropped).
pub(super) fn with_copy<R>(
    tier: u64,
    ns: &str,
    key: &str,
    f: impl FnOnce(&mut ThreadCopy) -> R,
) -> Option<R> {
    COPIES
        .try_with(|all| {
            let mut all = all.borrow_mut();
            let mine = all.iter_mut().find(|c| c.tier == tier)?;
            let name = NameRef(ns, key);
            let copy = mine.copies.get_mut(&name)?;
            if copy.retired.load(Ordering::Acquire) {
                mine.remove(&name);
                return None;
            }
            Some(f(copy))
        })
        .ok()
        .flatten()
}

/// Gives this thread a copy of `shared`, the current revision of `ns`/`key` (`id`) in tier
/// `tier`, if it has room for one. If it has not, one call in [`REPLACE_ONE_IN`] makes room by
/// dropping other copies (any: eviction is on the path of a read, and the shared cache already
/// keeps the recently read ones).
pub(super) fn keep(tier: u64, ns: &str, key: &str, id: EntryRef<'_>, shared: &Arc<OpenRevision>) {
    let _ = COPIES.try_with(|all| {
        let mut all = all.borrow_mut();
        let at = match all.iter().position(|c| c.tier == tier) {
            Some(at) => at,
            None => {
                if all.len() >= TIERS_PER_THREAD {
                    all.remove(0);
                }
                all.push(TierCopies {
                    tier,
                    copies: HashMap::new(),
                    copied_bytes: 0,
                    reads_when_full: 0,
                });
                all.len() - 1
            }
        };
        let mine = &mut all[at];
        let name = NameRef(ns, key);
        mine.remove(&name);
        let len = shared.info.small_body.len();
        if len > COPIED_BYTES_PER_THREAD {
            return;
        }
        let full = |mine: &TierCopies| {
            mine.copies.len() >= COPIES_PER_THREAD
                || mine.copied_bytes + len > COPIED_BYTES_PER_THREAD
        };
        if full(mine) {
            mine.reads_when_full = mine.reads_when_full.wrapping_add(1);
            if mine.reads_when_full % REPLACE_ONE_IN != 0 {
                return;
            }
            while full(mine)
                && let Some(victim) = mine.copies.keys().next().cloned()
            {
                mine.remove(&NameRef(&victim.0, &victim.1));
            }
        }
        let copy = ThreadCopy::of(id.to_owned(), shared);
        mine.copied_bytes += copy.info.small_body.len();
        mine.copies.insert((ns.into(), key.into()), copy);
    });
}

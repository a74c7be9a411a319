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
//! The shared cache retires a revision whenever it lets go of it: replaced, deleted, expired,
//! evicted, or pushed out of the cache. So a copy never outlives the revision being current.

use super::index::EntryId;
use super::{OpenRevision, RevisionInfo};
use bytes::Bytes;
use hashbrown::HashMap;
use larder_proto::ETag;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// Copies kept per thread (and tier): as many as the shared cache holds, so that a working set
/// the shared cache keeps is kept by each thread too. Fewer made a thread that read a few hundred
/// keys in turn copy one on nearly every read, half again the instructions of a GET.
const COPIES_PER_THREAD: usize = super::OPEN_CACHE_ENTRIES;

/// Body bytes a thread copies, over all its copies; a small object beyond it gets no copy.
const COPIED_BYTES_PER_THREAD: usize = 1 << 20;

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
    /// Its `prefix` holds the whole body of a small object, copied, and nothing of a large one.
    pub info: RevisionInfo,
    /// When this thread last recorded a read of the key in the index (0: never).
    pub touched_ms: u64,
}

impl ThreadCopy {
    /// A copy of `shared` whose ETag, headers and small body are allocations of its own, so
    /// that handing them out counts references on this core only.
    pub fn of(id: EntryId, shared: &Arc<OpenRevision>) -> ThreadCopy {
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
                prefix: if info.prefix.len() as u64 == info.fixed.body_len {
                    info.prefix.clone()
                } else {
                    Bytes::new()
                },
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
}

impl TierCopies {
    fn remove(&mut self, name: &NameRef<'_>) {
        if let Some(gone) = self.copies.remove(name) {
            self.copied_bytes -= gone.info.prefix.len();
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

/// Keeps `copy` as this thread's copy of `ns`/`key` in tier `tier`, making room by dropping
/// another (any: eviction is on the path of a read, and the shared cache already keeps the
/// recently read ones). A small body is copied while the thread's budget allows; beyond it the
/// key gets no copy.
pub(super) fn keep(tier: u64, ns: &str, key: &str, mut copy: ThreadCopy) {
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
                });
                all.len() - 1
            }
        };
        let mine = &mut all[at];
        let name = NameRef(ns, key);
        mine.remove(&name);
        if mine.copies.len() >= COPIES_PER_THREAD
            && let Some(victim) = mine.copies.keys().next().cloned()
        {
            mine.remove(&NameRef(&victim.0, &victim.1));
        }
        let prefix = &mut copy.info.prefix;
        if mine.copied_bytes + prefix.len() > COPIED_BYTES_PER_THREAD {
            return;
        }
        *prefix = Bytes::copy_from_slice(prefix);
        mine.copied_bytes += prefix.len();
        mine.copies.insert((ns.into(), key.into()), copy);
    });
}

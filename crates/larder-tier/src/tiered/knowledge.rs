//! What one replica knows about a key's current revision in the authoritative tier, and since
//! when: the record behind three guarantees of the tiered cache.
//!
//! - **Bounded staleness.** A local copy is served to unpinned reads only while the revision it
//!   holds was *seen* current less than the revalidation window ago, measured from when the
//!   remote was asked, not from when a copy happened to finish.
//! - **Monotonic reads per replica.** Every answer the remote gives (a revalidation, a read
//!   served from it, a write or delete committed through this replica) is an [`Observation`]
//!   over the interval in which the remote decided it. Observations are merged in real-time
//!   order: one that began after another ended is newer; one that ended before the known one
//!   began is older and ignored; two that overlap and disagree leave the key [`Knowledge::Unknown`]
//!   until an observation begins after both, so a later read never falls back to a revision
//!   older than one already served.
//! - **Deleted stays deleted, newer wins.** A local copy (a fill, or a write-through) is committed
//!   only while the record still names its revision ([`Keys::names`]), checked under the disk
//!   tier's commit lock, so a delete or a newer revision seen meanwhile always wins the race.

use larder_proto::{ETag, Key, Namespace};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(super) type KeyId = (Namespace, Key);

/// One answer of the authoritative tier: somewhere in `[started, completed]` the key's current
/// revision was `etag` (`None`: the key did not exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Observation {
    pub etag: Option<ETag>,
    pub started: Instant,
    pub completed: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Knowledge {
    /// The newest observation (merged with overlapping ones that agree).
    Known(Observation),
    /// Overlapping observations disagreed, or a change through this replica may or may not have
    /// landed: only an observation that starts after `until` says anything.
    Unknown { until: Instant },
}

impl Knowledge {
    /// Merges a new observation in; see the module docs for the order.
    pub fn merge(known: Option<&Knowledge>, new: Observation) -> Knowledge {
        match known {
            None => Knowledge::Known(new),
            Some(Knowledge::Unknown { until }) if new.started > *until => Knowledge::Known(new),
            Some(Knowledge::Unknown { until }) => Knowledge::Unknown {
                until: (*until).max(new.completed),
            },
            Some(Knowledge::Known(old)) if new.started > old.completed => Knowledge::Known(new),
            Some(Knowledge::Known(old)) if new.completed < old.started => {
                Knowledge::Known(old.clone())
            }
            Some(Knowledge::Known(old)) if old.etag == new.etag => {
                // Both were current at the later start, and neither decided after the later end.
                Knowledge::Known(Observation {
                    etag: new.etag,
                    started: old.started.max(new.started),
                    completed: old.completed.max(new.completed),
                })
            }
            Some(Knowledge::Known(old)) => Knowledge::Unknown {
                until: old.completed.max(new.completed),
            },
        }
    }

    /// The known revision while it is fresh: `Some(None)` means known deleted.
    fn fresh(&self, window: Duration) -> Option<Option<&ETag>> {
        match self {
            Knowledge::Known(o) if o.started.elapsed() < window => Some(o.etag.as_ref()),
            _ => None,
        }
    }

    fn last_news(&self) -> Instant {
        match self {
            Knowledge::Known(o) => o.completed,
            Knowledge::Unknown { until } => *until,
        }
    }
}

/// What an unpinned or pinned read may conclude without asking the remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Freshness {
    /// Seen current within the window.
    Current(ETag),
    /// Seen deleted within the window.
    Deleted,
    /// Nothing recent enough: ask the remote.
    Stale,
}

/// Per-key state of the tiered cache: the knowledge record and the fill in flight. One lock for
/// both, never held across an await or a call into a tier.
pub(super) struct Keys<F> {
    window: Duration,
    map: Mutex<KeyMap<F>>,
}

struct KeyMap<F> {
    entries: HashMap<KeyId, KeyState<F>>,
    /// Entries beyond which stale ones are dropped (grows with the live set).
    prune_at: usize,
}

struct KeyState<F> {
    knowledge: Option<Knowledge>,
    fill: Option<Arc<F>>,
}

const MIN_PRUNE_AT: usize = 4096;

impl<F> Keys<F> {
    pub fn new(window: Duration) -> Keys<F> {
        Keys {
            window,
            map: Mutex::new(KeyMap {
                entries: HashMap::new(),
                prune_at: MIN_PRUNE_AT,
            }),
        }
    }

    pub fn freshness(&self, id: &KeyId) -> Freshness {
        let map = self.map.lock().unwrap();
        match map
            .entries
            .get(id)
            .and_then(|s| s.knowledge.as_ref())
            .and_then(|k| k.fresh(self.window))
        {
            Some(Some(etag)) => Freshness::Current(etag.clone()),
            Some(None) => Freshness::Deleted,
            None => Freshness::Stale,
        }
    }

    pub fn observe(&self, id: &KeyId, observation: Observation) {
        self.update(id, |known| Knowledge::merge(known, observation));
    }

    /// A change through this replica whose outcome is unknown (it failed, or it dropped local
    /// copies): nothing observed before now may be trusted.
    pub fn forget(&self, id: &KeyId) {
        let now = Instant::now();
        self.update(id, |known| Knowledge::Unknown {
            until: known.map_or(now, |k| k.last_news().max(now)),
        });
    }

    /// Whether the record names `etag` as the current revision (however long ago it was seen):
    /// the condition for committing a local copy of it.
    pub fn names(&self, id: &KeyId, etag: &ETag) -> bool {
        let map = self.map.lock().unwrap();
        matches!(
            map.entries.get(id).and_then(|s| s.knowledge.as_ref()),
            Some(Knowledge::Known(o)) if o.etag.as_ref() == Some(etag)
        )
    }

    fn update(&self, id: &KeyId, f: impl FnOnce(Option<&Knowledge>) -> Knowledge) {
        let mut map = self.map.lock().unwrap();
        let state = map.entries.entry(id.clone()).or_insert(KeyState {
            knowledge: None,
            fill: None,
        });
        state.knowledge = Some(f(state.knowledge.as_ref()));
        map.prune(self.window);
    }

    /// The fill of this key in flight, if any.
    pub fn fill(&self, id: &KeyId) -> Option<Arc<F>> {
        let map = self.map.lock().unwrap();
        map.entries.get(id).and_then(|s| s.fill.clone())
    }

    /// The fill in flight if `wanted` accepts it, else the one `start` makes (which replaces it:
    /// the newest revision seen is the one worth copying). `start` runs under the lock.
    pub fn fill_or_start(
        &self,
        id: &KeyId,
        wanted: impl Fn(&F) -> bool,
        start: impl FnOnce() -> Arc<F>,
    ) -> Arc<F> {
        let mut map = self.map.lock().unwrap();
        let state = map.entries.entry(id.clone()).or_insert(KeyState {
            knowledge: None,
            fill: None,
        });
        if let Some(fill) = state.fill.as_ref().filter(|f| wanted(f)) {
            return fill.clone();
        }
        let fill = start();
        state.fill = Some(fill.clone());
        fill
    }

    /// Called by a fill when it ends, whatever the outcome.
    pub fn fill_ended(&self, id: &KeyId, fill: &Arc<F>) {
        let mut map = self.map.lock().unwrap();
        if let Some(state) = map.entries.get_mut(id)
            && state.fill.as_ref().is_some_and(|f| Arc::ptr_eq(f, fill))
        {
            state.fill = None;
        }
    }
}

impl<F> KeyMap<F> {
    /// Drops entries that no longer decide anything: no fill in flight, and no news for two
    /// windows (a stale record only makes reads ask the remote, which a missing one does too).
    fn prune(&mut self, window: Duration) {
        if self.entries.len() < self.prune_at {
            return;
        }
        self.entries.retain(|_, s| {
            s.fill.is_some()
                || s.knowledge
                    .as_ref()
                    .is_some_and(|k| k.last_news().elapsed() < 2 * window)
        });
        self.prune_at = (2 * self.entries.len()).max(MIN_PRUNE_AT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn obs(base: Instant, etag: Option<u8>, from: u64, to: u64) -> Observation {
        Observation {
            etag: etag.map(|b| ETag::from_bytes([b; 32])),
            started: at(base, from),
            completed: at(base, to),
        }
    }

    #[test]
    fn a_later_observation_replaces_an_earlier_one() {
        let b = Instant::now();
        let k = Knowledge::merge(None, obs(b, Some(1), 0, 10));
        let k = Knowledge::merge(Some(&k), obs(b, Some(2), 11, 20));
        assert_eq!(k, Knowledge::Known(obs(b, Some(2), 11, 20)));
    }

    #[test]
    fn an_observation_that_ended_before_the_known_one_began_is_ignored() {
        // A fill's check of E1 that completes late must not undo a newer check of E2.
        let b = Instant::now();
        let k = Knowledge::merge(None, obs(b, Some(2), 20, 30));
        let k = Knowledge::merge(Some(&k), obs(b, Some(1), 0, 10));
        assert_eq!(k, Knowledge::Known(obs(b, Some(2), 20, 30)));
    }

    #[test]
    fn overlapping_observations_that_disagree_make_the_key_unknown_until_both_ended() {
        let b = Instant::now();
        let k = Knowledge::merge(None, obs(b, Some(1), 0, 10));
        let k = Knowledge::merge(Some(&k), obs(b, Some(2), 5, 20));
        assert_eq!(k, Knowledge::Unknown { until: at(b, 20) });
        // Still overlapping the ambiguity: stays unknown (it may be the older one).
        let k2 = Knowledge::merge(Some(&k), obs(b, Some(1), 15, 25));
        assert_eq!(k2, Knowledge::Unknown { until: at(b, 25) });
        // One that began after both ended decides.
        let k3 = Knowledge::merge(Some(&k), obs(b, Some(2), 21, 22));
        assert_eq!(k3, Knowledge::Known(obs(b, Some(2), 21, 22)));
    }

    #[test]
    fn overlapping_observations_that_agree_keep_the_latest_start() {
        let b = Instant::now();
        let k = Knowledge::merge(None, obs(b, Some(1), 0, 10));
        let k = Knowledge::merge(Some(&k), obs(b, Some(1), 5, 8));
        assert_eq!(k, Knowledge::Known(obs(b, Some(1), 5, 10)));
    }

    #[test]
    fn a_delete_is_an_observation_like_any_other() {
        let b = Instant::now();
        let k = Knowledge::merge(None, obs(b, Some(1), 0, 10));
        let k = Knowledge::merge(Some(&k), obs(b, None, 11, 12));
        assert_eq!(k, Knowledge::Known(obs(b, None, 11, 12)));
    }

    fn id(k: &str) -> KeyId {
        (Namespace::parse("ns").unwrap(), Key::parse(k).unwrap())
    }

    #[test]
    fn freshness_is_measured_from_when_the_remote_was_asked() {
        let keys: Keys<()> = Keys::new(Duration::from_millis(50));
        let asked = Instant::now() - Duration::from_millis(40);
        let e = ETag::from_bytes([7; 32]);
        keys.observe(
            &id("k"),
            Observation {
                etag: Some(e.clone()),
                started: asked,
                completed: Instant::now(),
            },
        );
        assert_eq!(keys.freshness(&id("k")), Freshness::Current(e.clone()));
        std::thread::sleep(Duration::from_millis(15));
        assert_eq!(
            keys.freshness(&id("k")),
            Freshness::Stale,
            "50 ms after it was asked"
        );
        assert!(
            keys.names(&id("k"), &e),
            "stale, but still the newest known"
        );
        keys.forget(&id("k"));
        assert!(!keys.names(&id("k"), &e));
        assert_eq!(keys.freshness(&id("k")), Freshness::Stale);
    }

    #[test]
    fn stale_entries_without_a_fill_are_pruned() {
        let keys: Keys<()> = Keys::new(Duration::from_millis(1));
        let long_ago = Instant::now() - Duration::from_secs(1);
        for i in 0..MIN_PRUNE_AT + 10 {
            let o = Observation {
                etag: None,
                started: long_ago,
                completed: long_ago,
            };
            keys.observe(&id(&format!("k{i}")), o);
        }
        let kept = keys.fill_or_start(&id("filling"), |_| true, || Arc::new(()));
        keys.observe(
            &id("filling"),
            Observation {
                etag: None,
                started: long_ago,
                completed: long_ago,
            },
        );
        let len = keys.map.lock().unwrap().entries.len();
        assert!(len < 20, "{len} entries left");
        assert!(
            keys.fill(&id("filling"))
                .is_some_and(|f| Arc::ptr_eq(&f, &kept))
        );
    }
}

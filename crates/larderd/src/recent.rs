//! What a thread wrote out for the revisions it served lately (a response head's fields, an
//! access line's), to be copied instead of written again: a fleet reads the same revisions over
//! and over, and writing these costs more than the copy and the comparison that proves the copy
//! is of the same values.
//!
//! Each thread has its own, so a hit takes no lock. The caller names an entry by a hash of the
//! values it was written from and checks the values themselves on a hit: two sets of values may
//! share a hash.

/// Up to `capacity` entries by a 64-bit hash of what they were written from.
pub(crate) struct Recent<V> {
    entries: hashbrown::HashMap<u64, V>,
    capacity: usize,
    misses_when_full: u32,
}

/// Once full, one miss in this many replaces an entry. A thread serving more revisions than it
/// keeps, in turn, would otherwise replace one on every read and keep none long enough to gain
/// by it; a hot revision still gets its entry after a few dozen reads. (With one in 16, making
/// entries cost 2.7 % more instructions per GET on 2,000 keys read in turn; with one in 64,
/// 0.7 %.)
const REPLACE_ONE_IN: u32 = 64;

impl<V> Recent<V> {
    pub(crate) fn new(capacity: usize) -> Recent<V> {
        Recent {
            entries: hashbrown::HashMap::with_capacity(capacity),
            capacity,
            misses_when_full: 0,
        }
    }

    /// The entry under `hash`, if `is_it` says it was written from the values at hand.
    pub(crate) fn get(&self, hash: u64, is_it: impl FnOnce(&V) -> bool) -> Option<&V> {
        self.entries.get(&hash).filter(|v| is_it(v))
    }

    /// Keeps `make()` under `hash` (after a miss), replacing what was there. When the map is
    /// full only one call in [`REPLACE_ONE_IN`] keeps anything: in place of the entry under
    /// `hash`, or of any entry. (Not looking first for one under `hash` saves every miss of a
    /// full map a lookup.)
    pub(crate) fn keep(&mut self, hash: u64, make: impl FnOnce() -> V) {
        if self.entries.len() >= self.capacity {
            self.misses_when_full = self.misses_when_full.wrapping_add(1);
            if self.capacity == 0 || !self.misses_when_full.is_multiple_of(REPLACE_ONE_IN) {
                return;
            }
            if self.entries.remove(&hash).is_none()
                && let Some(&any) = self.entries.keys().next()
            {
                self.entries.remove(&any);
            }
        }
        self.entries.insert(hash, make());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_found_only_when_its_values_are_the_ones_at_hand() {
        let mut recent = Recent::new(4);
        recent.keep(7, || "written from a");
        assert_eq!(
            recent.get(7, |v| *v == "written from a"),
            Some(&"written from a")
        );
        assert_eq!(
            recent.get(7, |v| *v == "written from b"),
            None,
            "same hash, other values"
        );
        assert_eq!(recent.get(8, |_| true), None);
        recent.keep(7, || "written from b");
        assert_eq!(recent.get(7, |_| true), Some(&"written from b"));
    }

    #[test]
    fn a_full_map_takes_few_new_entries_and_stays_bounded() {
        let mut recent = Recent::new(4);
        for hash in 0..4 {
            recent.keep(hash, || hash);
        }
        // A stream of new hashes: most pass by, one in REPLACE_ONE_IN gets in.
        let mut kept = 0;
        for hash in 100..100 + u64::from(REPLACE_ONE_IN) * 5 {
            recent.keep(hash, || hash);
            assert!(recent.entries.len() <= 4);
            kept += usize::from(recent.get(hash, |_| true).is_some());
        }
        assert_eq!(kept, 5);
        // A hash already in is replaced in place when its turn comes.
        let present = *recent.entries.keys().next().unwrap();
        for _ in 0..REPLACE_ONE_IN {
            recent.keep(present, || 999);
        }
        assert_eq!(recent.get(present, |_| true), Some(&999));
        assert_eq!(recent.entries.len(), 4);
        let mut none = Recent::new(0);
        for hash in 0..64 {
            none.keep(hash, || hash);
        }
        assert!(none.entries.is_empty());
    }
}

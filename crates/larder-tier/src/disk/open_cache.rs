//! The revisions kept open for the keys read recently, shared by all threads of a tier.
//!
//! A read through this cache costs no open, read, fstat or close, no path built from the key's
//! hash and no header decoded: a miss costs about four times the instructions of a hit, and
//! four syscalls. Small revisions, whose whole body came with the read of their header, are kept
//! without their file, bounded by their bytes: a build's working set of a few thousand small
//! blobs stays in memory. Larger revisions keep their descriptor (their body is sent from the
//! file), so they are bounded in number.
//!
//! Eviction is CLOCK (second chance): a read sets an entry's mark, the hand clears marks as it
//! passes and takes the first unmarked entry. That keeps a working set read over and over, as
//! LRU does, at O(1) per miss however large the cache, and a key read once goes before one that
//! was read again.

use super::index::{EntryId, EntryRef};

/// A CLOCK cache from keys to `V`, bounded in entries and in the weight of its values.
pub(super) struct OpenCache<V> {
    max_entries: usize,
    max_weight: usize,
    weight: usize,
    slot_of: hashbrown::HashMap<EntryId, usize>,
    slots: Vec<Option<Slot<V>>>,
    free: Vec<usize>,
    hand: usize,
}

struct Slot<V> {
    id: EntryId,
    value: V,
    weight: usize,
    /// Read since the hand last passed.
    marked: bool,
}

impl<V: Clone> OpenCache<V> {
    pub fn new(max_entries: usize, max_weight: usize) -> Self {
        OpenCache {
            max_entries,
            max_weight,
            weight: 0,
            slot_of: hashbrown::HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn weight(&self) -> usize {
        self.weight
    }

    pub fn get(&mut self, id: EntryRef<'_>) -> Option<V> {
        let slot = self.slot_mut(id)?;
        slot.marked = true;
        Some(slot.value.clone())
    }

    /// Marks the key as read now, if it is cached.
    pub fn refresh(&mut self, id: EntryRef<'_>) {
        if let Some(slot) = self.slot_mut(id) {
            slot.marked = true;
        }
    }

    fn slot_mut(&mut self, id: EntryRef<'_>) -> Option<&mut Slot<V>> {
        let at = *self.slot_of.get(&id)?;
        self.slots[at].as_mut()
    }

    /// Caches `value`, of `weight`, for `id`. Returns what it let go of: the values pushed out
    /// to make room, and the one `id` had. A value heavier than the whole cache is not kept.
    pub fn insert(&mut self, id: EntryId, value: V, weight: usize) -> (Vec<V>, Option<V>) {
        let replaced = self.remove(&id);
        let mut pushed_out = Vec::new();
        if weight > self.max_weight || self.max_entries == 0 {
            return (pushed_out, replaced);
        }
        while self.len() >= self.max_entries || self.weight + weight > self.max_weight {
            match self.evict_one() {
                Some(value) => pushed_out.push(value),
                None => break,
            }
        }
        let slot = Slot {
            id: id.clone(),
            value,
            weight,
            // Unmarked: a key read once is the first to make room.
            marked: false,
        };
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at] = Some(slot);
                at
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.slot_of.insert(id, at);
        self.weight += weight;
        (pushed_out, replaced)
    }

    pub fn remove(&mut self, id: &EntryId) -> Option<V> {
        let at = self.slot_of.remove(id)?;
        let slot = self.slots[at]
            .take()
            .expect("a listed slot holds its entry");
        self.free.push(at);
        self.weight -= slot.weight;
        Some(slot.value)
    }

    /// Takes the first unmarked entry from the hand on, clearing the marks it passes: within
    /// two turns of the clock, whatever is read meanwhile.
    fn evict_one(&mut self) -> Option<V> {
        if self.slot_of.is_empty() {
            return None;
        }
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let at = self.hand;
            self.hand += 1;
            match &mut self.slots[at] {
                Some(slot) if slot.marked => slot.marked = false,
                Some(slot) => {
                    let id = slot.id.clone();
                    return self.remove(&id);
                }
                None => {}
            }
        }
    }
}

/// The two classes of open revisions under one lock: a key's revision is in at most one.
pub(super) struct OpenRevisions<V> {
    /// Revisions whose whole body is in memory: no descriptor kept, bounded by body bytes.
    pub in_memory: OpenCache<V>,
    /// Revisions read from their file: one descriptor each, bounded in number.
    pub with_file: OpenCache<V>,
}

impl<V: Clone> OpenRevisions<V> {
    pub fn new(in_memory: OpenCache<V>, with_file: OpenCache<V>) -> Self {
        OpenRevisions {
            in_memory,
            with_file,
        }
    }

    pub fn get(&mut self, id: EntryRef<'_>) -> Option<V> {
        self.in_memory.get(id).or_else(|| self.with_file.get(id))
    }

    pub fn refresh(&mut self, id: EntryRef<'_>) {
        self.in_memory.refresh(id);
        self.with_file.refresh(id);
    }

    /// Caches `value` in the class `in_memory` says, `weight` being its body bytes; returns what
    /// the cache let go of (see [`OpenCache::insert`]), including the key's revision in the other
    /// class.
    pub fn insert(
        &mut self,
        id: EntryId,
        value: V,
        weight: usize,
        in_memory: bool,
    ) -> (Vec<V>, Option<V>) {
        let (class, other) = if in_memory {
            (&mut self.in_memory, &mut self.with_file)
        } else {
            (&mut self.with_file, &mut self.in_memory)
        };
        let (pushed_out, replaced) = class.insert(id.clone(), value, weight);
        (pushed_out, replaced.or_else(|| other.remove(&id)))
    }

    pub fn remove(&mut self, id: &EntryId) -> Option<V> {
        self.in_memory
            .remove(id)
            .or_else(|| self.with_file.remove(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn id(i: u16) -> EntryId {
        let mut hash = [0u8; 32];
        hash[..2].copy_from_slice(&i.to_le_bytes());
        (Arc::from("ns"), hash)
    }

    fn get(cache: &mut OpenCache<u16>, i: u16) -> Option<u16> {
        cache.get(EntryRef("ns", &id(i).1))
    }

    #[test]
    fn keys_read_again_stay_while_keys_read_once_pass_through() {
        let mut cache = OpenCache::new(16, usize::MAX);
        // Eight hot keys are read between the opens of 500 keys read once each.
        for cold in 100..600 {
            for hot in 0..8 {
                if get(&mut cache, hot).is_none() {
                    assert!(
                        cold == 100,
                        "hot key {hot} was evicted before cold key {cold}"
                    );
                    cache.insert(id(hot), hot, 1);
                }
            }
            cache.insert(id(cold), cold, 1);
            assert!(cache.len() <= 16);
        }
        assert_eq!(get(&mut cache, 599), Some(599), "the newest key is there");
        assert_eq!(get(&mut cache, 100), None, "an old cold key made room");
        // Replacing a cached key's value makes no room.
        let before = cache.len();
        let (pushed_out, replaced) = cache.insert(id(599), 1, 1);
        assert_eq!((pushed_out, replaced), (vec![], Some(599)));
        assert_eq!(cache.len(), before);
        assert_eq!(get(&mut cache, 599), Some(1));
    }

    #[test]
    fn a_working_set_that_fits_is_never_pushed_out_however_it_is_read() {
        let mut cache = OpenCache::new(1000, usize::MAX);
        let mut misses = 0;
        // In turn, which is LRU's worst case once the set is larger than the cache.
        for round in 0..5 {
            for i in 0..1000 {
                if get(&mut cache, i).is_none() {
                    misses += 1;
                    let (pushed_out, _) = cache.insert(id(i), i, 1);
                    assert!(pushed_out.is_empty(), "round {round}, key {i}");
                }
            }
        }
        assert_eq!(misses, 1000, "only the first round opens");
    }

    #[test]
    fn the_weight_bound_holds_and_says_what_it_pushed_out() {
        let mut cache = OpenCache::new(usize::MAX, 100);
        let mut kept = 0usize;
        let mut let_go = Vec::new();
        for i in 0..50u16 {
            let weight = 1 + usize::from(i % 7) * 5;
            let (pushed_out, replaced) = cache.insert(id(i), i, weight);
            assert_eq!(replaced, None);
            kept += weight;
            for gone in &pushed_out {
                kept -= 1 + usize::from(gone % 7) * 5;
                assert_eq!(
                    get(&mut cache, *gone),
                    None,
                    "{gone} pushed out, still there"
                );
            }
            let_go.extend(pushed_out);
            assert!(cache.weight() <= 100, "{} after key {i}", cache.weight());
            assert_eq!(cache.weight(), kept);
        }
        assert_eq!(
            let_go.len() + cache.len(),
            50,
            "every value is kept or handed back"
        );
        // Heavier than the whole cache: not kept, and nothing else lost for it.
        let before = cache.len();
        let (pushed_out, _) = cache.insert(id(1000), 1000, 101);
        assert!(pushed_out.is_empty());
        assert_eq!(get(&mut cache, 1000), None);
        assert_eq!(cache.len(), before);
        // Removing gives the weight back.
        let some = (0..50).find(|i| get(&mut cache, *i).is_some()).unwrap();
        assert_eq!(cache.remove(&id(some)), Some(some));
        assert_eq!(cache.len(), before - 1);
        assert!(cache.weight() < kept);
    }

    #[test]
    fn a_key_lives_in_one_class_and_moving_it_hands_back_the_other() {
        let mut both = OpenRevisions::new(OpenCache::new(4, 100), OpenCache::new(4, usize::MAX));
        assert_eq!(both.insert(id(1), 10, 5, true), (vec![], None));
        assert_eq!(both.get(EntryRef("ns", &id(1).1)), Some(10));
        // The key's new revision needs its file: the in-memory one is handed back.
        assert_eq!(both.insert(id(1), 11, 0, false), (vec![], Some(10)));
        assert_eq!(both.in_memory.len(), 0);
        assert_eq!(both.get(EntryRef("ns", &id(1).1)), Some(11));
        assert_eq!(both.insert(id(1), 12, 5, true), (vec![], Some(11)));
        assert_eq!(both.with_file.len(), 0);
        assert_eq!(both.remove(&id(1)), Some(12));
        assert_eq!(both.get(EntryRef("ns", &id(1).1)), None);
        // Full of files: the fifth pushes one out, whatever the in-memory class holds.
        for i in 0..5 {
            let (pushed_out, _) = both.insert(id(i), i, 0, false);
            assert_eq!(pushed_out.len(), usize::from(i == 4), "key {i}");
        }
    }
}

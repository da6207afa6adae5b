//! The live commands' handles: packed pairs of id and handle in one `Vec`,
//! found through a hash index of 4-byte slot numbers.
//!
//! Why not a `HashMap<CommandId, Live>`: a hash table runs between 44 % and
//! 87 % full, and its buckets held the whole pair, aligned to the id's 16
//! bytes. A million queued commands took 2^21 buckets of 176 bytes, 371 MB,
//! and W2 measured 510 bytes of RSS per queued command (issue 29). Here an
//! empty bucket costs 4 bytes, the pairs are 8-byte aligned and packed, and
//! the slab gives memory back once a backlog drains.

use super::Live;
use crate::engine::command::CommandId;
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// An id as two words: an 8-byte-aligned pair, where a `u128` would pad
/// every handle to 16.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u64; 2]);

impl Key {
    fn of(id: &CommandId) -> Key {
        Key([(id.0 >> 64) as u64, id.0 as u64])
    }

    fn id(self) -> CommandId {
        CommandId((u128::from(self.0[0]) << 64) | u128::from(self.0[1]))
    }
}

fn hash(id: &CommandId) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(id)
}

/// Below this many slots the table never shrinks: a small box's queue
/// breathing in and out should not reallocate.
const MIN_SHRINK: usize = 1024;

#[derive(Default)]
pub(super) struct LiveTable {
    slots: Vec<(Key, Live)>,
    index: HashTable<u32>,
}

impl LiveTable {
    fn find(&self, id: &CommandId) -> Option<usize> {
        let key = Key::of(id);
        let slots = &self.slots;
        self.index
            .find(hash(id), |&s| slots[s as usize].0 == key)
            .map(|&s| s as usize)
    }

    pub fn get(&self, id: &CommandId) -> Option<&Live> {
        self.find(id).map(|i| &self.slots[i].1)
    }

    pub fn get_mut(&mut self, id: &CommandId) -> Option<&mut Live> {
        self.find(id).map(|i| &mut self.slots[i].1)
    }

    pub fn contains_key(&self, id: &CommandId) -> bool {
        self.find(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn reserve(&mut self, n: usize) {
        self.slots.reserve(n);
        let slots = &self.slots;
        self.index.reserve(n, |&s| hash(&slots[s as usize].0.id()));
    }

    /// Insert or replace; the handle it replaced, if any.
    pub fn insert(&mut self, id: CommandId, live: Live) -> Option<Live> {
        if let Some(i) = self.find(&id) {
            return Some(std::mem::replace(&mut self.slots[i].1, live));
        }
        let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 live commands");
        let slots = &self.slots;
        self.index
            .insert_unique(hash(&id), slot, |&s| hash(&slots[s as usize].0.id()));
        self.slots.push((Key::of(&id), live));
        None
    }

    pub fn remove(&mut self, id: &CommandId) -> Option<Live> {
        let key = Key::of(id);
        let slots = &self.slots;
        let (slot, _) = self
            .index
            .find_entry(hash(id), |&s| slots[s as usize].0 == key)
            .ok()?
            .remove();
        let (slot, last) = (slot as usize, self.slots.len() - 1);
        if slot != last {
            // The last pair moves into the hole: its bucket must follow.
            let moved = self.slots[last].0.id();
            let bucket = self
                .index
                .find_mut(hash(&moved), |&s| s as usize == last)
                .expect("every slot is indexed");
            *bucket = slot as u32;
        }
        let (_, live) = self.slots.swap_remove(slot);
        self.maybe_shrink();
        Some(live)
    }

    /// Give memory back once a backlog has drained to a quarter.
    fn maybe_shrink(&mut self) {
        let cap = self.slots.capacity();
        if cap > MIN_SHRINK && self.slots.len() < cap / 4 {
            let keep = (self.slots.len() * 2).max(MIN_SHRINK);
            self.slots.shrink_to(keep);
            let slots = &self.slots;
            self.index
                .shrink_to(keep, |&s| hash(&slots[s as usize].0.id()));
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (CommandId, &Live)> {
        self.slots.iter().map(|(k, l)| (k.id(), l))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (CommandId, &mut Live)> {
        self.slots.iter_mut().map(|(k, l)| (k.id(), l))
    }

    /// Bytes the table holds (both parts, by capacity).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<(Key, Live)>()
            + self.index.capacity() * (std::mem::size_of::<u32>() + 1)
    }
}

impl std::ops::Index<&CommandId> for LiveTable {
    type Output = Live;

    fn index(&self, id: &CommandId) -> &Live {
        self.get(id).expect("a live command")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::command::Priority;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn handle(order: u64) -> Live {
        Live {
            device: 0,
            gen: 0,
            priority: Priority::Normal,
            order,
            group: 0,
            requeue_group: None,
            attempts: 0,
            max_attempts: 1,
            created_at: 0,
            expires_at: None,
            not_before: None,
            phase: super::super::Phase::Ready,
            origin: 0,
            rare: None,
        }
    }

    proptest! {
        /// Any run of inserts, replacements and removals reads back as a
        /// plain map would, with ids that share their high or low word.
        #[test]
        fn the_table_reads_back_as_a_map(ops in proptest::collection::vec((0u8..3, 0u16..300, any::<u64>()), 1..600)) {
            let mut t = LiveTable::default();
            let mut model: HashMap<u128, u64> = HashMap::new();
            let id = |k: u16| CommandId(((k as u128 % 7) << 64) | (k as u128 / 7));
            for (op, k, v) in ops {
                let i = id(k);
                match op {
                    0 | 1 => {
                        let old = t.insert(i, handle(v)).map(|l| l.order);
                        prop_assert_eq!(old, model.insert(i.0, v));
                    }
                    _ => {
                        let old = t.remove(&i).map(|l| l.order);
                        prop_assert_eq!(old, model.remove(&i.0));
                    }
                }
                prop_assert_eq!(t.len(), model.len());
            }
            for k in 0..300u16 {
                let i = id(k);
                prop_assert_eq!(t.get(&i).map(|l| l.order), model.get(&i.0).copied());
                prop_assert_eq!(t.contains_key(&i), model.contains_key(&i.0));
            }
            let mut seen: Vec<u128> = t.iter().map(|(i, _)| i.0).collect();
            seen.sort_unstable();
            let mut want: Vec<u128> = model.keys().copied().collect();
            want.sort_unstable();
            prop_assert_eq!(seen, want);
        }
    }

    #[test]
    fn a_queued_commands_handle_stays_small() {
        // What every queued command costs before its ready-queue entry:
        // grow it only knowing that a million of them pay (issue 29).
        let pair = std::mem::size_of::<(Key, Live)>();
        assert!(pair <= 136, "a handle grew to {pair} bytes");
        assert_eq!(std::mem::align_of::<(Key, Live)>(), 8);
    }

    #[test]
    fn a_handle_costs_a_packed_pair_and_a_drained_backlog_gives_its_memory_back() {
        let n = 100_000u64;
        let mut t = LiveTable::default();
        t.reserve(n as usize);
        for k in 0..n {
            t.insert(CommandId(u128::from(k) * 0x9E37_79B9_7F4A_7C15), handle(k));
        }
        let per = t.heap_bytes() as f64 / n as f64;
        let pair = std::mem::size_of::<(Key, Live)>() as f64;
        assert!(
            per < pair * 1.2 + 10.0,
            "{per:.0} bytes per handle for a {pair}-byte pair"
        );
        let full = t.heap_bytes();
        for k in 0..n - 10 {
            let got = t.remove(&CommandId(u128::from(k) * 0x9E37_79B9_7F4A_7C15));
            assert_eq!(got.map(|l| l.order), Some(k));
        }
        assert!(
            t.heap_bytes() * 20 < full,
            "{} of {full} bytes kept for 10 handles",
            t.heap_bytes()
        );
        for k in n - 10..n {
            assert_eq!(
                t[&CommandId(u128::from(k) * 0x9E37_79B9_7F4A_7C15)].order,
                k
            );
        }
    }
}

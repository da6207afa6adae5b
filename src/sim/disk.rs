//! The simulated disk: what a box's store holds, with sled's two levels.
//! A batch is *written* (readable at once, as sled's reads see it) but only
//! *flushed* batches survive a crash. Faults make the next write or flush
//! fail, as a full or failing disk does under sled. A failed flush tears
//! what it was flushing at its worst: the removals of the unflushed
//! batches reach the disk, their inserts do not (sled 0.34 was seen to do
//! so on a full disk, losing a relocated command; see ARCHITECTURE.md).

use crate::command::{CommandId, DeviceId};
use crate::journal::{Entry, ResultRecord, UpEntry};
use crate::store::{DeviceRecord, Group, GroupWrite};
use std::collections::{BTreeMap, BTreeSet};

/// Everything the store keeps that replay reads back.
#[derive(Clone, Debug, Default)]
pub struct Image {
    pub journal: BTreeMap<u64, Vec<Entry>>,
    pub results: BTreeMap<u64, Vec<ResultRecord>>,
    pub outbox: BTreeMap<u64, Vec<UpEntry>>,
    pub outbox_next: Option<u64>,
    pub devices: BTreeMap<DeviceId, DeviceRecord>,
    pub cursors: BTreeMap<DeviceId, u64>,
    pub cancel_marks: BTreeSet<CommandId>,
    pub last_seq: u64,
}

impl Image {
    /// Only the removals of a batch: a torn write.
    fn apply_removals(&mut self, b: &Batch) {
        let Some(w) = &b.group else { return };
        for s in &w.drop_journal {
            self.journal.remove(s);
        }
        for s in &w.drop_results {
            self.results.remove(s);
        }
        for s in &w.drop_outbox {
            self.outbox.remove(s);
        }
    }

    /// Apply one batch exactly as `Store::commit` does.
    fn apply(&mut self, b: &Batch) {
        for r in &b.devices {
            self.devices.insert(r.id.clone(), r.clone());
        }
        let Some(w) = &b.group else { return };
        if !w.journal.is_empty() {
            self.journal.insert(w.seq, w.journal.clone());
        }
        if !w.results.is_empty() {
            self.results.insert(w.seq, w.results.clone());
        }
        for s in &w.drop_journal {
            self.journal.remove(s);
        }
        for s in &w.drop_results {
            self.results.remove(s);
        }
        if !w.outbox.is_empty() {
            self.outbox.insert(w.seq, w.outbox.clone());
        }
        for s in &w.drop_outbox {
            self.outbox.remove(s);
        }
        if w.outbox_next.is_some() {
            self.outbox_next = w.outbox_next;
        }
        for (e, c) in &w.cursors {
            self.cursors.insert(e.clone(), *c);
        }
        for (id, set) in &w.cancel_marks {
            if *set {
                self.cancel_marks.insert(*id);
            } else {
                self.cancel_marks.remove(id);
            }
        }
        self.last_seq = self.last_seq.max(w.seq);
    }

    /// The groups in commit order, as `Store::replay` yields them.
    pub fn groups(&self) -> Vec<Group> {
        let mut seqs: BTreeSet<u64> = self.journal.keys().copied().collect();
        seqs.extend(self.results.keys());
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            if let Some(j) = self.journal.get(&s) {
                out.push(Group::Journal(s, j.clone()));
            }
            if let Some(r) = self.results.get(&s) {
                out.push(Group::Results(s, r.clone()));
            }
        }
        out
    }

    /// The newest result record of `id` (a retry writes a new one).
    pub fn result(&self, seq: u64, id: CommandId) -> Option<&ResultRecord> {
        self.results.get(&seq)?.iter().rev().find(|r| r.id == id)
    }
}

/// One sled batch: a group and the device records written with it.
#[derive(Debug, Default)]
pub struct Batch {
    pub group: Option<GroupWrite>,
    pub devices: Vec<DeviceRecord>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DiskError {
    Write,
    Flush,
}

#[derive(Debug, Default)]
pub struct SimDisk {
    durable: Image,
    /// `durable` plus the written, unflushed batches: what reads see.
    current: Image,
    unflushed: Vec<Batch>,
    /// Armed faults: the next write or flush fails.
    pub fail_write: bool,
    pub fail_flush: bool,
}

impl SimDisk {
    /// What a read sees now (sled reads include unflushed writes).
    pub fn view(&self) -> &Image {
        &self.current
    }

    pub fn write(&mut self, b: Batch) -> Result<(), DiskError> {
        if std::mem::take(&mut self.fail_write) {
            return Err(DiskError::Write);
        }
        self.current.apply(&b);
        self.unflushed.push(b);
        Ok(())
    }

    /// Make every written batch durable; returns them, so the caller can
    /// count what reached the disk for good.
    pub fn flush(&mut self) -> Result<Vec<Batch>, DiskError> {
        if std::mem::take(&mut self.fail_flush) {
            for b in &self.unflushed {
                self.durable.apply_removals(b);
            }
            return Err(DiskError::Flush);
        }
        let done = std::mem::take(&mut self.unflushed);
        for b in &done {
            self.durable.apply(b);
        }
        Ok(done)
    }

    /// Power cut: unflushed batches are gone.
    pub fn crash(&mut self) {
        self.unflushed.clear();
        self.current = self.durable.clone();
        self.fail_write = false;
        self.fail_flush = false;
    }

    pub fn unflushed(&self) -> usize {
        self.unflushed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(seq: u64) -> Batch {
        Batch {
            group: Some(GroupWrite {
                seq,
                cursors: vec![("e".into(), seq)],
                journal: vec![Entry::Requeued {
                    id: CommandId(seq as u128),
                    gen: 1,
                    attempts: 1,
                    not_before: None,
                }],
                ..Default::default()
            }),
            devices: vec![],
        }
    }

    #[test]
    fn a_crash_keeps_flushed_batches_and_drops_the_rest() {
        let mut d = SimDisk::default();
        d.write(group(1)).unwrap();
        d.flush().unwrap();
        d.write(group(2)).unwrap();
        assert_eq!(d.view().cursors["e"], 2, "reads see unflushed writes");
        d.crash();
        assert_eq!(d.view().cursors["e"], 1);
        assert_eq!(d.view().last_seq, 1);
    }

    #[test]
    fn failed_writes_keep_nothing_and_failed_flushes_keep_only_removals() {
        let mut d = SimDisk {
            fail_write: true,
            ..SimDisk::default()
        };
        assert_eq!(d.write(group(1)), Err(DiskError::Write));
        assert!(d.view().cursors.is_empty());
        d.write(group(2)).unwrap();
        d.flush().unwrap();
        assert!(d.view().journal.contains_key(&2));
        // A batch that writes group 3 and drops group 2, torn by a failed
        // flush: the drop is on disk, group 3 is not.
        let mut torn = group(3);
        if let Some(w) = torn.group.as_mut() {
            w.drop_journal = vec![2];
        }
        d.write(torn).unwrap();
        d.fail_flush = true;
        assert_eq!(d.flush().unwrap_err(), DiskError::Flush);
        d.crash();
        assert!(
            d.view().journal.is_empty(),
            "the removal stayed, group 3 is not there"
        );
        assert_eq!(d.view().cursors["e"], 2, "the inserts did not");
    }
}

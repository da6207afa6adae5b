//! The simulated disk: what a box's store holds, with sled's two levels.
//! A batch is *written* (readable at once, as sled's reads see it) but only
//! *flushed* batches survive a crash. Faults make the next write or flush
//! fail, as a full or failing disk does under sled. A failed flush tears
//! what it was flushing at its worst: the removals of the unflushed
//! batches reach the disk, their inserts do not (sled 0.34 was seen to do
//! so on a full disk, losing a relocated command; see ARCHITECTURE.md).
//!
//! One image holds what reads see; each unflushed write keeps an undo log
//! of what it replaced, so a crash rolls back only what was not flushed.
//! Copying a durable image on every crash made a step's cost grow with the
//! length of the run (issue 28: 28k steps/s over 20k steps, 1.7k over 200k).

use crate::engine::command::{CommandId, DeviceId};
use crate::engine::journal::{Cursor, Entry, ResultRecord, UpEntry};
use crate::engine::journal::{DeviceRecord, Group, GroupWrite};
use std::collections::{BTreeMap, BTreeSet};

/// Everything the store keeps that replay reads back.
#[derive(Clone, Debug, Default)]
pub struct Image {
    /// Journal records by group seq: commands entering or re-entering the
    /// queue.
    pub journal: BTreeMap<u64, Vec<Entry>>,
    /// Result records by group seq: commands that ended in that group.
    pub results: BTreeMap<u64, Vec<ResultRecord>>,
    /// An edge's upstream outbox records by group seq, until the hub
    /// acknowledges them.
    pub outbox: BTreeMap<u64, Vec<UpEntry>>,
    /// The outbox's next seq (`None`: never written; replay starts at 1).
    pub outbox_next: Option<u64>,
    /// Every enrolled device's record: labels, standing, revocation.
    pub devices: BTreeMap<DeviceId, DeviceRecord>,
    /// A hub's upstream cursors: per edge, the highest outbox seq applied.
    pub cursors: BTreeMap<DeviceId, Cursor>,
    /// Cancels sent down to an edge and not yet confirmed.
    pub cancel_marks: BTreeSet<CommandId>,
    /// The highest group seq ever written, so a restart never reuses one
    /// whose records were dropped.
    pub last_seq: u64,
}

/// What one change replaced, to put back on a crash.
#[derive(Debug)]
enum Undo {
    Journal(u64, Option<Vec<Entry>>),
    Results(u64, Option<Vec<ResultRecord>>),
    Outbox(u64, Option<Vec<UpEntry>>),
    OutboxNext(Option<u64>),
    Device(DeviceId, Option<DeviceRecord>),
    Cursor(DeviceId, Option<Cursor>),
    Mark(CommandId, bool),
    LastSeq(u64),
}

impl Image {
    /// Apply one batch exactly as `Store::commit` does, logging what it
    /// replaced; with `removals_only`, only its removals (a torn write).
    fn apply(&mut self, b: &Batch, removals_only: bool, undo: &mut Vec<Undo>) {
        if !removals_only {
            for r in &b.devices {
                let old = self.devices.insert(r.id.clone(), r.clone());
                undo.push(Undo::Device(r.id.clone(), old));
            }
        }
        let Some(w) = &b.group else { return };
        if !removals_only {
            if !w.journal.is_empty() {
                let old = self.journal.insert(w.seq, w.journal.clone());
                undo.push(Undo::Journal(w.seq, old));
            }
            if !w.results.is_empty() {
                let old = self.results.insert(w.seq, w.results.clone());
                undo.push(Undo::Results(w.seq, old));
            }
        }
        for s in &w.drop_journal {
            if let Some(old) = self.journal.remove(s) {
                undo.push(Undo::Journal(*s, Some(old)));
            }
        }
        for s in &w.drop_results {
            if let Some(old) = self.results.remove(s) {
                undo.push(Undo::Results(*s, Some(old)));
            }
        }
        if !removals_only && !w.outbox.is_empty() {
            let old = self.outbox.insert(w.seq, w.outbox.clone());
            undo.push(Undo::Outbox(w.seq, old));
        }
        for s in &w.drop_outbox {
            if let Some(old) = self.outbox.remove(s) {
                undo.push(Undo::Outbox(*s, Some(old)));
            }
        }
        if removals_only {
            return;
        }
        if w.outbox_next.is_some() {
            undo.push(Undo::OutboxNext(self.outbox_next));
            self.outbox_next = w.outbox_next;
        }
        for (e, c) in &w.cursors {
            let old = self.cursors.insert(e.clone(), *c);
            undo.push(Undo::Cursor(e.clone(), old));
        }
        for (id, set) in &w.cancel_marks {
            let was = if *set {
                !self.cancel_marks.insert(*id)
            } else {
                self.cancel_marks.remove(id)
            };
            undo.push(Undo::Mark(*id, was));
        }
        undo.push(Undo::LastSeq(self.last_seq));
        self.last_seq = self.last_seq.max(w.seq);
    }

    fn undo(&mut self, u: Undo) {
        fn put<K: Ord, V>(m: &mut BTreeMap<K, V>, k: K, old: Option<V>) {
            match old {
                Some(v) => m.insert(k, v),
                None => m.remove(&k),
            };
        }
        match u {
            Undo::Journal(s, old) => put(&mut self.journal, s, old),
            Undo::Results(s, old) => put(&mut self.results, s, old),
            Undo::Outbox(s, old) => put(&mut self.outbox, s, old),
            Undo::OutboxNext(old) => self.outbox_next = old,
            Undo::Device(id, old) => put(&mut self.devices, id, old),
            Undo::Cursor(id, old) => put(&mut self.cursors, id, old),
            Undo::Mark(id, true) => {
                self.cancel_marks.insert(id);
            }
            Undo::Mark(id, false) => {
                self.cancel_marks.remove(&id);
            }
            Undo::LastSeq(s) => self.last_seq = s,
        }
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
    /// The round's group write (`None`: only device records changed).
    pub group: Option<GroupWrite>,
    /// Device records written in the same batch.
    pub devices: Vec<DeviceRecord>,
}

/// An armed fault that went off: the box ends (or rebuilds in place), as
/// `outpost serve` does on a failed commit.
#[derive(Debug, PartialEq, Eq)]
pub enum DiskError {
    /// The write failed: nothing of the batch reached the disk.
    Write,
    /// The flush failed and tore: the unflushed batches' removals are
    /// durable, their inserts gone.
    Flush,
}

/// One box's store: an image that reads see, the batches written since the
/// last flush and what they replaced, and the faults armed for the next
/// write or flush.
#[derive(Debug, Default)]
pub struct SimDisk {
    /// What reads see: the durable state plus the unflushed batches.
    image: Image,
    unflushed: Vec<Batch>,
    /// What the unflushed batches replaced, in order.
    undo: Vec<Undo>,
    /// Commands whose result records a dropped result group took off the
    /// disk for good (retention, or a torn flush's removals).
    pruned: Vec<CommandId>,
    /// Armed faults: the next write or flush fails.
    pub fail_write: bool,
    /// The next flush fails (and tears, see `flush`).
    pub fail_flush: bool,
}

impl SimDisk {
    /// What a read sees now (sled reads include unflushed writes).
    pub fn view(&self) -> &Image {
        &self.image
    }

    /// Write a batch: readable at once, durable only at the next flush.
    /// With `fail_write` armed, nothing is written and the fault is spent.
    pub fn write(&mut self, b: Batch) -> Result<(), DiskError> {
        if std::mem::take(&mut self.fail_write) {
            return Err(DiskError::Write);
        }
        self.image.apply(&b, false, &mut self.undo);
        self.unflushed.push(b);
        Ok(())
    }

    /// Make every written batch durable; returns them, so the caller can
    /// count what reached the disk for good.
    pub fn flush(&mut self) -> Result<Vec<Batch>, DiskError> {
        if std::mem::take(&mut self.fail_flush) {
            // Torn: back to the durable state, then only the removals,
            // which are durable now.
            self.roll_back();
            for b in &std::mem::take(&mut self.unflushed) {
                self.image.apply(b, true, &mut self.undo);
            }
            self.settle_undo();
            return Err(DiskError::Flush);
        }
        self.settle_undo();
        Ok(std::mem::take(&mut self.unflushed))
    }

    /// The logged changes are durable now: forget them, noting the result
    /// records they removed.
    fn settle_undo(&mut self) {
        for u in self.undo.drain(..) {
            if let Undo::Results(_, Some(rs)) = u {
                self.pruned.extend(rs.iter().map(|r| r.id));
            }
        }
    }

    /// Commands whose result records left the disk for good since the last
    /// call.
    pub fn take_pruned(&mut self) -> Vec<CommandId> {
        std::mem::take(&mut self.pruned)
    }

    fn roll_back(&mut self) {
        while let Some(u) = self.undo.pop() {
            self.image.undo(u);
        }
    }

    /// Power cut: unflushed batches are gone.
    pub fn crash(&mut self) {
        self.roll_back();
        self.unflushed.clear();
        self.fail_write = false;
        self.fail_flush = false;
    }

    /// Batches written and not yet flushed.
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
                cursors: vec![("e".into(), Cursor { epoch: 1, seq })],
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
        assert_eq!(d.view().cursors["e"].seq, 2, "reads see unflushed writes");
        d.crash();
        assert_eq!(d.view().cursors["e"].seq, 1);
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
        assert_eq!(d.view().cursors["e"].seq, 2, "the inserts did not");
    }
}

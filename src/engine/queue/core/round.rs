//! The round: what one group commit writes (sealed from what the requests
//! since the last one changed), the relocation of a straggler group, and
//! the effects the shell acts on once the round is durable.

use super::*;

/// A sealed round: the group to write, and the retryable results whose
/// payload the shell copies in from the journal before writing.
#[derive(Debug, Default)]
pub struct Sealed {
    /// The group commit, without the commands its retryable results keep.
    pub write: GroupWrite,
    /// Results that keep their command for `retry`: (index in
    /// `write.results`, journal group holding its payload).
    pub payload_from: Vec<(usize, u64)>,
}

/// Where a round reads the journal groups already on disk: the writer's
/// store (through its cache), the simulation's disk, the tests' map.
pub trait JournalSource {
    /// Group `seq`'s entries, if it is on disk.
    fn entries(&mut self, seq: u64) -> Option<Vec<Entry>>;

    /// Command `id` as group `seq` holds it, payload included.
    fn command(&mut self, seq: u64, id: CommandId) -> Option<Command> {
        self.entries(seq)?.iter().find_map(|e| e.command_for(id))
    }
}

/// A journal held as a map (the simulation's disk, the tests' disk).
impl JournalSource for &BTreeMap<u64, Vec<Entry>> {
    fn entries(&mut self, seq: u64) -> Option<Vec<Entry>> {
        self.get(&seq).cloned()
    }

    fn command(&mut self, seq: u64, id: CommandId) -> Option<Command> {
        self.get(&seq)?.iter().find_map(|e| e.command_for(id))
    }
}

/// A pinned group moves in one batch only while it holds at most this
/// many times `relocate_max_pins` live commands (1,024 by default).
pub const RELOCATE_MAX_BATCHES: u32 = 64;

/// Debug builds check the invariants after every round up to this many
/// live commands.
const DEBUG_CHECK_LIVE: usize = 1_000;

/// One round, sealed: the records to write as one group commit, and what
/// to do once they are durable — never before (DESIGN §4).
#[derive(Debug)]
pub struct Round {
    /// What to write as one group commit (one atomic batch and one flush).
    pub write: GroupWrite,
    /// Deliveries, cancels, session closes, events and device records: to act
    /// on only once `write` is durable.
    pub effects: Effects,
    /// Retryable results whose command was not found on disk (a read
    /// failed): their record keeps no payload, so `retry` cannot requeue
    /// them. Empty unless the disk misbehaves.
    pub missing_payloads: Vec<CommandId>,
}

impl QueueCore {
    /// The round protocol, written once for every shell (the writer, the
    /// simulation, the core tests): relocate one straggler group, seal,
    /// and copy the payloads that retryable results keep from the journal.
    /// The shell ticks before, writes `write` as one group commit, and
    /// acts on `effects` only once that is durable.
    pub fn round(&mut self, now: Millis, disk: &mut impl JournalSource) -> Round {
        if let Some(seq) = self.relocation_candidate() {
            if let Some(entries) = disk.entries(seq) {
                self.relocate(seq, entries);
            }
        }
        let sealed = self.seal(now);
        let mut write = sealed.write;
        let mut missing_payloads = Vec::new();
        for (i, g) in sealed.payload_from {
            let id = write.results[i].id;
            let command = if g == write.seq {
                write.journal.iter().find_map(|e| e.command_for(id))
            } else {
                disk.command(g, id)
            };
            if command.is_none() {
                missing_payloads.push(id);
            }
            write.results[i].command = command;
        }
        let round = Round {
            write,
            effects: self.take_effects(),
            missing_payloads,
        };
        // Debug builds check every round while the queue is small enough
        // for the check (linear in what is live) not to change what the
        // tests measure; the simulation and the core tests check always.
        if cfg!(debug_assertions) && self.live.len() <= DEBUG_CHECK_LIVE {
            if let Err(e) = self.check_invariants() {
                panic!("queue invariant broken after a round: {e}");
            }
        }
        round
    }

    /// Close the round: the records to write as one group. After writing it
    /// durably, the shell takes `take_effects`. Shells call [`Self::round`].
    pub fn seal(&mut self, now: Millis) -> Sealed {
        self.retain_results(now);
        let seq = self.open_seq;
        let ready = std::mem::replace(
            &mut self.unpinned_before,
            std::mem::take(&mut self.unpinned),
        );
        let mut drop_journal: Vec<u64> = ready
            .into_iter()
            .filter(|s| self.pins.get(s) == Some(&0))
            .collect();
        drop_journal.sort_unstable();
        drop_journal.dedup();
        for s in &drop_journal {
            self.pins.remove(s);
            self.requeue_holders.remove(s);
        }
        let (outbox, drop_outbox, outbox_next) = self.outbox.seal(seq, now);
        let w = GroupWrite {
            seq,
            journal: std::mem::take(&mut self.journal),
            results: std::mem::take(&mut self.finished),
            drop_journal,
            drop_results: std::mem::take(&mut self.drop_results),
            outbox,
            drop_outbox,
            outbox_next,
            cursors: std::mem::take(&mut self.cursor_writes),
            cancel_marks: std::mem::take(&mut self.cancel_marks),
            live_hint: (seq % LIVE_HINT_EVERY == 0).then_some(self.live.len() as u64),
        };
        // A group seq is used once: a round that wrote any record moves on.
        if !w.journal.is_empty() || !w.results.is_empty() || !w.outbox.is_empty() {
            if w.journal.is_empty() {
                // Nothing pins a group that holds no journal record.
                self.pins.remove(&seq);
            }
            self.open_seq += 1;
            self.stats.group_commits_total += 1;
        }
        Sealed {
            write: w,
            payload_from: std::mem::take(&mut self.payload_from),
        }
    }

    /// What the sealed round asks the shell to do.
    pub fn take_effects(&mut self) -> Effects {
        let mut fx = std::mem::take(&mut self.effects);
        // A command delivered and then ended in the same round (an edge's
        // result arriving in the batch that freed the window for it) has
        // no record left to deliver from: the shell must not try.
        // (Simulation seed 10.)
        fx.deliveries.retain(|d| {
            self.live.get(&d.id).is_some_and(
                |l| matches!(l.phase, Phase::InFlight { attempt, .. } if attempt == d.attempt),
            )
        });
        fx
    }

    /// The oldest journal group worth re-journalling, if any: far behind
    /// the head for the commands still pinning it. A group with a few
    /// stragglers moves once `relocate_lag` groups behind; one with k times
    /// `relocate_max_pins` waits k times as long, so the copies cost at
    /// most `relocate_max_pins / relocate_lag` commands per group however
    /// the stragglers come. Without that, five long-lived commands (a
    /// backlog for an offline edge) held the oldest group for good, and
    /// with it every result behind it past its retention (the simulation
    /// found results growing without bound). A group of more than
    /// [`RELOCATE_MAX_BATCHES`] times the limit stays put: one batch
    /// copying it would be too big for a small box.
    pub fn relocation_candidate(&self) -> Option<u64> {
        let (&seq, &pins) = self.pins.iter().find(|(_, &n)| n > 0)?;
        let max = self.limits.relocate_max_pins.max(1);
        let batches = pins.div_ceil(max);
        (batches <= RELOCATE_MAX_BATCHES
            && self.open_seq.saturating_sub(seq) > self.limits.relocate_lag * batches as u64)
            .then_some(seq)
    }

    /// Re-journal the live commands pinned to group `seq` into the open
    /// group; `entries` is that group as read from disk.
    pub fn relocate(&mut self, seq: u64, entries: Vec<Entry>) {
        for e in entries {
            let mut e = match e {
                Entry::Enqueued(e) => e,
                Entry::Broadcast(b) => {
                    self.relocate_broadcast(seq, b);
                    continue;
                }
                Entry::Requeued { .. } => continue,
            };
            let id = e.command.id;
            // A dependency decided since: the copy says so, or its replay
            // would look for the dependency's result, which retention may
            // drop once this copy is the older journal group's successor
            // (the dependent ended Dead after a restart; simulation).
            // `after` is not among the signed claims.
            if e.command.after.is_some_and(|d| !self.is_live(d)) {
                e.command.after = None;
            }
            let Some(l) = self.live.get_mut(&id) else {
                continue;
            };
            if l.gen != e.gen || l.group != seq {
                continue;
            }
            l.group = self.open_seq;
            e.attempts = l.attempts;
            e.not_before = l.not_before;
            let rg = l.requeue_group.take();
            self.journal.push(Entry::Enqueued(e));
            self.unpin(seq);
            *self.pins.entry(self.open_seq).or_insert(0) += 1;
            if let Some(rg) = rg {
                self.unpin(rg);
            }
        }
        // Requeue pins held by commands enqueued elsewhere move too.
        let movers: Vec<CommandId> = self
            .requeue_holders
            .remove(&seq)
            .unwrap_or_default()
            .into_iter()
            .filter(|id| {
                self.live
                    .get(id)
                    .is_some_and(|l| l.requeue_group == Some(seq))
            })
            .collect();
        for id in movers {
            let l = self.live.get_mut(&id).expect("listed above");
            l.requeue_group = Some(self.open_seq);
            self.journal.push(Entry::Requeued {
                id,
                gen: l.gen,
                attempts: l.attempts,
                not_before: l.not_before,
            });
            self.unpin(seq);
            *self.pins.entry(self.open_seq).or_insert(0) += 1;
            self.requeue_holders
                .entry(self.open_seq)
                .or_default()
                .push(id);
        }
    }

    /// Re-journal a broadcast whole: the payload once, each child with its
    /// progress, and the end of each child that finished (so replay never
    /// brings a finished child back).
    pub(super) fn relocate_broadcast(&mut self, seq: u64, mut b: Broadcast) {
        let pid = b.command.id;
        // As for a single command: a decided dependency is written decided.
        if b.command.after.is_some_and(|d| !self.is_live(d)) {
            b.command.after = None;
        }
        let Some(p) = self.parents.get_mut(&pid) else {
            return;
        };
        if p.group != seq {
            return;
        }
        p.group = self.open_seq;
        let ends = p.ends.clone();
        for (c, end) in b.children.iter_mut().zip(ends) {
            c.end = end;
            let Some(l) = self.live.get_mut(&c.id) else {
                continue;
            };
            if l.parent() != Some(pid) || l.group != seq {
                continue;
            }
            l.group = self.open_seq;
            c.attempts = l.attempts;
            c.not_before = l.not_before;
            let rg = l.requeue_group.take();
            self.unpin(seq);
            *self.pins.entry(self.open_seq).or_insert(0) += 1;
            if let Some(rg) = rg {
                self.unpin(rg);
            }
        }
        self.journal.push(Entry::Broadcast(b));
    }

    /// The journal group that holds a live command's payload.
    pub fn payload_group(&self, id: CommandId) -> Option<u64> {
        self.live.get(&id).map(|l| l.group)
    }
}

//! The upstream outbox's bookkeeping (DESIGN §7), sans IO: what the queue
//! core reports upstream is appended here during a round, sealed into the
//! round's group (so it is written in the same batch as the change it
//! reports), and dropped group by group once the upstream has acknowledged
//! it. The shell streams it from the store; the hub dedupes by `seq`.
//!
//! Bounded: at `max` unacknowledged entries, telemetry-like items (state
//! changes on the way, last-seen, device events) are compacted: only the
//! latest of each kind per device is held (in memory, so at most a few per
//! device) and written once the hub has acknowledged enough to make room;
//! the ones it replaced are counted as skipped. Results and device records
//! are always written, so the hub never loses a result, and the box never
//! drops one silently.
//!
//! Off (and free) until the box has an uplink.

use crate::engine::journal::{UpEntry, UpItem};
use std::collections::BTreeMap;

/// Depth and progress, for `status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutboxStats {
    /// Entries written and not yet acknowledged upstream.
    pub depth: u64,
    /// The highest seq the upstream acknowledged (0: none yet).
    pub acked: u64,
    /// The seq the next entry gets.
    pub next_seq: u64,
    /// Telemetry-like items dropped because the outbox was full (a newer
    /// one of the same kind for the same device replaced them).
    pub skipped: u64,
    /// Telemetry items held back while full: the latest per device and kind.
    pub held: u64,
    /// When the oldest unacknowledged record was written (for a box
    /// restarted since: when it started), if any.
    pub oldest_at: Option<crate::engine::command::Millis>,
}

/// One outbox group on disk: the seqs it holds.
#[derive(Clone, Copy, Debug)]
struct Span {
    last: u64,
    count: u64,
    at: crate::engine::command::Millis,
}

/// The outbox's index in memory: the seqs of the groups on disk not yet
/// acknowledged, the entries of the round still open, and what is held back
/// while full. The entries themselves are on disk, written with their group.
#[derive(Debug)]
pub struct Outbox {
    on: bool,
    max: u64,
    next_seq: u64,
    acked: u64,
    groups: BTreeMap<u64, Span>,
    depth: u64,
    open: Vec<UpEntry>,
    skipped: u64,
    /// While full: the latest telemetry item per (device, kind).
    held: BTreeMap<(String, u8), UpItem>,
}

impl Outbox {
    /// An outbox that records nothing until `enable`.
    pub fn off() -> Self {
        Outbox {
            on: false,
            max: 0,
            next_seq: 1,
            acked: 0,
            groups: BTreeMap::new(),
            depth: 0,
            open: Vec::new(),
            skipped: 0,
            held: BTreeMap::new(),
        }
    }

    /// Start recording, holding at most `max` unacknowledged entries of
    /// telemetry (results and device records go beyond it).
    pub fn enable(&mut self, max: u64) {
        self.on = true;
        self.max = max.max(1);
    }

    /// The oldest group still holding unacknowledged records.
    pub fn oldest_group(&self) -> Option<u64> {
        self.groups.keys().next().copied()
    }

    /// Whether it records (the box has an uplink); while off, `push` drops
    /// everything.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// The next seq as the store kept it (groups may all be gone).
    pub fn restore_next_seq(&mut self, next: u64) {
        self.next_seq = self.next_seq.max(next);
    }

    /// The seq the next recorded entry gets (seqs start at 1).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Rebuild from an outbox group read back at start.
    pub fn replay(&mut self, group: u64, entries: &[UpEntry], now: crate::engine::command::Millis) {
        let Some(last) = entries.last() else {
            return;
        };
        self.next_seq = self.next_seq.max(last.seq + 1);
        let count = entries.len() as u64;
        self.groups.insert(
            group,
            Span {
                last: last.seq,
                count,
                at: now,
            },
        );
        self.depth += count;
    }

    /// Report `item` upstream with this round. Returns whether it was
    /// recorded now (false: off, or telemetry held back while full).
    pub fn push(&mut self, item: UpItem) -> bool {
        if !self.on {
            return false;
        }
        if item.is_telemetry() && self.full() {
            let key = match &item {
                UpItem::State { device, .. } => (device.clone(), 0),
                // The latest presence stands for every earlier one.
                UpItem::Seen { device, .. } | UpItem::Presence { device, .. } => {
                    (device.clone(), 1)
                }
                UpItem::Event { device, .. } => (device.clone(), 2),
                _ => unreachable!("only telemetry is held"),
            };
            if self.held.insert(key, item).is_some() {
                self.skipped += 1;
            }
            return false;
        }
        self.append(item);
        true
    }

    fn full(&self) -> bool {
        self.depth + self.open.len() as u64 >= self.max
    }

    fn append(&mut self, item: UpItem) {
        self.open.push(UpEntry {
            seq: self.next_seq,
            item,
        });
        self.next_seq += 1;
    }

    /// Close the round as group `seq`: the entries to write with it, the
    /// acknowledged groups to delete in the same batch, and the next seq to
    /// keep when it moved (so seqs never go back, even once every group
    /// holding them is deleted).
    pub fn seal(
        &mut self,
        seq: u64,
        now: crate::engine::command::Millis,
    ) -> (Vec<UpEntry>, Vec<u64>, Option<u64>) {
        let done: Vec<u64> = self
            .groups
            .iter()
            .take_while(|(_, s)| s.last <= self.acked)
            .map(|(&g, _)| g)
            .collect();
        for g in &done {
            if let Some(s) = self.groups.remove(g) {
                self.depth -= s.count;
            }
        }
        // Room again: what was held back goes out, the latest of each.
        while !self.held.is_empty() && !self.full() {
            let (_, item) = self.held.pop_first().expect("not empty");
            self.append(item);
        }
        let entries = std::mem::take(&mut self.open);
        if let Some(last) = entries.last() {
            let count = entries.len() as u64;
            self.groups.insert(
                seq,
                Span {
                    last: last.seq,
                    count,
                    at: now,
                },
            );
            self.depth += count;
        }
        let next = (!entries.is_empty()).then_some(self.next_seq);
        (entries, done, next)
    }

    /// The upstream has stored every entry up to `seq`. Groups it covers
    /// are deleted with the next seal; entries of a partly covered group
    /// are sent again after a reconnect, and the hub drops them by seq.
    pub fn ack(&mut self, seq: u64) {
        // Never past what was written: a confused peer cannot make the box
        // delete what it has not sent.
        let written = self.groups.values().map(|s| s.last).max().unwrap_or(0);
        self.acked = self.acked.max(seq.min(written));
    }

    /// The groups holding entries after `seq`, oldest first: what to stream
    /// from the store after the upstream's cursor.
    pub fn groups_after(&self, seq: u64) -> Vec<u64> {
        self.groups
            .iter()
            .filter(|(_, s)| s.last > seq)
            .map(|(&g, _)| g)
            .collect()
    }

    /// Depth and progress now, for `status` and metrics.
    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            depth: self.depth,
            acked: self.acked,
            next_seq: self.next_seq,
            skipped: self.skipped,
            held: self.held.len() as u64,
            oldest_at: self.groups.values().next().map(|s| s.at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::command::{CommandId, State};

    fn state(n: u128) -> UpItem {
        UpItem::State {
            id: CommandId(n),
            device: "d".into(),
            state: State::Queued,
            at: 0,
            attempts: 0,
        }
    }

    fn seen(device: &str, at: u64) -> UpItem {
        UpItem::Seen {
            device: device.into(),
            at,
        }
    }

    fn device(id: &str) -> UpItem {
        UpItem::Device(crate::engine::journal::DeviceRecord::new(id))
    }

    #[test]
    fn off_records_nothing() {
        let mut o = Outbox::off();
        assert!(!o.push(device("a")));
        assert_eq!(o.seal(1, 0), (vec![], vec![], None));
    }

    #[test]
    fn seqs_are_monotonic_and_acks_drop_whole_groups() {
        let mut o = Outbox::off();
        o.enable(100);
        o.push(state(1));
        o.push(state(2));
        let (e1, _, _) = o.seal(10, 0);
        o.push(device("a"));
        let (e2, _, _) = o.seal(11, 0);
        assert_eq!(
            e1.iter().chain(&e2).map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(o.stats().depth, 3);
        assert_eq!(o.groups_after(0), vec![10, 11]);
        // A partial ack of group 10 keeps it (its rest is sent again).
        o.ack(1);
        assert_eq!(o.seal(12, 0).1, Vec::<u64>::new());
        assert_eq!(o.groups_after(1), vec![10, 11]);
        o.ack(2);
        assert_eq!(o.seal(13, 0).1, vec![10]);
        assert_eq!(o.groups_after(2), vec![11]);
        // An ack beyond what was written is clamped.
        o.ack(99);
        assert_eq!(o.stats().acked, 3);
        assert_eq!(o.seal(14, 0).1, vec![11]);
        assert_eq!(o.stats().depth, 0);
    }

    #[test]
    fn full_compacts_telemetry_to_the_latest_per_device_never_results_or_devices() {
        let mut o = Outbox::off();
        o.enable(2);
        assert!(o.push(state(1)));
        assert!(o.push(state(2)));
        assert!(!o.push(state(3)), "telemetry is held back when full");
        assert!(!o.push(state(4)), "...and a newer one replaces it");
        assert!(!o.push(seen("d", 5)), "one of each kind per device");
        assert!(o.push(device("a")), "device records never wait");
        o.seal(1, 0);
        assert_eq!(o.stats().skipped, 1);
        assert_eq!(o.stats().held, 2);
        assert_eq!(o.stats().depth, 3);
        // The hub acknowledges: the held items go out, the latest of each.
        o.ack(3);
        let (e, dropped, _) = o.seal(2, 0);
        assert_eq!(dropped, vec![1]);
        let items: Vec<UpItem> = e.into_iter().map(|e| e.item).collect();
        assert_eq!(items, vec![state(4), seen("d", 5)]);
        assert_eq!(o.stats().held, 0);
    }

    #[test]
    fn replay_restores_depth_and_the_next_seq() {
        let mut o = Outbox::off();
        o.enable(10);
        o.push(state(1));
        o.push(state(2));
        let (e, _, _) = o.seal(5, 0);
        let mut r = Outbox::off();
        r.enable(10);
        r.replay(5, &e, 0);
        assert_eq!(r.stats().depth, 2);
        assert_eq!(r.stats().next_seq, 3);
        assert!(r.push(state(3)));
        assert_eq!(r.seal(6, 0).0[0].seq, 3);
    }
}

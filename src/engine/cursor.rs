//! Where an outbox stream stands: the sans-IO part both transports share
//! (a hub box over QUIC, a NATS JetStream cluster). It decides when to read
//! more from the store and how far the upstream has stored the records, so
//! the queue may delete them; the transports only move bytes.
//!
//! A hub acknowledges cumulatively (`UpAck{seq}`); JetStream acknowledges
//! each publish on its own, possibly out of order. Either way the cursor
//! moves only over a contiguous prefix of what was sent: a record is
//! deleted only when it and every record before it are stored upstream.

use std::collections::VecDeque;

/// One uplink session's place in the outbox: what it has sent, what the
/// upstream has stored, and whether to read more or sleep.
#[derive(Debug)]
pub struct OutboxCursor {
    /// Every record up to here is stored upstream.
    acked: u64,
    /// The last seq handed to the transport.
    sent: u64,
    /// Sent and not yet covered by `acked`, oldest first, with whether the
    /// upstream confirmed each one alone. Seqs have gaps (compaction).
    in_flight: VecDeque<(u64, bool)>,
    max_unacked: u64,
    /// The last read found nothing new: wait for the outbox to grow.
    caught_up: bool,
}

impl OutboxCursor {
    /// From where the store says the upstream has acknowledged.
    pub fn new(acked: u64, max_unacked: u64) -> Self {
        OutboxCursor {
            acked,
            sent: acked,
            in_flight: VecDeque::new(),
            max_unacked: max_unacked.max(1),
            caught_up: false,
        }
    }

    /// The seq through which the upstream has stored every record, so the
    /// queue may delete up to it (the shell hands it to `up_ack`).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The seq to read after.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Room for more records in flight.
    pub fn has_room(&self) -> bool {
        self.sent.saturating_sub(self.acked) < self.max_unacked
    }

    /// Read more from the store now.
    pub fn wants_read(&self) -> bool {
        self.has_room() && !self.caught_up
    }

    /// Caught up, with room: sleep until the outbox grows.
    pub fn waits_for_growth(&self) -> bool {
        self.has_room() && self.caught_up
    }

    /// A read from the store returned these seqs (ascending), all of which
    /// the transport is about to send.
    pub fn read(&mut self, seqs: impl IntoIterator<Item = u64>) {
        let before = self.in_flight.len();
        for s in seqs {
            if s > self.sent {
                self.in_flight.push_back((s, false));
                self.sent = s;
            }
        }
        self.caught_up = self.in_flight.len() == before;
    }

    /// The outbox grew.
    pub fn grown(&mut self) {
        self.caught_up = false;
    }

    /// The upstream stored everything through `seq` (a hub's `UpAck`).
    /// `Some(records now acknowledged)` when the cursor moved.
    pub fn ack_through(&mut self, seq: u64) -> Option<u64> {
        if seq <= self.acked {
            return None;
        }
        let mut n = 0;
        while self.in_flight.front().is_some_and(|f| f.0 <= seq) {
            self.in_flight.pop_front();
            n += 1;
        }
        self.acked = seq.min(self.sent).max(self.acked);
        Some(n)
    }

    /// The upstream stored record `seq` (a PubAck). `Some(new cursor)` when
    /// the contiguous prefix moved.
    pub fn ack_one(&mut self, seq: u64) -> Option<u64> {
        if let Some(f) = self.in_flight.iter_mut().find(|f| f.0 == seq) {
            f.1 = true;
        }
        let before = self.acked;
        while let Some(&(s, true)) = self.in_flight.front() {
            self.acked = s;
            self.in_flight.pop_front();
        }
        (self.acked > before).then_some(self.acked)
    }

    /// The link dropped: what was in flight will be sent again.
    pub fn rewind(&mut self) {
        self.in_flight.clear();
        self.sent = self.acked;
        self.caught_up = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_move_the_cursor_only_over_a_contiguous_prefix() {
        let mut c = OutboxCursor::new(10, 100);
        assert!(c.wants_read());
        c.read([11, 12, 15, 16]);
        assert_eq!(c.sent(), 16);
        assert_eq!(c.ack_one(12), None, "11 is not stored yet");
        assert_eq!(c.ack_one(15), None);
        assert_eq!(c.ack_one(11), Some(15), "11, 12 and 15 now");
        assert_eq!(c.ack_one(11), None, "a second ack is nothing");
        assert_eq!(c.ack_one(16), Some(16));
        assert_eq!(c.acked(), 16);
    }

    #[test]
    fn a_window_bounds_what_is_in_flight_and_an_empty_read_waits_for_growth() {
        let mut c = OutboxCursor::new(0, 3);
        c.read([1, 2, 3]);
        assert!(!c.has_room() && !c.wants_read());
        assert_eq!(c.ack_through(2), Some(2));
        assert!(c.wants_read());
        c.read([]);
        assert!(!c.wants_read() && c.waits_for_growth());
        c.grown();
        assert!(c.wants_read());
        assert_eq!(c.ack_through(1), None, "an old ack is nothing");
    }

    #[test]
    fn after_a_drop_the_unacknowledged_records_are_read_again() {
        let mut c = OutboxCursor::new(5, 100);
        c.read([6, 7, 8]);
        c.ack_one(6);
        c.rewind();
        assert_eq!((c.acked(), c.sent()), (6, 6));
        assert!(c.wants_read());
    }
}

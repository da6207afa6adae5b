//! The journal's record format: what one group commit writes.
//!
//! A group commit writes, under one group sequence number `seq`, up to two
//! records in one sled batch: the *journal* record (`Vec<Entry>`: commands
//! entering or re-entering the queue) and the *results* record
//! (`Vec<ResultRecord>`: commands reaching an end state). Replay walks the
//! groups in `seq` order, journal record before results record.
//!
//! Generations make replay independent of the order of entries inside one
//! group: `retry` re-enqueues a finished command with `gen + 1`, and a
//! result only ends the command of its own generation.

use crate::command::{Command, CommandId, DeviceId, Millis, Outcome, Priority, State};
use serde::{Deserialize, Serialize};

/// One journal entry.
// Nearly every entry is `Enqueued`: boxing it would add an allocation to
// each one and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A command enters the queue (first enqueue, retry, or re-journalled by
    /// compaction, which carries its progress along).
    Enqueued(Enqueued),
    /// An attempt ended in failure with attempts left; the command waits
    /// until `not_before` and is delivered again.
    Requeued {
        id: CommandId,
        gen: u32,
        attempts: u32,
        not_before: Option<Millis>,
    },
}

/// A command and its progress at the time it was journalled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueued {
    pub command: Command,
    /// The device the command is routed to.
    pub device: DeviceId,
    /// Global FIFO position, kept across compaction so re-journalling does
    /// not reorder a device's queue.
    pub order: u64,
    pub gen: u32,
    /// Attempts that have ended so far.
    pub attempts: u32,
    /// Earliest delivery (the sender's `not_before` or a backoff).
    pub not_before: Option<Millis>,
}

/// A command's end. Kept (with a retention) so `show` and `--wait` can
/// report it, and so replay knows the command is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub id: CommandId,
    pub gen: u32,
    pub device: DeviceId,
    pub target: String,
    pub priority: Priority,
    /// Always a final state.
    pub state: State,
    pub outcome: Option<Outcome>,
    /// Why the box ended it, when the device did not (`DependencyFailed`,
    /// `expired`, `cancelled by operator`, ...).
    pub error: Option<String>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: Millis,
    pub finished_at: Millis,
    pub origin: String,
    pub key: Option<String>,
    /// The whole command, kept for end states an operator may `retry`
    /// (`Dead`, `Failed`), so a retry needs no other record.
    pub command: Option<Command>,
}

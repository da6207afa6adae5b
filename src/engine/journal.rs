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

use crate::engine::command::{Command, CommandId, DeviceId, Millis, Outcome, Priority, State};
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
    /// A broadcast (`tag:…`): the parent command, whose payload every child
    /// shares (one copy on disk however many devices), and its children.
    /// Re-journalled whole when compaction moves it, with each child's
    /// progress and the ends of those already finished.
    Broadcast(Broadcast),
}

impl Entry {
    /// The command this entry holds under `id`, if any: an `Enqueued`
    /// command, or a broadcast's parent or child.
    pub fn command_for(&self, id: CommandId) -> Option<Command> {
        match self {
            Entry::Enqueued(e) if e.command.id == id => Some(e.command.clone()),
            Entry::Broadcast(b) if b.command.id == id => Some(b.command.clone()),
            Entry::Broadcast(b) => b
                .children
                .iter()
                .position(|c| c.id == id)
                .map(|i| b.child_command(i)),
            _ => None,
        }
    }

    /// Whether replay makes generation `gen` of `id` live from this entry.
    pub fn enqueues(&self, id: CommandId, gen: u32) -> bool {
        match self {
            Entry::Enqueued(e) => e.command.id == id && e.gen == gen,
            Entry::Broadcast(b) => {
                gen == 0 && b.children.iter().any(|c| c.id == id && c.end.is_none())
            }
            Entry::Requeued { .. } => false,
        }
    }
}

/// A broadcast parent and its children.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broadcast {
    /// The parent; `target` is the `tag:…` it was sent to.
    pub command: Command,
    pub children: Vec<Child>,
}

/// One device's copy of a broadcast. Its id is its own: it has its own
/// lifecycle, attempts and result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    pub id: CommandId,
    pub device: DeviceId,
    pub order: u64,
    pub attempts: u32,
    pub not_before: Option<Millis>,
    /// Set once the child has finished (kept for the parent's aggregate).
    pub end: Option<State>,
}

impl Broadcast {
    /// The command a child runs: the parent's, under the child's id.
    pub fn child_command(&self, i: usize) -> Command {
        let c = &self.children[i];
        Command {
            id: c.id,
            target: c.device.clone(),
            ..self.command.clone()
        }
    }
}

/// How one child of a broadcast ended, as the parent's result keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildEnd {
    pub id: CommandId,
    pub device: DeviceId,
    pub state: State,
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
    /// For a broadcast parent: how each child ended.
    pub children: Vec<ChildEnd>,
}

impl ResultRecord {
    /// The end a box records for command `id` when its hub cancels one the
    /// box never got (the forward was lost with a link, or is still on its
    /// way): `cancelled`, with no device, since none had it. Kept like any
    /// end, so a late forward of `id` is a duplicate and does not run.
    pub fn cancelled_unseen(id: CommandId, now: Millis) -> ResultRecord {
        ResultRecord {
            id,
            gen: 0,
            device: DeviceId::new(),
            target: String::new(),
            priority: Priority::Normal,
            state: State::Cancelled,
            outcome: None,
            error: Some("cancelled by the hub before this box had it".into()),
            attempts: 0,
            max_attempts: 0,
            created_at: now,
            finished_at: now,
            origin: "upstream".into(),
            key: None,
            command: None,
            children: Vec::new(),
        }
    }

    /// Whether this is a [`ResultRecord::cancelled_unseen`] end.
    pub fn never_held(&self) -> bool {
        self.device.is_empty()
    }
}

/// One record of the upstream outbox (DESIGN §7): what the hub learns of
/// this box, written in the same batch as the change it reports, under a
/// monotonic `seq` the hub acks and dedupes by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpEntry {
    pub seq: u64,
    pub item: UpItem,
}

/// What an outbox record reports.
// Results dominate and are the reason the outbox exists: no boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpItem {
    /// A command changed state on its way (queued, delivered, requeued).
    /// Telemetry-like: skipped while the outbox is full.
    State {
        id: CommandId,
        device: DeviceId,
        state: State,
        at: Millis,
        attempts: u32,
    },
    /// A command ended. Never skipped.
    Result(ResultRecord),
    /// A device was enrolled, relabelled or revoked. Never skipped.
    Device(DeviceRecord),
    /// A device was last seen at `at`. Telemetry-like.
    Seen { device: DeviceId, at: Millis },
    /// Telemetry a device sent. Telemetry-like.
    Event {
        device: DeviceId,
        at: Millis,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// An entry of this box's audit log, for the hub's. Never skipped: it
    /// is evidence.
    Audit(crate::engine::audit::chain::Note),
    /// A device connected (`online`) or went away at `at`: what `Seen`
    /// says, and whether it is there now, so the hub can show the devices
    /// below as online. Telemetry-like; sent as `Seen` to a hub before
    /// protocol 1.5 (`proto::MINOR_PRESENCE`).
    Presence {
        device: DeviceId,
        online: bool,
        at: Millis,
    },
}

impl UpItem {
    /// Telemetry-like items give way when the outbox is full; results and
    /// device records never do.
    pub fn is_telemetry(&self) -> bool {
        matches!(
            self,
            UpItem::State { .. }
                | UpItem::Seen { .. }
                | UpItem::Presence { .. }
                | UpItem::Event { .. }
        )
    }
}

/// An enrolled device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub tags: Vec<String>,
    pub caps: Vec<String>,
    pub enrolled_at: Millis,
    pub revoked: bool,
    pub last_seen: Option<Millis>,
    /// SHA-256 of the device certificate issued last: the only one the box
    /// admits for this id. `None` for a record enrolled before the box kept
    /// it (or one made in code without a certificate): any certificate of
    /// this box's CA is then admitted for the id, as before, until the device
    /// is next enrolled. Not part of the record's postcard layout (which the
    /// outbox also carries upstream): the store keeps it after the record,
    /// see `store::encode_device`.
    #[serde(skip)]
    pub cert: Option<[u8; 32]>,
}

impl DeviceRecord {
    /// A newly enrolled device with no tags or capabilities (`enrolled_at`
    /// 0: the queue stamps it on enrollment).
    pub fn new(id: impl Into<DeviceId>) -> Self {
        DeviceRecord {
            id: id.into(),
            tags: Vec::new(),
            caps: Vec::new(),
            enrolled_at: 0,
            revoked: false,
            last_seen: None,
            cert: None,
        }
    }
}

/// One group commit: records to put and groups to drop, written as one
/// atomic batch followed by one flush.
/// Hub side of upstream sync: how far a box below has been applied.
///
/// `seq` counts in the outbox of one database of that box, named by
/// `epoch` (its `UpFrom`, since protocol 1.6): a box whose data dir was
/// wiped, or restored from a backup, starts a new outbox under a new epoch,
/// and a cursor of the old one must not skip its records. Epoch 0: not yet
/// known (a cursor written before 1.6, or an edge older than 1.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub seq: u64,
}

#[derive(Debug, Default)]
pub struct GroupWrite {
    pub seq: u64,
    pub journal: Vec<Entry>,
    pub results: Vec<ResultRecord>,
    /// Journal groups whose every command has finished or moved on.
    pub drop_journal: Vec<u64>,
    /// Result groups past retention.
    pub drop_results: Vec<u64>,
    /// Upstream outbox records of this group (same batch as the changes).
    pub outbox: Vec<UpEntry>,
    /// Outbox groups the upstream has acknowledged.
    pub drop_outbox: Vec<u64>,
    /// The outbox's next seq, when this group changed the outbox.
    pub outbox_next: Option<u64>,
    /// Hub side of upstream sync: per edge, the highest outbox seq applied
    /// (in the batch of what applying it changed).
    pub cursors: Vec<(crate::engine::command::DeviceId, Cursor)>,
    /// Cancels sent down to an edge and not yet confirmed: set or cleared.
    pub cancel_marks: Vec<(crate::engine::command::CommandId, bool)>,
    /// How many commands were live, now and then: a capacity hint for the
    /// next start (not a record; a stale or missing one only costs time).
    pub live_hint: Option<u64>,
}

impl GroupWrite {
    pub fn is_empty(&self) -> bool {
        self.journal.is_empty()
            && self.results.is_empty()
            && self.drop_journal.is_empty()
            && self.drop_results.is_empty()
            && self.outbox.is_empty()
            && self.drop_outbox.is_empty()
            && self.cursors.is_empty()
            && self.cancel_marks.is_empty()
    }
}

/// A group read back at replay.
#[derive(Debug)]
pub enum Group {
    Journal(u64, Vec<Entry>),
    Results(u64, Vec<ResultRecord>),
}

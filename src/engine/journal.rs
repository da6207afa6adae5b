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
        /// The command's id.
        id: CommandId,
        /// The generation it applies to; replay ignores it for any other.
        gen: u32,
        /// Attempts that have ended so far, the failed one included.
        attempts: u32,
        /// Earliest next delivery (the end of the backoff), ms since the
        /// Unix epoch; `None`: at once (a pool command failing over).
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
    /// One per device the tag matched at send, each with its own id.
    pub children: Vec<Child>,
}

/// One device's copy of a broadcast. Its id is its own: it has its own
/// lifecycle, attempts and result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    /// The child's own command id, made by the box at send.
    pub id: CommandId,
    /// The device this copy is for.
    pub device: DeviceId,
    /// Its global FIFO position, as `Enqueued::order`.
    pub order: u64,
    /// Attempts that have ended so far (0 at send; brought up to date when
    /// compaction re-journals the broadcast).
    pub attempts: u32,
    /// Earliest delivery, ms since the Unix epoch (the sender's
    /// `not_before` or a backoff); `None`: at once.
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
    /// The child's command id.
    pub id: CommandId,
    /// The device it was for.
    pub device: DeviceId,
    /// The final state it ended in.
    pub state: State,
}

/// A command and its progress at the time it was journalled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueued {
    /// The command, payload included: the journal is where it lives.
    pub command: Command,
    /// The device the command is routed to.
    pub device: DeviceId,
    /// Global FIFO position, kept across compaction so re-journalling does
    /// not reorder a device's queue.
    pub order: u64,
    /// The generation: 0 at first send, one more per operator retry.
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
    /// The command's id.
    pub id: CommandId,
    /// The generation it ends: replay ends a live command only of the same
    /// generation, so a retried command outlives its old result.
    pub gen: u32,
    /// The device it ran on: for a pool command the member it was handed
    /// to (the pool's `cap:…` if it never was), for a broadcast parent its
    /// `tag:…`, on a hub `edge/device`; empty for one the box never held
    /// (`cancelled_unseen`).
    pub device: DeviceId,
    /// The target as the sender wrote it.
    pub target: String,
    /// The command's priority.
    pub priority: Priority,
    /// Always a final state.
    pub state: State,
    /// What the device reported for its last attempt; `None` when the box
    /// ended it without one (ttl, cancel, shedding, a dependency) and for a
    /// broadcast parent.
    pub outcome: Option<Outcome>,
    /// Why the box ended it, when the device did not (`DependencyFailed`,
    /// `expired`, `cancelled by operator`, ...).
    pub error: Option<String>,
    /// Attempts that had ended, the one the device answered included (0
    /// for a broadcast parent).
    pub attempts: u32,
    /// The attempts it was allowed, as `Command::max_attempts`.
    pub max_attempts: u32,
    /// When the box accepted the command, ms since the Unix epoch.
    pub created_at: Millis,
    /// When it ended, ms since the Unix epoch; retention's age counts from
    /// it.
    pub finished_at: Millis,
    /// Who sent it, as `Command::origin`.
    pub origin: String,
    /// The sender's idempotency key, kept so that after a restart the key
    /// still answers with this command while its window lasts.
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
    /// The record's place in this box's outbox: from 1, one more per
    /// record, never reused (the next one is kept under its own key).
    pub seq: u64,
    /// What it reports.
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
        /// The command's id.
        id: CommandId,
        /// The device it is queued for or delivered to (the pool's `cap:…`
        /// while a pool command waits).
        device: DeviceId,
        /// Its new state: never a final one (those go as `Result`).
        state: State,
        /// When it changed, ms since the Unix epoch.
        at: Millis,
        /// Attempts that had ended by then.
        attempts: u32,
    },
    /// A command ended. Never skipped.
    Result(ResultRecord),
    /// A device was enrolled, relabelled or revoked. Never skipped.
    Device(DeviceRecord),
    /// A device was last seen at `at`. Telemetry-like.
    Seen {
        /// The device's id (`edge/device` for one of a box below).
        device: DeviceId,
        /// When, ms since the Unix epoch.
        at: Millis,
    },
    /// Telemetry a device sent. Telemetry-like.
    Event {
        /// The device that sent it.
        device: DeviceId,
        /// When the box received it, ms since the Unix epoch.
        at: Millis,
        /// The event's bytes as the device sent them (cut by the uplink when
        /// over the hub's frame budget).
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
        /// The device's id.
        device: DeviceId,
        /// True when it connected, false when it went away.
        online: bool,
        /// When, ms since the Unix epoch.
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
    /// The device's id, as in its certificate.
    pub id: DeviceId,
    /// Its tags: what `tag:…` broadcasts and rollouts select it by.
    pub tags: Vec<String>,
    /// Its enrolled capabilities: the `cap:…` pools it may serve (those
    /// its Hello also offers).
    pub caps: Vec<String>,
    /// When it was first enrolled, ms since the Unix epoch (0 until the
    /// queue stamps it).
    pub enrolled_at: Millis,
    /// Revoked: it may not connect and gets no new commands until it is
    /// enrolled again.
    pub revoked: bool,
    /// When it last connected or went away, ms since the Unix epoch;
    /// `None`: never seen.
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

/// Hub side of upstream sync: how far a box below has been applied.
///
/// `seq` counts in the outbox of one database of that box, named by
/// `epoch` (its `UpFrom`, since protocol 1.6): a box whose data dir was
/// wiped, or restored from a backup, starts a new outbox under a new epoch,
/// and a cursor of the old one must not skip its records. Epoch 0: not yet
/// known (a cursor written before 1.6, or an edge older than 1.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The uplink epoch of that box's database; 0: not yet known.
    pub epoch: u64,
    /// The highest outbox seq of that epoch applied here; 0: none yet.
    pub seq: u64,
}

/// One group commit: records to put and groups to drop, written as one
/// atomic batch followed by one flush.
#[derive(Debug, Default)]
pub struct GroupWrite {
    /// The group's sequence number: every record it puts is keyed by it,
    /// and replay walks groups in its order.
    pub seq: u64,
    /// The journal record: commands entering or re-entering the queue
    /// (empty: none written).
    pub journal: Vec<Entry>,
    /// The results record: commands that ended in this group (empty: none
    /// written).
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
    /// Whether it writes nothing that must be kept, so the shell need not
    /// commit it (a live hint alone does not count).
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
    /// A journal record: the group's seq and its entries.
    Journal(u64, Vec<Entry>),
    /// A results record: the group's seq and the ends it holds.
    Results(u64, Vec<ResultRecord>),
}

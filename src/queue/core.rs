//! The queue's sans-IO core: every rule of the command lifecycle, and nothing
//! else. It is handed requests and the time, and it accumulates the records
//! to journal, the deliveries to make and the events to publish. It never
//! touches a socket, a clock or a disk, so it is tested (and simulated)
//! without any.
//!
//! The shell drives it in rounds: feed requests, `tick(now)`, `seal()` the
//! round into a `GroupWrite`, write that durably, and only then act on the
//! round's `Effects` (answer waiters, deliver, publish).
//!
//! Groups and pins. Every round's journal entries form one group with a
//! sequence number. A journal group stays on disk while it is *pinned*: by
//! a live command whose latest `Enqueued` entry is in it, or whose latest
//! `Requeued` entry is in it. When the last pin goes, the group is dropped.
//! A group that stays pinned by a few stragglers (an offline device) while
//! the head moves on is *relocated*: its live commands are re-journalled
//! into the open group and the old one dropped, in the same batch. So the
//! journal stays bounded and no payload is copied more than it must be.
//!
//! A result group may be dropped (retention) only when it is older than the
//! oldest journal group still on disk: then no `Enqueued` entry it finishes
//! can still be replayed, so dropping it can never resurrect a command.

mod gateway;

use self::gateway::Remote;
use super::outbox::{Outbox, OutboxStats};
use super::{
    ChildView, CommandView, LifecycleEvent, QueueError, QueueStats, SendReceipt, SendRequest,
};
use crate::command::{Command, CommandId, DeviceId, Millis, Outcome, Priority, State};
use crate::journal::{Broadcast, Child, ChildEnd, Enqueued, Entry, ResultRecord, UpEntry, UpItem};
use crate::journal::{DeviceRecord, Group, GroupWrite};
use crate::route::{check_name, Acl, Labels, Target};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

// Maps keyed by command id use FxHash: the ids are made by this box (random
// ULIDs), not chosen by a peer, so a DoS-hardened hasher buys nothing and
// costs a third of a 1M-command replay.

/// Bounds and defaults. Every number that limits the box lives here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Unacked commands per device, unless the device asks for fewer.
    pub window: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub default_max_attempts: u32,
    pub default_ttl_ms: Option<u64>,
    /// Live commands the box holds before it sheds or refuses.
    pub max_queued: u64,
    /// Bytes on disk before it sheds or refuses (`None`: no budget).
    pub max_disk: Option<u64>,
    /// Free bytes kept on the data dir's filesystem: below them new
    /// commands are refused, so the database never meets a full disk
    /// (sled cannot go on after a failed write).
    pub min_free_disk: u64,
    /// How long an idempotency key is remembered.
    pub key_window_ms: u64,
    /// Results kept for `show`/`--wait`, by count and by age.
    pub results_max: usize,
    pub results_max_age_ms: u64,
    /// A journal group this many groups behind the head, with at most
    /// `relocate_max_pins` live commands left, is re-journalled.
    pub relocate_lag: u64,
    pub relocate_max_pins: u32,
    /// Largest payload accepted.
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            window: 32,
            backoff_base_ms: 1_000,
            backoff_cap_ms: 300_000,
            default_max_attempts: 5,
            default_ttl_ms: None,
            max_queued: 1_000_000,
            max_disk: None,
            min_free_disk: DEFAULT_MIN_FREE_DISK,
            key_window_ms: 24 * 3600 * 1000,
            results_max: 100_000,
            results_max_age_ms: 7 * 24 * 3600 * 1000,
            relocate_lag: 64,
            relocate_max_pins: 16,
            max_payload: 1024 * 1024 - 1024,
        }
    }
}

/// The reserve's ceiling, and the whole reserve on a disk of 320 MiB or more.
pub const DEFAULT_MIN_FREE_DISK: u64 = 32 * 1024 * 1024;

/// The free-space reserve when none is set, for a filesystem of `total`
/// bytes: the smaller of 32 MiB and 10 % of it, so a small disk (an SD card
/// partition, a tmpfs) keeps most of its space for commands instead of
/// refusing every one.
pub fn default_reserve(total: u64) -> u64 {
    DEFAULT_MIN_FREE_DISK.min(total / 10)
}

/// A request from the shell (the admin API and the device links).
#[derive(Clone, Debug)]
pub enum CoreRequest {
    Send(SendRequest),
    Show(CommandId),
    List {
        device: DeviceId,
        include_finished: bool,
    },
    Cancel(CommandId),
    Retry(CommandId),
    Stats,
    Enroll(DeviceRecord),
    /// Enroll, refusing an existing id unless `force` (see `enroll`).
    EnrollNew {
        record: DeviceRecord,
        force: bool,
    },
    Revoke(DeviceId),
    Devices,
    /// Change an enrolled device's tags and capabilities.
    Relabel(Relabel),
    /// A device sends a command (checked against the ACL).
    DeviceSend {
        from: DeviceId,
        req: SendRequest,
    },
    /// A command forwarded by the hub above, under the hub's id (edge side).
    SendAs {
        id: CommandId,
        req: SendRequest,
    },
    /// Telemetry a device sent, for the upstream.
    Event {
        device: DeviceId,
        payload: Vec<u8>,
        at: Millis,
    },
    /// A gateway has a forwarded command durably (hub side).
    Handed {
        gateway: DeviceId,
        id: CommandId,
    },
    /// Outbox records from a gateway (hub side); answered with the cursor.
    Up {
        edge: DeviceId,
        entries: Vec<UpEntry>,
    },
    /// The hub stored every outbox record up to this seq (edge side).
    UpAck(u64),
    /// Outbox records after a seq, at most this many (edge side).
    OutboxRead {
        after: u64,
        max: usize,
    },
    OutboxStats,
    /// A command the box ran itself ended (a workflow handed down by the
    /// hub): recorded once, as a device's result would be.
    Finished(Box<ResultRecord>),
}

/// Tags and capabilities to add to or remove from a device.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Relabel {
    pub device: DeviceId,
    pub add_tags: Vec<String>,
    pub remove_tags: Vec<String>,
    pub add_caps: Vec<String>,
    pub remove_caps: Vec<String>,
}

/// The core's answer to a `CoreRequest`.
// Short-lived (one per request): boxing the view would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum CoreReply {
    Receipt(SendReceipt),
    View(CommandView),
    Views(Vec<CommandView>),
    Stats(QueueStats),
    Device(DeviceRecord),
    Devices(Vec<DeviceView>),
    Done,
    Cursor(u64),
    Outbox(Vec<UpEntry>),
    OutboxStats(OutboxStats),
}

fn unexpected<T>(what: &str) -> Result<T, QueueError> {
    Err(QueueError::BadRequest(format!(
        "internal: unexpected reply, wanted {what}"
    )))
}

impl CoreReply {
    pub fn into_receipt(self) -> Result<SendReceipt, QueueError> {
        match self {
            CoreReply::Receipt(r) => Ok(r),
            _ => unexpected("receipt"),
        }
    }
    pub fn into_view(self) -> Result<CommandView, QueueError> {
        match self {
            CoreReply::View(v) => Ok(v),
            _ => unexpected("view"),
        }
    }
    pub fn into_views(self) -> Result<Vec<CommandView>, QueueError> {
        match self {
            CoreReply::Views(v) => Ok(v),
            _ => unexpected("views"),
        }
    }
    pub fn into_stats(self) -> Result<QueueStats, QueueError> {
        match self {
            CoreReply::Stats(s) => Ok(s),
            _ => unexpected("stats"),
        }
    }
    pub fn into_device(self) -> Result<DeviceRecord, QueueError> {
        match self {
            CoreReply::Device(d) => Ok(d),
            _ => unexpected("device"),
        }
    }
    pub fn into_devices(self) -> Result<Vec<DeviceView>, QueueError> {
        match self {
            CoreReply::Devices(d) => Ok(d),
            _ => unexpected("devices"),
        }
    }
    pub fn into_cursor(self) -> Result<u64, QueueError> {
        match self {
            CoreReply::Cursor(c) => Ok(c),
            _ => unexpected("cursor"),
        }
    }
    pub fn into_outbox(self) -> Result<Vec<UpEntry>, QueueError> {
        match self {
            CoreReply::Outbox(e) => Ok(e),
            _ => unexpected("outbox records"),
        }
    }
    pub fn into_outbox_stats(self) -> Result<OutboxStats, QueueError> {
        match self {
            CoreReply::OutboxStats(s) => Ok(s),
            _ => unexpected("outbox stats"),
        }
    }
}

/// A device as `outpost devices` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceView {
    pub record: DeviceRecord,
    pub online: bool,
    pub queued: u64,
    pub in_flight: u64,
    /// For a gateway (a box below): how far its outbox is applied.
    pub sync: Option<EdgeSync>,
    /// Its bundle is in use on more than one live device (the device link
    /// knows; the queue leaves it `None` and the admin layer fills it in).
    pub shared_bundle: Option<crate::contest::SharedBundle>,
}

/// A box below, as the hub sees its upstream sync.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EdgeSync {
    /// The highest outbox seq applied (kept across restarts).
    pub cursor: u64,
    /// When its last outbox records came (since this start).
    pub last_up: Option<Millis>,
}

/// Where a command is, for `show`. A finished command's record is on disk:
/// the shell reads result group `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Live(Box<CommandView>),
    Finished { seq: u64, state: State },
    NotFound,
}

/// What a round asks the shell to do once its group is durable.
#[derive(Debug, Default)]
pub struct Effects {
    pub deliveries: Vec<DeliverEffect>,
    /// Tell a device to stop a command it holds (cancel, expiry).
    pub cancels: Vec<(DeviceId, CommandId)>,
    /// End a device's session (revoked).
    pub close_sessions: Vec<DeviceId>,
    pub events: Vec<LifecycleEvent>,
    /// Device records to write with this group.
    pub device_writes: Vec<DeviceRecord>,
    /// Device records whose last-seen changed (written, not flushed alone).
    pub device_touches: Vec<DeviceRecord>,
}

/// One command to hand to a connected device. The payload is in journal
/// group `group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliverEffect {
    pub device: DeviceId,
    pub session: u64,
    pub id: CommandId,
    pub group: u64,
    pub attempt: u32,
    pub priority: Priority,
    pub deadline: Option<Millis>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In its device's ready queue.
    Ready,
    /// Waiting for `not_before` (sender's, or backoff).
    Waiting,
    /// Waiting for its `after` dependency to succeed.
    Blocked,
    /// Delivered to device `on` (the command's own device, or for a
    /// `cap:` command the capable device chosen for it).
    InFlight { attempt: u32, on: u32 },
    /// A command for a box below this one that the box has durably (it
    /// left the gateway's window; its end comes as an outbox record).
    Handed { attempt: u32 },
}

/// A live command's handle. The payload stays on disk.
#[derive(Clone, Debug)]
struct Live {
    device: u32,
    gen: u32,
    priority: Priority,
    order: u64,
    group: u64,
    requeue_group: Option<u64>,
    attempts: u32,
    max_attempts: u32,
    created_at: Millis,
    expires_at: Option<Millis>,
    not_before: Option<Millis>,
    // Boxed: a dependency or a parent is rare, and an inline `u128` would
    // double the handle (and its 16-byte alignment pad every field), which
    // every queued command pays for in RAM and in replay time.
    after: Option<Box<CommandId>>,
    phase: Phase,
    /// Only when it differs from the device id.
    target: Option<Box<str>>,
    origin: u32,
    key: Option<Box<str>>,
    /// The broadcast this command is a child of.
    parent: Option<Box<CommandId>>,
}

impl Live {
    /// A broadcast child of parent command `p` (journalled in group
    /// `group`), before its device, order and progress are filled in.
    fn child_of(p: &Command, origin: u32, group: u64) -> Live {
        Live {
            device: 0,
            gen: 0,
            priority: p.priority,
            order: 0,
            group,
            requeue_group: None,
            attempts: 0,
            max_attempts: p.max_attempts,
            created_at: p.created_at,
            expires_at: p.expires_at,
            not_before: p.not_before,
            after: p.after.map(Box::new),
            phase: Phase::Ready,
            target: Some(p.target.as_str().into()),
            origin,
            key: None,
            parent: Some(Box::new(p.id)),
        }
    }
}

/// A device, or a `cap:` pool: the queue of commands any device with that
/// capability may run.
#[derive(Debug)]
struct Dev {
    id: DeviceId,
    record: Option<DeviceRecord>,
    ready: [BTreeMap<u64, CommandId>; 3],
    /// Commands delivered to this device (its own and pool commands).
    in_flight: FxHashSet<CommandId>,
    /// Live commands routed here (for a pool: its commands, wherever they
    /// are in flight).
    live: u64,
    session: Option<(u64, u32)>,
    /// A pool (`cap:…`), not a device.
    pool: bool,
    /// For a pool: the enrolled devices with the capability.
    members: Vec<u32>,
    /// For a device: the pools it serves in this session (its enrolled
    /// capabilities, narrowed by its Hello).
    serves: Vec<u32>,
    /// The capabilities its Hello offered (None: all it is enrolled with).
    offered: Option<Vec<String>>,
    /// Pool commands in flight here (counted in `in_flight`, not `live`).
    borrowed: u64,
    /// Pool commands ever handed to it: the tie-break that spreads a pool's
    /// work when devices are equally idle.
    assigned: u64,
    /// For a gateway: commands the box below holds (counted in `live`).
    handed: u64,
}

impl Dev {
    fn new(id: DeviceId) -> Self {
        Dev {
            pool: id.starts_with("cap:"),
            id,
            record: None,
            ready: Default::default(),
            in_flight: FxHashSet::default(),
            live: 0,
            session: None,
            members: Vec::new(),
            serves: Vec::new(),
            offered: None,
            borrowed: 0,
            assigned: 0,
            handed: 0,
        }
    }

    fn has_room(&self) -> bool {
        self.session
            .is_some_and(|(_, window)| (self.in_flight.len() as u32) < window)
    }
}

impl Labels for DeviceRecord {
    fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
    fn has_cap(&self, cap: &str) -> bool {
        self.caps.iter().any(|c| c == cap)
    }
}

/// A live broadcast: it ends when its last child ends.
#[derive(Debug)]
struct Parent {
    command: Command,
    /// The journal group holding its `Broadcast` entry.
    group: u64,
    children: Vec<(CommandId, u32)>,
    ends: Vec<Option<State>>,
    open: u32,
    cancelled: bool,
}

/// Where a target sends a command.
enum Route {
    Device(u32),
    Pool(u32),
    Broadcast(Vec<u32>),
}

/// What an idempotency key was first used for: a later send with the same
/// key must be the same command (same target, same payload) to be answered
/// with the first one's id. Digests, not copies: 16 bytes a key.
#[derive(Clone, Copy, Debug)]
struct KeyUse {
    id: CommandId,
    at: Millis,
    target: u64,
    /// None after a restart for an end whose record keeps no payload: the
    /// target is then all that is compared.
    payload: Option<u64>,
}

impl KeyUse {
    fn new(id: CommandId, at: Millis, target: &str, payload: Option<&[u8]>) -> KeyUse {
        KeyUse {
            id,
            at,
            target: digest(target.as_bytes()),
            payload: payload.map(digest),
        }
    }

    /// What differs from a new send with the same key, if anything.
    fn differs(&self, target: &str, payload: &[u8]) -> Option<&'static str> {
        if self.target != digest(target.as_bytes()) {
            Some("target")
        } else if self.payload.is_some_and(|p| p != digest(payload)) {
            Some("payload")
        } else {
            None
        }
    }
}

/// A fixed-seed hash (FxHash: the same on every run, so replay agrees).
fn digest(b: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = rustc_hash::FxHasher::default();
    h.write(b);
    h.write_usize(b.len());
    h.finish()
}

/// The queue state machine.
pub struct QueueCore {
    limits: Limits,
    rng: u64,
    live: FxHashMap<CommandId, Live>,
    devs: Vec<Dev>,
    // FxHash: looked up once per command at replay; the names are enrolled
    // devices and origins, not chosen by an unauthenticated peer.
    dev_index: FxHashMap<DeviceId, u32>,
    origins: Vec<String>,
    origin_index: FxHashMap<String, u32>,
    /// (due, id): not_before and backoff wake-ups.
    wakeups: BTreeSet<(Millis, CommandId)>,
    expiries: BTreeSet<(Millis, CommandId)>,
    /// dependency → its dependents.
    blocked: FxHashMap<CommandId, Vec<CommandId>>,
    keys: HashMap<(u32, Box<str>), KeyUse>,
    key_ages: VecDeque<(Millis, u32, Box<str>)>,
    /// id → (result group, end state).
    results: FxHashMap<CommandId, (u64, State)>,
    result_groups: BTreeMap<u64, (Millis, Vec<CommandId>)>,
    results_dead: u64,
    pins: BTreeMap<u64, u32>,
    /// Commands whose latest `Requeued` entry is in a group (may hold stale
    /// ids; checked against `Live::requeue_group` when used).
    requeue_holders: HashMap<u64, Vec<CommandId>>,
    unpinned: Vec<u64>,
    open_seq: u64,
    next_order: u64,
    journal: Vec<Entry>,
    finished: Vec<ResultRecord>,
    drop_results: Vec<u64>,
    effects: Effects,
    /// Results of this round that keep their command for `retry`: (index in
    /// `finished`, journal group holding the payload).
    payload_from: Vec<(usize, u64)>,
    next_session: u64,
    disk: u64,
    /// Free bytes on the data dir's filesystem (`None`: not known).
    free: Option<u64>,
    /// Live commands when the free-space reserve was reached (see
    /// `make_room`).
    full_mark: Option<u64>,
    stats: QueueStats,
    /// Live broadcasts by parent id (payload-free: it is on disk).
    parents: FxHashMap<CommandId, Parent>,
    acl: Acl,
    /// What goes upstream (off without an uplink).
    outbox: Outbox,
    // ----- hub side of upstream sync (see `gateway`) -----
    /// What edges last reported of commands sent down to them.
    remote: FxHashMap<CommandId, Remote>,
    /// Devices of the boxes below, as `edge-1/dev-7`.
    remote_devices: BTreeMap<DeviceId, DeviceRecord>,
    /// Per edge: the highest outbox seq applied.
    cursors: HashMap<DeviceId, u64>,
    /// When each edge's outbox records last came, for `status`.
    last_up: HashMap<DeviceId, Millis>,
    cursor_writes: Vec<(DeviceId, u64)>,
    /// Commands held by an edge whose cancel it has not confirmed.
    cancelling: FxHashSet<CommandId>,
    cancel_marks: Vec<(CommandId, bool)>,
}

/// A sealed round: the group to write, and the retryable results whose
/// payload the shell copies in from the journal before writing.
#[derive(Debug, Default)]
pub struct Sealed {
    pub write: GroupWrite,
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

/// Refuse to enroll an id that has a record (`existing`) unless `force`:
/// enrolling again issues a new certificate, and every earlier bundle of
/// the id stops working.
pub fn check_existing(
    id: &str,
    existing: Option<&DeviceRecord>,
    force: bool,
) -> Result<(), QueueError> {
    match existing {
        Some(rec) if !force => Err(QueueError::AlreadyEnrolled {
            id: id.to_string(),
            revoked: rec.revoked,
        }),
        _ => Ok(()),
    }
}

/// Debug builds check the invariants after every round up to this many
/// live commands.
const DEBUG_CHECK_LIVE: usize = 1_000;

/// One round, sealed: the records to write as one group commit, and what
/// to do once they are durable — never before (DESIGN §4).
#[derive(Debug)]
pub struct Round {
    pub write: GroupWrite,
    pub effects: Effects,
    /// Retryable results whose command was not found on disk (a read
    /// failed): their record keeps no payload, so `retry` cannot requeue
    /// them. Empty unless the disk misbehaves.
    pub missing_payloads: Vec<CommandId>,
}

const ORIGIN_UNKNOWN: &str = "?";
/// Every this many group seqs, a commit carries the live count as a hint
/// for the next start's table sizes.
const LIVE_HINT_EVERY: u64 = 64;

impl QueueCore {
    /// An empty queue.
    pub fn new(limits: Limits, seed: u64) -> Self {
        QueueCore {
            limits,
            rng: seed | 1,
            live: FxHashMap::default(),
            devs: Vec::new(),
            dev_index: FxHashMap::default(),
            origins: Vec::new(),
            origin_index: FxHashMap::default(),
            wakeups: BTreeSet::new(),
            expiries: BTreeSet::new(),
            blocked: FxHashMap::default(),
            keys: HashMap::new(),
            key_ages: VecDeque::new(),
            results: FxHashMap::default(),
            result_groups: BTreeMap::new(),
            results_dead: 0,
            pins: BTreeMap::new(),
            requeue_holders: HashMap::new(),
            unpinned: Vec::new(),
            open_seq: 1,
            next_order: 1,
            journal: Vec::new(),
            finished: Vec::new(),
            drop_results: Vec::new(),
            effects: Effects::default(),
            payload_from: Vec::new(),
            next_session: 1,
            disk: 0,
            free: None,
            full_mark: None,
            stats: QueueStats::default(),
            parents: FxHashMap::default(),
            acl: Acl::default(),
            outbox: Outbox::off(),
            remote: FxHashMap::default(),
            remote_devices: BTreeMap::new(),
            cursors: HashMap::new(),
            last_up: HashMap::new(),
            cursor_writes: Vec::new(),
            cancelling: FxHashSet::default(),
            cancel_marks: Vec::new(),
        }
    }

    /// Which devices may send commands to which targets.
    pub fn set_acl(&mut self, acl: Acl) {
        self.acl = acl;
    }

    /// Record what goes upstream (the box has an uplink): every lifecycle
    /// change, result and device record, in the batch of the change itself.
    pub fn enable_outbox(&mut self, max: u64) {
        self.outbox.enable(max);
    }

    /// The outbox's next seq, as the store kept it.
    pub fn replay_outbox_seq(&mut self, next: u64) {
        self.outbox.restore_next_seq(next);
    }

    /// Rebuild the outbox's index from a group read back at start.
    pub fn replay_outbox(&mut self, group: u64, entries: &[UpEntry], now: Millis) {
        self.open_seq = self.open_seq.max(group + 1);
        self.outbox.replay(group, entries, now);
    }

    /// The upstream has stored every outbox entry up to `seq`.
    pub fn up_ack(&mut self, seq: u64) {
        self.outbox.ack(seq);
    }

    /// The outbox groups holding entries after `seq`, oldest first.
    pub fn outbox_groups_after(&self, seq: u64) -> Vec<u64> {
        self.outbox.groups_after(seq)
    }

    pub fn outbox_stats(&self) -> OutboxStats {
        self.outbox.stats()
    }

    /// A command the box ran itself (not a device: a workflow the hub
    /// handed down, under the hub's id) ended. Recorded like a device's
    /// result, so `show` has it and the outbox carries it up; a second
    /// record of the same id is ignored (`false`), so a runner that reports
    /// again after a crash does no harm.
    pub fn record_finished(&mut self, rec: ResultRecord, now: Millis) -> bool {
        if !matches!(self.lookup(rec.id), Lookup::NotFound) || !rec.state.is_final() {
            return false;
        }
        self.record_result(rec, now);
        true
    }

    /// Telemetry a device sent, for the upstream.
    pub fn device_event(&mut self, device: &str, payload: Vec<u8>, now: Millis) {
        self.outbox.push(UpItem::Event {
            device: device.to_string(),
            at: now,
            payload,
        });
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    // ----- replay -------------------------------------------------------

    /// Rebuild from the store: devices first, then every group in order,
    /// then `finish_replay`. Replay emits nothing to journal.
    pub fn replay_device(&mut self, rec: DeviceRecord) {
        if rec.id.contains('/') {
            self.replay_remote_device(rec);
            return;
        }
        let d = self.dev(&rec.id);
        self.devs[d as usize].record = Some(rec);
        self.index_caps(d);
    }

    /// Apply one group read back from disk.
    pub fn replay_group(&mut self, group: Group) {
        match group {
            Group::Journal(seq, entries) => {
                self.open_seq = self.open_seq.max(seq + 1);
                self.live.reserve(entries.len());
                // Register the group so it is dropped if nothing pins it.
                self.pins.entry(seq).or_insert(0);
                for e in entries {
                    match e {
                        Entry::Enqueued(e) => self.replay_enqueued(seq, e),
                        Entry::Requeued {
                            id,
                            gen,
                            attempts,
                            not_before,
                        } => {
                            if let Some(l) = self.live.get_mut(&id) {
                                if l.gen == gen {
                                    l.attempts = attempts;
                                    l.not_before = not_before;
                                    l.requeue_group = Some(seq);
                                }
                            }
                        }
                        Entry::Broadcast(b) => self.replay_broadcast(seq, b),
                    }
                }
            }
            Group::Results(seq, records) => {
                self.open_seq = self.open_seq.max(seq + 1);
                for r in records {
                    if let Some(l) = self.live.get(&r.id) {
                        if l.gen != r.gen {
                            continue;
                        }
                        self.live.remove(&r.id);
                    }
                    self.parents.remove(&r.id);
                    if let Some((origin, key)) = r.key.as_ref().map(|k| (r.origin.as_str(), k)) {
                        let o = self.origin(origin);
                        let payload = r.command.as_ref().map(|c| c.payload.as_slice());
                        let used = KeyUse::new(r.id, r.created_at, &r.target, payload);
                        self.remember_key(o, key, used);
                    }
                    self.index_result(seq, r.id, r.state, r.finished_at);
                }
            }
        }
    }

    fn replay_enqueued(&mut self, seq: u64, e: Enqueued) {
        let id = e.command.id;
        if let Some(l) = self.live.get(&id) {
            if l.gen > e.gen {
                return;
            }
        }
        // A later generation (retry) supersedes the result on record.
        if let Some((rseq, state)) = self.results.remove(&id) {
            if state == State::Dead {
                self.results_dead -= 1;
            }
            let _ = rseq;
        }
        self.next_order = self.next_order.max(e.order + 1);
        let d = self.dev(&e.device);
        let origin = self.origin(&e.command.origin);
        if let Some(k) = &e.command.key {
            let c = &e.command;
            let used = KeyUse::new(id, c.created_at, &c.target, Some(&c.payload));
            self.remember_key(origin, k, used);
        }
        let live = Live {
            device: d,
            gen: e.gen,
            priority: e.command.priority,
            order: e.order,
            group: seq,
            requeue_group: None,
            attempts: e.attempts,
            max_attempts: e.command.max_attempts,
            created_at: e.command.created_at,
            expires_at: e.command.expires_at,
            not_before: e.not_before,
            after: e.command.after.map(Box::new),
            phase: Phase::Ready,
            target: (e.command.target != e.device).then(|| e.command.target.into()),
            origin,
            key: e.command.key.map(Into::into),
            parent: None,
        };
        self.live.insert(id, live);
    }

    fn replay_broadcast(&mut self, seq: u64, b: Broadcast) {
        let Broadcast {
            mut command,
            children,
        } = b;
        let pid = command.id;
        self.next_order = self
            .next_order
            .max(children.iter().map(|c| c.order + 1).max().unwrap_or(0));
        let origin = self.origin(&command.origin);
        if let Some(k) = &command.key {
            let used = KeyUse::new(
                pid,
                command.created_at,
                &command.target,
                Some(&command.payload),
            );
            self.remember_key(origin, k, used);
        }
        command.payload = Vec::new();
        let mut parent = Parent {
            command,
            group: seq,
            children: Vec::with_capacity(children.len()),
            ends: Vec::with_capacity(children.len()),
            open: 0,
            cancelled: false,
        };
        for c in children {
            let d = self.dev(&c.device);
            parent.children.push((c.id, d));
            parent.ends.push(c.end);
            if c.end.is_some() || self.live.get(&c.id).is_some_and(|l| l.gen > 0) {
                continue;
            }
            let live = Live {
                device: d,
                order: c.order,
                attempts: c.attempts,
                not_before: c.not_before,
                ..Live::child_of(&parent.command, origin, seq)
            };
            self.live.insert(c.id, live);
        }
        self.parents.insert(pid, parent);
    }

    /// Never reuse a group seq the store has committed, even one whose
    /// records were all dropped since.
    pub fn replay_last_seq(&mut self, seq: u64) {
        self.open_seq = self.open_seq.max(seq + 1);
    }

    /// After the last group: place every live command, pin its groups, and
    /// settle what the log left half-done.
    /// Size the live table for about `n` commands before replay (from
    /// `Store::live_hint`; bounded by `max_queued`, so a bad hint cannot
    /// allocate more than the box may hold).
    pub fn reserve_live(&mut self, n: u64) {
        let n = n.min(self.limits.max_queued).saturating_mul(11) / 10;
        self.live.reserve(usize::try_from(n).unwrap_or(0));
    }

    /// How many commands are live (queued, waiting or in flight).
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    pub fn finish_replay(&mut self, now: Millis) {
        // One pass over the live commands. Those ready now (nearly all,
        // after a power cut) go straight into their queues, each queue built
        // at once from its sorted commands; the rest are placed one by one.
        let mut pins: FxHashMap<u64, u32> = FxHashMap::default();
        let mut ready: FxHashMap<(u32, usize), Vec<(u64, CommandId)>> = FxHashMap::default();
        let mut others: Vec<(u64, CommandId)> = Vec::new();
        for (id, l) in self.live.iter_mut() {
            *pins.entry(l.group).or_insert(0) += 1;
            if let Some(rg) = l.requeue_group {
                *pins.entry(rg).or_insert(0) += 1;
                self.requeue_holders.entry(rg).or_default().push(*id);
            }
            self.devs[l.device as usize].live += 1;
            if let Some(exp) = l.expires_at {
                self.expiries.insert((exp, *id));
            }
            if l.after.is_none() && l.not_before.is_none_or(|t| t <= now) {
                l.phase = Phase::Ready;
                ready
                    .entry((l.device, l.priority.rank()))
                    .or_default()
                    .push((l.order, *id));
            } else {
                others.push((l.order, *id));
            }
        }
        for (g, n) in pins {
            *self.pins.entry(g).or_insert(0) += n;
        }
        for ((d, rank), mut q) in ready {
            q.sort_unstable();
            self.devs[d as usize].ready[rank] = q.into_iter().collect();
        }
        others.sort_unstable();
        for (_, id) in others {
            self.place(id, now);
        }
        self.unpinned = self
            .pins
            .iter()
            .filter(|(_, &n)| n == 0)
            .map(|(&s, _)| s)
            .collect();
        // A dependent whose dependency ended badly but whose own end was not
        // on disk (it always is: both are in one batch) is settled here.
        let dangling: Vec<CommandId> = self
            .blocked
            .keys()
            .filter(|dep| !self.is_live(**dep))
            .copied()
            .collect();
        for dep in dangling {
            let ok = matches!(self.results.get(&dep), Some((_, State::Succeeded)));
            self.dependency_done(dep, ok, now);
        }
        // A broadcast's children that ended after its entry was written have
        // their end in their own result; one whose last child ended is
        // settled (both are always in one batch, so this is a safety net).
        let pids: Vec<CommandId> = self.parents.keys().copied().collect();
        for pid in pids {
            let mut p = self.parents.remove(&pid).expect("listed");
            p.open = 0;
            for (i, &(cid, _)) in p.children.iter().enumerate() {
                if p.ends[i].is_some() {
                    continue;
                }
                if self
                    .live
                    .get(&cid)
                    .is_some_and(|l| l.parent.as_deref() == Some(&pid))
                {
                    p.open += 1;
                } else {
                    p.ends[i] = Some(self.results.get(&cid).map_or(State::Cancelled, |r| r.1));
                }
            }
            self.parents.insert(pid, p);
            self.settle_parent(pid, now);
        }
        self.effects = Effects::default();
        self.settle_cancelling();
        self.tick(now);
    }

    // ----- requests -----------------------------------------------------

    /// Enqueue a command. Durable once the round is sealed and written.
    pub fn send(&mut self, req: SendRequest, now: Millis) -> Result<SendReceipt, QueueError> {
        self.send_as(None, req, now)
    }

    /// Enqueue a command under an id chosen upstream (a hub forwarding it),
    /// or a new one. A known id is a redelivery: answered as a duplicate,
    /// never queued twice.
    pub fn send_as(
        &mut self,
        id: Option<CommandId>,
        req: SendRequest,
        now: Millis,
    ) -> Result<SendReceipt, QueueError> {
        if let Some(id) = id {
            if let Some(state) = self.state_of(id) {
                return Ok(SendReceipt {
                    id,
                    state,
                    duplicate: true,
                });
            }
        }
        let SendRequest {
            target,
            payload,
            opts,
            origin,
            signature,
        } = req;
        if payload.len() > self.limits.max_payload {
            return Err(QueueError::BadRequest(format!(
                "payload of {} bytes is over the limit of {} bytes; send a reference (a URL, a file name) instead",
                payload.len(),
                self.limits.max_payload
            )));
        }
        let route = self.route(&target)?;
        let o = self.origin(&origin);
        if let Some(k) = &opts.key {
            self.expire_keys(now);
            if let Some(used) = self.keys.get(&(o, k.as_str().into())) {
                let id = used.id;
                // The same key for another command is a sender's bug: answering
                // with the first id would report a command that never ran.
                if let Some(what) = used.differs(&target, &payload) {
                    return Err(QueueError::KeyReused {
                        key: k.clone(),
                        id,
                        what: what.into(),
                    });
                }
                let state = self.state_of(id).unwrap_or(State::Queued);
                return Ok(SendReceipt {
                    id,
                    state,
                    duplicate: true,
                });
            }
        }
        let max_attempts = opts
            .max_attempts
            .unwrap_or(self.limits.default_max_attempts)
            .max(1);
        let expires_at = opts
            .ttl_ms
            .or(self.limits.default_ttl_ms)
            .map(|t| now.saturating_add(t));
        // An `after` already decided is settled now, so replay never needs a
        // dependency's record that retention may have dropped.
        let mut after = opts.after;
        let mut dep_failed = None;
        if let Some(dep) = after {
            if self.is_live(dep) {
                // stays blocked
            } else {
                match self.results.get(&dep) {
                    Some((_, State::Succeeded)) => after = None,
                    Some((_, s)) => dep_failed = Some(*s),
                    None => return Err(QueueError::UnknownDependency(dep)),
                }
            }
        }
        if let Route::Broadcast(devs) = &route {
            // A broadcast is admitted whole or not at all: shedding one
            // command per child would trade many for one.
            let queued = self.live.len() as u64;
            if queued + devs.len() as u64 > self.limits.max_queued {
                return Err(QueueError::QueueFull {
                    queued,
                    limit: self.limits.max_queued,
                });
            }
        }
        self.make_room(opts.priority, now)?;

        let id = match id {
            Some(id) => id,
            None => self.new_id(now),
        };
        let command = Command {
            id,
            target: target.clone(),
            priority: opts.priority,
            payload,
            created_at: now,
            expires_at,
            max_attempts,
            key: opts.key.clone(),
            after,
            not_before: opts.not_before,
            origin,
            signature,
        };
        if let Some(k) = &opts.key {
            let used = KeyUse::new(id, now, &command.target, Some(&command.payload));
            self.remember_key(o, k, used);
        }
        self.stats.enqueued_total += 1;
        if let Some(s) = dep_failed {
            let device = match &route {
                Route::Device(d) | Route::Pool(d) => self.devs[*d as usize].id.clone(),
                Route::Broadcast(_) => target.clone(),
            };
            let rec = ResultRecord {
                id,
                gen: 0,
                device,
                target,
                priority: command.priority,
                state: State::Dead,
                outcome: None,
                error: Some(format!(
                    "DependencyFailed: command {} ended {}",
                    command.after.unwrap_or(id),
                    s
                )),
                attempts: 0,
                max_attempts,
                created_at: now,
                finished_at: now,
                origin: command.origin.clone(),
                key: command.key.clone(),
                command: Some(command),
                children: Vec::new(),
            };
            self.record_result(rec, now);
            return Ok(SendReceipt {
                id,
                state: State::Dead,
                duplicate: false,
            });
        }
        let device = match route {
            Route::Device(d) | Route::Pool(d) => d,
            Route::Broadcast(devs) => {
                self.broadcast(command, o, devs, now);
                return Ok(SendReceipt {
                    id,
                    state: State::Queued,
                    duplicate: false,
                });
            }
        };
        let order = self.next_order;
        self.next_order += 1;
        let live = Live {
            device,
            gen: 0,
            priority: command.priority,
            order,
            group: self.open_seq,
            requeue_group: None,
            attempts: 0,
            max_attempts,
            created_at: now,
            expires_at,
            not_before: command.not_before,
            after: after.map(Box::new),
            phase: Phase::Ready,
            target: (target != self.devs[device as usize].id).then(|| target.into()),
            origin: o,
            key: command.key.as_deref().map(Into::into),
            parent: None,
        };
        let entry = Enqueued {
            device: self.devs[device as usize].id.clone(),
            order,
            gen: 0,
            attempts: 0,
            not_before: command.not_before,
            command,
        };
        self.journal.push(Entry::Enqueued(entry));
        self.admit(id, live, now);
        self.event(id, State::Queued, now, None, None);
        let state = self.state_of(id).unwrap_or(State::Queued);
        self.pump(device, now);
        Ok(SendReceipt {
            id,
            state,
            duplicate: false,
        })
    }

    /// A device sends a command: allowed only if the ACL lets it address
    /// the target. Its origin is the device.
    pub fn device_send(
        &mut self,
        from: &str,
        mut req: SendRequest,
        now: Millis,
    ) -> Result<SendReceipt, QueueError> {
        let sender = self
            .dev_index
            .get(from)
            .and_then(|&d| self.devs[d as usize].record.as_ref())
            .filter(|r| !r.revoked)
            .ok_or_else(|| QueueError::UnknownDevice(from.to_string()))?;
        let allowed = self.acl.allows(from, sender, &req.target, |id| {
            self.dev_index
                .get(id)
                .and_then(|&d| self.devs[d as usize].record.as_ref())
        });
        if !allowed {
            return Err(QueueError::Forbidden {
                device: from.to_string(),
                target: req.target,
            });
        }
        req.origin = from.to_string();
        self.send(req, now)
    }

    /// Fan a broadcast out: one journal entry holds the payload once and
    /// every child; each child is then a command of its own device.
    fn broadcast(&mut self, mut command: Command, origin: u32, devs: Vec<u32>, now: Millis) {
        let pid = command.id;
        let seq = self.open_seq;
        let mut children = Vec::with_capacity(devs.len());
        let mut parent_children = Vec::with_capacity(devs.len());
        for &d in &devs {
            let cid = self.new_id(now);
            let order = self.next_order;
            self.next_order += 1;
            children.push(Child {
                id: cid,
                device: self.devs[d as usize].id.clone(),
                order,
                attempts: 0,
                not_before: command.not_before,
                end: None,
            });
            parent_children.push((cid, d));
        }
        let entry = Broadcast {
            command: command.clone(),
            children,
        };
        command.payload = Vec::new();
        self.parents.insert(
            pid,
            Parent {
                command,
                group: seq,
                ends: vec![None; devs.len()],
                open: devs.len() as u32,
                children: parent_children.clone(),
                cancelled: false,
            },
        );
        let template = Live::child_of(&self.parents[&pid].command, origin, seq);
        self.event(pid, State::Queued, now, None, None);
        for (c, &(cid, d)) in entry.children.iter().zip(&parent_children) {
            let live = Live {
                device: d,
                order: c.order,
                ..template.clone()
            };
            self.admit(cid, live, now);
            self.event(cid, State::Queued, now, None, None);
        }
        self.journal.push(Entry::Broadcast(entry));
        for (_, d) in parent_children {
            self.pump(d, now);
        }
    }

    fn new_id(&mut self, now: Millis) -> CommandId {
        // Ids are random within a millisecond; a collision (a restarted
        // simulation with the same seed, or plain bad luck) must not merge
        // two commands.
        loop {
            let id = CommandId::new(now, self.random128());
            if !self.is_live(id) && !self.results.contains_key(&id) {
                return id;
            }
        }
    }

    fn is_live(&self, id: CommandId) -> bool {
        self.live.contains_key(&id) || self.parents.contains_key(&id)
    }

    /// Where a command is, for `show`.
    pub fn lookup(&self, id: CommandId) -> Lookup {
        if let Some(l) = self.live.get(&id) {
            return Lookup::Live(Box::new(self.view(id, l)));
        }
        if let Some(p) = self.parents.get(&id) {
            return Lookup::Live(Box::new(self.parent_view(id, p)));
        }
        match self.results.get(&id) {
            Some(&(seq, state)) => Lookup::Finished { seq, state },
            None => Lookup::NotFound,
        }
    }

    /// A device's live commands, in the order they will be delivered:
    /// in flight, then ready by priority and FIFO, then waiting.
    pub fn list(&self, device: &str) -> Result<Vec<CommandView>, QueueError> {
        let d = *self
            .dev_index
            .get(device)
            .ok_or_else(|| QueueError::UnknownDevice(device.to_string()))?;
        let dev = &self.devs[d as usize];
        let mut in_flight: Vec<_> = if dev.pool {
            // A pool's commands are in flight on its members.
            self.live
                .iter()
                .filter(|(_, l)| l.device == d && matches!(l.phase, Phase::InFlight { .. }))
                .map(|(id, l)| (l.priority.rank(), l.order, *id))
                .collect()
        } else {
            let mut v: Vec<_> = dev
                .in_flight
                .iter()
                .map(|id| (self.live[id].priority.rank(), self.live[id].order, *id))
                .collect();
            if dev.handed > 0 {
                v.extend(
                    self.live
                        .iter()
                        .filter(|(_, l)| l.device == d && matches!(l.phase, Phase::Handed { .. }))
                        .map(|(id, l)| (l.priority.rank(), l.order, *id)),
                );
            }
            v
        };
        in_flight.sort_unstable();
        let mut out: Vec<CommandView> = in_flight
            .into_iter()
            .map(|(_, _, id)| self.view(id, &self.live[&id]))
            .collect();
        for q in &dev.ready {
            out.extend(q.values().map(|id| self.view(*id, &self.live[id])));
        }
        let mut rest: Vec<_> = self
            .live
            .iter()
            .filter(|(_, l)| l.device == d && matches!(l.phase, Phase::Waiting | Phase::Blocked))
            .map(|(id, l)| (l.priority.rank(), l.order, *id))
            .collect();
        rest.sort_unstable();
        out.extend(
            rest.into_iter()
                .map(|(_, _, id)| self.view(id, &self.live[&id])),
        );
        Ok(out)
    }

    /// Cancel a live command. One in flight is also cancelled on its device.
    pub fn cancel(&mut self, id: CommandId, now: Millis) -> Result<CommandView, QueueError> {
        if let Some(p) = self.parents.get_mut(&id) {
            // A broadcast: cancel every child not yet finished.
            p.cancelled = true;
            let open: Vec<CommandId> = p
                .children
                .iter()
                .zip(&p.ends)
                .filter(|(_, end)| end.is_none())
                .map(|(c, _)| c.0)
                .collect();
            let view = self.parent_view(id, &self.parents[&id]);
            for c in open {
                let msg = format!("cancelled by operator (broadcast {id})");
                self.finish(c, State::Cancelled, None, Some(msg), now);
            }
            self.settle_parent(id, now);
            return Ok(CommandView {
                state: State::Cancelled,
                finished_at: Some(now),
                error: Some("cancelled by operator".into()),
                ..view
            });
        }
        if let Some(view) = self.cancel_remote(id) {
            return Ok(view);
        }
        let Some(l) = self.live.get(&id) else {
            return Err(self.not_live(id, "cancel"));
        };
        let view = self.view(id, l);
        self.finish(
            id,
            State::Cancelled,
            None,
            Some("cancelled by operator".into()),
            now,
        );
        Ok(CommandView {
            state: State::Cancelled,
            finished_at: Some(now),
            error: Some("cancelled by operator".into()),
            ..view
        })
    }

    /// Put a Dead or Failed command back in the queue with fresh attempts.
    /// `record` is its result record, read from disk by the shell.
    pub fn retry(&mut self, record: ResultRecord, now: Millis) -> Result<CommandView, QueueError> {
        let id = record.id;
        if self.live.contains_key(&id) {
            return Err(self.not_live(id, "retry"));
        }
        let current = self.results.get(&id).map(|&(_, s)| s);
        if current != Some(record.state) || !matches!(record.state, State::Dead | State::Failed) {
            return Err(QueueError::InvalidTransition {
                id,
                state: current.unwrap_or(record.state),
                action: "retry (only dead or failed commands can be retried)".into(),
            });
        }
        if !record.children.is_empty() {
            return Err(QueueError::InvalidTransition {
                id,
                state: record.state,
                action: "retry a broadcast (retry each child that did not succeed by its own id, listed by `outpost show`)".into(),
            });
        }
        // The edge ended it and dedupes by id: a second forward under the
        // same id is taken as a redelivery, never run, and its end never
        // comes up again, so the retry would wait forever. (Simulation
        // seed 1.)
        if let Ok(Target::Edge { edge, .. }) = Target::parse(&record.target) {
            return Err(QueueError::InvalidTransition {
                id,
                state: record.state,
                action: format!(
                    "retry a command that `{edge}` ran (its box dedupes by id and would not run it again; send it again for a new id)"
                ),
            });
        }
        if let Some((pid, _)) = self
            .parents
            .iter()
            .find(|(_, p)| p.children.iter().any(|c| c.0 == id))
        {
            return Err(QueueError::InvalidTransition {
                id,
                state: record.state,
                action: format!("retry it while its broadcast {pid} runs (retry it once the broadcast has ended)"),
            });
        }
        let Some(mut command) = record.command else {
            return Err(QueueError::InvalidTransition {
                id,
                state: record.state,
                action: "retry (its payload was not kept)".into(),
            });
        };
        // A `cap:` command goes back to its pool; anything else to the
        // device it was for.
        let device = match self.route(if record.target.starts_with("cap:") {
            &record.target
        } else {
            &record.device
        })? {
            Route::Device(d) | Route::Pool(d) => d,
            Route::Broadcast(_) => {
                return Err(QueueError::BadRequest(
                    "internal: retry routed to a broadcast".into(),
                ))
            }
        };
        if let Some((_, State::Dead)) = self.results.remove(&id) {
            self.results_dead -= 1;
        }
        // Its dependency was settled when it was first sent.
        command.after = None;
        // Attempt numbers keep counting across an operator retry, with a
        // fresh budget on top: a device that dedupes by (id, attempt) must
        // never mistake the retry for a redelivery of an attempt it ran.
        let used = record.attempts;
        command.max_attempts = used.saturating_add(command.max_attempts.max(1));
        command.not_before = None;
        let order = self.next_order;
        self.next_order += 1;
        let gen = record.gen + 1;
        let o = self.origin(&command.origin);
        let live = Live {
            device,
            gen,
            priority: command.priority,
            order,
            group: self.open_seq,
            requeue_group: None,
            attempts: used,
            max_attempts: command.max_attempts,
            created_at: command.created_at,
            expires_at: command.expires_at.filter(|&e| e > now),
            not_before: None,
            after: None,
            phase: Phase::Ready,
            target: (command.target != self.devs[device as usize].id)
                .then(|| command.target.as_str().into()),
            origin: o,
            key: command.key.as_deref().map(Into::into),
            parent: None,
        };
        // An operator retry outlives the original ttl.
        command.expires_at = live.expires_at;
        self.journal.push(Entry::Enqueued(Enqueued {
            device: self.devs[device as usize].id.clone(),
            order,
            gen,
            attempts: used,
            not_before: None,
            command,
        }));
        self.admit(id, live, now);
        self.event(id, State::Queued, now, None, None);
        self.pump(device, now);
        Ok(self.view(id, &self.live[&id]))
    }

    /// Enroll a device, refusing an id that already has a record (enrolled
    /// or revoked) unless `force`: checked here, in the writer's round, so
    /// two enrollments of one id cannot both pass.
    pub fn enroll_new(
        &mut self,
        rec: DeviceRecord,
        force: bool,
        now: Millis,
    ) -> Result<(), QueueError> {
        let existing = self
            .dev_index
            .get(rec.id.as_str())
            .and_then(|&d| self.devs[d as usize].record.as_ref());
        check_existing(&rec.id, existing, force)?;
        self.enroll(rec, now);
        Ok(())
    }

    /// Add or update an enrolled device.
    pub fn enroll(&mut self, mut rec: DeviceRecord, now: Millis) {
        let d = self.dev(&rec.id);
        rec.revoked = false;
        if rec.enrolled_at == 0 {
            rec.enrolled_at = now;
        }
        self.devs[d as usize].record = Some(rec.clone());
        self.outbox.push(UpItem::Device(rec.clone()));
        self.effects.device_writes.push(rec);
        self.index_caps(d);
        self.pump(d, now);
    }

    /// Revoke a device: its session ends, it may not connect again, and it
    /// gets no new commands. What is queued for it stays (re-enrolling
    /// re-admits it).
    pub fn revoke(&mut self, device: &str, now: Millis) -> Result<DeviceRecord, QueueError> {
        let d = *self
            .dev_index
            .get(device)
            .ok_or_else(|| QueueError::UnknownDevice(device.to_string()))?;
        let rec = {
            let dev = &mut self.devs[d as usize];
            let rec = dev
                .record
                .as_mut()
                .ok_or_else(|| QueueError::UnknownDevice(device.to_string()))?;
            rec.revoked = true;
            rec.clone()
        };
        self.effects.device_writes.push(rec.clone());
        self.outbox.push(UpItem::Device(rec.clone()));
        self.index_caps(d);
        if self.devs[d as usize].session.is_some() {
            self.disconnect_dev(d, now);
            self.effects.close_sessions.push(device.to_string());
        }
        Ok(rec)
    }

    pub fn devices(&self) -> Vec<DeviceView> {
        let mut v: Vec<DeviceView> = self
            .devs
            .iter()
            .filter_map(|d| {
                let record = d.record.clone()?;
                let sync = record
                    .tags
                    .iter()
                    .any(|t| t == crate::route::GATEWAY_TAG)
                    .then(|| EdgeSync {
                        cursor: self.cursors.get(&record.id).copied().unwrap_or(0),
                        last_up: self.last_up.get(&record.id).copied(),
                    });
                Some(DeviceView {
                    online: d.session.is_some(),
                    queued: d.live - d.handed - (d.in_flight.len() as u64 - d.borrowed),
                    in_flight: d.in_flight.len() as u64 + d.handed,
                    record,
                    sync,
                    shared_bundle: None,
                })
            })
            .collect();
        // The devices of the boxes below, as they last reported them (their
        // queues are those boxes' own).
        v.extend(self.remote_devices.values().map(|r| DeviceView {
            record: r.clone(),
            online: false,
            queued: 0,
            in_flight: 0,
            sync: None,
            shared_bundle: None,
        }));
        v.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        v
    }

    pub fn stats(&self) -> QueueStats {
        let in_flight: u64 = self
            .devs
            .iter()
            .map(|d| d.in_flight.len() as u64 + d.handed)
            .sum();
        QueueStats {
            queued: self.live.len() as u64 - in_flight,
            in_flight,
            devices_online: self.devs.iter().filter(|d| d.session.is_some()).count() as u64,
            dead: self.results_dead,
            results_kept: self.results.len() as u64,
            journal_groups: self.pins.len() as u64,
            ..self.stats.clone()
        }
    }

    /// Attach a device. Returns the session id that later calls must carry.
    /// A second session for the same device replaces the first: what the
    /// first had in flight is delivered again on the new one.
    pub fn connect(&mut self, device: &str, window: u32, now: Millis) -> Result<u64, QueueError> {
        self.connect_offering(device, window, None, now)
    }

    /// Attach a device whose Hello named the capabilities it offers in this
    /// session (`None`: all it is enrolled with). It serves the `cap:` pools
    /// of its enrolled capabilities that it offers.
    pub fn connect_offering(
        &mut self,
        device: &str,
        window: u32,
        offered: Option<Vec<String>>,
        now: Millis,
    ) -> Result<u64, QueueError> {
        let d = self
            .dev_index
            .get(device)
            .copied()
            .filter(|&d| self.devs[d as usize].record.is_some())
            .ok_or_else(|| QueueError::UnknownDevice(device.to_string()))?;
        if self.devs[d as usize]
            .record
            .as_ref()
            .is_some_and(|r| r.revoked)
        {
            return Err(QueueError::Revoked(device.to_string()));
        }
        if self.devs[d as usize].session.is_some() {
            self.disconnect_dev(d, now);
        }
        let token = self.next_session;
        self.next_session += 1;
        let window = if window == 0 {
            self.limits.window
        } else {
            window
        };
        self.devs[d as usize].session = Some((token, window));
        self.devs[d as usize].offered = offered;
        self.index_caps(d);
        self.touch(d, now);
        if self.is_gateway(d) {
            self.resend_cancels(d);
        }
        self.pump(d, now);
        Ok(token)
    }

    /// Detach a device's session (a stale token is ignored).
    pub fn disconnect(&mut self, device: &str, session: u64, now: Millis) {
        if let Some(&d) = self.dev_index.get(device) {
            if self.devs[d as usize].session.map(|s| s.0) == Some(session) {
                self.disconnect_dev(d, now);
            }
        }
    }

    /// A device reports an outcome. Only the device the command is in
    /// flight on may report it.
    pub fn ack(
        &mut self,
        device: &str,
        id: CommandId,
        outcome: Outcome,
        now: Millis,
    ) -> Result<(), QueueError> {
        let not_in_flight = || QueueError::NotInFlight {
            id,
            device: device.to_string(),
        };
        let d = *self.dev_index.get(device).ok_or_else(not_in_flight)?;
        let l = self.live.get(&id).ok_or_else(not_in_flight)?;
        let Phase::InFlight { attempt, on } = l.phase else {
            return Err(not_in_flight());
        };
        if on != d {
            return Err(not_in_flight());
        }
        let max_attempts = l.max_attempts;
        self.stats.acked_total += 1;
        match outcome {
            Outcome::Ok(_) => self.finish(id, State::Succeeded, Some(outcome), None, now),
            Outcome::Rejected { .. } => self.finish(id, State::Failed, Some(outcome), None, now),
            Outcome::Failed { .. } => {
                if attempt >= max_attempts {
                    let msg = format!("gave up after {attempt} attempts");
                    self.finish(id, State::Dead, Some(outcome), Some(msg), now);
                } else {
                    self.requeue(id, attempt, now);
                }
            }
        }
        self.pump(d, now);
        Ok(())
    }

    /// Let time pass: wake waiting commands, expire old ones.
    pub fn tick(&mut self, now: Millis) {
        while let Some(&(due, id)) = self.expiries.first() {
            if due > now {
                break;
            }
            self.expiries.pop_first();
            if self.live.contains_key(&id) {
                self.finish(id, State::Expired, None, Some("ttl ran out".into()), now);
            }
        }
        let mut touched = Vec::new();
        while let Some(&(due, id)) = self.wakeups.first() {
            if due > now {
                break;
            }
            self.wakeups.pop_first();
            let Some(l) = self.live.get_mut(&id) else {
                continue;
            };
            if l.phase == Phase::Waiting {
                l.not_before = None;
                touched.push(l.device);
                self.place(id, now);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for d in touched {
            self.pump(d, now);
        }
    }

    /// The wall clock jumped by `delta_ms` (NTP stepping a box that booted
    /// without a real-time clock, an operator setting the date). Relative
    /// timers keep what was left of them: a ttl and a retry backoff mean
    /// "this long from when it was set", so they move with the jump. An
    /// absolute `not_before` a sender gave names a wall-clock instant and
    /// stays. (Journalled instants are not rewritten: a restart after a
    /// jump goes by the wall clock.)
    pub fn clock_jumped(&mut self, delta_ms: i64, now: Millis) {
        let shift = |t: Millis| -> Millis {
            if delta_ms >= 0 {
                t.saturating_add(delta_ms as u64)
            } else {
                t.saturating_sub(delta_ms.unsigned_abs())
            }
        };
        let expiries = std::mem::take(&mut self.expiries);
        for (t, id) in expiries {
            let t = shift(t);
            if let Some(l) = self.live.get_mut(&id) {
                l.expires_at = Some(t);
            }
            self.expiries.insert((t, id));
        }
        let wakeups = std::mem::take(&mut self.wakeups);
        for (t, id) in wakeups {
            // A wait after an attempt is a backoff; before any, the
            // sender's not_before.
            let backoff = self.live.get(&id).is_some_and(|l| l.attempts > 0);
            let t = if backoff { shift(t) } else { t };
            if backoff {
                if let Some(l) = self.live.get_mut(&id) {
                    l.not_before = Some(t);
                }
            }
            self.wakeups.insert((t, id));
        }
        self.tick(now);
    }

    /// The next instant at which `tick` has work, if any.
    pub fn next_deadline(&self) -> Option<Millis> {
        let w = self.wakeups.first().map(|x| x.0);
        let e = self.expiries.first().map(|x| x.0);
        match (w, e) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The journal group that holds a live command's payload.
    pub fn payload_group(&self, id: CommandId) -> Option<u64> {
        self.live.get(&id).map(|l| l.group)
    }

    /// The oldest journal group worth re-journalling, if any: far behind
    /// the head and pinned by only a few commands.
    pub fn relocation_candidate(&self) -> Option<u64> {
        let (&seq, &pins) = self.pins.iter().find(|(_, &n)| n > 0)?;
        (self.open_seq.saturating_sub(seq) > self.limits.relocate_lag
            && pins <= self.limits.relocate_max_pins)
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
    fn relocate_broadcast(&mut self, seq: u64, mut b: Broadcast) {
        let pid = b.command.id;
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
            if l.parent.as_deref() != Some(&pid) || l.group != seq {
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

    /// The queue's own invariants, over memory alone (what must also be on
    /// disk is checked by the tests and the simulation against their
    /// disks). The first one broken, named; linear in what is live.
    pub fn check_invariants(&self) -> Result<(), String> {
        macro_rules! ensure {
            ($cond:expr, $($why:tt)*) => {
                if !$cond {
                    return Err(format!($($why)*));
                }
            };
        }
        let mut per_device = vec![0u64; self.devs.len()];
        for (id, l) in &self.live {
            ensure!(
                !self.results.contains_key(id),
                "{id} is both live and finished"
            );
            per_device[l.device as usize] += 1;
            if let Some(rg) = l.requeue_group {
                ensure!(
                    self.requeue_holders
                        .get(&rg)
                        .is_some_and(|v| v.contains(id)),
                    "{id} missing from the requeue holders of group {rg}"
                );
            }
            let dev = &self.devs[l.device as usize];
            let in_ready = dev.ready[l.priority.rank()].get(&l.order) == Some(id);
            match l.phase {
                Phase::Ready => ensure!(in_ready, "{id} is ready but not queued"),
                Phase::InFlight { on, .. } => {
                    ensure!(
                        self.devs[on as usize].in_flight.contains(id) && !in_ready,
                        "{id} is in flight but not held by its device"
                    );
                    // A pool command runs on a device (which may have lost
                    // the capability since: it keeps what it holds).
                    ensure!(
                        on == l.device
                            || (self.devs[l.device as usize].pool && !self.devs[on as usize].pool),
                        "{id} is in flight on a device outside its route"
                    );
                }
                Phase::Waiting | Phase::Blocked => {
                    ensure!(!in_ready, "{id} waits but is queued")
                }
                Phase::Handed { .. } => {
                    ensure!(
                        !in_ready && !dev.in_flight.contains(id),
                        "{id} is handed down but also queued or in flight"
                    );
                    ensure!(
                        self.is_gateway(l.device),
                        "{id} is handed to a device that is no gateway"
                    );
                }
            }
            if let Some(&pid) = l.parent.as_deref() {
                let Some(p) = self.parents.get(&pid) else {
                    return Err(format!("{id}: its parent {pid} is gone"));
                };
                let i = p.children.iter().position(|x| x.0 == *id);
                ensure!(
                    i.is_some_and(|i| p.ends[i].is_none()),
                    "{id} is live but its parent {pid} has its end"
                );
            }
        }
        for (pid, p) in &self.parents {
            let open = p.ends.iter().filter(|e| e.is_none()).count();
            ensure!(p.open as usize == open, "{pid}: open children miscounted");
            ensure!(
                open > 0,
                "{pid}: a parent with no open child is not settled"
            );
        }
        for (i, dev) in self.devs.iter().enumerate() {
            let borrowed = dev
                .in_flight
                .iter()
                .filter(|id| self.live.get(id).is_some_and(|l| l.device != i as u32))
                .count();
            ensure!(
                dev.borrowed as usize == borrowed,
                "{}: borrowed miscounted",
                dev.id
            );
            let ready: usize = dev.ready.iter().map(|q| q.len()).sum();
            if dev.pool && ready > 0 {
                for &m in &dev.members {
                    let mdev = &self.devs[m as usize];
                    ensure!(
                        !mdev.has_room() || !mdev.serves.contains(&(i as u32)),
                        "{} idles while pool {} has work",
                        mdev.id,
                        dev.id
                    );
                }
            }
            if let Some((_, window)) = dev.session {
                ensure!(
                    dev.in_flight.len() as u32 <= window,
                    "window exceeded on {}",
                    dev.id
                );
                // Work-conserving: nothing ready waits while there is room.
                ensure!(
                    ready == 0 || dev.in_flight.len() as u32 == window,
                    "{} idles with work",
                    dev.id
                );
            } else {
                ensure!(
                    dev.in_flight.is_empty(),
                    "{} is offline with commands in flight",
                    dev.id
                );
            }
            ensure!(
                dev.live == per_device[i],
                "{}: live commands miscounted",
                dev.id
            );
        }
        Ok(())
    }

    /// Close the round: the records to write as one group. After writing it
    /// durably, the shell takes `take_effects`. Shells call [`Self::round`].
    pub fn seal(&mut self, now: Millis) -> Sealed {
        self.retain_results(now);
        let seq = self.open_seq;
        let mut drop_journal: Vec<u64> = std::mem::take(&mut self.unpinned)
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

    // ----- internals ----------------------------------------------------

    fn random(&mut self) -> u64 {
        // splitmix64: deterministic for a seed, enough for jitter and ids.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn random128(&mut self) -> u128 {
        ((self.random() as u128) << 64) | self.random() as u128
    }

    fn dev(&mut self, id: &str) -> u32 {
        if let Some(&d) = self.dev_index.get(id) {
            return d;
        }
        let d = self.devs.len() as u32;
        self.devs.push(Dev::new(id.to_string()));
        self.dev_index.insert(id.to_string(), d);
        d
    }

    fn origin(&mut self, o: &str) -> u32 {
        if let Some(&i) = self.origin_index.get(o) {
            return i;
        }
        let i = self.origins.len() as u32;
        self.origins.push(o.to_string());
        self.origin_index.insert(o.to_string(), i);
        i
    }

    /// Resolve a target: one device, a capability pool, or the devices a
    /// broadcast fans out to (those with the tag now).
    fn route(&mut self, target: &str) -> Result<Route, QueueError> {
        let t = Target::parse(target).map_err(|e| {
            QueueError::BadRequest(format!(
                "{e}; a target is a device id (dev-7), tag:NAME or cap:NAME"
            ))
        })?;
        match t {
            Target::Device(id) => {
                let d = self.enrolled(id)?;
                if self.is_gateway(d) {
                    return Err(QueueError::NoRoute(format!(
                        "`{id}` is a box below this one; address its devices as `{id}/DEVICE`, `{id}/tag:T` or `{id}/cap:C`"
                    )));
                }
                Ok(Route::Device(d))
            }
            Target::Tag(tag) => {
                let devs: Vec<u32> = self
                    .devs
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| {
                        d.record
                            .as_ref()
                            .is_some_and(|r| !r.revoked && r.has_tag(tag))
                    })
                    .map(|(i, _)| i as u32)
                    .collect();
                if devs.is_empty() {
                    return Err(QueueError::NoRoute(format!(
                        "no enrolled device has tag `{tag}`; add it with `outpost tag DEVICE --add {tag}`"
                    )));
                }
                Ok(Route::Broadcast(devs))
            }
            Target::Cap(cap) => match self.dev_index.get(target) {
                Some(&p) if !self.devs[p as usize].members.is_empty() => Ok(Route::Pool(p)),
                _ => Err(QueueError::NoRoute(format!(
                    "no enrolled device has capability `{cap}`; add it with `outpost tag DEVICE --add-cap {cap}`"
                ))),
            },
            Target::Edge { edge, .. } => self.route_edge(edge, target),
        }
    }

    /// An enrolled, not revoked device.
    fn enrolled(&self, id: &str) -> Result<u32, QueueError> {
        let d = self
            .dev_index
            .get(id)
            .copied()
            .filter(|&d| self.devs[d as usize].record.is_some())
            .ok_or_else(|| QueueError::UnknownDevice(id.to_string()))?;
        if self.devs[d as usize]
            .record
            .as_ref()
            .is_some_and(|r| r.revoked)
        {
            return Err(QueueError::Revoked(id.to_string()));
        }
        Ok(d)
    }

    /// Bring a device's pool memberships in line with its record, and the
    /// pools it serves in line with its session's Hello.
    fn index_caps(&mut self, d: u32) {
        let caps: Vec<String> = match &self.devs[d as usize].record {
            Some(r) if !r.revoked => r.caps.clone(),
            _ => Vec::new(),
        };
        let mut pools = Vec::with_capacity(caps.len());
        for c in &caps {
            pools.push(self.dev(&format!("cap:{c}")));
        }
        for (i, dev) in self.devs.iter_mut().enumerate() {
            if dev.pool && !pools.contains(&(i as u32)) {
                dev.members.retain(|&m| m != d);
            }
        }
        for &p in &pools {
            let m = &mut self.devs[p as usize].members;
            if !m.contains(&d) {
                m.push(d);
            }
        }
        // A Hello may narrow what the device serves, never widen it.
        let dev = &mut self.devs[d as usize];
        dev.serves = caps
            .iter()
            .zip(&pools)
            .filter(|(c, _)| dev.offered.as_ref().is_none_or(|o| o.contains(c)))
            .map(|(_, &p)| p)
            .collect();
    }

    /// Change an enrolled device's tags and capabilities. New broadcasts
    /// and `cap:` commands follow the new labels; commands already routed
    /// stay where they are.
    pub fn relabel(&mut self, r: Relabel, now: Millis) -> Result<DeviceRecord, QueueError> {
        for (names, what) in [
            (&r.add_tags, "tag"),
            (&r.remove_tags, "tag"),
            (&r.add_caps, "capability"),
            (&r.remove_caps, "capability"),
        ] {
            for n in names {
                check_name(n, what).map_err(|e| QueueError::BadRequest(e.to_string()))?;
            }
        }
        let d = self.enrolled(&r.device)?;
        let rec = self.devs[d as usize].record.as_mut().expect("enrolled");
        fn apply(list: &mut Vec<String>, add: &[String], remove: &[String]) {
            list.retain(|x| !remove.contains(x));
            for a in add {
                if !list.contains(a) {
                    list.push(a.clone());
                }
            }
            list.sort();
        }
        apply(&mut rec.tags, &r.add_tags, &r.remove_tags);
        apply(&mut rec.caps, &r.add_caps, &r.remove_caps);
        let rec = rec.clone();
        self.effects.device_writes.push(rec.clone());
        self.outbox.push(UpItem::Device(rec.clone()));
        self.index_caps(d);
        self.pump(d, now);
        Ok(rec)
    }

    fn remember_key(&mut self, origin: u32, key: &str, mut used: KeyUse) {
        let k: Box<str> = key.into();
        let at = used.at;
        // A result record carries the payload only for ends that may be
        // retried: keep the digest an earlier record of the same command gave.
        let old = self.keys.get(&(origin, k.clone()));
        if let Some(old) = old.filter(|o| o.id == used.id) {
            used.payload = used.payload.or(old.payload);
        }
        if self.keys.insert((origin, k.clone()), used).is_none() {
            self.key_ages.push_back((at, origin, k));
        }
    }

    fn expire_keys(&mut self, now: Millis) {
        while let Some((at, _, _)) = self.key_ages.front() {
            if now.saturating_sub(*at) < self.limits.key_window_ms {
                break;
            }
            let (_, o, k) = self.key_ages.pop_front().expect("front exists");
            let key = (o, k);
            if self
                .keys
                .get(&key)
                .is_some_and(|u| now.saturating_sub(u.at) >= self.limits.key_window_ms)
            {
                self.keys.remove(&key);
            }
        }
    }

    /// Refuse or shed when the box is at a bound: a new command may push out
    /// the newest queued command of a strictly lower priority.
    fn make_room(&mut self, priority: Priority, now: Millis) -> Result<(), QueueError> {
        if let Some(free) = self.free.filter(|&f| f < self.limits.min_free_disk) {
            // sled does not give the space of finished commands back to the
            // filesystem; it reuses it. So once the queue has drained to
            // half of what it held when the reserve was reached, new
            // commands go into that space, and the filesystem's free space
            // need not come back.
            let live = self.live.len() as u64;
            let mark = *self.full_mark.get_or_insert(live);
            if live >= mark / 2 || mark == 0 {
                // Shedding would not help: ending a command writes a record.
                return Err(QueueError::NoSpace {
                    free,
                    reserve: self.limits.min_free_disk,
                });
            }
        } else {
            self.full_mark = None;
        }
        let queued = self.live.len() as u64;
        let full = queued >= self.limits.max_queued;
        let disk = self.limits.max_disk.filter(|&limit| self.disk >= limit);
        if !full && disk.is_none() {
            return Ok(());
        }
        let victim = self
            .live
            .iter()
            .filter(|(_, l)| {
                l.priority < priority
                    && !matches!(l.phase, Phase::InFlight { .. } | Phase::Handed { .. })
            })
            .min_by_key(|(_, l)| (l.priority, std::cmp::Reverse(l.order)))
            .map(|(id, _)| *id);
        match victim {
            Some(v) => {
                let msg = format!("shed for a {priority}-priority command (queue at its bound)");
                self.finish(v, State::Shed, None, Some(msg), now);
                Ok(())
            }
            None if full => Err(QueueError::QueueFull {
                queued,
                limit: self.limits.max_queued,
            }),
            None => Err(QueueError::DiskFull {
                used: self.disk,
                limit: disk.unwrap_or(0),
            }),
        }
    }

    /// Tell the core how many bytes are free on the data dir's filesystem.
    pub fn set_disk_free(&mut self, bytes: u64) {
        self.free = Some(bytes);
    }

    /// Tell the core how many bytes the store occupies (after each write).
    pub fn set_disk_usage(&mut self, bytes: u64) {
        self.disk = bytes;
    }

    fn admit(&mut self, id: CommandId, live: Live, now: Millis) {
        let d = live.device;
        *self.pins.entry(live.group).or_insert(0) += 1;
        if let Some(exp) = live.expires_at {
            self.expiries.insert((exp, id));
        }
        self.devs[d as usize].live += 1;
        self.stats.queued += 1;
        self.live.insert(id, live);
        self.place(id, now);
    }

    /// Put a live, not-in-flight command where it belongs: ready, waiting
    /// for a time, or blocked on its dependency.
    fn place(&mut self, id: CommandId, now: Millis) {
        let after = self.live[&id].after.as_deref().copied();
        if let Some(dep) = after {
            let succeeded =
                !self.is_live(dep) && matches!(self.results.get(&dep), Some((_, State::Succeeded)));
            if !succeeded {
                // Blocked until the dependency ends; one that already ended
                // badly is settled by `dependency_done`.
                self.live.get_mut(&id).expect("live").phase = Phase::Blocked;
                let v = self.blocked.entry(dep).or_default();
                if !v.contains(&id) {
                    v.push(id);
                }
                return;
            }
        }
        let l = self.live.get_mut(&id).expect("placing a live command");
        l.after = None;
        match l.not_before {
            Some(t) if t > now => {
                l.phase = Phase::Waiting;
                self.wakeups.insert((t, id));
            }
            _ => {
                l.phase = Phase::Ready;
                let (d, rank, order) = (l.device, l.priority.rank(), l.order);
                self.devs[d as usize].ready[rank].insert(order, id);
            }
        }
    }

    /// Hand ready commands to a connected device while its window allows:
    /// its own first, then those of the pools it serves. For a pool, hand
    /// its commands to its members.
    fn pump(&mut self, d: u32, now: Millis) {
        if self.devs[d as usize].pool {
            self.pump_pool(d, now);
            return;
        }
        while self.devs[d as usize].has_room() {
            let Some(id) = self.devs[d as usize]
                .ready
                .iter_mut()
                .find_map(|q| q.pop_first().map(|(_, id)| id))
            else {
                break;
            };
            self.deliver(id, d, now);
        }
        if self.devs[d as usize].has_room() {
            for p in self.devs[d as usize].serves.clone() {
                self.pump_pool(p, now);
            }
        }
    }

    /// Hand a pool's ready commands, best first, each to the connected
    /// member with room and the fewest commands in flight (ties: the one
    /// handed the fewest so far, so equally idle devices share the work).
    fn pump_pool(&mut self, p: u32, now: Millis) {
        loop {
            let pool = &self.devs[p as usize];
            if pool.ready.iter().all(BTreeMap::is_empty) {
                return;
            }
            let best = pool
                .members
                .iter()
                .copied()
                .filter(|&m| {
                    let dev = &self.devs[m as usize];
                    dev.has_room() && dev.serves.contains(&p)
                })
                .min_by_key(|&m| {
                    let dev = &self.devs[m as usize];
                    (dev.in_flight.len(), dev.assigned, m)
                });
            let Some(m) = best else { return };
            let id = self.devs[p as usize]
                .ready
                .iter_mut()
                .find_map(|q| q.pop_first().map(|(_, id)| id))
                .expect("checked non-empty");
            let dev = &mut self.devs[m as usize];
            dev.borrowed += 1;
            dev.assigned += 1;
            self.deliver(id, m, now);
        }
    }

    /// Put a ready command in flight on connected device `on`.
    fn deliver(&mut self, id: CommandId, on: u32, now: Millis) {
        let dev = &mut self.devs[on as usize];
        let session = dev.session.expect("delivering to a connected device").0;
        let l = self.live.get_mut(&id).expect("ready commands are live");
        let attempt = l.attempts + 1;
        l.phase = Phase::InFlight { attempt, on };
        dev.in_flight.insert(id);
        self.stats.delivered_total += 1;
        self.effects.deliveries.push(DeliverEffect {
            device: dev.id.clone(),
            session,
            id,
            group: l.group,
            attempt,
            priority: l.priority,
            deadline: l.expires_at,
        });
        let ev = LifecycleEvent {
            id,
            device: dev.id.clone(),
            state: State::Delivered { attempt },
            at: now,
            attempts: l.attempts,
            outcome: None,
            error: None,
        };
        self.publish(ev);
    }

    /// Take a command off the device it is in flight on, if it is.
    /// Returns that device.
    fn release(&mut self, id: CommandId) -> Option<u32> {
        let l = self.live.get(&id)?;
        let Phase::InFlight { on, .. } = l.phase else {
            return None;
        };
        let dev = &mut self.devs[on as usize];
        if dev.in_flight.remove(&id) && on != l.device {
            dev.borrowed -= 1;
        }
        Some(on)
    }

    fn disconnect_dev(&mut self, d: u32, now: Millis) {
        let ids: Vec<CommandId> = self.devs[d as usize].in_flight.drain().collect();
        self.devs[d as usize].session = None;
        self.devs[d as usize].borrowed = 0;
        let mut pools = Vec::new();
        for id in ids {
            let l = &self.live[&id];
            let Phase::InFlight { attempt, .. } = l.phase else {
                continue;
            };
            if l.device == d {
                // Back in the queue with the same attempt number: a drop is
                // not an attempt that ended (DESIGN §5).
                self.place(id, now);
                continue;
            }
            // A pool command fails over to another capable device, and the
            // drop counts as an attempt: the device may have run it.
            let (pool, max) = (l.device, l.max_attempts);
            if attempt >= max {
                let msg = format!(
                    "device `{}` dropped it; gave up after {attempt} attempts",
                    self.devs[d as usize].id
                );
                self.finish(id, State::Dead, None, Some(msg), now);
            } else {
                self.requeue_at(id, attempt, None, now);
                pools.push(pool);
            }
        }
        pools.sort_unstable();
        pools.dedup();
        for p in pools {
            self.pump_pool(p, now);
        }
        self.touch(d, now);
    }

    fn touch(&mut self, d: u32, now: Millis) {
        if let Some(rec) = self.devs[d as usize].record.as_mut() {
            rec.last_seen = Some(now);
            self.effects.device_touches.push(rec.clone());
            let device = rec.id.clone();
            self.outbox.push(UpItem::Seen { device, at: now });
        }
    }

    /// An attempt failed with attempts left: back off, then try again.
    fn requeue(&mut self, id: CommandId, attempt: u32, now: Millis) {
        let jitter = self.random();
        let exp = attempt.saturating_sub(1).min(32);
        let full = self
            .limits
            .backoff_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.limits.backoff_cap_ms);
        // Jitter in [full/2, full]: spreads a fleet's retries, keeps the floor.
        let delay = full / 2 + if full > 1 { jitter % (full / 2 + 1) } else { 0 };
        self.requeue_at(id, attempt, Some(now.saturating_add(delay)), now);
    }

    /// Journal an ended attempt and put the command back in its queue.
    fn requeue_at(&mut self, id: CommandId, attempt: u32, not_before: Option<Millis>, now: Millis) {
        self.release(id);
        let l = self.live.get_mut(&id).expect("requeue of a live command");
        l.attempts = attempt;
        l.not_before = not_before;
        let old = l.requeue_group.replace(self.open_seq);
        self.journal.push(Entry::Requeued {
            id,
            gen: l.gen,
            attempts: attempt,
            not_before,
        });
        *self.pins.entry(self.open_seq).or_insert(0) += 1;
        self.requeue_holders
            .entry(self.open_seq)
            .or_default()
            .push(id);
        if let Some(g) = old {
            self.unpin(g);
        }
        self.event(id, State::Queued, now, None, None);
        self.place(id, now);
    }

    fn unpin(&mut self, seq: u64) {
        if let Some(n) = self.pins.get_mut(&seq) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.unpinned.push(seq);
            }
        }
    }

    /// End a live command: record its result, release its pins and its
    /// dependents, and cancel it on its device if it is there.
    fn finish(
        &mut self,
        id: CommandId,
        state: State,
        outcome: Option<Outcome>,
        error: Option<String>,
        now: Millis,
    ) {
        let on = self.release(id);
        let Some(l) = self.live.remove(&id) else {
            return;
        };
        let dev = &mut self.devs[l.device as usize];
        dev.live -= 1;
        dev.ready[l.priority.rank()].remove(&l.order);
        if let Phase::Handed { .. } = l.phase {
            dev.handed -= 1;
        }
        self.remote.remove(&id);
        if self.cancelling.remove(&id) {
            self.cancel_marks.push((id, false));
        }
        // The device it ran on (for a pool command, the one chosen for it).
        let ran_on = on.unwrap_or(l.device);
        let device = self.devs[ran_on as usize].id.clone();
        if on.is_some() && state != State::Succeeded && outcome.is_none() {
            self.effects.cancels.push((device.clone(), id));
        }
        if let Some(t) = l.not_before {
            self.wakeups.remove(&(t, id));
        }
        if let Some(e) = l.expires_at {
            self.expiries.remove(&(e, id));
        }
        if let Some(dep) = l.after.as_deref().copied() {
            if let Some(v) = self.blocked.get_mut(&dep) {
                v.retain(|x| *x != id);
            }
        }
        self.unpin(l.group);
        if let Some(g) = l.requeue_group {
            self.unpin(g);
        }
        let attempts = match l.phase {
            Phase::InFlight { attempt, .. } | Phase::Handed { attempt } if outcome.is_some() => {
                attempt
            }
            _ => l.attempts,
        };
        let keep_command = matches!(state, State::Dead | State::Failed);
        let record = ResultRecord {
            id,
            gen: l.gen,
            target: l
                .target
                .as_deref()
                .map(str::to_string)
                .unwrap_or_else(|| self.devs[l.device as usize].id.clone()),
            device,
            priority: l.priority,
            state,
            outcome,
            error,
            attempts,
            max_attempts: l.max_attempts,
            created_at: l.created_at,
            finished_at: now,
            origin: self
                .origins
                .get(l.origin as usize)
                .cloned()
                .unwrap_or_else(|| ORIGIN_UNKNOWN.into()),
            key: l.key.as_deref().map(str::to_string),
            // The shell fills the payload in from the journal before writing
            // (the core does not hold payloads).
            command: keep_command.then(|| Command {
                id,
                target: String::new(),
                priority: l.priority,
                payload: Vec::new(),
                created_at: l.created_at,
                expires_at: l.expires_at,
                max_attempts: l.max_attempts,
                key: None,
                after: None,
                not_before: None,
                origin: String::new(),
                signature: None,
            }),
            children: Vec::new(),
        };
        if keep_command {
            self.payload_from.push((self.finished.len(), l.group));
        }
        self.record_result(record, now);
        if self.blocked.contains_key(&id) {
            self.dependency_done(id, state == State::Succeeded, now);
        }
        if let Some(pid) = l.parent.as_deref().copied() {
            self.child_done(pid, id, state, now);
        }
        self.pump(l.device, now);
        if ran_on != l.device {
            self.pump(ran_on, now);
        }
    }

    /// A broadcast's child ended; the broadcast ends with its last child.
    fn child_done(&mut self, pid: CommandId, cid: CommandId, state: State, now: Millis) {
        let Some(p) = self.parents.get_mut(&pid) else {
            return;
        };
        if let Some(i) = p.children.iter().position(|c| c.0 == cid) {
            if p.ends[i].is_none() {
                p.ends[i] = Some(state);
                p.open = p.open.saturating_sub(1);
            }
        }
        self.settle_parent(pid, now);
    }

    /// Record a broadcast's result once none of its children is open.
    fn settle_parent(&mut self, pid: CommandId, now: Millis) {
        if self.parents.get(&pid).is_none_or(|p| p.open > 0) {
            return;
        }
        let p = self.parents.remove(&pid).expect("checked");
        let children: Vec<ChildEnd> = self
            .children_of(&p)
            .into_iter()
            .map(|c| ChildEnd {
                id: c.id,
                device: c.device,
                state: c.state,
            })
            .collect();
        let state = if p.cancelled {
            State::Cancelled
        } else if children.iter().all(|c| c.state == State::Succeeded) {
            State::Succeeded
        } else if let Some(first) = children.first().map(|c| c.state) {
            if children.iter().all(|c| c.state == first) {
                first
            } else {
                State::Failed
            }
        } else {
            State::Succeeded
        };
        let summary = summarize(children.iter().map(|c| c.state));
        let c = p.command;
        let rec = ResultRecord {
            id: pid,
            gen: 0,
            device: c.target.clone(),
            target: c.target,
            priority: c.priority,
            state,
            outcome: None,
            error: (state != State::Succeeded).then_some(summary),
            attempts: 0,
            max_attempts: c.max_attempts,
            created_at: c.created_at,
            finished_at: now,
            origin: c.origin,
            key: c.key,
            command: None,
            children,
        };
        self.record_result(rec, now);
        if self.blocked.contains_key(&pid) {
            self.dependency_done(pid, state == State::Succeeded, now);
        }
    }

    fn record_result(&mut self, rec: ResultRecord, now: Millis) {
        self.index_result(self.open_seq, rec.id, rec.state, now);
        if self.outbox.is_on() {
            // The payload kept for `retry` stays here; the hub has its own.
            self.outbox.push(UpItem::Result(ResultRecord {
                command: None,
                ..rec.clone()
            }));
        }
        self.effects.events.push(LifecycleEvent {
            id: rec.id,
            device: rec.device.clone(),
            state: rec.state,
            at: now,
            attempts: rec.attempts,
            outcome: rec.outcome.clone(),
            error: rec.error.clone(),
        });
        self.finished.push(rec);
    }

    fn index_result(&mut self, seq: u64, id: CommandId, state: State, at: Millis) {
        if let Some((old, s)) = self.results.insert(id, (seq, state)) {
            if s == State::Dead {
                self.results_dead -= 1;
            }
            let _ = old;
        }
        if state == State::Dead {
            self.results_dead += 1;
        }
        let g = self.result_groups.entry(seq).or_insert((at, Vec::new()));
        g.0 = g.0.max(at);
        g.1.push(id);
    }

    fn dependency_done(&mut self, dep: CommandId, ok: bool, now: Millis) {
        let Some(dependents) = self.blocked.remove(&dep) else {
            return;
        };
        for id in dependents {
            let Some(l) = self.live.get_mut(&id) else {
                continue;
            };
            if ok {
                l.after = None;
                self.place(id, now);
                let d = self.live[&id].device;
                self.pump(d, now);
            } else {
                let msg = format!("DependencyFailed: command {dep} did not succeed");
                self.finish(id, State::Dead, None, Some(msg), now);
            }
        }
    }

    fn retain_results(&mut self, now: Millis) {
        // Never drop a result that a journal group still on disk could
        // contradict (see the module doc).
        // Nor one the upstream has not stored yet: an edge must still know
        // a command it ran when its hub forwards that command again.
        let oldest_journal = self
            .pins
            .keys()
            .next()
            .copied()
            .unwrap_or(self.open_seq)
            .min(self.outbox.oldest_group().unwrap_or(u64::MAX));
        while self.results.len() > self.limits.results_max
            || self
                .result_groups
                .first_key_value()
                .is_some_and(|(_, (at, _))| {
                    now.saturating_sub(*at) > self.limits.results_max_age_ms
                })
        {
            let Some((&seq, _)) = self.result_groups.first_key_value() else {
                break;
            };
            if seq >= oldest_journal {
                break;
            }
            let (_, (_, ids)) = self.result_groups.pop_first().expect("first exists");
            for id in ids {
                if self.results.get(&id).is_some_and(|&(s, _)| s == seq) {
                    if let Some((_, State::Dead)) = self.results.remove(&id) {
                        self.results_dead -= 1;
                    }
                }
            }
            self.drop_results.push(seq);
        }
    }

    fn state_of(&self, id: CommandId) -> Option<State> {
        if let Some(l) = self.live.get(&id) {
            return Some(match l.phase {
                Phase::InFlight { attempt, .. } | Phase::Handed { attempt } => {
                    State::Delivered { attempt }
                }
                _ => State::Queued,
            });
        }
        if self.parents.contains_key(&id) {
            return Some(State::Queued);
        }
        self.results.get(&id).map(|&(_, s)| s)
    }

    fn not_live(&self, id: CommandId, action: &str) -> QueueError {
        match self.state_of(id) {
            Some(state) => QueueError::InvalidTransition {
                id,
                state,
                action: action.to_string(),
            },
            None => QueueError::NotFound(id),
        }
    }

    fn event(
        &mut self,
        id: CommandId,
        state: State,
        now: Millis,
        outcome: Option<Outcome>,
        error: Option<String>,
    ) {
        let (device, attempts) = match self.live.get(&id) {
            Some(l) => (self.devs[l.device as usize].id.clone(), l.attempts),
            None => (String::new(), 0),
        };
        self.publish(LifecycleEvent {
            id,
            device,
            state,
            at: now,
            attempts,
            outcome,
            error,
        });
    }

    /// A lifecycle change on the way (ends go through `record_result`):
    /// to watchers, and upstream as telemetry.
    fn publish(&mut self, ev: LifecycleEvent) {
        if self.outbox.is_on() {
            self.outbox.push(UpItem::State {
                id: ev.id,
                device: ev.device.clone(),
                state: ev.state,
                at: ev.at,
                attempts: ev.attempts,
            });
        }
        self.effects.events.push(ev);
    }

    fn view(&self, id: CommandId, l: &Live) -> CommandView {
        let (state, attempts, on) = match l.phase {
            Phase::InFlight { attempt, on } => (State::Delivered { attempt }, attempt, on),
            Phase::Handed { attempt } => (State::Delivered { attempt }, attempt, l.device),
            _ => (State::Queued, l.attempts, l.device),
        };
        let mut device = self.devs[on as usize].id.clone();
        // A command sent down: what the edge last said of it.
        let (state, attempts) = match self.remote_of(id) {
            Some(r) => {
                device = r.device.clone();
                (r.state, r.attempts)
            }
            None => (state, attempts),
        };
        CommandView {
            id,
            target: l
                .target
                .as_deref()
                .map(str::to_string)
                .unwrap_or_else(|| self.devs[l.device as usize].id.clone()),
            device,
            state,
            priority: l.priority,
            attempts,
            max_attempts: l.max_attempts,
            created_at: l.created_at,
            finished_at: None,
            expires_at: l.expires_at,
            not_before: l.not_before,
            after: l.after.as_deref().copied(),
            origin: self
                .origins
                .get(l.origin as usize)
                .cloned()
                .unwrap_or_default(),
            key: l.key.as_deref().map(str::to_string),
            outcome: None,
            error: match l.phase {
                Phase::Blocked => l
                    .after
                    .as_deref()
                    .map(|a| format!("waiting for command {a} to succeed")),
                _ => None,
            },
            children: Vec::new(),
            summary: None,
        }
    }

    /// A broadcast's children: each one's end, or its state while open.
    fn children_of(&self, p: &Parent) -> Vec<ChildView> {
        p.children
            .iter()
            .zip(&p.ends)
            .map(|(&(id, d), end)| ChildView {
                id,
                device: self.devs[d as usize].id.clone(),
                state: end
                    .or_else(|| self.state_of(id))
                    .unwrap_or(State::Cancelled),
            })
            .collect()
    }

    /// A live broadcast as `show` gives it: its children and the aggregate.
    fn parent_view(&self, pid: CommandId, p: &Parent) -> CommandView {
        let children = self.children_of(p);
        let c = &p.command;
        CommandView {
            id: pid,
            target: c.target.clone(),
            device: c.target.clone(),
            state: State::Queued,
            priority: c.priority,
            attempts: 0,
            max_attempts: c.max_attempts,
            created_at: c.created_at,
            finished_at: None,
            expires_at: c.expires_at,
            not_before: c.not_before,
            after: c.after,
            origin: c.origin.clone(),
            key: c.key.clone(),
            outcome: None,
            error: None,
            summary: Some(summarize(children.iter().map(|c| c.state))),
            children,
        }
    }
}

/// A broadcast's aggregate: `12/14 succeeded, 1 failed, 1 queued`.
pub fn summarize(states: impl Iterator<Item = State>) -> String {
    // Succeeded, then the other ends, then what is still open.
    let mut counts = [0usize; 9];
    const NAMES: [&str; 9] = [
        "succeeded",
        "failed",
        "dead",
        "expired",
        "cancelled",
        "shed",
        "in flight",
        "queued",
        "",
    ];
    for st in states {
        let i = match st {
            State::Succeeded => 0,
            State::Failed => 1,
            State::Dead => 2,
            State::Expired => 3,
            State::Cancelled => 4,
            State::Shed => 5,
            State::Delivered { .. } => 6,
            State::Queued => 7,
        };
        counts[i] += 1;
    }
    let total: usize = counts.iter().sum();
    let mut out = format!("{}/{total} succeeded", counts[0]);
    for (n, name) in counts.iter().zip(NAMES).skip(1) {
        if *n > 0 {
            out.push_str(&format!(", {n} {name}"));
        }
    }
    out
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;

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
//!
//! This file holds the state (`QueueCore` and the per-command and
//! per-device records), cancel and retry, time and room; the rest is in
//! `core/`, a file per part of the lifecycle: `request` (what the writer
//! asks), `intake` (sends), `routing`, `delivery`, `devices` (sessions and
//! acks), `ends`, `gateway` (the hub side of sync), `keys`, `live`,
//! `replay`, `round`, `views`, `invariants`.

mod delivery;
mod devices;
mod ends;
mod gateway;
mod intake;
mod invariants;
mod keys;
mod live;
mod replay;
mod request;
mod round;
mod routing;
mod views;

pub(crate) use delivery::forward_of;
use keys::KeyUse;
pub(crate) use replay::{replay_start, strip_payloads, ReplayOutbox};
pub use request::{CoreReply, CoreRequest, Relabel};
pub use round::{JournalSource, Round, Sealed};
pub use views::summarize;

use self::gateway::Remote;
use super::outbox::{Outbox, OutboxStats};
use super::{
    ChildView, CommandView, LifecycleEvent, QueueError, QueueStats, SendReceipt, SendRequest,
};
use crate::engine::command::{Command, CommandId, DeviceId, Millis, Outcome, Priority, State};
use crate::engine::journal::{
    Broadcast, Child, ChildEnd, Enqueued, Entry, ResultRecord, UpEntry, UpItem,
};
use crate::engine::journal::{Cursor, DeviceRecord, Group, GroupWrite};
use crate::engine::route::{check_name, Acl, Labels, Target};
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
    /// The delay after a first failed attempt, in ms; it doubles with each
    /// attempt after, up to `backoff_cap_ms`, and jitter takes it to between
    /// half and all of that.
    pub backoff_base_ms: u64,
    /// The longest delay between attempts, in ms (before jitter).
    pub backoff_cap_ms: u64,
    /// Attempts a command gets when its sender names none (at least 1);
    /// after the last one fails it is dead.
    pub default_max_attempts: u32,
    /// Time to live, in ms from the send, of a command whose sender names
    /// none (`None`: it never expires).
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
    /// How long a result is kept, in ms from its end (a result group goes
    /// whole, aged by its newest end, and never while a journal group as old
    /// is on disk).
    pub results_max_age_ms: u64,
    /// A journal group this many groups behind the head, with at most
    /// `relocate_max_pins` live commands left, is re-journalled (with k
    /// times as many, k times as far behind; see `relocation_candidate`).
    pub relocate_lag: u64,
    /// The live commands a group `relocate_lag` behind may still hold and
    /// be relocated (at least 1).
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

/// A device as `outpost devices` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceView {
    /// Its enrolment record (tags, caps, last seen, revoked), or for a
    /// device of a box below the record that box last sent up.
    pub record: DeviceRecord,
    /// It holds a session now; a device of a box below: that box said so
    /// last and its gateway is connected.
    pub online: bool,
    /// Its commands not yet delivered (ready, waiting or blocked); 0 for a
    /// device of a box below, whose queue is that box's.
    pub queued: u64,
    /// Commands delivered to it and not yet acked (`cap:` ones it serves
    /// included); a gateway's also counts those handed to the box below.
    pub in_flight: u64,
    /// For a gateway (a box below): how far its outbox is applied.
    pub sync: Option<EdgeSync>,
    /// Its bundle is in use on more than one live device (the device link
    /// knows; the queue leaves it `None` and the admin layer fills it in).
    pub shared_bundle: Option<crate::engine::contest::SharedBundle>,
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
    /// Live (or an open broadcast): its view, built from memory.
    Live(Box<CommandView>),
    /// Ended; the full record is on disk.
    Finished {
        /// The result group holding its `ResultRecord`.
        seq: u64,
        /// The state it ended in.
        state: State,
    },
    /// Never queued here, or its result is gone with retention.
    NotFound,
}

/// What a round asks the shell to do once its group is durable.
#[derive(Debug, Default)]
pub struct Effects {
    /// Commands to hand to connected devices, in the order decided.
    pub deliveries: Vec<DeliverEffect>,
    /// Tell a device to stop a command it holds (cancel, expiry).
    pub cancels: Vec<(DeviceId, CommandId)>,
    /// End a device's session (revoked).
    pub close_sessions: Vec<DeviceId>,
    /// Lifecycle changes, published to the queue's subscribers (`watch`,
    /// `--wait`, the runners, the monitor) once the round is durable.
    pub events: Vec<LifecycleEvent>,
    /// Device records to write with this group.
    pub device_writes: Vec<DeviceRecord>,
    /// Device records whose last-seen changed (written, not flushed alone).
    pub device_touches: Vec<DeviceRecord>,
    /// Audit entries of the boxes below, for this box's log with the round.
    pub audit: Vec<crate::engine::audit::chain::Note>,
}

/// One command to hand to a connected device. The payload is in journal
/// group `group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliverEffect {
    /// The device to hand it to (for a `cap:` command, the member chosen).
    pub device: DeviceId,
    /// The session it was decided for (the token `connect` returned): the
    /// shell drops a delivery whose session has since been replaced.
    pub session: u64,
    /// The command, looked up by id in its group.
    pub id: CommandId,
    /// The journal group its payload was in when decided (the shell asks
    /// `payload_group` if it has moved since).
    pub group: u64,
    /// Which attempt this delivery is, from 1.
    pub attempt: u32,
    /// Its priority, sent with it (a forward to a box below keeps it).
    pub priority: Priority,
    /// When it expires, ms since the Unix epoch (`None`: no ttl); a forward
    /// to a box below carries what is left as its ttl.
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
    phase: Phase,
    origin: u32,
    /// What few commands have, in one box: every queued command pays for
    /// the handle in RAM and in replay time (issue 29).
    rare: Option<Box<Rare>>,
}

/// The parts of a live command's handle that most commands lack.
#[derive(Clone, Debug, Default)]
struct Rare {
    /// A dependency still undecided.
    after: Option<CommandId>,
    /// Only when it differs from the device id.
    target: Option<Box<str>>,
    key: Option<Box<str>>,
    /// The broadcast this command is a child of.
    parent: Option<CommandId>,
}

impl Rare {
    /// Boxed, or nothing when there is nothing to hold.
    fn boxed(
        after: Option<CommandId>,
        target: Option<Box<str>>,
        key: Option<Box<str>>,
        parent: Option<CommandId>,
    ) -> Option<Box<Rare>> {
        let r = Rare {
            after,
            target,
            key,
            parent,
        };
        (!r.is_empty()).then(|| Box::new(r))
    }

    fn is_empty(&self) -> bool {
        self.after.is_none() && self.target.is_none() && self.key.is_none() && self.parent.is_none()
    }
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
            phase: Phase::Ready,
            origin,
            rare: Rare::boxed(p.after, Some(p.target.as_str().into()), None, Some(p.id)),
        }
    }

    fn after(&self) -> Option<CommandId> {
        self.rare.as_ref().and_then(|r| r.after)
    }

    /// Its dependency is decided: forget it (and the box, if that was all).
    fn clear_after(&mut self) {
        if let Some(r) = self.rare.as_mut() {
            r.after = None;
            if r.is_empty() {
                self.rare = None;
            }
        }
    }

    fn target(&self) -> Option<&str> {
        self.rare.as_ref().and_then(|r| r.target.as_deref())
    }

    fn key(&self) -> Option<&str> {
        self.rare.as_ref().and_then(|r| r.key.as_deref())
    }

    fn parent(&self) -> Option<CommandId> {
        self.rare.as_ref().and_then(|r| r.parent)
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

/// The queue state machine.
pub struct QueueCore {
    limits: Limits,
    rng: u64,
    live: live::LiveTable,
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
    /// Groups found unpinned at the last seal, dropped at the next one: a
    /// group is removed only in a round after the one that made it
    /// unneeded (a relocation's copy, a result's payload) is durable, so a
    /// batch the store tears on a failed write can never drop a group
    /// whose replacement it lost (seen on a full disk: an acknowledged
    /// command relocated and gone).
    unpinned_before: Vec<u64>,
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
    /// Whether each device below is connected to its box, as that box last
    /// said (`UpItem::Presence`). In memory: after a restart they show
    /// offline until their box reports them again.
    remote_online: FxHashMap<DeviceId, bool>,
    /// Per edge: the highest outbox seq applied, in the epoch it counts in.
    cursors: HashMap<DeviceId, Cursor>,
    /// When each edge's outbox records last came, for `status`.
    last_up: HashMap<DeviceId, Millis>,
    cursor_writes: Vec<(DeviceId, Cursor)>,
    /// Commands held by an edge whose cancel it has not confirmed.
    cancelling: FxHashSet<CommandId>,
    cancel_marks: Vec<(CommandId, bool)>,
    /// Commands for a gateway that its box may hold though they wait here:
    /// forwarded since this start (a link lost before the edge's
    /// `Accepted` puts one back in the queue the edge has stored), or
    /// queued before it (unknown). A cancel of one is the edge's to decide.
    maybe_held: FxHashSet<CommandId>,
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
            live: live::LiveTable::default(),
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
            unpinned_before: Vec::new(),
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
            remote_online: FxHashMap::default(),
            cursors: HashMap::new(),
            last_up: HashMap::new(),
            cursor_writes: Vec::new(),
            cancelling: FxHashSet::default(),
            cancel_marks: Vec::new(),
            maybe_held: FxHashSet::default(),
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

    /// The upstream has stored every outbox entry up to `seq`.
    pub fn up_ack(&mut self, seq: u64) {
        self.outbox.ack(seq);
    }

    /// A new uplink session: the presence of every device seen so far,
    /// so the hub forgets no departure this box could not report (it
    /// crashed while a device left) and relearns what a restart of its
    /// own lost.
    pub fn presence_snapshot(&mut self) {
        for d in 0..self.devs.len() {
            let dev = &self.devs[d];
            let Some(rec) = dev.record.as_ref() else {
                continue;
            };
            let Some(at) = rec.last_seen else { continue };
            let item = UpItem::Presence {
                device: rec.id.clone(),
                online: dev.session.is_some(),
                at,
            };
            self.outbox.push(item);
        }
    }

    /// The outbox groups holding entries after `seq`, oldest first.
    pub fn outbox_groups_after(&self, seq: u64) -> Vec<u64> {
        self.outbox.groups_after(seq)
    }

    /// The outbox's depth, seqs and compaction counters (for `status`, the
    /// alerts, and the seq an uplink starts after).
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

    /// The bounds this core was made with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    // ----- replay -------------------------------------------------------

    // ----- requests -----------------------------------------------------

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

    /// The hub above cancels `id` (edge side). A command here is cancelled
    /// as by an operator. One this box has never had — its forward was
    /// lost with a link before the hub heard `Accepted`, or is still on
    /// its way — gets a `cancelled` end, which goes up to end it on the
    /// hub, and which makes a late forward of it a duplicate that does not
    /// run. One that ended here already is left be (its end went up).
    pub fn cancel_from_hub(
        &mut self,
        id: CommandId,
        now: Millis,
    ) -> Result<CommandView, QueueError> {
        if self.state_of(id).is_some() {
            return self.cancel(id, now);
        }
        let rec = ResultRecord::cancelled_unseen(id, now);
        let view = CommandView::from(rec.clone());
        self.record_result(rec, now);
        Ok(view)
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
            phase: Phase::Ready,
            origin: o,
            rare: Rare::boxed(
                None,
                (command.target != self.devs[device as usize].id)
                    .then(|| command.target.as_str().into()),
                command.key.as_deref().map(Into::into),
                None,
            ),
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
            .map(|(id, _)| id);
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
}

#[cfg(test)]
mod tests;

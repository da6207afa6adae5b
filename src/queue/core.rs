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

use super::{CommandView, LifecycleEvent, QueueError, QueueStats, SendReceipt, SendRequest};
use crate::command::{Command, CommandId, DeviceId, Millis, Outcome, Priority, State};
use crate::journal::{Enqueued, Entry, ResultRecord};
use crate::store::{DeviceRecord, Group, GroupWrite};
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
            key_window_ms: 24 * 3600 * 1000,
            results_max: 100_000,
            results_max_age_ms: 7 * 24 * 3600 * 1000,
            relocate_lag: 64,
            relocate_max_pins: 16,
            max_payload: 1024 * 1024 - 1024,
        }
    }
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
    Revoke(DeviceId),
    Devices,
}

/// The core's answer to a `CoreRequest`.
#[derive(Clone, Debug)]
pub enum CoreReply {
    Receipt(SendReceipt),
    View(CommandView),
    Views(Vec<CommandView>),
    Stats(QueueStats),
    Device(DeviceRecord),
    Devices(Vec<DeviceView>),
    Done,
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
}

/// A device as `outpost devices` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceView {
    pub record: DeviceRecord,
    pub online: bool,
    pub queued: u64,
    pub in_flight: u64,
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
    InFlight {
        attempt: u32,
    },
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
    after: Option<CommandId>,
    phase: Phase,
    /// Only when it differs from the device id.
    target: Option<Box<str>>,
    origin: u32,
    key: Option<Box<str>>,
}

#[derive(Debug)]
struct Dev {
    id: DeviceId,
    record: Option<DeviceRecord>,
    ready: [BTreeMap<u64, CommandId>; 3],
    in_flight: FxHashSet<CommandId>,
    live: u64,
    session: Option<(u64, u32)>,
}

impl Dev {
    fn new(id: DeviceId) -> Self {
        Dev {
            id,
            record: None,
            ready: Default::default(),
            in_flight: FxHashSet::default(),
            live: 0,
            session: None,
        }
    }
}

/// The queue state machine.
pub struct QueueCore {
    limits: Limits,
    rng: u64,
    live: FxHashMap<CommandId, Live>,
    devs: Vec<Dev>,
    dev_index: HashMap<DeviceId, u32>,
    origins: Vec<String>,
    origin_index: HashMap<String, u32>,
    /// (due, id): not_before and backoff wake-ups.
    wakeups: BTreeSet<(Millis, CommandId)>,
    expiries: BTreeSet<(Millis, CommandId)>,
    /// dependency → its dependents.
    blocked: FxHashMap<CommandId, Vec<CommandId>>,
    keys: HashMap<(u32, Box<str>), (CommandId, Millis)>,
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
    stats: QueueStats,
}

/// A sealed round: the group to write, and the retryable results whose
/// payload the shell copies in from the journal before writing.
#[derive(Debug, Default)]
pub struct Sealed {
    pub write: GroupWrite,
    pub payload_from: Vec<(usize, u64)>,
}

const ORIGIN_UNKNOWN: &str = "?";

impl QueueCore {
    /// An empty queue.
    pub fn new(limits: Limits, seed: u64) -> Self {
        QueueCore {
            limits,
            rng: seed | 1,
            live: FxHashMap::default(),
            devs: Vec::new(),
            dev_index: HashMap::new(),
            origins: Vec::new(),
            origin_index: HashMap::new(),
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
            stats: QueueStats::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    // ----- replay -------------------------------------------------------

    /// Rebuild from the store: devices first, then every group in order,
    /// then `finish_replay`. Replay emits nothing to journal.
    pub fn replay_device(&mut self, rec: DeviceRecord) {
        let d = self.dev(&rec.id);
        self.devs[d as usize].record = Some(rec);
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
                    if let Some((origin, key)) = r.key.as_ref().map(|k| (r.origin.as_str(), k)) {
                        let o = self.origin(origin);
                        self.remember_key(o, key, r.id, r.created_at);
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
            self.remember_key(origin, k, id, e.command.created_at);
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
            after: e.command.after,
            phase: Phase::Ready,
            target: (e.command.target != e.device).then(|| e.command.target.into()),
            origin,
            key: e.command.key.map(Into::into),
        };
        self.live.insert(id, live);
    }

    /// Never reuse a group seq the store has committed, even one whose
    /// records were all dropped since.
    pub fn replay_last_seq(&mut self, seq: u64) {
        self.open_seq = self.open_seq.max(seq + 1);
    }

    /// After the last group: place every live command, pin its groups, and
    /// settle what the log left half-done.
    pub fn finish_replay(&mut self, now: Millis) {
        let mut ids: Vec<(u64, CommandId)> =
            self.live.iter().map(|(id, l)| (l.order, *id)).collect();
        ids.sort_unstable();
        for &(_, id) in &ids {
            let l = &self.live[&id];
            let (d, g, rg) = (l.device, l.group, l.requeue_group);
            *self.pins.entry(g).or_insert(0) += 1;
            if let Some(rg) = rg {
                *self.pins.entry(rg).or_insert(0) += 1;
                self.requeue_holders.entry(rg).or_default().push(id);
            }
            self.devs[d as usize].live += 1;
            if let Some(exp) = l.expires_at {
                self.expiries.insert((exp, id));
            }
        }
        for &(_, id) in &ids {
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
            .filter(|dep| !self.live.contains_key(*dep))
            .copied()
            .collect();
        for dep in dangling {
            let ok = matches!(self.results.get(&dep), Some((_, State::Succeeded)));
            self.dependency_done(dep, ok, now);
        }
        self.effects = Effects::default();
        self.tick(now);
    }

    // ----- requests -----------------------------------------------------

    /// Enqueue a command. Durable once the round is sealed and written.
    pub fn send(&mut self, req: SendRequest, now: Millis) -> Result<SendReceipt, QueueError> {
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
        let device = self.route(&target)?;
        let o = self.origin(&origin);
        if let Some(k) = &opts.key {
            self.expire_keys(now);
            if let Some(&(id, _)) = self.keys.get(&(o, k.as_str().into())) {
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
            if self.live.contains_key(&dep) {
                // stays blocked
            } else {
                match self.results.get(&dep) {
                    Some((_, State::Succeeded)) => after = None,
                    Some((_, s)) => dep_failed = Some(*s),
                    None => return Err(QueueError::UnknownDependency(dep)),
                }
            }
        }
        self.make_room(opts.priority, now)?;

        // Ids are random within a millisecond; a collision (a restarted
        // simulation with the same seed, or plain bad luck) must not merge
        // two commands.
        let mut id = CommandId::new(now, self.random128());
        while self.live.contains_key(&id) || self.results.contains_key(&id) {
            id = CommandId::new(now, self.random128());
        }
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
            self.remember_key(o, k, id, now);
        }
        if let Some(s) = dep_failed {
            let device_id = self.devs[device as usize].id.clone();
            let rec = ResultRecord {
                id,
                gen: 0,
                device: device_id,
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
            };
            self.record_result(rec, now);
            self.stats.enqueued_total += 1;
            return Ok(SendReceipt {
                id,
                state: State::Dead,
                duplicate: false,
            });
        }
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
            after,
            phase: Phase::Ready,
            target: (target != self.devs[device as usize].id).then(|| target.into()),
            origin: o,
            key: command.key.as_deref().map(Into::into),
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
        self.stats.enqueued_total += 1;
        self.event(id, State::Queued, now, None, None);
        let state = self.state_of(id).unwrap_or(State::Queued);
        self.pump(device, now);
        Ok(SendReceipt {
            id,
            state,
            duplicate: false,
        })
    }

    /// Where a command is, for `show`.
    pub fn lookup(&self, id: CommandId) -> Lookup {
        if let Some(l) = self.live.get(&id) {
            return Lookup::Live(Box::new(self.view(id, l)));
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
        let mut in_flight: Vec<_> = dev
            .in_flight
            .iter()
            .map(|id| (self.live[id].priority.rank(), self.live[id].order, *id))
            .collect();
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
        let Some(mut command) = record.command else {
            return Err(QueueError::InvalidTransition {
                id,
                state: record.state,
                action: "retry (its payload was not kept)".into(),
            });
        };
        let device = self.route(&record.device)?;
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

    /// Add or update an enrolled device.
    pub fn enroll(&mut self, mut rec: DeviceRecord, now: Millis) {
        let d = self.dev(&rec.id);
        rec.revoked = false;
        if rec.enrolled_at == 0 {
            rec.enrolled_at = now;
        }
        self.devs[d as usize].record = Some(rec.clone());
        self.effects.device_writes.push(rec);
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
                Some(DeviceView {
                    record,
                    online: d.session.is_some(),
                    queued: d.live - d.in_flight.len() as u64,
                    in_flight: d.in_flight.len() as u64,
                })
            })
            .collect();
        v.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        v
    }

    pub fn stats(&self) -> QueueStats {
        let in_flight: u64 = self.devs.iter().map(|d| d.in_flight.len() as u64).sum();
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
        self.touch(d, now);
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
        let Phase::InFlight { attempt } = l.phase else {
            return Err(not_in_flight());
        };
        if l.device != d {
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
            let Entry::Enqueued(mut e) = e else { continue };
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

    /// Close the round: the records to write as one group. After writing it
    /// durably, the shell takes `take_effects`.
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
        let w = GroupWrite {
            seq,
            journal: std::mem::take(&mut self.journal),
            results: std::mem::take(&mut self.finished),
            drop_journal,
            drop_results: std::mem::take(&mut self.drop_results),
        };
        if !w.journal.is_empty() || !w.results.is_empty() {
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
        std::mem::take(&mut self.effects)
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

    /// Resolve a target to the device that will run it.
    fn route(&mut self, target: &str) -> Result<u32, QueueError> {
        if target.is_empty()
            || target.len() > 255
            || target.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(QueueError::BadRequest(format!(
                "`{target}` is not a valid target: use a device id such as dev-7"
            )));
        }
        if target.contains(':') || target.contains('/') {
            return Err(QueueError::BadRequest(format!(
                "target `{target}`: tag:, cap: and edge/ routing are not available yet; name a device directly"
            )));
        }
        let d = self
            .dev_index
            .get(target)
            .copied()
            .filter(|&d| self.devs[d as usize].record.is_some())
            .ok_or_else(|| QueueError::UnknownDevice(target.to_string()))?;
        if self.devs[d as usize]
            .record
            .as_ref()
            .is_some_and(|r| r.revoked)
        {
            return Err(QueueError::Revoked(target.to_string()));
        }
        Ok(d)
    }

    fn remember_key(&mut self, origin: u32, key: &str, id: CommandId, at: Millis) {
        let k: Box<str> = key.into();
        if self.keys.insert((origin, k.clone()), (id, at)).is_none() {
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
                .is_some_and(|&(_, t)| now.saturating_sub(t) >= self.limits.key_window_ms)
            {
                self.keys.remove(&key);
            }
        }
    }

    /// Refuse or shed when the box is at a bound: a new command may push out
    /// the newest queued command of a strictly lower priority.
    fn make_room(&mut self, priority: Priority, now: Millis) -> Result<(), QueueError> {
        let queued = self.live.len() as u64;
        let full = queued >= self.limits.max_queued;
        let disk = self.limits.max_disk.filter(|&limit| self.disk >= limit);
        if !full && disk.is_none() {
            return Ok(());
        }
        let victim = self
            .live
            .iter()
            .filter(|(_, l)| l.priority < priority && !matches!(l.phase, Phase::InFlight { .. }))
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
        let after = self.live[&id].after;
        if let Some(dep) = after {
            let succeeded = !self.live.contains_key(&dep)
                && matches!(self.results.get(&dep), Some((_, State::Succeeded)));
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

    /// Hand ready commands to a connected device while its window allows.
    fn pump(&mut self, d: u32, now: Millis) {
        let dev = &mut self.devs[d as usize];
        let Some((session, window)) = dev.session else {
            return;
        };
        while (dev.in_flight.len() as u32) < window {
            let Some(id) = dev
                .ready
                .iter_mut()
                .find_map(|q| q.pop_first().map(|(_, id)| id))
            else {
                break;
            };
            let l = self.live.get_mut(&id).expect("ready commands are live");
            let attempt = l.attempts + 1;
            l.phase = Phase::InFlight { attempt };
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
            self.effects.events.push(ev);
        }
    }

    fn disconnect_dev(&mut self, d: u32, now: Millis) {
        let ids: Vec<CommandId> = self.devs[d as usize].in_flight.drain().collect();
        self.devs[d as usize].session = None;
        // Back in the queue with the same attempt number: a drop is not an
        // attempt that ended (DESIGN §5).
        for id in ids {
            self.place(id, now);
        }
        self.touch(d, now);
    }

    fn touch(&mut self, d: u32, now: Millis) {
        if let Some(rec) = self.devs[d as usize].record.as_mut() {
            rec.last_seen = Some(now);
            self.effects.device_touches.push(rec.clone());
        }
    }

    fn requeue(&mut self, id: CommandId, attempt: u32, now: Millis) {
        let jitter = self.random();
        let l = self.live.get_mut(&id).expect("requeue of a live command");
        let d = l.device;
        self.devs[d as usize].in_flight.remove(&id);
        let exp = attempt.saturating_sub(1).min(32);
        let full = self
            .limits
            .backoff_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.limits.backoff_cap_ms);
        // Jitter in [full/2, full]: spreads a fleet's retries, keeps the floor.
        let delay = full / 2 + if full > 1 { jitter % (full / 2 + 1) } else { 0 };
        l.attempts = attempt;
        l.not_before = Some(now.saturating_add(delay));
        let old = l.requeue_group.replace(self.open_seq);
        self.journal.push(Entry::Requeued {
            id,
            gen: l.gen,
            attempts: attempt,
            not_before: l.not_before,
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
        let Some(l) = self.live.remove(&id) else {
            return;
        };
        let dev = &mut self.devs[l.device as usize];
        dev.live -= 1;
        let was_in_flight = dev.in_flight.remove(&id);
        dev.ready[l.priority.rank()].remove(&l.order);
        if was_in_flight && state != State::Succeeded && outcome.is_none() {
            self.effects.cancels.push((dev.id.clone(), id));
        }
        let device = dev.id.clone();
        if let Some(t) = l.not_before {
            self.wakeups.remove(&(t, id));
        }
        if let Some(e) = l.expires_at {
            self.expiries.remove(&(e, id));
        }
        if let Some(dep) = l.after {
            if let Some(v) = self.blocked.get_mut(&dep) {
                v.retain(|x| *x != id);
            }
        }
        self.unpin(l.group);
        if let Some(g) = l.requeue_group {
            self.unpin(g);
        }
        let attempts = match l.phase {
            Phase::InFlight { attempt } if outcome.is_some() => attempt,
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
                .unwrap_or_else(|| device.clone()),
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
        };
        if keep_command {
            self.payload_from.push((self.finished.len(), l.group));
        }
        self.record_result(record, now);
        if self.blocked.contains_key(&id) {
            self.dependency_done(id, state == State::Succeeded, now);
        }
        self.pump(l.device, now);
    }

    fn record_result(&mut self, rec: ResultRecord, now: Millis) {
        self.index_result(self.open_seq, rec.id, rec.state, now);
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
        let oldest_journal = self.pins.keys().next().copied().unwrap_or(self.open_seq);
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
                Phase::InFlight { attempt } => State::Delivered { attempt },
                _ => State::Queued,
            });
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
        self.effects.events.push(LifecycleEvent {
            id,
            device,
            state,
            at: now,
            attempts,
            outcome,
            error,
        });
    }

    fn view(&self, id: CommandId, l: &Live) -> CommandView {
        let device = self.devs[l.device as usize].id.clone();
        let (state, attempts) = match l.phase {
            Phase::InFlight { attempt } => (State::Delivered { attempt }, attempt),
            _ => (State::Queued, l.attempts),
        };
        CommandView {
            id,
            target: l
                .target
                .as_deref()
                .map(str::to_string)
                .unwrap_or_else(|| device.clone()),
            device,
            state,
            priority: l.priority,
            attempts,
            max_attempts: l.max_attempts,
            created_at: l.created_at,
            finished_at: None,
            expires_at: l.expires_at,
            not_before: l.not_before,
            after: l.after,
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
                    .map(|a| format!("waiting for command {a} to succeed")),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;

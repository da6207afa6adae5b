//! Deterministic simulation (issue 10): a hub, its edges and their devices
//! in one seeded, single-threaded world, in the style of FoundationDB's
//! simulator and TigerBeetle's VOPR.
//!
//! Every box is the real sans-IO [`QueueCore`] driven in rounds the way
//! `shell::queue::service` drives it (tick, relocate, seal, write one batch, flush,
//! and only then act on the effects), over a [`SimDisk`] that keeps written
//! and flushed batches apart. Links are per-connection FIFO queues of
//! messages with seeded delays; a lost message kills its connection (QUIC
//! streams are ordered and reliable, so loss is seen as a dead link, and
//! duplicates and reordering come from resends across connections). One
//! `u64` seed drives the workload, the faults and the cores' own jitter, so
//! a seed replays bit for bit (`examples/simulate.rs --seed N --trace`).
//!
//! What it checks is listed on [`World::check_end`] and [`World::check`];
//! a violation is a string naming the step, the node and the command.

pub mod disk;
mod job;
mod record;
pub mod rng;
mod rollouts;
pub mod shrink;
mod workflows;

use crate::engine::command::{CommandId, Millis, Outcome, Priority, SendOptions, State};
use crate::engine::journal::DeviceRecord;
use crate::engine::journal::{Entry, UpEntry};
use crate::engine::queue::core::{forward_of, replay_start, strip_payloads, ReplayOutbox};
use crate::engine::queue::core::{DeliverEffect, Effects, Limits, Lookup, QueueCore, Relabel};
use crate::engine::queue::{LifecycleEvent, SendRequest};
use crate::engine::route::{Acl, AclRule, GATEWAY_TAG};
use crate::proto::Forward;
use disk::{Batch, SimDisk};
pub use rng::Rng;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeMap, BTreeSet};

/// A set with a uniform, seeded pick in O(1): the order is the insertion
/// order as changed by removals, so it is the same on every run.
#[derive(Debug, Default)]
struct PickSet {
    items: Vec<CommandId>,
    at: FxHashMap<CommandId, usize>,
}

impl PickSet {
    fn insert(&mut self, id: CommandId) {
        if let std::collections::hash_map::Entry::Vacant(v) = self.at.entry(id) {
            v.insert(self.items.len());
            self.items.push(id);
        }
    }
    fn remove(&mut self, id: CommandId) {
        let Some(i) = self.at.remove(&id) else { return };
        self.items.swap_remove(i);
        if let Some(moved) = self.items.get(i) {
            self.at.insert(*moved, i);
        }
    }
    fn pick(&self, rng: &mut Rng) -> Option<CommandId> {
        rng.pick(&self.items)
    }
}

/// The shape of the world.
#[derive(Clone, Debug)]
pub struct Config {
    pub edges: usize,
    pub devices_per_edge: usize,
    /// Devices connected to the hub itself.
    pub hub_devices: usize,
    /// Faults while the workload runs (crashes, partitions, disk errors,
    /// message loss, clock jumps). Off: a fault-free run, for comparison.
    pub faults: bool,
    /// Let an edge's operator retry commands the hub sent down (off by
    /// default, so the default seeds keep their runs; the hub learns the
    /// retry's end, see
    /// `tests/simulation.rs::an_edge_retry_of_a_hub_command_reaches_the_hub`).
    pub retry_forwarded: bool,
    /// Duplicate `Command` and `Ack` frames within a connection too (QUIC
    /// never does; `AckAttempt` makes a copied ack harmless, see
    /// `tests/simulation.rs::a_copied_ack_of_an_earlier_attempt_is_dropped_as_stale`).
    pub dup_device_frames: bool,
    /// Operators start, pause, resume and abort rollouts over a box's
    /// devices (`sim/rollouts.rs`).
    pub rollouts: bool,
    /// Operators run and cancel workflows (`sim/workflows.rs`).
    pub workflows: bool,
    /// Some workflow steps go to a tag (a broadcast, some with a
    /// `min_success` quorum). Off by default, so the default seeds keep
    /// their runs.
    pub workflow_groups: bool,
    /// Boxes below `edge-1`, each with `devices_per_edge` devices of its
    /// own: a hub above a hub (`edge-1/sub-1/dev-0` from the top). Off by
    /// default, so the default seeds keep their runs.
    pub sub_edges: usize,
    /// Keep a human-readable trace (the hash is kept either way).
    pub trace: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            edges: 3,
            devices_per_edge: 4,
            hub_devices: 2,
            faults: true,
            retry_forwarded: false,
            dup_device_frames: false,
            rollouts: true,
            workflows: true,
            workflow_groups: false,
            sub_edges: 0,
            trace: false,
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    /// FNV-1a over every event: equal for equal seeds, bit for bit.
    pub hash: u64,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    /// Replaying a tape: where in it each step began (the shrinker cuts
    /// whole steps).
    pub step_starts: Vec<usize>,
    pub counts: Counts,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub sends_acked: u64,
    pub sends_refused: u64,
    pub runs: u64,
    pub crashes: u64,
    pub disk_faults: u64,
    pub partitions: u64,
    pub link_drops: u64,
    pub clock_jumps: u64,
    pub cancels: u64,
    pub retries: u64,
    pub relabels: u64,
    pub device_sends: u64,
    pub revocations: u64,
    pub rebuilds: u64,
    pub wipes: u64,
    pub rollouts: u64,
    /// Rollouts that ended so, seen after settling or when a wipe took them.
    pub rollouts_completed: u64,
    pub rollouts_aborted: u64,
    /// Rollbacks sent by aborted rollouts.
    pub rollbacks: u64,
    pub workflows: u64,
    /// Runs that ended so, seen after settling or when a wipe took them
    /// (failed: any other end).
    pub workflows_succeeded: u64,
    pub workflows_failed: u64,
    /// Workflow steps on a tag sent (and taken) by their box.
    pub workflow_group_steps: u64,
    pub settle_steps: u64,
}

/// Wall clock of the world at its start (a plausible epoch, so a backward
/// clock jump never goes below zero).
const T0: Millis = 1_700_000_000_000;
/// Outbox records sent to the hub and not yet acknowledged, at most.
const MAX_UNACKED: u64 = 16;
/// Outbox records per `Up` message, about (whole groups).
const UP_BATCH: usize = 8;
const OUTBOX_MAX: u64 = 32;
/// Clock steps above this are seen as jumps, as `service::Clock` does.
const JUMP_MS: i64 = 2_000;
const MAX_VIOLATIONS: usize = 20;
/// Cancels and dependencies pick among a box's last this many sends.
const RECENT: usize = 64;

/// `dev-M`'s record: on `line-a` or `line-b`, every third with a camera.
fn device_record(name: &str, line_a: bool) -> DeviceRecord {
    let mut rec = DeviceRecord::new(name.to_string());
    rec.tags
        .push(if line_a { "line-a" } else { "line-b" }.into());
    let m = name
        .trim_start_matches("dev-")
        .parse::<usize>()
        .unwrap_or(1);
    if m % 3 == 0 {
        rec.caps.push("cam".into());
    }
    rec
}

/// A box's core as the world configures every one, new or restarted.
fn fresh_core(seed: u64) -> QueueCore {
    let mut core = QueueCore::new(limits(), seed);
    core.set_acl(acl());
    core
}

/// Devices on `line-a` may send to those on `line-b`.
fn acl() -> Acl {
    Acl::new(vec![AclRule {
        from: vec!["tag:line-a".into()],
        to: vec!["tag:line-b".into()],
    }])
    .expect("a valid rule")
}

fn limits() -> Limits {
    // Small numbers, so that backoff, dead letters, relocation and retention
    // all happen within a few thousand steps. Retention also keeps what a
    // box holds (and so the cost of a restart's replay) bounded over a run
    // of any length, as on a real box.
    Limits {
        window: 4,
        backoff_base_ms: 100,
        backoff_cap_ms: 4_000,
        default_max_attempts: 3,
        relocate_lag: 8,
        relocate_max_pins: 4,
        results_max: 256,
        results_max_age_ms: 20_000,
        ..Limits::default()
    }
}

#[derive(Clone, Debug)]
enum Msg {
    /// Box → device.
    Command {
        id: CommandId,
        attempt: u32,
    },
    /// Box → device, hub → edge.
    Cancel(CommandId),
    /// Device → box (naming the attempt it answers, as `AckAttempt`);
    /// edge → hub for a forward it refused (no attempt).
    Ack {
        id: CommandId,
        attempt: Option<u32>,
        outcome: Outcome,
    },
    Forward(Box<Forward>),
    UpAck(u64),
    Accepted(CommandId),
    Up(Vec<UpEntry>),
}

#[derive(Clone, Debug)]
struct Packet {
    link: usize,
    epoch: u64,
    to_box: bool,
    /// Lost on the way: the connection dies when it would have arrived.
    lost: bool,
    msg: Msg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Device(usize),
    Edge(usize),
}

/// A connection slot between a box (`node`) and a peer, known to the box as
/// `name`. `epoch` changes on every connect and drop: a message of an
/// older connection is never delivered.
#[derive(Clone, Debug)]
struct Link {
    node: usize,
    name: String,
    peer: Peer,
    connected: bool,
    epoch: u64,
    session: u64,
    /// The box's boot the session belongs to.
    boot: u64,
    partition_until: Millis,
    /// Per direction (to box, to peer): the last arrival time, for FIFO.
    last_at: [Millis; 2],
}

struct Node {
    name: String,
    core: QueueCore,
    disk: SimDisk,
    edge: bool,
    up: bool,
    down_until: Millis,
    skew: i64,
    boots: u64,
    /// Commands this box's operators know (sent and acknowledged).
    ids: Vec<CommandId>,
    /// Acknowledged sends with no result on disk yet: what a restart must
    /// find.
    open: FxHashSet<CommandId>,
    /// Result records flushed to disk, per (id, generation).
    results: FxHashMap<(CommandId, u32), u32>,
    /// The state of the last result flushed per command.
    ended: FxHashMap<CommandId, State>,
    /// Commands whose result records retention dropped: the box may not
    /// know them any more.
    pruned: FxHashSet<CommandId>,
    /// Last published state per command.
    states: FxHashMap<CommandId, State>,
    /// Commands last seen failed or dead that this box's operator may
    /// retry.
    retryable: PickSet,
    uplink: Option<usize>,
    /// Uplink session: highest outbox seq sent and acknowledged.
    sent: u64,
    acked: u64,
    /// Arm: crash after the next write, before its flush.
    crash_mid_commit: bool,
    /// Its database's uplink epoch (`UpFrom`): kept across restarts, as
    /// the store keeps it.
    db_epoch: u64,
    /// Wiped, and the hub has not yet durably taken its new epoch: the hub
    /// may start its cursor again (and must not otherwise).
    wiped: bool,
}

struct Device {
    node: usize,
    name: String,
    link: usize,
    /// (id, attempt) → the outcome sent (None: it hung), as the reference
    /// agent dedupes.
    seen: BTreeMap<(CommandId, u32), Option<Outcome>>,
    /// Runs per command: (succeeded, failed).
    runs: BTreeMap<CommandId, (u32, u32)>,
    /// Per (origin box, priority): the highest send index first delivered.
    fifo: BTreeMap<(usize, Priority), u64>,
    /// Its labels and standing as its box has them durably: tagged
    /// `line-a` (else `line-b`), revoked.
    line_a: bool,
    revoked: bool,
}

#[derive(Clone, Debug)]
struct Sent {
    node: usize,
    /// The device that runs it, for a direct target.
    device: Option<usize>,
    /// Direct, no `after`, no `not_before`, no key: FIFO applies.
    plain: bool,
    pool: bool,
    priority: Priority,
    index: u64,
    /// Its device's box was wiped while it was there: a run the wipe
    /// took the record of may be followed by a refusal on the new box.
    wiped: bool,
    /// A rollout's or a workflow run's: its runner owns it (no
    /// operator retries it).
    job: bool,
    /// The boxes whose record of it may follow an Expired of their own
    /// clock with what the box below did (one bit per node): those that
    /// hand it down on its way to its target's box (the sender and each
    /// box between), and the boxes above the sender, whose record mirrors
    /// the sender's. Empty for a target of the sender's own devices.
    via: u64,
}

pub struct World {
    rng: Rng,
    now: Millis,
    step: u64,
    nodes: Vec<Node>,
    devices: Vec<Device>,
    links: Vec<Link>,
    link_of: BTreeMap<(usize, String), usize>,
    net: BTreeMap<(Millis, u64), Packet>,
    packet_seq: u64,
    /// Connections to tear down on the box side at the next step: (link,
    /// session, boot). Deferred so a drop found inside a round never runs a
    /// round of its own.
    drops: Vec<(usize, u64, u64)>,
    faults: bool,
    settling: bool,
    sent: BTreeMap<CommandId, Sent>,
    send_index: u64,
    report: Report,
    trace: bool,
    retry_forwarded: bool,
    dup_device_frames: bool,
    /// Commands an edge's operator retried: the hub may see a Dead or
    /// Failed end of one followed by the end of that retry.
    retried_below: BTreeSet<CommandId>,
    rollouts_on: bool,
    rollouts: job::Jobs<crate::engine::rollout::Rollout, rollouts::Seen>,
    workflows_on: bool,
    workflow_groups: bool,
    runs: job::Jobs<crate::engine::workflow::Run>,
}

impl World {
    pub fn new(seed: u64, cfg: &Config) -> Self {
        World::with_rng(seed, Rng::new(seed), cfg)
    }

    /// A world whose choices come from `rng` (recording or replaying a
    /// tape); `seed` only names it in the report.
    pub fn with_rng(seed: u64, rng: Rng, cfg: &Config) -> Self {
        let mut w = World {
            rng,
            now: T0,
            step: 0,
            nodes: Vec::new(),
            devices: Vec::new(),
            links: Vec::new(),
            link_of: BTreeMap::new(),
            net: BTreeMap::new(),
            packet_seq: 0,
            drops: Vec::new(),
            faults: cfg.faults,
            settling: false,
            sent: BTreeMap::new(),
            send_index: 0,
            report: Report {
                seed,
                hash: 0xcbf2_9ce4_8422_2325,
                ..Report::default()
            },
            trace: cfg.trace,
            retry_forwarded: cfg.retry_forwarded,
            dup_device_frames: cfg.dup_device_frames,
            retried_below: BTreeSet::new(),
            rollouts_on: cfg.rollouts,
            rollouts: Default::default(),
            workflows_on: cfg.workflows,
            workflow_groups: cfg.workflow_groups,
            runs: Default::default(),
        };
        let hub = w.add_node("hub".into(), false);
        for m in 0..cfg.hub_devices {
            w.add_device(hub, m);
        }
        for e in 1..=cfg.edges {
            let name = format!("edge-{e}");
            let mut rec = DeviceRecord::new(name.clone());
            rec.tags.push(GATEWAY_TAG.into());
            w.nodes[hub].core.enroll(rec, T0);
            let n = w.add_node(name.clone(), true);
            let l = w.add_link(hub, name, Peer::Edge(n));
            w.nodes[n].uplink = Some(l);
            for m in 0..cfg.devices_per_edge {
                w.add_device(n, m);
            }
        }
        // The middle tier: `edge-1` is the hub of these, as the hub is its.
        let subs = if cfg.edges > 0 { cfg.sub_edges } else { 0 };
        for s in 1..=subs {
            let name = format!("sub-{s}");
            let mut rec = DeviceRecord::new(name.clone());
            rec.tags.push(GATEWAY_TAG.into());
            w.nodes[1].core.enroll(rec, T0);
            let n = w.add_node(name.clone(), true);
            let l = w.add_link(1, name, Peer::Edge(n));
            w.nodes[n].uplink = Some(l);
            for m in 0..cfg.devices_per_edge {
                w.add_device(n, m);
            }
        }
        for n in 0..w.nodes.len() {
            // Enrollment is set-up, not under test: no faults yet.
            w.round(n);
        }
        w
    }

    fn add_node(&mut self, name: String, edge: bool) -> usize {
        let seed = self.rng.next_u64();
        let mut core = fresh_core(seed);
        if edge {
            core.enable_outbox(OUTBOX_MAX);
        }
        self.nodes.push(Node {
            name,
            core,
            disk: SimDisk::default(),
            edge,
            up: true,
            down_until: 0,
            skew: 0,
            boots: 1,
            ids: Vec::new(),
            open: FxHashSet::default(),
            results: FxHashMap::default(),
            ended: FxHashMap::default(),
            pruned: FxHashSet::default(),
            states: FxHashMap::default(),
            retryable: PickSet::default(),
            uplink: None,
            sent: 0,
            acked: 0,
            crash_mid_commit: false,
            db_epoch: seed | 1,
            wiped: false,
        });
        self.nodes.len() - 1
    }

    fn add_device(&mut self, n: usize, m: usize) {
        let name = format!("dev-{m}");
        let rec = device_record(&name, m % 2 == 0);
        self.nodes[n].core.enroll(rec, T0);
        let d = self.devices.len();
        let link = self.add_link(n, name.clone(), Peer::Device(d));
        self.devices.push(Device {
            node: n,
            name,
            link,
            seen: BTreeMap::new(),
            runs: BTreeMap::new(),
            fifo: BTreeMap::new(),
            line_a: m % 2 == 0,
            revoked: false,
        });
    }

    fn add_link(&mut self, node: usize, name: String, peer: Peer) -> usize {
        let l = self.links.len();
        self.link_of.insert((node, name.clone()), l);
        self.links.push(Link {
            node,
            name,
            peer,
            connected: false,
            epoch: 0,
            session: 0,
            boot: 0,
            partition_until: 0,
            last_at: [0; 2],
        });
        l
    }

    /// The box whose uplink `n` is on.
    fn parent(&self, n: usize) -> Option<usize> {
        self.nodes[n].uplink.map(|l| self.links[l].node)
    }

    /// How box `top` names box `n` in a target (`edge-1/sub-1`; empty for
    /// itself), if `n` is `top` or below it.
    fn path_from(&self, top: usize, n: usize) -> Option<String> {
        let mut names = Vec::new();
        let mut at = n;
        while at != top {
            names.push(self.nodes[at].name.as_str());
            at = self.parent(at)?;
        }
        names.reverse();
        Some(names.join("/"))
    }

    /// The boxes below `n`, at any depth, in the order they were made.
    fn below_of(&self, n: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&x| x != n && self.path_from(n, x).is_some())
            .collect()
    }

    /// Whether `n` is a hub to any box (it forwards and takes `Up`s).
    fn is_hub(&self, n: usize) -> bool {
        self.links
            .iter()
            .any(|l| l.node == n && matches!(l.peer, Peer::Edge(_)))
    }

    /// The box `path` (`edge-1/sub-1`) names, seen from `from`.
    fn node_at(&self, from: usize, path: &str) -> Option<usize> {
        let mut at = from;
        for name in path.split('/') {
            let &l = self.link_of.get(&(at, name.to_string()))?;
            let Peer::Edge(e) = self.links[l].peer else {
                return None;
            };
            at = e;
        }
        Some(at)
    }

    /// `Sent::via` of a command sent on `n` to `target`, whose path names
    /// the box of its devices (`edge-1/sub-1/dev-0`: `sub-1`'s).
    fn via(&self, n: usize, target: &str) -> u64 {
        let to = target
            .rsplit_once('/')
            .and_then(|(path, _)| self.node_at(n, path))
            .unwrap_or(n);
        let mut via = 0;
        let mut at = to;
        while let Some(p) = self.parent(at).filter(|_| to != n) {
            via |= 1 << p;
            at = p;
        }
        via
    }

    fn node_now(&self, n: usize) -> Millis {
        (self.now as i64 + self.nodes[n].skew).max(0) as Millis
    }

    // ----- trace --------------------------------------------------------

    fn ev(&mut self, node: usize, what: &str, x: u128, detail: impl FnOnce() -> String) {
        let mut h = self.report.hash;
        let mut mix = |bytes: &[u8]| {
            for b in bytes {
                h ^= *b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01B3);
            }
        };
        mix(what.as_bytes());
        mix(&(node as u64).to_le_bytes());
        mix(&x.to_le_bytes());
        mix(&self.now.to_le_bytes());
        self.report.hash = h;
        if self.trace {
            let line = format!(
                "{:>7} t={:<7} {:<7} {what} {}",
                self.step,
                self.now - T0,
                self.nodes.get(node).map_or("-", |n| n.name.as_str()),
                detail()
            );
            self.report.trace.push(line);
        }
    }

    fn violation(&mut self, node: usize, what: String) {
        let msg = format!(
            "step {} t={} {}: {what}",
            self.step,
            self.now - T0,
            self.nodes.get(node).map_or("-", |n| n.name.as_str())
        );
        self.ev(node, "VIOLATION", 0, || what.clone());
        if self.report.violations.len() < MAX_VIOLATIONS {
            self.report.violations.push(msg);
        }
    }

    // ----- the shell around each core ------------------------------------

    /// One group commit, as `service::Writer::round`: tick, relocate one
    /// straggler, seal, write one batch and flush it, and only then act on
    /// the effects. A failed write or flush ends the box (as `serve` exits
    /// 75) and it restarts from what its disk kept. False: not committed.
    fn round(&mut self, n: usize) -> bool {
        let now = self.node_now(n);
        let node = &mut self.nodes[n];
        node.core.tick(now);
        let round = node.core.round(now, &mut &node.disk.view().journal);
        let (write, fx) = (round.write, round.effects);
        let mut devices = fx.device_touches.clone();
        devices.extend(fx.device_writes.iter().cloned());
        let flush = !write.is_empty() || !fx.device_writes.is_empty();
        let batch = Batch {
            group: (!write.is_empty()).then_some(write),
            devices,
        };
        if batch.group.is_some() || !batch.devices.is_empty() {
            if node.disk.write(batch).is_err() {
                self.report.counts.disk_faults += 1;
                self.ev(n, "write-failed", 0, String::new);
                if self.rng.chance(500) {
                    self.rebuild_in_place(n);
                } else {
                    self.crash(n);
                }
                return false;
            }
            if flush && std::mem::take(&mut self.nodes[n].crash_mid_commit) {
                self.ev(n, "crash-before-flush", 0, String::new);
                self.crash(n);
                return false;
            }
        }
        if flush {
            match self.nodes[n].disk.flush() {
                Ok(done) => self.flushed(n, done),
                Err(_) => {
                    self.note_pruned(n);
                    self.report.counts.disk_faults += 1;
                    self.ev(n, "flush-failed", 0, String::new);
                    self.crash(n);
                    return false;
                }
            }
        }
        self.dispatch(n, fx);
        if self.nodes[n].edge {
            self.pump(n);
        }
        if let Err(e) = self.nodes[n].core.check_invariants() {
            self.violation(n, format!("queue invariant: {e}"));
        }
        true
    }

    /// Count results that reached the disk for good: each (id, generation)
    /// at most once on a box.
    fn flushed(&mut self, n: usize, done: Vec<Batch>) {
        let mut twice = Vec::new();
        let hub = self.is_hub(n);
        let sent = &self.sent;
        let node = &mut self.nodes[n];
        for b in &done {
            for r in b.group.iter().flat_map(|g| &g.results) {
                let c = node.results.entry((r.id, r.gen)).or_insert(0);
                *c += 1;
                // A hub records the late end from below of a command it
                // ended and forgot (retention) again: the known limit in
                // `gateway::remote_result`. A resurrection would also run
                // it again on its device, which the end checks catch.
                let forgotten = hub && node.pruned.contains(&r.id);
                // And it takes what its edge did over an Expired of its
                // own clock.
                let relearned = node.ended.get(&r.id) == Some(&State::Expired)
                    && r.state != State::Expired
                    && sent_below(sent, n, r.id);
                if *c > 1 && !forgotten && !relearned {
                    twice.push((r.id, r.gen, r.state));
                }
                node.ended.insert(r.id, r.state);
                node.open.remove(&r.id);
            }
        }
        self.note_pruned(n);
        self.rollouts_flushed(n);
        self.workflows_flushed(n);
        for (id, gen, state) in twice {
            self.violation(
                n,
                format!("result of {id} (gen {gen}, {state:?}) recorded twice"),
            );
        }
    }

    /// Result records that left the disk for good (a torn flush's
    /// removals count too): the box may forget those commands.
    fn note_pruned(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        for id in node.disk.take_pruned() {
            // A newer record (a retry's) may still be on disk; only the
            // box's lookup can tell, so the mark just allows NotFound.
            node.pruned.insert(id);
            node.retryable.remove(id);
        }
    }

    fn dispatch(&mut self, n: usize, fx: Effects) {
        let now = self.node_now(n);
        for d in fx.deliveries {
            self.deliver(n, d, now);
        }
        for (device, id) in fx.cancels {
            if let Some(&l) = self.link_of.get(&(n, device)) {
                self.send(l, false, Msg::Cancel(id));
            }
        }
        for ev in fx.events {
            self.lifecycle(n, ev);
        }
    }

    fn deliver(&mut self, n: usize, d: DeliverEffect, now: Millis) {
        let Some(&l) = self.link_of.get(&(n, d.device.clone())) else {
            return;
        };
        let link = &self.links[l];
        if !link.connected || link.session != d.session || link.boot != self.nodes[n].boots {
            return;
        }
        let node = &self.nodes[n];
        let image = node.disk.view();
        let find = |g: u64| {
            image
                .journal
                .get(&g)
                .and_then(|es| es.iter().find_map(|e| e.command_for(d.id)))
        };
        let command = find(d.group).or_else(|| node.core.payload_group(d.id).and_then(find));
        let Some(c) = command else {
            self.violation(
                n,
                format!("{} delivered with no journal record on disk", d.id),
            );
            return;
        };
        if let Peer::Device(x) = self.links[l].peer {
            if self.devices[x].revoked {
                self.violation(n, format!("{} delivered to revoked {}", d.id, d.device));
                return;
            }
        }
        let msg = match forward_of(&d, c, now) {
            Ok(f) => Msg::Forward(Box::new(f)),
            Err(_) => Msg::Command {
                id: d.id,
                attempt: d.attempt,
            },
        };
        self.ev(n, "deliver", d.id.0, || {
            format!("{} → {} attempt {}", d.id, d.device, d.attempt)
        });
        self.send(l, false, msg);
    }

    /// Lifecycle rules seen from outside: an end is final, except that an
    /// operator's retry puts a Failed or Dead command back in the queue,
    /// and that a box above the one that retried it learns the retry's
    /// end after the end it followed.
    fn lifecycle(&mut self, n: usize, ev: LifecycleEvent) {
        let prev = self.nodes[n].states.insert(ev.id, ev.state);
        if self.rollouts.owned.contains_key(&ev.id) {
            self.rollouts.events.push((n, ev.clone()));
        }
        self.workflow_event(n, &ev);
        let mine = match self.sent.get(&ev.id) {
            Some(s) => !s.job && (self.retry_forwarded || s.node == n),
            None => self.retry_forwarded,
        };
        if mine && matches!(ev.state, State::Failed | State::Dead) {
            self.nodes[n].retryable.insert(ev.id);
        } else {
            self.nodes[n].retryable.remove(ev.id);
        }
        if let Some(p) = prev {
            // A retry below reaches the hub as whatever state of it the
            // edge's outbox still held (telemetry is compacted).
            let retried = matches!(p, State::Failed | State::Dead)
                && (ev.state == State::Queued || self.retried_below.contains(&ev.id));
            // A hub that has dropped a command's end (retention) takes a
            // late report of it from below as news (a known limit, see
            // ARCHITECTURE.md).
            let forgotten = self.nodes[n].pruned.contains(&ev.id);
            // A hub learns what its edge did after an Expired of its own
            // clock (`gateway::remote_result`).
            let relearned =
                p == State::Expired && ev.state.is_final() && sent_below(&self.sent, n, ev.id);
            if p.is_final() && !retried && !forgotten && !relearned {
                self.violation(n, format!("{}: {p:?} → {:?}", ev.id, ev.state));
            }
        }
        self.ev(n, "state", ev.id.0, || {
            format!("{} {:?} on {}", ev.id, ev.state, ev.device)
        });
    }

    /// The edge streams its outbox (read from its disk, as `upstream` reads
    /// the store) while it is under `MAX_UNACKED` ahead of the hub's acks.
    fn pump(&mut self, e: usize) {
        let Some(l) = self.nodes[e].uplink else {
            return;
        };
        if !self.links[l].connected || !self.nodes[e].up {
            return;
        }
        while self.nodes[e].sent.saturating_sub(self.nodes[e].acked) < MAX_UNACKED {
            let node = &self.nodes[e];
            let after = node.sent;
            let mut out: Vec<UpEntry> = Vec::new();
            for g in node.core.outbox_groups_after(after) {
                if out.len() >= UP_BATCH {
                    break;
                }
                if let Some(es) = node.disk.view().outbox.get(&g) {
                    out.extend(es.iter().filter(|x| x.seq > after).cloned());
                }
            }
            let Some(last) = out.last().map(|x| x.seq) else {
                break;
            };
            self.nodes[e].sent = last;
            self.send(l, true, Msg::Up(out));
        }
    }

    // ----- the network -----------------------------------------------------

    fn send(&mut self, l: usize, to_box: bool, msg: Msg) {
        let link = &self.links[l];
        if !link.connected {
            return;
        }
        let epoch = link.epoch;
        let lost = self.faults && self.rng.chance(5);
        // No duplicate device frames unless asked: QUIC never repeats a
        // frame within a stream, so the real link does not produce these
        // copies. With them (`--dup-device-frames`), a copied ack reaches
        // the box after a later attempt is in flight; it names its attempt
        // (`AckAttempt`), so the box drops it as stale (seeds 10161, 20175
        // ended the later attempt with it while acks named none).
        let dup_ok =
            self.dup_device_frames || !matches!(msg, Msg::Ack { .. } | Msg::Command { .. });
        let copies = if self.faults && dup_ok && self.rng.chance(5) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(30);
            let dir = to_box as usize;
            let at = (self.now + delay).max(self.links[l].last_at[dir]);
            self.links[l].last_at[dir] = at;
            self.packet_seq += 1;
            self.net.insert(
                (at, self.packet_seq),
                Packet {
                    link: l,
                    epoch,
                    to_box,
                    lost,
                    msg: msg.clone(),
                },
            );
        }
    }

    /// End a connection: nothing more arrives on it; the box side is told
    /// at the next step.
    fn drop_link(&mut self, l: usize) {
        let link = &mut self.links[l];
        if !link.connected {
            return;
        }
        link.connected = false;
        link.epoch += 1;
        self.drops.push((l, link.session, link.boot));
        self.report.counts.link_drops += 1;
        let name = link.name.clone();
        let node = link.node;
        self.ev(node, "link-down", l as u128, || name);
    }

    /// Every link of box `n` drops: its devices' and its uplink, from
    /// either end.
    fn drop_links_of(&mut self, n: usize) {
        for l in 0..self.links.len() {
            if self.links[l].node == n || self.links[l].peer == Peer::Edge(n) {
                self.drop_link(l);
            }
        }
    }

    fn apply_drops(&mut self) {
        for (l, session, boot) in std::mem::take(&mut self.drops) {
            let n = self.links[l].node;
            if self.nodes[n].up && self.nodes[n].boots == boot {
                let now = self.node_now(n);
                let name = self.links[l].name.clone();
                self.nodes[n].core.disconnect(&name, session, now);
                self.round(n);
            }
        }
    }

    fn peer_up(&self, l: usize) -> bool {
        match self.links[l].peer {
            Peer::Device(_) => true,
            Peer::Edge(e) => self.nodes[e].up,
        }
    }

    fn connect(&mut self, l: usize) {
        let n = self.links[l].node;
        if self.links[l].connected
            || !self.nodes[n].up
            || !self.peer_up(l)
            || self.now < self.links[l].partition_until
        {
            return;
        }
        let now = self.node_now(n);
        let name = self.links[l].name.clone();
        let Ok(session) = self.nodes[n].core.connect(&name, 0, now) else {
            return;
        };
        if let Peer::Edge(e) = self.links[l].peer {
            // As the uplink sends a 1.6 hub before its first `Up`. Only a
            // wiped edge comes back with another database.
            let epoch = self.nodes[e].db_epoch;
            let again = self.nodes[n].core.up_from(&name, epoch, now);
            // Wiped until the hub has durably moved to the new epoch (its
            // crash before that flush makes it start again once more).
            let moved = self.nodes[n]
                .disk
                .view()
                .cursors
                .get(&name)
                .map(|c| c.epoch);
            if moved == Some(epoch) {
                self.nodes[e].wiped = false;
            }
            let wiped = self.nodes[e].wiped;
            match again {
                Ok(Some(k)) if wiped => {
                    self.ev(n, "up-from-new", k as u128, || format!("{name}: {k} again"));
                }
                Ok(Some(_)) => {
                    self.violation(
                        n,
                        format!("{name}'s cursor started again, its database did not change"),
                    );
                }
                Ok(None) => {}
                Err(err) => self.violation(n, format!("UpFrom of {name} refused: {err}")),
            }
        }
        let link = &mut self.links[l];
        link.connected = true;
        link.epoch += 1;
        link.session = session;
        link.boot = self.nodes[n].boots;
        self.ev(n, "link-up", l as u128, || name);
        if let Peer::Edge(e) = self.links[l].peer {
            let acked = self.nodes[e].core.outbox_stats().acked;
            self.nodes[e].sent = acked;
            self.nodes[e].acked = acked;
        }
        if self.round(n) {
            if let Peer::Edge(e) = self.links[l].peer {
                // As the uplink does at each session's start.
                self.nodes[e].core.presence_snapshot();
                if self.round(e) {
                    self.pump(e);
                }
            }
        }
    }

    fn deliver_due(&mut self) {
        while let Some(entry) = self.net.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let p = entry.remove();
            let link = &self.links[p.link];
            if link.epoch != p.epoch || !link.connected {
                continue;
            }
            if p.lost {
                self.drop_link(p.link);
                continue;
            }
            let n = link.node;
            match (p.to_box, link.peer) {
                (false, Peer::Device(d)) => self.at_device(d, p.msg),
                (true, Peer::Device(_)) => self.at_box(n, p.link, p.msg),
                (false, Peer::Edge(e)) => self.at_edge(e, p.msg),
                (true, Peer::Edge(_)) => self.at_hub(n, p.link, p.msg),
            }
        }
    }

    /// The device agent: runs each (id, attempt) once, remembers its outcome
    /// and answers a redelivery from memory.
    fn at_device(&mut self, d: usize, msg: Msg) {
        let Msg::Command { id, attempt } = msg else {
            return;
        };
        let dev = &self.devices[d];
        let (node, link) = (dev.node, dev.link);
        if let Some(Some(o)) = dev.seen.get(&(id, attempt)) {
            let outcome = o.clone();
            self.answer(link, id, attempt, outcome);
            return;
        }
        let sent = self.sent.get(&id).cloned();
        if !self.devices[d].runs.contains_key(&id)
            && !self.devices[d].seen.contains_key(&(id, attempt))
        {
            if let Some(s) = sent.as_ref().filter(|s| s.plain) {
                let key = (s.node, s.priority);
                let prev = self.devices[d].fifo.get(&key).copied();
                if prev.is_some_and(|p| p > s.index) {
                    self.violation(
                        node,
                        format!(
                            "{id} ({:?}, sent #{}) first delivered to {} after #{} of the same origin and priority",
                            s.priority,
                            s.index,
                            self.devices[d].name,
                            prev.unwrap_or(0)
                        ),
                    );
                }
                let m = prev.unwrap_or(0).max(s.index);
                self.devices[d].fifo.insert(key, m);
            }
        }
        let ran_ok = self.devices[d].runs.get(&id).is_some_and(|r| r.0 > 0);
        if ran_ok && !sent.as_ref().is_some_and(|s| s.pool) {
            let name = self.devices[d].name.clone();
            self.violation(
                node,
                format!("{id} runs again on {name} (attempt {attempt}) after it succeeded there"),
            );
        }
        let roll = self.rng.below(100);
        let outcome = if roll < 4 && !self.settling {
            None
        } else if roll < 24 {
            Some(Outcome::Failed {
                code: 1,
                message: "sim".into(),
            })
        } else {
            Some(Outcome::Ok(b"ok".to_vec()))
        };
        self.devices[d].seen.insert((id, attempt), outcome.clone());
        let name = self.devices[d].name.clone();
        let Some(outcome) = outcome else {
            self.ev(node, "hang", id.0, || format!("{id} on {name}"));
            return;
        };
        let r = self.devices[d].runs.entry(id).or_insert((0, 0));
        if matches!(outcome, Outcome::Ok(_)) {
            r.0 += 1;
        } else {
            r.1 += 1;
        }
        self.report.counts.runs += 1;
        self.ev(node, "run", id.0, || {
            format!("{id} on {name} attempt {attempt}: {outcome:?}")
        });
        self.answer(link, id, attempt, outcome);
    }

    /// The device's ack, naming the attempt it answers (`AckAttempt`).
    fn answer(&mut self, link: usize, id: CommandId, attempt: u32, outcome: Outcome) {
        let msg = Msg::Ack {
            id,
            attempt: Some(attempt),
            outcome,
        };
        self.send(link, true, msg);
    }

    fn at_box(&mut self, n: usize, l: usize, msg: Msg) {
        let Msg::Ack {
            id,
            attempt,
            outcome,
        } = msg
        else {
            return;
        };
        let now = self.node_now(n);
        let name = self.links[l].name.clone();
        let _ = self.nodes[n]
            .core
            .ack_attempt(&name, id, attempt, outcome, now);
        self.round(n);
    }

    /// The edge's uplink (`shell::upstream`): takes forwards under the hub's id
    /// and answers only once durable, applies cancels and acks.
    fn at_edge(&mut self, e: usize, msg: Msg) {
        let now = self.node_now(e);
        let l = self.nodes[e].uplink.expect("an edge has an uplink");
        match msg {
            Msg::Forward(f) => {
                let id = f.id;
                let r =
                    self.nodes[e]
                        .core
                        .send_as(Some(id), crate::engine::uplink::request(*f), now);
                if !self.round(e) {
                    return;
                }
                let reply = match r {
                    Ok(_) => Msg::Accepted(id),
                    Err(err) => {
                        if let Some(s) = self.sent.get_mut(&id) {
                            s.plain = false;
                        }
                        self.ev(e, "refused", id.0, || format!("{id}: {err}"));
                        Msg::Ack {
                            id,
                            attempt: None,
                            outcome: crate::engine::uplink::refusal(err),
                        }
                    }
                };
                self.send(l, true, reply);
            }
            Msg::Cancel(id) => {
                let _ = self.nodes[e].core.cancel_from_hub(id, now);
                self.round(e);
            }
            Msg::UpAck(seq) => {
                if seq > self.nodes[e].acked {
                    self.nodes[e].acked = seq;
                    self.nodes[e].core.up_ack(seq);
                    self.round(e);
                }
                self.pump(e);
            }
            _ => {}
        }
    }

    fn at_hub(&mut self, n: usize, l: usize, msg: Msg) {
        let now = self.node_now(n);
        let edge = self.links[l].name.clone();
        match msg {
            Msg::Accepted(id) => {
                let _ = self.nodes[n].core.handed(&edge, id, now);
                self.round(n);
            }
            Msg::Ack { id, outcome, .. } => {
                let _ = self.nodes[n].core.ack(&edge, id, outcome, now);
                self.round(n);
            }
            Msg::Up(entries) => {
                let r = self.nodes[n].core.up(&edge, entries, now);
                if self.round(n) {
                    if let Ok(cursor) = r {
                        self.send(l, false, Msg::UpAck(cursor));
                    }
                }
            }
            _ => {}
        }
    }

    // ----- crashes and restarts -------------------------------------------

    fn crash(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if !node.up {
            return;
        }
        node.up = false;
        node.disk.crash();
        node.crash_mid_commit = false;
        node.down_until = self.now + 10 + self.rng.below(2_000);
        self.report.counts.crashes += 1;
        self.ev(n, "crash", 0, String::new);
        self.drop_links_of(n);
        self.rollouts_crashed(n);
        self.workflows_crashed(n);
    }

    /// An edge's data dir wiped and set up again under its old bundle: a
    /// new database (a new uplink epoch), its devices enrolled again. What
    /// only the edge held goes with it (its own operators' sends); what the
    /// hub had handed down must come down again and end once, the
    /// result of each on the hub exactly once.
    fn op_wipe(&mut self, e: usize) {
        // Not a box in the middle tier: its boxes below would have to be
        // enrolled again, and what they reported to it only is gone with
        // it (not simulated).
        if !self.nodes[e].edge || self.is_hub(e) {
            return;
        }
        self.drop_links_of(e);
        let seed = self.rng.next_u64();
        let now = self.node_now(e);
        let mut core = fresh_core(seed);
        core.enable_outbox(OUTBOX_MAX);
        let local = self.local_devices(e);
        for &d in &local {
            let dev = &mut self.devices[d];
            dev.revoked = false;
            core.enroll(device_record(&dev.name, dev.line_a), now);
        }
        let node = &mut self.nodes[e];
        node.core = core;
        node.disk = SimDisk::default();
        node.db_epoch = seed | 1;
        node.wiped = true;
        node.boots += 1;
        node.ids.clear();
        node.open.clear();
        node.results.clear();
        node.ended.clear();
        node.pruned.clear();
        node.states.clear();
        node.retryable = PickSet::default();
        node.sent = 0;
        node.acked = 0;
        node.crash_mid_commit = false;
        self.sent.retain(|_, s| s.node != e);
        // What comes down again arrives after newer commands: no FIFO.
        for s in self.sent.values_mut() {
            if s.device.is_some_and(|d| self.devices[d].node == e) {
                s.plain = false;
                s.wiped = true;
            }
        }
        self.report.counts.wipes += 1;
        self.rollouts_wiped(e);
        self.workflows_wiped(e);
        self.ev(e, "wipe", 0, String::new);
        self.round(e);
    }

    /// What the writer does after a failed commit when it may not exit (an
    /// embedded queue, `fail_round`): nobody is told "accepted", every
    /// session is dropped, and the core is rebuilt from what the disk holds,
    /// in place: no downtime, and nothing rolled back (the failed write kept
    /// nothing; what was written before stays readable).
    fn rebuild_in_place(&mut self, n: usize) {
        self.report.counts.rebuilds += 1;
        self.ev(n, "rebuild", 0, String::new);
        self.drop_links_of(n);
        self.restart(n);
    }

    /// A fresh core from what the disk kept, in the order `service::rebuild`
    /// replays a store (the shared `replay_start`, then the groups).
    fn restart(&mut self, n: usize) {
        let now = self.node_now(n);
        let seed = self.rng.next_u64();
        let node = &mut self.nodes[n];
        let image = node.disk.view();
        let mut core = fresh_core(seed);
        let outbox = node.edge.then(|| ReplayOutbox {
            max: OUTBOX_MAX,
            next_seq: image.outbox_next.unwrap_or(1),
            groups: image
                .outbox
                .iter()
                .map(|(g, es)| (*g, es.clone()))
                .collect(),
        });
        replay_start(
            &mut core,
            image.devices.values().cloned(),
            image.cursors.iter().map(|(e, c)| (e.clone(), *c)),
            image.cancel_marks.iter().copied(),
            outbox,
            now,
        );
        for mut g in image.groups() {
            strip_payloads(&mut g);
            core.replay_group(g);
        }
        core.replay_last_seq(image.last_seq);
        core.finish_replay(now);
        node.core = core;
        node.up = true;
        node.boots += 1;
        self.ev(n, "restart", 0, String::new);
        let mut lost: Vec<CommandId> = self.nodes[n]
            .open
            .iter()
            .copied()
            .filter(|id| matches!(self.nodes[n].core.lookup(*id), Lookup::NotFound))
            .collect();
        lost.sort();
        for id in lost {
            self.violation(n, format!("acknowledged send {id} lost by the restart"));
        }
        self.check_labels(n);
        self.round(n);
    }

    /// After a restart: every device's labels and standing are what its
    /// box last made durable, no older (a lost relabel or revocation) and
    /// no newer (one that was never acknowledged).
    fn check_labels(&mut self, n: usize) {
        let views = self.nodes[n].core.devices();
        let mut wrong = Vec::new();
        for d in self.devices.iter().filter(|d| d.node == n) {
            let Some(v) = views.iter().find(|v| v.record.id == d.name) else {
                wrong.push(format!("{} is not enrolled after the restart", d.name));
                continue;
            };
            let tag = if d.line_a { "line-a" } else { "line-b" };
            let tags_ok = v
                .record
                .tags
                .iter()
                .filter(|t| t.starts_with("line-"))
                .eq([tag]);
            if !tags_ok || v.record.revoked != d.revoked {
                wrong.push(format!(
                    "{} came back with tags {:?}, revoked {}; it was made durable with [{tag}], revoked {}",
                    d.name, v.record.tags, v.record.revoked, d.revoked
                ));
            }
        }
        for w in wrong {
            self.violation(n, w);
        }
    }

    // ----- the workload --------------------------------------------------

    fn op_send(&mut self, n: usize) {
        let now = self.node_now(n);
        // A hub sends most to the boxes below it; a box in the middle
        // tier, half to its own devices.
        let below = self.below_of(n);
        let local = self.devices.iter().any(|d| d.node == n);
        let share = if self.nodes[n].edge { 500 } else { 200 };
        let (prefix, edge) = if below.is_empty() || (local && self.rng.chance(share)) {
            (String::new(), n)
        } else {
            let e = below[self.rng.below(below.len() as u64) as usize];
            let path = self.path_from(n, e).unwrap_or_default();
            (format!("{path}/"), e)
        };
        let devices = self
            .devices
            .iter()
            .filter(|d| d.node == edge)
            .count()
            .max(1) as u64;
        let m = self.rng.below(devices);
        let kind = self.rng.below(100);
        let (target, device, pool) = if kind < 76 {
            let name = format!("dev-{m}");
            let d = self
                .devices
                .iter()
                .position(|d| d.node == edge && d.name == name);
            (format!("{prefix}{name}"), d, false)
        } else if kind < 88 {
            let tag = if m % 2 == 0 { "line-a" } else { "line-b" };
            (format!("{prefix}tag:{tag}"), None, false)
        } else {
            (format!("{prefix}cap:cam"), None, true)
        };
        let priority =
            [Priority::Low, Priority::Normal, Priority::High][self.rng.below(3) as usize];
        let r = &mut self.rng;
        let ttl_ms = r.chance(150).then(|| 500 + r.below(20_000));
        let max_attempts = r.chance(200).then(|| 1 + r.below(4) as u32);
        let key = r.chance(100).then(|| format!("k{}", r.below(8)));
        let after = if r.chance(80) {
            let ids = &self.nodes[n].ids;
            self.rng.pick_recent(ids, RECENT)
        } else {
            None
        };
        let not_before = self.rng.chance(80).then(|| now + self.rng.below(3_000));
        let plain = device.is_some() && key.is_none() && after.is_none() && not_before.is_none();
        let req = SendRequest {
            target: target.clone(),
            // A keyed send repeats its key's payload, so a repeat to the same
            // target is a duplicate (answered with the first id) and one to
            // another target is a reuse (refused): both paths are run.
            payload: match &key {
                Some(k) => format!("p-{k}").into_bytes(),
                None => format!("p{}", self.step).into_bytes(),
            },
            opts: SendOptions {
                priority,
                ttl_ms,
                max_attempts,
                key,
                after,
                not_before,
            },
            origin: "cli".into(),
            signature: None,
        };
        let r = self.nodes[n].core.send(req, now);
        if !self.round(n) {
            return;
        }
        match r {
            Ok(rc) if !rc.duplicate => {
                let sent = Sent {
                    node: n,
                    device,
                    plain,
                    pool,
                    priority,
                    index: 0,
                    wiped: false,
                    job: false,
                    via: self.via(n, &target),
                };
                self.note_sent(rc.id, sent, &target);
            }
            Ok(_) => {}
            Err(e) => {
                self.report.counts.sends_refused += 1;
                self.ev(n, "send-refused", 0, || format!("{target}: {e}"));
            }
        }
    }

    /// An acknowledged send: what the checks hold the boxes to.
    fn note_sent(&mut self, id: CommandId, mut sent: Sent, target: &str) {
        let n = sent.node;
        self.send_index += 1;
        sent.index = self.send_index;
        self.sent.insert(id, sent);
        let node = &mut self.nodes[n];
        node.ids.push(id);
        // It may have ended in its own round (a failed dependency).
        if !node.ended.contains_key(&id) {
            node.open.insert(id);
        }
        self.report.counts.sends_acked += 1;
        self.ev(n, "send", id.0, || format!("{id} → {target}"));
    }

    fn local_devices(&self, n: usize) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|&d| self.devices[d].node == n)
            .collect()
    }

    /// `outpost relabel`: a device moves to the other line.
    fn op_relabel(&mut self, n: usize) {
        let Some(d) = self.rng.pick(&self.local_devices(n)) else {
            return;
        };
        let (name, line_a, revoked) = {
            let dev = &self.devices[d];
            (dev.name.clone(), dev.line_a, dev.revoked)
        };
        let (from, to) = if line_a {
            ("line-a", "line-b")
        } else {
            ("line-b", "line-a")
        };
        let now = self.node_now(n);
        let r = self.nodes[n].core.relabel(
            Relabel {
                device: name.clone(),
                add_tags: vec![to.into()],
                remove_tags: vec![from.into()],
                add_caps: vec![],
                remove_caps: vec![],
            },
            now,
        );
        if !self.round(n) {
            return;
        }
        match r {
            Ok(rec) if !revoked && rec.tags.iter().any(|t| t == to) => {
                self.devices[d].line_a = !line_a;
                self.report.counts.relabels += 1;
                self.ev(n, "relabel", d as u128, || format!("{name} → {to}"));
            }
            Err(_) if revoked => {}
            other => self.violation(
                n,
                format!("relabel of {name} (revoked {revoked}) to {to} gave {other:?}"),
            ),
        }
    }

    /// A device sends another a command, through its box's ACL: devices
    /// on `line-a` may address those on `line-b`, nobody else anyone. The
    /// box must refuse what the rule and the labels it holds refuse, and
    /// take the rest as any acknowledged send.
    fn op_device_send(&mut self, n: usize) {
        let local = self.local_devices(n);
        let (Some(s), Some(t)) = (self.rng.pick(&local), self.rng.pick(&local)) else {
            return;
        };
        let (from, to) = (self.devices[s].name.clone(), self.devices[t].name.clone());
        let allowed = self.devices[s].line_a && !self.devices[t].line_a;
        let expect_ok = allowed && !self.devices[s].revoked && !self.devices[t].revoked;
        let now = self.node_now(n);
        let req = SendRequest {
            target: to.clone(),
            payload: format!("d{}", self.step).into_bytes(),
            opts: SendOptions::default(),
            origin: String::new(),
            signature: None,
        };
        let r = self.nodes[n].core.device_send(&from, req, now);
        if !self.round(n) {
            return;
        }
        match r {
            Ok(rc) if expect_ok => {
                let sent = Sent {
                    node: n,
                    device: Some(t),
                    plain: true,
                    pool: false,
                    priority: Priority::Normal,
                    index: 0,
                    wiped: false,
                    job: false,
                    via: 0,
                };
                self.report.counts.device_sends += 1;
                self.note_sent(rc.id, sent, &format!("{from} → {to}"));
            }
            Err(_) if !expect_ok => {
                self.report.counts.sends_refused += 1;
                self.ev(n, "device-send-refused", 0, || format!("{from} → {to}"));
            }
            other => self.violation(
                n,
                format!(
                    "{from} (line-a {}, revoked {}) → {to} (line-a {}, revoked {}): the ACL {} it, the box said {other:?}",
                    self.devices[s].line_a,
                    self.devices[s].revoked,
                    self.devices[t].line_a,
                    self.devices[t].revoked,
                    if expect_ok { "allows" } else { "refuses" }
                ),
            ),
        }
    }

    /// `outpost revoke`: the device is cut off and gets nothing more
    /// until it is enrolled again.
    fn op_revoke(&mut self, n: usize) {
        let Some(d) = self.rng.pick(&self.local_devices(n)) else {
            return;
        };
        if self.devices[d].revoked {
            return;
        }
        let name = self.devices[d].name.clone();
        let now = self.node_now(n);
        let r = self.nodes[n].core.revoke(&name, now);
        if !self.round(n) {
            return;
        }
        match r {
            Ok(rec) if rec.revoked => {
                self.devices[d].revoked = true;
                self.report.counts.revocations += 1;
                self.ev(n, "revoke", d as u128, || name);
                // Its box closed the session; the device sees it drop.
                let l = self.devices[d].link;
                self.drop_link(l);
            }
            other => self.violation(n, format!("revoke of {name} gave {other:?}")),
        }
    }

    fn op_reenroll(&mut self, n: usize) {
        let revoked: Vec<usize> = self
            .local_devices(n)
            .into_iter()
            .filter(|&d| self.devices[d].revoked)
            .collect();
        if let Some(d) = self.rng.pick(&revoked) {
            self.reenroll(d);
        }
    }

    /// `outpost enroll --force` of a revoked id: the same labels, in again.
    fn reenroll(&mut self, d: usize) {
        let n = self.devices[d].node;
        let name = self.devices[d].name.clone();
        let rec = device_record(&name, self.devices[d].line_a);
        let now = self.node_now(n);
        self.nodes[n].core.enroll(rec, now);
        if self.round(n) {
            self.devices[d].revoked = false;
            self.ev(n, "enroll", d as u128, || name);
        }
    }

    fn op_cancel(&mut self, n: usize) {
        let Some(id) = self.rng.pick_recent(&self.nodes[n].ids, RECENT) else {
            return;
        };
        let now = self.node_now(n);
        let r = self.nodes[n].core.cancel(id, now);
        if self.round(n) && r.is_ok() {
            self.report.counts.cancels += 1;
            self.ev(n, "cancel", id.0, || id.to_string());
        }
    }

    /// `outpost retry`: the shell reads the result record back from disk.
    fn op_retry(&mut self, n: usize) {
        // Among the commands last seen failed or dead: a random known id is
        // rarely one, and a refused retry tests little.
        let Some(id) = self.nodes[n].retryable.pick(&mut self.rng) else {
            return;
        };
        let Lookup::Finished { seq, .. } = self.nodes[n].core.lookup(id) else {
            return;
        };
        let Some(rec) = self.nodes[n].disk.view().result(seq, id).cloned() else {
            return;
        };
        let now = self.node_now(n);
        let r = self.nodes[n].core.retry(rec, now);
        if self.round(n) && r.is_ok() {
            if self.nodes[n].uplink.is_some() {
                self.retried_below.insert(id);
            }
            self.report.counts.retries += 1;
            self.ev(n, "retry", id.0, || id.to_string());
        }
    }

    /// Telemetry from a connected device: it goes up through the outbox,
    /// and fills it while the uplink is down.
    fn op_event(&mut self) {
        let d = self.rng.below(self.devices.len() as u64) as usize;
        let (n, l) = (self.devices[d].node, self.devices[d].link);
        if !self.links[l].connected || !self.nodes[n].up {
            return;
        }
        let now = self.node_now(n);
        let name = self.devices[d].name.clone();
        self.nodes[n]
            .core
            .device_event(&name, format!("e{}", self.step).into_bytes(), now);
        self.round(n);
    }

    fn op_clock(&mut self, n: usize) {
        let big = self.rng.chance(300);
        let mag = if big {
            JUMP_MS as u64 + 1 + self.rng.below(60_000)
        } else {
            self.rng.below(JUMP_MS as u64)
        } as i64;
        let delta = if self.rng.chance(500) { mag } else { -mag };
        self.nodes[n].skew += delta;
        self.report.counts.clock_jumps += 1;
        self.ev(n, "clock", delta as u128, || format!("{delta:+} ms"));
        if delta.abs() > JUMP_MS && self.nodes[n].up {
            let now = self.node_now(n);
            self.nodes[n].core.clock_jumped(delta, now);
            self.round(n);
        }
    }

    fn up_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&n| self.nodes[n].up)
            .collect()
    }

    /// Restarts that are due, deferred drops, messages that arrived, and
    /// timers that fell due: everything that happens without a decision.
    fn settle_time(&mut self) {
        for n in 0..self.nodes.len() {
            if !self.nodes[n].up && self.nodes[n].down_until <= self.now {
                self.restart(n);
            }
        }
        self.apply_drops();
        self.deliver_due();
        self.apply_drops();
        for n in self.up_nodes() {
            let now = self.node_now(n);
            if self.nodes[n].core.next_deadline().is_some_and(|t| t <= now) {
                self.round(n);
            }
        }
    }

    /// One step of the world: time passes a little, then one random action.
    pub fn step(&mut self) {
        if let Some(at) = self.rng.position() {
            self.report.step_starts.push(at);
        }
        self.step += 1;
        self.now += self.rng.below(20);
        self.settle_time();
        let up = self.up_nodes();
        let Some(n) = self.rng.pick(&up) else { return };
        let r = self.rng.below(1000);
        let faults = self.faults;
        match r {
            0..=249 => self.op_send(n),
            250..=274 => self.op_cancel(n),
            275..=289 => self.op_retry(n),
            290..=539 => {
                let l = self.rng.below(self.links.len() as u64) as usize;
                self.connect(l);
            }
            540..=559 => {
                let l = self.rng.below(self.links.len() as u64) as usize;
                self.drop_link(l);
            }
            560..=564 if faults => self.crash(n),
            565..=579 if faults => {
                let l = self.rng.below(self.links.len() as u64) as usize;
                let until = self.now + self.rng.below(5_000);
                self.links[l].partition_until = until;
                self.report.counts.partitions += 1;
                let (node, left) = (self.links[l].node, until - self.now);
                self.ev(node, "partition", l as u128, || {
                    format!("link {l} for {left} ms")
                });
                self.drop_link(l);
            }
            580..=584 if faults => self.nodes[n].disk.fail_write = true,
            585..=589 if faults => self.nodes[n].disk.fail_flush = true,
            590..=594 if faults => self.nodes[n].crash_mid_commit = true,
            595..=599 if faults => self.op_clock(n),
            600..=629 => self.op_event(),
            630..=639 => self.op_relabel(n),
            640..=689 => self.op_device_send(n),
            690..=691 => self.op_revoke(n),
            692..=696 => self.op_reenroll(n),
            697 if faults => self.op_wipe(n),
            698..=701 if self.rollouts_on => self.op_rollout_start(n),
            702..=704 if self.rollouts_on => self.op_rollout_verb(n),
            705..=708 if self.workflows_on => self.op_workflow_start(n),
            709 if self.workflows_on => self.op_workflow_cancel(n),
            _ => {}
        }
        self.drive_rollouts();
        self.drive_workflows();
        if self.step % 128 == 0 {
            self.check();
        }
    }

    /// Heal every fault, stop the workload, reconnect everything (a hung
    /// device's commands come again on its new connection) and run until
    /// nothing is left to do.
    pub fn settle(&mut self) {
        self.faults = false;
        self.settling = true;
        for n in 0..self.nodes.len() {
            self.nodes[n].disk.fail_write = false;
            self.nodes[n].disk.fail_flush = false;
            self.nodes[n].crash_mid_commit = false;
            if !self.nodes[n].up {
                self.nodes[n].down_until = self.now;
            }
        }
        for l in 0..self.links.len() {
            self.links[l].partition_until = 0;
            self.drop_link(l);
        }
        // Bounded: backoff is capped and every command has a finite number
        // of attempts, so a healthy world is quiet long before this.
        for _ in 0..200_000u32 {
            self.report.counts.settle_steps += 1;
            self.step += 1;
            self.settle_time();
            // A revoked device's commands wait for it: enrolled again, it
            // takes them.
            for d in 0..self.devices.len() {
                let n = self.devices[d].node;
                if self.devices[d].revoked && self.nodes[n].up {
                    self.reenroll(d);
                }
            }
            for l in 0..self.links.len() {
                self.connect(l);
            }
            self.settle_time();
            self.settle_rollouts();
            self.drive_rollouts();
            self.drive_workflows();
            if self.quiet() {
                break;
            }
            // Jump to the next thing that will happen.
            let next_msg = self.net.keys().next().map(|k| k.0);
            let next_timer = (0..self.nodes.len())
                .filter_map(|n| {
                    let d = self.nodes[n].core.next_deadline()?;
                    Some((d as i64 - self.nodes[n].skew).max(0) as Millis)
                })
                .min();
            let next = [
                next_msg,
                next_timer,
                self.rollouts_next_wake(),
                self.workflows_next_wake(),
            ]
            .into_iter()
            .flatten()
            .min();
            self.now = next.unwrap_or(self.now + 100).max(self.now + 1);
        }
    }

    fn quiet(&self) -> bool {
        self.net.is_empty()
            && self.drops.is_empty()
            && self.rollouts_quiet()
            && self.workflows_quiet()
            && self.links.iter().all(|l| l.connected)
            && self.nodes.iter().all(|n| {
                let s = n.core.stats();
                n.up && s.queued == 0 && s.in_flight == 0 && n.core.outbox_stats().depth == 0
            })
    }

    /// Invariants that hold at every step: no acknowledged send unknown to
    /// its box, bounded queues and outboxes.
    pub fn check(&mut self) {
        self.check_rollouts();
        for n in self.up_nodes() {
            let stats = self.nodes[n].core.stats();
            if stats.queued + stats.in_flight > limits().max_queued {
                self.violation(
                    n,
                    format!("{} live commands", stats.queued + stats.in_flight),
                );
            }
            let o = self.nodes[n].core.outbox_stats();
            // Telemetry is compacted to one item per device and kind when
            // full; results are never dropped, so only held items are bounded.
            let bound = 4 * (self.devices.len() as u64 + 1);
            if o.held > bound {
                self.violation(n, format!("outbox holds {} telemetry items", o.held));
            }
            let written = self.nodes[n]
                .disk
                .view()
                .outbox
                .values()
                .flatten()
                .filter(|e| e.item.is_telemetry())
                .count() as u64;
            if written > OUTBOX_MAX {
                self.violation(
                    n,
                    format!(
                        "{written} telemetry records in the outbox, over its bound {OUTBOX_MAX}"
                    ),
                );
            }
        }
    }

    /// After `settle`: every acknowledged send ended on its box, each
    /// command's effect happened once where it succeeded and never where it
    /// failed, the world is quiet, and the hub holds every result of its
    /// own sends.
    pub fn check_end(&mut self) {
        if !self.quiet() {
            let busy: Vec<String> = self
                .nodes
                .iter()
                .map(|n| {
                    let s = n.core.stats();
                    format!(
                        "{}: up {} queued {} in flight {} outbox {}",
                        n.name,
                        n.up,
                        s.queued,
                        s.in_flight,
                        n.core.outbox_stats().depth
                    )
                })
                .collect();
            self.violation(0, format!("did not settle: {}", busy.join("; ")));
        }
        self.check();
        self.check_rollouts_end();
        self.check_workflows_end();
        // Everything is connected again: every hub shows every device
        // below it online, however deep (presence through crashes of any
        // box on the way).
        let hubs: Vec<usize> = (0..self.nodes.len()).filter(|&h| self.is_hub(h)).collect();
        for h in hubs {
            let views = self.nodes[h].core.devices();
            for d in 0..self.devices.len() {
                let path = match self.path_from(h, self.devices[d].node) {
                    Some(p) if !p.is_empty() => p,
                    _ => continue,
                };
                let id = format!("{path}/{}", self.devices[d].name);
                let online = views.iter().find(|v| v.record.id == id).map(|v| v.online);
                if online != Some(true) {
                    let name = self.nodes[h].name.clone();
                    self.violation(h, format!("{id} connected but shown {online:?} on {name}"));
                }
            }
        }
        let sent: Vec<(CommandId, Sent)> =
            self.sent.iter().map(|(id, s)| (*id, s.clone())).collect();
        for (id, s) in sent {
            let node = &self.nodes[s.node];
            let state = match node.core.lookup(id) {
                Lookup::NotFound => match node.ended.get(&id) {
                    Some(&state) if node.pruned.contains(&id) => state,
                    _ => {
                        self.violation(s.node, format!("acknowledged send {id} lost"));
                        continue;
                    }
                },
                Lookup::Live(v) => {
                    let disk = self.on_disk(s.node, id);
                    self.violation(
                        s.node,
                        format!("{id} still {:?} after settling; on disk: {disk}", v.state),
                    );
                    continue;
                }
                Lookup::Finished { state, seq } => {
                    self.check_ran_on(&s, id, seq, state);
                    state
                }
            };
            if !self.nodes[s.node].ended.contains_key(&id) {
                self.violation(
                    s.node,
                    format!("{id} ended {state:?} with no result on disk"),
                );
            }
            let Some(d) = s.device else { continue };
            // A command the hub sent down ends alike on both boxes: the
            // hub says cancelled only if its edge did not run it (a cancel
            // in the window before the edge's `Accepted` used to be the
            // hub's alone).
            let below = self.devices[d].node;
            if below != s.node && matches!(state, State::Cancelled | State::Expired) {
                if let Some(State::Succeeded) = self.nodes[below].ended.get(&id) {
                    self.violation(
                        s.node,
                        format!(
                            "{id} ended {state:?} on the hub but Succeeded on {}",
                            self.nodes[below].name
                        ),
                    );
                }
            }
            let (ok, _) = self.devices[d].runs.get(&id).copied().unwrap_or((0, 0));
            let bad = match state {
                State::Succeeded => ok != 1,
                State::Failed | State::Dead if !s.wiped => ok != 0,
                _ => ok > 1,
            };
            if bad {
                self.violation(
                    s.node,
                    format!(
                        "{id} ended {state:?} but succeeded {ok} times on {}",
                        self.devices[d].name
                    ),
                );
            }
        }
    }

    /// A command that succeeded on a device names it, on its box and on
    /// every box above by the whole path (`edge-1/sub-1/dev-0`), so `show`
    /// anywhere says where it ran.
    fn check_ran_on(&mut self, s: &Sent, id: CommandId, seq: u64, state: State) {
        let Some(d) = s.device.filter(|_| state == State::Succeeded) else {
            return;
        };
        let dev = &self.devices[d];
        let want = match self.path_from(s.node, dev.node).as_deref() {
            Some("") | None => dev.name.clone(),
            Some(path) => format!("{path}/{}", dev.name),
        };
        let image = self.nodes[s.node].disk.view();
        let got = image.result(seq, id).map(|r| r.device.clone());
        if got.as_ref().is_some_and(|g| *g != want) {
            self.violation(
                s.node,
                format!("{id} succeeded on {want} but its result names {got:?}"),
            );
        }
    }

    /// Where a command is on a box's disk, for a violation's message.
    fn on_disk(&self, n: usize, id: CommandId) -> String {
        let image = self.nodes[n].disk.view();
        let mut out = Vec::new();
        for (g, es) in &image.journal {
            for e in es {
                match e {
                    Entry::Enqueued(e) if e.command.id == id => out.push(format!(
                        "J{g} enqueued gen {} attempts {}",
                        e.gen, e.attempts
                    )),
                    Entry::Requeued {
                        id: x,
                        gen,
                        attempts,
                        ..
                    } if *x == id => {
                        out.push(format!("J{g} requeued gen {gen} attempts {attempts}"))
                    }
                    _ => {}
                }
            }
        }
        for (g, rs) in &image.results {
            for r in rs.iter().filter(|r| r.id == id) {
                out.push(format!("R{g} {:?} gen {}", r.state, r.gen));
            }
        }
        out.join(", ")
    }

    pub fn into_report(mut self, steps: u64) -> Report {
        self.report.steps = steps;
        self.report
    }
}

/// Whether box `n` handed command `id` down to a box below it.
fn sent_below(sent: &BTreeMap<CommandId, Sent>, n: usize, id: CommandId) -> bool {
    sent.get(&id).is_some_and(|s| s.via & (1 << n) != 0)
}

/// Run one seed: `steps` random steps, then settle and check the end.
pub fn run(seed: u64, steps: u64, cfg: &Config) -> Report {
    let mut w = World::new(seed, cfg);
    walk(&mut w, steps);
    finish(&mut w);
    w.into_report(steps)
}

/// At most `steps` steps, while a replayed tape lasts, until the first
/// violation.
fn walk(w: &mut World, steps: u64) {
    for _ in 0..steps {
        if w.rng.exhausted() {
            break;
        }
        w.step();
        if !w.report.violations.is_empty() {
            break;
        }
    }
}

/// Settle and check the end, unless a step already found a violation.
fn finish(w: &mut World) {
    if w.report.violations.is_empty() {
        w.settle();
        w.check_end();
    }
}

/// `run`, keeping the tape of every choice the steps made (what settling
/// draws is left off: the run settles, as a replay does, with the simplest
/// choices).
pub fn run_recorded(seed: u64, steps: u64, cfg: &Config) -> (Report, Vec<u64>) {
    let mut w = World::with_rng(seed, Rng::recording(seed), cfg);
    walk(&mut w, steps);
    let tape = std::mem::replace(&mut w.rng, Rng::replaying(Vec::new())).into_tape();
    finish(&mut w);
    let stepped = w.step;
    (w.into_report(stepped), tape)
}

/// Replay a tape of choices: steps while it lasts, then settle.
pub fn run_tape(tape: &[u64], cfg: &Config) -> Report {
    let mut w = World::with_rng(0, Rng::replaying(tape.to_vec()), cfg);
    walk(&mut w, tape.len() as u64);
    finish(&mut w);
    let steps = w.step;
    w.into_report(steps)
}

/// For the tests of the end checks (`sim::rollouts::tests`,
/// `sim::workflows::tests`): run `check` afresh on a tampered world and
/// find the violation that says `what`.
#[cfg(test)]
impl World {
    fn caught(&mut self, check: fn(&mut World), what: &str) {
        self.report.violations.clear();
        check(self);
        assert!(
            self.report.violations.iter().any(|v| v.contains(what)),
            "expected `{what}`: {:?}",
            self.report.violations
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_a_seed_replays_bit_for_bit() {
        let cfg = Config::default();
        let a = run(7, 1_500, &cfg);
        let b = run(7, 1_500, &cfg);
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.counts, b.counts);
        assert_ne!(run(8, 1_500, &cfg).hash, a.hash);
    }

    #[test]
    fn a_traced_run_names_each_kind_of_event_with_its_step_time_and_box() {
        let cfg = Config {
            trace: true,
            ..Config::default()
        };
        let r = run(11, 3_000, &cfg);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(
            r.hash,
            run(11, 3_000, &Config::default()).hash,
            "the trace changes nothing"
        );
        for what in [
            " crash ",
            " restart ",
            " deliver ",
            " state ",
            " workflow-start ",
            " workflow-send ",
            " rollout-start ",
            " rollout-send ",
        ] {
            assert!(
                r.trace.iter().any(|l| l.contains(what)),
                "no `{what}` in the trace"
            );
        }
        // Each line: the step, the world's time, the box.
        let l = r
            .trace
            .iter()
            .find(|l| l.contains(" rollout-start "))
            .unwrap();
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f[0].parse::<u64>().is_ok() && f[1].starts_with("t="), "{l}");
        assert!(f[2] == "hub" || f[2].starts_with("edge-"), "{l}");
    }

    #[test]
    fn sim_runs_commands_end_to_end_without_faults() {
        let cfg = Config {
            faults: false,
            ..Config::default()
        };
        let r = run(1, 2_000, &cfg);
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert!(
            r.counts.sends_acked > 100 && r.counts.runs > 100,
            "{:?}",
            r.counts
        );
    }
}

//! Deterministic simulation (issue 10): a hub, its edges and their devices
//! in one seeded, single-threaded world, in the style of FoundationDB's
//! simulator and TigerBeetle's VOPR.
//!
//! Why this file is over 1,000 lines: it holds the world's types and a
//! box's round, which every other part of the simulation reads and
//! writes; the parts that stand alone are files of their own (below).
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
//!
//! This file holds the world (its boxes, devices and links), a box's
//! round, a step and a run; `net` is the links and what each end does with
//! a message, `ops` the operator's actions and the faults, `checks` the
//! invariants, `workflows` and `rollouts` the job runners, `disk` the
//! simulated store.

mod checks;
pub mod disk;
mod job;
mod net;
mod ops;
mod record;
pub mod rng;
mod rollouts;
pub mod shrink;
mod workflows;

use crate::engine::command::{CommandId, Millis, Outcome, Priority, SendOptions, State};
use crate::engine::frames::Forward;
use crate::engine::journal::DeviceRecord;
use crate::engine::journal::{Entry, UpEntry};
use crate::engine::queue::core::{forward_of, replay_start, strip_payloads, ReplayOutbox};
use crate::engine::queue::core::{DeliverEffect, Effects, Limits, Lookup, QueueCore, Relabel};
use crate::engine::queue::{LifecycleEvent, SendRequest};
use crate::engine::route::{Acl, AclRule, GATEWAY_TAG};
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
    /// Edge boxes below the hub, `edge-1` to `edge-N`, each with an uplink
    /// to it (0: the hub alone).
    pub edges: usize,
    /// Devices on each edge (and on each box below `edge-1`), `dev-0`, ….
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
    /// The seed the world was made from (0 for a replayed tape, whose
    /// draws, not a seed, made every choice).
    pub seed: u64,
    /// Steps of the run: for `run`, the steps asked for (even when a
    /// violation stopped it sooner); for `run_recorded` and `run_tape`,
    /// the steps taken, settling included.
    pub steps: u64,
    /// FNV-1a over every event: equal for equal seeds, bit for bit.
    pub hash: u64,
    /// What the checks found, each `step N t=MS box: what`, at most
    /// `MAX_VIOLATIONS`; the run stops stepping at the first.
    pub violations: Vec<String>,
    /// Every event as a line (step, world time in ms since the start, box,
    /// what), only with `Config::trace`.
    pub trace: Vec<String>,
    /// Replaying a tape: where in it each step began (the shrinker cuts
    /// whole steps).
    pub step_starts: Vec<usize>,
    /// How often each kind of event happened.
    pub counts: Counts,
}

/// How often each kind of event happened in a run: what the tests read to
/// see that a run exercised what it claims to, and that a replay matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sends a box acknowledged (operators', devices' and the job
    /// runners'): what the end checks hold the boxes to.
    pub sends_acked: u64,
    /// Operator and device sends a box refused (device sends the ACL
    /// refuses among them).
    pub sends_refused: u64,
    /// Times a device ran a command and answered, success or failure (a
    /// hang is not counted).
    pub runs: u64,
    /// Box crashes, those a failed write or flush caused included.
    pub crashes: u64,
    /// Writes and flushes that failed.
    pub disk_faults: u64,
    /// Links partitioned (each held down for up to 5 s).
    pub partitions: u64,
    /// Connections ended, whatever the cause (a lost message, a partition,
    /// a crash, a revocation, settling's reconnect of everything).
    pub link_drops: u64,
    /// Changes to a box's clock skew, small ones too (only those over 2 s
    /// are seen as jumps).
    pub clock_jumps: u64,
    /// Operator cancels a box took.
    pub cancels: u64,
    /// Operator retries of Failed or Dead commands a box took.
    pub retries: u64,
    /// Devices moved between `line-a` and `line-b`.
    pub relabels: u64,
    /// Device-to-device sends the ACL allowed and the box took.
    pub device_sends: u64,
    /// Devices revoked.
    pub revocations: u64,
    /// Failed writes answered by rebuilding the queue in place rather than
    /// ending the box.
    pub rebuilds: u64,
    /// Edges wiped and set up again under their old bundle.
    pub wipes: u64,
    /// Rollouts started.
    pub rollouts: u64,
    /// Rollouts that ended so, seen after settling or when a wipe took them.
    pub rollouts_completed: u64,
    /// Rollouts that ended aborted, counted the same way.
    pub rollouts_aborted: u64,
    /// Rollbacks sent by aborted rollouts.
    pub rollbacks: u64,
    /// Workflow runs started.
    pub workflows: u64,
    /// Runs that ended so, seen after settling or when a wipe took them
    /// (failed: any other end).
    pub workflows_succeeded: u64,
    /// Runs that ended any other way (failed, cancelled, timed out),
    /// counted the same way.
    pub workflows_failed: u64,
    /// Workflow steps on a tag sent (and taken) by their box.
    pub workflow_group_steps: u64,
    /// Steps spent settling after the workload stopped, until the world
    /// was quiet (at most 200,000).
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

/// The simulated world: every box (the hub first, then its edges, then the
/// boxes below `edge-1`), their disks, devices and links, the clock, the
/// one `Rng`, and the checker's books of every send.
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
    /// A world of shape `cfg` whose every choice derives from `seed`: the
    /// same seed replays bit for bit.
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

    /// What the run did and found, with `steps` as its step count.
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

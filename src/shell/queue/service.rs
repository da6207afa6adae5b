//! The queue's IO shell: a writer thread that owns the core and the store
//! and does group commit.
//!
//! Every request goes through one channel to one thread. The thread takes
//! the first request, drains whatever else is waiting (up to a bound), feeds
//! it all to the core, writes the core's journal entries as one group (one
//! sled batch, one flush), and only then answers the waiters and hands
//! deliveries to the device links. Concurrency is what makes groups large:
//! the more senders wait during one flush, the more the next flush carries.
//!
//! The other side of the channel, what the rest of the box calls, is
//! `handle` (`QueueHandle`, `DeviceSession`).

use super::handle::{AuditVerdict, BackupJob, Msg, QueueHandle, Reply};
use super::{CommandView, LifecycleEvent, QueueError, QueueStats};
use crate::engine::command::{Command, CommandId, DeviceId, Millis, Priority};
use crate::engine::journal::{Entry, ResultRecord};
use crate::engine::queue::core::JournalSource;
use crate::engine::queue::core::{
    forward_of, replay_start, strip_payloads, CoreReply, CoreRequest, Effects, Limits, Lookup,
    QueueCore, ReplayOutbox,
};
use crate::shell::store::{GroupWrite, Store, StoreError};
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};

/// How the service runs. `limits` go to the core.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// The core's bounds: the window, retries, ttl, queue and disk limits.
    pub limits: Limits,
    /// Most requests folded into one group commit.
    pub max_batch: usize,
    /// Seed for backoff jitter and ids (a simulation passes a fixed one).
    pub seed: u64,
    /// Which devices may send to which targets.
    pub acl: crate::engine::route::Acl,
    /// Keep an upstream outbox of at most this many unacknowledged
    /// telemetry entries (`None`: no uplink, no outbox).
    pub outbox_max: Option<u64>,
    /// When the store fails a write and cannot be read back (a disk that
    /// filled up under sled), exit the process with this code so the
    /// service manager restarts it; `None`: refuse requests, saying why.
    pub exit_on_store_failure: Option<i32>,
    /// The box's trust gate: its name, whether signatures are required, and
    /// whose count. Every intake through the handle passes it.
    pub gate: Arc<crate::engine::trust::Gate>,
    /// How much of the audit log is kept.
    pub audit: crate::engine::audit::Retention,
    /// `--max-artifact-disk` (`limits.max_disk` bounds artifacts too).
    pub artifact_disk: Option<u64>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            limits: Limits::default(),
            max_batch: 512,
            seed: rand::random(),
            acl: crate::engine::route::Acl::default(),
            outbox_max: None,
            exit_on_store_failure: None,
            gate: Arc::default(),
            audit: Default::default(),
            artifact_disk: None,
        }
    }
}

/// What the box hands a device link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A command for the device itself, sent as a `Command` frame.
    Command(DeliveredCommand),
    /// A command for a box below this one: to its gateway.
    Forward(Box<crate::proto::Forward>),
    /// Stop working on this command if you still are (cancelled, expired).
    Cancel(CommandId),
}

/// One command going to a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveredCommand {
    /// The command's ULID, assigned by the box at send.
    pub id: CommandId,
    /// Its priority, for the device's own ordering.
    pub priority: Priority,
    /// The sender's payload, unchanged.
    pub payload: Vec<u8>,
    /// 1-based attempt number.
    pub attempt: u32,
    /// When its ttl runs out, ms since the Unix epoch (`None`: no ttl):
    /// after it the result is no longer wanted.
    pub deadline: Option<Millis>,
    /// Operator signature over the command, when the sender signed it.
    pub signature: Option<Vec<u8>>,
}

/// Open the store's queue: replay the journal into a core and start the
/// writer thread.
pub fn open(store: Store, opts: ServiceOptions) -> Result<QueueHandle, StoreError> {
    let core = rebuild(&store, &opts)?;
    let gate = opts.gate.clone();
    let shelf = crate::shell::artifact::shelf::Shelf::new(
        store.artifacts()?,
        Arc::new(
            crate::shell::artifact::chunks::ChunkStore::open(store.dir())
                .map_err(|e| StoreError::Io {
                    dir: store.dir().join(crate::shell::artifact::chunks::DIR),
                    source: std::io::Error::other(e.to_string()),
                })?
                .with_budget(crate::engine::artifact::budget::Budget {
                    artifacts: opts.artifact_disk,
                    total: opts.limits.max_disk,
                }),
        ),
    );
    shelf.chunks().set_queue_bytes(store.size_on_disk());
    let audit = super::audit::AuditLog::load(&store, opts.audit)?;
    let uplink_epoch = store.uplink_epoch()?;
    let (tx, rx) = std_mpsc::channel();
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let (outbox_tx, outbox_rx) = tokio::sync::watch::channel(core.outbox_stats().next_seq);
    let (sessions_tx, sessions_rx) = tokio::sync::watch::channel(0u64);
    let stall = Arc::new(super::stall::Mark::default());
    let watch = match opts.exit_on_store_failure {
        Some(code) => {
            let dir = store.dir().to_path_buf();
            Some(
                super::stall::Watch::exit_on_stall(
                    stall.clone(),
                    dir.clone(),
                    opts.limits.min_free_disk,
                    code,
                )
                .map_err(|source| StoreError::Io { dir, source })?,
            )
        }
        None => None,
    };
    let mut writer = Writer {
        stall,
        _watch: watch,
        clock: Clock::new(),
        outbox: outbox_tx,
        sessions_changed: sessions_tx,
        core,
        store,
        rx,
        opts,
        sessions: HashMap::new(),
        cache: LruCache::new(NonZeroUsize::new(GROUP_CACHE).expect("non-zero")),
        events: events.clone(),
        rounds: 0,
        last_free: None,
        free_checked: std::time::Instant::now(),
        flush_buckets: [0; super::FLUSH_BUCKETS_S.len() + 1],
        flush_sum: 0.0,
        broken: None,
        last_recovery: None,
        audit,
        audit_force: false,
        chunks: shelf.chunks_arc(),
    };
    let closing = shelf.clone();
    std::thread::Builder::new()
        .name("outpost-writer".into())
        .spawn(move || {
            let done = writer.run();
            closing.close();
            // Close the database before saying so: whoever waits on shutdown
            // may reopen the data dir at once (a restart, a test).
            drop(writer);
            if let Some(done) = done {
                let _ = done.send(());
            }
        })
        .map_err(|source| StoreError::Io {
            dir: std::path::PathBuf::from("(writer thread)"),
            source,
        })?;
    Ok(QueueHandle {
        uplink_epoch,
        gate,
        shelf,
        progress: super::progress::Board::default(),
        tx,
        events,
        outbox: outbox_rx,
        sessions: sessions_rx,
    })
}

/// Lifecycle events buffered for slow watchers before they start to lag.
const EVENT_BUFFER: usize = 16 * 1024;
/// Decoded journal groups kept for delivery (payload reads).
const GROUP_CACHE: usize = 64;

fn rebuild(store: &Store, opts: &ServiceOptions) -> Result<QueueCore, StoreError> {
    let now = crate::now_millis();
    let mut core = QueueCore::new(opts.limits.clone(), opts.seed);
    core.set_acl(opts.acl.clone());
    let outbox = match opts.outbox_max {
        Some(max) => Some(ReplayOutbox {
            max,
            next_seq: store.outbox_next_seq()?,
            groups: store.outbox_groups().collect::<Result<Vec<_>, _>>()?,
        }),
        None => None,
    };
    core.reserve_live(store.live_hint());
    replay_start(
        &mut core,
        store.devices()?,
        store.cursors()?,
        store.cancel_marks()?,
        outbox,
        now,
    );
    // Timed by phase: a slow start after a power cut should say where its
    // time went.
    let started = std::time::Instant::now();
    let (mut groups, mut apply) = (0u64, std::time::Duration::ZERO);
    // Reading and decoding run on a second thread while this one applies:
    // on a 2-core box the two overlap.
    std::thread::scope(|scope| -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        scope.spawn(move || {
            for mut g in store.replay() {
                let stop = g.is_err();
                // Replay needs no payload: free them here, on the thread
                // that allocated them, not on the applying one.
                if let Ok(g) = &mut g {
                    strip_payloads(g);
                }
                // A closed channel: the applier stopped on an error.
                if tx.send(g).is_err() || stop {
                    break;
                }
            }
        });
        for g in rx {
            let g = g?;
            let t = std::time::Instant::now();
            core.replay_group(g);
            apply += t.elapsed();
            groups += 1;
        }
        Ok(())
    })?;
    // What applying did not cover: waiting for reads and decoding.
    let read = started.elapsed().saturating_sub(apply);
    let t = std::time::Instant::now();
    core.replay_last_seq(store.last_seq());
    core.finish_replay(now);
    let settle = t.elapsed();
    core.set_disk_usage(store.size_on_disk());
    if let Some(free) = store.free_space() {
        core.set_disk_free(free);
    }
    let live = core.stats().queued + core.stats().in_flight;
    tracing::info!(
        groups,
        live,
        read_ms = read.as_millis() as u64,
        replay_ms = apply.as_millis() as u64,
        settle_ms = settle.as_millis() as u64,
        "queue rebuilt from the store"
    );
    Ok(core)
}

/// The writer's journal groups: its LRU of decoded groups over the store.
struct Groups<'a> {
    store: &'a Store,
    cache: &'a mut LruCache<u64, Arc<CachedGroup>>,
}

impl Groups<'_> {
    fn group(&mut self, seq: u64) -> Option<Arc<CachedGroup>> {
        if let Some(g) = self.cache.get(&seq) {
            return Some(g.clone());
        }
        match self.store.read_journal(seq) {
            Ok(Some(entries)) => {
                let g = Arc::new(CachedGroup::new(entries));
                self.cache.put(seq, g.clone());
                Some(g)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!("reading journal group {seq}: {e}");
                None
            }
        }
    }
}

impl JournalSource for Groups<'_> {
    fn entries(&mut self, seq: u64) -> Option<Vec<Entry>> {
        self.group(seq).map(|g| g.entries.clone())
    }

    fn command(&mut self, seq: u64, id: CommandId) -> Option<Command> {
        self.group(seq)?.command(id)
    }
}

/// A decoded journal group with an index by command id.
struct CachedGroup {
    entries: Vec<Entry>,
    /// id → (entry, child of a broadcast entry).
    index: HashMap<CommandId, (usize, Option<usize>)>,
}

impl CachedGroup {
    fn new(entries: Vec<Entry>) -> Self {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            match e {
                Entry::Enqueued(e) => {
                    index.insert(e.command.id, (i, None));
                }
                Entry::Broadcast(b) => {
                    index.insert(b.command.id, (i, None));
                    for (j, c) in b.children.iter().enumerate() {
                        index.insert(c.id, (i, Some(j)));
                    }
                }
                Entry::Requeued { .. } => {}
            }
        }
        CachedGroup { entries, index }
    }

    /// The command with this id (a broadcast's child runs its parent's
    /// command under its own id).
    fn command(&self, id: CommandId) -> Option<Command> {
        let &(i, child) = self.index.get(&id)?;
        match (self.entries.get(i)?, child) {
            (Entry::Enqueued(e), _) => Some(e.command.clone()),
            (Entry::Broadcast(b), Some(j)) => Some(b.child_command(j)),
            (Entry::Broadcast(b), None) => Some(b.command.clone()),
            (Entry::Requeued { .. }, _) => None,
        }
    }
}

/// A request answered once the round it joined is durable.
// Short-lived (one round), and most are `Reply`: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Reply(Reply<CoreReply>, Result<CoreReply, QueueError>),
    Show(Reply<CoreReply>, CommandId),
    Unit(Reply<()>, Result<(), QueueError>),
    Token(Reply<u64>, Result<u64, QueueError>),
    AuditRead(
        Reply<Vec<crate::engine::audit::View>>,
        Option<u64>,
        Option<u64>,
    ),
    AuditVerify(Reply<AuditVerdict>),
    Backup(Box<BackupJob>),
}

/// The wall clock as the core sees it, watched for jumps: the wall clock
/// is compared with the monotonic one at each read, and a step of more than
/// `JUMP_MS` between them is a jump (NTP stepping a box that booted with no
/// real-time clock, a date set by hand).
struct Clock {
    wall: Millis,
    mono: std::time::Instant,
}

const JUMP_MS: i64 = 2_000;

impl Clock {
    fn new() -> Self {
        Clock {
            wall: crate::now_millis(),
            mono: std::time::Instant::now(),
        }
    }

    /// Now, and the jump since the last read, if there was one.
    fn read(&mut self) -> (Millis, Option<i64>) {
        let (wall, mono) = (crate::now_millis(), std::time::Instant::now());
        let expected = self.wall as i64 + mono.duration_since(self.mono).as_millis() as i64;
        let delta = wall as i64 - expected;
        self.wall = wall;
        self.mono = mono;
        (wall, (delta.abs() > JUMP_MS).then_some(delta))
    }
}

struct Writer {
    /// Marks each commit for the stall watch (see `stall.rs`).
    stall: Arc<super::stall::Mark>,
    /// Stops with the writer.
    _watch: Option<super::stall::Watch>,
    /// The chunk store, told the database's size for `--max-disk`.
    chunks: Arc<crate::shell::artifact::chunks::ChunkStore>,
    clock: Clock,
    outbox: tokio::sync::watch::Sender<u64>,
    sessions_changed: tokio::sync::watch::Sender<u64>,
    core: QueueCore,
    store: Store,
    rx: std_mpsc::Receiver<Msg>,
    opts: ServiceOptions,
    sessions: HashMap<DeviceId, (u64, mpsc::UnboundedSender<Delivery>)>,
    cache: LruCache<u64, Arc<CachedGroup>>,
    events: broadcast::Sender<LifecycleEvent>,
    rounds: u64,
    /// Free bytes on the data dir's filesystem at the last look, and when.
    last_free: Option<u64>,
    free_checked: std::time::Instant,
    /// Flush latency histogram (see `FLUSH_BUCKETS_S`), and its sum.
    flush_buckets: [u64; super::FLUSH_BUCKETS_S.len() + 1],
    flush_sum: f64,
    /// Set when the store failed and could not be re-read: every request
    /// gets this error until the box is restarted.
    broken: Option<String>,
    /// When the store was last reopened after a failure.
    last_recovery: Option<std::time::Instant>,
    audit: super::audit::AuditLog,
    /// The next round writes every waiting audit note (a reader waits, or
    /// the writer stops).
    audit_force: bool,
}

/// How often a broken store is reopened while requests keep coming.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(2);
/// How old a reading of free disk space may be while far from the reserve.
const FREE_SPACE_EVERY: Duration = Duration::from_millis(100);

impl Writer {
    /// Serve until shutdown (returns its waiter) or until every handle is
    /// gone (returns None).
    fn run(&mut self) -> Option<oneshot::Sender<()>> {
        // Replay may have ended commands (ttl ran out while the box was
        // down): write and publish that now, not at the next request. A
        // round with nothing in it writes nothing.
        self.round(crate::now_millis(), Vec::new());
        loop {
            // Sleep until a request arrives or the core's next timer: an idle
            // box wakes for nothing.
            let core_wait = self
                .core
                .next_deadline()
                .map(|due| Duration::from_millis(due.saturating_sub(crate::now_millis())));
            let wait = match (core_wait, self.audit.due_in()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let first = match wait {
                Some(wait) => match self.rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                    Ok(m) => Some(m),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return None,
                },
                None => match self.rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return None,
                },
            };
            let (now, jump) = self.clock.read();
            if let Some(delta) = jump {
                tracing::warn!(
                    delta_ms = delta,
                    "the wall clock jumped; ttls and retry backoffs keep what was left of them"
                );
                self.core.clock_jumped(delta, now);
            }
            let mut pending = Vec::new();
            let mut shutdown = None;
            if let Some(m) = first {
                self.handle(m, now, &mut pending, &mut shutdown);
            }
            while pending.len() < self.opts.max_batch && shutdown.is_none() {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m, now, &mut pending, &mut shutdown),
                    Err(_) => break,
                }
            }
            if shutdown.is_some() {
                self.audit_force = true;
            }
            self.round(now, pending);
            if let Some(done) = shutdown {
                if let Err(e) = self.store.set_live_hint(self.core.live_count() as u64) {
                    tracing::warn!("recording the live count at shutdown: {e}");
                }
                if let Err(e) = self.store.flush() {
                    tracing::error!("final flush at shutdown: {e}");
                }
                tracing::debug!("queue writer stopped");
                return Some(done);
            }
        }
    }

    fn handle(
        &mut self,
        m: Msg,
        now: Millis,
        pending: &mut Vec<Pending>,
        shutdown: &mut Option<oneshot::Sender<()>>,
    ) {
        if self.broken.is_some()
            && self
                .last_recovery
                .is_none_or(|t| t.elapsed() >= RECOVERY_INTERVAL)
        {
            // Try again: the disk may have room now.
            self.recover();
        }
        if let Some(why) = &self.broken {
            let e = QueueError::Storage(why.clone());
            match m {
                Msg::Core(_, r) => pending.push(Pending::Reply(r, Err(e))),
                Msg::Ack { reply, .. } => pending.push(Pending::Unit(reply, Err(e))),
                Msg::Connect { reply, .. } => pending.push(Pending::Token(reply, Err(e))),
                Msg::Disconnect { .. } => {}
                Msg::Shutdown(done) => *shutdown = Some(done),
                Msg::Audit(note) => self.audit.push(note),
                Msg::AuditRead { reply, .. } => {
                    let _ = reply.send(Err(e));
                }
                Msg::AuditVerify(reply) => {
                    let _ = reply.send(Err(e));
                }
                Msg::Backup(job) => {
                    let _ = job.reply.send(Err(e));
                }
            }
            return;
        }
        match m {
            Msg::Core(req, reply) => {
                // Intake from a device or a hub is decided here, so its entry
                // joins this very round's batch.
                let intake = super::audit::intake_of(&req);
                let core = &mut self.core;
                let result = match req {
                    CoreRequest::Send(r) => core.send(r, now).map(CoreReply::Receipt),
                    CoreRequest::Trust(edit) => self.edit_trust(&edit, now),
                    CoreRequest::Show(id) => {
                        // Resolved after the commit: its result may be in
                        // this very round.
                        pending.push(Pending::Show(reply, id));
                        return;
                    }
                    CoreRequest::List { device } => core.list(&device).map(CoreReply::Views),
                    CoreRequest::Cancel(id) => core.cancel(id, now).map(CoreReply::View),
                    CoreRequest::HubCancel(id) => core.cancel_from_hub(id, now).map(CoreReply::View),
                    CoreRequest::Retry(id) => self.retry(id, now),
                    CoreRequest::Stats => Ok(CoreReply::Stats(QueueStats::default())),
                    CoreRequest::Enroll(rec) => {
                        core.enroll(rec, now);
                        Ok(CoreReply::Done)
                    }
                    CoreRequest::EnrollNew { record, force } => core
                        .enroll_new(record, force, now)
                        .map(|()| CoreReply::Done),
                    CoreRequest::Revoke(dev) => core.revoke(&dev, now).map(CoreReply::Device),
                    CoreRequest::Devices => Ok(CoreReply::Devices(core.devices())),
                    CoreRequest::Relabel(r) => core.relabel(r, now).map(CoreReply::Device),
                    CoreRequest::DeviceSend { from, id, req } => core
                        .device_send_as(&from, id, req, now)
                        .map(CoreReply::Receipt),
                    CoreRequest::SendAs { id, req } => {
                        core.send_as(Some(id), req, now).map(CoreReply::Receipt)
                    }
                    CoreRequest::Handed { gateway, id } => {
                        core.handed(&gateway, id, now).map(|()| CoreReply::Done)
                    }
                    CoreRequest::Up { edge, entries } => {
                        core.up(&edge, entries, now).map(CoreReply::Cursor)
                    }
                    CoreRequest::Event {
                        device,
                        payload,
                        at,
                    } => {
                        core.device_event(&device, payload, at);
                        Ok(CoreReply::Done)
                    }
                    CoreRequest::UpAck(seq) => {
                        core.up_ack(seq);
                        Ok(CoreReply::Done)
                    }
                    CoreRequest::UpFrom { edge, epoch } => {
                        core.up_from(&edge, epoch, now).map(|again| {
                            if let Some(n) = again {
                                tracing::warn!(
                                    %edge,
                                    epoch = format_args!("{epoch:016x}"),
                                    forwarded_again = n,
                                    "this edge came back with a new database (wiped or restored): its outbox is applied from the start, and the commands handed to its old database go down again"
                                );
                            }
                            CoreReply::Done
                        })
                    }
                    CoreRequest::PresenceSnapshot => {
                        core.presence_snapshot();
                        Ok(CoreReply::Done)
                    }
                    CoreRequest::OutboxRead { after, max } => self.read_outbox(after, max),
                    CoreRequest::OutboxStats => Ok(CoreReply::OutboxStats(core.outbox_stats())),
                    CoreRequest::Finished(rec) => {
                        core.record_finished(*rec, now);
                        Ok(CoreReply::Done)
                    }
                };
                if let Some(i) = intake {
                    self.record(i.note(&result, now));
                }
                pending.push(Pending::Reply(reply, result));
            }
            Msg::Ack {
                device,
                token,
                id,
                attempt,
                outcome,
                reply,
            } => {
                let result = if self.sessions.get(&device).map(|s| s.0) == Some(token) {
                    self.core.ack_attempt(&device, id, attempt, outcome, now)
                } else {
                    // An ack on a replaced session: the command went back to
                    // the queue when that session ended.
                    Err(QueueError::NotInFlight { id, device })
                };
                pending.push(Pending::Unit(reply, result));
            }
            Msg::Connect {
                device,
                window,
                offered,
                deliveries,
                reply,
            } => {
                let result = self.core.connect_offering(&device, window, offered, now);
                if let Ok(token) = result {
                    self.sessions.insert(device, (token, deliveries));
                    self.sessions_changed.send_modify(|n| *n += 1);
                }
                pending.push(Pending::Token(reply, result));
            }
            Msg::Disconnect { device, token } => {
                if self.sessions.get(&device).map(|s| s.0) == Some(token) {
                    self.sessions.remove(&device);
                    self.core.disconnect(&device, token, now);
                    self.sessions_changed.send_modify(|n| *n += 1);
                }
            }
            Msg::Shutdown(done) => *shutdown = Some(done),
            Msg::Audit(note) => self.record(note),
            Msg::AuditRead {
                since,
                limit,
                reply,
            } => {
                self.audit_force = true;
                pending.push(Pending::AuditRead(reply, since, limit));
            }
            Msg::AuditVerify(reply) => {
                self.audit_force = true;
                pending.push(Pending::AuditVerify(reply));
            }
            // Answered after this round's commit, before the next round:
            // the snapshot is the state of exactly one committed group.
            Msg::Backup(job) => pending.push(Pending::Backup(job)),
        }
    }

    /// An entry of this box's log: for its audit tree and, on an edge, for
    /// the outbox, sealed into the same round.
    fn record(&mut self, note: crate::engine::audit::Note) {
        self.core.audit_up(note.clone());
        self.audit.push(note);
    }

    fn retry(&mut self, id: CommandId, now: Millis) -> Result<CoreReply, QueueError> {
        let seq = match self.core.lookup(id) {
            Lookup::Finished { seq, .. } => seq,
            Lookup::Live(v) => {
                return Err(QueueError::InvalidTransition {
                    id,
                    state: v.state,
                    action: "retry (it has not ended)".into(),
                })
            }
            Lookup::NotFound => return Err(QueueError::NotFound(id)),
        };
        let record = self.read_result(seq, id)?.ok_or_else(|| {
            QueueError::BadRequest(format!(
                "command {id} ended a moment ago; retry again in a second"
            ))
        })?;
        self.core.retry(record, now).map(CoreReply::View)
    }

    /// Outbox records after `after`, at most about `max` (whole groups),
    /// read from the store: the outbox lives on disk, not in memory.
    fn read_outbox(&self, after: u64, max: usize) -> Result<CoreReply, QueueError> {
        let mut out = Vec::new();
        for g in self.core.outbox_groups_after(after) {
            if out.len() >= max {
                break;
            }
            let entries = self
                .store
                .read_outbox(g)
                .map_err(|e| QueueError::Storage(e.to_string()))?
                .unwrap_or_default();
            out.extend(entries.into_iter().filter(|e| e.seq > after));
        }
        Ok(CoreReply::Outbox(out))
    }

    fn read_result(&self, seq: u64, id: CommandId) -> Result<Option<ResultRecord>, QueueError> {
        let records = self
            .store
            .read_results(seq)
            .map_err(|e| QueueError::Storage(e.to_string()))?;
        Ok(records.and_then(|rs| rs.into_iter().rev().find(|r| r.id == id)))
    }

    fn group(&mut self, seq: u64) -> Option<Arc<CachedGroup>> {
        Groups {
            store: &self.store,
            cache: &mut self.cache,
        }
        .group(seq)
    }

    /// One group commit: seal the round, write it durably, then act.
    fn round(&mut self, now: Millis, pending: Vec<Pending>) {
        self.core.tick(now);
        let round = self.core.round(
            now,
            &mut Groups {
                store: &self.store,
                cache: &mut self.cache,
            },
        );
        if !round.missing_payloads.is_empty() {
            tracing::warn!(
                commands = ?round.missing_payloads,
                "ended commands whose payload could not be read back: `retry` cannot requeue them"
            );
        }
        let (write, mut effects) = (round.write, round.effects);
        for note in effects.audit.drain(..) {
            self.audit.push(note);
        }
        let riding = !write.is_empty() || !effects.device_writes.is_empty();
        let force = std::mem::take(&mut self.audit_force);
        let audit = match self.audit.prepare(&self.store, riding, force, now) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("group commit failed: {e}; reloading the queue from disk");
                self.fail_round(pending, e);
                return;
            }
        };
        let committed = self.commit(&write, &effects, audit.as_ref().map(|a| &a.0));
        if let Err(e) = committed {
            tracing::error!("group commit failed: {e}; reloading the queue from disk");
            self.fail_round(pending, e);
            return;
        }
        if let Some((w, tip)) = audit {
            self.audit.committed(&self.store, &w, tip);
        }
        if !write.journal.is_empty() {
            let seq = write.seq;
            self.cache
                .put(seq, Arc::new(CachedGroup::new(write.journal)));
        }
        for seq in &write.drop_journal {
            self.cache.pop(seq);
        }
        if !write.outbox.is_empty() {
            let next = self.core.outbox_stats().next_seq;
            self.outbox.send_replace(next);
        }
        self.rounds += 1;
        if self.core.limits().max_disk.is_some() || self.rounds % 256 == 0 {
            // Artifacts share --max-disk with the queue: each side checks
            // the sum against it.
            let queue = self.store.size_on_disk();
            self.chunks.set_queue_bytes(queue);
            self.core
                .set_disk_usage(queue.saturating_add(self.chunks.bytes()));
        }
        // statfs each round is measurable at tens of thousands of rounds a
        // second; far from the reserve, a reading 100 ms old is as good.
        let near = self
            .last_free
            .is_none_or(|f| f < 4 * self.core.limits().min_free_disk);
        if near || self.free_checked.elapsed() >= FREE_SPACE_EVERY {
            self.free_checked = std::time::Instant::now();
            self.last_free = self.store.free_space();
            if let Some(free) = self.last_free {
                self.core.set_disk_free(free);
            }
        }
        self.dispatch(effects);
        for p in pending {
            self.answer(p);
        }
    }

    /// A trust edit: stored durably before the gate uses it, so a key
    /// answered "added" survives a crash, and one answered "removed" never
    /// comes back.
    fn edit_trust(
        &mut self,
        edit: &crate::engine::trust::TrustEdit,
        now: Millis,
    ) -> Result<CoreReply, QueueError> {
        let gate = &self.opts.gate;
        let mut set = (*gate.set()).clone();
        let key = set
            .apply(edit, now)
            .map_err(|e| QueueError::BadRequest(e.to_string()))?;
        self.store
            .put_trust(&set)
            .map_err(|e| QueueError::Storage(e.to_string()))?;
        gate.replace(set);
        Ok(CoreReply::Trusted(key))
    }

    fn commit(
        &mut self,
        write: &GroupWrite,
        effects: &Effects,
        audit: Option<&crate::engine::audit::Write>,
    ) -> Result<(), StoreError> {
        self.stall.begin();
        let r = self.write_and_flush(write, effects, audit);
        self.stall.end();
        r
    }

    fn write_and_flush(
        &mut self,
        write: &GroupWrite,
        effects: &Effects,
        audit: Option<&crate::engine::audit::Write>,
    ) -> Result<(), StoreError> {
        if let Some(a) = audit {
            // Before the round's own batch: see `Store::audit_write`.
            self.store.audit_write(a)?;
        }
        for rec in &effects.device_touches {
            self.store.touch_device(rec)?;
        }
        for rec in &effects.device_writes {
            self.store.touch_device(rec)?;
        }
        if !write.is_empty() {
            let t = std::time::Instant::now();
            self.store.commit(write)?;
            let s = t.elapsed().as_secs_f64();
            let i = super::FLUSH_BUCKETS_S
                .iter()
                .position(|&b| s <= b)
                .unwrap_or(super::FLUSH_BUCKETS_S.len());
            self.flush_buckets[i] += 1;
            self.flush_sum += s;
        } else if !effects.device_writes.is_empty() || audit.is_some() {
            self.store.flush()?;
        }
        Ok(())
    }

    /// The round's records did not reach the disk: nobody is told
    /// "accepted", and the in-memory state is rebuilt from what is on disk so
    /// the two cannot drift apart. Devices reconnect and get what they had.
    fn fail_round(&mut self, pending: Vec<Pending>, e: StoreError) {
        let err = match &e {
            StoreError::DiskFull { .. } => QueueError::NoSpace {
                free: self.store.free_space().unwrap_or(0),
                reserve: self.core.limits().min_free_disk,
            },
            other => QueueError::Storage(other.to_string()),
        };
        for p in pending {
            match p {
                Pending::Reply(r, _) | Pending::Show(r, _) => {
                    let _ = r.send(Err(err.clone()));
                }
                Pending::Unit(r, _) => {
                    let _ = r.send(Err(err.clone()));
                }
                Pending::Token(r, _) => {
                    let _ = r.send(Err(err.clone()));
                }
                Pending::AuditRead(r, ..) => {
                    let _ = r.send(Err(err.clone()));
                }
                Pending::AuditVerify(r) => {
                    let _ = r.send(Err(err.clone()));
                }
                Pending::Backup(job) => {
                    let _ = job.reply.send(Err(err.clone()));
                }
            }
        }
        if let Some(code) = self.opts.exit_on_store_failure {
            // sled fails every write after one that failed and cannot be
            // closed then: only a fresh process can go on. Nothing answered
            // "accepted" is lost — it was flushed before it was answered.
            tracing::error!(
                "the store failed a write ({e}); exiting with code {code} so that the service manager restarts the box on a reopened database"
            );
            eprintln!("outpost: the store failed a write ({e}); exiting with code {code} to be restarted (nothing acknowledged is lost)");
            std::process::exit(code);
        }
        self.sessions.clear();
        self.cache.clear();
        self.recover();
    }

    /// Rebuild the core from what is on disk. Until that works, every
    /// request is refused with the reason (a retry every few seconds, as
    /// requests come). An embedded queue ends here; `outpost serve` exits
    /// before (see `fail_round`).
    fn recover(&mut self) {
        self.last_recovery = Some(std::time::Instant::now());
        match rebuild(&self.store, &self.opts) {
            Ok(core) => {
                if self.broken.take().is_some() {
                    tracing::info!("the store is readable again; serving");
                }
                self.core = core;
                self.audit.reload(&self.store);
            }
            Err(e) => {
                if self.broken.is_none() {
                    tracing::error!(
                        "cannot re-read the store: {e}; refusing requests until it can"
                    );
                }
                self.broken = Some(e.to_string());
            }
        }
    }

    fn dispatch(&mut self, effects: Effects) {
        for d in effects.deliveries {
            let Some((token, _)) = self.sessions.get(&d.device) else {
                continue;
            };
            if *token != d.session {
                continue;
            }
            let command = self
                .group(d.group)
                .and_then(|g| g.command(d.id))
                .or_else(|| {
                    let seq = self.core.payload_group(d.id)?;
                    self.group(seq).and_then(|g| g.command(d.id))
                });
            let Some(c) = command else {
                tracing::error!("command {} has no journal record to deliver from", d.id);
                continue;
            };
            let delivery = match forward_of(&d, c, crate::now_millis()) {
                Ok(f) => Delivery::Forward(Box::new(f)),
                Err(c) => Delivery::Command(DeliveredCommand {
                    id: d.id,
                    priority: d.priority,
                    payload: c.payload,
                    attempt: d.attempt,
                    deadline: d.deadline,
                    signature: c.signature,
                }),
            };
            if let Some((_, tx)) = self.sessions.get(&d.device) {
                let _ = tx.send(delivery);
            }
        }
        for (device, id) in effects.cancels {
            if let Some((_, tx)) = self.sessions.get(&device) {
                let _ = tx.send(Delivery::Cancel(id));
            }
        }
        for device in effects.close_sessions {
            // Dropping the sender closes the link's receiver: it hangs up.
            self.sessions.remove(&device);
        }
        for ev in effects.events {
            let _ = self.events.send(ev);
        }
    }

    fn answer(&mut self, p: Pending) {
        match p {
            Pending::Reply(r, result) => {
                let result = match result {
                    Ok(CoreReply::Stats(_)) => Ok(CoreReply::Stats(QueueStats {
                        flush_buckets: self.flush_buckets.to_vec(),
                        flush_seconds_sum: self.flush_sum,
                        ..self.core.stats()
                    })),
                    other => other,
                };
                let _ = r.send(result);
            }
            Pending::Show(r, id) => {
                let result = match self.core.lookup(id) {
                    Lookup::Live(v) => Ok(CoreReply::View(*v)),
                    Lookup::NotFound => Err(QueueError::NotFound(id)),
                    Lookup::Finished { seq, .. } => match self.read_result(seq, id) {
                        Ok(Some(rec)) => Ok(CoreReply::View(CommandView::from(rec))),
                        Ok(None) => Err(QueueError::NotFound(id)),
                        Err(e) => Err(e),
                    },
                };
                let _ = r.send(result);
            }
            Pending::Unit(r, result) => {
                let _ = r.send(result);
            }
            Pending::Token(r, result) => {
                let _ = r.send(result);
            }
            Pending::AuditRead(r, since, limit) => {
                let views = super::audit::read(&self.store, since, limit)
                    .map_err(|e| QueueError::Storage(e.to_string()));
                let _ = r.send(views);
            }
            Pending::AuditVerify(r) => {
                let verdict = super::audit::verify(&self.store)
                    .map_err(|e| QueueError::Storage(e.to_string()));
                let _ = r.send(verdict);
            }
            Pending::Backup(job) => {
                // The queue waits meanwhile: sled's iterators are no
                // snapshot, so nothing may commit until the walk is done.
                // The reader is bounded by a timeout per piece (the admin
                // side), so a stalled reader cannot hold the box for long.
                let t = std::time::Instant::now();
                let BackupJob { pieces, reply } = *job;
                let mut send = |p: Vec<u8>| pieces.blocking_send(p).is_ok();
                let mut out = crate::shell::backup::Pieces::new(&mut send);
                let r = crate::shell::backup::snapshot_trees(
                    &self.store,
                    self.opts.gate.name(),
                    &mut out,
                )
                .map_err(|e| QueueError::Storage(e.to_string()));
                if let Ok(i) = &r {
                    tracing::info!(
                        last_group = i.last_group,
                        keys = i.keys,
                        ms = t.elapsed().as_millis() as u64,
                        "backup: the store's snapshot is taken; the queue goes on"
                    );
                }
                let _ = reply.send(r);
            }
        }
    }
}

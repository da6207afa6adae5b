//! The queue's vocabulary, shared by the engine (`core`) and its shells:
//! requests, receipts, views, lifecycle events, statistics, and the one
//! error type with its one classification. Plain data: no IO.

use crate::engine::command::{CommandId, DeviceId, Millis, Outcome, Priority, SendOptions, State};
use serde::{Deserialize, Serialize};

/// Why the queue refused or could not do something. Every variant says what
/// happened and what to do next; the CLI maps them to exit codes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum QueueError {
    /// No live command has this id and no result is kept for it: unknown,
    /// or finished and since dropped by the results retention.
    #[error("no command {0} (it may have finished longer ago than the result retention)")]
    NotFound(CommandId),
    /// The target, or the device a request names, is not enrolled here.
    #[error("no device `{0}` is enrolled; enroll it with `outpost enroll {0}`")]
    UnknownDevice(DeviceId),
    /// The target device is enrolled but revoked: it takes no commands until
    /// it is enrolled again.
    #[error("device `{0}` is revoked and takes no commands; enroll it again to re-admit it")]
    Revoked(DeviceId),
    /// The box holds `max_queued` live commands and none of a lower priority
    /// to shed for this one (a broadcast is refused whole if its children
    /// would not all fit).
    #[error("queue full: {queued} commands queued (limit {limit}); wait for devices to drain it, cancel some, or raise --max-queued")]
    QueueFull {
        /// Live commands when it was refused.
        queued: u64,
        /// The box's `max_queued`.
        limit: u64,
    },
    /// The store has reached `max_disk` and no lower-priority command could
    /// be shed to make room.
    #[error("disk budget used up: {used} bytes of {limit}; wait for commands to finish or raise --max-disk")]
    DiskFull {
        /// Bytes the store occupies, as last measured after a write.
        used: u64,
        /// The box's `max_disk`, in bytes.
        limit: u64,
    },
    /// The command's state does not allow the action asked (a retry of a
    /// command that succeeded, a cancel of one that ended).
    #[error("command {id} is {state}: cannot {action} it")]
    InvalidTransition {
        /// The command asked about.
        id: CommandId,
        /// Its state when asked.
        state: State,
        /// What was asked, worded to follow "cannot", with any hint in
        /// parentheses: `retry (its payload was not kept)`.
        action: String,
    },
    /// An ack for a command that is not in flight on the acking device:
    /// already ended, requeued, on another device, or never sent to it.
    #[error(
        "command {id} is not in flight on device `{device}` (stale, duplicate or foreign ack)"
    )]
    NotInFlight {
        /// The command the ack names.
        id: CommandId,
        /// The device that sent the ack.
        device: DeviceId,
    },
    /// An ack that names an earlier attempt than the one in flight: a late
    /// answer to a delivery since requeued. It changes nothing.
    #[error("the ack of command {id} answers attempt {acked}, but attempt {current} is in flight: a late answer to an earlier delivery, ignored (the device answers the current one too)")]
    StaleAttempt {
        /// The command the ack names.
        id: CommandId,
        /// The attempt number the ack answers (1-based).
        acked: u32,
        /// The attempt number in flight now.
        current: u32,
    },
    /// A send's `after` names a command that is neither live nor among the
    /// kept results.
    #[error("`after` names command {0}, which the box does not know")]
    UnknownDependency(CommandId),
    /// The request is malformed or over a limit (a bad target, a payload
    /// over `max_payload`); the text says which and how to fix it.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The store failed (the text is its error). The request may or may not
    /// have reached the disk: see `is_unsure`.
    #[error("storage error: {0}")]
    Storage(String),
    /// The writer is stopping, or has stopped, and takes no more requests.
    #[error("the queue is shutting down; retry once the box is back")]
    ShuttingDown,
    /// The data dir's filesystem is below the `min_free_disk` reserve (or a
    /// write hit a full disk): new commands are refused, queued ones still
    /// run.
    #[error("the disk holding the data dir has {free} bytes free, under the reserve of {reserve}: new commands are refused (what is queued is still delivered and acked) until space returns; free space there or lower --min-free-disk")]
    NoSpace {
        /// Bytes free on the data dir's filesystem, as last measured (0 when
        /// it could not be read).
        free: u64,
        /// The box's `min_free_disk`, in bytes.
        reserve: u64,
    },
    /// The target parses but leads nowhere: no device with the tag or
    /// capability, a gateway addressed as a device, or an edge path through
    /// a device that is not a gateway. The text says which and what to do.
    #[error("no route: {0}")]
    NoRoute(String),
    /// The ACL does not let this device send to this target (default deny),
    /// or a device that is not a gateway sent outbox records.
    #[error("device `{device}` may not send to `{target}`: no [[acl]] rule in the box's config allows it")]
    Forbidden {
        /// The sending device.
        device: DeviceId,
        /// The target it asked for, or what else it tried to do.
        target: String,
    },
    /// The idempotency key was already used by this origin for a command
    /// with another target or payload.
    #[error("idempotency key `{key}` was used for command {id} with another {what}; a key names one command: use a new key for a new command (or resend the first one unchanged)")]
    KeyReused {
        /// The key as the sender gave it.
        key: String,
        /// The command the key already names.
        id: CommandId,
        /// What differs from that command: `target` or `payload`.
        what: String,
    },
    /// An enrol without `--force` of a device that already has a record.
    #[error("{}", already_enrolled(.id, *.revoked))]
    AlreadyEnrolled {
        /// The device asked for.
        id: DeviceId,
        /// Whether its record is revoked (the message differs: `--force`
        /// re-admits it rather than replacing a working bundle).
        revoked: bool,
    },
    /// A signed command that does not verify, or an unsigned one where
    /// signatures are required (the trust set's verdict, step named).
    #[error("refused: {0}")]
    Untrusted(crate::engine::trust::Refusal),
    /// A command or a removal names an artifact the box's shelf does not
    /// hold (the artifact as it was named: `name@version` or a digest).
    #[error("no artifact {0} on this box; `outpost artifact list` shows what it holds, `outpost artifact add FILE` adds one")]
    UnknownArtifact(String),
    /// A removal of an artifact that a live command still names.
    #[error("artifact {artifact} is referenced by command {by}, which has not ended; wait for it, or cancel it first")]
    ArtifactInUse {
        /// The artifact as the removal named it.
        artifact: String,
        /// A live command that names it.
        by: CommandId,
    },
    /// Adding the artifact's chunks would take the chunk store over its
    /// budget.
    #[error(transparent)]
    ArtifactBudget(#[from] crate::engine::artifact::budget::OverBudget),
    /// The artifact is being removed: a send that names it, or a second
    /// removal, waits until the removal has settled.
    #[error("artifact {0} is being removed; send again once `outpost artifact show` says whether it is still there")]
    ArtifactRetiring(String),
}

fn already_enrolled(id: &str, revoked: bool) -> String {
    if revoked {
        format!("device `{id}` is already enrolled, and revoked; `outpost enroll {id} --force` re-admits it with a new bundle (its revoked bundle stays locked out)")
    } else {
        format!("device `{id}` is already enrolled; `outpost enroll {id} --force` issues a new bundle and locks out the old one (every copy of its current bundle stops working)")
    }
}

/// What kind of failure a [`QueueError`] is: the one classification that
/// every shell maps from (the CLI's exit code, the admin answer, the
/// dashboard's HTTP status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// No such command, device or route (exit 3, HTTP 404).
    NotFound,
    /// Refused by policy: full, no space, revoked, forbidden, a reused key
    /// (exit 5, HTTP 409).
    Refused,
    /// The request cannot be done as asked (exit 1, HTTP 400).
    BadRequest,
    /// The box is stopping or its store failed (exit 1, HTTP 503).
    Unavailable,
}

impl QueueError {
    /// This error's class. Exhaustive: a new variant must be classed.
    pub fn class(&self) -> ErrorClass {
        use QueueError as E;
        match self {
            E::NotFound(_) | E::UnknownDevice(_) | E::NoRoute(_) | E::UnknownArtifact(_) => {
                ErrorClass::NotFound
            }
            E::Revoked(_)
            | E::QueueFull { .. }
            | E::DiskFull { .. }
            | E::NoSpace { .. }
            | E::Forbidden { .. }
            | E::KeyReused { .. }
            | E::AlreadyEnrolled { .. }
            | E::ArtifactInUse { .. }
            | E::ArtifactBudget(_)
            | E::ArtifactRetiring(_)
            | E::Untrusted(_) => ErrorClass::Refused,
            E::ShuttingDown | E::Storage(_) => ErrorClass::Unavailable,
            E::InvalidTransition { .. }
            | E::NotInFlight { .. }
            | E::StaleAttempt { .. }
            | E::UnknownDependency(_)
            | E::BadRequest(_) => ErrorClass::BadRequest,
        }
    }

    /// A refusal by policy (exit code 5 in the CLI), as opposed to a fault.
    pub fn is_refusal(&self) -> bool {
        self.class() == ErrorClass::Refused
    }

    /// Whether the box could not say if it took the request: its store
    /// failed under the write (the batch may have reached the disk, as a
    /// duplicate resent after a restart always has), or it is stopping.
    /// A sender that named its command's id sends it again under that id
    /// rather than take the command as refused (the workflow runner once
    /// failed a step whose command then ran: the simulation found it).
    pub fn is_unsure(&self) -> bool {
        self.class() == ErrorClass::Unavailable
    }

    /// Whether the same request may be taken later: the box is full, short
    /// of space, its store failed, or it is stopping. An uplink hands such
    /// a command back to be retried; any other error is final.
    pub fn is_passing(&self) -> bool {
        use QueueError as E;
        match self {
            E::QueueFull { .. }
            | E::DiskFull { .. }
            | E::NoSpace { .. }
            | E::ArtifactBudget(_)
            | E::ArtifactRetiring(_)
            | E::Storage(_)
            | E::ShuttingDown => true,
            E::NotFound(_)
            | E::UnknownDevice(_)
            | E::Revoked(_)
            | E::InvalidTransition { .. }
            | E::NotInFlight { .. }
            | E::StaleAttempt { .. }
            | E::UnknownDependency(_)
            | E::BadRequest(_)
            | E::NoRoute(_)
            | E::Forbidden { .. }
            | E::KeyReused { .. }
            | E::AlreadyEnrolled { .. }
            | E::UnknownArtifact(_)
            | E::ArtifactInUse { .. }
            | E::Untrusted(_) => false,
        }
    }
}

/// A new command, as a sender hands it in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    /// Where it goes, as the sender wrote it: `dev-7`, `tag:line-3`,
    /// `cap:camera`, or `edge-1/…` through a box below.
    pub target: String,
    /// The bytes for the device, opaque to the box (at most `max_payload`).
    pub payload: Vec<u8>,
    /// Priority, ttl, attempts, idempotency key, `after`, `not_before`.
    pub opts: SendOptions,
    /// `cli`, `upstream`, or the sending device's id.
    pub origin: String,
    /// The operator's signed envelope over the command, as received
    /// (`None`: unsigned). A signed command is queued under the envelope's
    /// id.
    pub signature: Option<Vec<u8>>,
}

/// The answer to a durable send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReceipt {
    /// The command's ULID: assigned by the box at send, or the sender's
    /// (a signed envelope's, a hub's).
    pub id: CommandId,
    /// Its state when answered: `Queued` for a new command (`Dead` at once
    /// when its `after` already ended badly), whatever it has reached for a
    /// duplicate.
    pub state: State,
    /// The idempotency key matched an earlier command: `id` is that one's.
    pub duplicate: bool,
}

/// Everything the box knows about one command, live or finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandView {
    /// The command's ULID.
    pub id: CommandId,
    /// The target as the sender wrote it (a device id, `tag:…`, `cap:…`,
    /// `edge-1/…`).
    pub target: String,
    /// The device it is routed to (or ran on).
    pub device: DeviceId,
    /// Where it is in its lifecycle; for a command handed to a box below,
    /// what that box last reported.
    pub state: State,
    /// The priority it was queued at.
    pub priority: Priority,
    /// Attempts that have ended (plus the one in flight, when delivered).
    pub attempts: u32,
    /// Deliveries allowed in all before it goes `Dead`.
    pub max_attempts: u32,
    /// When the box accepted it, ms since the Unix epoch.
    pub created_at: Millis,
    /// When it ended, ms since the Unix epoch (`None`: still live).
    pub finished_at: Option<Millis>,
    /// When its ttl runs out, ms since the Unix epoch (`None`: no ttl).
    pub expires_at: Option<Millis>,
    /// Its earliest delivery, ms since the Unix epoch (`None`: at once, or
    /// finished).
    pub not_before: Option<Millis>,
    /// The command it waits for to succeed (`None`: none, already settled,
    /// or finished).
    pub after: Option<CommandId>,
    /// Who sent it: `cli`, `upstream`, or a device id.
    pub origin: String,
    /// The sender's idempotency key, if it gave one.
    pub key: Option<String>,
    /// What the device reported, for a command that ended on an ack (`None`
    /// while live, or when the box ended it).
    pub outcome: Option<Outcome>,
    /// Why it ended or is waiting, in words (`gave up after 5 attempts`,
    /// `waiting for command … to succeed`); `None` when there is nothing to
    /// say.
    pub error: Option<String>,
    /// For a broadcast: each child (its own command, for its own device).
    pub children: Vec<ChildView>,
    /// For a broadcast: the aggregate, `12/14 succeeded, 1 failed, 1 queued`.
    pub summary: Option<String>,
    /// While its device fetches the artifact it names: how far (from
    /// memory, never stored).
    pub progress: Option<Progress>,
}

/// How far a device has got fetching a command's artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// `name@version`, when the box knows the artifact.
    pub artifact: Option<String>,
    /// Bytes of the artifact fetched so far.
    pub bytes: u64,
    /// The artifact's size in bytes (0 reads as 100%).
    pub total: u64,
    /// 0..=100.
    pub percent: u8,
    /// Bytes per second, from the device's successive reports.
    pub rate_bps: Option<u64>,
}

/// One child of a broadcast, as its parent's `show` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildView {
    /// The child's own ULID.
    pub id: CommandId,
    /// The device it was sent to.
    pub device: DeviceId,
    /// Where the child is, or how it ended.
    pub state: State,
}

/// The view of a finished command, from its result record.
impl From<crate::engine::journal::ResultRecord> for CommandView {
    fn from(r: crate::engine::journal::ResultRecord) -> Self {
        CommandView {
            id: r.id,
            target: r.target,
            device: r.device,
            state: r.state,
            priority: r.priority,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            created_at: r.created_at,
            finished_at: Some(r.finished_at),
            expires_at: r.command.as_ref().and_then(|c| c.expires_at),
            not_before: None,
            after: None,
            origin: r.origin,
            key: r.key,
            outcome: r.outcome,
            error: r.error,
            summary: (!r.children.is_empty())
                .then(|| super::core::summarize(r.children.iter().map(|c| c.state))),
            progress: None,
            children: r
                .children
                .into_iter()
                .map(|c| ChildView {
                    id: c.id,
                    device: c.device,
                    state: c.state,
                })
                .collect(),
        }
    }
}

/// A change of a command's state, as published to watchers (and later the
/// upstream outbox).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// The command that changed.
    pub id: CommandId,
    /// The device it is queued for, on, or ended on.
    pub device: DeviceId,
    /// The state it entered.
    pub state: State,
    /// When, ms since the Unix epoch (the round's time).
    pub at: Millis,
    /// Attempts counted so far, the one in flight included once delivered.
    pub attempts: u32,
    /// The device's outcome, on an end that came from an ack.
    pub outcome: Option<Outcome>,
    /// Why the box ended it, in words (ttl, shed, gave up), if it says.
    pub error: Option<String>,
}

/// Counts for `status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Live commands not in flight: ready, waiting for backoff,
    /// `not_before` or `after`.
    pub queued: u64,
    /// Commands delivered and not yet acked, those handed to a box below
    /// included.
    pub in_flight: u64,
    /// Dead commands among the kept results.
    pub dead: u64,
    /// Devices with a session now (this box's own, not those below).
    pub devices_online: u64,
    /// Finished commands whose result is still kept for `show`.
    pub results_kept: u64,
    /// Journal groups on disk that the core tracks (pinned by live
    /// commands or waiting to be dropped).
    pub journal_groups: u64,
    /// Commands accepted durably since the box started.
    pub enqueued_total: u64,
    /// Deliveries to devices since the box started (each attempt counts).
    pub delivered_total: u64,
    /// Outcomes devices reported since the box started (stale acks not
    /// counted).
    pub acked_total: u64,
    /// Group commits (rounds that wrote a group) since the box started.
    pub group_commits_total: u64,
    /// Group-commit flush latency: counts per bucket of
    /// [`FLUSH_BUCKETS_S`] (cumulative counts are derived when rendered),
    /// then the count above the last bucket.
    pub flush_buckets: Vec<u64>,
    /// Seconds spent in group-commit flushes since the box started (the
    /// writer fills it and `flush_buckets` in; the core leaves them empty).
    pub flush_seconds_sum: f64,
    /// Hub side of upstream sync: outbox records applied, skipped (already
    /// applied, or late news of a command that already ended here), and of
    /// those results recorded.
    pub up_applied_total: u64,
    /// Outbox records skipped as already applied or as late news.
    pub up_duplicates_total: u64,
    /// Applied records that recorded a result.
    pub up_results_total: u64,
}

/// Upper bounds (seconds) of the flush-latency histogram buckets.
pub const FLUSH_BUCKETS_S: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

//! The queue's vocabulary, shared by the engine (`core`) and its shells:
//! requests, receipts, views, lifecycle events, statistics, and the one
//! error type with its one classification. Plain data: no IO.

use crate::engine::command::{CommandId, DeviceId, Millis, Outcome, Priority, SendOptions, State};
use serde::{Deserialize, Serialize};

/// Why the queue refused or could not do something. Every variant says what
/// happened and what to do next; the CLI maps them to exit codes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum QueueError {
    #[error("no command {0} (it may have finished longer ago than the result retention)")]
    NotFound(CommandId),
    #[error("no device `{0}` is enrolled; enroll it with `outpost enroll {0}`")]
    UnknownDevice(DeviceId),
    #[error("device `{0}` is revoked and takes no commands; enroll it again to re-admit it")]
    Revoked(DeviceId),
    #[error("queue full: {queued} commands queued (limit {limit}); wait for devices to drain it, cancel some, or raise --max-queued")]
    QueueFull { queued: u64, limit: u64 },
    #[error("disk budget used up: {used} bytes of {limit}; wait for commands to finish or raise --max-disk")]
    DiskFull { used: u64, limit: u64 },
    #[error("command {id} is {state}: cannot {action} it")]
    InvalidTransition {
        id: CommandId,
        state: State,
        action: String,
    },
    #[error(
        "command {id} is not in flight on device `{device}` (stale, duplicate or foreign ack)"
    )]
    NotInFlight { id: CommandId, device: DeviceId },
    #[error("the ack of command {id} answers attempt {acked}, but attempt {current} is in flight: a late answer to an earlier delivery, ignored (the device answers the current one too)")]
    StaleAttempt {
        id: CommandId,
        acked: u32,
        current: u32,
    },
    #[error("`after` names command {0}, which the box does not know")]
    UnknownDependency(CommandId),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the queue is shutting down; retry once the box is back")]
    ShuttingDown,
    #[error("the disk holding the data dir has {free} bytes free, under the reserve of {reserve}: new commands are refused (what is queued is still delivered and acked) until space returns; free space there or lower --min-free-disk")]
    NoSpace { free: u64, reserve: u64 },
    #[error("no route: {0}")]
    NoRoute(String),
    #[error("device `{device}` may not send to `{target}`: no [[acl]] rule in the box's config allows it")]
    Forbidden { device: DeviceId, target: String },
    #[error("idempotency key `{key}` was used for command {id} with another {what}; a key names one command: use a new key for a new command (or resend the first one unchanged)")]
    KeyReused {
        key: String,
        id: CommandId,
        what: String,
    },
    #[error("{}", already_enrolled(.id, *.revoked))]
    AlreadyEnrolled { id: DeviceId, revoked: bool },
    /// A signed command that does not verify, or an unsigned one where
    /// signatures are required (the trust set's verdict, step named).
    #[error("refused: {0}")]
    Untrusted(crate::engine::trust::Refusal),
    #[error("no artifact {0} on this box; `outpost artifact list` shows what it holds, `outpost artifact add FILE` adds one")]
    UnknownArtifact(String),
    #[error("artifact {artifact} is referenced by command {by}, which has not ended; wait for it, or cancel it first")]
    ArtifactInUse { artifact: String, by: CommandId },
    #[error(transparent)]
    ArtifactBudget(#[from] crate::engine::artifact::budget::OverBudget),
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
    pub target: String,
    pub payload: Vec<u8>,
    pub opts: SendOptions,
    /// `cli`, `upstream`, or the sending device's id.
    pub origin: String,
    pub signature: Option<Vec<u8>>,
}

/// The answer to a durable send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReceipt {
    pub id: CommandId,
    pub state: State,
    /// The idempotency key matched an earlier command: `id` is that one's.
    pub duplicate: bool,
}

/// Everything the box knows about one command, live or finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandView {
    pub id: CommandId,
    pub target: String,
    /// The device it is routed to (or ran on).
    pub device: DeviceId,
    pub state: State,
    pub priority: Priority,
    /// Attempts that have ended (plus the one in flight, when delivered).
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: Millis,
    pub finished_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub not_before: Option<Millis>,
    pub after: Option<CommandId>,
    pub origin: String,
    pub key: Option<String>,
    pub outcome: Option<Outcome>,
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
    pub bytes: u64,
    pub total: u64,
    /// 0..=100.
    pub percent: u8,
    /// Bytes per second, from the device's successive reports.
    pub rate_bps: Option<u64>,
}

/// One child of a broadcast, as its parent's `show` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildView {
    pub id: CommandId,
    pub device: DeviceId,
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
    pub id: CommandId,
    pub device: DeviceId,
    pub state: State,
    pub at: Millis,
    pub attempts: u32,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
}

/// Counts for `status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    pub queued: u64,
    pub in_flight: u64,
    pub dead: u64,
    pub devices_online: u64,
    pub results_kept: u64,
    pub journal_groups: u64,
    pub enqueued_total: u64,
    pub delivered_total: u64,
    pub acked_total: u64,
    pub group_commits_total: u64,
    /// Group-commit flush latency: counts per bucket of
    /// [`FLUSH_BUCKETS_S`] (cumulative counts are derived when rendered),
    /// then the count above the last bucket.
    pub flush_buckets: Vec<u64>,
    pub flush_seconds_sum: f64,
    /// Hub side of upstream sync: outbox records applied, skipped (already
    /// applied, or late news of a command that already ended here), and of
    /// those results recorded.
    pub up_applied_total: u64,
    pub up_duplicates_total: u64,
    pub up_results_total: u64,
}

/// Upper bounds (seconds) of the flush-latency histogram buckets.
pub const FLUSH_BUCKETS_S: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

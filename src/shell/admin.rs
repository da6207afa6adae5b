//! The admin API: how every CLI command talks to the running box.
//!
//! Transport: the Unix socket `<data-dir>/admin.sock` (mode 0660, so only
//! the box's user and group may use it); within that, the caller's uid
//! decides what it may do (`access`). Framing: the device protocol's —
//! a `u32` big-endian length, then a postcard body (`proto::read_frame`) —
//! with a larger limit, since a command's payload travels inside. One
//! request, one response; `Watch` answers with a stream of `Event`s until
//! the client hangs up.
//!
//! The server maps each request to `QueueHandle` and `identity` calls;
//! errors travel as `AdminResponse::Error { kind, message }`, and `kind`
//! decides the CLI's exit code.

use crate::engine::command::{CommandId, DeviceId};
use crate::engine::queue::core::{DeviceView, Relabel};
use crate::identity::Identity;
use crate::proto::{self, Frame, FrameError};
use crate::shell::link::DeviceLink;
use crate::shell::queue::{
    CommandView, LifecycleEvent, QueueError, QueueHandle, SendReceipt, SendRequest,
};
use crate::shell::store::DeviceRecord;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};

pub mod access;
pub mod audit;

/// File name of the admin socket inside the data dir.
pub const SOCKET: &str = "admin.sock";
/// Largest admin frame: a 1 MiB payload and its envelope fit with room.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A request to the box.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Queue a command (`outpost send`); answered `Receipt` once it is
    /// durable.
    Send(SendRequest),
    /// Wait for a command's end state, up to `timeout_ms`.
    Wait {
        /// The command waited for.
        id: CommandId,
        /// How long to wait, in ms; answered `TimedOut` if it has not ended
        /// by then, else `View`.
        timeout_ms: u64,
    },
    /// One command, live or finished (`outpost show`); answered `View`.
    Show(CommandId),
    /// A device's unfinished commands (`outpost queue`); answered `Views`.
    List {
        /// The device whose queue is listed.
        device: DeviceId,
    },
    /// Cancel a live command (a broadcast: its open children); answered
    /// `View`.
    Cancel(CommandId),
    /// Put a dead or failed command back in the queue with fresh attempts;
    /// answered `View`.
    Retry(CommandId),
    /// The box's summary (`outpost status`); answered `Status`.
    Status,
    /// Every enrolled device (`outpost devices`); answered `Devices`.
    Devices,
    /// Enroll a device and return its bundle text.
    Enroll {
        /// The new device's id.
        id: DeviceId,
        /// Tags it is enrolled with, for `tag:` targets.
        tags: Vec<String>,
        /// Capabilities it is enrolled with.
        caps: Vec<String>,
        /// A box below this one (an edge), not a device.
        gateway: bool,
        /// Enroll an id that exists: a new bundle, the old one locked out.
        force: bool,
    },
    /// Revoke a device: its bundle is locked out and its live link closed;
    /// answered `Device` with its record.
    Revoke(DeviceId),
    /// Lifecycle events from now on, optionally of one device only.
    Watch {
        /// The one device whose events are sent; `None`: every device's.
        device: Option<DeviceId>,
    },
    /// Change a device's tags and capabilities.
    Relabel(Relabel),
    /// Run a workflow: its TOML text (`file` names it in errors) and the
    /// payload files it names, read by the CLI.
    WorkflowRun {
        /// The workflow file's name, as errors give it.
        file: String,
        /// The workflow's TOML, checked again by the box.
        text: String,
        /// Each `payload_file` the workflow names, with its bytes.
        payloads: Vec<(String, Vec<u8>)>,
    },
    /// One workflow run, by its id; answered `Workflow`.
    WorkflowShow(CommandId),
    /// The workflow runs the box keeps; answered `Workflows`.
    WorkflowList,
    /// Cancel a workflow run; answered `Workflow`.
    WorkflowCancel {
        /// The run's id.
        id: CommandId,
        /// Run the workflow's `on_failure` steps after cancelling.
        compensate: bool,
    },
    /// Start a rollout: its plan as JSON, read by the CLI from a file or
    /// flags (the box checks it again).
    RolloutStart {
        /// The `rollout::Plan`, JSON-encoded.
        plan: Vec<u8>,
    },
    /// One rollout, by its id; answered `Rollout`.
    RolloutShow(CommandId),
    /// The rollouts the box keeps; answered `Rollouts`.
    RolloutList,
    /// Pause, resume or abort a rollout.
    RolloutVerb {
        /// The rollout's id.
        id: CommandId,
        /// What to do to it.
        verb: crate::shell::rollout::Verb,
    },
    /// Devices with their statistics (`devices --stats`).
    DeviceStats,
    /// Add or remove an operator key (`trust add`, `trust remove`).
    Trust(crate::engine::trust::TrustEdit),
    /// The trust set, with the box's name and whether it requires
    /// signatures (`trust list`, and `send --sign` for the audience).
    TrustList,
    /// Audit entries at or after `since` (ms since the epoch), the newest
    /// `limit` of them.
    Audit {
        /// The earliest entry time wanted, ms since the epoch; `None`: from
        /// the oldest kept.
        since: Option<u64>,
        /// How many of the newest matching entries; `None`: all of them.
        limit: Option<u64>,
    },
    /// Walk the audit log's hash chain.
    AuditVerify,
    /// `artifact add`, step 1: which chunks of this manifest the box lacks
    /// (answered `ArtifactLacks` with their indices).
    ArtifactLacks {
        /// The encoded manifest (`Manifest::decode` reads it).
        #[serde(with = "serde_bytes")]
        manifest: Vec<u8>,
    },
    /// `artifact add`, step 2: one chunk's bytes (named by their SHA-256).
    ArtifactChunk {
        /// The chunk, at most `manifest::MAX_CHUNK` bytes; answered
        /// `ChunkStored`.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// `artifact add`, step 3: the manifest, committed once every chunk it
    /// names is durable; answered `Artifact`.
    ArtifactCommit {
        /// The encoded manifest, as sent in step 1.
        #[serde(with = "serde_bytes")]
        manifest: Vec<u8>,
    },
    /// The artifacts on the shelf; answered `Artifacts`.
    ArtifactList,
    /// One artifact, answered `Artifact`: `name@version`, `name` (its
    /// newest) or `sha256:…`.
    ArtifactShow(String),
    /// Remove an artifact no live command names, given as `ArtifactShow`
    /// takes it; answered `ArtifactRemoved`.
    ArtifactRemove(String),
    /// A consistent snapshot of the box (`outpost backup`), answered with
    /// `BackupPiece`s of the record stream, then `BackupDone`; the
    /// connection's only request.
    Backup,
}

impl Frame for AdminRequest {
    const KNOWN_TAGS: u32 = 28;
}

/// The box's answer.
// One answer per call, made and dropped at once: boxing `Status` would save
// bytes nobody holds, and change the shape every caller matches on.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AdminResponse {
    /// A `Send` is durable: the command's id and state.
    Receipt(SendReceipt),
    /// One command, answering `Show`, `Cancel`, `Retry` and a `Wait` that
    /// saw it end.
    View(Box<CommandView>),
    /// A device's unfinished commands, answering `List`.
    Views(Vec<CommandView>),
    /// The box's summary, answering `Status`.
    Status(StatusView),
    /// Every enrolled device, answering `Devices`.
    Devices(Vec<DeviceView>),
    /// A device is enrolled, answering `Enroll`.
    Bundle {
        /// Its bundle as text (certificate, key, the box's address), to
        /// hand to the device.
        text: String,
    },
    /// A device's record after `Revoke` or `Relabel`.
    Device(DeviceRecord),
    /// One lifecycle event of a `Watch` stream.
    Event(LifecycleEvent),
    /// A `Wait` whose command had not ended within its `timeout_ms`.
    TimedOut,
    /// The request failed; the client's `call` turns it into
    /// `AdminError::Remote`.
    Error {
        /// What kind of failure, which decides the CLI's exit code.
        kind: ErrorKind,
        /// What went wrong, for a person.
        message: String,
    },
    /// One workflow run, answering `WorkflowRun`, `WorkflowShow` and
    /// `WorkflowCancel`.
    Workflow(Box<crate::shell::workflow::RunView>),
    /// The workflow runs the box keeps, answering `WorkflowList`.
    Workflows(Vec<crate::shell::workflow::RunView>),
    /// One rollout, answering `RolloutStart`, `RolloutShow` and
    /// `RolloutVerb`.
    Rollout(Box<crate::shell::rollout::RolloutView>),
    /// The rollouts the box keeps, answering `RolloutList`.
    Rollouts(Vec<crate::shell::rollout::RolloutView>),
    /// Every device with the monitor's statistics of it (default ones when
    /// the box runs no monitor), answering `DeviceStats`.
    DeviceStats(Vec<(DeviceView, crate::shell::monitor::DeviceStats)>),
    /// The key a trust edit added or removed.
    Trusted(crate::engine::trust::TrustedKey),
    /// The trust set and the box's signing rules, answering `TrustList`.
    Trust(TrustView),
    /// Audit entries, oldest first, answering `Audit`.
    Audit(Vec<crate::engine::audit::View>),
    /// `--verify`: intact (the summary), or the first bad seq and why.
    AuditVerified {
        /// Whether the chain verified end to end.
        intact: bool,
        /// The summary when intact, else the first break.
        text: String,
    },
    /// Indices of the manifest's chunks the box does not hold.
    ArtifactLacks(Vec<u32>),
    /// A chunk is durable (`new`: it was not held before).
    ChunkStored {
        /// False when the shelf held the chunk already.
        new: bool,
    },
    /// One artifact, answering `ArtifactCommit` and `ArtifactShow`.
    Artifact(crate::shell::artifact::shelf::ArtifactView),
    /// The artifacts on the shelf, answering `ArtifactList`.
    Artifacts(Vec<crate::shell::artifact::shelf::ArtifactView>),
    /// An artifact was removed, answering `ArtifactRemove`.
    ArtifactRemoved {
        /// The artifact as it was.
        view: crate::shell::artifact::shelf::ArtifactView,
        /// Bytes freed on the shelf (chunks no other artifact holds).
        freed: u64,
    },
    /// Part of a backup's record stream (`backup::Record`s).
    BackupPiece(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The backup's stream is complete: what it holds.
    BackupDone(crate::shell::backup::SnapshotInfo),
}

impl Frame for AdminResponse {
    const KNOWN_TAGS: u32 = 23;
}

impl AdminResponse {
    /// `--verify`'s answer: the chain's summary, or its first break.
    pub fn audit_verified<A: std::fmt::Display, B: std::fmt::Display>(
        verdict: Result<A, B>,
    ) -> AdminResponse {
        let (intact, text) = match verdict {
            Ok(a) => (true, a.to_string()),
            Err(b) => (false, b.to_string()),
        };
        AdminResponse::AuditVerified { intact, text }
    }
}

/// `outpost trust list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustView {
    /// The box's name: the audience signed commands must name.
    pub name: String,
    /// Whether the box refuses unsigned commands (`serve --require-signed`).
    pub require_signed: bool,
    /// The operator keys it trusts, and those removed.
    pub set: crate::engine::trust::TrustSet,
}

/// What kind of failure an error is; the CLI's exit code follows from it
/// (`exit::of_class`). The queue's own classification, so both agree.
pub use crate::shell::queue::ErrorClass as ErrorKind;

/// `outpost status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    /// The box's crate version.
    pub version: String,
    /// Seconds since the box started serving.
    pub uptime_s: u64,
    /// The device link's QUIC address as bound (empty if it cannot say).
    pub listen: String,
    /// Devices with a record, enrolled or revoked, gateways included.
    pub devices_total: u64,
    /// Devices connected now.
    pub devices_online: u64,
    /// Commands waiting in queues, not yet delivered.
    pub queued: u64,
    /// Commands delivered and not yet acked.
    pub in_flight: u64,
    /// Dead-lettered commands among the results kept.
    pub dead: u64,
    /// Bytes the data dir occupies on disk.
    pub disk_bytes: u64,
    /// The data dir's path.
    pub data_dir: String,
    /// The uplink to the hub above, when the box has one.
    pub uplink: Option<UplinkView>,
    /// The boxes below this one (its gateways), when it is a hub.
    pub edges: Vec<EdgeView>,
    /// The disk budget (`--max-disk`), when set.
    pub max_disk: Option<u64>,
    /// Alerts pending or firing.
    pub alerts: Vec<crate::engine::alert::AlertView>,
    /// Devices whose bundle is in use on more than one live device.
    pub shared_bundles: Vec<crate::engine::contest::SharedBundle>,
    /// Scheduled backups: the newest and the last failure, when on.
    pub backup: Option<crate::shell::backup::schedule::LastBackup>,
}

/// A box below, as `status` on its hub shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EdgeView {
    /// The edge's device id, as enrolled on the hub.
    pub name: String,
    /// Whether its link to the hub is up now.
    pub online: bool,
    /// Its outbox is applied through this seq.
    pub cursor: u64,
    /// When its last records came, ms since the epoch; `None`: none since
    /// the hub started.
    pub last_up: Option<u64>,
    /// Commands waiting for it.
    pub queued: u64,
    /// Commands handed to it and not yet ended.
    pub handed: u64,
}

/// The uplink as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UplinkView {
    /// Connecting, connected or offline.
    pub state: crate::shell::upstream::UplinkState,
    /// The hub's address.
    pub hub: String,
    /// When the state began (ms since the epoch).
    pub since: u64,
    /// When the hub last acknowledged records (ms since the epoch).
    pub last_sync: Option<u64>,
    /// Why the link last failed; `None` when it has not.
    pub last_error: Option<String>,
    /// Records waiting for the hub.
    pub outbox_depth: u64,
    /// Age of the oldest record waiting for the hub, in ms (0: none).
    pub lag_ms: u64,
    /// Telemetry records skipped while the outbox was full.
    pub outbox_skipped: u64,
    /// Commands the hub forwarded that this box took (new ones, not
    /// redeliveries), since it started.
    pub forwarded_total: u64,
    /// Outbox records the hub acknowledged since the box started.
    pub synced_total: u64,
}

fn error_of(e: &QueueError) -> AdminResponse {
    AdminResponse::Error {
        kind: e.class(),
        message: e.to_string(),
    }
}

/// What the admin server needs from the box.
pub struct AdminContext {
    /// The queue every request maps onto.
    pub queue: QueueHandle,
    /// The box's CA and server certificate; the CA signs enrolled devices' certificates.
    pub identity: Arc<Identity>,
    /// The device link: who is online, shared bundles, revocations.
    pub link: Arc<DeviceLink>,
    /// `host:port` written into device bundles.
    pub advertise: String,
    /// The box's data dir (backups walk it; `status` sizes it).
    pub data_dir: PathBuf,
    /// When the box started serving (`status`'s uptime).
    pub started: Instant,
    /// The uplink's state, when the box has one.
    pub uplink: Option<tokio::sync::watch::Receiver<crate::shell::upstream::UplinkStatus>>,
    /// The workflow runner.
    pub workflows: Option<crate::shell::workflow::Runner>,
    /// The rollout runner.
    pub rollouts: Option<crate::shell::rollout::RolloutRunner>,
    /// Alerts, device statistics and the latest commands.
    pub monitor: Option<crate::shell::monitor::Monitor>,
    /// The disk budget, shown against the disk use.
    pub max_disk: Option<u64>,
    /// Which uids may do what on the socket.
    pub access: Arc<access::Access>,
    /// The config file the box was started with (a backup carries it).
    pub config_file: Option<PathBuf>,
    /// The scheduled backups' state, when the box takes them.
    pub backups: Option<crate::shell::backup::schedule::Board>,
}

/// Bind the admin socket in `data_dir`: remove a stale socket file (one
/// nobody answers on), refuse if a box answers there, mode 0660.
pub async fn bind(data_dir: &Path) -> Result<UnixListener, AdminError> {
    let path = data_dir.join(SOCKET);
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(AdminError::AlreadyServing { path });
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| AdminError::Io {
        path: path.clone(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        AdminError::Io {
            path: path.clone(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serve admin connections until the task is aborted.
pub async fn serve(listener: UnixListener, ctx: Arc<AdminContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, ctx).await {
                        tracing::debug!("admin connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("admin socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(mut stream: UnixStream, ctx: Arc<AdminContext>) -> Result<(), FrameError> {
    let caller = access::Caller::of(&stream, &ctx.access);
    let who = crate::shell::admin::audit::Caller::socket(stream.peer_cred().ok().map(|c| c.uid()));
    while let Some(req) = proto::read_frame::<AdminRequest, _>(&mut stream, MAX_FRAME).await? {
        if let Err(refusal) = access::authorize(&ctx, &caller, &req).await {
            // A request refused for its role is audited as refused.
            if let Some(d) = crate::shell::admin::audit::draft(&req) {
                ctx.queue.audit(d.note(&who, &refusal, crate::now_millis()));
            }
            proto::write_frame(&mut stream, &refusal, MAX_FRAME).await?;
            continue;
        }
        if let AdminRequest::Watch { device } = req {
            return watch(stream, &ctx, device).await;
        }
        if let AdminRequest::Backup = req {
            let r = backup(&mut stream, &ctx).await;
            let resp = match &r {
                Ok(info) => AdminResponse::BackupDone(info.clone()),
                Err(message) => AdminResponse::Error {
                    kind: ErrorKind::Unavailable,
                    message: message.clone(),
                },
            };
            if let Some(d) = crate::shell::admin::audit::draft(&AdminRequest::Backup) {
                ctx.queue.audit(d.note(&who, &resp, crate::now_millis()));
            }
            // The reader may be gone (that is why it failed): best effort.
            let _ = proto::write_frame(&mut stream, &resp, MAX_FRAME).await;
            return Ok(());
        }
        let resp = audited(&ctx, &who, req).await;
        proto::write_frame(&mut stream, &resp, MAX_FRAME).await?;
    }
    Ok(())
}

async fn watch(
    mut stream: UnixStream,
    ctx: &AdminContext,
    device: Option<DeviceId>,
) -> Result<(), FrameError> {
    let mut events = ctx.queue.subscribe();
    loop {
        match events.recv().await {
            Ok(ev) => {
                if device.as_ref().is_some_and(|d| *d != ev.device) {
                    continue;
                }
                proto::write_frame(&mut stream, &AdminResponse::Event(ev), MAX_FRAME).await?;
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("a watcher fell behind by {n} events");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// How long a backup waits for its reader to take a piece before giving up:
/// the writer (and with it the whole queue) waits while the store is
/// walked, so a reader that stalls must not hold the box for long.
const BACKUP_STALL: Duration = Duration::from_secs(30);

/// Stream a snapshot (`backup::produce`) to the caller.
async fn backup(
    stream: &mut UnixStream,
    ctx: &AdminContext,
) -> Result<crate::shell::backup::SnapshotInfo, String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let queue = ctx.queue.clone();
    let data_dir = ctx.data_dir.clone();
    let config = ctx.config_file.clone();
    let job = tokio::task::spawn_blocking(move || {
        crate::shell::backup::produce(&queue, &data_dir, config.as_deref(), tx)
            .map_err(|e| e.to_string())
    });
    while let Some(piece) = rx.recv().await {
        let frame = AdminResponse::BackupPiece(piece);
        match tokio::time::timeout(BACKUP_STALL, proto::write_frame(stream, &frame, MAX_FRAME))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                drop(rx);
                let _ = job.await;
                return Err(format!("the backup's reader went away: {e}"));
            }
            Err(_) => {
                // Dropping the receiver stops the walk at its next piece.
                drop(rx);
                let _ = job.await;
                return Err(format!(
                    "the backup's reader took no data for {} s; the backup was stopped",
                    BACKUP_STALL.as_secs()
                ));
            }
        }
    }
    job.await
        .map_err(|e| format!("the backup task failed: {e}"))?
}

/// `handle`, and the request's audit entry once it has its answer (plain
/// reads have none: `audit::draft`).
async fn audited(
    ctx: &AdminContext,
    caller: &crate::shell::admin::audit::Caller,
    req: AdminRequest,
) -> AdminResponse {
    let draft = crate::shell::admin::audit::draft(&req);
    let resp = handle(ctx, req).await;
    if let Some(d) = draft {
        ctx.queue.audit(d.note(caller, &resp, crate::now_millis()));
    }
    resp
}

/// Workflow requests: the runner answers, or says it is not there.
async fn workflow(ctx: &AdminContext, req: AdminRequest) -> AdminResponse {
    let Some(w) = &ctx.workflows else {
        return AdminResponse::Error {
            kind: ErrorKind::Unavailable,
            message: "this box runs no workflows".into(),
        };
    };
    let not_found = |id: CommandId| AdminResponse::Error {
        kind: ErrorKind::NotFound,
        message: format!("no workflow run {id}"),
    };
    match req {
        AdminRequest::WorkflowRun {
            file,
            text,
            payloads,
        } => {
            let packed = crate::engine::workflow::Packed {
                file,
                text,
                payloads,
            };
            let spec = match packed.unpack() {
                Ok(s) => s,
                Err(e) => {
                    return AdminResponse::Error {
                        kind: ErrorKind::BadRequest,
                        message: e.to_string(),
                    }
                }
            };
            match w.run(spec).await {
                Ok(v) => AdminResponse::Workflow(Box::new(v)),
                Err(message) => AdminResponse::Error {
                    kind: ErrorKind::Unavailable,
                    message,
                },
            }
        }
        AdminRequest::WorkflowShow(id) => match w.show(id).await {
            Some(v) => AdminResponse::Workflow(Box::new(v)),
            None => not_found(id),
        },
        AdminRequest::WorkflowList => AdminResponse::Workflows(w.list().await),
        AdminRequest::WorkflowCancel { id, compensate } => match w.cancel(id, compensate).await {
            Some(v) => AdminResponse::Workflow(Box::new(v)),
            None => not_found(id),
        },
        _ => AdminResponse::Error {
            kind: ErrorKind::BadRequest,
            message: "not a workflow request".into(),
        },
    }
}

/// Rollout requests: the runner answers, or says it is not there.
async fn rollout(ctx: &AdminContext, req: AdminRequest) -> AdminResponse {
    let Some(r) = &ctx.rollouts else {
        return AdminResponse::Error {
            kind: ErrorKind::Unavailable,
            message: "this box runs no rollouts".into(),
        };
    };
    let not_found = |id: CommandId| AdminResponse::Error {
        kind: ErrorKind::NotFound,
        message: format!("no rollout {id} (`outpost rollout list` shows those the box keeps)"),
    };
    let bad = |message: String| AdminResponse::Error {
        kind: ErrorKind::BadRequest,
        message,
    };
    match req {
        AdminRequest::RolloutStart { plan } => {
            let plan = match serde_json::from_slice::<crate::engine::rollout::Plan>(&plan) {
                Ok(p) => p,
                Err(e) => {
                    return bad(format!(
                        "the rollout's plan does not decode ({e}); is the CLI the box's version?"
                    ))
                }
            };
            match r.start_rollout(plan).await {
                Ok(v) => AdminResponse::Rollout(Box::new(v)),
                Err(message) => bad(message),
            }
        }
        AdminRequest::RolloutShow(id) => match r.show(id).await {
            Some(v) => AdminResponse::Rollout(Box::new(v)),
            None => not_found(id),
        },
        AdminRequest::RolloutList => AdminResponse::Rollouts(r.list().await),
        AdminRequest::RolloutVerb { id, verb } => match r.verb(id, verb).await {
            Some(Ok(v)) => AdminResponse::Rollout(Box::new(v)),
            Some(Err(message)) => AdminResponse::Error {
                kind: ErrorKind::Refused,
                message,
            },
            None => not_found(id),
        },
        _ => bad("not a rollout request".into()),
    }
}

async fn handle(ctx: &AdminContext, req: AdminRequest) -> AdminResponse {
    let q = &ctx.queue;
    let r = match req {
        r @ (AdminRequest::RolloutStart { .. }
        | AdminRequest::RolloutShow(_)
        | AdminRequest::RolloutList
        | AdminRequest::RolloutVerb { .. }) => return rollout(ctx, r).await,
        w @ (AdminRequest::WorkflowRun { .. }
        | AdminRequest::WorkflowShow(_)
        | AdminRequest::WorkflowList
        | AdminRequest::WorkflowCancel { .. }) => return workflow(ctx, w).await,
        AdminRequest::Send(s) => q.send(s).await.map(AdminResponse::Receipt),
        AdminRequest::Wait { id, timeout_ms } => q
            .wait(id, Duration::from_millis(timeout_ms))
            .await
            .map(|v| match v {
                Some(v) => AdminResponse::View(Box::new(v)),
                None => AdminResponse::TimedOut,
            }),
        AdminRequest::Show(id) => q.show(id).await.map(|v| AdminResponse::View(Box::new(v))),
        AdminRequest::List { device } => q.list(device).await.map(AdminResponse::Views),
        AdminRequest::Cancel(id) => q.cancel(id).await.map(|v| AdminResponse::View(Box::new(v))),
        AdminRequest::Retry(id) => q.retry(id).await.map(|v| AdminResponse::View(Box::new(v))),
        AdminRequest::Status => status_view(ctx).await.map(AdminResponse::Status),
        AdminRequest::DeviceStats => devices(ctx).await.map(|ds| {
            AdminResponse::DeviceStats(
                ds.into_iter()
                    .map(|d| {
                        let s = ctx
                            .monitor
                            .as_ref()
                            .map(|m| m.device_stats(&d.record.id))
                            .unwrap_or_default();
                        (d, s)
                    })
                    .collect(),
            )
        }),
        AdminRequest::Devices => devices(ctx).await.map(AdminResponse::Devices),
        AdminRequest::Relabel(r) => q.relabel(r).await.map(AdminResponse::Device),
        AdminRequest::Enroll {
            id,
            tags,
            caps,
            gateway,
            force,
        } => {
            let req = crate::shell::enroll::EnrollRequest {
                id,
                tags,
                caps,
                gateway,
                force,
            };
            return enroll(ctx, req).await;
        }
        AdminRequest::Revoke(id) => {
            let r = q.revoke(id.clone()).await;
            if r.is_ok() {
                ctx.link.revoke(&id);
            }
            r.map(AdminResponse::Device)
        }
        AdminRequest::Trust(edit) => q.edit_trust(edit).await.map(AdminResponse::Trusted),
        AdminRequest::TrustList => {
            let g = q.gate();
            Ok(AdminResponse::Trust(TrustView {
                name: g.name().to_string(),
                require_signed: g.requires_signatures(),
                set: (*g.set()).clone(),
            }))
        }
        AdminRequest::Audit { since, limit } => {
            q.audit_read(since, limit).await.map(AdminResponse::Audit)
        }
        AdminRequest::AuditVerify => q.audit_verify().await.map(AdminResponse::audit_verified),
        a @ (AdminRequest::ArtifactLacks { .. }
        | AdminRequest::ArtifactChunk { .. }
        | AdminRequest::ArtifactCommit { .. }
        | AdminRequest::ArtifactList
        | AdminRequest::ArtifactShow(_)) => artifact(q.shelf().clone(), a).await,
        AdminRequest::ArtifactRemove(spec) => {
            match crate::engine::artifact::ArtifactSpec::parse(&spec) {
                Ok(spec) => q
                    .remove_artifact(&spec)
                    .await
                    .map(|(view, freed)| AdminResponse::ArtifactRemoved { view, freed }),
                Err(e) => Err(QueueError::BadRequest(e)),
            }
        }
        AdminRequest::Watch { .. } | AdminRequest::Backup => Ok(AdminResponse::Error {
            kind: ErrorKind::BadRequest,
            message: "watch and backup are streams; send one as the connection's only request"
                .into(),
        }),
    };
    r.unwrap_or_else(|e| error_of(&e))
}

/// The artifact requests that touch only the shelf: on a blocking thread,
/// since they read and fsync files.
async fn artifact(
    shelf: crate::shell::artifact::shelf::Shelf,
    req: AdminRequest,
) -> Result<AdminResponse, QueueError> {
    use crate::engine::artifact::{ArtifactSpec, Digest, Manifest};
    use crate::shell::queue::shelf_error;
    tokio::task::spawn_blocking(move || match req {
        AdminRequest::ArtifactLacks { manifest } => {
            let m = Manifest::decode(&manifest).map_err(|e| QueueError::BadRequest(e.to_string()))?;
            let mut seen = std::collections::HashSet::new();
            let lacks: Vec<u32> = m
                .chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| seen.insert(c.sha256) && !shelf.chunks().has(&c.sha256))
                .map(|(i, _)| i as u32)
                .collect();
            // The whole file against the budgets before a chunk is sent,
            // so a refused add leaves nothing behind.
            let need = lacks.iter().map(|&i| m.chunks[i as usize].len as u64).sum();
            shelf.chunks().admit(need)?;
            Ok(AdminResponse::ArtifactLacks(lacks))
        }
        AdminRequest::ArtifactChunk { bytes } => {
            if bytes.len() > crate::engine::artifact::manifest::MAX_CHUNK as usize {
                return Err(QueueError::BadRequest(format!(
                    "a chunk of {} bytes is over the largest a chunker makes ({})",
                    bytes.len(),
                    crate::engine::artifact::manifest::MAX_CHUNK
                )));
            }
            let d = Digest::of(&bytes);
            match shelf.chunks().put(&d, &bytes) {
                Ok(new) => Ok(AdminResponse::ChunkStored { new }),
                Err(e) if e.is_disk_full() => Err(QueueError::Storage(format!(
                    "{e}: the disk holding the data dir is full; free space there and add the artifact again (the chunks stored so far are kept)"
                ))),
                Err(e) => Err(shelf_error(e.into())),
            }
        }
        AdminRequest::ArtifactCommit { manifest } => {
            let d = shelf
                .commit(manifest, crate::now_millis())
                .map_err(shelf_error)?;
            shelf
                .view(&d)
                .map_err(shelf_error)?
                .map(AdminResponse::Artifact)
                .ok_or_else(|| QueueError::UnknownArtifact(d.to_string()))
        }
        AdminRequest::ArtifactList => shelf.list().map(AdminResponse::Artifacts).map_err(shelf_error),
        AdminRequest::ArtifactShow(spec) => {
            let spec = ArtifactSpec::parse(&spec).map_err(QueueError::BadRequest)?;
            let d = shelf.resolve(&spec).map_err(shelf_error)?;
            shelf
                .view(&d)
                .map_err(shelf_error)?
                .map(AdminResponse::Artifact)
                .ok_or_else(|| QueueError::UnknownArtifact(spec.to_string()))
        }
        _ => Err(QueueError::BadRequest("not an artifact request".into())),
    })
    .await
    .unwrap_or_else(|e| Err(QueueError::Storage(format!("artifact task: {e}"))))
}

/// The queue's devices with what the device link knows of them.
pub async fn devices(ctx: &AdminContext) -> Result<Vec<DeviceView>, QueueError> {
    let mut ds = ctx.queue.devices().await?;
    let shared = ctx.link.shared_bundles();
    if !shared.is_empty() {
        for d in &mut ds {
            d.shared_bundle = shared.iter().find(|s| s.device == d.record.id).cloned();
        }
    }
    Ok(ds)
}

/// What `status` answers (also the dashboard's `/api/status`).
pub async fn status_view(ctx: &AdminContext) -> Result<StatusView, QueueError> {
    let stats = ctx.queue.stats().await?;
    let devices = ctx.queue.devices().await?;
    let edges = devices
        .iter()
        .filter_map(|d| {
            let s = d.sync.as_ref()?;
            Some(EdgeView {
                name: d.record.id.clone(),
                online: d.online,
                cursor: s.cursor,
                last_up: s.last_up,
                queued: d.queued,
                handed: d.in_flight,
            })
        })
        .collect();
    Ok(StatusView {
        backup: ctx
            .backups
            .as_ref()
            .map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        edges,
        shared_bundles: ctx.link.shared_bundles(),
        max_disk: ctx.max_disk,
        alerts: ctx.monitor.as_ref().map(|m| m.alerts()).unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_s: ctx.started.elapsed().as_secs(),
        listen: ctx
            .link
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        devices_total: devices.len() as u64,
        devices_online: stats.devices_online,
        queued: stats.queued,
        in_flight: stats.in_flight,
        dead: stats.dead,
        disk_bytes: crate::shell::store::dir_size(&ctx.data_dir),
        data_dir: ctx.data_dir.display().to_string(),
        uplink: match &ctx.uplink {
            None => None,
            Some(w) => {
                let s = w.borrow().clone();
                let o = ctx.queue.outbox_stats().await?;
                let now = crate::now_millis();
                Some(UplinkView {
                    state: s.state,
                    hub: s.hub,
                    since: s.since,
                    last_sync: s.last_sync,
                    last_error: s.last_error,
                    outbox_depth: o.depth,
                    lag_ms: o.oldest_at.map_or(0, |t| now.saturating_sub(t)),
                    outbox_skipped: o.skipped,
                    forwarded_total: s.forwarded_total,
                    synced_total: s.synced_total,
                })
            }
        },
    })
}

async fn enroll(ctx: &AdminContext, req: crate::shell::enroll::EnrollRequest) -> AdminResponse {
    match crate::shell::enroll::enroll(&ctx.queue, &ctx.identity, &ctx.advertise, &req).await {
        Ok(e) => {
            // Pinned before the revocation is lifted: a revoked device's
            // stolen bundle must never get a moment in between.
            if let Some(cert) = e.record.cert {
                ctx.link.supersede(&req.id, cert);
            }
            ctx.link.readmit(&req.id);
            AdminResponse::Bundle {
                text: e.bundle.to_text(),
            }
        }
        Err(crate::shell::enroll::EnrollError::Queue(e)) => error_of(&e),
        Err(e) => AdminResponse::Error {
            kind: ErrorKind::BadRequest,
            message: e.to_string(),
        },
    }
}

/// Why an admin call failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No socket at `path`, or nobody answers on it.
    #[error("no box is running at {} — start it with `outpost serve`, or pass --data-dir (or OUTPOST_DATA_DIR) for the box you mean", path.display())]
    NoBox {
        /// The admin socket's path.
        path: PathBuf,
    },
    /// The socket's mode keeps this user out (not the box's user or group).
    #[error("permission denied on {} — run as the box's user or a member of its group", path.display())]
    Denied {
        /// The admin socket's path.
        path: PathBuf,
    },
    /// `bind` found another box answering on the socket (server side).
    #[error("a box is already serving {} — stop it first, or use another --data-dir", path.display())]
    AlreadyServing {
        /// The admin socket's path.
        path: PathBuf,
    },
    /// Connecting to, binding or setting the mode of the socket failed otherwise.
    #[error("{}: {source}", path.display())]
    Io {
        /// The admin socket's path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing a frame failed (IO, size limit or decoding).
    #[error("the admin connection failed: {0}")]
    Frame(#[from] FrameError),
    /// The box hung up before answering a `call`.
    #[error("the box closed the admin connection without answering; see its log (`journalctl -u outpost`)")]
    Closed,
    /// The box answered `AdminResponse::Error`.
    #[error("{message}")]
    Remote {
        /// What kind of failure, which decides the exit code.
        kind: ErrorKind,
        /// The box's message.
        message: String,
    },
}

impl AdminError {
    /// The CLI exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            AdminError::Remote { kind, .. } => crate::exit::of_class(*kind),
            AdminError::Denied { .. } => crate::exit::REFUSED,
            _ => crate::exit::ERROR,
        }
    }
}

/// A connection to the box's admin socket.
pub struct AdminClient {
    stream: UnixStream,
}

impl AdminClient {
    /// Connect to the box serving `data_dir`.
    pub async fn connect(data_dir: &Path) -> Result<AdminClient, AdminError> {
        let path = data_dir.join(SOCKET);
        match UnixStream::connect(&path).await {
            Ok(stream) => Ok(AdminClient { stream }),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                Err(AdminError::Denied { path })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(AdminError::NoBox { path })
            }
            Err(source) => Err(AdminError::Io { path, source }),
        }
    }

    /// One request, one response; a remote error becomes `Err(Remote)`.
    pub async fn call(&mut self, req: &AdminRequest) -> Result<AdminResponse, AdminError> {
        proto::write_frame(&mut self.stream, req, MAX_FRAME).await?;
        match self.next().await? {
            Some(r) => Ok(r),
            None => Err(AdminError::Closed),
        }
    }

    /// The next response of a stream (`Watch`); `None` when the box hung up.
    pub async fn next(&mut self) -> Result<Option<AdminResponse>, AdminError> {
        match proto::read_frame::<AdminResponse, _>(&mut self.stream, MAX_FRAME).await? {
            Some(AdminResponse::Error { kind, message }) => {
                Err(AdminError::Remote { kind, message })
            }
            other => Ok(other),
        }
    }

    /// Send a request whose answers are a stream (`Backup`): read them
    /// with `next`.
    pub async fn request(&mut self, req: &AdminRequest) -> Result<(), AdminError> {
        proto::write_frame(&mut self.stream, req, MAX_FRAME).await?;
        Ok(())
    }

    /// Start a watch stream.
    pub async fn watch(&mut self, device: Option<DeviceId>) -> Result<(), AdminError> {
        proto::write_frame(&mut self.stream, &AdminRequest::Watch { device }, MAX_FRAME).await?;
        Ok(())
    }
}

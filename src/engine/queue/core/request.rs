//! What the writer asks of the core and what it answers: one request
//! type for everything a caller may ask in a round (`CoreRequest`), and
//! the replies with their unwrapping into the caller's type.

use super::*;

/// A request from the shell (the admin API and the device links).
#[derive(Clone, Debug)]
pub enum CoreRequest {
    /// Queue a command (its origin is in the request); answered with a
    /// `Receipt`, a duplicate's too when its idempotency key was seen.
    Send(SendRequest),
    /// Change the box's trust set (the writer applies it, stores it and
    /// hands it to the gate: one at a time, so no edit is lost).
    Trust(crate::engine::trust::TrustEdit),
    /// One command, live or finished; answered with a `View` after the
    /// round's commit (a finished one's result is read from its group on
    /// disk, and may be in this very round).
    Show(CommandId),
    /// A device's live commands in delivery order; answered with `Views`.
    List {
        /// The device (or `cap:` pool) whose queue to list.
        device: DeviceId,
    },
    /// Cancel a live command (a broadcast: every open child); answered with
    /// its `View` as cancelled.
    Cancel(CommandId),
    /// The hub above cancels a command it sent down (edge side; see
    /// `QueueCore::cancel_from_hub`).
    HubCancel(CommandId),
    /// Queue a dead or failed command again with fresh attempts (the writer
    /// reads its result record first); answered with its `View`.
    Retry(CommandId),
    /// The queue's counters; answered with `Stats`, which the writer fills
    /// in (with its flush timings) once the round is written.
    Stats,
    /// Register or re-admit a device, replacing any record of its id;
    /// answered with `Done`.
    Enroll(DeviceRecord),
    /// Enroll, refusing an existing id unless `force` (see `enroll`).
    EnrollNew {
        /// The device's new record.
        record: DeviceRecord,
        /// Replace a record the id already has (enrolled or revoked).
        force: bool,
    },
    /// Revoke a device: its session ends and its next connect is refused;
    /// answered with its `Device` record as revoked.
    Revoke(DeviceId),
    /// Every enrolled device and those the boxes below reported; answered
    /// with `Devices`.
    Devices,
    /// Change an enrolled device's tags and capabilities.
    Relabel(Relabel),
    /// A device sends a command (checked against the ACL).
    DeviceSend {
        /// The sending device, checked against the ACL and made the origin.
        from: DeviceId,
        /// Chosen by the shell when it must note the id first (a command
        /// naming an artifact); `None`: a new one.
        id: Option<CommandId>,
        /// What to send, as the device asked it.
        req: SendRequest,
    },
    /// A command forwarded by the hub above, under the hub's id (edge side).
    SendAs {
        /// The hub's id for it, kept so the edge dedupes a second forward.
        id: CommandId,
        /// What to send; its origin says which uplink it came by.
        req: SendRequest,
    },
    /// Telemetry a device sent, for the upstream.
    Event {
        /// The device that sent it (the box's own id for its alerts).
        device: DeviceId,
        /// The event's bytes, carried up as they came.
        payload: Vec<u8>,
        /// When the box took it (ms since the Unix epoch).
        at: Millis,
    },
    /// A gateway has a forwarded command durably (hub side).
    Handed {
        /// The gateway device (the box below) that has it.
        gateway: DeviceId,
        /// The command it acknowledged with `Accepted`.
        id: CommandId,
    },
    /// Outbox records from a gateway (hub side); answered with the cursor.
    Up {
        /// The gateway device whose outbox they are.
        edge: DeviceId,
        /// The records in seq order; those at or below its cursor are skipped.
        entries: Vec<UpEntry>,
    },
    /// The database a gateway's outbox seqs count in (hub side, `UpFrom`).
    UpFrom {
        /// The gateway device that said it.
        edge: DeviceId,
        /// The edge database's uplink epoch (meta key `uplink-epoch`).
        epoch: u64,
    },
    /// The hub stored every outbox record up to this seq (edge side).
    UpAck(u64),
    /// A new uplink session: report every device's presence again.
    PresenceSnapshot,
    /// Outbox records after a seq, at most this many (edge side).
    OutboxRead {
        /// The seq to read after: the cursor's last sent.
        after: u64,
        /// At most about this many records (whole groups are read, so the
        /// last one may overshoot).
        max: usize,
    },
    /// The outbox's size and compaction counters; answered with
    /// `OutboxStats`.
    OutboxStats,
    /// A command the box ran itself ended (a workflow handed down by the
    /// hub): recorded once, as a device's result would be.
    Finished(Box<ResultRecord>),
}

/// Tags and capabilities to add to or remove from a device.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Relabel {
    /// The enrolled device to change.
    pub device: DeviceId,
    /// Tags to give it (one it has already is left be).
    pub add_tags: Vec<String>,
    /// Tags to take away (one it lacks is left be).
    pub remove_tags: Vec<String>,
    /// Capabilities to give it, so it joins those `cap:` pools.
    pub add_caps: Vec<String>,
    /// Capabilities to take away.
    pub remove_caps: Vec<String>,
}

/// The core's answer to a `CoreRequest`.
// Short-lived (one per request): boxing the view would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum CoreReply {
    /// A send was taken (`Send`, `DeviceSend`, `SendAs`): its id and state.
    Receipt(SendReceipt),
    /// One command as it stands (`Show`, `Cancel`, `HubCancel`, `Retry`).
    View(CommandView),
    /// A device's commands (`List`).
    Views(Vec<CommandView>),
    /// The queue's counters (`Stats`).
    Stats(QueueStats),
    /// A device's record after the change (`Revoke`, `Relabel`).
    Device(DeviceRecord),
    /// Every device as `outpost devices` shows it (`Devices`).
    Devices(Vec<DeviceView>),
    /// Done, nothing to tell (`Enroll`, `EnrollNew`, `Handed`, `Event`,
    /// `UpFrom`, `UpAck`, `PresenceSnapshot`, `Finished`).
    Done,
    /// The outbox seq to acknowledge to the edge (`Up`).
    Cursor(u64),
    /// Outbox records, oldest first (`OutboxRead`).
    Outbox(Vec<UpEntry>),
    /// The outbox's counters (`OutboxStats`).
    OutboxStats(OutboxStats),
    /// The key a trust edit added or removed.
    Trusted(crate::engine::trust::TrustedKey),
}

fn unexpected<T>(what: &str) -> Result<T, QueueError> {
    Err(QueueError::BadRequest(format!(
        "internal: unexpected reply, wanted {what}"
    )))
}

impl CoreReply {
    /// The `Receipt` reply; any other is a `BadRequest` (an internal error).
    pub fn into_receipt(self) -> Result<SendReceipt, QueueError> {
        match self {
            CoreReply::Receipt(r) => Ok(r),
            _ => unexpected("receipt"),
        }
    }
    /// The `View` reply; any other is a `BadRequest` (an internal error).
    pub fn into_view(self) -> Result<CommandView, QueueError> {
        match self {
            CoreReply::View(v) => Ok(v),
            _ => unexpected("view"),
        }
    }
    /// The `Views` reply; any other is a `BadRequest` (an internal error).
    pub fn into_views(self) -> Result<Vec<CommandView>, QueueError> {
        match self {
            CoreReply::Views(v) => Ok(v),
            _ => unexpected("views"),
        }
    }
    /// The `Stats` reply; any other is a `BadRequest` (an internal error).
    pub fn into_stats(self) -> Result<QueueStats, QueueError> {
        match self {
            CoreReply::Stats(s) => Ok(s),
            _ => unexpected("stats"),
        }
    }
    /// The `Device` reply; any other is a `BadRequest` (an internal error).
    pub fn into_device(self) -> Result<DeviceRecord, QueueError> {
        match self {
            CoreReply::Device(d) => Ok(d),
            _ => unexpected("device"),
        }
    }
    /// The `Devices` reply; any other is a `BadRequest` (an internal error).
    pub fn into_devices(self) -> Result<Vec<DeviceView>, QueueError> {
        match self {
            CoreReply::Devices(d) => Ok(d),
            _ => unexpected("devices"),
        }
    }
    /// The `Cursor` reply; any other is a `BadRequest` (an internal error).
    pub fn into_cursor(self) -> Result<u64, QueueError> {
        match self {
            CoreReply::Cursor(c) => Ok(c),
            _ => unexpected("cursor"),
        }
    }
    /// The `Outbox` reply; any other is a `BadRequest` (an internal error).
    pub fn into_outbox(self) -> Result<Vec<UpEntry>, QueueError> {
        match self {
            CoreReply::Outbox(e) => Ok(e),
            _ => unexpected("outbox records"),
        }
    }
    /// The `OutboxStats` reply; any other is a `BadRequest` (an internal error).
    pub fn into_outbox_stats(self) -> Result<OutboxStats, QueueError> {
        match self {
            CoreReply::OutboxStats(s) => Ok(s),
            _ => unexpected("outbox stats"),
        }
    }
}

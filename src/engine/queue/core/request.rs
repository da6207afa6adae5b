//! What the writer asks of the core and what it answers: one request
//! type for everything a caller may ask in a round (`CoreRequest`), and
//! the replies with their unwrapping into the caller's type.

use super::*;

/// A request from the shell (the admin API and the device links).
#[derive(Clone, Debug)]
pub enum CoreRequest {
    Send(SendRequest),
    /// Change the box's trust set (the writer applies it, stores it and
    /// hands it to the gate: one at a time, so no edit is lost).
    Trust(crate::engine::trust::TrustEdit),
    Show(CommandId),
    List {
        device: DeviceId,
        include_finished: bool,
    },
    Cancel(CommandId),
    /// The hub above cancels a command it sent down (edge side; see
    /// `QueueCore::cancel_from_hub`).
    HubCancel(CommandId),
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
        /// Chosen by the shell when it must note the id first (a command
        /// naming an artifact); `None`: a new one.
        id: Option<CommandId>,
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
    /// The database a gateway's outbox seqs count in (hub side, `UpFrom`).
    UpFrom {
        edge: DeviceId,
        epoch: u64,
    },
    /// The hub stored every outbox record up to this seq (edge side).
    UpAck(u64),
    /// A new uplink session: report every device's presence again.
    PresenceSnapshot,
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
    /// The key a trust edit added or removed.
    Trusted(crate::engine::trust::TrustedKey),
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

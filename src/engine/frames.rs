//! The device wire protocol's messages and their codec, sans IO (DESIGN
//! §3; for implementers: docs/PROTOCOL.md). Reading and writing them on a
//! stream is `proto`'s.
//!
//! One QUIC connection per device, ALPN `outpost/1`. The device opens one
//! bidirectional control stream; both directions carry frames: a `u32`
//! big-endian body length, then the postcard encoding of a [`DeviceFrame`]
//! (device → box) or a [`BoxFrame`] (box → device).
//!
//! Version rule: the major version changes when an existing message's layout
//! changes; peers with different majors cannot talk, and the box answers
//! `Error{UnsupportedVersion}` naming both. A minor version only appends new
//! message variants (at the end of an enum, so old tags keep their meaning);
//! a side sends a newer variant only when the peer announced a minor that
//! knows it. Unknown tags are answered with `Error{UnknownMessage}`.

use crate::engine::command::{CommandId, Millis, Outcome, Priority, SendOptions, State};
use crate::engine::journal::UpEntry;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A protocol version, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    /// Changes only when an existing message's layout changes; peers of
    /// different majors cannot talk.
    pub major: u16,
    /// Counts the message variants appended within the major; a side sends
    /// a variant only to a peer whose minor knows it.
    pub minor: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The protocol version this build speaks.
pub const VERSION: Version = Version { major: 1, minor: 6 };

/// The first minor version with device-to-device `Send` answered by
/// `Sent`/`Refused`, and `Query`/`Status`.
pub const MINOR_SEND: u16 = 1;

/// The first minor version with the gateway messages of upstream sync
/// (`Up`/`Accepted` and `Forward`/`UpAck`): an edge box under a hub.
pub const MINOR_GATEWAY: u16 = 2;

/// The first minor version with artifact fetch streams (`artifact::wire`)
/// beside the control stream; commands carrying an artifact go only to
/// devices at this minor or later.
pub const MINOR_ARTIFACT: u16 = 3;

/// The first minor version with `AckAttempt`: an ack that names the attempt
/// it answers, so a late ack of an earlier attempt cannot end a later one.
/// A device sends it only to a box at this minor or later; a box takes the
/// plain `Ack` of an older device as before.
pub const MINOR_ACK_ATTEMPT: u16 = 4;

/// The first minor version whose hub reads `UpItem::Presence` in `Up`
/// (devices below an edge shown online). An edge sends an older hub a
/// `Seen` in its place, under the same seq.
pub const MINOR_PRESENCE: u16 = 5;

/// The first minor version with `UpFrom`: an edge names the database its
/// outbox seqs count in before its first `Up`, so a hub whose cursor came
/// from an earlier database of that edge (wiped, restored) starts again
/// instead of skipping the new records. Sent only to a hub at this minor.
pub const MINOR_EPOCH: u16 = 6;

/// QUIC application close codes the box uses (the reason text says more).
pub mod close_code {
    /// Normal end.
    pub const NORMAL: u32 = 0;
    /// After a fatal `Error` frame (see its code).
    pub const PROTOCOL: u32 = 1;
    /// The device was revoked.
    pub const REVOKED: u32 = 2;
    /// Another connection of the same device took over.
    pub const REPLACED: u32 = 3;
    /// The box is shutting down; reconnect later.
    pub const SHUTDOWN: u32 = 4;
    /// This bundle is in use elsewhere: another live connection holds the
    /// id and the two kept taking it from each other. Do not reconnect.
    pub const IN_USE: u32 = 5;
    /// The device was enrolled again: this certificate is no longer its
    /// identity. Do not reconnect with it.
    pub const SUPERSEDED: u32 = 6;
}

/// Default largest frame body, in bytes (DESIGN §3).
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// Default number of unacked commands in flight per device (DESIGN §3).
pub const DEFAULT_WINDOW: u32 = 32;

/// Device → box.
///
/// Append new variants only at the end (their tag is their position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceFrame {
    /// First frame on the control stream.
    Hello {
        /// The version the device speaks: the box refuses another major
        /// (`UnsupportedVersion`) and sends only what this minor knows.
        version: Version,
        /// Free text naming the agent, e.g. `outpost-agent/0.1.0`.
        agent: String,
        /// Capabilities the device offers in this session: a subset of those
        /// it is enrolled with (a Hello narrows, never widens). Empty: all
        /// it is enrolled with.
        caps: Vec<String>,
    },
    /// The outcome of a command delivered to this device.
    Ack {
        /// The command this ack ends, as the box sent it in `Command` (or,
        /// from a gateway, in `Forward`). Ends whichever attempt is in
        /// flight; one not in flight is `NotYourCommand`.
        id: CommandId,
        /// What came of it: `Ok` ends it succeeded, `Failed` is retried
        /// while attempts remain, `Rejected` is final. From a gateway,
        /// `Rejected` or `Failed` says it could not take a `Forward`.
        outcome: Outcome,
    },
    /// Telemetry or any other unsolicited data for the box.
    Event {
        /// Opaque to the box, which hands it on with the device id and the
        /// time it arrived (dropped when the consumer is behind). A health
        /// report is JSON (docs/PROTOCOL.md §4).
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// A command for another target, routed by the box (checked by its
    /// ACL). Answered, in the order of `Send`s and `Query`s, by `Sent` or
    /// `Refused` (since 1.1).
    Send {
        /// The target: a device id (`dev-8`), `tag:NAME` or `cap:NAME`;
        /// the box's ACL decides whether this device may address it.
        to: String,
        /// The command's payload, handed unchanged to the target's handler.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// Priority, ttl, attempts, idempotency key, dependency and earliest
        /// delivery; each `None` takes the box's default. The origin is
        /// always this device, never a field.
        opts: SendOptions,
    },
    /// Liveness probe; answered with `Pong`.
    Ping,
    /// The state of a command this device sent (since 1.1); answered by
    /// `Status` or `Refused{NotFound}`.
    Query {
        /// A command this device sent, as `Sent` named it; one sent by
        /// anyone else, or past retention, is `Refused{NotFound}`.
        id: CommandId,
    },
    /// Gateway only (since 1.2): records of the edge's outbox, in seq
    /// order. Answered by `UpAck` once the hub has stored them.
    Up {
        /// Outbox records, seq ascending. The hub applies each once (it
        /// skips a seq at or below its cursor for this edge); a batch it
        /// cannot store is answered by a non-fatal `Error` instead, and the
        /// edge sends it again later.
        entries: Vec<UpEntry>,
    },
    /// Gateway only (since 1.2): a `Forward`ed command is durable in the
    /// edge's queue (`duplicate`: it already was). Its end comes later, as
    /// an `Up` result.
    Accepted {
        /// The `Forward`'s id, under which the edge queued the command.
        /// Takes it out of the gateway's window on the hub.
        id: CommandId,
        /// The edge already had this id (a resend after a drop or a
        /// restart) and queued nothing; the hub treats both alike.
        duplicate: bool,
    },
    /// Since 1.3: how far the fetch of the artifact a delivered command
    /// names has got (`bytes` of `total` on the device). At most about
    /// once a second, and once at the end; never answered.
    Progress {
        /// The delivered command whose artifact is being fetched (from a
        /// gateway, the `Forward`'s id). One for a command not fetching on
        /// this connection is ignored.
        id: CommandId,
        /// Bytes of the file on the device so far: chunks already cached
        /// plus those fetched.
        bytes: u64,
        /// The file's size in bytes (the manifest's `size`).
        total: u64,
    },
    /// Since 1.4: the outcome of one attempt of a delivered command (the
    /// `attempt` of the `Command` it answers). Only the attempt in flight
    /// ends the command; an earlier attempt's is dropped as stale.
    AckAttempt {
        /// The command this ack ends, as the box sent it in `Command`.
        id: CommandId,
        /// The `attempt` of the `Command` this answers; an ack of any
        /// other attempt than the one in flight is dropped.
        attempt: u32,
        /// What came of it: `Ok` ends it succeeded, `Failed` is retried
        /// while attempts remain, `Rejected` is final.
        outcome: Outcome,
    },
    /// Gateway only (since 1.6), before its first `Up` of a session: the
    /// epoch of the edge's database, which its outbox seqs count in. Never
    /// answered; a hub whose cursor names another epoch applies this
    /// outbox from its start and forwards again what it had handed down.
    UpFrom {
        /// A random number minted with the edge's database and renewed by
        /// `outpost restore`: a new one means seqs started again.
        epoch: u64,
    },
}

impl DeviceFrame {
    /// The message name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceFrame::Hello { .. } => "Hello",
            DeviceFrame::Ack { .. } => "Ack",
            DeviceFrame::Event { .. } => "Event",
            DeviceFrame::Send { .. } => "Send",
            DeviceFrame::Ping => "Ping",
            DeviceFrame::Query { .. } => "Query",
            DeviceFrame::Up { .. } => "Up",
            DeviceFrame::Accepted { .. } => "Accepted",
            DeviceFrame::Progress { .. } => "Progress",
            DeviceFrame::AckAttempt { .. } => "AckAttempt",
            DeviceFrame::UpFrom { .. } => "UpFrom",
        }
    }
}

/// Box → device.
///
/// Append new variants only at the end (their tag is their position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BoxFrame {
    /// Answer to `Hello`: the box's version, the device id from the verified
    /// certificate, and how many commands may be unacked at once.
    Welcome {
        /// The box's own version (`VERSION`); the device sends only what
        /// this minor knows (e.g. `AckAttempt` from 1.4).
        version: Version,
        /// The id in the device's certificate (its `urn:outpost:device:`
        /// URI): the one the box knows it by, never taken from a frame.
        device_id: String,
        /// Most commands delivered and not yet acked at once; acking one
        /// lets the next come.
        window: u32,
    },
    /// A command to run. `attempt` is 1-based; a redelivery after a
    /// reconnect carries the same `id`.
    Command {
        /// The command's ULID, the same on every delivery: a device that
        /// has seen it acks again with the first outcome rather than run it
        /// twice.
        id: CommandId,
        /// The priority it was queued with; the box delivers highest first,
        /// FIFO within one.
        priority: Priority,
        /// The sender's payload, unchanged, for the device's handler.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// Which delivery this is, from 1; `AckAttempt` names it back.
        attempt: u32,
        /// Absolute instant (ms since the Unix epoch) after which the result
        /// is no longer wanted.
        deadline: Option<Millis>,
        /// Operator signature, when the command was signed.
        #[serde(with = "serde_bytes")]
        signature: Option<Vec<u8>>,
    },
    /// Stop working on this command if still running; do not ack it.
    Cancel {
        /// A command delivered to this device (an ack after the cancel gets
        /// a harmless `NotYourCommand`); to a gateway, one forwarded to it,
        /// whose end then comes up as an `Up` result.
        id: CommandId,
    },
    /// Something went wrong; see the code. Fatal codes are followed by the
    /// connection closing.
    Error {
        /// What went wrong; `ErrorCode::is_fatal` says whether the
        /// connection closes after it.
        code: ErrorCode,
        /// For people: the details, and what to do.
        message: String,
    },
    /// Answer to `Ping`.
    Pong,
    /// A `Send` was accepted and is durable: its command id (`duplicate`:
    /// its idempotency key matched an earlier command, whose id this is).
    Sent {
        /// The id the command is stored under, for `Query`.
        id: CommandId,
        /// The `Send`'s idempotency key matched an earlier command from
        /// this device; nothing new was queued and `id` is that command's.
        duplicate: bool,
    },
    /// A `Send` or `Query` was refused; the code says why (not fatal).
    Refused {
        /// Why: `Forbidden`, `NoRoute`, `Full`, `BadRequest`, `NotFound`
        /// (or `Internal`, `ShuttingDown` when the box failed to store it).
        code: ErrorCode,
        /// For people: the details, and what to do.
        message: String,
    },
    /// Answer to `Query`.
    Status {
        /// The command asked about, as in the `Query`.
        id: CommandId,
        /// Where it is now: queued, delivered (which attempt) or how it
        /// ended.
        state: State,
        /// The outcome its target reported, once it has ended; `None` while
        /// it is live, or when the box ended it.
        outcome: Option<Outcome>,
        /// Why the box ended it, when its target did not (expired,
        /// cancelled, a failed dependency), or, while it waits on `after`,
        /// for which command; `None` otherwise.
        error: Option<String>,
    },
    /// To a gateway (since 1.2): a command for a target below it, to queue
    /// durably under the same id and answer with `Accepted` (or `Ack` with
    /// `Rejected`/`Failed` when it cannot). A redelivery carries the same
    /// id; the edge dedupes.
    Forward(Box<Forward>),
    /// To a gateway (since 1.2): every outbox record up to `seq` is stored
    /// on the hub; the edge may delete them.
    UpAck {
        /// The highest outbox seq the hub has stored (in the epoch of the
        /// edge's `UpFrom`); everything at or below it may go.
        seq: u64,
    },
}

/// A command a hub hands down to an edge box (`BoxFrame::Forward`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// The command's id on the hub; the edge queues it under the same id
    /// and answers a resend of one it has `Accepted{duplicate: true}`.
    pub id: CommandId,
    /// The target on the edge: `dev-7`, `tag:line-3` or `cap:camera`.
    pub target: String,
    /// Its priority on the hub, kept on the edge.
    pub priority: Priority,
    /// The sender's payload, unchanged.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Time to live left when it was forwarded (relative, so the two
    /// boxes' clocks need not agree).
    pub ttl_ms: Option<u64>,
    /// The command's whole attempt limit (not what is left of it on the
    /// hub); the edge applies it to its own deliveries.
    pub max_attempts: u32,
    /// Runs only once this command (also sent through this edge) succeeded.
    pub after: Option<CommandId>,
    /// The sender's earliest delivery, ms since the Unix epoch (absolute,
    /// unlike `ttl_ms`, so read on the edge's clock); `None`: at once.
    pub not_before: Option<Millis>,
    /// Who sent it on the hub (`cli`, a device id).
    pub origin: String,
    /// The command's envelope as the hub holds it (an operator's signed
    /// one, or an unsigned one naming an artifact), passed on unchanged;
    /// `None`: it has neither.
    #[serde(with = "serde_bytes")]
    pub signature: Option<Vec<u8>>,
}

impl BoxFrame {
    /// The message name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            BoxFrame::Welcome { .. } => "Welcome",
            BoxFrame::Command { .. } => "Command",
            BoxFrame::Cancel { .. } => "Cancel",
            BoxFrame::Error { .. } => "Error",
            BoxFrame::Pong => "Pong",
            BoxFrame::Sent { .. } => "Sent",
            BoxFrame::Refused { .. } => "Refused",
            BoxFrame::Status { .. } => "Status",
            BoxFrame::Forward(_) => "Forward",
            BoxFrame::UpAck { .. } => "UpAck",
        }
    }
}

/// Codes of `BoxFrame::Error`. On the wire a varint (the number below), so
/// a device can read codes newer than itself as [`ErrorCode::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Major version mismatch (fatal).
    UnsupportedVersion,
    /// A frame was over the size limit (fatal).
    FrameTooLarge,
    /// A frame could not be decoded (fatal).
    Malformed,
    /// A frame with a message tag this side does not know (fatal).
    UnknownMessage,
    /// An `Ack` for a command not in flight on this device (not fatal).
    NotYourCommand,
    /// The device is revoked (fatal).
    Revoked,
    /// The box failed; retry later (fatal).
    Internal,
    /// The message is valid but its feature is not enabled (not fatal).
    Unsupported,
    /// A valid message at the wrong time, e.g. no `Hello` first (fatal).
    ProtocolViolation,
    /// The device sent more than the box accepts (fatal).
    TooManyFrames,
    /// The box is shutting down; reconnect later (fatal).
    ShuttingDown,
    /// Another connection of the same device replaced this one (fatal).
    Replaced,
    /// The certificate is valid but the device is not enrolled on this box
    /// (its store was reset); enroll it again (fatal).
    NotEnrolled,
    /// No ACL rule lets this device address the target (`Refused`).
    Forbidden,
    /// No device matches the target (`Refused`).
    NoRoute,
    /// The box is at its queue or disk bound; retry later (`Refused`).
    Full,
    /// The request is invalid, e.g. a bad target or payload (`Refused`).
    BadRequest,
    /// No such command sent by this device (`Refused`).
    NotFound,
    /// A code this build does not know.
    Other(u32),
}

impl ErrorCode {
    /// The number on the wire.
    pub fn as_u32(self) -> u32 {
        match self {
            ErrorCode::UnsupportedVersion => 0,
            ErrorCode::FrameTooLarge => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::UnknownMessage => 3,
            ErrorCode::NotYourCommand => 4,
            ErrorCode::Revoked => 5,
            ErrorCode::Internal => 6,
            ErrorCode::Unsupported => 7,
            ErrorCode::ProtocolViolation => 8,
            ErrorCode::TooManyFrames => 9,
            ErrorCode::ShuttingDown => 10,
            ErrorCode::Replaced => 11,
            ErrorCode::NotEnrolled => 12,
            ErrorCode::Forbidden => 13,
            ErrorCode::NoRoute => 14,
            ErrorCode::Full => 15,
            ErrorCode::BadRequest => 16,
            ErrorCode::NotFound => 17,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code for a number on the wire.
    pub fn from_u32(n: u32) -> Self {
        match n {
            0 => ErrorCode::UnsupportedVersion,
            1 => ErrorCode::FrameTooLarge,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::UnknownMessage,
            4 => ErrorCode::NotYourCommand,
            5 => ErrorCode::Revoked,
            6 => ErrorCode::Internal,
            7 => ErrorCode::Unsupported,
            8 => ErrorCode::ProtocolViolation,
            9 => ErrorCode::TooManyFrames,
            10 => ErrorCode::ShuttingDown,
            11 => ErrorCode::Replaced,
            12 => ErrorCode::NotEnrolled,
            13 => ErrorCode::Forbidden,
            14 => ErrorCode::NoRoute,
            15 => ErrorCode::Full,
            16 => ErrorCode::BadRequest,
            17 => ErrorCode::NotFound,
            n => ErrorCode::Other(n),
        }
    }

    /// Whether the box closes the connection after sending this code.
    pub fn is_fatal(self) -> bool {
        !matches!(
            self,
            ErrorCode::NotYourCommand
                | ErrorCode::Unsupported
                | ErrorCode::Forbidden
                | ErrorCode::NoRoute
                | ErrorCode::Full
                | ErrorCode::BadRequest
                | ErrorCode::NotFound
        )
    }

    /// Every known code, in wire order.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooLarge,
        ErrorCode::Malformed,
        ErrorCode::UnknownMessage,
        ErrorCode::NotYourCommand,
        ErrorCode::Revoked,
        ErrorCode::Internal,
        ErrorCode::Unsupported,
        ErrorCode::ProtocolViolation,
        ErrorCode::TooManyFrames,
        ErrorCode::ShuttingDown,
        ErrorCode::Replaced,
        ErrorCode::NotEnrolled,
        ErrorCode::Forbidden,
        ErrorCode::NoRoute,
        ErrorCode::Full,
        ErrorCode::BadRequest,
        ErrorCode::NotFound,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "error code {n}"),
            known => fmt::Debug::fmt(known, f),
        }
    }
}

// A postcard unit variant is its index as a varint, which is exactly how a
// u32 is encoded: serialising as u32 keeps the layout of a plain enum while
// letting old readers accept new codes.
impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.as_u32())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u32::deserialize(d).map(ErrorCode::from_u32)
    }
}

/// A frame type: how many message tags it knows, to tell an unknown message
/// from a malformed one.
pub trait Frame: Serialize + DeserializeOwned {
    /// Number of variants (tags `0..KNOWN_TAGS`).
    const KNOWN_TAGS: u32;
}

impl Frame for DeviceFrame {
    const KNOWN_TAGS: u32 = 11;
}

impl Frame for BoxFrame {
    const KNOWN_TAGS: u32 = 10;
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A body over the limit: a length prefix read, or a frame about to be
    /// written (which is then not sent).
    #[error("a frame of {len} bytes is over the limit of {max} bytes; send smaller payloads (or raise the limit on both ends)")]
    TooLarge {
        /// The body's length in bytes (claimed by the prefix, when read).
        len: u64,
        /// The limit it was checked against, in bytes.
        max: usize,
    },
    /// The stream ended inside the length prefix or the body.
    #[error("the stream ended in the middle of a frame (peer crashed or closed early)")]
    Truncated,
    /// A body that does not decode, or has bytes after its message; the
    /// text is postcard's error or the trailing count.
    #[error("malformed frame: {0}; the peer does not speak outpost protocol {VERSION}")]
    Malformed(String),
    /// A body that does not decode and whose first varint is beyond the
    /// tags this side knows: a newer peer's message.
    #[error("unknown message tag {tag} (this side knows tags 0..{known}); the peer is newer and sent a message without checking the version")]
    UnknownMessage {
        /// The message tag read.
        tag: u32,
        /// How many tags this side knows (`Frame::KNOWN_TAGS`).
        known: u32,
    },
    /// Reading or writing the transport failed (a reset stream, a lost
    /// connection).
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The error code to tell the peer, if the peer is at fault.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            FrameError::TooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            FrameError::Malformed(_) => Some(ErrorCode::Malformed),
            FrameError::UnknownMessage { .. } => Some(ErrorCode::UnknownMessage),
            FrameError::Truncated | FrameError::Io(_) => None,
        }
    }
}

/// Read a LEB128 varint u32 from the start of `b`.
fn leading_tag(b: &[u8]) -> Option<u32> {
    let mut v: u64 = 0;
    for (i, byte) in b.iter().take(5).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(v).ok();
        }
    }
    None
}

/// Decode one frame body (without the length prefix).
pub fn decode<T: Frame>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((frame, [])) => Ok(frame),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        Err(e) => match leading_tag(body) {
            Some(tag) if tag >= T::KNOWN_TAGS => Err(FrameError::UnknownMessage {
                tag,
                known: T::KNOWN_TAGS,
            }),
            _ => Err(FrameError::Malformed(e.to_string())),
        },
    }
}

/// Encode one frame: the length prefix and the body.
pub fn encode<T: Frame>(frame: &T) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    // Serialising plain data into a Vec cannot fail; an empty body would be
    // caught by the reader as malformed rather than panic here.
    let body = postcard::to_stdvec(frame).unwrap_or_default();
    out[..4].copy_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Append one encoded frame to `out`; refuses (appending nothing) a frame
/// whose body is over `max`.
pub fn encode_into<T: Frame>(frame: &T, max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    if let Err(e) = postcard::to_io(frame, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let len = out.len() - start - 4;
    if len > max {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Check a peer's version against ours: the majors must match.
pub fn check_version(peer: Version) -> Result<(), String> {
    if peer.major == VERSION.major {
        Ok(())
    } else {
        Err(format!(
            "unsupported protocol version: the device speaks {peer}, this box speaks {VERSION}; upgrade the older side"
        ))
    }
}

/// The example frames of docs/PROTOCOL.md, with their names. A test checks
/// that the document shows exactly these bytes.
#[doc(hidden)]
pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let id: CommandId = "01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A".parse().unwrap_or(CommandId(0));
    let dev = |f: DeviceFrame| encode(&f);
    let bx = |f: BoxFrame| encode(&f);
    vec![
        (
            "Hello{version: 1.0, agent: \"a/1\", caps: [\"exec\"]}",
            dev(DeviceFrame::Hello {
                version: Version { major: 1, minor: 0 },
                agent: "a/1".into(),
                caps: vec!["exec".into()],
            }),
        ),
        (
            "Welcome{version: 1.0, device_id: \"dev-7\", window: 32}",
            bx(BoxFrame::Welcome {
                version: Version { major: 1, minor: 0 },
                device_id: "dev-7".into(),
                window: 32,
            }),
        ),
        (
            "Command{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, priority: High, payload: \"hi\", attempt: 1, deadline: None, signature: None}",
            bx(BoxFrame::Command {
                id,
                priority: Priority::High,
                payload: b"hi".to_vec(),
                attempt: 1,
                deadline: None,
                signature: None,
            }),
        ),
        (
            "Ack{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, outcome: Ok(\"ok\")}",
            dev(DeviceFrame::Ack {
                id,
                outcome: Outcome::Ok(b"ok".to_vec()),
            }),
        ),
        (
            "Ack{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, outcome: Failed{code: -1, message: \"no\"}}",
            dev(DeviceFrame::Ack {
                id,
                outcome: Outcome::Failed {
                    code: -1,
                    message: "no".into(),
                },
            }),
        ),
        (
            "Ack{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, outcome: Rejected{reason: \"x\"}}",
            dev(DeviceFrame::Ack {
                id,
                outcome: Outcome::Rejected { reason: "x".into() },
            }),
        ),
        (
            "AckAttempt{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, attempt: 2, outcome: Ok(\"ok\")}",
            dev(DeviceFrame::AckAttempt {
                id,
                attempt: 2,
                outcome: Outcome::Ok(b"ok".to_vec()),
            }),
        ),
        ("Cancel{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A}", bx(BoxFrame::Cancel { id })),
        (
            "Event{payload: [1, 2]}",
            dev(DeviceFrame::Event {
                payload: vec![1, 2],
            }),
        ),
        (
            "Send{to: \"dev-8\", payload: \"x\", opts: {priority: Normal, ttl_ms: Some(60000), rest None}}",
            dev(DeviceFrame::Send {
                to: "dev-8".into(),
                payload: b"x".to_vec(),
                opts: SendOptions {
                    ttl_ms: Some(60_000),
                    ..SendOptions::default()
                },
            }),
        ),
        (
            "Error{code: UnsupportedVersion, message: \"v\"}",
            bx(BoxFrame::Error {
                code: ErrorCode::UnsupportedVersion,
                message: "v".into(),
            }),
        ),
        ("Ping", dev(DeviceFrame::Ping)),
        ("Pong", bx(BoxFrame::Pong)),
        (
            "Sent{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, duplicate: false}",
            bx(BoxFrame::Sent {
                id,
                duplicate: false,
            }),
        ),
        (
            "Refused{code: Forbidden, message: \"no\"}",
            bx(BoxFrame::Refused {
                code: ErrorCode::Forbidden,
                message: "no".into(),
            }),
        ),
        (
            "Query{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A}",
            dev(DeviceFrame::Query { id }),
        ),
        (
            "Status{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, state: Succeeded, outcome: Some(Ok(\"ok\")), error: None}",
            bx(BoxFrame::Status {
                id,
                state: State::Succeeded,
                outcome: Some(Outcome::Ok(b"ok".to_vec())),
                error: None,
            }),
        ),
        (
            "Accepted{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, duplicate: false}",
            dev(DeviceFrame::Accepted {
                id,
                duplicate: false,
            }),
        ),
        (
            "UpAck{seq: 300}",
            bx(BoxFrame::UpAck { seq: 300 }),
        ),
        (
            "UpFrom{epoch: 300}",
            dev(DeviceFrame::UpFrom { epoch: 300 }),
        ),
        (
            "Forward{id: 01JAX4ZJ4G8Q3R5T7V9W1Y2Z3A, target: \"d-1\", priority: Normal, payload: \"x\", ttl_ms: Some(1000), max_attempts: 3, after: None, not_before: None, origin: \"cli\", signature: None}",
            bx(BoxFrame::Forward(Box::new(Forward {
                id,
                target: "d-1".into(),
                priority: Priority::Normal,
                payload: b"x".to_vec(),
                ttl_ms: Some(1000),
                max_attempts: 3,
                after: None,
                not_before: None,
                origin: "cli".into(),
                signature: None,
            }))),
        ),
        (
            "Up{entries: [{seq: 7, item: Seen{device: \"d-1\", at: 1}}]}",
            dev(DeviceFrame::Up {
                entries: vec![UpEntry {
                    seq: 7,
                    item: crate::engine::journal::UpItem::Seen {
                        device: "d-1".into(),
                        at: 1,
                    },
                }],
            }),
        ),
    ]
}

/// Hex with a space after the 4-byte length prefix, as in the docs.
#[doc(hidden)]
pub fn hex_frame(bytes: &[u8]) -> String {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "{} | {}",
        hex(&bytes[..4.min(bytes.len())]),
        hex(&bytes[4.min(bytes.len())..])
    )
}

/// One frame of every message (and every error code), for the tests of
/// both the codec and the stream IO (`proto`).
#[cfg(test)]
pub(crate) mod samples {
    use super::*;

    pub(crate) fn all_device_frames() -> Vec<DeviceFrame> {
        vec![
            DeviceFrame::Hello {
                version: VERSION,
                agent: "t".into(),
                caps: vec!["a".into(), "b".into()],
            },
            DeviceFrame::Ack {
                id: CommandId(u128::MAX),
                outcome: Outcome::Failed {
                    code: i32::MIN,
                    message: "é".into(),
                },
            },
            DeviceFrame::Event {
                payload: vec![0; 300],
            },
            DeviceFrame::Send {
                to: "tag:x".into(),
                payload: vec![],
                opts: SendOptions {
                    priority: Priority::Low,
                    ttl_ms: Some(1),
                    max_attempts: Some(3),
                    key: Some("k".into()),
                    after: Some(CommandId(7)),
                    not_before: Some(u64::MAX),
                },
            },
            DeviceFrame::Ping,
            DeviceFrame::Query { id: CommandId(9) },
        ]
    }

    pub(crate) fn all_box_frames() -> Vec<BoxFrame> {
        let mut v: Vec<BoxFrame> = ErrorCode::ALL
            .iter()
            .chain(&[ErrorCode::Other(999)])
            .map(|&code| BoxFrame::Error {
                code,
                message: code.to_string(),
            })
            .collect();
        v.extend([
            BoxFrame::Welcome {
                version: VERSION,
                device_id: "d".into(),
                window: 32,
            },
            BoxFrame::Command {
                id: CommandId(1),
                priority: Priority::High,
                payload: vec![9; 1000],
                attempt: 2,
                deadline: Some(5),
                signature: Some(vec![1; 64]),
            },
            BoxFrame::Cancel { id: CommandId(3) },
            BoxFrame::Pong,
            BoxFrame::Sent {
                id: CommandId(4),
                duplicate: true,
            },
            BoxFrame::Refused {
                code: ErrorCode::NoRoute,
                message: "none".into(),
            },
            BoxFrame::Status {
                id: CommandId(5),
                state: State::Delivered { attempt: 2 },
                outcome: None,
                error: Some("e".into()),
            },
        ]);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many message tags `T` decodes: a tag followed by zeros decodes
    /// for every variant (zero is an empty string or list, `None`, the
    /// first variant of an inner enum), and for no tag past them.
    fn decodable_tags<T: Frame>() -> u32 {
        let mut body = [0u8; 64];
        let mut n = 0;
        for tag in 0..120u8 {
            body[0] = tag;
            if postcard::take_from_bytes::<T>(&body).is_ok() {
                assert_eq!(u32::from(tag), n, "tag {tag} decodes past a gap");
                n += 1;
            }
        }
        n
    }

    #[test]
    fn each_side_knows_as_many_tags_as_its_frame_has_messages() {
        // KNOWN_TAGS is written by hand: this catches a message appended
        // without it, for either side.
        assert_eq!(decodable_tags::<DeviceFrame>(), DeviceFrame::KNOWN_TAGS);
        assert_eq!(decodable_tags::<BoxFrame>(), BoxFrame::KNOWN_TAGS);
    }

    #[test]
    fn progress_is_tag_8_and_three_varints() {
        // Byte for byte as PROTOCOL.md §10 gives it: tag, id (u128
        // varint), bytes, total.
        let f = DeviceFrame::Progress {
            id: CommandId(5),
            bytes: 300,
            total: 1000,
        };
        let bytes = encode(&f);
        assert_eq!(&bytes[4..], &[0x08, 0x05, 0xac, 0x02, 0xe8, 0x07]);
        assert_eq!(decode::<DeviceFrame>(&bytes[4..]).unwrap(), f);
    }

    #[test]
    fn ack_attempt_is_tag_9_and_names_its_attempt() {
        // PROTOCOL.md §4: tag, id (u128 varint), attempt, outcome.
        let f = DeviceFrame::AckAttempt {
            id: CommandId(5),
            attempt: 2,
            outcome: Outcome::Ok(b"ok".to_vec()),
        };
        let bytes = encode(&f);
        assert_eq!(&bytes[4..], &[0x09, 0x05, 0x02, 0x00, 0x02, b'o', b'k']);
        assert_eq!(decode::<DeviceFrame>(&bytes[4..]).unwrap(), f);
    }

    #[test]
    fn up_from_is_tag_10_and_carries_the_epoch() {
        // PROTOCOL.md §4: tag, epoch (u64 varint).
        let f = DeviceFrame::UpFrom { epoch: 300 };
        let bytes = encode(&f);
        assert_eq!(&bytes[4..], &[0x0a, 0xac, 0x02]);
        assert_eq!(decode::<DeviceFrame>(&bytes[4..]).unwrap(), f);
    }

    #[test]
    fn error_codes_are_stable_and_open_ended() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.as_u32(), i as u32);
            assert_eq!(ErrorCode::from_u32(i as u32), *c);
        }
        // A newer box's code still decodes.
        let f: BoxFrame = decode(&[0x03, 0x2a, 0x01, b'x']).unwrap();
        assert_eq!(
            f,
            BoxFrame::Error {
                code: ErrorCode::Other(42),
                message: "x".into()
            }
        );
        assert!(ErrorCode::UnsupportedVersion.is_fatal());
        assert!(!ErrorCode::NotYourCommand.is_fatal());
    }

    #[test]
    fn versions_compare_by_major() {
        check_version(Version {
            major: VERSION.major,
            minor: 99,
        })
        .unwrap();
        let e = check_version(Version { major: 2, minor: 3 }).unwrap_err();
        assert!(e.contains("2.3") && e.contains(&VERSION.to_string()), "{e}");
    }

    #[test]
    fn protocol_doc_shows_the_true_bytes() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let mut missing = Vec::new();
        for (name, bytes) in examples() {
            let line = format!("{name}\n    {}", hex_frame(&bytes));
            if !doc.contains(&line) {
                missing.push(line);
            }
        }
        assert!(
            missing.is_empty(),
            "docs/PROTOCOL.md lacks these examples (copy them in):\n\n{}",
            missing.join("\n\n")
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode::<DeviceFrame>(&body);
            let _ = decode::<BoxFrame>(&body);
        }
    }
}

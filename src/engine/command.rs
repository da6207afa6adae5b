//! The vocabulary every other module shares: command ids, priorities,
//! outcomes, lifecycle states and the command record itself.
//!
//! These types are serialised with postcard both on the wire (`proto`) and in
//! the journal (`store`), so a field added here changes two formats: append
//! new fields only at the end of enums, and bump `proto::VERSION` /
//! `store::SCHEMA_VERSION` when a layout changes.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Milliseconds since the Unix epoch. The sans-IO cores never read a clock:
/// every call that needs the time is handed one of these.
pub type Millis = u64;

/// A device's identity, as written in its certificate. Never taken from a
/// frame: see `identity`.
pub type DeviceId = String;

/// A command id: a ULID, so ids sort by creation time and can be made by any
/// node without coordination.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommandId(pub u128);

impl CommandId {
    /// A fresh id for `now`, with `random` low bits (the caller owns the RNG
    /// so that simulations stay deterministic).
    pub fn new(now: Millis, random: u128) -> Self {
        CommandId(ulid::Ulid::from_parts(now, random).0)
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&ulid::Ulid(self.0), f)
    }
}

impl fmt::Debug for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text was not a command id.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not a command id (expected a 26-character ULID such as 01J9ZQ3M8E5V6X7Y8Z9A0B1C2D)"
)]
pub struct BadCommandId(pub String);

impl FromStr for CommandId {
    type Err = BadCommandId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s.trim())
            .map(|u| CommandId(u.0))
            .map_err(|_| BadCommandId(s.to_string()))
    }
}

/// Delivery priority. Declaration order is the sort order: `High` sorts last,
/// so `Ord` can be used directly to pick the highest.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Priority {
    /// Delivered after every `Normal` and `High` command queued for the
    /// device; the first to be shed when the queue is at its bound.
    Low,
    /// What a sender gets without asking.
    #[default]
    Normal,
    /// Delivered before anything else queued for the device; may shed a
    /// lower-priority command to get into a full queue.
    High,
}

impl Priority {
    /// Every priority, highest first (the order of `rank`).
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The lower-case name the CLI takes and `--json` writes (`high`,
    /// `normal`, `low`).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// Index into per-priority arrays, highest first.
    pub fn rank(self) -> usize {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(format!(
                "unknown priority `{other}` (use high, normal or low)"
            )),
        }
    }
}

/// What a device reports when it is done with a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Ran and succeeded; the bytes are the result.
    // serde_bytes: the same bytes in postcard, decoded in one copy
    // instead of byte by byte.
    Ok(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Ran and failed; retried while attempts remain.
    Failed {
        /// The device's failure code: for the reference agent, the
        /// handler's exit status (128 + the signal when one killed it, 124
        /// on a timeout, 127 when it could not start, -1 when it has none).
        code: i32,
        /// What went wrong, in the device's words (the reference agent
        /// sends the tail of the handler's stderr).
        message: String,
    },
    /// Refused without running (bad payload, unsupported): never retried.
    Rejected {
        /// Why the device refused it, for the operator.
        reason: String,
    },
}

impl Outcome {
    /// Whether the command ran and succeeded.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
}

/// Where a command is in its life. `Delivered` carries the attempt number
/// (1-based) of the delivery in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Waiting in its device's (or pool's) queue: not delivered yet, back
    /// after a failed attempt or a dropped link, held by `after` or
    /// `not_before`, or a broadcast parent with children still open.
    Queued,
    /// Handed to its device (or to the edge that holds it) and not acked
    /// yet.
    Delivered {
        /// The attempt in flight, from 1; it keeps counting across an
        /// operator's retry.
        attempt: u32,
    },
    /// The device acked `Outcome::Ok` (a broadcast: every child did).
    Succeeded,
    /// The device rejected it, or a broadcast's children ended in
    /// different states. Not retried by the box; an operator may `retry`.
    Failed,
    /// The dead letter: its attempts ran out, or its `after` dependency did
    /// not succeed. An operator may `retry`.
    Dead,
    /// Its ttl ran out before it ended.
    Expired,
    /// Cancelled (by an operator, a workflow, a rollout or the hub) before
    /// it ended.
    Cancelled,
    /// Dropped to make room for a higher-priority command while the queue
    /// was at `max_queued` or `max_disk`.
    Shed,
}

impl State {
    /// End states: nothing more happens to the command unless an operator
    /// retries it (`Failed`, `Dead`).
    pub fn is_final(self) -> bool {
        !matches!(self, State::Queued | State::Delivered { .. })
    }

    /// The lower-case name used in `--json` output and filters.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Delivered { .. } => "delivered",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Dead => "dead",
            State::Expired => "expired",
            State::Cancelled => "cancelled",
            State::Shed => "shed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a sender wants a command handled. Everything optional has a box-wide
/// default (see `queue::Limits`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOptions {
    /// The command's priority (`Normal` unless asked).
    pub priority: Priority,
    /// Time to live from enqueue, in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Deliveries allowed before the command goes `Dead`; `None`: the box's
    /// default (5 unless configured). 0 is taken as 1.
    pub max_attempts: Option<u32>,
    /// Idempotency key: the same origin and key return the first command's id.
    pub key: Option<String>,
    /// Run only once this command has succeeded.
    pub after: Option<CommandId>,
    /// Do not deliver before this instant.
    pub not_before: Option<Millis>,
}

/// A command as journalled. The payload lives here on disk; the in-memory
/// index of the queue keeps only a small handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The command's ULID, unique per box and assigned at send (a command
    /// forwarded down by a hub keeps the hub's).
    pub id: CommandId,
    /// The target as the sender wrote it (`dev-7`; later `tag:…`, `cap:…`).
    pub target: String,
    /// The sender's priority.
    pub priority: Priority,
    /// The bytes handed to the device, opaque to the box (at most the
    /// box's `max_payload`, just under 1 MiB by default).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// When the box accepted it, ms since the Unix epoch.
    pub created_at: Millis,
    /// Absolute expiry instant, if any.
    pub expires_at: Option<Millis>,
    /// Deliveries allowed in all, at least 1: the sender's or the box's
    /// default. An operator's retry raises it by a fresh budget, since
    /// attempt numbers keep counting.
    pub max_attempts: u32,
    /// The sender's idempotency key, if it gave one (see `SendOptions`).
    pub key: Option<String>,
    /// The command that must succeed before this one is delivered. `None`
    /// when there is none, or once it was already decided when this was
    /// sent, re-journalled or retried.
    pub after: Option<CommandId>,
    /// The sender's earliest delivery, ms since the Unix epoch; `None`:
    /// at once. Cleared by a retry.
    pub not_before: Option<Millis>,
    /// Who sent it: `cli`, `upstream`, or a device id for device-to-device.
    pub origin: String,
    /// Operator signature over the command, when the sender signed it.
    #[serde(with = "serde_bytes")]
    pub signature: Option<Vec<u8>>,
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision):
/// how records and `--json` write a time.
pub fn rfc3339(ms: Millis) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// A time as a sender writes it: `+DURATION` from `now`, or an RFC 3339
/// time with its zone. The error names neither the flag nor the field:
/// the caller prefixes whichever it reads. A time without a zone is refused: read as UTC it would be off by
/// the site's offset, silently.
pub fn parse_time(s: &str, now: Millis) -> Result<Millis, String> {
    if let Some(d) = s.strip_prefix('+') {
        let d = crate::engine::duration::parse(d)?;
        return Ok(now.saturating_add(d.as_millis() as u64));
    }
    let bad = |why: &str| {
        format!("{why}; write an RFC 3339 time with its zone (2026-11-25T10:00:00Z, 2026-11-25T11:00:00+01:00) or +10m")
    };
    let t = s.trim();
    let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            // A time without its zone is the usual slip: say so plainly.
            let zoned = t.ends_with(['Z', 'z'])
                || t.rfind(['+', '-'])
                    .is_some_and(|i| t[..i].contains(['T', 't', ' ']));
            bad(&if zoned {
                e.to_string()
            } else {
                "no time zone".into()
            })
        })?;
    Ok((at.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
}

/// A device's report of its own health (an event, `DeviceFrame::Event`):
/// the reference agent's `--health CMD` sends one after it connects and
/// after each command that succeeded, naming that command. A rollout
/// whose plan asks for it counts a device as succeeded only once a report
/// after its command says healthy. The payload is JSON, so a device in any
/// language can send it: `{"outpost": "health", "healthy": true,
/// "command": "01J…" | null, "detail": "…"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The device's verdict on itself (the reference agent: its health
    /// command succeeded).
    pub healthy: bool,
    /// The command it follows, when it follows one.
    pub command: Option<CommandId>,
    /// Free text for the operator: the agent's check output when healthy,
    /// why not otherwise; empty when the device sent none.
    pub detail: String,
}

impl HealthReport {
    /// The event's payload.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::json!({"outpost": "health", "healthy": self.healthy,
            "command": self.command.map(|c| c.to_string()), "detail": self.detail})
        .to_string()
        .into_bytes()
    }

    /// A health report, if this event's payload is one.
    pub fn from_payload(payload: &[u8]) -> Option<HealthReport> {
        let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
        if v.get("outpost")?.as_str()? != "health" {
            return None;
        }
        Some(HealthReport {
            healthy: v.get("healthy")?.as_bool()?,
            command: v
                .get("command")
                .and_then(|c| c.as_str())
                .and_then(|c| c.parse().ok()),
            detail: v
                .get("detail")
                .and_then(|d| d.as_str())
                .unwrap_or("")
                .to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_id_round_trips_through_text() {
        let id = CommandId::new(1_700_000_000_000, 42);
        let s = id.to_string();
        assert_eq!(s.len(), 26);
        assert_eq!(s.parse::<CommandId>().unwrap(), id);
        assert!("not-an-id".parse::<CommandId>().is_err());
    }

    #[test]
    fn ids_sort_by_time() {
        let a = CommandId::new(1000, u128::MAX >> 48);
        let b = CommandId::new(1001, 0);
        assert!(a < b);
    }

    #[test]
    fn priority_order_and_parse() {
        assert!(Priority::High > Priority::Normal && Priority::Normal > Priority::Low);
        assert_eq!("HIGH".parse::<Priority>().unwrap(), Priority::High);
        assert!("urgent"
            .parse::<Priority>()
            .unwrap_err()
            .contains("high, normal or low"));
    }

    #[test]
    fn a_health_report_round_trips_and_other_events_are_not_one() {
        let r = HealthReport {
            healthy: true,
            command: Some(CommandId::new(5, 6)),
            detail: "fw 2.1 up".into(),
        };
        assert_eq!(HealthReport::from_payload(&r.to_payload()), Some(r));
        assert_eq!(HealthReport::from_payload(b"temp=21"), None);
        assert_eq!(HealthReport::from_payload(br#"{"outpost":"alert"}"#), None);
        let bare = HealthReport::from_payload(br#"{"outpost":"health","healthy":false}"#).unwrap();
        assert!(!bare.healthy && bare.command.is_none());
    }
}

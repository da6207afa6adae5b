//! The edge side of upstream sync (DESIGN §7): the uplink to a hub.
//!
//! The edge is a gateway device of its hub (enrolled there with
//! `--gateway`; its bundle is `--upstream-bundle`). While connected it
//!
//! - streams its outbox: records after the last seq the hub acknowledged,
//!   read from the store a batch at a time, at most `max_unacked` records
//!   ahead of the hub's `UpAck`; the hub's ack lets the queue delete them
//!   (with its next group). Nothing is deleted that the hub has not stored,
//!   and a record sent twice (a reconnect, a crash) is skipped by the hub,
//!   which keeps a cursor per edge;
//! - takes `Forward`ed commands into its own queue under the hub's id, and
//!   answers `Accepted` only once that is durable; a redelivery is a
//!   duplicate, queued once;
//! - applies the hub's `Cancel`s.
//!
//! Offline, the box works as ever and the outbox grows (bounded: see
//! `queue::outbox`). The link is retried with capped exponential backoff
//! and jitter, and nothing waits on a timer while connected and idle: the
//! uplink sleeps on the queue's outbox watch and on the connection.

mod intake;
mod lanes;
pub mod nats;

pub use crate::engine::cursor::OutboxCursor;

use crate::device::{self, Backoff, ClientError, ConnectOptions, Received};
use crate::engine::command::{Millis, Outcome};
use crate::engine::uplink::{for_hub, frames, refusal};
use crate::identity::Bundle;
use crate::proto::DeviceFrame;
use crate::shell::jobs::Runners;
use crate::shell::queue::{QueueError, QueueHandle};
use intake::{FromHub, Intake, Staging, Taken};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

/// How to reach the hub, and how hard to push.
#[derive(Clone, Debug)]
pub struct UplinkOptions {
    /// The edge's bundle, issued by the hub (`outpost enroll EDGE --gateway`
    /// on the hub).
    pub bundle: PathBuf,
    /// `host:port` of the hub (from `quic://host:port`); the bundle's
    /// `server =` when `None`.
    pub server: Option<String>,
    /// Records read from the store per batch.
    pub batch: usize,
    /// Records sent and not yet acknowledged, at most.
    pub max_unacked: u64,
    /// The first reconnect delay, doubled per failed attempt.
    pub min_backoff: Duration,
    /// The cap on the reconnect delay.
    pub max_backoff: Duration,
    /// Largest frame (the hub's limit; default 1 MiB).
    pub max_frame: usize,
    /// Give up one attempt to connect after this.
    pub connect_timeout: Duration,
    /// The hub is taken as gone after this silence (QUIC idle timeout);
    /// keep-alives go at a third of it.
    pub idle_timeout: Duration,
    /// Artifact bytes a second drawn from the hub (`--uplink-rate`).
    pub artifact_rate: Option<u64>,
}

impl UplinkOptions {
    /// The defaults for `bundle` and `server`: batches of 4096, 32 Ki
    /// records unacked, backoff from 0.5 s to 60 s, a 10 s connect timeout,
    /// the device library's idle timeout, no artifact rate limit.
    pub fn new(bundle: PathBuf, server: Option<String>) -> Self {
        UplinkOptions {
            bundle,
            server,
            batch: 4096,
            max_unacked: 32 * 1024,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            max_frame: crate::proto::DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: ConnectOptions::default().idle_timeout,
            artifact_rate: None,
        }
    }
}

/// `quic://host:port` (or a bare `host:port`) → `host:port`.
pub fn parse_url(url: &str) -> Result<String, String> {
    let rest = match url.split_once("://") {
        Some(("quic", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
            "upstream `{url}`: unsupported scheme `{scheme}://`; use quic://HOST:PORT (a hub box) or nats://HOST:PORT[,nats://HOST2:PORT] (a NATS JetStream cluster)"
        ))
        }
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    let ok = rest
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !ok {
        return Err(format!(
            "upstream `{url}`: expected quic://HOST:PORT, e.g. quic://hub.local:7443"
        ));
    }
    Ok(rest.to_string())
}

/// Where the uplink is in its reconnect loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkState {
    /// Trying to reach the hub (the first attempt, or after a backoff).
    #[default]
    Connecting,
    /// A session with the hub is up.
    Connected,
    /// The last attempt failed; the next comes after a backoff.
    Offline,
}

impl UplinkState {
    /// The name `status` and `--json` show.
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkState::Connecting => "connecting",
            UplinkState::Connected => "connected",
            UplinkState::Offline => "offline",
        }
    }
}

impl std::fmt::Display for UplinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The uplink's state, for `status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkStatus {
    /// Where the reconnect loop is.
    pub state: UplinkState,
    /// The hub's address.
    pub hub: String,
    /// When the current state began.
    pub since: Millis,
    /// When the hub last acknowledged outbox records.
    pub last_sync: Option<Millis>,
    /// Why the link is down (the last failure).
    pub last_error: Option<String>,
    /// Commands the hub forwarded that this box took (new ones).
    pub forwarded_total: u64,
    /// Outbox records the hub acknowledged since the box started.
    pub synced_total: u64,
}

/// A running uplink. Dropping it stops it.
pub struct Uplink {
    status: watch::Receiver<UplinkStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Uplink {
    /// The status now.
    pub fn status(&self) -> UplinkStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<UplinkStatus> {
        self.status.clone()
    }
}

/// Start the uplink. It reads the bundle at each attempt, so a bundle put
/// in place later is picked up without a restart.
pub fn start(queue: QueueHandle, workflows: Runners, opts: UplinkOptions) -> Uplink {
    let hub = opts.server.clone().unwrap_or_default();
    let (tx, rx) = watch::channel(UplinkStatus {
        state: UplinkState::Connecting,
        hub,
        since: crate::now_millis(),
        ..Default::default()
    });
    let task = tokio::spawn(run(queue, workflows, opts, tx));
    Uplink { status: rx, task }
}

fn set_state(tx: &watch::Sender<UplinkStatus>, state: UplinkState, error: Option<String>) {
    tx.send_modify(|s| {
        if s.state != state {
            s.state = state;
            s.since = crate::now_millis();
        }
        if error.is_some() {
            s.last_error = error;
        }
    });
}

async fn run(
    queue: QueueHandle,
    workflows: Runners,
    opts: UplinkOptions,
    tx: watch::Sender<UplinkStatus>,
) {
    let backoff = Backoff::new(opts.min_backoff, opts.max_backoff);
    keep_up(&tx, backoff, |tx| async {
        match connect(&opts).await {
            Ok(conn) => {
                tx.send_modify(|s| s.hub = conn.remote().to_string());
                set_state(tx, UplinkState::Connected, None);
                tracing::info!(hub = %conn.remote(), "uplink connected");
                (session(&queue, &workflows, &opts, conn, tx).await, true)
            }
            Err(e) => (e, false),
        }
    })
    .await
}

/// Run sessions until the box stops, both transports alike: after each,
/// say why it ended and try again after a capped exponential backoff with
/// jitter (from the start again once a session had connected). `session`
/// returns why it ended and whether it had connected.
async fn keep_up<'a, F, Fut>(
    tx: &'a watch::Sender<UplinkStatus>,
    mut backoff: Backoff,
    mut session: F,
) where
    F: FnMut(&'a watch::Sender<UplinkStatus>) -> Fut,
    Fut: std::future::Future<Output = (SessionEnd, bool)>,
{
    loop {
        set_state(tx, UplinkState::Connecting, None);
        let (why, connected) = session(tx).await;
        if connected {
            backoff.reset();
        }
        if matches!(why, SessionEnd::Shutdown) {
            return;
        }
        let msg = why.to_string();
        let delay = backoff.next_delay();
        tracing::warn!(error = %msg, retry_in = ?delay, "uplink down; the box keeps working offline");
        set_state(tx, UplinkState::Offline, Some(msg));
        tokio::time::sleep(delay).await;
    }
}

async fn connect(opts: &UplinkOptions) -> Result<device::DeviceConnection, SessionEnd> {
    let bundle = Bundle::read(&opts.bundle).map_err(|e| {
        SessionEnd::Link(format!(
            "cannot read the upstream bundle {}: {e}; issue one on the hub with `outpost enroll EDGE --gateway --out FILE`",
            opts.bundle.display()
        ))
    })?;
    let copts = ConnectOptions {
        server: opts.server.clone(),
        max_frame: opts.max_frame,
        connect_timeout: opts.connect_timeout,
        idle_timeout: opts.idle_timeout,
        keep_alive: opts.idle_timeout / 3,
        agent: format!("outpost-edge/{}", env!("CARGO_PKG_VERSION")),
        ..ConnectOptions::default()
    };
    let conn = device::connect(&bundle, &copts)
        .await
        .map_err(|e| SessionEnd::Link(e.to_string()))?;
    if conn.server_version().minor < crate::proto::MINOR_GATEWAY {
        return Err(SessionEnd::Link(format!(
            "the hub speaks protocol {}; upstream sync needs 1.{} (upgrade the hub)",
            conn.server_version(),
            crate::proto::MINOR_GATEWAY
        )));
    }
    Ok(conn)
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Link(String),
    #[error("the box is shutting down")]
    Shutdown,
}

impl From<ClientError> for SessionEnd {
    fn from(e: ClientError) -> Self {
        SessionEnd::Link(e.to_string())
    }
}

impl From<QueueError> for SessionEnd {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::ShuttingDown => SessionEnd::Shutdown,
            other => SessionEnd::Link(format!("local queue: {other}")),
        }
    }
}

/// One connected session: stream the outbox, take forwarded commands.
async fn session(
    queue: &QueueHandle,
    workflows: &Runners,
    opts: &UplinkOptions,
    mut conn: device::DeviceConnection,
    tx: &watch::Sender<UplinkStatus>,
) -> SessionEnd {
    let sender = conn.sender();
    let hub_minor = conn.server_version().minor;
    if hub_minor >= crate::proto::MINOR_EPOCH {
        // Before any `Up`: the seqs that follow count in this database.
        let epoch = queue.uplink_epoch();
        if let Err(e) = sender.send(&DeviceFrame::UpFrom { epoch }).await {
            return e.into();
        }
    }
    if let Err(e) = queue.presence_snapshot().await {
        return e.into();
    }
    let start = match queue.outbox_stats().await {
        Ok(s) => s.acked,
        Err(e) => return e.into(),
    };
    let mut cursor = OutboxCursor::new(start, opts.max_unacked);
    let mut grown = queue.outbox_watch();
    let mut takes: intake::Takes = Default::default();
    let mut lanes = lanes::Lanes::default();
    let staging = Staging::new(opts.artifact_rate);
    let intake = Intake {
        queue: queue.clone(),
        jobs: workflows.clone(),
        staging: staging.clone(),
        conn: conn.connection().clone(),
        up: conn.sender(),
    };
    let frame_budget = opts.max_frame.saturating_sub(4096).max(1024);
    loop {
        if cursor.wants_read() {
            grown.borrow_and_update();
            let entries = match queue.outbox_read(cursor.sent(), opts.batch).await {
                Ok(e) => e,
                Err(e) => return e.into(),
            };
            let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
            for frame in frames(for_hub(entries, hub_minor), frame_budget) {
                if let Err(e) = sender.send(&DeviceFrame::Up { entries: frame }).await {
                    return e.into();
                }
            }
            cursor.read(seqs);
            continue;
        }
        tokio::select! {
            changed = grown.changed(), if cursor.waits_for_growth() => {
                if changed.is_err() {
                    return SessionEnd::Shutdown;
                }
                cursor.grown();
            }
            Some((id, r)) = takes.next(), if !takes.is_empty() => {
                let frame = match r {
                    Some(Taken::Queued(Ok(duplicate))) => {
                        if !duplicate {
                            tx.send_modify(|s| s.forwarded_total += 1);
                        }
                        Some(DeviceFrame::Accepted { id, duplicate })
                    }
                    Some(Taken::Queued(Err(QueueError::ShuttingDown))) => return SessionEnd::Shutdown,
                    Some(Taken::Queued(Err(e))) => Some(DeviceFrame::Ack { id, outcome: refusal(e) }),
                    Some(Taken::Ended(outcome)) => Some(DeviceFrame::Ack { id, outcome }),
                    Some(Taken::Unanswered | Taken::Cancel) | None => None,
                };
                if let Some(frame) = frame {
                    if let Err(e) = sender.send(&frame).await {
                        return e.into();
                    }
                }
                if let Some(next) = lanes.done(id) {
                    intake.take(next, &mut takes);
                }
            }
            m = conn.next() => {
                let m = match m {
                    Ok(Some(m)) => m,
                    Ok(None) => return SessionEnd::Link("the hub closed the link".into()),
                    Err(e) => return e.into(),
                };
                match m {
                    // Signalled at once to a staging under way, which ends
                    // the command itself (and answers for it).
                    Received::Cancel(id) if staging.cancel(id) => {
                        tracing::info!(%id, "cancelled by the hub while its artifact was staging");
                    }
                    Received::Cancel(id) => {
                        if let Some(m) = lanes.arrive(id, FromHub::Cancel(id)) {
                            intake.take(m, &mut takes);
                        }
                    }
                    Received::Forward(f) => {
                        if let Some(m) = lanes.arrive(f.id, FromHub::Forward(f)) {
                            intake.take(m, &mut takes);
                        }
                    }
                    Received::UpAck(seq) => {
                        if let Some(n) = cursor.ack_through(seq) {
                            if let Err(e) = queue.up_ack(seq).await {
                                return e.into();
                            }
                            tx.send_modify(|s| {
                                s.last_sync = Some(crate::now_millis());
                                s.synced_total += n;
                            });
                        }
                    }
                    Received::Command(c) => {
                        // A hub sends a gateway only Forwards; refuse the
                        // rest so it does not stay in flight.
                        let outcome = Outcome::Rejected {
                            reason: "this is a box, not a device: address its devices as EDGE/DEVICE".into(),
                        };
                        if let Err(e) = sender.send(&DeviceFrame::Ack { id: c.id, outcome }).await {
                            return e.into();
                        }
                    }
                    Received::Error { code, message } => {
                        tracing::warn!(%code, %message, "the hub reported an error");
                    }
                }
            }
        }
    }
}

/// The reserved target of `outpost artifact push EDGE ARTIFACT` on the
/// hub (`EDGE/artifact`): a Forward to it stages its artifact here.
pub const STAGE: &str = "artifact";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_what_is_expected() {
        assert_eq!(parse_url("quic://hub:7443").unwrap(), "hub:7443");
        assert_eq!(parse_url("127.0.0.1:9").unwrap(), "127.0.0.1:9");
        assert_eq!(parse_url("quic://[::1]:7443/").unwrap(), "[::1]:7443");
        assert!(parse_url("nats://h:4222")
            .unwrap_err()
            .contains("unsupported scheme"));
        assert!(parse_url("quic://hub").unwrap_err().contains("HOST:PORT"));
    }
}

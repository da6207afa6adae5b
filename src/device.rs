//! `outpost::device`: the device side of the link, as a library, and the
//! reference agent behind `outpost device`.
//!
//! Embedding a device:
//!
//! ```no_run
//! # async fn demo() -> Result<(), outpost::device::ClientError> {
//! use outpost::device::{connect, ConnectOptions, Received};
//! use outpost::identity::Bundle;
//! use outpost::Outcome;
//!
//! let bundle = Bundle::read("dev-7.bundle".as_ref())?;
//! let mut conn = connect(&bundle, &ConnectOptions::default()).await?;
//! while let Some(msg) = conn.next().await? {
//!     if let Received::Command(cmd) = msg {
//!         conn.ack_attempt(cmd.id, cmd.attempt, Outcome::Ok(cmd.payload)).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! A command may arrive more than once (after a reconnect, or a box crash);
//! the id stays the same. The reference agent ([`run_agent`]) remembers
//! recent ids and their outcomes, acks a repeat with the first outcome, and
//! never runs a command twice.
//!
//! When the bundle carries trust anchors (`box =`, `trust =` lines), every
//! command's envelope is verified here before it is yielded: a refused one
//! is answered `Rejected` ("refused by the device …") by the library itself
//! and never reaches the caller, so an embedder cannot run it by mistake.
//! See [`Guard`].

mod agent;
pub mod artifacts;
pub mod evict;
pub mod fetch;
mod verify;

pub use agent::{
    exec, exec_with, run_agent, shutdown_signal, AgentOptions, Backoff, Dedupe, Handler,
};
pub use verify::{Admitted, Guard, SharedGuard, CLOCK_FLOOR, MAX_SEEN};

use crate::engine::command::{CommandId, Millis, Outcome, Priority, SendOptions, State};
use crate::identity::{self, Bundle, IdentityError};
use crate::proto::{self, BoxFrame, DeviceFrame, ErrorCode, FrameError, Version};
use lru::LruCache;
use quinn::VarInt;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::timeout;

/// The agent string sent in `Hello` by default.
pub const AGENT: &str = concat!("outpost-agent/", env!("CARGO_PKG_VERSION"));

/// Why connecting or talking to the box failed. Each message says what to
/// do; [`ClientError::is_permanent`] tells whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The bundle's certificate, key or CA cannot make a TLS configuration;
    /// a new bundle is needed (permanent).
    #[error(transparent)]
    Bundle(#[from] IdentityError),
    /// The box's address (the bundle's `server =`, or
    /// `ConnectOptions::server`) is not `host:port` or does not resolve.
    #[error("cannot resolve the box address `{addr}`: {detail}; check the `server =` line of the bundle or pass --server HOST:PORT")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why it did not resolve.
        detail: String,
    },
    /// No local UDP socket could be bound for the QUIC endpoint.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    /// The box sent a TLS alert: the device is revoked, its certificate
    /// expired or superseded, or issued by another CA. The text says which
    /// and what to do (permanent).
    #[error("the box refused this device at the TLS handshake: {0}")]
    Refused(String),
    /// TLS failed on this side, mostly because the box's certificate is not
    /// from the bundle's CA: `server =` names another box (permanent).
    #[error("TLS with the box failed: {0}")]
    Tls(String),
    /// No handshake and `Welcome` within `ConnectOptions::connect_timeout`.
    #[error("no answer from the box at {addr} within {secs} s; is `outpost serve` running there and UDP open?")]
    Timeout {
        /// The address tried.
        addr: SocketAddr,
        /// The timeout, in whole seconds (at least 1).
        secs: u64,
    },
    /// Nothing heard from the box for `ConnectOptions::idle_timeout`; it
    /// is gone or the network is. Reconnect.
    #[error("the box at {addr} stopped answering (QUIC idle timeout); the link is retried")]
    Silent {
        /// The box's address.
        addr: SocketAddr,
    },
    /// The box sent a fatal `Error` frame, in answer to `Hello` or later.
    /// Permanent for `Revoked`, `NotEnrolled` and `UnsupportedVersion`.
    #[error("the box ended the connection: {code}: {message}")]
    Rejected {
        /// The frame's code.
        code: ErrorCode,
        /// The box's text.
        message: String,
    },
    /// The connection was closed with an application close code (revoked,
    /// replaced, box shutting down, bundle in use elsewhere, superseded),
    /// or locally.
    #[error("the box closed the connection ({what})")]
    Closed {
        /// What happened and what to do, in outpost terms.
        what: String,
        /// The QUIC close code (see `proto::close_code`); `None` when this
        /// side closed it.
        close_code: Option<u64>,
    },
    /// The connection could not be started or ended for another reason
    /// (reset, transport error, the box's stream ended before it answered).
    /// Reconnect.
    #[error("the connection to the box was lost: {0}")]
    Lost(String),
    /// The box sent what the protocol does not allow (a second `Welcome`,
    /// an answer to no request, another major version), or a request
    /// needs a newer box than this one.
    #[error("the box broke the protocol: {0}")]
    Protocol(String),
    /// The box refused a `Send` or `Query` (no route, forbidden, full, not
    /// found, …). The connection stays up.
    #[error("the box refused the request: {code}: {message}")]
    SendRefused {
        /// Why, as a code.
        code: ErrorCode,
        /// The box's text.
        message: String,
    },
    /// A frame could not be written or read (too large, undecodable, a
    /// stream error) while the connection gave no close reason.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl ClientError {
    /// True when reconnecting cannot help without an operator: the device is
    /// revoked, its certificate is refused or expired, it is not enrolled,
    /// or the versions are incompatible.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::Bundle(_) | ClientError::Refused(_) => true,
            ClientError::Tls(_) => true,
            ClientError::Rejected { code, .. } => matches!(
                code,
                ErrorCode::Revoked | ErrorCode::NotEnrolled | ErrorCode::UnsupportedVersion
            ),
            ClientError::Closed { close_code, .. } => {
                use crate::proto::close_code as cc;
                matches!(
                    close_code.map(|c| c as u32),
                    Some(cc::REVOKED | cc::IN_USE | cc::SUPERSEDED)
                )
            }
            _ => false,
        }
    }

    /// True for a failure after the box answered but before it admitted
    /// the device, with no definite reason: what a refusal looks like when
    /// the close reason is lost in the race (see PROTOCOL.md §1). The agent
    /// retries these a bounded number of times only.
    pub fn is_refusal_like(&self) -> bool {
        match self {
            ClientError::Lost(_) | ClientError::Frame(_) | ClientError::Protocol(_) => true,
            ClientError::Rejected { code, .. } => {
                !matches!(code, ErrorCode::ShuttingDown | ErrorCode::Internal)
            }
            ClientError::Closed { close_code, .. } => !matches!(
                close_code.map(|c| c as u32),
                None | Some(crate::proto::close_code::SHUTDOWN)
            ),
            _ => false,
        }
    }
}

/// Consecutive refusal-like connect failures ([`ClientError::is_refusal_like`])
/// after which the agent stops (with its backoff, a few minutes).
pub const MAX_REFUSED_ATTEMPTS: u32 = 10;

fn alert_text(alert: u8) -> &'static str {
    match alert {
        42 => "bad certificate",
        43 => "unsupported certificate",
        44 => "certificate revoked: this device was revoked on the box; ask the operator to enroll it again",
        45 => "certificate expired: enroll the device again for a fresh bundle (or check the clocks)",
        46 => "certificate superseded: the device was enrolled again and only its newest bundle is admitted; install that one (or issue a new one with `outpost enroll ID --force` on the box)",
        48 => "unknown CA: the bundle was issued by another box (or the box was re-initialised); enroll the device again",
        49 => "access denied: the certificate carries no outpost device id",
        116 => "a client certificate is required",
        120 => "the server does not speak the outpost/1 protocol",
        _ => "TLS alert",
    }
}

/// Turn a quinn connection error into a [`ClientError`] that says what
/// happened in outpost terms.
fn conn_error(e: quinn::ConnectionError, addr: SocketAddr) -> ClientError {
    use quinn::ConnectionError as C;
    match e {
        C::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            if (0x100..0x200).contains(&code) {
                let alert = (code - 0x100) as u8;
                ClientError::Refused(format!("{} (TLS alert {alert})", alert_text(alert)))
            } else {
                ClientError::Lost(c.to_string())
            }
        }
        C::ApplicationClosed(a) => {
            let code = a.error_code.into_inner();
            let reason = String::from_utf8_lossy(&a.reason).into_owned();
            let what = match code as u32 {
                crate::proto::close_code::REVOKED => format!("revoked: {reason}"),
                crate::proto::close_code::REPLACED => format!("replaced: {reason}"),
                crate::proto::close_code::SHUTDOWN => format!("box shutting down: {reason}"),
                crate::proto::close_code::IN_USE if reason.is_empty() => {
                    "this bundle is in use elsewhere: another live device holds this id with it; give each device its own bundle (`outpost enroll ID` on the box)".into()
                }
                crate::proto::close_code::IN_USE => reason,
                crate::proto::close_code::SUPERSEDED => format!(
                    "{}; install the device's newest bundle (or issue one with `outpost enroll ID --force`)",
                    if reason.is_empty() {
                        "superseded: this device was enrolled again"
                    } else {
                        &reason
                    }
                ),
                _ => format!("code {code}: {reason}"),
            };
            ClientError::Closed {
                what,
                close_code: Some(code),
            }
        }
        C::TransportError(t) => {
            let code = u64::from(t.code);
            if (0x100..0x200).contains(&code) {
                ClientError::Tls(format!(
                    "{}; the bundle's CA does not match the box (is `server =` the right box?)",
                    t.reason
                ))
            } else {
                ClientError::Lost(t.to_string())
            }
        }
        C::TimedOut => ClientError::Silent { addr },
        C::LocallyClosed => ClientError::Closed {
            what: "closed locally".into(),
            close_code: None,
        },
        other => ClientError::Lost(other.to_string()),
    }
}

/// How to reach the box.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Connect here instead of the bundle's `server =` address.
    pub server: Option<String>,
    /// Largest frame accepted or sent.
    pub max_frame: usize,
    /// Give up connecting (handshake + Welcome) after this.
    pub connect_timeout: Duration,
    /// QUIC idle timeout; the box is considered gone after this silence.
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// Sent in `Hello`.
    pub agent: String,
    /// Sent in `Hello`.
    pub caps: Vec<String>,
    /// The check of signed commands and its memory of signed ids; pass the
    /// same one to every reconnect so that a replay is refused across
    /// them. `None`: a new one from the bundle, for this connection only.
    pub guard: Option<SharedGuard>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            server: None,
            max_frame: proto::DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(25),
            keep_alive: Duration::from_secs(10),
            agent: AGENT.to_string(),
            caps: Vec::new(),
            guard: None,
        }
    }
}

/// A command received from the box.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedCommand {
    /// The command's id, the same on every delivery: what to dedupe by and
    /// to ack.
    pub id: CommandId,
    /// The priority it was sent with; the box already delivers by it.
    pub priority: Priority,
    /// What to run, as the sender sent it; opaque to outpost.
    pub payload: Vec<u8>,
    /// 1-based delivery attempt.
    pub attempt: u32,
    /// Absolute deadline (ms since the Unix epoch), if any.
    pub deadline: Option<Millis>,
    /// The operator's envelope, when the command was signed.
    pub signature: Option<Vec<u8>>,
    /// The signer, when the envelope was verified here (the bundle carries
    /// trust anchors) and this is its first delivery.
    pub verified: Option<crate::engine::trust::Verified>,
    /// A signed command this device already admitted, delivered again with
    /// the same attempt (after a reconnect, or replayed): answer it with its
    /// first outcome if you have it; never run it again.
    pub seen_before: bool,
}

/// What [`DeviceConnection::next`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Run this and ack it.
    Command(ReceivedCommand),
    /// Stop this command if it is still running; do not ack it.
    Cancel(CommandId),
    /// A non-fatal error from the box (e.g. `NotYourCommand`).
    Error {
        /// The frame's code.
        code: ErrorCode,
        /// The box's text.
        message: String,
    },
    /// To a gateway (an edge box): a command for a target below it.
    Forward(Box<proto::Forward>),
    /// To a gateway: the hub stored its outbox up to this seq.
    UpAck(u64),
}

/// Answers the box owes this device, oldest first (it answers `Send` and
/// `Query` in order).
type Owed = Arc<std::sync::Mutex<VecDeque<oneshot::Sender<BoxFrame>>>>;

/// A cloneable handle that writes frames to the box, so acks can be sent
/// from any task.
#[derive(Clone)]
pub struct Sender {
    send: Arc<Mutex<quinn::SendStream>>,
    max_frame: usize,
    owed: Owed,
    box_minor: u16,
    /// Told each outcome, so a signed command that succeeded is never run
    /// again under a later attempt, while one that failed may be retried.
    guard: SharedGuard,
}

/// A command this device sent, as the box accepted it (durably).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Its id on the box, for `query`.
    pub id: CommandId,
    /// Its idempotency key matched an earlier command, whose id this is.
    pub duplicate: bool,
}

/// Where a command this device sent stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandStatus {
    /// The command asked about.
    pub id: CommandId,
    /// Queued, delivered (which attempt), or how it ended.
    pub state: State,
    /// What its target answered; `None` until it has, or when the box
    /// ended it first.
    pub outcome: Option<Outcome>,
    /// Why the box ended it when its target did not (expired, cancelled,
    /// a failed dependency, …); `None` otherwise.
    pub error: Option<String>,
}

impl Sender {
    /// Send one frame.
    pub async fn send(&self, frame: &DeviceFrame) -> Result<(), ClientError> {
        let mut s = self.send.lock().await;
        proto::write_frame(&mut *s, frame, self.max_frame).await?;
        Ok(())
    }

    /// Report a command's outcome, naming no attempt: it ends whichever
    /// attempt the box has in flight, so a late answer to an earlier
    /// delivery can end a later one. Prefer [`ack_attempt`](Self::ack_attempt).
    pub async fn ack(&self, id: CommandId, outcome: Outcome) -> Result<(), ClientError> {
        self.ack_with(id, None, outcome).await
    }

    /// Report the outcome of one delivery: `attempt` is the
    /// [`ReceivedCommand::attempt`] it answers. The box ends the command
    /// only if that attempt is still the one in flight. To a box before
    /// protocol 1.4 it goes as a plain `Ack`.
    pub async fn ack_attempt(
        &self,
        id: CommandId,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<(), ClientError> {
        self.ack_with(id, Some(attempt), outcome).await
    }

    /// `AckAttempt` when an attempt is named and the box knows the frame,
    /// else the plain `Ack`.
    async fn ack_with(
        &self,
        id: CommandId,
        attempt: Option<u32>,
        outcome: Outcome,
    ) -> Result<(), ClientError> {
        if let Ok(mut g) = self.guard.lock() {
            g.ended(id, &outcome);
        }
        let frame = match attempt {
            Some(attempt) if self.box_minor >= proto::MINOR_ACK_ATTEMPT => {
                DeviceFrame::AckAttempt {
                    id,
                    attempt,
                    outcome,
                }
            }
            _ => DeviceFrame::Ack { id, outcome },
        };
        self.send(&frame).await
    }

    /// Send a command to another target (`dev-8`, `tag:…`, `cap:…`)
    /// through the box. Returns once the box holds it durably; the box's
    /// ACL decides whether this device may address the target.
    pub async fn send_command(
        &self,
        to: &str,
        payload: Vec<u8>,
        opts: SendOptions,
    ) -> Result<Sent, ClientError> {
        let frame = DeviceFrame::Send {
            to: to.to_string(),
            payload,
            opts,
        };
        match self.ask(&frame).await? {
            BoxFrame::Sent { id, duplicate } => Ok(Sent { id, duplicate }),
            other => Err(answer_error(other)),
        }
    }

    /// The state of a command this device sent.
    pub async fn query(&self, id: CommandId) -> Result<CommandStatus, ClientError> {
        match self.ask(&DeviceFrame::Query { id }).await? {
            BoxFrame::Status {
                id,
                state,
                outcome,
                error,
            } => Ok(CommandStatus {
                id,
                state,
                outcome,
                error,
            }),
            other => Err(answer_error(other)),
        }
    }

    async fn ask(&self, frame: &DeviceFrame) -> Result<BoxFrame, ClientError> {
        if self.box_minor < proto::MINOR_SEND {
            return Err(ClientError::Protocol(format!(
                "the box speaks protocol 1.{}; {} needs 1.{} (upgrade the box)",
                self.box_minor,
                frame.name(),
                proto::MINOR_SEND
            )));
        }
        let (tx, rx) = oneshot::channel();
        {
            // Owed in the order written: both under the stream's lock.
            let mut s = self.send.lock().await;
            self.owed.lock().expect("owed lock").push_back(tx);
            if let Err(e) = proto::write_frame(&mut *s, frame, self.max_frame).await {
                self.owed.lock().expect("owed lock").pop_back();
                return Err(e.into());
            }
        }
        rx.await
            .map_err(|_| ClientError::Lost("the connection ended before the box answered".into()))
    }
}

fn answer_error(f: BoxFrame) -> ClientError {
    match f {
        BoxFrame::Refused { code, message } => ClientError::SendRefused { code, message },
        other => ClientError::Protocol(format!("unexpected answer {}", other.name())),
    }
}

/// A connected, welcomed device session.
pub struct DeviceConnection {
    // Kept alive for as long as the connection: dropping the endpoint would
    // close its socket.
    _endpoint: Option<quinn::Endpoint>,
    conn: quinn::Connection,
    addr: SocketAddr,
    sender: Sender,
    rx: mpsc::Receiver<Result<Received, ClientError>>,
    reader: tokio::task::JoinHandle<()>,
    device_id: String,
    window: u32,
    version: Version,
}

impl Drop for DeviceConnection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Resolve `host:port`.
async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let bad = |detail: String| ClientError::Resolve {
        addr: addr.to_string(),
        detail,
    };
    identity::split_host_port(addr).ok_or_else(|| bad("expected host:port".into()))?;
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| bad(e.to_string()))?;
    it.next()
        .ok_or_else(|| bad("the name has no addresses".into()))
}

fn transport(opts: &ConnectOptions) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(opts.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(opts.keep_alive));
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

/// A client endpoint for `server` (matching its address family). Share one
/// between many connections with [`connect_with`].
pub fn client_endpoint(server: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
    let bind: SocketAddr = if server.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind).map_err(ClientError::Socket)
}

/// Connect to the box named by the bundle (or `opts.server`), say `Hello`
/// and wait for `Welcome`.
pub async fn connect(
    bundle: &Bundle,
    opts: &ConnectOptions,
) -> Result<DeviceConnection, ClientError> {
    let addr = resolve(opts.server.as_deref().unwrap_or(&bundle.server)).await?;
    let endpoint = client_endpoint(addr)?;
    let mut c = connect_with(&endpoint, addr, bundle, opts).await?;
    c._endpoint = Some(endpoint);
    Ok(c)
}

/// [`connect`] over an existing endpoint to a resolved address.
pub async fn connect_with(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    bundle: &Bundle,
    opts: &ConnectOptions,
) -> Result<DeviceConnection, ClientError> {
    let tls = bundle.client_config()?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport(opts)));
    let secs = opts.connect_timeout.as_secs().max(1);
    let fut = async {
        let connecting = endpoint
            .connect_with(cfg, addr, identity::SERVER_NAME)
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        let conn = connecting.await.map_err(|e| conn_error(e, addr))?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| conn_error(e, addr))?;
        let mut recv = proto::frame_reader(recv);
        let hello = DeviceFrame::Hello {
            version: proto::VERSION,
            agent: opts.agent.clone(),
            caps: opts.caps.clone(),
        };
        let lost = |conn: &quinn::Connection, e: FrameError| match conn.close_reason() {
            Some(r) => conn_error(r, addr),
            None => ClientError::Frame(e),
        };
        if let Err(e) = proto::write_frame(&mut send, &hello, opts.max_frame).await {
            return Err(lost(&conn, e));
        }
        let first = proto::read_frame::<BoxFrame, _>(&mut recv, opts.max_frame).await;
        match first {
            Ok(Some(BoxFrame::Welcome {
                version,
                device_id,
                window,
            })) => Ok((conn, send, recv, version, device_id, window)),
            Ok(Some(BoxFrame::Error { code, message })) => {
                Err(ClientError::Rejected { code, message })
            }
            Ok(Some(other)) => Err(ClientError::Protocol(format!(
                "expected Welcome, got {}",
                other.name()
            ))),
            Ok(None) => Err(conn_error(conn.closed().await, addr)),
            Err(e) => Err(lost(&conn, e)),
        }
    };
    let (conn, send, recv, version, device_id, window) = timeout(opts.connect_timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout { addr, secs })??;
    if version.major != proto::VERSION.major {
        return Err(ClientError::Protocol(format!(
            "the box speaks protocol {version}, this device {}",
            proto::VERSION
        )));
    }
    let (tx, rx) = mpsc::channel(64);
    let guard = opts.guard.clone().unwrap_or_else(|| Guard::shared(bundle));
    let sender = Sender {
        send: Arc::new(Mutex::new(send)),
        max_frame: opts.max_frame,
        owed: Owed::default(),
        box_minor: version.minor,
        guard: guard.clone(),
    };
    let reader = tokio::spawn(read_loop(
        conn.clone(),
        recv,
        tx,
        sender.clone(),
        guard,
        addr,
    ));
    Ok(DeviceConnection {
        _endpoint: None,
        conn,
        addr,
        sender,
        rx,
        reader,
        device_id,
        window,
        version,
    })
}

async fn read_loop(
    conn: quinn::Connection,
    mut recv: proto::FrameReader<quinn::RecvStream>,
    tx: mpsc::Sender<Result<Received, ClientError>>,
    sender: Sender,
    guard: SharedGuard,
    addr: SocketAddr,
) {
    let (owed, max) = (sender.owed.clone(), sender.max_frame);
    loop {
        let item = match proto::read_frame::<BoxFrame, _>(&mut recv, max).await {
            Ok(Some(
                f @ (BoxFrame::Sent { .. } | BoxFrame::Refused { .. } | BoxFrame::Status { .. }),
            )) => {
                let waiter = owed.lock().expect("owed lock").pop_front();
                match waiter {
                    Some(w) => {
                        let _ = w.send(f);
                        continue;
                    }
                    None => Err(ClientError::Protocol(format!(
                        "{} without a Send or Query to answer",
                        f.name()
                    ))),
                }
            }
            Ok(Some(BoxFrame::Command {
                id,
                priority,
                payload,
                attempt,
                deadline,
                signature,
            })) => {
                let mut cmd = ReceivedCommand {
                    id,
                    priority,
                    payload,
                    attempt,
                    deadline,
                    signature,
                    verified: None,
                    seen_before: false,
                };
                let verdict = {
                    let mut g = guard.lock().expect("guard lock");
                    g.admit(&cmd, crate::now_millis()).map_err(|e| {
                        let outcome = g.refused(&e);
                        (e, outcome)
                    })
                };
                match verdict {
                    Ok(Admitted::Unchecked) => {}
                    Ok(Admitted::Signed(v)) => cmd.verified = Some(v),
                    Ok(Admitted::Again) => cmd.seen_before = true,
                    Err((e, outcome)) => {
                        tracing::warn!(%id, step = e.step(), reason = %e, "refused a command the box delivered; it does not run");
                        if let Err(e) = sender.ack_attempt(id, attempt, outcome).await {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        continue;
                    }
                }
                Ok(Received::Command(cmd))
            }
            Ok(Some(BoxFrame::Cancel { id })) => Ok(Received::Cancel(id)),
            Ok(Some(BoxFrame::Forward(f))) => Ok(Received::Forward(f)),
            Ok(Some(BoxFrame::UpAck { seq })) => Ok(Received::UpAck(seq)),
            Ok(Some(BoxFrame::Pong)) => continue,
            Ok(Some(BoxFrame::Error { code, message })) if !code.is_fatal() => {
                Ok(Received::Error { code, message })
            }
            Ok(Some(BoxFrame::Error { code, message })) => {
                Err(ClientError::Rejected { code, message })
            }
            Ok(Some(BoxFrame::Welcome { .. })) => {
                Err(ClientError::Protocol("Welcome sent twice".into()))
            }
            Ok(None) => {
                // The box finished its side: the connection close tells why.
                let e = timeout(Duration::from_secs(2), conn.closed())
                    .await
                    .map(|e| conn_error(e, addr))
                    .unwrap_or_else(|_| {
                        ClientError::Protocol("the box closed the control stream".into())
                    });
                Err(e)
            }
            Err(e) => Err(match conn.close_reason() {
                Some(r) => conn_error(r, addr),
                None => ClientError::Frame(e),
            }),
        };
        let stop = item.is_err();
        if tx.send(item).await.is_err() || stop {
            return;
        }
    }
}

impl DeviceConnection {
    /// The next message from the box; `Err` once the connection has ended
    /// (the error says why). Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Received>, ClientError> {
        match self.rx.recv().await {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// Report a command's outcome, naming no attempt (see [`Sender::ack`]).
    pub async fn ack(&self, id: CommandId, outcome: Outcome) -> Result<(), ClientError> {
        self.sender.ack(id, outcome).await
    }

    /// Report the outcome of one delivery (see [`Sender::ack_attempt`]).
    pub async fn ack_attempt(
        &self,
        id: CommandId,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<(), ClientError> {
        self.sender.ack_attempt(id, attempt, outcome).await
    }

    /// Send telemetry to the box.
    pub async fn event(&self, payload: Vec<u8>) -> Result<(), ClientError> {
        self.sender.send(&DeviceFrame::Event { payload }).await
    }

    /// Send a command to another target through the box (see
    /// [`Sender::send_command`]).
    pub async fn send_command(
        &self,
        to: &str,
        payload: Vec<u8>,
        opts: SendOptions,
    ) -> Result<Sent, ClientError> {
        self.sender.send_command(to, payload, opts).await
    }

    /// The state of a command this device sent.
    pub async fn query(&self, id: CommandId) -> Result<CommandStatus, ClientError> {
        self.sender.query(id).await
    }

    /// A handle for sending frames from other tasks.
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// The id the box knows this device by (from its certificate).
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Unacked commands the box will have in flight at most.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// The box's protocol version.
    pub fn server_version(&self) -> Version {
        self.version
    }

    /// The box's address.
    pub fn remote(&self) -> SocketAddr {
        self.addr
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Close the connection (commands in flight go back to the box's queue).
    pub fn close(&self) {
        self.conn.close(VarInt::from_u32(0), b"device leaving");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_told_apart() {
        assert!(ClientError::Refused("x".into()).is_permanent());
        assert!(ClientError::Rejected {
            code: ErrorCode::Revoked,
            message: String::new()
        }
        .is_permanent());
        assert!(!ClientError::Rejected {
            code: ErrorCode::ShuttingDown,
            message: String::new()
        }
        .is_permanent());
        assert!(!ClientError::Lost("x".into()).is_permanent());
        assert!(ClientError::Closed {
            what: "revoked".into(),
            close_code: Some(2)
        }
        .is_permanent());
        for code in [
            crate::proto::close_code::IN_USE,
            crate::proto::close_code::SUPERSEDED,
        ] {
            let e = ClientError::Closed {
                what: String::new(),
                close_code: Some(code.into()),
            };
            assert!(e.is_permanent(), "{code}");
        }
        let replaced = ClientError::Closed {
            what: String::new(),
            close_code: Some(crate::proto::close_code::REPLACED.into()),
        };
        assert!(!replaced.is_permanent() && replaced.is_refusal_like());
        // A box that is away or restarting is waited for, never given up on.
        let shutdown = ClientError::Closed {
            what: String::new(),
            close_code: Some(crate::proto::close_code::SHUTDOWN.into()),
        };
        assert!(!shutdown.is_refusal_like());
        assert!(!ClientError::Timeout {
            addr: "127.0.0.1:1".parse().unwrap(),
            secs: 1
        }
        .is_refusal_like());
        assert!(ClientError::Lost("reset".into()).is_refusal_like());
    }
}

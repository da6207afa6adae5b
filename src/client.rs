//! `outpost::client`: the device side of the link, as a library, and the
//! reference agent behind `outpost device`.
//!
//! Embedding a device:
//!
//! ```no_run
//! # async fn demo() -> Result<(), outpost::client::ClientError> {
//! use outpost::client::{connect, ConnectOptions, Received};
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

pub mod artifacts;
pub mod evict;
pub mod fetch;
mod verify;

pub use verify::{Admitted, Guard, SharedGuard, CLOCK_FLOOR, MAX_SEEN};

use crate::command::{CommandId, Millis, Outcome, Priority, SendOptions, State};
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
    #[error(transparent)]
    Bundle(#[from] IdentityError),
    #[error("cannot resolve the box address `{addr}`: {detail}; check the `server =` line of the bundle or pass --server HOST:PORT")]
    Resolve { addr: String, detail: String },
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("the box refused this device at the TLS handshake: {0}")]
    Refused(String),
    #[error("TLS with the box failed: {0}")]
    Tls(String),
    #[error("no answer from the box at {addr} within {secs} s; is `outpost serve` running there and UDP open?")]
    Timeout { addr: SocketAddr, secs: u64 },
    #[error("the box at {addr} stopped answering (QUIC idle timeout); the link is retried")]
    Silent { addr: SocketAddr },
    #[error("the box ended the connection: {code}: {message}")]
    Rejected { code: ErrorCode, message: String },
    #[error("the box closed the connection ({what})")]
    Closed {
        what: String,
        close_code: Option<u64>,
    },
    #[error("the connection to the box was lost: {0}")]
    Lost(String),
    #[error("the box broke the protocol: {0}")]
    Protocol(String),
    #[error("the box refused the request: {code}: {message}")]
    SendRefused { code: ErrorCode, message: String },
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
    pub id: CommandId,
    pub priority: Priority,
    pub payload: Vec<u8>,
    /// 1-based delivery attempt.
    pub attempt: u32,
    /// Absolute deadline (ms since the Unix epoch), if any.
    pub deadline: Option<Millis>,
    /// The operator's envelope, when the command was signed.
    pub signature: Option<Vec<u8>>,
    /// The signer, when the envelope was verified here (the bundle carries
    /// trust anchors) and this is its first delivery.
    pub verified: Option<crate::trust::Verified>,
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
    Error { code: ErrorCode, message: String },
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
    pub id: CommandId,
    /// Its idempotency key matched an earlier command, whose id this is.
    pub duplicate: bool,
}

/// Where a command this device sent stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandStatus {
    pub id: CommandId,
    pub state: State,
    pub outcome: Option<Outcome>,
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

// ---------------------------------------------------------------------------
// The reference agent.

/// What the agent does with a command.
#[derive(Clone, Debug)]
pub enum Handler {
    /// Answer `Ok(payload)`.
    Echo,
    /// Run this shell command (`sh -c`) with the payload on stdin.
    Exec(String),
}

/// How `outpost device` runs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The bundle file.
    pub bundle: PathBuf,
    pub handler: Handler,
    /// A command still running after this is killed and fails.
    pub command_timeout: Duration,
    /// How many recent command ids (and outcomes) to remember.
    pub dedupe_capacity: usize,
    /// First reconnect delay...
    pub backoff_min: Duration,
    /// ... doubled per failure up to this.
    pub backoff_max: Duration,
    pub connect: ConnectOptions,
    /// Where artifacts named by commands are fetched to (see
    /// [`artifacts::default_dir`]).
    pub artifact_dir: PathBuf,
    /// Most bytes the artifact dir may hold (files and chunk cache).
    pub max_artifact_disk: u64,
    /// A health check (`sh -c`), run after each connect and after each
    /// command that succeeded, reported as a [`HealthReport`] event.
    ///
    /// [`HealthReport`]: crate::command::HealthReport
    pub health: Option<String>,
}

impl AgentOptions {
    /// Defaults for `bundle` and `handler`: 60 s timeout, 10k ids
    /// remembered, reconnect backoff 0.5 s → 30 s.
    pub fn new(bundle: PathBuf, handler: Handler) -> Self {
        AgentOptions {
            handler,
            command_timeout: Duration::from_secs(60),
            dedupe_capacity: 10_000,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect: ConnectOptions::default(),
            artifact_dir: artifacts::default_dir(&bundle),
            max_artifact_disk: artifacts::DEFAULT_BUDGET,
            health: None,
            bundle,
        }
    }
}

/// Most bytes of stderr kept in a failure message.
const STDERR_TAIL: usize = 2048;
/// Total bytes of outcomes the dedupe cache may hold.
const DEDUPE_BYTES: usize = 64 * 1024 * 1024;

fn outcome_size(o: &Outcome) -> usize {
    64 + match o {
        Outcome::Ok(b) => b.len(),
        Outcome::Failed { message, .. } => message.len(),
        Outcome::Rejected { reason } => reason.len(),
    }
}

/// Recent deliveries — (command id, attempt) — and their outcomes, bounded
/// in count and bytes. The attempt is part of the key: the box redelivers
/// after a crash or a reconnect with the *same* attempt number (run it once),
/// but retries a failure, or an operator retry, with a new one (run again).
pub struct Dedupe {
    done: LruCache<(CommandId, u32), Outcome>,
    bytes: usize,
    max_bytes: usize,
}

impl Dedupe {
    /// Remember up to `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Dedupe {
            done: LruCache::new(NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN)),
            bytes: 0,
            max_bytes: DEDUPE_BYTES,
        }
    }

    /// The outcome of attempt `attempt` of `id`, if it ran recently.
    pub fn get(&mut self, id: CommandId, attempt: u32) -> Option<&Outcome> {
        self.done.get(&(id, attempt))
    }

    /// Record that attempt `attempt` of `id` ended with `outcome`.
    pub fn insert(&mut self, id: CommandId, attempt: u32, outcome: Outcome) {
        self.bytes += outcome_size(&outcome);
        if let Some((_, old)) = self.done.push((id, attempt), outcome) {
            self.bytes = self.bytes.saturating_sub(outcome_size(&old));
        }
        while self.bytes > self.max_bytes && self.done.len() > 1 {
            match self.done.pop_lru() {
                Some((_, old)) => self.bytes = self.bytes.saturating_sub(outcome_size(&old)),
                None => break,
            }
        }
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }
}

/// Capped exponential backoff with jitter.
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The next delay: `min·2^n` capped at `max`, then scaled by a random
    /// factor in [0.5, 1] so a fleet does not reconnect in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Run `cmd` via `sh -c` with `payload` on stdin. Exit 0 → `Ok(stdout)`;
/// otherwise `Failed{exit code, stderr tail}`; past `limit` the process is
/// killed and the command fails with code 124. Stdout over `max_out` bytes
/// fails the command (it could not be sent back).
pub async fn exec(cmd: &str, payload: Vec<u8>, limit: Duration, max_out: usize) -> Outcome {
    exec_with(cmd, payload, limit, max_out, &[]).await
}

/// [`exec`] with extra environment variables (an artifact's path, …).
pub async fn exec_with(
    cmd: &str,
    payload: Vec<u8>,
    limit: Duration,
    max_out: usize,
    env: &[(String, String)],
) -> Outcome {
    use std::process::Stdio;
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed {
                code: 127,
                message: format!("cannot start `sh -c {cmd}`: {e}"),
            }
        }
    };
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let feed = async move {
        if let Some(mut s) = stdin.take() {
            // A command that does not read its input closes the pipe early;
            // that is its business, not an error.
            let _ = s.write_all(&payload).await;
        }
    };
    let read_out = async move {
        let mut out = Vec::new();
        let mut over = false;
        if let Some(s) = stdout.as_mut() {
            let mut buf = [0u8; 8192];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if out.len() + n <= max_out => out.extend_from_slice(&buf[..n]),
                    // Keep draining so the child does not block on a full pipe.
                    Ok(_) => over = true,
                }
            }
        }
        (out, over)
    };
    let read_err = async move {
        let mut tail = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        tail.extend_from_slice(&buf[..n]);
                        if tail.len() > 2 * STDERR_TAIL {
                            tail.drain(..tail.len() - STDERR_TAIL);
                        }
                    }
                }
            }
        }
        if tail.len() > STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
        tail
    };
    let run = async {
        let (_, (out, over), err, status) = tokio::join!(feed, read_out, read_err, child.wait());
        (out, over, err, status)
    };
    let (out, over, err, status) = match timeout(limit, run).await {
        Ok(r) => r,
        Err(_) => {
            let _ = child.kill().await;
            return Outcome::Failed {
                code: 124,
                message: format!("timed out after {} s and was killed", limit.as_secs_f32()),
            };
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return Outcome::Failed {
                code: 127,
                message: format!("cannot wait for the command: {e}"),
            }
        }
    };
    let stderr_tail = String::from_utf8_lossy(&err).into_owned();
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1);
        return Outcome::Failed {
            code,
            message: stderr_tail,
        };
    }
    if over {
        return Outcome::Failed {
            code: -1,
            message: format!(
                "the command wrote more than {max_out} bytes to stdout, too much to send back"
            ),
        };
    }
    Outcome::Ok(out)
}

/// Room for the ack frame's own fields around a result.
const ACK_OVERHEAD: usize = 256;

struct Agent {
    opts: AgentOptions,
    dedupe: Dedupe,
    /// Also in `opts.connect.guard`: one for every connection.
    guard: SharedGuard,
    running: HashMap<CommandId, Running>,
    /// `None` outcome: not to be acked (its artifact fetch lost the link).
    tasks: JoinSet<Ended>,
    /// The connection being served, for fetching artifacts on it.
    link: Option<Link>,
    artifacts: Arc<artifacts::Artifacts>,
    /// Numbers runs, so a run superseded by a restart cannot end its
    /// successor's entry.
    runs: u64,
}

/// A command task's end: id, attempt, run, outcome.
type Ended = (CommandId, u32, u64, Option<Outcome>);

/// What artifact fetches need of the current connection.
#[derive(Clone)]
struct Link {
    conn: quinn::Connection,
    sender: Sender,
}

struct Running {
    abort: AbortHandle,
    run: u64,
    /// The attempt its ack answers: the latest delivery's, since a
    /// redelivery while it runs (after a reconnect) moves the box on to a
    /// new attempt and an ack of the old one would be stale.
    attempt: u32,
    /// The connection its artifact is being fetched on, while it is.
    fetching_on: Arc<std::sync::Mutex<Option<usize>>>,
}

impl Agent {
    fn new(opts: AgentOptions, guard: SharedGuard) -> Self {
        let artifacts =
            artifacts::Artifacts::new(opts.artifact_dir.clone(), opts.max_artifact_disk);
        Agent {
            guard,
            dedupe: Dedupe::new(opts.dedupe_capacity),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            link: None,
            artifacts,
            runs: 0,
            opts,
        }
    }

    /// The start of a command's run; a `Rejected` ack instead when its
    /// envelope cannot be read.
    fn start(&mut self, cmd: ReceivedCommand) -> Option<(CommandId, Option<u32>, Outcome)> {
        let artifact = match cmd
            .signature
            .as_deref()
            .map(crate::trust::envelope::artifact)
        {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(d))) => Some(crate::artifact::Digest(d)),
            Some(Err(e)) => {
                let reason = format!("the command's envelope cannot be read on the device: {e}");
                return Some((cmd.id, Some(cmd.attempt), Outcome::Rejected { reason }));
            }
        };
        let command_timeout = self.opts.command_timeout;
        let max_out = self.opts.connect.max_frame.saturating_sub(ACK_OVERHEAD);
        let handler = self.opts.handler.clone();
        let (id, attempt) = (cmd.id, cmd.attempt);
        self.runs += 1;
        let run = self.runs;
        let fetching_on = Arc::new(std::sync::Mutex::new(None));
        let (link, store, on) = (
            self.link.clone(),
            self.artifacts.clone(),
            fetching_on.clone(),
        );
        let h = self.tasks.spawn(async move {
            let lease = match artifact {
                None => None,
                Some(digest) => {
                    let Some(link) = link else {
                        // Not connected: the box delivers it again.
                        return (id, attempt, run, None);
                    };
                    *on.lock().expect("fetching lock") = Some(link.conn.stable_id());
                    let got = fetch_for(&store, &link, id, digest).await;
                    match got {
                        Ok(lease) => {
                            *on.lock().expect("fetching lock") = None;
                            Some(lease)
                        }
                        Err(e) => {
                            let mut outcome = artifacts::failed(&e, digest, &store);
                            if outcome.is_none() && link.conn.close_reason().is_none() {
                                // Only the fetch stream broke: the box will
                                // not deliver it again on this connection,
                                // so it fails (and is retried as a new
                                // attempt) rather than waiting forever.
                                outcome = Some(Outcome::Failed {
                                    code: -1,
                                    message: format!("the fetch of artifact {digest} broke off: {e}"),
                                });
                            }
                            if outcome.is_some() {
                                *on.lock().expect("fetching lock") = None;
                            }
                            // Left set for a lost link: a redelivery on the
                            // next connection, arriving before this run is
                            // reaped, starts it again instead of waiting.
                            match &outcome {
                                None => tracing::info!(%id, error = %e, "artifact fetch lost the link; waiting for the box to deliver the command again"),
                                Some(_) => tracing::warn!(%id, error = %e, "artifact fetch failed; the command does not run"),
                            }
                            return (id, attempt, run, outcome);
                        }
                    }
                }
            };
            // Taken after the fetch, so a slow fetch cannot stretch the
            // handler past the command's deadline.
            let mut limit = command_timeout;
            if let Some(deadline) = cmd.deadline {
                let left = deadline.saturating_sub(crate::now_millis());
                limit = limit.min(Duration::from_millis(left.max(1)));
            }
            let env = lease.as_ref().map(|l| l.env()).unwrap_or_default();
            let outcome = match handler {
                Handler::Echo => Outcome::Ok(cmd.payload),
                Handler::Exec(c) => exec_with(&c, cmd.payload, limit, max_out, &env).await,
            };
            drop(lease);
            (id, attempt, run, Some(outcome))
        });
        self.running.insert(
            id,
            Running {
                abort: h,
                run,
                attempt,
                fetching_on,
            },
        );
        None
    }

    /// Handle one message; an ack to send back (id, attempt, outcome), if any.
    fn on_message(&mut self, m: Received) -> Option<(CommandId, Option<u32>, Outcome)> {
        match m {
            Received::Command(cmd) => {
                if let Some(o) = self.dedupe.get(cmd.id, cmd.attempt) {
                    tracing::info!(id = %cmd.id, attempt = cmd.attempt, "command delivered again; acking its earlier outcome");
                    return Some((cmd.id, Some(cmd.attempt), o.clone()));
                }
                if let Some(r) = self.running.get_mut(&cmd.id) {
                    r.attempt = cmd.attempt;
                    let stale = {
                        let on = *r.fetching_on.lock().expect("fetching lock");
                        let now = self.link.as_ref().map(|l| l.conn.stable_id());
                        on.is_some() && on != now
                    };
                    if !stale {
                        // Still running from before the reconnect: it is
                        // acked when it finishes.
                        tracing::info!(id = %cmd.id, "command delivered again while still running");
                        return None;
                    }
                    // Fetching on a connection that is gone: start over on
                    // this one (the chunk cache keeps what arrived). Its
                    // handler has not run, so this is not a second run.
                    tracing::info!(id = %cmd.id, "command delivered again while fetching on the old connection; fetching on the new one");
                    r.abort.abort();
                    self.running.remove(&cmd.id);
                }
                if cmd.seen_before {
                    // Admitted before, its outcome no longer remembered (or
                    // never produced: a restart between): running it again
                    // is what a replayer wants.
                    tracing::warn!(id = %cmd.id, "a signed command delivered again that already ran here; refusing it");
                    let g = self.guard.lock().expect("guard lock");
                    return Some((
                        cmd.id,
                        Some(cmd.attempt),
                        g.refused(&crate::trust::Refusal::Replay(cmd.id)),
                    ));
                }
                tracing::debug!(id = %cmd.id, attempt = cmd.attempt, "command received");
                self.start(cmd)
            }
            Received::Cancel(id) => {
                if let Some(r) = self.running.remove(&id) {
                    tracing::info!(%id, "command cancelled by the box; stopping it");
                    r.abort.abort();
                }
                None
            }
            Received::Error { code, message } => {
                tracing::warn!(%code, %message, "the box reported an error");
                None
            }
            Received::Forward(f) => {
                // Only a gateway is sent these; a device agent cannot route.
                tracing::warn!(id = %f.id, "the box forwarded a command to this device as if it were a box below it; rejecting it");
                // A forward has no attempt of its own: a plain `Ack`.
                Some((
                    f.id,
                    None,
                    Outcome::Rejected {
                        reason: "this is a device agent, not a box: it cannot route commands"
                            .into(),
                    },
                ))
            }
            Received::UpAck(_) => None,
        }
    }

    fn finished(
        &mut self,
        r: Result<Ended, tokio::task::JoinError>,
    ) -> Option<(CommandId, Option<u32>, Outcome)> {
        let (id, attempt, run, outcome) = match r {
            Ok(x) => x,
            // Aborted by a Cancel: nothing to report.
            Err(e) if e.is_cancelled() => return None,
            Err(e) => {
                tracing::error!(error = %e, "a command task failed");
                return None;
            }
        };
        let mut attempt = attempt;
        if self.running.get(&id).map(|r| r.run) == Some(run) {
            if let Some(r) = self.running.remove(&id) {
                attempt = r.attempt;
            }
        }
        let outcome = outcome?;
        match &outcome {
            Outcome::Ok(_) => tracing::debug!(%id, "command succeeded"),
            o => tracing::info!(%id, outcome = ?o, "command did not succeed"),
        }
        self.dedupe.insert(id, attempt, outcome.clone());
        Some((id, Some(attempt), outcome))
    }
}

/// Fetch the artifact command `id` names, reporting progress to the box
/// while it runs.
async fn fetch_for(
    store: &Arc<artifacts::Artifacts>,
    link: &Link,
    id: CommandId,
    digest: crate::artifact::Digest,
) -> Result<artifacts::Lease, fetch::FetchError> {
    let (tx, rx) = tokio::sync::watch::channel((0u64, 0u64));
    let (stop, stopped) = oneshot::channel::<()>();
    let reporter = tokio::spawn(artifacts::forward_progress(
        rx,
        link.sender.clone(),
        id,
        stopped,
    ));
    let got = store.get(&link.conn, digest, Some(&tx)).await;
    drop(stop);
    // The last report goes out before the ack, on the same stream.
    let _ = reporter.await;
    if let Ok(l) = &got {
        tracing::info!(%id, artifact = %l.path.display(), fetched_bytes = l.fetched_bytes, reused_bytes = l.reused_bytes, "artifact verified");
    }
    got
}

/// A future that resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Run the reference agent until `shutdown` resolves: connect, run commands
/// with the handler, ack them, reconnect with backoff when the link drops.
/// Returns an error only for what retrying cannot fix (unreadable bundle,
/// revoked or refused certificate, incompatible box).
pub async fn run_agent(
    opts: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let bundle = Bundle::read(&opts.bundle)?;
    let server = opts
        .connect
        .server
        .clone()
        .unwrap_or_else(|| bundle.server.clone());
    let mut backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    let mut opts = opts;
    let guard = opts
        .connect
        .guard
        .get_or_insert_with(|| Guard::shared(&bundle))
        .clone();
    if guard.lock().expect("guard lock").is_active() {
        tracing::info!("the bundle carries trust anchors: commands are verified before they run");
    }
    let mut agent = Agent::new(opts, guard);
    tokio::pin!(shutdown);
    // Logged once per change, not once per attempt.
    let mut was_down_logged = false;
    let mut refused = 0u32;
    loop {
        let attempt = connect(&bundle, &agent.opts.connect);
        let conn = tokio::select! {
            _ = &mut shutdown => break,
            c = attempt => c,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) if e.is_permanent() => {
                tracing::error!(error = %e, "the box refuses this device; stopping");
                return Err(e.into());
            }
            Err(e) if e.is_refusal_like() && refused + 1 >= MAX_REFUSED_ATTEMPTS => {
                tracing::error!(error = %e, attempts = refused + 1, "the box keeps refusing this device; stopping");
                return Err(anyhow::anyhow!(
                    "the box at {server} refused this device {} times in a row before admitting it (last: {e}); see the box's log, and if this bundle was revoked or replaced, install a new one (`outpost enroll ID --force` on the box)",
                    refused + 1
                ));
            }
            Err(e) => {
                refused = if e.is_refusal_like() { refused + 1 } else { 0 };
                let delay = backoff.next_delay();
                if !was_down_logged {
                    tracing::warn!(%server, error = %e, "cannot reach the box; reconnecting with backoff");
                    was_down_logged = true;
                } else {
                    tracing::debug!(%server, error = %e, delay_ms = delay.as_millis() as u64, "still cannot reach the box");
                }
                if agent.wait(delay, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        refused = 0;
        tracing::info!(%server, device = conn.device_id(), window = conn.window(), "connected to the box");
        let ended = agent.serve(&mut conn, &mut shutdown).await;
        match ended {
            None => {
                conn.close();
                break;
            }
            Some(e) if e.is_permanent() => {
                tracing::error!(error = %e, "the box refuses this device; stopping");
                return Err(e.into());
            }
            Some(e) => {
                tracing::warn!(error = %e, "disconnected from the box; reconnecting");
                was_down_logged = true;
                let delay = backoff.next_delay();
                if agent.wait(delay, &mut shutdown).await {
                    break;
                }
            }
        }
    }
    tracing::info!("device agent stopped");
    Ok(())
}

impl Agent {
    /// Serve one connection; `None` on shutdown, else why it ended.
    async fn serve(
        &mut self,
        conn: &mut DeviceConnection,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<ClientError> {
        self.link = Some(Link {
            conn: conn.connection().clone(),
            sender: conn.sender(),
        });
        // Connected (after a restart, perhaps one a change caused).
        self.report_health(None);
        let ended = self.serve_link(conn, shutdown).await;
        self.link = None;
        ended
    }

    async fn serve_link(
        &mut self,
        conn: &mut DeviceConnection,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<ClientError> {
        loop {
            let ack = tokio::select! {
                _ = shutdown.as_mut() => return None,
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => self.finished(done),
                m = conn.next() => match m {
                    Ok(Some(m)) => self.on_message(m),
                    Ok(None) => return Some(ClientError::Lost("the connection ended".into())),
                    Err(e) => return Some(e),
                },
            };
            if let Some((id, attempt, outcome)) = ack {
                let ok = matches!(outcome, Outcome::Ok(_));
                if let Err(e) = conn.sender.ack_with(id, attempt, outcome).await {
                    // The outcome is remembered: the box redelivers the
                    // command after the reconnect and gets it then.
                    return Some(e);
                }
                if ok {
                    self.report_health(Some(id));
                }
            }
        }
    }

    /// Run the health check, off the loop, and send its verdict (after the
    /// ack, on the same stream, so the box has the command's end first or
    /// knows which command the report follows).
    fn report_health(&self, command: Option<CommandId>) {
        let (Some(check), Some(link)) = (self.opts.health.clone(), &self.link) else {
            return;
        };
        let sender = link.sender.clone();
        let limit = self.opts.command_timeout;
        tokio::spawn(async move {
            let (healthy, detail) = match exec(&check, Vec::new(), limit, STDERR_TAIL).await {
                Outcome::Ok(out) => (true, String::from_utf8_lossy(&out).trim().to_string()),
                Outcome::Failed { message, .. } => (false, message),
                Outcome::Rejected { reason } => (false, reason),
            };
            let report = crate::command::HealthReport {
                healthy,
                command,
                detail,
            };
            let frame = DeviceFrame::Event {
                payload: report.to_payload(),
            };
            if let Err(e) = sender.send(&frame).await {
                tracing::warn!(error = %e, "cannot send the health report; the next connect sends one");
            }
        });
    }

    /// Sleep `delay` while still recording outcomes of running commands;
    /// true if shutdown came first.
    async fn wait(
        &mut self,
        delay: Duration,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.as_mut() => return true,
                _ = &mut sleep => return false,
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.finished(done);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;
    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn the_agent_stops_after_refusals_it_cannot_read_instead_of_looping() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let id = crate::identity::Identity::init(dir.path(), &[]).unwrap();
        let tls = id
            .server_config(crate::identity::RevokedSet::new())
            .unwrap();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        // A box (or anything with its CA) that admits the handshake and
        // then hangs up with a code the agent does not know, every time.
        let admitted = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn({
            let (server, admitted) = (server.clone(), admitted.clone());
            async move {
                while let Some(incoming) = server.accept().await {
                    if let Ok(c) = incoming.await {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        c.close(VarInt::from_u32(99), b"go away");
                    }
                }
            }
        });
        let path = dir.path().join("d1.bundle");
        id.issue_device("d1", &addr.to_string())
            .unwrap()
            .write(&path)
            .unwrap();
        let mut opts = AgentOptions::new(path, Handler::Echo);
        opts.backoff_min = Duration::from_millis(1);
        opts.backoff_max = Duration::from_millis(10);
        let r = timeout(
            Duration::from_secs(60),
            run_agent(opts, std::future::pending()),
        )
        .await
        .expect("the agent stops by itself");
        let e = r.unwrap_err().to_string();
        assert!(e.contains("refused this device 10 times"), "{e}");
        assert_eq!(admitted.load(Ordering::SeqCst), MAX_REFUSED_ATTEMPTS);
        task.abort();
    }

    #[tokio::test]
    async fn exec_passes_the_payload_and_returns_stdout() {
        let o = exec("tr a-z A-Z", b"hello".to_vec(), T, MAX).await;
        assert_eq!(o, Outcome::Ok(b"HELLO".to_vec()));
        // A command that ignores stdin is fine too.
        let o = exec("echo hi", vec![7; 200_000], T, MAX).await;
        assert_eq!(o, Outcome::Ok(b"hi\n".to_vec()));
    }

    #[tokio::test]
    async fn exec_failure_carries_exit_code_and_stderr_tail() {
        let o = exec("echo out; echo oops >&2; exit 3", vec![], T, MAX).await;
        assert_eq!(
            o,
            Outcome::Failed {
                code: 3,
                message: "oops\n".into()
            }
        );
        // Only the tail of a long stderr is kept.
        let o = exec(
            "head -c 100000 /dev/zero | tr '\\0' x >&2; echo END >&2; exit 1",
            vec![],
            T,
            MAX,
        )
        .await;
        match o {
            Outcome::Failed { code: 1, message } => {
                assert!(message.len() <= STDERR_TAIL, "{}", message.len());
                assert!(message.ends_with("END\n"));
            }
            other => panic!("{other:?}"),
        }
        let o = exec("kill -9 $$", vec![], T, MAX).await;
        assert!(matches!(o, Outcome::Failed { code: 137, .. }), "{o:?}");
    }

    #[tokio::test]
    async fn exec_times_out_and_kills() {
        let started = std::time::Instant::now();
        let o = exec("sleep 30", vec![], Duration::from_millis(300), MAX).await;
        assert!(matches!(o, Outcome::Failed { code: 124, .. }), "{o:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[tokio::test]
    async fn exec_refuses_stdout_over_the_frame() {
        let o = exec("head -c 5000 /dev/zero", vec![], T, 1000).await;
        assert!(matches!(o, Outcome::Failed { code: -1, .. }), "{o:?}");
    }

    #[test]
    fn dedupe_remembers_outcomes_and_is_bounded() {
        let mut d = Dedupe::new(3);
        for i in 0..5u128 {
            d.insert(CommandId(i), 1, Outcome::Ok(vec![i as u8]));
        }
        assert_eq!(d.len(), 3);
        assert!(d.get(CommandId(0), 1).is_none());
        assert_eq!(d.get(CommandId(4), 1), Some(&Outcome::Ok(vec![4])));
        // The byte budget evicts too.
        let mut d = Dedupe::new(100);
        d.max_bytes = 1000;
        for i in 0..10u128 {
            d.insert(CommandId(i), 1, Outcome::Ok(vec![0; 300]));
        }
        assert!(d.len() <= 3, "{}", d.len());
        assert!(d.get(CommandId(9), 1).is_some());
    }

    #[test]
    fn a_retry_is_a_new_attempt_not_a_repeat() {
        let mut d = Dedupe::new(10);
        let failed = Outcome::Failed {
            code: 1,
            message: "boom".into(),
        };
        d.insert(CommandId(7), 1, failed.clone());
        assert_eq!(
            d.get(CommandId(7), 1),
            Some(&failed),
            "a redelivery of attempt 1 is a repeat"
        );
        assert!(d.get(CommandId(7), 2).is_none(), "attempt 2 must run again");
    }

    fn test_bundle() -> Bundle {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::identity::Identity::init(dir.path(), &[]).unwrap();
        id.issue_device("d1", "127.0.0.1:7443").unwrap()
    }

    #[test]
    fn agent_runs_a_command_once_and_reacks_repeats() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut opts = AgentOptions::new("x".into(), Handler::Echo);
            opts.dedupe_capacity = 10;
            let mut a = Agent::new(opts, Guard::shared(&test_bundle()));
            let cmd = ReceivedCommand {
                id: CommandId(1),
                priority: Priority::Normal,
                payload: b"p".to_vec(),
                attempt: 1,
                deadline: None,
                signature: None,
                verified: None,
                seen_before: false,
            };
            assert!(a.on_message(Received::Command(cmd.clone())).is_none());
            // Redelivered while running (a reconnect: the box moved on to
            // attempt 2): not started again, and its ack answers attempt 2,
            // since the box would drop an ack of attempt 1 as stale.
            let cmd = ReceivedCommand { attempt: 2, ..cmd };
            assert!(a.on_message(Received::Command(cmd.clone())).is_none());
            assert_eq!(a.tasks.len(), 1);
            let done = a.tasks.join_next().await.unwrap();
            assert_eq!(
                a.finished(done),
                Some((CommandId(1), Some(2), Outcome::Ok(b"p".to_vec())))
            );
            // Redelivered after it finished: the same outcome, no new run.
            let again = a.on_message(Received::Command(cmd));
            assert_eq!(
                again,
                Some((CommandId(1), Some(2), Outcome::Ok(b"p".to_vec())))
            );
            assert!(a.tasks.is_empty());
        });
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(30));
        }
        assert!(last >= Duration::from_secs(15));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }

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

//! The box side of the device link: a QUIC listener that admits devices by
//! their certificates and bridges each one's control stream to the queue.
//!
//! Per connection: the TLS handshake has already verified the certificate
//! chain and refused revoked ids (`identity`); the device id is read from the
//! verified certificate, never from a frame. The device opens the control
//! stream and says `Hello`; the box checks the version, attaches the device
//! to the queue (`QueueHandle::connect`) and answers `Welcome`. Then one task
//! per device forwards deliveries as `Command`/`Cancel` frames and handles
//! the device's frames.
//!
//! Every buffer is bounded: frames are read through a small channel, the
//! acks in flight per device are capped, a device that floods is closed with
//! `TooManyFrames`, and a device that stops reading only stalls its own task
//! (QUIC flow control pushes back on it).

use crate::engine::command::{CommandId, DeviceId, Millis, Outcome};
use crate::identity::{self, RevokedSet};
use crate::proto::{
    self, BoxFrame, DeviceFrame, ErrorCode, FrameError, DEFAULT_MAX_FRAME, DEFAULT_WINDOW, VERSION,
};
use crate::shell::queue::{Delivery, QueueError, QueueHandle, SendRequest};
use futures_util::stream::{FuturesUnordered, StreamExt};
use quinn::VarInt;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tracing::Instrument;

mod fetch;

// The QUIC close codes are the wire's: the device library reads them too.
pub use crate::proto::close_code;

/// Telemetry a device sent (`DeviceFrame::Event`), handed to the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEvent {
    /// The sender, as its verified certificate names it.
    pub device: DeviceId,
    /// The event's bytes as the device sent them; the box does not read
    /// them.
    pub payload: Vec<u8>,
    /// When the box received it.
    pub at: Millis,
}

/// How the device link runs.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    /// Largest frame body accepted or sent.
    pub max_frame: usize,
    /// Unacked commands in flight per device, announced in `Welcome`.
    pub window: u32,
    /// A silent connection is dropped after this long (≤ 30 s so a dead
    /// device's commands go back to the queue promptly).
    pub idle_timeout: Duration,
    /// QUIC keep-alive, well inside `idle_timeout`.
    pub keep_alive: Duration,
    /// Handshake, control stream and `Hello` must arrive within this.
    pub hello_timeout: Duration,
    /// Connections beyond this are refused at once.
    pub max_connections: usize,
    /// Sustained frames per second one device may send...
    pub frame_rate: u32,
    /// ... and the burst above it; beyond, the device is closed with
    /// `TooManyFrames`.
    pub frame_burst: u32,
    /// Acks for commands not in flight tolerated per connection before it is
    /// closed as abusive.
    pub max_bad_acks: u32,
    /// Where device events go; `None` logs and counts them. A full channel
    /// drops the event (counted) rather than stall the device.
    pub events: Option<mpsc::Sender<DeviceEvent>>,
    /// The QUIC stateless-reset key (`None`: a random one per start). A
    /// key kept across restarts lets a restarted box reset the connections
    /// of its previous run at their next packet.
    pub reset_key: Option<[u8; 32]>,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            max_frame: DEFAULT_MAX_FRAME,
            window: DEFAULT_WINDOW,
            idle_timeout: Duration::from_secs(25),
            keep_alive: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            frame_rate: 5_000,
            frame_burst: 10_000,
            max_bad_acks: 64,
            events: None,
            reset_key: None,
        }
    }
}

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}; is another outpost (or anything) using this UDP port? pick another with --listen")]
    Bind {
        /// The address asked for (`--listen`).
        addr: SocketAddr,
        /// The bind's error.
        #[source]
        source: std::io::Error,
    },
    /// quinn refused the rustls server config (e.g. no TLS 1.3).
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Tls(String),
    /// A `LinkOptions` value out of range: a zero window or frame rate, a
    /// frame limit under 64 bytes, or an `idle_timeout` too large for QUIC.
    #[error("bad link option: {0}")]
    Options(String),
}

/// Counters of the link, for `status` and metrics.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Connections whose TLS handshake completed within `hello_timeout`.
    pub connections_accepted: AtomicU64,
    /// Handshakes that failed (a refused or revoked certificate, say) or
    /// did not finish within `hello_timeout`.
    pub handshakes_failed: AtomicU64,
    /// Connections refused before the handshake: `max_connections` reached.
    pub connections_refused: AtomicU64,
    /// Sessions the box ended with a fatal `Error` frame: bad frames,
    /// floods and too many bad acks, but also a revoked device, a shutdown
    /// or an internal failure.
    pub protocol_errors: AtomicU64,
    /// Frames read from devices' control streams.
    pub frames_in: AtomicU64,
    /// Frames written to devices' control streams.
    pub frames_out: AtomicU64,
    /// Deliveries written (`Command` frames, or `Forward`s to an edge),
    /// each attempt counted.
    pub commands_sent: AtomicU64,
    /// Acks the queue took (stale and foreign ones not counted).
    pub acks: AtomicU64,
    /// `Event` frames received, dropped ones included.
    pub events: AtomicU64,
    /// Events dropped because the consumer's channel was full.
    pub events_dropped: AtomicU64,
    /// Bundles found in use on two live devices, and newcomers refused
    /// for it.
    pub shared_bundles_found: AtomicU64,
    /// Newcomers refused because their bundle is in use on a live device
    /// ("in use elsewhere").
    pub in_use_refused: AtomicU64,
    /// Artifact chunks served on fetch streams, and their bytes: what a
    /// hub's uplink to its edges carries, counted here.
    pub chunks_served: AtomicU64,
    /// Bytes of the artifact chunks served.
    pub chunk_bytes_served: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Live {
    seq: u64,
    conn: quinn::Connection,
    since: Instant,
}

struct Shared {
    queue: QueueHandle,
    opts: LinkOptions,
    revoked: RevokedSet,
    live: Mutex<HashMap<DeviceId, Live>>,
    /// Ids whose bundle two live devices share (see `contest`); only
    /// touched under the `live` lock, so a verdict and the map agree.
    contests: Mutex<crate::engine::contest::Contests>,
    refusals: Arc<crate::refusal::Refusals>,
    /// Bumped each time a shared bundle is found (the monitor waits on it).
    bundles_found: tokio::sync::watch::Sender<u64>,
    next_seq: AtomicU64,
    tasks: AtomicUsize,
    stats: LinkStats,
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Live>> {
        // The map holds plain handles; a panic elsewhere cannot leave it
        // half-updated.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running device link. Dropping it does not stop it; call
/// [`DeviceLink::shutdown`].
pub struct DeviceLink {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
    summaries: tokio::task::JoinHandle<()>,
}

impl DeviceLink {
    /// Listen on `bind` and serve devices. `tls` comes from
    /// `Identity::server_config(revoked.clone())`; `revoked` must be that
    /// same set, so that [`DeviceLink::revoke`] also refuses the next
    /// handshake. Call within a tokio runtime.
    pub fn start(
        bind: SocketAddr,
        tls: rustls::ServerConfig,
        revoked: RevokedSet,
        queue: QueueHandle,
        opts: LinkOptions,
    ) -> Result<DeviceLink, LinkError> {
        if opts.window == 0 || opts.max_frame < 64 || opts.frame_rate == 0 {
            return Err(LinkError::Options(
                "window and frame_rate must be positive and max_frame at least 64 bytes".into(),
            ));
        }
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport_config(&opts)?));
        server.max_incoming(opts.max_connections.clamp(1, 1 << 20));
        let endpoint = match opts.reset_key {
            None => quinn::Endpoint::server(server, bind),
            Some(key) => {
                // The box's kept key: see `Identity::reset_key`.
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
                // The connection ids must validate across runs too (quinn
                // drops a packet whose id its generator did not make).
                let tag = ring::hmac::sign(&key, b"outpost connection ids");
                let cid_key = u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
                let mut config = quinn::EndpointConfig::new(Arc::new(key));
                config.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                std::net::UdpSocket::bind(bind).and_then(|socket| {
                    quinn::Endpoint::new(
                        config,
                        Some(server),
                        socket,
                        Arc::new(quinn::TokioRuntime),
                    )
                })
            }
        }
        .map_err(|source| LinkError::Bind { addr: bind, source })?;
        let refusals = Arc::new(crate::refusal::Refusals::default());
        revoked.set_refusal_log(refusals.clone());
        let summaries = {
            let r = refusals.clone();
            tokio::spawn(async move { r.run().await })
        };
        let shared = Arc::new(Shared {
            queue,
            opts,
            revoked,
            live: Mutex::new(HashMap::new()),
            contests: Mutex::new(crate::engine::contest::Contests::default()),
            refusals,
            bundles_found: tokio::sync::watch::channel(0).0,
            next_seq: AtomicU64::new(1),
            tasks: AtomicUsize::new(0),
            stats: LinkStats::default(),
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        Ok(DeviceLink {
            endpoint,
            shared,
            accept,
            summaries,
        })
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The QUIC endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Revoke `device`: its next handshake is refused and its live
    /// connection, if any, is closed now. (The shell also records the
    /// revocation in the queue.)
    pub fn revoke(&self, device: &str) {
        // Insert before looking at the map: a connection registering
        // concurrently checks the set after inserting itself (see
        // `register`), so one of the two sides always sees the other.
        self.shared.revoked.insert(device);
        let live = self.shared.live().remove(device);
        if let Some(l) = live {
            tracing::info!(device, "closing the connection of a revoked device");
            l.conn
                .close(VarInt::from_u32(close_code::REVOKED), b"device revoked");
        }
    }

    /// Close `device`'s live connection without revoking it (it may
    /// reconnect at once; its commands in flight are delivered again).
    /// True if it was connected.
    pub fn disconnect(&self, device: &str) -> bool {
        let live = self.shared.live().remove(device);
        match live {
            Some(l) => {
                l.conn.close(
                    VarInt::from_u32(close_code::NORMAL),
                    b"disconnected by the box",
                );
                true
            }
            None => false,
        }
    }

    /// Admit a previously revoked device again (after it is re-enrolled).
    pub fn readmit(&self, device: &str) {
        self.shared.revoked.remove(device);
    }

    /// `device` was enrolled again with the certificate whose fingerprint
    /// is `cert`: only that one is admitted from now on, and a live
    /// connection (made with an earlier one, since the new bundle was not
    /// out yet) is closed. Its shared-bundle flag ends with the old bundle.
    pub fn supersede(&self, device: &str, cert: [u8; 32]) {
        // Pinned before looking at the map, like `revoke`: a connection
        // registering concurrently checks the pin after inserting itself.
        self.shared.revoked.pin(device, Some(cert));
        let live = self.shared.live().remove(device);
        self.shared
            .contests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear(device);
        if let Some(l) = live {
            tracing::info!(device, "closing the connection of a superseded certificate");
            l.conn.close(
                VarInt::from_u32(close_code::SUPERSEDED),
                b"superseded: this device was enrolled again; only its newest bundle is admitted",
            );
        }
    }

    /// Changes each time a shared bundle is found.
    pub fn bundles_found(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.bundles_found.subscribe()
    }

    /// Devices whose bundle is in use on more than one live device now (see
    /// `contest`), with when that was found (ms since the epoch) and how
    /// many newcomers were refused since.
    pub fn shared_bundles(&self) -> Vec<crate::engine::contest::SharedBundle> {
        let now = Instant::now().into_std();
        let wall = crate::now_millis();
        let flagged = self
            .shared
            .contests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flagged(now);
        flagged
            .into_iter()
            .map(|(device, f)| crate::engine::contest::SharedBundle {
                device,
                since: wall
                    .saturating_sub(now.saturating_duration_since(f.since).as_millis() as u64),
                refused: f.refused,
            })
            .collect()
    }

    /// The revoked set the link and its TLS verifier share.
    pub fn revoked(&self) -> &RevokedSet {
        &self.shared.revoked
    }

    /// Whether `device` has a live connection.
    pub fn is_connected(&self, device: &str) -> bool {
        self.shared.live().contains_key(device)
    }

    /// Ids of the devices connected now.
    pub fn connected(&self) -> Vec<DeviceId> {
        let mut v: Vec<_> = self.shared.live().keys().cloned().collect();
        v.sort();
        v
    }

    /// Counters.
    pub fn stats(&self) -> &LinkStats {
        &self.shared.stats
    }

    /// Close every connection (devices see `SHUTDOWN` and reconnect later),
    /// stop accepting, and wait briefly for the connections to wind down.
    pub async fn shutdown(&self) {
        // Close first, so every device is told why; then the connections'
        // tasks go with the accept loop.
        self.endpoint
            .close(VarInt::from_u32(close_code::SHUTDOWN), b"box shutting down");
        self.accept.abort();
        self.summaries.abort();
        let _ = timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
    }
}

fn transport_config(opts: &LinkOptions) -> Result<quinn::TransportConfig, LinkError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(opts.idle_timeout)
        .map_err(|_| LinkError::Options("idle_timeout is too large".into()))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(opts.keep_alive));
    // One control stream per device plus at most a few fetch streams
    // (1.3), so a device cannot make the box buffer many streams.
    t.max_concurrent_bidi_streams(VarInt::from_u32(1 + fetch::MAX_FETCH_STREAMS as u32));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Frames are read incrementally, so the window need not hold a whole
    // max-size frame; small windows keep a flood's buffer small.
    t.stream_receive_window(VarInt::from_u32(256 * 1024));
    t.receive_window(VarInt::from_u32(512 * 1024));
    t.send_window(2 * 1024 * 1024);
    Ok(t)
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    // The connections' tasks live in this set, so aborting the loop at
    // shutdown aborts them too: a detached one could outlive the box,
    // holding its port and its store (a restart in the same process found
    // both taken).
    let mut conns = tokio::task::JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        while conns.try_join_next().is_some() {}
        if shared.tasks.load(Ordering::Relaxed) >= shared.opts.max_connections {
            bump(&shared.stats.connections_refused);
            tracing::warn!(
                remote = %incoming.remote_address(),
                limit = shared.opts.max_connections,
                "refusing a connection: too many devices connected"
            );
            incoming.refuse();
            continue;
        }
        shared.tasks.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        conns.spawn(async move {
            let remote = incoming.remote_address();
            serve_connection(incoming, &shared)
                .instrument(tracing::info_span!("device_link", %remote))
                .await;
            shared.tasks.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The device id of a verified connection's peer certificate, and the
/// certificate's fingerprint.
fn peer_device_id(conn: &quinn::Connection) -> Result<(DeviceId, [u8; 32]), String> {
    let any = conn
        .peer_identity()
        .ok_or("the device presented no certificate")?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "the peer identity is not an X.509 chain")?;
    let leaf = certs.first().ok_or("the device presented no certificate")?;
    let id = identity::device_id_from_cert(leaf).map_err(|e| e.to_string())?;
    Ok((id, identity::cert_fingerprint(leaf)))
}

async fn serve_connection(incoming: quinn::Incoming, shared: &Arc<Shared>) {
    let hello_timeout = shared.opts.hello_timeout;
    let ip = incoming.remote_address().ip();
    let conn = match timeout(hello_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Refused certificates end here: rustls already sent the alert.
            // A client retrying in a loop costs a summary line a minute.
            bump(&shared.stats.handshakes_failed);
            let what = e.to_string();
            if shared.refusals.refused(Some(ip), None, &what) {
                tracing::info!(error = %what, "device handshake failed (repeats from this address are summed up once a minute)");
            }
            return;
        }
        Err(_) => {
            bump(&shared.stats.handshakes_failed);
            if shared
                .refusals
                .refused(Some(ip), None, "handshake timed out")
            {
                tracing::info!("device handshake timed out (repeats from this address are summed up once a minute)");
            }
            return;
        }
    };
    bump(&shared.stats.connections_accepted);
    let (device, cert) = match peer_device_id(&conn) {
        Ok(d) => d,
        Err(e) => {
            // Unreachable with our verifier, which refuses such certs.
            tracing::warn!(error = %e, "closing a connection without a device id");
            conn.close(VarInt::from_u32(close_code::PROTOCOL), b"no device id");
            return;
        }
    };
    Session::run(conn, device.clone(), cert, shared.clone())
        .instrument(tracing::info_span!("device", id = %device))
        .await;
}

mod session;
use session::Session;

//! `outpost serve`: the box. Opens the store, replays the queue, binds the
//! QUIC listener and the admin socket, tells systemd it is ready, and on
//! SIGTERM/SIGINT stops accepting, finishes the current flush and closes.

use crate::identity::{Identity, RevokedSet};
use crate::shell::admin::{self, AdminContext};
use crate::shell::link::{DeviceLink, LinkOptions};
use crate::shell::queue::{self, Limits, QueueHandle, ServiceOptions};
use crate::shell::store::{Store, StoreOptions};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Everything `serve` needs, resolved from flags, env and defaults.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The box's data dir: the store, the TLS dir, the admin socket, the
    /// artifact chunks; created if absent.
    pub data_dir: PathBuf,
    /// The QUIC address devices connect to (port 0: any free one, as
    /// `RunningBox::addr` then says).
    pub listen: SocketAddr,
    /// Extra names for the server certificate.
    pub sans: Vec<String>,
    /// `host:port` devices are told to connect to (in their bundles).
    /// Default: the listen address, or `<hostname>:<port>` when listening
    /// on every address.
    pub advertise: Option<String>,
    /// The queue's bounds and retry policy.
    pub limits: Limits,
    /// How the sled store is opened (its page cache).
    pub store: StoreOptions,
    /// The device link's frame size, window and events; its `window` is
    /// what devices are told, so `outpost serve` sets it to `limits.window`.
    pub link: LinkOptions,
    /// Prometheus metrics address (off when `None`): the same listener as
    /// `http`, kept as an alias.
    pub metrics: Option<SocketAddr>,
    /// The dashboard's address (off when `None`).
    pub http: Option<SocketAddr>,
    /// The dashboard's token and whether it may act.
    pub http_opts: crate::shell::http::HttpOptions,
    /// Alert rules (`[[alert]]`).
    pub alerts: Vec<crate::engine::alert::Rule>,
    /// Device-to-device sends allowed (default: none).
    pub acl: crate::engine::route::Acl,
    /// Which uids may do what on the admin socket (default: root and the
    /// box's own user, as admins).
    pub access: crate::shell::admin::access::Access,
    /// The uplink to a hub, and the outbox's telemetry bound (off when
    /// `None`).
    pub upstream: Option<(crate::shell::upstream::UplinkOptions, u64)>,
    /// Or the uplink to a NATS JetStream cluster, and the outbox bound.
    pub nats: Option<(crate::shell::upstream::nats::NatsOptions, u64)>,
    /// Exit with this code when the store fails and cannot be read back
    /// (`outpost serve` under systemd: 75, to be restarted); `None`: keep
    /// running and refuse requests, saying why (tests, embedding).
    pub exit_on_store_failure: Option<i32>,
    /// Take only commands signed by a trusted operator key.
    pub require_signed: bool,
    /// The box's name, the audience of signed commands (`None`: the
    /// uplink bundle's id, else the NATS name, else the hostname).
    pub name: Option<String>,
    /// How much of the audit log is kept (`audit_keep`, `audit_max_age`).
    pub audit: crate::engine::audit::Retention,
    /// Artifacts' disk budget and retention.
    pub artifacts: crate::shell::config::ArtifactLimits,
    /// The config file the box was started with: a backup carries it.
    pub config_file: Option<PathBuf>,
    /// Scheduled backups (off when `None`).
    pub backup: Option<crate::shell::backup::schedule::Schedule>,
}

/// Where the uplink's bundle is looked for when none is named.
pub const UPSTREAM_BUNDLE: &str = "upstream.bundle";

impl ServeOptions {
    /// Defaults for a data dir: listen on `[::]:7443`.
    pub fn new(data_dir: PathBuf) -> Self {
        ServeOptions {
            data_dir,
            listen: "[::]:7443".parse().expect("literal address"),
            sans: Vec::new(),
            advertise: None,
            limits: Limits::default(),
            store: StoreOptions::default(),
            link: LinkOptions::default(),
            metrics: None,
            http: None,
            http_opts: Default::default(),
            alerts: Vec::new(),
            acl: crate::engine::route::Acl::default(),
            access: Default::default(),
            upstream: None,
            nats: None,
            exit_on_store_failure: None,
            require_signed: false,
            name: None,
            audit: Default::default(),
            artifacts: Default::default(),
            config_file: None,
            backup: None,
        }
    }
}

/// The name the box answers to as the audience of signed commands: the
/// one given, else its id at the hub above (so a hub's operator signs for
/// `edge-1` as the hub knows it), else its NATS name, else the hostname.
pub fn box_name(
    name: Option<&str>,
    upstream_bundle: Option<&std::path::Path>,
    nats: Option<&str>,
) -> String {
    if let Some(n) = name {
        return n.to_string();
    }
    if let Some(path) = upstream_bundle {
        if let Ok(b) = crate::identity::Bundle::read(path) {
            return b.id;
        }
    }
    if let Some(n) = nats {
        return n.to_string();
    }
    crate::identity::hostname()
        .and_then(|h| h.split('.').next().map(str::to_string))
        .unwrap_or_else(|| "outpost".into())
}

/// A running box.
pub struct RunningBox {
    /// The handle to the queue's writer thread.
    pub queue: QueueHandle,
    /// The device link's QUIC server and its sessions.
    pub link: Arc<DeviceLink>,
    /// The box's CA and server certificate, from the data dir's TLS dir.
    pub identity: Arc<Identity>,
    /// The QUIC address actually bound.
    pub addr: SocketAddr,
    /// What bundles name as the server.
    pub advertise: String,
    /// Where metrics are served, when on.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the dashboard is served, when on.
    pub http_addr: Option<SocketAddr>,
    /// Alerts, device statistics, the latest commands.
    pub monitor: crate::shell::monitor::Monitor,
    /// The artifact retention's timer.
    collector: tokio::task::JoinHandle<()>,
    /// The scheduled backups' timer, when asked.
    backups: Option<tokio::task::JoinHandle<()>>,
    /// The uplink to the hub, when the box has one.
    pub uplink: Option<crate::shell::upstream::Uplink>,
    /// The workflow runner.
    pub workflows: crate::shell::workflow::Runner,
    /// The rollout runner.
    pub rollouts: crate::shell::rollout::RolloutRunner,
    admin: tokio::task::JoinHandle<()>,
    http_tasks: Vec<tokio::task::JoinHandle<()>>,
    socket: PathBuf,
}

/// Start a box (for `serve`, the demo and tests).
pub async fn start(o: ServeOptions) -> anyhow::Result<RunningBox> {
    // Before anything opens: a refused dashboard leaves nothing behind.
    if let Some(addr) = o.http {
        crate::shell::http::check(addr, &o.http_opts)?;
    }
    std::fs::create_dir_all(&o.data_dir)
        .with_context(|| format!("cannot create the data dir {}", o.data_dir.display()))?;
    warn_if_reserve_exceeds_disk(&o.data_dir, o.limits.min_free_disk);
    let identity = Arc::new(Identity::init(&o.data_dir, &o.sans)?);
    let store = Store::open(&o.data_dir, &o.store)?;
    // A CA other than the one the store's devices were enrolled under
    // locks them all out as surely as a missing one.
    let recorded = store.ca_fingerprint()?;
    identity.check_store_ca(&o.data_dir, recorded)?;
    if recorded.is_none() {
        // A new store, or one from before boxes kept this: from now on.
        store.set_ca_fingerprint(&crate::identity::cert_fingerprint(identity.ca_der()))?;
    }
    let runs_store = store.clone();
    let gate = Arc::new(crate::engine::trust::Gate::new(
        box_name(
            o.name.as_deref(),
            o.upstream.as_ref().map(|(u, _)| u.bundle.as_path()),
            o.nats.as_ref().map(|(n, _)| n.name.as_str()),
        ),
        o.require_signed,
        store.trust()?,
    ));
    let queue = queue::open(
        store,
        ServiceOptions {
            limits: o.limits.clone(),
            acl: o.acl.clone(),
            outbox_max: o
                .upstream
                .as_ref()
                .map(|u| u.1)
                .or(o.nats.as_ref().map(|n| n.1)),
            exit_on_store_failure: o.exit_on_store_failure,
            gate,
            audit: o.audit,
            artifact_disk: o.artifacts.max_bytes,
            ..ServiceOptions::default()
        },
    )?;
    let mut link_opts = o.link.clone();
    if link_opts.reset_key.is_none() {
        link_opts.reset_key = Some(identity.reset_key()?);
    }
    // Devices' health reports, for the rollouts that wait on them.
    let (health_tx, health_rx) = tokio::sync::broadcast::channel(1024);
    if link_opts.events.is_none() {
        // Device events go up with everything else (on an edge); health
        // reports also go to the rollout runner.
        let up = o.upstream.is_some() || o.nats.is_some();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::shell::link::DeviceEvent>(1024);
        let q = queue.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let Some(h) = crate::engine::command::HealthReport::from_payload(&ev.payload) {
                    let _ = health_tx.send((ev.device.to_string(), h));
                }
                if up {
                    q.device_event(ev.device, ev.payload, ev.at);
                }
            }
        });
        link_opts.events = Some(tx);
    }
    let devices = queue.devices().await?;
    let revoked = RevokedSet::from_ids(
        devices
            .iter()
            .filter(|d| d.record.revoked)
            .map(|d| d.record.id.clone()),
    );
    for d in &devices {
        // A record from before pins has none: any certificate of the CA is
        // admitted for it until it is next enrolled.
        revoked.pin(&d.record.id, d.record.cert);
    }
    let tls = identity.server_config(revoked.clone())?;
    let link = Arc::new(DeviceLink::start(
        o.listen,
        tls,
        revoked,
        queue.clone(),
        link_opts,
    )?);
    let addr = link.local_addr()?;
    let advertise = advertise_for(addr, o.advertise.as_deref());
    let retention = crate::engine::workflow::Retention {
        max_age_ms: o.limits.results_max_age_ms,
        ..Default::default()
    };
    let rollouts = crate::shell::rollout::RolloutRunner::start(
        queue.clone(),
        runs_store.clone(),
        retention,
        health_rx,
    )?;
    let workflows = crate::shell::workflow::Runner::start(queue.clone(), runs_store, retention)?;
    let collector = crate::shell::artifact::collect::start(queue.clone(), o.artifacts.retention_ms);
    let runners = crate::shell::jobs::Runners {
        workflows: workflows.clone(),
        rollouts: rollouts.clone(),
    };
    // A scheduled backup keeps the free-space reserve on its disk too.
    let backups = o.backup.clone().map(|s| {
        crate::shell::backup::schedule::start(
            queue.clone(),
            o.data_dir.clone(),
            o.config_file.clone(),
            s,
            o.limits.min_free_disk,
        )
    });
    let uplink = match (&o.upstream, &o.nats) {
        (Some((u, _)), _) => Some(crate::shell::upstream::start(
            queue.clone(),
            runners,
            u.clone(),
        )),
        (None, Some((n, _))) => Some(crate::shell::upstream::nats::start(
            queue.clone(),
            runners,
            n.clone(),
        )),
        (None, None) => None,
    };
    let monitor = crate::shell::monitor::Monitor::start(
        queue.clone(),
        uplink.as_ref().map(|u| u.watch()),
        crate::shell::monitor::MonitorOptions {
            rules: o.alerts.clone(),
            sample: o.http.is_some() || o.metrics.is_some(),
            max_disk: o.limits.max_disk,
            data_dir: o.data_dir.clone(),
            upstream: o.upstream.is_some() || o.nats.is_some(),
            shared_bundles: Some(crate::shell::monitor::SharedBundles {
                list: {
                    let link = link.clone();
                    Arc::new(move || {
                        link.shared_bundles()
                            .into_iter()
                            .map(|b| b.device)
                            .collect()
                    })
                },
                found: link.bundles_found(),
            }),
        },
    );
    let listener = admin::bind(&o.data_dir).await?;
    let ctx = Arc::new(AdminContext {
        queue: queue.clone(),
        identity: identity.clone(),
        link: link.clone(),
        advertise: advertise.clone(),
        data_dir: o.data_dir.clone(),
        started: Instant::now(),
        uplink: uplink.as_ref().map(|u| u.watch()),
        workflows: Some(workflows.clone()),
        rollouts: Some(rollouts.clone()),
        monitor: Some(monitor.clone()),
        max_disk: o.limits.max_disk,
        access: Arc::new(o.access.clone()),
        config_file: o.config_file.clone(),
        backups: backups.as_ref().map(|b| b.0.clone()),
    });
    let admin = tokio::spawn(admin::serve(listener, ctx.clone()));
    let mut http_opts = o.http_opts.clone();
    http_opts.max_payload.get_or_insert(o.limits.max_payload);
    let mut http_tasks = Vec::new();
    let mut http_addr = None;
    let mut metrics_addr = None;
    if let Some(addr) = o.http {
        let (a, t) = crate::shell::http::serve(addr, ctx.clone(), http_opts.clone(), true).await?;
        http_addr = Some(a);
        http_tasks.push(t);
    }
    if let Some(addr) = o.metrics {
        if Some(addr) == o.http {
            metrics_addr = http_addr;
        } else {
            let (a, t) = crate::shell::http::serve(addr, ctx.clone(), http_opts.clone(), false)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            metrics_addr = Some(a);
            http_tasks.push(t);
        }
    }
    Ok(RunningBox {
        workflows,
        rollouts,
        uplink,
        metrics_addr,
        http_addr,
        monitor,
        collector,
        backups: backups.map(|b| b.1),
        http_tasks,
        queue,
        link,
        identity,
        addr,
        advertise,
        admin,
        socket: o.data_dir.join(admin::SOCKET),
    })
}

/// What bundles name as the box's address: `advertise` if set, else the
/// listen address, or `<hostname>:<port>` when listening on every address.
pub fn advertise_for(listen: SocketAddr, advertise: Option<&str>) -> String {
    if let Some(a) = advertise {
        return a.to_string();
    }
    if listen.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", listen.port())
    } else {
        listen.to_string()
    }
}

/// Whether a reserve of `reserve` bytes can never be met on a filesystem of
/// `total` bytes: free space is at most the whole filesystem minus the
/// database, so every send would be refused.
pub fn reserve_exceeds_disk(reserve: u64, total: u64) -> bool {
    reserve > 0 && reserve >= total
}

/// The box still starts (what is queued is still delivered), but says why
/// every send will be refused.
fn warn_if_reserve_exceeds_disk(dir: &std::path::Path, reserve: u64) {
    let Ok((total, _)) = crate::shell::store::fs_space_of(dir) else {
        return;
    };
    if reserve_exceeds_disk(reserve, total) {
        use crate::shell::config::show_size;
        tracing::warn!(
            "the free-space reserve ({}) is not smaller than the whole filesystem holding {} ({}): every new command will be refused; lower --min-free-disk (OUTPOST_MIN_FREE_DISK, min_free_disk in the config file) below {}, or leave it unset for the smaller of 32 MiB and 10 % of the disk ({})",
            show_size(reserve),
            dir.display(),
            show_size(total),
            show_size(total),
            show_size(crate::shell::queue::default_reserve(total))
        );
    }
}

impl RunningBox {
    /// Stop accepting, close device connections, finish the current group
    /// commit and close the store.
    pub async fn stop(self) {
        self.admin.abort();
        for t in &self.http_tasks {
            t.abort();
        }
        self.monitor.stop();
        self.collector.abort();
        if let Some(b) = &self.backups {
            b.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
        drop(self.uplink);
        self.workflows.stop().await;
        self.rollouts.stop().await;
        self.link.shutdown().await;
        self.queue.shutdown().await;
    }
}

/// Run the box until SIGTERM or SIGINT.
pub async fn run(o: ServeOptions) -> anyhow::Result<()> {
    let data_dir = o.data_dir.clone();
    let b = start(o).await?;
    // Before READY: a SIGTERM right after it must stop the box cleanly, not
    // kill it (tests/systemd.rs caught the race).
    let stop = crate::device::shutdown_signal();
    tracing::info!(listen = %b.addr, data_dir = %data_dir.display(), "box serving");
    if let Some(m) = b.metrics_addr {
        tracing::info!("metrics on http://{m}/metrics");
    }
    if let Some(h) = b.http_addr {
        tracing::info!("dashboard on http://{h}/");
    }
    crate::shell::notify::ready(&format!("serving on {}", b.addr));
    let watchdog = crate::shell::notify::watchdog_interval().map(|every| {
        let q = b.queue.clone();
        // The queue answering a stats request proves the writer thread is
        // alive, not just the runtime.
        tokio::spawn(crate::shell::notify::watchdog(every, move || {
            let q = q.clone();
            async move { q.stats().await.is_ok() }
        }))
    });
    stop.await;
    tracing::info!("stopping: closing connections, finishing the current flush");
    crate::shell::notify::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    b.stop().await;
    tracing::info!("stopped");
    Ok(())
}

//! Benchmarks a technician can run on the real box (`outpost bench`) and
//! that `benches/` runs on a development machine. They print figures; they
//! never assert on time (shared machines make timed assertions flaky).
//!
//! `queue_bench` measures the durable queue alone, without the network:
//! durable enqueue throughput with P concurrent producers, then delivery and
//! ack throughput through one in-process device session per device, and the
//! bytes the process wrote to storage per command over its whole life
//! (enqueue → deliver → ack → dropped), read from `/proc/self/io`.

pub mod artifact;
pub mod process;
pub mod relay;

use crate::engine::command::{Outcome, SendOptions};
use crate::shell::queue::{self, Delivery, QueueHandle, SendRequest, ServiceOptions};
use crate::shell::store::{dir_size, DeviceRecord, Store, StoreOptions};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// What to run.
#[derive(Clone, Debug)]
pub struct QueueBenchOptions {
    /// Commands to send in all, rounded down to a multiple of `producers`.
    pub commands: usize,
    /// Concurrent senders (0 is taken as 1).
    pub producers: usize,
    /// Devices (`bench-0`, …) the commands go to in turn, each drained by
    /// one in-process session (0 is taken as 1).
    pub devices: usize,
    /// Payload bytes per command.
    pub payload: usize,
    /// Devices connected while producers enqueue (a flow), rather than
    /// draining a backlog afterwards.
    pub flow: bool,
}

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct QueueBenchReport {
    /// Commands sent, delivered and acked (the asked count, rounded down).
    pub commands: usize,
    /// Concurrent senders, as asked.
    pub producers: usize,
    /// Devices drained, at least 1.
    pub devices: usize,
    /// Payload bytes per command.
    pub payload_bytes: usize,
    /// Devices were connected while producers enqueued (a flow), rather
    /// than draining the backlog afterwards.
    pub flow: bool,
    /// Durable enqueues per second: `commands` over the time from the first
    /// send to the last receipt.
    pub enqueue_per_s: f64,
    /// Deliveries acked per second, from the start of the drain to its last
    /// ack (in a flow, from the first send: end-to-end throughput).
    pub deliver_ack_per_s: f64,
    /// Group commits over the run (each a batch made durable with one
    /// flush).
    pub group_commits: u64,
    /// Enqueues and acks per group commit: 2 × `commands` / `group_commits`.
    pub commands_per_group: f64,
    /// Bytes written to storage per command over its whole life (0 when the
    /// kernel does not report per-process IO).
    pub bytes_written_per_command: f64,
    /// The data dir's size at the end, every command acked, bytes.
    pub data_dir_bytes_after: u64,
}

/// Storage bytes written by this process so far (`write_bytes`), if known.
pub fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Run the queue benchmark in `dir` (which should be on the box's real
/// storage, not tmpfs, for the write figures to mean anything).
pub async fn queue_bench(dir: &Path, o: &QueueBenchOptions) -> anyhow::Result<QueueBenchReport> {
    let store = Store::open(dir, &StoreOptions::default())?;
    let q = queue::open(store.clone(), ServiceOptions::default())?;
    let devices: Vec<String> = (0..o.devices.max(1))
        .map(|i| format!("bench-{i}"))
        .collect();
    for d in &devices {
        q.enroll(DeviceRecord::new(d.clone())).await?;
    }
    let written_before = process_write_bytes();
    let commits_before = q.stats().await?.group_commits_total;

    let per_producer = o.commands / o.producers.max(1);
    let total = per_producer * o.producers.max(1);
    let mut drains = tokio::task::JoinSet::new();
    let spawn_drains = |drains: &mut tokio::task::JoinSet<_>| {
        let per_device = total / devices.len();
        let extra = total % devices.len();
        for (i, d) in devices.iter().enumerate() {
            let expect = per_device + usize::from(i < extra);
            drains.spawn(drain(q.clone(), d.clone(), expect));
        }
    };
    if o.flow {
        spawn_drains(&mut drains);
    }
    // Phase 1: durable enqueue with P producers (devices offline unless
    // `flow`).
    let started = Instant::now();
    produce(
        &q,
        &devices,
        total,
        o.producers,
        o.payload,
        None,
        None,
        None,
    )
    .await?;
    let enqueue_s = started.elapsed().as_secs_f64();

    // Phase 2: every device acks what it receives (in a flow, this is the
    // tail of the run: the figure is then end-to-end throughput).
    if !o.flow {
        spawn_drains(&mut drains);
    }
    let ack_started = if o.flow { started } else { Instant::now() };
    while let Some(r) = drains.join_next().await {
        r??;
    }
    let ack_s = ack_started.elapsed().as_secs_f64();
    let stats = q.stats().await?;
    let commits = stats.group_commits_total - commits_before;
    q.shutdown().await;
    let written = match (written_before, process_write_bytes()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    let size = dir_size(dir);
    Ok(QueueBenchReport {
        commands: total,
        producers: o.producers,
        devices: devices.len(),
        payload_bytes: o.payload,
        flow: o.flow,
        enqueue_per_s: total as f64 / enqueue_s,
        deliver_ack_per_s: total as f64 / ack_s,
        group_commits: commits,
        commands_per_group: 2.0 * total as f64 / commits.max(1) as f64,
        bytes_written_per_command: written as f64 / total.max(1) as f64,
        data_dir_bytes_after: size,
    })
}

/// Enqueue `total` commands of `payload_len` bytes from `producers`
/// concurrent senders; producer p sends commands p, p+P, p+2P, … and command
/// i goes to `targets[i % targets.len()]`. With `rate`, sends are paced
/// open-loop at that many per second in all; with `stamp`, each payload
/// starts with the microseconds since `stamp` at the moment of sending (W1
/// measures enqueue → receipt from it). With `signed`, command i is the
/// pre-signed payload and envelope i, and its send time goes to `sent[i]`
/// (the payload cannot carry a stamp: it is signed before the run).
#[allow(clippy::too_many_arguments)]
async fn produce(
    q: &QueueHandle,
    targets: &[String],
    total: usize,
    producers: usize,
    payload_len: usize,
    rate: Option<u64>,
    stamp: Option<Instant>,
    signed: Option<std::sync::Arc<Signed>>,
) -> anyhow::Result<Vec<u64>> {
    let producers = producers.max(1);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..producers {
        let (q, targets, signed) = (q.clone(), targets.to_vec(), signed.clone());
        tasks.spawn(async move {
            let mut accepted = Vec::with_capacity(total / producers + 1);
            for (k, i) in (p..total).step_by(producers).enumerate() {
                if let Some(r) = rate {
                    // This producer's k-th send is due at k·P/R seconds,
                    // however late the previous ones were.
                    let due = started
                        + std::time::Duration::from_secs_f64(
                            k as f64 * producers as f64 / r as f64,
                        );
                    tokio::time::sleep_until(due.into()).await;
                }
                let (payload, signature) = match &signed {
                    Some(sg) => {
                        if let Some(t) = stamp {
                            sg.sent[i].store(
                                t.elapsed().as_micros() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                        (sg.payloads[i].clone(), Some(sg.envelopes[i].clone()))
                    }
                    None => {
                        let mut payload = vec![b'x'; payload_len];
                        if let (Some(t), Some(head)) = (stamp, payload.get_mut(..8)) {
                            head.copy_from_slice(&(t.elapsed().as_micros() as u64).to_be_bytes());
                        }
                        (payload, None)
                    }
                };
                let target = targets[i % targets.len()].clone();
                let digest = crate::engine::audit::sha256(&payload);
                let asked = Instant::now();
                let receipt = q
                    .send(SendRequest {
                        target: target.clone(),
                        payload,
                        opts: SendOptions::default(),
                        origin: "bench".into(),
                        signature,
                    })
                    .await?;
                accepted.push(asked.elapsed().as_micros() as u64);
                // Each send audited as the admin socket audits it, so W1
                // counts what the log costs intake.
                q.audit(crate::engine::audit::Note {
                    at: crate::now_millis(),
                    who: "uid 0".into(),
                    from: "socket".into(),
                    what: "send".into(),
                    target,
                    command: Some(receipt.id.to_string()),
                    payload_sha256: Some(digest),
                    allowed: true,
                    why: None,
                });
            }
            anyhow::Ok(accepted)
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

async fn drain(q: QueueHandle, device: String, expect: usize) -> Result<(), queue::QueueError> {
    let mut session = q.connect(device, 0).await?;
    // Acks pipelined as a real link does: many in flight, one flush each round.
    let mut acks = tokio::task::JoinSet::new();
    let mut done = 0;
    while done < expect {
        let Some(d) = session.rx.recv().await else {
            break;
        };
        if let Delivery::Command(c) = d {
            acks.spawn(session.ack(c.id, Outcome::Ok(Vec::new())));
            done += 1;
        }
        while let Some(r) = acks.try_join_next() {
            r.map_err(|e| queue::QueueError::Storage(e.to_string()))??;
        }
    }
    while let Some(r) = acks.join_next().await {
        r.map_err(|e| queue::QueueError::Storage(e.to_string()))??;
    }
    Ok(())
}

impl QueueBenchReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        format!(
            "queue bench ({}): {} commands of {} B, {} producers, {} devices\n\
             durable enqueue      {:>12.0} commands/s\n\
             deliver + ack        {:>12.0} commands/s{}\n\
             group commits        {:>12} ({:.1} operations per flush)\n\
             written per command  {:>12.0} bytes (whole life, /proc/self/io)\n\
             data dir after       {:>12} bytes\n",
            if self.flow {
                "flow: devices connected"
            } else {
                "backlog: enqueue all, then drain"
            },
            self.commands,
            self.payload_bytes,
            self.producers,
            self.devices,
            self.enqueue_per_s,
            self.deliver_ack_per_s,
            if self.flow { " (end to end)" } else { "" },
            self.group_commits,
            self.commands_per_group,
            self.bytes_written_per_command,
            self.data_dir_bytes_after
        )
    }
}

/// What a restart with a large backlog costs.
#[derive(Clone, Debug, Serialize)]
pub struct RestartReport {
    /// Commands waiting in the box when it restarts (all offline).
    pub queued: usize,
    /// Open the store, replay, and hand the first command to a device.
    pub open_to_first_delivery_s: f64,
    /// Resident memory growth from before the open to a second after the
    /// first delivery (what the box holds while the backlog waits).
    pub rss_bytes_per_queued: f64,
    /// The peak of the same (the open's transient buffers included).
    pub peak_rss_bytes_per_queued: f64,
    /// The data dir's size with the backlog in it, after the restart, bytes.
    pub data_dir_bytes: u64,
}

impl RestartReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        format!(
            "W2: restart with {} commands queued\n\
             open → first delivery {:>10.3} s (open the store, replay, serve)\n\
             memory per queued    {:>10.1} bytes (RSS growth over the open, settled)\n\
             peak per queued      {:>10.1} bytes (during the open)\n\
             data dir             {:>10} bytes\n",
            self.queued,
            self.open_to_first_delivery_s,
            self.rss_bytes_per_queued,
            self.peak_rss_bytes_per_queued,
            self.data_dir_bytes
        )
    }
}

/// Resident set size of this process, from /proc (0 where unknown).
pub fn rss_bytes() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// Peak resident set size of this process, from /proc (0 where unknown).
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:") * 1024
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Fill a queue with `n` commands for `devices` offline devices, close it,
/// then time a fresh open until the first delivery (W2). The open runs in
/// a process of its own (`exe bench --reopen`): in this one, the memory the
/// fill freed would be reused by the open and hide what it costs.
pub async fn restart_bench(
    exe: &Path,
    dir: &Path,
    n: usize,
    devices: usize,
) -> anyhow::Result<RestartReport> {
    {
        let q = queue::open(
            Store::open(dir, &StoreOptions::default())?,
            ServiceOptions::default(),
        )?;
        let names: Vec<String> = (0..devices.max(1)).map(|i| format!("bench-{i}")).collect();
        for d in &names {
            q.enroll(DeviceRecord::new(d.clone())).await?;
        }
        produce(&q, &names, n, 64, 100, None, None, None).await?;
        q.shutdown().await;
    }
    let out = tokio::process::Command::new(exe)
        .arg("bench")
        .arg("--reopen")
        .arg(dir)
        .env("OUTPOST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "the restarted box failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let r: Reopened = serde_json::from_slice(&out.stdout)?;
    Ok(RestartReport {
        queued: n,
        open_to_first_delivery_s: r.open_to_first_delivery_s,
        rss_bytes_per_queued: r.rss_after.saturating_sub(r.rss_before) as f64 / n.max(1) as f64,
        peak_rss_bytes_per_queued: r.rss_peak.saturating_sub(r.rss_before) as f64 / n.max(1) as f64,
        data_dir_bytes: dir_size(dir),
    })
}

/// What W2's restarted process measured of itself.
#[derive(Serialize, Deserialize)]
pub struct Reopened {
    /// Seconds from the store's open to the first delivery to `bench-0`.
    pub open_to_first_delivery_s: f64,
    /// The process's RSS before the open, bytes.
    pub rss_before: u64,
    /// Its RSS a second after the first delivery (settled), bytes.
    pub rss_after: u64,
    /// Its peak RSS (VmHWM) over its life, the open included, bytes.
    pub rss_peak: u64,
}

/// W2's second half: open the box in `dir` and wait for the first delivery
/// to `bench-0`.
pub async fn reopen(dir: &Path) -> anyhow::Result<Reopened> {
    // Only a box W2 filled: opening creates a store, and this one must not.
    anyhow::ensure!(
        crate::shell::store::is_store(dir),
        "{} holds no box; `outpost bench --restart N` fills one and reopens it",
        dir.display()
    );
    let rss_before = rss_bytes();
    let started = Instant::now();
    let q = queue::open(
        Store::open(dir, &StoreOptions::default())?,
        ServiceOptions::default(),
    )?;
    let mut s = q.connect("bench-0".into(), 0).await?;
    let first = s.rx.recv().await;
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        matches!(first, Some(Delivery::Command(_))),
        "no delivery after restart"
    );
    // Settled: what the open freed has had time to go back to the system.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let rss_after = rss_bytes();
    drop(s);
    q.shutdown().await;
    Ok(Reopened {
        open_to_first_delivery_s: elapsed,
        rss_before,
        rss_after,
        rss_peak: peak_rss_bytes(),
    })
}

/// Workload W1: a real box on loopback (QUIC, TLS, the queue on disk) and N
/// in-process devices; producers enqueue, devices receive and ack.
#[derive(Clone, Debug)]
pub struct LinkBenchOptions {
    /// Devices (`w1-0`, …), each with a connection of its own over one
    /// client endpoint (0 is taken as 1).
    pub devices: usize,
    /// Commands in all, rounded down to a multiple of `devices`.
    pub commands: usize,
    /// Payload bytes per command, at least 8 (the first 8 carry the send
    /// time, or a signed command's index).
    pub payload: usize,
    /// Concurrent senders (0 is taken as 1).
    pub producers: usize,
    /// Offered load in commands/s (`None`: as fast as the box accepts).
    pub rate: Option<u64>,
    /// The box requires signatures and every command is signed (pre-signed
    /// before the run, so only the box's verification is measured).
    pub signed: bool,
}

/// W1's pre-signed commands: payload i (its index first), envelope i, and
/// when command i was sent (µs since the run's epoch).
pub struct Signed {
    payloads: Vec<Vec<u8>>,
    envelopes: Vec<Vec<u8>>,
    sent: Vec<std::sync::atomic::AtomicU64>,
    /// Verifying one envelope at the gate, µs (one thread, mean of all).
    verify_us: f64,
}

impl Signed {
    fn make(
        targets: &[String],
        total: usize,
        payload_len: usize,
    ) -> anyhow::Result<(Signed, crate::engine::trust::Gate)> {
        use crate::engine::trust::{envelope, Claims, Grant, OperatorKey, Role, TrustSet};
        let key = OperatorKey::generate("bench")?;
        let mut set = TrustSet::default();
        let now = crate::now_millis();
        set.add(&key.public, None, Grant::new(Role::Operator), now);
        let gate = crate::engine::trust::Gate::new("bench".into(), true, set);
        let mut payloads = Vec::with_capacity(total);
        let mut envelopes = Vec::with_capacity(total);
        for i in 0..total {
            let mut payload = vec![b'x'; payload_len.max(8)];
            payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let claims = Claims {
                id: crate::CommandId::new(now, rand::random()),
                target: targets[i % targets.len()].clone(),
                payload_sha256: envelope::payload_digest(&payload),
                artifact: None,
                priority: crate::Priority::Normal,
                not_before: None,
                expires_at: now + 3_600_000,
                audience: "bench".into(),
                key_id: key.public.id,
            };
            envelopes.push(envelope::seal(&claims, &key)?);
            payloads.push(payload);
        }
        // The cost of the check alone, on this thread, over every command.
        let t = Instant::now();
        for i in 0..total {
            let intake = crate::engine::trust::Intake {
                envelope: Some(&envelopes[i]),
                target: &targets[i % targets.len()],
                id: None,
                payload: &payloads[i],
                priority: crate::Priority::Normal,
                not_before: None,
            };
            gate.admit(intake, now)
                .map_err(|e| anyhow::anyhow!("a bench envelope does not verify: {e}"))?;
        }
        let verify_us = t.elapsed().as_secs_f64() * 1e6 / total.max(1) as f64;
        let sent = (0..total)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        Ok((
            Signed {
                payloads,
                envelopes,
                sent,
                verify_us,
            },
            gate,
        ))
    }
}

/// What one W1 run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LinkBenchReport {
    /// Devices connected, at least 1.
    pub devices: usize,
    /// Commands sent and acked (the asked count, rounded down).
    pub commands: usize,
    /// Payload bytes per command, at least 8.
    pub payload_bytes: usize,
    /// Concurrent senders, at least 1.
    pub producers: usize,
    /// Offered load in commands/s (`None`: as fast as the box accepts).
    pub offered_rate: Option<u64>,
    /// Devices connected per second, one after another (QUIC and TLS
    /// handshakes included).
    pub connect_per_s: f64,
    /// Commands per second, first enqueue to last durable ack.
    pub throughput_per_s: f64,
    /// Enqueue call → device receipt, microseconds.
    pub latency_p50_us: u64,
    /// The same at the 99th percentile, microseconds.
    pub latency_p99_us: u64,
    /// The same at the 99.9th percentile, microseconds.
    pub latency_p999_us: u64,
    /// Enqueue call → "accepted" (durable on disk), microseconds: the part
    /// of the latency that is the group commit.
    pub accept_p50_us: u64,
    /// The same at the 99th percentile, microseconds.
    pub accept_p99_us: u64,
    /// Group commits during the run (each an enqueue or ack batch made
    /// durable with one flush).
    pub group_commits: u64,
    /// Their mean time in the store (write and flush), microseconds.
    pub commit_mean_us: u64,
    /// This process's peak RSS (VmHWM), bytes: box and devices together.
    pub peak_rss_bytes: u64,
    /// Bytes this process wrote to storage per command during the run (0
    /// when the kernel does not report per-process IO).
    pub bytes_written_per_command: f64,
    /// The data dir's size at the end, bytes.
    pub data_dir_bytes_after: u64,
    /// The box required signatures and verified every command.
    pub signed: bool,
    /// With `signed`: one verification's cost on one thread, µs, timed
    /// apart before the run (`None` unsigned).
    pub verify_us: Option<f64>,
}

impl LinkBenchReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let rate = self
            .offered_rate
            .map_or("max".to_string(), |r| format!("{r}/s"));
        format!(
            "W1: {} devices, {} commands of {} B, {} producers, offered {}\n\
             connect rate         {:>12.0} devices/s\n\
             throughput           {:>12.0} commands/s (enqueue → durable ack)\n\
             latency p50          {:>12.3} ms (enqueue → device receipt)\n\
             latency p99          {:>12.3} ms\n\
             latency p99.9        {:>12.3} ms\n\
             accepted p50, p99    {:>5.3}, {:.3} ms (enqueue → durable: the group commit)\n\
             group commits        {:>12} ({:.1} enqueues and acks each, {:.3} ms mean write and flush)\n\
             peak RSS             {:>12.1} MiB (box and devices in one process)\n\
             written per command  {:>12.0} bytes\n\
             data dir after       {:>12} bytes\n{}",
            self.devices,
            self.commands,
            self.payload_bytes,
            self.producers,
            rate,
            self.connect_per_s,
            self.throughput_per_s,
            self.latency_p50_us as f64 / 1000.0,
            self.latency_p99_us as f64 / 1000.0,
            self.latency_p999_us as f64 / 1000.0,
            self.accept_p50_us as f64 / 1000.0,
            self.accept_p99_us as f64 / 1000.0,
            self.group_commits,
            2.0 * self.commands as f64 / self.group_commits.max(1) as f64,
            self.commit_mean_us as f64 / 1000.0,
            self.peak_rss_bytes as f64 / (1024.0 * 1024.0),
            self.bytes_written_per_command,
            self.data_dir_bytes_after,
            match self.verify_us {
                Some(us) => format!(
                    "signed               every command, verified at the box ({us:.1} µs each on one thread)\n"
                ),
                None => String::new(),
            }
        )
    }
}

/// Run W1 in `dir`.
pub async fn link_bench(dir: &Path, o: &LinkBenchOptions) -> anyhow::Result<LinkBenchReport> {
    use crate::device::{self, ConnectOptions};
    use crate::identity::{Identity, RevokedSet};
    use crate::shell::link::{DeviceLink, LinkOptions};

    let identity = Identity::init(dir, &[])?;
    let n = o.devices.max(1);
    let names: Vec<String> = (0..n).map(|i| format!("w1-{i}")).collect();
    let total = o.commands - o.commands % n;
    let (signed, gate) = if o.signed {
        let (s, g) = Signed::make(&names, total, o.payload.max(8))?;
        (Some(std::sync::Arc::new(s)), std::sync::Arc::new(g))
    } else {
        (None, std::sync::Arc::default())
    };
    let q = queue::open(
        Store::open(dir, &StoreOptions::default())?,
        ServiceOptions {
            gate,
            ..ServiceOptions::default()
        },
    )?;
    let revoked = RevokedSet::new();
    let link = DeviceLink::start(
        "127.0.0.1:0".parse()?,
        identity.server_config(revoked.clone())?,
        revoked,
        q.clone(),
        LinkOptions::default(),
    )?;
    let addr = link.local_addr()?;
    let mut bundles = Vec::with_capacity(n);
    for d in &names {
        q.enroll(DeviceRecord::new(d.clone())).await?;
        bundles.push(identity.issue_device(d, &addr.to_string())?);
    }

    // Connect every device over one client endpoint.
    let endpoint = device::client_endpoint(addr)?;
    let copts = ConnectOptions::default();
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for b in &bundles {
        conns.push(device::connect_with(&endpoint, addr, b, &copts).await?);
    }
    let connect_s = started.elapsed().as_secs_f64();

    let per_device = total / n;
    let epoch = Instant::now();
    let mut devices = receive_and_ack(conns, per_device, epoch, signed.clone());

    let written_before = process_write_bytes();
    let before = q.stats().await?;
    let acked_before = before.acked_total;
    let run_started = Instant::now();
    let producers = o.producers.max(1);
    let mut accepted = produce(
        &q,
        &names,
        total,
        producers,
        o.payload.max(8),
        o.rate,
        Some(epoch),
        signed.clone(),
    )
    .await?;
    let mut lat = Vec::with_capacity(total);
    let mut keep = Vec::new();
    while let Some(r) = devices.join_next().await {
        let (c, l) = r??;
        lat.extend(l);
        keep.push(c);
    }
    // Throughput counts to the last ack made durable on the box.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while q.stats().await?.acked_total - acked_before < total as u64 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let run_s = run_started.elapsed().as_secs_f64();
    let written = match (written_before, process_write_bytes()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    let after = q.stats().await?;
    let commits = after.group_commits_total - before.group_commits_total;
    let commit_s = after.flush_seconds_sum - before.flush_seconds_sum;
    drop(keep);
    link.shutdown().await;
    q.shutdown().await;
    lat.sort_unstable();
    accepted.sort_unstable();
    let pct = |p: f64| percentile(&lat, p);
    Ok(LinkBenchReport {
        devices: n,
        commands: total,
        payload_bytes: o.payload.max(8),
        producers,
        offered_rate: o.rate,
        connect_per_s: n as f64 / connect_s,
        throughput_per_s: total as f64 / run_s,
        latency_p50_us: pct(0.50),
        latency_p99_us: pct(0.99),
        latency_p999_us: pct(0.999),
        accept_p50_us: percentile(&accepted, 0.50),
        accept_p99_us: percentile(&accepted, 0.99),
        group_commits: commits,
        commit_mean_us: (commit_s * 1e6 / commits.max(1) as f64) as u64,
        peak_rss_bytes: peak_rss_bytes(),
        bytes_written_per_command: written as f64 / total.max(1) as f64,
        data_dir_bytes_after: dir_size(dir),
        signed: o.signed,
        verify_us: signed.map(|s| s.verify_us),
    })
}

/// What a W1 device hands back: its connection, kept open until the run
/// is measured, and each command's send → receipt latency (µs).
type Receipts = (crate::device::DeviceConnection, Vec<u64>);

/// W1's devices: each takes `per_device` commands and acks each at once.
/// The send time is the payload's first 8 bytes, or for a signed run the
/// index into `signed`'s send times.
fn receive_and_ack(
    conns: Vec<crate::device::DeviceConnection>,
    per_device: usize,
    epoch: Instant,
    signed: Option<std::sync::Arc<Signed>>,
) -> tokio::task::JoinSet<anyhow::Result<Receipts>> {
    use crate::device::Received;
    let mut devices = tokio::task::JoinSet::new();
    for mut c in conns {
        let signed = signed.clone();
        devices.spawn(async move {
            let mut lat = Vec::with_capacity(per_device);
            let sender = c.sender();
            while lat.len() < per_device {
                match c.next().await? {
                    Some(Received::Command(cmd)) => {
                        let now = epoch.elapsed().as_micros() as u64;
                        let head = cmd
                            .payload
                            .get(..8)
                            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
                        let sent = match (&signed, head) {
                            (Some(sg), Some(i)) => {
                                sg.sent[i as usize].load(std::sync::atomic::Ordering::Relaxed)
                            }
                            (None, Some(t)) => t,
                            (_, None) => now,
                        };
                        lat.push(now.saturating_sub(sent));
                        sender
                            .ack_attempt(cmd.id, cmd.attempt, Outcome::Ok(Vec::new()))
                            .await?;
                    }
                    Some(_) => {}
                    None => anyhow::bail!("the box closed a device connection"),
                }
            }
            anyhow::Ok((c, lat))
        });
    }
    devices
}

/// The `p` quantile of sorted `v` (0 when empty).
fn percentile(v: &[u64], p: f64) -> u64 {
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

/// W3: an idle box with N connected devices, measured from outside — the
/// box runs as its own `outpost serve` process, the devices connect from
/// this one — so the figures are the box's alone.
#[derive(Clone, Debug, Serialize)]
pub struct IdleReport {
    /// Devices connected to the box, idle.
    pub devices: usize,
    /// The box's RSS once serving, before any device connected.
    pub rss_base_bytes: u64,
    /// RSS growth per connected idle device.
    pub rss_per_device_bytes: f64,
    /// How long the box was measured idle, seconds (the span of
    /// `cpu_seconds` and `bytes_written`).
    pub idle_secs: u64,
    /// CPU time (user + system) the box used while idle.
    pub cpu_seconds: f64,
    /// Bytes the box wrote to storage while idle.
    pub bytes_written: u64,
}

impl IdleReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        format!(
            "W3: idle box with {} connected devices for {} s (box measured as its own process)\n\
             box RSS before devices  {:>10.1} MiB\n\
             RSS per idle device     {:>10.1} KiB\n\
             CPU used while idle     {:>10.3} s ({:.2}% of one core)\n\
             bytes written idle      {:>10}\n",
            self.devices,
            self.idle_secs,
            self.rss_base_bytes as f64 / (1024.0 * 1024.0),
            self.rss_per_device_bytes / 1024.0,
            self.cpu_seconds,
            100.0 * self.cpu_seconds / self.idle_secs.max(1) as f64,
            self.bytes_written
        )
    }
}

fn proc_field(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Run W3 with the `outpost` binary at `exe`, its data in `dir`.
pub async fn idle_bench(exe: &Path, dir: &Path, n: usize, secs: u64) -> anyhow::Result<IdleReport> {
    use crate::device::{self, ConnectOptions};
    use std::time::Duration;

    let mut b = process::BoxProcess::start(exe, dir).await?;
    let rss_base = b.rss();
    let mut bundles = Vec::with_capacity(n);
    for i in 0..n {
        bundles.push(b.enroll(&format!("idle-{i}")).await?);
    }
    let endpoint = device::client_endpoint(b.addr)?;
    let opts = ConnectOptions::default();
    let mut conns = Vec::with_capacity(n);
    let rss_enrolled = b.rss();
    for bundle in &bundles {
        conns.push(device::connect_with(&endpoint, b.addr, bundle, &opts).await?);
    }
    // Let connection set-up settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = b.rss();
    let (cpu0, w0) = (b.cpu_seconds(), b.written());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (cpu1, w1) = (b.cpu_seconds(), b.written());
    drop(conns);
    b.kill().await;
    Ok(IdleReport {
        devices: n,
        rss_base_bytes: rss_base,
        rss_per_device_bytes: rss_connected.saturating_sub(rss_enrolled) as f64 / n.max(1) as f64,
        idle_secs: secs,
        cpu_seconds: cpu1 - cpu0,
        bytes_written: w1.saturating_sub(w0),
    })
}

//! A box run as its own `outpost serve` process, for the benches that
//! measure it from outside (W3, the artifact bench, W1 with `--box-process`):
//! its CPU, RSS and writes are then the box's alone, not the clients'.

use super::{percentile, proc_cpu_seconds, proc_field};
use crate::identity::Bundle;
use crate::shell::admin::{AdminClient, AdminRequest, AdminResponse};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A running box, killed when dropped.
pub struct BoxProcess {
    child: tokio::process::Child,
    /// Its process id, for what /proc says of it.
    pub pid: u32,
    /// Its data dir, where its admin socket is.
    pub dir: PathBuf,
    /// A client on its admin socket, connected at the start.
    pub admin: AdminClient,
    /// Where its devices connect.
    pub addr: std::net::SocketAddr,
}

impl BoxProcess {
    /// Start `exe serve` on a free loopback port with its data in `dir`,
    /// and wait until it answers on its admin socket.
    pub async fn start(exe: &Path, dir: &Path) -> anyhow::Result<BoxProcess> {
        let child = tokio::process::Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("OUTPOST_DATA_DIR", dir)
            .env("OUTPOST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("the box exited at once"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut admin = loop {
            match AdminClient::connect(dir).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => anyhow::bail!("the box did not start: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let AdminResponse::Status(status) = admin.call(&AdminRequest::Status).await? else {
            anyhow::bail!("unexpected status answer")
        };
        Ok(BoxProcess {
            child,
            pid,
            dir: dir.to_path_buf(),
            admin,
            addr: status.listen.parse()?,
        })
    }

    /// Enroll device `id`, as `outpost enroll` would; its bundle.
    pub async fn enroll(&mut self, id: &str) -> anyhow::Result<Bundle> {
        let req = AdminRequest::Enroll {
            id: id.to_string(),
            tags: vec![],
            caps: vec![],
            gateway: false,
            force: false,
        };
        let AdminResponse::Bundle { text } = self.admin.call(&req).await? else {
            anyhow::bail!("unexpected enroll answer")
        };
        Ok(Bundle::parse(&text, "the enroll answer")?)
    }

    /// Its resident set size now (VmRSS), bytes (0 once it is gone).
    pub fn rss(&self) -> u64 {
        proc_field(self.pid, "status", "VmRSS:") * 1024
    }

    /// Its peak resident set size over its life (VmHWM), bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_field(self.pid, "status", "VmHWM:") * 1024
    }

    /// User + system CPU the box has used, seconds.
    pub fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid)
    }

    /// Bytes the box has had written to storage.
    pub fn written(&self) -> u64 {
        proc_field(self.pid, "io", "write_bytes:")
    }

    /// Kill it (SIGKILL, no shutdown) and wait for it to exit.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// W1 with the box as its own process: producers send through its admin
/// socket (as `outpost send` does), devices connect over QUIC from this
/// process.
#[derive(Clone, Debug, Serialize)]
pub struct BoxW1Report {
    /// Devices connected, at least 1.
    pub devices: usize,
    /// Commands sent and acked: the asked count, rounded down to a multiple
    /// of `devices`.
    pub commands: usize,
    /// Payload bytes per command, at least 8 (the first 8 carry the send
    /// time).
    pub payload_bytes: usize,
    /// Concurrent senders, each on an admin connection of its own.
    pub producers: usize,
    /// First send to the last ack made durable on the box.
    pub throughput_per_s: f64,
    /// Send call → device receipt, microseconds.
    pub latency_p50_us: u64,
    /// The same at the 99th percentile, microseconds.
    pub latency_p99_us: u64,
    /// The box's CPU (user + system) per command over the run.
    pub box_cpu_us_per_command: f64,
    /// The box's peak RSS (VmHWM, its whole life), bytes.
    pub box_peak_rss_bytes: u64,
    /// Its RSS growth over the run, from after the devices connected to
    /// the last ack, bytes.
    pub box_rss_growth_bytes: u64,
    /// Bytes the box wrote per command over the run.
    pub box_bytes_written_per_command: f64,
}

impl BoxW1Report {
    /// A human-readable table.
    pub fn table(&self) -> String {
        format!(
            "W1, box as its own process: {} devices, {} commands of {} B, {} producers (admin socket)\n\
             throughput           {:>12.0} commands/s (send → durable ack)\n\
             latency p50, p99     {:>5.3}, {:.3} ms (send → device receipt)\n\
             box CPU per command  {:>12.1} µs (user + system)\n\
             box peak RSS         {:>12.1} MiB ({:.1} MiB grown over the run)\n\
             box written/command  {:>12.0} bytes\n",
            self.devices,
            self.commands,
            self.payload_bytes,
            self.producers,
            self.throughput_per_s,
            self.latency_p50_us as f64 / 1000.0,
            self.latency_p99_us as f64 / 1000.0,
            self.box_cpu_us_per_command,
            self.box_peak_rss_bytes as f64 / 1048576.0,
            self.box_rss_growth_bytes as f64 / 1048576.0,
            self.box_bytes_written_per_command,
        )
    }
}

/// Run W1 against a box started from `exe` with its data in `dir`.
pub async fn box_w1(
    exe: &Path,
    dir: &Path,
    devices: usize,
    commands: usize,
    payload: usize,
    producers: usize,
) -> anyhow::Result<BoxW1Report> {
    use crate::device::{self, ConnectOptions};

    let mut b = BoxProcess::start(exe, dir).await?;
    let n = devices.max(1);
    let names: Vec<String> = (0..n).map(|i| format!("w1-{i}")).collect();
    let mut bundles = Vec::with_capacity(n);
    for d in &names {
        bundles.push(b.enroll(d).await?);
    }
    let endpoint = device::client_endpoint(b.addr)?;
    let copts = ConnectOptions::default();
    let mut conns = Vec::with_capacity(n);
    for bundle in &bundles {
        conns.push(device::connect_with(&endpoint, b.addr, bundle, &copts).await?);
    }
    let total = commands - commands % n;
    let per_device = total / n;
    let payload = payload.max(8);
    let epoch = Instant::now();
    let mut receivers = super::receive_and_ack(conns, per_device, epoch, None);

    let (cpu0, w0, rss0) = (b.cpu_seconds(), b.written(), b.rss());
    let started = Instant::now();
    let producers = producers.max(1);
    let mut senders = tokio::task::JoinSet::new();
    for p in 0..producers {
        let (dir, names) = (b.dir.clone(), names.clone());
        senders.spawn(async move {
            let mut admin = AdminClient::connect(&dir).await?;
            for i in (p..total).step_by(producers) {
                let mut body = vec![b'x'; payload];
                body[..8].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
                let req = crate::shell::queue::SendRequest {
                    target: names[i % names.len()].clone(),
                    payload: body,
                    opts: crate::SendOptions::default(),
                    origin: "cli".into(),
                    signature: None,
                };
                let AdminResponse::Receipt(_) = admin.call(&AdminRequest::Send(req)).await? else {
                    anyhow::bail!("unexpected send answer")
                };
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = senders.join_next().await {
        r??;
    }
    let mut lat = Vec::with_capacity(total);
    let mut keep = Vec::new();
    while let Some(r) = receivers.join_next().await {
        let (c, l) = r??;
        lat.extend(l);
        keep.push(c);
    }
    // To the last ack made durable: nothing queued or in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let AdminResponse::Status(s) = b.admin.call(&AdminRequest::Status).await? else {
            anyhow::bail!("unexpected status answer")
        };
        if (s.queued == 0 && s.in_flight == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let run_s = started.elapsed().as_secs_f64();
    let report = BoxW1Report {
        devices: n,
        commands: total,
        payload_bytes: payload,
        producers,
        throughput_per_s: total as f64 / run_s,
        latency_p50_us: {
            lat.sort_unstable();
            percentile(&lat, 0.50)
        },
        latency_p99_us: percentile(&lat, 0.99),
        box_cpu_us_per_command: (b.cpu_seconds() - cpu0) * 1e6 / total.max(1) as f64,
        box_peak_rss_bytes: b.peak_rss(),
        box_rss_growth_bytes: b.rss().saturating_sub(rss0),
        box_bytes_written_per_command: b.written().saturating_sub(w0) as f64 / total.max(1) as f64,
    };
    drop(keep);
    b.kill().await;
    Ok(report)
}

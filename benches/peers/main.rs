//! W1 side by side: outpost against NATS JetStream and Mosquitto, in one run
//! on this machine, printed as one table with ratios (issue 8).
//!
//! W1: `devices` consumers, `commands` messages of `payload` bytes spread
//! evenly over them, sent by `producers` senders that each wait for the
//! system's durable acknowledgement before the next send; every message is
//! received and acknowledged by its consumer. Measured: throughput (first
//! send to last receipt), send → receipt latency, the server's peak RSS and
//! bytes written per message.
//!
//! - outpost: the box in-process (as `outpost bench`), fsync before every
//!   enqueue answer (group commit).
//! - JetStream: nats-server with file storage, one durable pull consumer per
//!   device with explicit acks; publish waits for the PubAck. Run with the
//!   server's default sync and, where the version has it, `sync_interval:
//!   always`.
//! - Mosquitto: persistence on, QoS 1, persistent sessions
//!   (clean_session = false); publish waits for the PUBACK.
//!
//! `cargo bench --bench peers` runs the full size; under `cargo test` it is
//! a seconds-long smoke run. A peer whose server is not installed is
//! skipped with a message (`benches/peers/run.sh` installs them). Sizes:
//! OUTPOST_PEERS_COMMANDS, _DEVICES, _PRODUCERS, _PAYLOAD.

// The allocator the shipped binary uses (src/main.rs), so the figures are its.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use futures::StreamExt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
struct Size {
    commands: usize,
    devices: usize,
    producers: usize,
    payload: usize,
}

struct Row {
    system: String,
    durability: String,
    per_s: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    rss: u64,
    written_per_msg: f64,
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let size = Size {
        commands: env("OUTPOST_PEERS_COMMANDS", if full { 100_000 } else { 2_000 }),
        devices: env("OUTPOST_PEERS_DEVICES", if full { 100 } else { 10 }),
        producers: env("OUTPOST_PEERS_PRODUCERS", if full { 64 } else { 8 }),
        payload: env("OUTPOST_PEERS_PAYLOAD", 100).max(16),
    };
    // The second W1 shape: this many sends outstanding at once (0: skip;
    // the smoke run under `cargo test` keeps to one shape).
    let outstanding = env("OUTPOST_PEERS_OUTSTANDING", if full { 256 } else { 0 });
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let base = std::env::var("OUTPOST_BENCH_DIR")
        .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_string());
    let nats = nats_servers();
    if nats.is_empty() {
        outpost::outln!("peers: nats-server not installed: JetStream skipped (benches/peers/run.sh installs it)");
    }
    let mut shapes = vec![size];
    if outstanding > 0 && outstanding != size.producers {
        shapes.push(Size {
            producers: outstanding,
            ..size
        });
    }
    for shape in shapes {
        let rows = run_shape(&rt, &base, shape, full, &nats);
        print_table(shape, &rows);
    }
}

/// Every nats-server to measure, one per version: Debian's on the PATH and
/// any named in OUTPOST_PEERS_NATS (paths, `:`-separated; run.sh puts a
/// current one there, for `sync_interval: always`, which Debian's 2.9 lacks).
fn nats_servers() -> Vec<(String, String)> {
    let mut bins: Vec<String> = which("nats-server").into_iter().collect();
    if let Ok(extra) = std::env::var("OUTPOST_PEERS_NATS") {
        bins.extend(
            extra
                .split(':')
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        );
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for b in bins {
        let v = nats_version(&b);
        if v.is_empty() {
            outpost::outln!("peers: {b} does not run: skipped");
        } else if !out.iter().any(|(_, seen)| *seen == v) {
            out.push((b, v));
        }
    }
    out
}

fn run_shape(
    rt: &tokio::runtime::Runtime,
    base: &str,
    size: Size,
    full: bool,
    nats: &[(String, String)],
) -> Vec<Row> {
    let mut rows = Vec::new();
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let o = outpost::bench::LinkBenchOptions {
        devices: size.devices,
        commands: size.commands,
        payload: size.payload,
        producers: size.producers,
        rate: None,
        signed: false,
    };
    let r = rt
        .block_on(outpost::bench::link_bench(dir.path(), &o))
        .expect("outpost W1");
    rows.push(Row {
        system: "outpost".into(),
        durability: "fsync before every enqueue answer (group commit)".into(),
        per_s: r.throughput_per_s,
        p50_us: r.latency_p50_us,
        p99_us: r.latency_p99_us,
        p999_us: r.latency_p999_us,
        rss: r.peak_rss_bytes,
        written_per_msg: r.bytes_written_per_command,
    });
    for (bin, version) in nats {
        let always = nats_has_sync_always(bin);
        for sync_always in [false, true] {
            if sync_always && !always {
                outpost::outln!("peers: {version} has no `sync_interval: always` (needs 2.10+): that row is skipped");
                continue;
            }
            let dir = tempfile::tempdir_in(base).expect("temp dir");
            match rt.block_on(jetstream(bin, dir.path(), size, sync_always)) {
                Ok(mut row) => {
                    let v = short_version(version);
                    row.system =
                        format!("JetStream {v}{}", if sync_always { " always" } else { "" });
                    rows.push(row)
                }
                Err(e) => failed(full, "JetStream", e),
            }
        }
    }
    match which("mosquitto") {
        None => {
            outpost::outln!(
                "peers: mosquitto not installed: skipped (benches/peers/run.sh installs it)"
            )
        }
        Some(bin) => {
            let dir = tempfile::tempdir_in(base).expect("temp dir");
            match rt.block_on(mosquitto(&bin, dir.path(), size)) {
                Ok(row) => rows.push(row),
                Err(e) => failed(full, "Mosquitto", e),
            }
        }
    }
    rows
}

/// `nats-server: v2.15.1` → `2.15.1`.
fn short_version(v: &str) -> &str {
    v.rsplit(' ').next().unwrap_or(v).trim_start_matches('v')
}

/// A full run reports a peer that failed and goes on; the smoke run in the
/// test suite fails, so the harness cannot rot unnoticed.
fn failed(full: bool, peer: &str, e: anyhow::Error) {
    if full {
        outpost::outln!("peers: {peer} run failed: {e:#}");
    } else {
        panic!("peers: {peer} smoke run failed: {e:#}");
    }
}

fn print_table(s: Size, rows: &[Row]) {
    outpost::outln!(
        "\nW1: {} devices, {} commands of {} B, {} sends outstanding (each producer waits for its durable ack)",
        s.devices, s.commands, s.payload, s.producers
    );
    outpost::outln!(
        "{:<22} {:>10} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10}  durability",
        "system",
        "msgs/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "RSS MiB",
        "B written",
        "outpost ×"
    );
    let ours = rows.first().map(|r| r.per_s).unwrap_or(0.0);
    for r in rows {
        outpost::outln!(
            "{:<22} {:>10.0} {:>9.3} {:>9.3} {:>10.3} {:>9.1} {:>10.0} {:>10.2}  {}",
            r.system,
            r.per_s,
            r.p50_us as f64 / 1e3,
            r.p99_us as f64 / 1e3,
            r.p999_us as f64 / 1e3,
            r.rss as f64 / 1048576.0,
            r.written_per_msg,
            if r.per_s > 0.0 { ours / r.per_s } else { 0.0 },
            r.durability
        );
    }
    outpost::outln!("(RSS: outpost's process holds the box and the {} device clients; a peer's is its server alone. Bytes written: per message, whole life, from /proc/<pid>/io.)", s.devices);
}

fn which(bin: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then_some(p)
}

fn nats_version(bin: &str) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `sync_interval` came with nats-server 2.10.
fn nats_has_sync_always(bin: &str) -> bool {
    let v = nats_version(bin);
    let nums: Vec<u32> = v
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .split('.')
        .filter_map(|x| x.parse().ok())
        .collect();
    matches!(nums.as_slice(), [a, b, ..] if (*a, *b) >= (2, 10))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A server process, stopped by its PID when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    fn start(bin: &str, args: &[&str], port: u16) -> anyhow::Result<Server> {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let s = Server(child);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{bin} did not listen on {addr} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    fn proc_field(&self, file: &str, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.0.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    fn peak_rss(&self) -> u64 {
        self.proc_field("status", "VmHWM:") * 1024
    }

    fn written(&self) -> u64 {
        self.proc_field("io", "write_bytes:")
    }
}

/// Latencies and the count of messages received, shared by consumers.
#[derive(Default)]
struct Tally {
    received: AtomicUsize,
    lat_us: Mutex<Vec<u64>>,
}

impl Tally {
    fn record(&self, t0: Instant, payload: &[u8]) {
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&payload[..8]);
        let sent = Duration::from_nanos(u64::from_be_bytes(ns));
        let lat = t0.elapsed().saturating_sub(sent);
        self.lat_us.lock().unwrap().push(lat.as_micros() as u64);
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    async fn wait_all(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.received.load(Ordering::Relaxed) < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {n} messages received within {limit:?}",
                self.received.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    fn quantiles(&self) -> (u64, u64, u64) {
        let mut v = self.lat_us.lock().unwrap().clone();
        v.sort_unstable();
        let q = |p: f64| {
            v.get(((v.len().max(1) - 1) as f64 * p) as usize)
                .copied()
                .unwrap_or(0)
        };
        (q(0.5), q(0.99), q(0.999))
    }
}

/// A payload carrying its send instant (ns since `t0`) in its first bytes.
fn stamped(t0: Instant, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_be_bytes());
    p
}

const LIMIT: Duration = Duration::from_secs(600);

async fn jetstream(bin: &str, dir: &Path, s: Size, sync_always: bool) -> anyhow::Result<Row> {
    use async_nats::jetstream::{self, consumer, stream};
    let port = free_port();
    let conf = dir.join("nats.conf");
    let sync = if sync_always {
        "  sync_interval: always\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nhttp: 0\njetstream {{\n  store_dir: \"{}\"\n  max_file_store: 10G\n{sync}}}\n",
            dir.join("js").display()
        ),
    )?;
    let server = Server::start(bin, &["-c", conf.to_str().unwrap()], port)?;
    let client = async_nats::connect(format!("127.0.0.1:{port}")).await?;
    let js = jetstream::new(client);
    let st = js
        .create_stream(stream::Config {
            name: "W1".into(),
            subjects: vec!["w1.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let tally = Arc::new(Tally::default());
    let t0 = Instant::now();
    let per_device = s.commands / s.devices;
    let n = per_device * s.devices;
    for d in 0..s.devices {
        let c: consumer::PullConsumer = st
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("dev-{d}")),
                filter_subject: format!("w1.dev-{d}"),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
        let tally = tally.clone();
        tokio::spawn(async move {
            let Ok(mut msgs) = c.messages().await else {
                return;
            };
            let mut got = 0;
            while let Some(Ok(m)) = msgs.next().await {
                tally.record(t0, &m.payload);
                let _ = m.ack().await;
                got += 1;
                if got == per_device {
                    break;
                }
            }
        });
    }
    let w0 = server.written();
    let start = Instant::now();
    let mut producers = Vec::new();
    for p in 0..s.producers {
        let js = js.clone();
        producers.push(tokio::spawn(async move {
            let mut i = p;
            while i < n {
                let subject = format!("w1.dev-{}", i % s.devices);
                let ack = js.publish(subject, stamped(t0, s.payload).into()).await?;
                ack.await?;
                i += s.producers;
            }
            anyhow::Ok(())
        }));
    }
    for p in producers {
        p.await??;
    }
    tally.wait_all(n, LIMIT).await?;
    let elapsed = start.elapsed();
    // Acks are written by the server shortly after; count them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (p50, p99, p999) = tally.quantiles();
    Ok(Row {
        system: "JetStream".into(),
        durability: if sync_always {
            "file storage, fsync every write (sync_interval: always)".into()
        } else {
            "file storage, OS write per message, fsync periodically (default)".into()
        },
        per_s: n as f64 / elapsed.as_secs_f64(),
        p50_us: p50,
        p99_us: p99,
        p999_us: p999,
        rss: server.peak_rss(),
        written_per_msg: (server.written() - w0) as f64 / n as f64,
    })
}

async fn mosquitto(bin: &str, dir: &Path, s: Size) -> anyhow::Result<Row> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 32\n",
            dir.display()
        ),
    )?;
    let server = Server::start(bin, &["-c", conf.to_str().unwrap()], port)?;
    let tally = Arc::new(Tally::default());
    let t0 = Instant::now();
    let per_device = s.commands / s.devices;
    let n = per_device * s.devices;
    let mut subscribed = Vec::new();
    for d in 0..s.devices {
        let mut o = MqttOptions::new(format!("dev-{d}"), "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = AsyncClient::new(o, 64);
        client
            .subscribe(format!("w1/dev-{d}"), QoS::AtLeastOnce)
            .await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        let tally = tally.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Ok(e) = ev.poll().await {
                match e {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => tally.record(t0, &p.payload),
                    _ => {}
                }
            }
        });
        subscribed.push(rx);
    }
    for rx in subscribed {
        rx.await?;
    }
    let w0 = server.written();
    let start = Instant::now();
    let mut producers = Vec::new();
    for p in 0..s.producers {
        let mut o = MqttOptions::new(format!("producer-{p}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        // One unacknowledged publish at a time: each send waits for its
        // PUBACK, as outpost's producers wait for the durable answer.
        o.set_inflight(1);
        let (client, mut ev) = AsyncClient::new(o, 1);
        producers.push(tokio::spawn(async move {
            let acks = tokio::spawn(async move {
                let mut acked = 0usize;
                let mine = (p..n).step_by(s.producers).count();
                while acked < mine {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                        Ok(_) => {}
                        Err(e) => return Err(anyhow::anyhow!("producer {p}: {e}")),
                    }
                }
                Ok(())
            });
            let mut i = p;
            while i < n {
                client
                    .publish(
                        format!("w1/dev-{}", i % s.devices),
                        QoS::AtLeastOnce,
                        false,
                        stamped(t0, s.payload),
                    )
                    .await?;
                i += s.producers;
            }
            acks.await?
        }));
    }
    for p in producers {
        p.await??;
    }
    tally.wait_all(n, LIMIT).await?;
    let elapsed = start.elapsed();
    let (p50, p99, p999) = tally.quantiles();
    Ok(Row {
        system: "Mosquitto".into(),
        durability:
            "QoS 1, persistent sessions; persistence is a snapshot (autosave), no fsync per message"
                .into(),
        per_s: n as f64 / elapsed.as_secs_f64(),
        p50_us: p50,
        p99_us: p99,
        p999_us: p999,
        rss: server.peak_rss(),
        written_per_msg: (server.written() - w0) as f64 / n as f64,
    })
}

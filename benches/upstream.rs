//! `cargo bench --bench upstream`: how fast an edge catches up with its hub.
//! An edge fills its outbox with 100,000 records while its hub is down (a
//! command queued for an offline device is one record); then the hub comes
//! back and the edge streams the backlog. Timed from the uplink's
//! `connected` to an empty outbox (every record stored on the hub and
//! acknowledged), over plain loopback and through a relay adding 25 ms each
//! way (50 ms round trips). Prints figures; asserts nothing.

use outpost::bench::relay::{Impairment, Relay};
use outpost::shell::queue::SendRequest;
use outpost::shell::serve::{self, ServeOptions};
use outpost::shell::store::DeviceRecord;
use outpost::shell::upstream::UplinkOptions;
use outpost::SendOptions;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn options(dir: &Path, port: u16) -> ServeOptions {
    let mut o = ServeOptions::new(dir.to_path_buf());
    o.listen = SocketAddr::from(([127, 0, 0, 1], port));
    o.limits.min_free_disk = 0;
    o
}

/// What fills the backlog.
#[derive(Clone, Copy, PartialEq)]
enum Mix {
    /// Commands queued for a device that never connects: one state record
    /// each.
    Queued,
    /// Commands run by a device on the edge: queued, delivered and result
    /// records (the hub stores each result).
    Ran,
}

async fn run(
    base: &Path,
    records: usize,
    rtt: Option<Duration>,
    mix: Mix,
) -> anyhow::Result<String> {
    let tmp = tempfile::tempdir_in(base)?;
    let port = free_port();
    let hub_dir = tmp.path().join("hub");
    let hub = serve::start(options(&hub_dir, port)).await?;
    let mut rec = DeviceRecord::new("e1");
    rec.tags.push(outpost::engine::route::GATEWAY_TAG.into());
    hub.queue.enroll(rec).await?;
    let bundle = tmp.path().join("e1.bundle");
    hub.identity
        .issue_device("e1", &hub.advertise)?
        .write(&bundle)?;
    hub.stop().await;

    let relay = match rtt {
        Some(rtt) => Some(
            Relay::start(
                0,
                SocketAddr::from(([127, 0, 0, 1], port)),
                Impairment {
                    delay: rtt / 2,
                    loss: 0.0,
                },
            )
            .await?,
        ),
        None => None,
    };
    let up = relay.as_ref().map_or(port, |r| r.addr().port());
    let mut o = options(&tmp.path().join("edge"), 0);
    let mut u = UplinkOptions::new(bundle, Some(format!("127.0.0.1:{up}")));
    u.min_backoff = Duration::from_millis(20);
    u.max_backoff = Duration::from_millis(100);
    u.connect_timeout = Duration::from_secs(2);
    o.upstream = Some((u, records as u64 * 2));
    // One device acks the whole backlog: lift the per-device frame rate
    // (a flood guard) that a fleet of devices would never meet.
    o.link.frame_rate = 1_000_000;
    o.link.frame_burst = 1_000_000;
    let edge = serve::start(o).await?;
    edge.queue.enroll(DeviceRecord::new("offline")).await?;
    let commands = match mix {
        Mix::Queued => records,
        Mix::Ran => records / 3,
    };
    let device = match mix {
        Mix::Queued => None,
        Mix::Ran => {
            edge.queue.enroll(DeviceRecord::new("d0")).await?;
            let bundle = edge.identity.issue_device("d0", &edge.advertise)?;
            let mut c = outpost::device::connect(&bundle, &Default::default()).await?;
            Some(tokio::spawn(async move {
                while let Ok(Some(m)) = c.next().await {
                    if let outpost::device::Received::Command(cmd) = m {
                        let ok = outpost::Outcome::Ok(b"ok".to_vec());
                        if c.ack(cmd.id, ok).await.is_err() {
                            return;
                        }
                    }
                }
            }))
        }
    };
    let target: &'static str = if device.is_some() { "d0" } else { "offline" };

    // The backlog: commands for a device that never connects, sent by 64
    // concurrent producers (group commit).
    let t = Instant::now();
    let per = commands.div_ceil(64);
    let mut tasks = Vec::new();
    for p in 0..64 {
        let q = edge.queue.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let n = p * per + i;
                if n >= commands {
                    break;
                }
                q.send(SendRequest {
                    target: target.into(),
                    payload: vec![b'x'; 100],
                    opts: SendOptions::default(),
                    origin: "bench".into(),
                    signature: None,
                })
                .await?;
            }
            Ok::<(), outpost::shell::queue::QueueError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    if let Some(d) = device {
        // Wait (bounded) until the device has run them all.
        let deadline = Instant::now() + Duration::from_secs(300);
        while edge.queue.stats().await?.queued + edge.queue.stats().await?.in_flight > 0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the edge device did not finish: {:?}",
                edge.queue.stats().await?
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        d.abort();
    }
    let fill = t.elapsed();
    let depth = edge.queue.outbox_stats().await?.depth;

    let hub = serve::start(options(&hub_dir, port)).await?;
    let mut status = edge.uplink.as_ref().expect("uplink").watch();
    let t = Instant::now();
    status
        .wait_for(|s| s.state == outpost::shell::upstream::UplinkState::Connected)
        .await?;
    let connect = t.elapsed();
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if edge.queue.outbox_stats().await?.depth == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the outbox did not drain in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let catchup = t.elapsed();
    let rate = depth as f64 / catchup.as_secs_f64();
    edge.stop().await;
    hub.stop().await;
    Ok(format!(
        "| {:<22} | {:<7} | {:>8} | {:>9.2} s | {:>8.0} ms | {:>9.2} s | {:>12.0} |",
        match rtt {
            None => "loopback".to_string(),
            Some(r) => format!("relay, {} ms RTT", r.as_millis()),
        },
        match mix {
            Mix::Queued => "queued",
            Mix::Ran => "ran",
        },
        depth,
        fill.as_secs_f64(),
        connect.as_secs_f64() * 1e3,
        catchup.as_secs_f64(),
        rate
    ))
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let records: usize = std::env::var("OUTPOST_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 2_000 });
    let base = std::env::var("OUTPOST_BENCH_DIR")
        .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_string());
    let rt = tokio::runtime::Runtime::new()?;
    outpost::outln!("upstream catch-up: an edge's outbox streamed to its hub once the hub is back");
    outpost::outln!(
        "(queued: state records of commands for an offline device; ran: commands run on"
    );
    outpost::outln!("the edge, three records each, and the hub stores every result)");
    outpost::outln!("| path                   | backlog |  records |  backlog fill | connect    |  catch-up   |   records/s  |");
    outpost::outln!("|------------------------|---------|----------|---------------|------------|-------------|--------------|");
    // OUTPOST_BENCH_RTT_MS=0,10,50: the paths to run (0: plain loopback).
    let rtts: Vec<Option<Duration>> = std::env::var("OUTPOST_BENCH_RTT_MS")
        .unwrap_or_else(|_| "0,50".into())
        .split(',')
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .map(|ms| (ms > 0).then(|| Duration::from_millis(ms)))
        .collect();
    for rtt in rtts {
        for mix in [Mix::Queued, Mix::Ran] {
            outpost::outln!("{}", rt.block_on(run(Path::new(&base), records, rtt, mix))?);
        }
    }
    Ok(())
}

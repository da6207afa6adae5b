//! `cargo bench --bench nats`: edges draining their outboxes into a 3-node
//! NATS JetStream cluster on 127.0.0.1 (streams with 3 replicas), 1 to 20
//! edges in one process, 10,000 records each. Each edge fills its outbox
//! offline first; the clock runs from the moment they are pointed at the
//! cluster until every outbox is empty. Prints entries/s per edge count.
//! Needs nats-server (Debian); skipped with a message without it.

#[path = "../tests/common/nats_cluster.rs"]
mod nats_cluster;

use outpost::shell::serve::{self, RunningBox, ServeOptions};
use outpost::shell::upstream::nats::NatsOptions;
use std::path::Path;
use std::time::{Duration, Instant};

async fn edge(dir: &Path, urls: &str, name: &str) -> anyhow::Result<RunningBox> {
    let mut o = ServeOptions::new(dir.to_path_buf());
    o.listen = "127.0.0.1:0".parse()?;
    o.limits.min_free_disk = 0;
    let mut n = NatsOptions::new(urls.into(), name.into());
    n.min_backoff = Duration::from_millis(50);
    n.max_backoff = Duration::from_millis(200);
    n.connect_timeout = Duration::from_millis(500);
    o.nats = Some((n, 1_000_000));
    serve::start(o).await
}

async fn round(base: &Path, urls: &str, edges: usize, per_edge: u64) -> anyhow::Result<f64> {
    let tmp = tempfile::tempdir_in(base)?;
    // Offline: nothing listens at this port.
    let nowhere = "nats://127.0.0.1:1";
    let mut boxes = Vec::new();
    for e in 0..edges {
        let name = format!(
            "b{}-{e}",
            tmp.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace('.', "")
        );
        let b = edge(&tmp.path().join(&name), nowhere, &name).await?;
        for i in 0..per_edge {
            b.queue
                .device_event("sensor".into(), format!("reading {i}").into_bytes(), i);
        }
        boxes.push((name, b));
    }
    for (_, b) in &boxes {
        let deadline = Instant::now() + Duration::from_secs(120);
        while b.queue.outbox_stats().await?.depth < per_edge {
            anyhow::ensure!(Instant::now() < deadline, "the outbox did not fill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut names = Vec::new();
    for (name, b) in boxes {
        b.stop().await;
        names.push(name);
    }
    let t = Instant::now();
    let mut running = Vec::new();
    for name in &names {
        running.push(edge(&tmp.path().join(name), urls, name).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    for b in &running {
        while b.queue.outbox_stats().await?.depth > 0 {
            anyhow::ensure!(Instant::now() < deadline, "the outboxes did not drain");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let took = t.elapsed();
    for b in running {
        b.stop().await;
    }
    Ok((edges as u64 * per_edge) as f64 / took.as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let Some(bin) = nats_cluster::nats_server() else {
        return Ok(());
    };
    let (counts, per_edge): (&[usize], u64) = if full {
        (&[1, 5, 10, 20], 10_000)
    } else {
        (&[2], 300)
    };
    let base = std::env::var("OUTPOST_BENCH_DIR")
        .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_string());
    let tmp = tempfile::tempdir_in(&base)?;
    let cluster = nats_cluster::Cluster::start(&bin, tmp.path());
    let urls = cluster.urls();
    tokio::runtime::Runtime::new()?.block_on(async {
        let servers: Vec<&str> = urls.split(',').collect();
        let c = async_nats::connect(servers).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match outpost::shell::upstream::nats::init(&c, 3).await {
                Ok(_) => break,
                Err(e) => {
                    anyhow::ensure!(Instant::now() < deadline, "fleet init: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        outpost::outln!("outbox catch-up into a 3-node JetStream cluster (R3, file storage), {per_edge} records per edge");
        outpost::outln!("| edges | records | entries/s | per edge/s |");
        outpost::outln!("|-------|---------|-----------|------------|");
        for &n in counts {
            let rate = round(tmp.path(), &urls, n, per_edge).await?;
            outpost::outln!(
                "| {n:>5} | {:>7} | {rate:>9.0} | {:>10.0} |",
                n as u64 * per_edge,
                rate / n as f64
            );
        }
        anyhow::Ok(())
    })
}

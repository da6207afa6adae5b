//! `cargo bench --bench workflow`: 1,000 concurrent 5-step workflows (each
//! a sequence) over 100 devices on loopback QUIC, against the same 5,000
//! commands sent plainly, 5 in a row per chain. Prints workflows/s and the
//! extra time per step a workflow adds over a plain command (sent, run,
//! acked, next one sent). Asserts nothing.

use outpost::device::{self, ConnectOptions, Received};
use outpost::engine::workflow::Workflow;
use outpost::shell::queue::SendRequest;
use outpost::shell::serve::{self, ServeOptions};
use outpost::shell::store::DeviceRecord;
use outpost::{Outcome, SendOptions};
use std::time::{Duration, Instant};

fn spec(i: usize, devices: usize, steps: usize) -> Workflow {
    let mut text = format!("name = \"w{i}\"\n");
    for s in 1..=steps {
        text.push_str(&format!(
            "[steps.s{s}]\ntarget = \"d{}\"\npayload = \"w{i}-s{s}\"\n",
            (i + s) % devices
        ));
        if s > 1 {
            text.push_str(&format!("needs = [\"s{}\"]\n", s - 1));
        }
    }
    Workflow::parse(&text, "bench").expect("a valid workflow")
}

async fn run(base: &std::path::Path, workflows: usize, devices: usize) -> anyhow::Result<()> {
    let steps = 5;
    let tmp = tempfile::tempdir_in(base)?;
    let mut o = ServeOptions::new(tmp.path().to_path_buf());
    o.listen = "127.0.0.1:0".parse()?;
    o.limits.min_free_disk = 0;
    let b = serve::start(o).await?;
    let mut agents = Vec::new();
    for d in 0..devices {
        let id = format!("d{d}");
        b.queue.enroll(DeviceRecord::new(id.as_str())).await?;
        let bundle = b.identity.issue_device(&id, &b.advertise)?;
        let mut c = device::connect(&bundle, &ConnectOptions::default()).await?;
        agents.push(tokio::spawn(async move {
            while let Ok(Some(m)) = c.next().await {
                if let Received::Command(cmd) = m {
                    if c.ack(cmd.id, Outcome::Ok(b"ok".to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }));
    }

    // Plain: the same chains, each step sent when the previous one ended.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..workflows {
        let q = b.queue.clone();
        tasks.push(tokio::spawn(async move {
            for s in 1..=steps {
                let r = q
                    .send(SendRequest {
                        target: format!("d{}", (i + s) % devices),
                        payload: format!("p{i}-{s}").into_bytes(),
                        opts: SendOptions::default(),
                        origin: "bench".into(),
                        signature: None,
                    })
                    .await?;
                q.wait(r.id, Duration::from_secs(120)).await?;
            }
            Ok::<(), outpost::shell::queue::QueueError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let plain = t.elapsed();

    // Workflows: all started at once; done when the last one ended.
    let t = Instant::now();
    let starts: Vec<_> = (0..workflows)
        .map(|i| {
            let w = b.workflows.clone();
            tokio::spawn(async move { w.run(spec(i, devices, steps)).await })
        })
        .collect();
    let mut ids = Vec::with_capacity(workflows);
    for s in starts {
        ids.push(s.await?.map_err(anyhow::Error::msg)?.id);
    }
    let started = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    for id in &ids {
        loop {
            let v = b.workflows.show(*id).await.expect("a run");
            if v.state != "running" {
                anyhow::ensure!(v.state == "succeeded", "{v:?}");
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "workflows did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let total = t.elapsed();
    for a in agents {
        a.abort();
    }
    b.stop().await;
    let n = (workflows * steps) as f64;
    outpost::outln!("{workflows} concurrent {steps}-step workflows over {devices} devices");
    outpost::outln!(
        "| run                         | wall time | per second       | per step (chain)   |"
    );
    outpost::outln!(
        "|-----------------------------|-----------|------------------|--------------------|"
    );
    outpost::outln!(
        "| plain commands, chained     | {:>7.2} s | {:>8.0} commands | {:>10.2} ms      |",
        plain.as_secs_f64(),
        n / plain.as_secs_f64(),
        plain.as_secs_f64() * 1e3 / steps as f64
    );
    outpost::outln!(
        "| workflows (start: {:>5.2} s)  | {:>7.2} s | {:>8.1} workflows | {:>10.2} ms      |",
        started.as_secs_f64(),
        total.as_secs_f64(),
        workflows as f64 / total.as_secs_f64(),
        total.as_secs_f64() * 1e3 / steps as f64
    );
    outpost::outln!(
        "extra per step over a plain command: {:.2} ms",
        (total.as_secs_f64() - plain.as_secs_f64()) * 1e3 / steps as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (workflows, devices) = if full { (1_000, 100) } else { (50, 10) };
    let base = std::env::var("OUTPOST_BENCH_DIR")
        .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_string());
    tokio::runtime::Runtime::new()?.block_on(run(std::path::Path::new(&base), workflows, devices))
}

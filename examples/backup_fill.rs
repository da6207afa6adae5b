//! Fill a running box's queue for the backup measurement (issue 27): N
//! commands of B bytes to an offline device, sent over the admin socket by
//! 32 connections at once.
//!
//! `cargo run --example backup_fill -- DATA_DIR DEVICE N [BYTES]`

use outpost::shell::admin::{AdminClient, AdminRequest};
use outpost::shell::queue::SendRequest;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: backup_fill DATA_DIR DEVICE N [BYTES]"
    );
    let dir = std::path::PathBuf::from(&args[1]);
    let device = args[2].clone();
    let n: usize = args[3].parse()?;
    let bytes: usize = args.get(4).map_or(Ok(100), |b| b.parse())?;
    let conns = 32;
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (dir, device) = (dir.clone(), device.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = AdminClient::connect(&dir).await?;
            for i in (c..n).step_by(conns) {
                let mut payload = format!("{i:012}").into_bytes();
                payload.resize(bytes, b'.');
                let req = SendRequest {
                    target: device.clone(),
                    payload,
                    opts: Default::default(),
                    origin: "cli".into(),
                    signature: None,
                };
                client.call(&AdminRequest::Send(req)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let s = t.elapsed().as_secs_f64();
    outpost::outln!(
        "{n} commands of {bytes} bytes in {s:.1} s ({:.0}/s)",
        n as f64 / s
    );
    Ok(())
}

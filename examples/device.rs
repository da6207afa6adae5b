//! A device embedding outpost's device library, and nothing else of the
//! box: it builds without sled, axum, async-nats or clap
//! (`cargo run --no-default-features --example device -- dev-7.bundle`).
//!
//! It connects with its bundle, runs each command (here: answers its
//! payload in upper case), acks each one naming its attempt, answers a
//! repeat of a command it already ran from memory instead of running it
//! again, and reconnects with backoff when the link drops. A real agent
//! keeps its memory of what ran on disk; `outpost device` is the full
//! reference agent.

use outpost::device::{connect, Backoff, ConnectOptions, Dedupe, Received};
use outpost::identity::Bundle;
use outpost::Outcome;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: device BUNDLE (a bundle from `outpost enroll ID --out FILE`)");
        std::process::exit(2);
    };
    let bundle = match Bundle::read(path.as_ref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("device: {e}");
            std::process::exit(1);
        }
    };
    let mut done = Dedupe::new(10_000);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        match serve(&bundle, &mut done, &mut backoff).await {
            Ok(()) => eprintln!("device: the box closed the link"),
            Err(e) if e.is_permanent() => {
                eprintln!("device: {e}; not reconnecting");
                std::process::exit(1);
            }
            Err(e) => eprintln!("device: {e}"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn serve(
    bundle: &Bundle,
    done: &mut Dedupe,
    backoff: &mut Backoff,
) -> Result<(), outpost::device::ClientError> {
    let mut conn = connect(bundle, &ConnectOptions::default()).await?;
    backoff.reset();
    eprintln!(
        "device: connected to {} as {}",
        conn.remote(),
        conn.device_id()
    );
    while let Some(msg) = conn.next().await? {
        let Received::Command(cmd) = msg else {
            continue;
        };
        let outcome = match done.get(cmd.id, cmd.attempt) {
            Some(first) => first.clone(),
            None => {
                let out = Outcome::Ok(cmd.payload.to_ascii_uppercase());
                done.insert(cmd.id, cmd.attempt, out.clone());
                out
            }
        };
        conn.ack_attempt(cmd.id, cmd.attempt, outcome).await?;
    }
    Ok(())
}

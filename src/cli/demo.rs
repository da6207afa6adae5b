//! `outpost demo`: the first thing a newcomer runs. A throwaway box on
//! loopback, one demo device running the reference agent, a handful of
//! commands — one that fails once and is retried, one high-priority that
//! overtakes the queue — and a table of how they ended. Everything lives in
//! a temp dir that is removed at the end.

use crate::device::{run_agent, AgentOptions, Handler};
use crate::engine::command::{Outcome, Priority, SendOptions, State};
use crate::shell::queue::{LifecycleEvent, SendRequest};
use crate::shell::serve::{start, ServeOptions};
use crate::shell::store::DeviceRecord;
use anyhow::Context;
use std::time::Duration;

/// The demo device's command handler: echoes most payloads, fails `flaky`
/// on its first run only (a marker file remembers), and says what it did.
const SCRIPT: &str = r#"p=$(cat); case "$p" in
  flaky) if [ -e "$DEMO_DIR/flaky.ran" ]; then echo "flaky worked on attempt 2"; else : > "$DEMO_DIR/flaky.ran"; echo "transient failure (demo)" >&2; exit 3; fi ;;
  *) echo "done: $p" ;;
esac"#;

/// Run the demo; the exit code is 0 when every command succeeded.
pub async fn run() -> anyhow::Result<i32> {
    let dir = tempfile::tempdir().context("creating a temp dir for the demo")?;
    let data = dir.path().join("box");
    let mut o = ServeOptions::new(data.clone());
    o.listen = "127.0.0.1:0".parse()?;
    // Quick retries so the demo's failure is retried within a second.
    o.limits.backoff_base_ms = 300;
    o.limits.backoff_cap_ms = 2_000;
    let b = start(o).await?;
    crate::outln!("box listening on {} (data in {})", b.addr, data.display());

    let device = "demo-1";
    b.queue
        .enroll(DeviceRecord {
            tags: vec!["demo".into()],
            ..DeviceRecord::new(device)
        })
        .await?;
    let bundle_path = dir.path().join("demo-1.bundle");
    b.identity
        .issue_device(device, &b.advertise)?
        .write(&bundle_path)?;
    crate::outln!("enrolled {device}; it is offline, so commands wait in its durable queue");

    let mut events = b.queue.subscribe();
    let mut sent = Vec::new();
    for (payload, priority, attempts) in [
        ("read sensor 1", Priority::Normal, 3),
        ("flaky", Priority::Normal, 3),
        ("read sensor 2", Priority::Normal, 3),
        ("stop conveyor", Priority::High, 3),
    ] {
        let r = b
            .queue
            .send(SendRequest {
                target: device.into(),
                payload: payload.as_bytes().to_vec(),
                opts: SendOptions {
                    priority,
                    max_attempts: Some(attempts),
                    ..SendOptions::default()
                },
                origin: "demo".into(),
                signature: None,
            })
            .await?;
        crate::outln!(
            "sent {:<14} {:<6} → {} (durable)",
            format!("{payload:?}"),
            priority.as_str(),
            r.id
        );
        sent.push((r.id, payload));
    }

    crate::outln!("starting the device agent; the high-priority command should run first");
    // The script learns its scratch dir from its own text, not from this
    // process's environment (changing that under running threads is racy).
    let script = format!("DEMO_DIR='{}'\n{SCRIPT}", dir.path().display());
    let mut agent = AgentOptions::new(bundle_path, Handler::Exec(script));
    agent.command_timeout = Duration::from_secs(10);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(run_agent(agent, async move {
        let _ = stop_rx.await;
    }));

    let mut order = Vec::new();
    let mut views = Vec::new();
    for (id, _) in &sent {
        let v = b
            .queue
            .wait(*id, Duration::from_secs(20))
            .await?
            .with_context(|| format!("command {id} did not finish within 20 s"))?;
        views.push(v);
    }
    while let Ok(ev) = events.try_recv() {
        let LifecycleEvent { id, state, .. } = ev;
        if matches!(state, State::Delivered { attempt: 1 }) {
            order.push(id);
        }
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), agent_task).await;
    b.stop().await;

    crate::outln!();
    let rows: Vec<Vec<String>> = views
        .iter()
        .zip(&sent)
        .map(|(v, (id, payload))| {
            let ran = order
                .iter()
                .position(|x| x == id)
                .map(|p| (p + 1).to_string())
                .unwrap_or("-".into());
            let result = match &v.outcome {
                Some(Outcome::Ok(b)) => String::from_utf8_lossy(b).trim().to_string(),
                Some(Outcome::Failed { code, message }) => {
                    format!("exit {code}: {}", message.trim())
                }
                Some(Outcome::Rejected { reason }) => reason.clone(),
                None => v.error.clone().unwrap_or_default(),
            };
            vec![
                payload.to_string(),
                v.priority.to_string(),
                ran,
                v.state.to_string(),
                v.attempts.to_string(),
                result,
            ]
        })
        .collect();
    super::print_table(
        &["PAYLOAD", "PRIORITY", "RAN", "STATE", "ATTEMPTS", "RESULT"],
        &rows,
    );
    let ok = views.iter().all(|v| v.state == State::Succeeded);
    let high_first = order.first() == sent.last().map(|(id, _)| id);
    crate::outln!();
    if ok && high_first {
        crate::outln!("demo passed: every command succeeded, the failing one after a retry, and the high-priority one overtook the queue");
        Ok(0)
    } else {
        crate::outln!(
            "demo FAILED: not every command succeeded, or the high-priority one did not run first"
        );
        Ok(1)
    }
}

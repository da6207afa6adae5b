//! The retention pass's timer (shell): wakes every
//! `retention::pass_interval_ms`, asks the queue to collect, and audits
//! and logs what went. Sleeps in between: an idle box wakes at most
//! hourly and writes nothing unless an artifact's state changed.

use crate::shell::queue::QueueHandle;
use std::time::Duration;

/// Run passes until the queue shuts down.
pub fn start(queue: QueueHandle, retention_ms: u64) -> tokio::task::JoinHandle<()> {
    let every = Duration::from_millis(crate::engine::artifact::retention::pass_interval_ms(
        retention_ms,
    ));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match queue
                .collect_artifacts(crate::now_millis(), retention_ms)
                .await
            {
                Ok(removed) => {
                    for (view, freed) in removed {
                        tracing::info!(
                            artifact = %view.digest,
                            name = %view.name,
                            version = %view.version,
                            freed,
                            "removed an artifact no command has needed for the retention"
                        );
                        queue.audit(crate::engine::audit::Note {
                            at: crate::now_millis(),
                            who: "box".into(),
                            from: "artifact retention".into(),
                            what: "artifact rm".into(),
                            target: format!("{}@{}", view.name, view.version),
                            command: None,
                            payload_sha256: None,
                            allowed: true,
                            why: None,
                        });
                    }
                }
                Err(crate::shell::queue::QueueError::ShuttingDown) => return,
                Err(e) => tracing::warn!("artifact retention pass: {e}; trying again at the next"),
            }
        }
    })
}

//! What the shells of the box's long-running jobs share: workflow runs
//! (`workflow::runner`) and rollouts (`rollout::runner`). Each keeps its
//! jobs whole in the store as JSON, is woken by the queue's lifecycle
//! events and by its own deadlines, and answers requests over a channel.
//! Written once here so the two loops differ only in what they decide.

use crate::command::{CommandId, Millis};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Decode the records a store holds, keyed by `id`; a record that does
/// not decode is logged and skipped (one bad record never keeps the box
/// from starting).
pub fn load<T: DeserializeOwned>(
    records: Vec<Vec<u8>>,
    what: &str,
    id: impl Fn(&T) -> CommandId,
) -> BTreeMap<CommandId, T> {
    let mut out = BTreeMap::new();
    for rec in records {
        match serde_json::from_slice::<T>(&rec) {
            Ok(j) => {
                out.insert(id(&j), j);
            }
            Err(e) => tracing::error!("a {what} record does not decode ({e}); skipped"),
        }
    }
    out
}

/// Encode the jobs `ids` names for the store (one that does not encode is
/// logged and left out: its last record stays).
pub fn encode<T: Serialize>(
    jobs: &BTreeMap<CommandId, T>,
    ids: &[CommandId],
    what: &str,
) -> Vec<(CommandId, Vec<u8>)> {
    let mut records = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(j) = jobs.get(id) else { continue };
        match serde_json::to_vec(j) {
            Ok(rec) => records.push((*id, rec)),
            Err(e) => tracing::error!(%id, error = %e, "cannot encode a {what}"),
        }
    }
    records
}

/// Sleep until wall-clock time `t` (ms), or for ever without one: a shell
/// with nothing due sleeps on its channels alone, never polls.
pub async fn sleep_until(t: Option<Millis>) {
    match t {
        Some(t) => {
            let wait = t.saturating_sub(crate::now_millis());
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await
        }
        None => std::future::pending().await,
    }
}

/// `first` and what else is waiting on `rx` now, up to `max` in all, to
/// handle as one batch (one group commit for what they cause).
pub fn batch<T: Clone>(first: T, rx: &mut broadcast::Receiver<T>, max: usize) -> Vec<T> {
    let mut out = vec![first];
    while out.len() < max {
        match rx.try_recv() {
            Ok(v) => out.push(v),
            Err(_) => break,
        }
    }
    out
}

/// Ask a shell over its channel; `None` once it has stopped.
pub async fn ask<R, T>(
    tx: &mpsc::UnboundedSender<R>,
    make: impl FnOnce(oneshot::Sender<T>) -> R,
) -> Option<T> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).ok()?;
    rx.await.ok()
}

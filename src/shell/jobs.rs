//! What the shells of the box's long-running jobs share: workflow runs
//! (`shell::workflow`) and rollouts (`shell::rollout`). Each keeps its
//! jobs whole in the store as JSON, is woken by the queue's lifecycle
//! events and by its own deadlines, and answers requests over a channel.
//! Written once here so the two loops differ only in what they decide.

use crate::engine::command::{CommandId, Millis};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, BTreeSet};
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

/// The end of a job a hub handed down (a workflow run, a rollout), as the
/// result of the command that carried it: the outbox takes it up, so the
/// hub learns it when the link returns. `span`: (created, finished).
pub fn end_record(
    id: CommandId,
    runner: &str,
    origin: String,
    state: crate::State,
    outcome: crate::engine::command::Outcome,
    span: (Millis, Millis),
) -> crate::engine::journal::ResultRecord {
    crate::engine::journal::ResultRecord {
        id,
        gen: 0,
        device: runner.into(),
        target: runner.into(),
        priority: crate::Priority::Normal,
        state,
        outcome: Some(outcome),
        error: None,
        attempts: 1,
        max_attempts: 1,
        created_at: span.0,
        finished_at: span.1,
        origin,
        key: None,
        command: None,
        children: Vec::new(),
    }
}

/// The box's job runners, handed to its uplinks: a hub hands down whole
/// jobs (`edge-1/workflow`, `edge-1/rollout`), which this box runs itself,
/// with or without its uplink.
#[derive(Clone)]
pub struct Runners {
    /// The workflow runner, for `EDGE/workflow`.
    pub workflows: crate::shell::workflow::Runner,
    /// The rollout runner, for `EDGE/rollout`.
    pub rollouts: crate::shell::rollout::RolloutRunner,
}

impl Runners {
    /// Whether a hub's command for `target` is a job for a runner here.
    pub fn is_job(target: &str) -> bool {
        target == crate::shell::workflow::WORKFLOW || target == crate::engine::rollout::ROLLOUT
    }

    /// Start the job a hub handed down as command `id` (durable on return;
    /// a second hand-over of the same id is a duplicate, started once):
    /// `Ok(duplicate)`. A job that does not decode or cannot start is a
    /// `BadRequest`, which the hub gets as the command's refusal.
    pub async fn hand_down(
        self,
        target: &str,
        id: CommandId,
        payload: Vec<u8>,
        origin: String,
    ) -> Result<bool, crate::shell::queue::QueueError> {
        use crate::shell::queue::QueueError;
        if target == crate::engine::rollout::ROLLOUT {
            let plan =
                serde_json::from_slice::<crate::engine::rollout::Plan>(&payload).map_err(|e| {
                    QueueError::BadRequest(format!(
                        "the rollout's plan does not decode ({e}); is this box older than its hub?"
                    ))
                })?;
            return match self.rollouts.start_as(id, plan, origin).await {
                Some(Ok(duplicate)) => Ok(duplicate),
                Some(Err(e)) => Err(QueueError::BadRequest(e)),
                None => Err(QueueError::ShuttingDown),
            };
        }
        let spec = crate::engine::workflow::Packed::from_bytes(&payload)
            .and_then(|p| p.unpack())
            .map_err(|e| QueueError::BadRequest(e.to_string()))?;
        match self.workflows.run_as(id, spec, origin).await {
            Some((_, duplicate)) => Ok(duplicate),
            None => Err(QueueError::ShuttingDown),
        }
    }

    /// A hub's cancel of a job it handed down: the workflow is cancelled
    /// or the rollout aborted. What it stopped, if anything.
    pub async fn cancel(&self, id: CommandId) -> Option<&'static str> {
        if self.workflows.cancel(id, false).await.is_some() {
            return Some("workflow");
        }
        let verb = crate::shell::rollout::Verb::Abort;
        self.rollouts.verb(id, verb).await.map(|_| "rollout")
    }
}

/// Sends the box could not answer ([`crate::QueueError::is_unsure`]), as
/// (job, step): each is made again after a backoff under its derived id
/// (a duplicate if the first was taken), while its job still wants it.
/// The job records the id at once, so a cancel or an abort in between
/// cancels it by that id. The wait doubles from a second to a minute while
/// sends keep failing, so a broken disk costs an attempt a minute, never a
/// busy loop.
#[derive(Debug, Default)]
pub struct Retry {
    sends: BTreeSet<(CommandId, String)>,
    at: Option<Millis>,
    delay: Millis,
}

impl Retry {
    const FIRST: Millis = 1_000;
    const MAX: Millis = 60_000;

    /// Job `id`'s send `step` is to be made again.
    pub fn add(&mut self, id: CommandId, step: &str, now: Millis) {
        self.sends.insert((id, step.to_string()));
        if self.at.is_none() {
            self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
            self.at = Some(now.saturating_add(self.delay));
        }
    }

    /// A send was answered: the next failure waits the shortest again.
    pub fn answered(&mut self) {
        if self.sends.is_empty() {
            self.delay = 0;
        }
    }

    /// When the next retry is due.
    pub fn next_wake(&self) -> Option<Millis> {
        self.at
    }

    /// The sends to make again now (none before their time).
    pub fn due(&mut self, now: Millis) -> Vec<(CommandId, String)> {
        match self.at {
            Some(t) if t <= now => {
                self.at = None;
                std::mem::take(&mut self.sends).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_waits_longer_while_sends_keep_failing_and_the_shortest_once_one_is_answered() {
        let (a, b) = (CommandId::new(1, 1), CommandId::new(1, 2));
        let (sa, sb) = ((a, "s0".to_string()), (b, "dev-1".to_string()));
        let mut r = Retry::default();
        assert_eq!(r.next_wake(), None);
        r.add(a, "s0", 0);
        r.add(b, "dev-1", 10);
        assert_eq!(r.next_wake(), Some(1_000), "the first wait is a second");
        assert!(r.due(999).is_empty(), "nothing before its time");
        assert_eq!(r.due(1_000), vec![sa.clone(), sb]);
        assert_eq!(r.next_wake(), None);
        // Failing again: 2 s, then 4 s ... capped at a minute.
        r.add(a, "s0", 1_000);
        assert_eq!(r.next_wake(), Some(3_000));
        let mut now = 3_000;
        for _ in 0..10 {
            assert_eq!(r.due(now), vec![sa.clone()]);
            r.add(a, "s0", now);
            now = r.next_wake().unwrap();
        }
        assert_eq!(r.due(now), vec![sa.clone()]);
        r.add(a, "s0", now);
        assert_eq!(r.next_wake(), Some(now + 60_000), "capped at a minute");
        // Answered while a retry is pending keeps the backoff; once none is, it resets.
        r.answered();
        assert_eq!(r.due(now + 60_000), vec![sa.clone()]);
        r.answered();
        r.add(b, "dev-1", now);
        assert_eq!(r.next_wake(), Some(now + 1_000));
    }
}

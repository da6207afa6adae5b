//! The async shell that runs workflows on the box: it owns the runs (the
//! sans-IO [`Run`]s), sends their steps through the queue, learns of their
//! ends from the queue's lifecycle events, and writes each run to the store
//! after every change. A restart reloads the runs and picks them up: a step
//! sent before the crash is found by its command; one about to be sent is
//! sent again under the same idempotency key, so it is the same command.

use super::{Action, Ended, Run, RunState, Workflow};
use crate::command::{CommandId, Millis, Outcome};
use crate::queue::{QueueError, QueueHandle, SendRequest};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use tokio::sync::{broadcast, mpsc, oneshot};

/// A run as `workflow show` gives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    pub id: CommandId,
    pub name: String,
    pub state: String,
    pub started_at: Millis,
    pub finished_at: Option<Millis>,
    pub steps: Vec<StepView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepView {
    pub name: String,
    pub state: String,
    pub target: String,
    pub command: Option<CommandId>,
    pub result: Option<String>,
}

impl From<&Run> for RunView {
    fn from(r: &Run) -> Self {
        RunView {
            id: r.id,
            name: r.spec.name.clone(),
            state: r.state.as_str().into(),
            started_at: r.started_at,
            finished_at: r.finished_at,
            steps: r
                .steps
                .iter()
                .zip(&r.spec.steps)
                .map(|(s, spec)| StepView {
                    name: s.name.clone(),
                    state: s.state.as_str().into(),
                    target: spec.target.clone(),
                    command: s.command,
                    result: s.result.clone(),
                })
                .collect(),
        }
    }
}

enum Req {
    Start(Box<Workflow>, oneshot::Sender<Result<RunView, String>>),
    Show(CommandId, oneshot::Sender<Option<RunView>>),
    List(oneshot::Sender<Vec<RunView>>),
    Cancel(CommandId, bool, oneshot::Sender<Option<RunView>>),
}

/// A handle to the workflow runner.
#[derive(Clone)]
pub struct Runner {
    tx: mpsc::UnboundedSender<Req>,
}

impl Runner {
    /// Load the runs the store holds and start running.
    pub fn start(queue: QueueHandle, store: Store) -> Result<Runner, crate::store::StoreError> {
        let mut runs = BTreeMap::new();
        for rec in store.workflows()? {
            match serde_json::from_slice::<Run>(&rec) {
                Ok(r) => {
                    runs.insert(r.id, r);
                }
                Err(e) => tracing::error!("a workflow record does not decode ({e}); skipped"),
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let events = queue.subscribe();
        let shell = Shell {
            queue,
            store,
            runs,
            by_cmd: HashMap::new(),
        };
        tokio::spawn(shell.run(rx, events));
        Ok(Runner { tx })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Req) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).ok()?;
        rx.await.ok()
    }

    pub async fn run(&self, w: Workflow) -> Result<RunView, String> {
        self.ask(|r| Req::Start(Box::new(w), r))
            .await
            .unwrap_or_else(|| Err("the workflow runner stopped".into()))
    }

    pub async fn show(&self, id: CommandId) -> Option<RunView> {
        self.ask(|r| Req::Show(id, r)).await.flatten()
    }

    pub async fn list(&self) -> Vec<RunView> {
        self.ask(Req::List).await.unwrap_or_default()
    }

    pub async fn cancel(&self, id: CommandId, compensate: bool) -> Option<RunView> {
        self.ask(|r| Req::Cancel(id, compensate, r)).await.flatten()
    }
}

struct Shell {
    queue: QueueHandle,
    store: Store,
    runs: BTreeMap<CommandId, Run>,
    /// Step command → its run.
    by_cmd: HashMap<CommandId, CommandId>,
}

impl Shell {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Req>,
        mut events: broadcast::Receiver<crate::queue::LifecycleEvent>,
    ) {
        // Pick up what a restart interrupted.
        let ids: Vec<CommandId> = self.runs.keys().copied().collect();
        for id in ids {
            self.resume(id).await;
        }
        loop {
            let next = self
                .runs
                .values()
                .filter(|r| r.state == RunState::Running)
                .filter_map(|r| r.deadline)
                .min();
            let sleep = async {
                match next {
                    Some(t) => {
                        let wait = t.saturating_sub(crate::now_millis());
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                req = rx.recv() => match req {
                    None => return,
                    Some(r) => self.request(r).await,
                },
                ev = events.recv() => match ev {
                    Ok(ev) if ev.state.is_final() => {
                        if let Some(&run) = self.by_cmd.get(&ev.id) {
                            self.check_step(run, ev.id).await;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let ids: Vec<CommandId> = self.runs.keys().copied().collect();
                        for id in ids {
                            self.resume(id).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = sleep => {
                    let now = crate::now_millis();
                    let ids: Vec<CommandId> = self.runs.keys().copied().collect();
                    for id in ids {
                        let actions = self.runs.get_mut(&id).map(|r| r.tick(now)).unwrap_or_default();
                        if !actions.is_empty() {
                            self.act(id, actions).await;
                        }
                    }
                }
            }
        }
    }

    async fn request(&mut self, r: Req) {
        match r {
            Req::Start(w, reply) => {
                let id = CommandId::new(crate::now_millis(), rand::random());
                let (run, actions) = Run::start(id, *w, crate::now_millis());
                self.runs.insert(id, run);
                self.act(id, actions).await;
                let _ = reply.send(Ok(RunView::from(&self.runs[&id])));
            }
            Req::Show(id, reply) => {
                let _ = reply.send(self.runs.get(&id).map(RunView::from));
            }
            Req::List(reply) => {
                let _ = reply.send(self.runs.values().rev().map(RunView::from).collect());
            }
            Req::Cancel(id, compensate, reply) => {
                let actions = match self.runs.get_mut(&id) {
                    Some(r) => r.cancel(compensate, crate::now_millis()),
                    None => {
                        let _ = reply.send(None);
                        return;
                    }
                };
                self.act(id, actions).await;
                let _ = reply.send(self.runs.get(&id).map(RunView::from));
            }
        }
    }

    /// After a restart or a lag: re-attach every running step to its
    /// command, and send again (same key: the same command) any step whose
    /// send was not recorded.
    async fn resume(&mut self, id: CommandId) {
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        if run.state != RunState::Running {
            return;
        }
        let steps: Vec<(String, Option<CommandId>)> = run
            .steps
            .iter()
            .filter(|s| s.state == super::StepState::Running)
            .map(|s| (s.name.clone(), s.command))
            .collect();
        for (step, cmd) in steps {
            match cmd {
                Some(c) => {
                    self.by_cmd.insert(c, id);
                    self.check_step(id, c).await;
                }
                None => {
                    if let Some(a) = self.resend(id, &step) {
                        self.act(id, vec![a]).await;
                    }
                }
            }
        }
    }

    fn resend(&self, id: CommandId, step: &str) -> Option<Action> {
        let run = self.runs.get(&id)?;
        let spec = run.spec.steps.iter().find(|s| s.name == step)?;
        let payload = match &spec.payload {
            super::Payload::Inline(b) => b.clone(),
            super::Payload::File(_) => Vec::new(),
        };
        Some(Action::Send {
            step: step.to_string(),
            target: spec.target.clone(),
            payload,
            opts: crate::SendOptions {
                priority: spec.priority,
                ttl_ms: spec.ttl.map(|t| t.as_millis() as u64),
                max_attempts: spec.max_attempts,
                ..Default::default()
            },
            key: format!("workflow:{id}:{step}"),
        })
    }

    /// If step command `cmd` of run `id` has ended, feed its end to the run.
    async fn check_step(&mut self, id: CommandId, cmd: CommandId) {
        let v = match self.queue.show(cmd).await {
            Ok(v) => v,
            Err(QueueError::NotFound(_)) => {
                // Past retention: it ended long ago; its result is gone.
                crate::queue::CommandView {
                    state: crate::State::Expired,
                    error: Some("its result is past retention".into()),
                    ..placeholder(cmd)
                }
            }
            Err(e) => {
                tracing::warn!(%cmd, error = %e, "cannot look up a workflow step");
                return;
            }
        };
        if !v.state.is_final() {
            return;
        }
        self.by_cmd.remove(&cmd);
        let text = |v: &crate::queue::CommandView| match &v.outcome {
            Some(Outcome::Ok(b)) => Some(b.clone()),
            Some(Outcome::Failed { message, .. }) => Some(message.clone().into_bytes()),
            Some(Outcome::Rejected { reason }) => Some(reason.clone().into_bytes()),
            None => v.error.clone().map(String::into_bytes),
        };
        let result = if v.children.is_empty() {
            text(&v)
        } else {
            // A broadcast's result: each child's, one line per device.
            let mut out = Vec::new();
            for c in &v.children {
                let r = match self.queue.show(c.id).await {
                    Ok(cv) => text(&cv).unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                out.extend_from_slice(c.device.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(&r);
                out.push(b'\n');
            }
            Some(out)
        };
        let children = (!v.children.is_empty()).then(|| {
            let ok = v
                .children
                .iter()
                .filter(|c| c.state == crate::State::Succeeded)
                .count() as u32;
            (ok, v.children.len() as u32)
        });
        let ended = Ended {
            state: v.state,
            result,
            children,
        };
        let actions = match self.runs.get_mut(&id) {
            Some(r) => r.step_ended(cmd, ended, crate::now_millis()),
            None => return,
        };
        self.act(id, actions).await;
    }

    /// Carry out a run's actions, persisting the run before each send (so a
    /// crash re-sends under the same key) and after all of them.
    async fn act(&mut self, id: CommandId, actions: Vec<Action>) {
        self.persist(id);
        let mut followups = Vec::new();
        for a in actions {
            match a {
                Action::Send {
                    step,
                    target,
                    payload,
                    opts,
                    key: _,
                } => {
                    // The step's command id is derived from the run and the
                    // step: a send repeated after a crash is a duplicate.
                    let sent = self
                        .queue
                        .send_as(
                            step_command_id(id, &step),
                            SendRequest {
                                target,
                                payload,
                                opts,
                                origin: "workflow".into(),
                                signature: None,
                            },
                        )
                        .await;
                    match sent {
                        Ok(r) => {
                            if let Some(run) = self.runs.get_mut(&id) {
                                run.sent(&step, r.id);
                            }
                            self.by_cmd.insert(r.id, id);
                            followups.push(r.id);
                        }
                        Err(e) => {
                            // Refused (no route, full): the step fails.
                            tracing::warn!(run = %id, %step, error = %e, "a workflow step could not be sent");
                            let fake = CommandId::new(crate::now_millis(), rand::random());
                            if let Some(run) = self.runs.get_mut(&id) {
                                run.sent(&step, fake);
                                let more = run.step_ended(
                                    fake,
                                    Ended {
                                        state: crate::State::Failed,
                                        result: Some(e.to_string().into_bytes()),
                                        children: None,
                                    },
                                    crate::now_millis(),
                                );
                                Box::pin(self.act(id, more)).await;
                            }
                        }
                    }
                }
                Action::Cancel(c) => {
                    let _ = self.queue.cancel(c).await;
                }
            }
        }
        self.persist(id);
        // A step that ended before we listened (a duplicate key, a fast
        // device) is settled now.
        for c in followups {
            if self.by_cmd.contains_key(&c) {
                Box::pin(self.check_step(id, c)).await;
            }
        }
    }

    fn persist(&self, id: CommandId) {
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        match serde_json::to_vec(run) {
            Ok(rec) => {
                if let Err(e) = self.store.put_workflow(id, &rec) {
                    tracing::error!(run = %id, error = %e, "cannot write a workflow run");
                }
            }
            Err(e) => tracing::error!(run = %id, error = %e, "cannot encode a workflow run"),
        }
    }
}

/// The command id of step `step` of run `run`: the run's millisecond and a
/// digest of (run, step), so it is the same at every attempt to send it.
pub fn step_command_id(run: CommandId, step: &str) -> CommandId {
    let mut input = run.0.to_be_bytes().to_vec();
    input.extend_from_slice(step.as_bytes());
    let d = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut r = [0u8; 16];
    r[6..].copy_from_slice(&d.as_ref()[..10]);
    let ms = (run.0 >> 80) as u64;
    CommandId::new(ms, u128::from_be_bytes(r))
}

fn placeholder(id: CommandId) -> crate::queue::CommandView {
    crate::queue::CommandView {
        id,
        target: String::new(),
        device: String::new(),
        state: crate::State::Queued,
        priority: crate::Priority::Normal,
        attempts: 0,
        max_attempts: 0,
        created_at: 0,
        finished_at: None,
        expires_at: None,
        not_before: None,
        after: None,
        origin: String::new(),
        key: None,
        outcome: None,
        error: None,
        children: Vec::new(),
        summary: None,
    }
}

//! The async shell that runs workflows on the box: it owns the runs (the
//! sans-IO [`Run`]s), sends their steps through the queue, learns of their
//! ends from the queue's lifecycle events, and writes each run to the store
//! after every change. A restart reloads the runs and picks them up: a step
//! sent before the crash is found by its command; one about to be sent is
//! sent again under the same derived id, so it is the same command.

pub mod files;

use crate::engine::command::{CommandId, Millis, Outcome};
use crate::engine::workflow::{
    ended_from, event_end, request, step_command_id, text, Action, Ended, Run, RunState, Workflow,
};
use crate::shell::queue::{QueueError, QueueHandle, SendRequest};
use crate::shell::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use tokio::sync::{broadcast, mpsc, oneshot};

/// The target a hub sends a workflow to (`edge-1/workflow`): the edge's
/// runner, not a device.
pub const WORKFLOW: &str = "workflow";

/// Requests or events handled together.
const BATCH: usize = 256;

/// A run as `workflow show` gives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    /// The run's id (`workflow show ID`, `workflow cancel ID`).
    pub id: CommandId,
    /// The workflow's name.
    pub name: String,
    /// The run's state, as `RunState::as_str` names it.
    pub state: String,
    /// When it started, in ms since the Unix epoch.
    pub started_at: Millis,
    /// When it ended, in ms since the Unix epoch (`None`: running).
    pub finished_at: Option<Millis>,
    /// Its steps, in the workflow's order.
    pub steps: Vec<StepView>,
}

/// One step of a run, as `workflow show` gives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepView {
    /// The step's name.
    pub name: String,
    /// Its state, as `StepState::as_str` names it.
    pub state: String,
    /// Its target, as the file wrote it.
    pub target: String,
    /// Its command's id (`None`: not sent yet).
    pub command: Option<CommandId>,
    /// Its command's result text or error (`None`: not ended yet).
    pub result: Option<String>,
}

impl RunView {
    /// As `workflow show --json` prints it (the contract of issue 14).
    pub fn json(&self) -> serde_json::Value {
        let time = crate::engine::command::rfc3339;
        let steps: Vec<serde_json::Value> = self
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({"name": s.name, "state": s.state, "target": s.target,
                       "command": s.command.map(|c| c.to_string()), "result": s.result})
            })
            .collect();
        serde_json::json!({"id": self.id.to_string(), "name": self.name, "state": self.state,
               "started_at": time(self.started_at), "finished_at": self.finished_at.map(time),
               "steps": steps})
    }
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
    /// A run handed down by a hub as command `id`: (view, duplicate).
    StartAs {
        id: CommandId,
        spec: Box<Workflow>,
        origin: String,
        reply: oneshot::Sender<(RunView, bool)>,
    },
    Show(CommandId, oneshot::Sender<Option<RunView>>),
    List(oneshot::Sender<Vec<RunView>>),
    Cancel(CommandId, bool, oneshot::Sender<Option<RunView>>),
    /// Stop; answered once the runner has let go of the store.
    Stop(oneshot::Sender<()>),
}

/// A handle to the workflow runner.
#[derive(Clone)]
pub struct Runner {
    tx: mpsc::UnboundedSender<Req>,
}

impl Runner {
    /// Load the runs the store holds and start running.
    pub fn start(
        queue: QueueHandle,
        store: Store,
        retention: crate::engine::workflow::Retention,
    ) -> Result<Runner, crate::shell::store::StoreError> {
        let runs = crate::shell::jobs::load(store.workflows()?, "workflow", |r: &Run| r.id);
        let (tx, rx) = mpsc::unbounded_channel();
        let events = queue.subscribe();
        let shell = Shell {
            queue,
            store,
            runs,
            by_cmd: HashMap::new(),
            retention,
            prune_at: Some(0),
            retry: Default::default(),
        };
        tokio::spawn(shell.run(rx, events));
        Ok(Runner { tx })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Req) -> Option<T> {
        crate::shell::jobs::ask(&self.tx, make).await
    }

    /// Start a run of `w` (durable on return): its view, or why it could
    /// not start (an artifact the box lacks, the runner stopped).
    pub async fn run(&self, w: Workflow) -> Result<RunView, String> {
        self.ask(|r| Req::Start(Box::new(w), r))
            .await
            .unwrap_or_else(|| Err("the workflow runner stopped".into()))
    }

    /// Start the run a hub handed down as command `id` (durable on
    /// return); a second hand-over of the same id is a duplicate, started
    /// once. Its end is recorded as the result of command `id`, which the
    /// outbox carries up to the hub. `None`: the runner has stopped.
    pub async fn run_as(
        &self,
        id: CommandId,
        spec: Workflow,
        origin: String,
    ) -> Option<(RunView, bool)> {
        self.ask(|reply| Req::StartAs {
            id,
            spec: Box::new(spec),
            origin,
            reply,
        })
        .await
    }

    /// Run `id` as it is now (`None`: no such run, or the runner stopped).
    pub async fn show(&self, id: CommandId) -> Option<RunView> {
        self.ask(|r| Req::Show(id, r)).await.flatten()
    }

    /// Every run kept, newest first (none once the runner stopped).
    pub async fn list(&self) -> Vec<RunView> {
        self.ask(Req::List).await.unwrap_or_default()
    }

    /// Cancel run `id` (durable on return), running its `on_failure` steps
    /// if `compensate`; a run already ended is left as it is. `None`: no
    /// such run.
    pub async fn cancel(&self, id: CommandId, compensate: bool) -> Option<RunView> {
        self.ask(|r| Req::Cancel(id, compensate, r)).await.flatten()
    }

    /// Stop the runner (the box is stopping): returns once it no longer
    /// holds the store, so the data dir can be opened again at once.
    pub async fn stop(&self) {
        self.ask(Req::Stop).await;
    }
}

struct Shell {
    queue: QueueHandle,
    store: Store,
    runs: BTreeMap<CommandId, Run>,
    /// Step command → its run.
    by_cmd: HashMap<CommandId, CommandId>,
    retention: crate::engine::workflow::Retention,
    /// When finished runs are next due for pruning; `Some(0)` once a run
    /// may have ended (pruned at the next turn of the loop).
    prune_at: Option<crate::Millis>,
    /// Runs with a step whose send the box could not answer.
    retry: crate::shell::jobs::Retry,
}

impl Shell {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Req>,
        mut events: broadcast::Receiver<crate::shell::queue::LifecycleEvent>,
    ) {
        // Pick up what a restart interrupted.
        let ids: Vec<CommandId> = self.runs.keys().copied().collect();
        for id in &ids {
            self.resume(*id).await;
        }
        // Ends a crash kept from reaching the queue.
        self.report(&ids).await;
        loop {
            if self.prune_at.is_some_and(|t| t <= crate::now_millis()) {
                self.prune(crate::now_millis());
            }
            let next = self
                .runs
                .values()
                .filter(|r| r.state == RunState::Running)
                .filter_map(|r| r.deadline)
                .chain(self.prune_at)
                .chain(self.retry.next_wake())
                .min();
            let sleep = crate::shell::jobs::sleep_until(next);
            tokio::select! {
                req = rx.recv() => match req {
                    None => return,
                    Some(r) => {
                        // What else is waiting goes in the same batch.
                        let mut reqs = vec![r];
                        while reqs.len() < BATCH {
                            match rx.try_recv() {
                                Ok(r) => reqs.push(r),
                                Err(_) => break,
                            }
                        }
                        let stop = reqs.iter().position(|r| matches!(r, Req::Stop(_)));
                        if let Some(i) = stop {
                            let Req::Stop(done) = reqs.swap_remove(i) else { unreachable!() };
                            self.requests(reqs).await;
                            drop(self);
                            let _ = done.send(());
                            return;
                        }
                        self.requests(reqs).await;
                    }
                },
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        let evs = crate::shell::jobs::batch(ev, &mut events, BATCH);
                        let mut known = Vec::new();
                        let mut look_up = Vec::new();
                        for ev in evs.iter().filter(|ev| ev.state.is_final()) {
                            if !self.by_cmd.contains_key(&ev.id) {
                                continue;
                            }
                            match self.end_of(ev) {
                                Some(e) => known.push((ev.id, Some(e))),
                                None => look_up.push(ev.id),
                            }
                        }
                        if !look_up.is_empty() {
                            known.extend(self.ends(look_up).await);
                        }
                        let batch = self.apply(known);
                        if !batch.is_empty() {
                            self.act(batch, false).await;
                        }
                    }
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
                    let again: Vec<_> = self
                        .retry
                        .due(now)
                        .into_iter()
                        .filter_map(|(id, step)| Some((id, vec![self.runs.get(&id)?.resend(&step)?])))
                        .collect();
                    if !again.is_empty() {
                        self.act(again, false).await;
                    }
                    let ids: Vec<CommandId> = self.runs.keys().copied().collect();
                    for id in ids {
                        let actions = self.runs.get_mut(&id).map(|r| r.tick(now)).unwrap_or_default();
                        if !actions.is_empty() {
                            self.act(vec![(id, actions)], false).await;
                        }
                    }
                }
            }
        }
    }

    /// Requests in arrival order, except that the runs they start are
    /// started together (one group commit for all their first steps).
    async fn requests(&mut self, reqs: Vec<Req>) {
        let mut started = Vec::new();
        let mut handed = Vec::new();
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        for r in reqs {
            match r {
                Req::Start(mut w, reply) => {
                    if let Err(e) = self.pin_artifacts(&mut w) {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                    let id = CommandId::new(crate::now_millis(), rand::random());
                    let (run, actions) = Run::start(id, *w, crate::now_millis());
                    self.runs.insert(id, run);
                    batch.push((id, actions));
                    started.push((id, reply));
                }
                Req::StartAs {
                    id,
                    spec,
                    origin,
                    reply,
                } => {
                    let duplicate = self.runs.contains_key(&id);
                    if !duplicate {
                        let mut spec = spec;
                        // A hub's run naming an artifact this box lacks
                        // starts anyway: that step fails, saying which.
                        if let Err(e) = self.pin_artifacts(&mut spec) {
                            tracing::warn!(run = %id, "{e}");
                        }
                        let (mut run, actions) = Run::start(id, *spec, crate::now_millis());
                        run.origin = Some(origin);
                        self.runs.insert(id, run);
                        batch.push((id, actions));
                    }
                    handed.push((id, duplicate, reply));
                }
                other => rest.push(other),
            }
        }
        if !batch.is_empty() {
            self.act(batch, true).await;
        }
        for (id, reply) in started {
            let _ = reply.send(Ok(RunView::from(&self.runs[&id])));
        }
        for (id, duplicate, reply) in handed {
            let _ = reply.send((RunView::from(&self.runs[&id]), duplicate));
        }
        for r in rest {
            self.request(r).await;
        }
    }

    async fn request(&mut self, r: Req) {
        match r {
            Req::Start(..) | Req::StartAs { .. } | Req::Stop(_) => {
                unreachable!("handled in `requests` and `run`")
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
                self.act(vec![(id, actions)], true).await;
                let _ = reply.send(self.runs.get(&id).map(RunView::from));
            }
        }
    }

    /// After a restart or a lag: re-attach every running step to its
    /// command, and send again (the same derived id: the same command) any step whose
    /// send was not recorded.
    async fn resume(&mut self, id: CommandId) {
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        let (look, resend) = run.reattach();
        for c in look {
            self.by_cmd.insert(c, id);
            self.check_step(c).await;
        }
        if !resend.is_empty() {
            self.act(vec![(id, resend)], false).await;
        }
    }

    /// Pin each step's artifact to the digest the box holds now, so the
    /// run sends one file throughout (a newer `fw` added mid-run does not
    /// change it). A name the box does not hold is an error at start.
    fn pin_artifacts(&self, w: &mut crate::engine::workflow::Workflow) -> Result<(), String> {
        for step in &mut w.steps {
            if let Some(a) = &step.artifact {
                let d = self
                    .artifact_digest(a)
                    .map_err(|e| format!("step `{}`: {e}", step.name))?;
                step.artifact = Some(d.to_string());
            }
        }
        Ok(())
    }

    fn artifact_digest(&self, spec: &str) -> Result<crate::engine::artifact::Digest, QueueError> {
        artifact_digest(&self.queue, spec)
    }

    /// If step command `cmd` of run `id` has ended, feed its end to the run.
    async fn check_step(&mut self, cmd: CommandId) {
        let ends = self.ends(vec![cmd]).await;
        let batch = self.apply(ends);
        if !batch.is_empty() {
            self.act(batch, false).await;
        }
    }

    /// How each of these step commands ended (`None`: not yet, or it
    /// cannot be looked up now). The look-ups go to the queue together.
    async fn ends(&self, cmds: Vec<CommandId>) -> Vec<(CommandId, Option<Ended>)> {
        let mut set = tokio::task::JoinSet::new();
        for (i, cmd) in cmds.into_iter().enumerate() {
            let q = self.queue.clone();
            set.spawn(async move { (i, cmd, ended(&q, cmd).await) });
        }
        let mut out = Vec::with_capacity(set.len());
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                out.push(r);
            }
        }
        out.sort_unstable_by_key(|r| r.0);
        out.into_iter().map(|(_, c, e)| (c, e)).collect()
    }

    /// Feed ends to their runs; the runs' next actions.
    fn apply(&mut self, ends: Vec<(CommandId, Option<Ended>)>) -> Vec<(CommandId, Vec<Action>)> {
        let mut batch = Vec::new();
        for (cmd, e) in ends {
            let Some(e) = e else { continue };
            let Some(run) = self.by_cmd.remove(&cmd) else {
                continue;
            };
            if let Some(r) = self.runs.get_mut(&run) {
                batch.push((run, r.step_ended(cmd, e, crate::now_millis())));
            }
        }
        batch
    }

    /// A lifecycle event's end, when it says all there is to say (a step
    /// on one device); a group step's result gathers its children, so it
    /// is looked up.
    fn end_of(&self, ev: &crate::shell::queue::LifecycleEvent) -> Option<Ended> {
        event_end(self.runs.get(self.by_cmd.get(&ev.id)?)?, ev)
    }

    /// Carry out runs' actions together: the runs are written first, as
    /// the engine left them (a started step `running`, its command id not
    /// yet recorded), so each record rides the group commit of the sends
    /// that follow; every send is handed to the queue before any is
    /// awaited (so they share that commit); then the runs are written
    /// again with their commands' ids. A restart sends a recorded step
    /// again under the same derived id, which the queue answers as a
    /// duplicate. (Written after the sends, as it was, a crash between
    /// their commit and the record left a start that never returned with
    /// its first steps sent behind it: the class the rollout simulation
    /// found in `shell::rollout`'s `act`.)
    ///
    /// Only a start or a cancel is flushed before it returns (it is
    /// answered to someone). A step's progress need not be: a run's
    /// record only lags its commands, and `resume` rebuilds the rest from
    /// the queue, where the commands are durable.
    async fn act(&mut self, mut batch: Vec<(CommandId, Vec<Action>)>, durable: bool) {
        let mut touched: Vec<CommandId> = Vec::new();
        let mut followups = Vec::new();
        while !batch.is_empty() {
            let mut sends = Vec::new();
            let mut cancels = Vec::new();
            let ahead: Vec<CommandId> = batch.iter().map(|(id, _)| *id).collect();
            self.persist(&ahead, false);
            for (id, actions) in batch.drain(..) {
                touched.push(id);
                for a in actions {
                    match a {
                        send @ Action::Send { .. } => {
                            let Some((step, cmd, req, artifact)) = request(id, send) else {
                                continue;
                            };
                            let signature = artifact_envelope(&self.queue, artifact.as_deref());
                            let fut = signature.map(|signature| {
                                self.queue.send_as(cmd, SendRequest { signature, ..req })
                            });
                            sends.push((id, step, fut));
                        }
                        Action::Cancel(c) => cancels.push(self.queue.cancel_queued(c)),
                    }
                }
            }
            for c in cancels {
                let _ = c.await;
            }
            for (id, step, fut) in sends {
                let sent = match fut {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(r) => {
                        if let Some(run) = self.runs.get_mut(&id) {
                            run.sent(&step, r.id);
                        }
                        self.by_cmd.insert(r.id, id);
                        followups.push(r.id);
                        self.retry.answered();
                    }
                    Err(e) if e.is_unsure() => {
                        // Taken or not, the box cannot say: the step is
                        // running under its derived id (a cancel meanwhile
                        // cancels that id) and is sent again under it.
                        tracing::warn!(run = %id, %step, error = %e, "the box could not say whether a workflow step was queued; sending it again under the same id shortly");
                        let cmd = step_command_id(id, &step);
                        if let Some(run) = self.runs.get_mut(&id) {
                            run.sent(&step, cmd);
                        }
                        self.by_cmd.insert(cmd, id);
                        self.retry.add(id, &step, crate::now_millis());
                    }
                    Err(e) => {
                        // Refused (no route, full): the step fails.
                        tracing::warn!(run = %id, %step, error = %e, "a workflow step could not be sent");
                        let cmd = step_command_id(id, &step);
                        if let Some(run) = self.runs.get_mut(&id) {
                            run.sent(&step, cmd);
                            let more = run.step_ended(
                                cmd,
                                Ended {
                                    state: crate::State::Failed,
                                    result: Some(e.to_string().into_bytes()),
                                    children: None,
                                },
                                crate::now_millis(),
                            );
                            batch.push((id, more));
                        }
                    }
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        self.persist(&touched, durable);
        // A touched run may have ended: retention looks again next turn.
        self.prune_at = Some(0);
        self.report(&touched).await;
        // A step that ended before we listened (a duplicate, a fast
        // device) is settled now.
        followups.retain(|c| self.by_cmd.contains_key(c));
        if !followups.is_empty() {
            let ends = self.ends(followups).await;
            let batch = self.apply(ends);
            if !batch.is_empty() {
                Box::pin(self.act(batch, false)).await;
            }
        }
    }

    /// Record the end of each ended run a hub handed down as the result of
    /// its command, so the outbox carries it up. After the run's record:
    /// a crash in between reports again at restart, and the queue keeps
    /// the first.
    async fn report(&mut self, ids: &[CommandId]) {
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let Some(run) = self.runs.get(id) else {
                continue;
            };
            if run.state == RunState::Running || run.reported || run.origin.is_none() {
                continue;
            }
            let q = self.queue.clone();
            let rec = result_of(run);
            set.spawn(async move { (rec.id, q.record_finished(rec).await) });
        }
        let mut done = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok((id, Ok(()))) => done.push(id),
                Ok((id, Err(e))) => {
                    tracing::warn!(run = %id, error = %e, "cannot record a handed-down workflow's end; retried at restart")
                }
                Err(_) => {}
            }
        }
        for id in &done {
            if let Some(r) = self.runs.get_mut(id) {
                r.reported = true;
            }
        }
        self.persist(&done, false);
        if !done.is_empty() {
            // A reported run may now be pruned.
            self.prune_at = Some(0);
        }
    }

    /// Forget the finished runs the retention no longer keeps, in memory
    /// and in the store, and note when the next one is due.
    fn prune(&mut self, now: crate::Millis) {
        let (gone, next) = self.retention.prune(self.runs.values(), now);
        self.prune_at = next;
        if gone.is_empty() {
            return;
        }
        for id in &gone {
            self.runs.remove(id);
        }
        let gone_set: std::collections::HashSet<&CommandId> = gone.iter().collect();
        self.by_cmd.retain(|_, run| !gone_set.contains(run));
        if let Err(e) = self.store.delete_workflows(&gone) {
            // Gone from memory already; their records come back at the
            // next start, which prunes them again.
            tracing::warn!(error = %e, "cannot delete finished workflow runs' records");
        }
    }

    fn persist(&self, ids: &[CommandId], durable: bool) {
        let records = crate::shell::jobs::encode(&self.runs, ids, "workflow run");
        if let Err(e) = self.store.put_workflows(&records, durable) {
            tracing::error!(error = %e, "cannot write workflow runs");
        }
    }
}

/// The digest of the artifact `spec` names on this box's shelf.
pub(crate) fn artifact_digest(
    queue: &QueueHandle,
    spec: &str,
) -> Result<crate::engine::artifact::Digest, QueueError> {
    let spec =
        crate::engine::artifact::ArtifactSpec::parse(spec).map_err(QueueError::BadRequest)?;
    queue
        .shelf()
        .resolve(&spec)
        .map_err(crate::shell::queue::shelf_error)
}

/// The envelope a command the box sends itself (a workflow step, a
/// rollout's device) carries its artifact in: unsigned, since the box
/// holds no operator's key.
pub(crate) fn artifact_envelope(
    queue: &QueueHandle,
    artifact: Option<&str>,
) -> Result<Option<Vec<u8>>, QueueError> {
    artifact
        .map(|a| artifact_digest(queue, a))
        .transpose()
        .map(|d| d.map(|d| crate::engine::trust::envelope::unsigned(Some(d.0))))
}

/// A handed-down run's end as the result of its command: the run as
/// `workflow show --json` prints it.
fn result_of(run: &Run) -> crate::engine::journal::ResultRecord {
    let view = RunView::from(run);
    let json = view.json().to_string();
    let (state, outcome) = match run.state {
        RunState::Succeeded => (crate::State::Succeeded, Outcome::Ok(json.into_bytes())),
        RunState::Cancelled => (crate::State::Cancelled, Outcome::Rejected { reason: json }),
        _ => (
            crate::State::Failed,
            Outcome::Failed {
                code: 1,
                message: json,
            },
        ),
    };
    crate::shell::jobs::end_record(
        run.id,
        WORKFLOW,
        run.origin.clone().unwrap_or_default(),
        state,
        outcome,
        (
            run.started_at,
            run.finished_at.unwrap_or_else(crate::now_millis),
        ),
    )
}

/// How step command `cmd` ended, from the queue (`None`: not ended, or
/// not to be looked up now).
async fn ended(queue: &QueueHandle, cmd: CommandId) -> Option<Ended> {
    let v = match queue.show(cmd).await {
        Ok(v) => v,
        Err(QueueError::NotFound(_)) => {
            // Past retention, or never taken (`workflow::UNKNOWN_TO_THE_BOX`).
            crate::shell::queue::CommandView {
                state: crate::State::Expired,
                error: Some(crate::engine::workflow::UNKNOWN_TO_THE_BOX.into()),
                ..placeholder(cmd)
            }
        }
        Err(e) => {
            tracing::warn!(%cmd, error = %e, "cannot look up a workflow step");
            return None;
        }
    };
    if !v.state.is_final() {
        return None;
    }
    // A broadcast's children, each looked up for its result.
    let mut texts = Vec::with_capacity(v.children.len());
    for c in &v.children {
        texts.push(match queue.show(c.id).await {
            Ok(cv) => text(cv.outcome.as_ref(), cv.error.as_ref()).unwrap_or_default(),
            Err(_) => Vec::new(),
        });
    }
    ended_from(&v, &texts)
}

fn placeholder(id: CommandId) -> crate::shell::queue::CommandView {
    crate::shell::queue::CommandView {
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
        progress: None,
    }
}

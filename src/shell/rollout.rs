//! The async shell that runs rollouts on the box: it owns the [`Rollout`]s,
//! resolves a plan's target to devices, sends each device its command
//! through the queue under an id derived from (rollout, device), feeds the
//! engine the devices' presence, their commands' deliveries and ends, and
//! the time, and writes each rollout to the store after every change.
//!
//! A restart reloads the rollouts and picks them up: a device whose command
//! was sent is found by its command; one whose send was not recorded yet is
//! sent again under the same id, which the queue answers as a duplicate, so
//! no device gets a rollout twice.

use crate::engine::command::{CommandId, Millis, Outcome, State};
use crate::engine::rollout::{feed, request, Action, End, Plan, Rollout, RolloutState};
use crate::shell::queue::{QueueError, QueueHandle, SendRequest};
use crate::shell::store::Store;
use crate::shell::workflow::{artifact_digest, artifact_envelope};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Events handled together.
const BATCH: usize = 256;

/// A rollout as `rollout show` gives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    /// The rollout's id (`rollout show ID`, `pause`, `resume`, `abort`).
    pub id: CommandId,
    /// The plan's name.
    pub name: String,
    /// Its state, as `RolloutState::as_str` names it.
    pub state: String,
    /// The plan's targets, as written.
    pub target: Vec<String>,
    /// Why it is paused or aborted, in words (`None`: running or completed).
    pub reason: Option<String>,
    /// The abort rule that tripped, as written (`None`: none did).
    pub tripped: Option<String>,
    /// When it started, in ms since the Unix epoch.
    pub started_at: Millis,
    /// When it completed or aborted, in ms since the Unix epoch (`None`:
    /// not yet).
    pub finished_at: Option<Millis>,
    /// Devices by state (every state, zeros too).
    pub counts: Vec<(String, usize)>,
    /// Devices a minute now (`None`: no limit).
    pub rate: Option<f64>,
    /// How many devices the canary is (0: none).
    pub canary: usize,
    /// Each device, in the order its target resolved to.
    pub devices: Vec<DeviceView>,
}

/// One device of a rollout, for `rollout show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// The device's id (through boxes below: the edge's).
    pub device: String,
    /// Its state, as `DeviceState::as_str` names it.
    pub state: String,
    /// Its command's id (`None`: not sent).
    pub command: Option<CommandId>,
    /// Its command's result text, or why the rollout judged it so (`None`:
    /// not ended).
    pub result: Option<String>,
    /// Its rollback's command id (`None`: none sent).
    pub rollback: Option<CommandId>,
    /// Its rollback's state: `sent` until it ends, then the command's end
    /// state (`None`: no rollback).
    pub rollback_state: Option<String>,
}

impl RolloutView {
    /// As `rollout show --json` prints it (the contract of issue 26).
    pub fn json(&self) -> serde_json::Value {
        let time = crate::engine::command::rfc3339;
        let counts: serde_json::Map<String, serde_json::Value> = self
            .counts
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect();
        let devices: Vec<serde_json::Value> = self
            .devices
            .iter()
            .map(|d| {
                serde_json::json!({"device": d.device, "state": d.state,
                    "command": d.command.map(|c| c.to_string()), "result": d.result,
                    "rollback": d.rollback.map(|c| c.to_string()), "rollback_state": d.rollback_state})
            })
            .collect();
        serde_json::json!({"id": self.id.to_string(), "name": self.name, "state": self.state,
            "target": self.target, "reason": self.reason, "tripped": self.tripped,
            "started_at": time(self.started_at), "finished_at": self.finished_at.map(time),
            "counts": counts, "rate_per_minute": self.rate, "canary": self.canary,
            "devices": devices})
    }

    /// How many devices are in `state`.
    pub fn count(&self, state: &str) -> usize {
        self.counts
            .iter()
            .find(|(k, _)| k == state)
            .map_or(0, |(_, n)| *n)
    }
}

impl From<&Rollout> for RolloutView {
    fn from(r: &Rollout) -> Self {
        let counts = r.counts();
        RolloutView {
            id: r.id,
            name: r.plan.name.clone(),
            state: r.state.as_str().into(),
            target: r.plan.target.clone(),
            reason: r.reason.clone(),
            tripped: r.tripped.clone(),
            started_at: r.started_at,
            finished_at: r.finished_at,
            counts: crate::engine::rollout::DeviceState::ALL
                .iter()
                .zip(counts)
                .map(|(s, n)| (s.as_str().to_string(), n))
                .collect(),
            rate: r.rate_now(),
            canary: r.canary,
            devices: r
                .devices
                .iter()
                .map(|d| DeviceView {
                    device: d.device.clone(),
                    state: d.state.as_str().into(),
                    command: d.command,
                    result: d.result.clone(),
                    rollback: d.rollback,
                    rollback_state: d
                        .rollback
                        .map(|_| d.rollback_end.map_or("sent", State::as_str).to_string()),
                })
                .collect(),
        }
    }
}

/// What an operator asks of one rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verb {
    /// Start nothing new until `Resume`; devices started go on.
    Pause,
    /// Go on after a pause or the canary (cutting a canary's wait short).
    Resume,
    /// Stop it: cancel what has not started, and send the plan's `on_abort`
    /// to the devices that took the change.
    Abort,
}

impl Verb {
    /// The audit log's name for it.
    pub fn audit_name(self) -> &'static str {
        match self {
            Verb::Pause => "rollout pause",
            Verb::Resume => "rollout resume",
            Verb::Abort => "rollout abort",
        }
    }
}

enum Req {
    Start(Box<Plan>, oneshot::Sender<Result<RolloutView, String>>),
    Show(CommandId, oneshot::Sender<Option<RolloutView>>),
    List(oneshot::Sender<Vec<RolloutView>>),
    Verb(
        CommandId,
        Verb,
        oneshot::Sender<Option<Result<RolloutView, String>>>,
    ),
    /// A rollout a hub handed down as command `id`: Ok(duplicate).
    StartAs {
        id: CommandId,
        plan: Box<Plan>,
        origin: String,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    Stop(oneshot::Sender<()>),
}

/// A handle to the rollout runner.
#[derive(Clone)]
pub struct RolloutRunner {
    tx: mpsc::UnboundedSender<Req>,
}

impl RolloutRunner {
    /// Load the rollouts the store holds and start running them.
    pub fn start(
        queue: QueueHandle,
        store: Store,
        retention: crate::engine::workflow::Retention,
        health: broadcast::Receiver<(String, crate::engine::command::HealthReport)>,
    ) -> Result<RolloutRunner, crate::shell::store::StoreError> {
        let rollouts = crate::shell::jobs::load(store.rollouts()?, "rollout", |r: &Rollout| r.id);
        let (tx, rx) = mpsc::unbounded_channel();
        let events = queue.subscribe();
        let sessions = queue.sessions_watch();
        let shell = Shell {
            queue,
            store,
            rollouts,
            by_cmd: HashMap::new(),
            online: BTreeSet::new(),
            retention,
            prune_at: Some(0),
            retry: Default::default(),
        };
        tokio::spawn(shell.run(rx, events, sessions, health));
        Ok(RolloutRunner { tx })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Req) -> Option<T> {
        crate::shell::jobs::ask(&self.tx, make).await
    }

    /// Start a rollout (durable on return).
    pub async fn start_rollout(&self, plan: Plan) -> Result<RolloutView, String> {
        self.ask(|r| Req::Start(Box::new(plan), r))
            .await
            .unwrap_or_else(|| Err("the rollout runner stopped".into()))
    }

    /// Start the rollout a hub handed down as command `id` (durable on
    /// return; a second hand-over of the same id is a duplicate, started
    /// once). Its end is recorded as the result of command `id`, which the
    /// outbox carries up. `None`: the runner has stopped.
    pub async fn start_as(
        &self,
        id: CommandId,
        plan: Plan,
        origin: String,
    ) -> Option<Result<bool, String>> {
        self.ask(|reply| Req::StartAs {
            id,
            plan: Box::new(plan),
            origin,
            reply,
        })
        .await
    }

    /// Rollout `id` as it is now (`None`: no such rollout, or the runner
    /// stopped).
    pub async fn show(&self, id: CommandId) -> Option<RolloutView> {
        self.ask(|r| Req::Show(id, r)).await.flatten()
    }

    /// Every rollout kept, newest first (none once the runner stopped).
    pub async fn list(&self) -> Vec<RolloutView> {
        self.ask(Req::List).await.unwrap_or_default()
    }

    /// Pause, resume or abort (durable on return). `None`: no such rollout.
    pub async fn verb(&self, id: CommandId, verb: Verb) -> Option<Result<RolloutView, String>> {
        self.ask(|r| Req::Verb(id, verb, r)).await.flatten()
    }

    /// Stop (the box is stopping): returns once the store is let go.
    pub async fn stop(&self) {
        self.ask(Req::Stop).await;
    }
}

struct Shell {
    queue: QueueHandle,
    store: Store,
    rollouts: BTreeMap<CommandId, Rollout>,
    /// Device command (or rollback) → its rollout.
    by_cmd: HashMap<CommandId, CommandId>,
    online: BTreeSet<String>,
    retention: crate::engine::workflow::Retention,
    /// When ended rollouts are next due for pruning (`Some(0)`: look now).
    prune_at: Option<Millis>,
    /// Rollouts with a send the box could not answer.
    retry: crate::shell::jobs::Retry,
}

impl Shell {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Req>,
        mut events: broadcast::Receiver<crate::shell::queue::LifecycleEvent>,
        mut sessions: watch::Receiver<u64>,
        mut health: broadcast::Receiver<(String, crate::engine::command::HealthReport)>,
    ) {
        let mut health_open = true;
        self.online = self.online_now().await;
        let ids: Vec<CommandId> = self.rollouts.keys().copied().collect();
        for id in ids {
            self.resume(id).await;
        }
        loop {
            let now = crate::now_millis();
            if self.prune_at.is_some_and(|t| t <= now) {
                self.prune(now);
            }
            let next = self
                .rollouts
                .values()
                .filter_map(Rollout::next_wake)
                .chain(self.prune_at)
                .chain(self.retry.next_wake())
                .min();
            let sleep = crate::shell::jobs::sleep_until(next);
            tokio::select! {
                req = rx.recv() => match req {
                    None => return,
                    Some(Req::Stop(done)) => {
                        drop(self);
                        let _ = done.send(());
                        return;
                    }
                    Some(r) => self.request(r).await,
                },
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        let evs = crate::shell::jobs::batch(ev, &mut events, BATCH);
                        self.events(evs).await;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let ids: Vec<CommandId> = self.rollouts.keys().copied().collect();
                        for id in ids {
                            self.resume(id).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                h = health.recv(), if health_open => match h {
                    Ok(first) => {
                        let reports = crate::shell::jobs::batch(first, &mut health, BATCH);
                        self.each(|r, now| {
                            let mut actions = Vec::new();
                            for (device, report) in &reports {
                                actions.extend(r.health(device, report, now));
                            }
                            actions
                        })
                        .await;
                    }
                    // A lost report leaves its device verifying until its
                    // time runs out: timed_out, never a false success.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "rollouts missed device health reports");
                    }
                    // No more reports (the link is gone): the arm sleeps.
                    Err(broadcast::error::RecvError::Closed) => health_open = false,
                },
                changed = sessions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Every connect and disconnect lands here: the device
                    // list is read only while a rollout can still start a
                    // device (a start reads it afresh).
                    if self.rollouts.values().any(|r| !r.state.ended()) {
                        self.online = self.online_now().await;
                        let online = &self.online.clone();
                        self.each(|r, now| {
                            if r.state.ended() {
                                Vec::new()
                            } else {
                                r.presence(online.clone(), now)
                            }
                        })
                        .await;
                    }
                }
                () = sleep => {
                    let again: Vec<_> = self
                        .retry
                        .due(crate::now_millis())
                        .into_iter()
                        .filter_map(|(id, step)| Some((id, vec![self.rollouts.get(&id)?.resend(&step)?])))
                        .collect();
                    if !again.is_empty() {
                        self.act(again, false).await;
                    }
                    self.each(Rollout::tick).await;
                }
            }
        }
    }

    /// The devices connected now (an empty set if the queue cannot say).
    async fn online_now(&self) -> BTreeSet<String> {
        match self.queue.devices().await {
            Ok(ds) => ds
                .into_iter()
                .filter(|d| d.online)
                .map(|d| d.record.id.to_string())
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list devices for the rollouts");
                BTreeSet::new()
            }
        }
    }

    /// Apply `f` to every rollout (an ended one may still time out devices
    /// that took it), and carry out what it asks.
    async fn each(&mut self, f: impl Fn(&mut Rollout, Millis) -> Vec<Action>) {
        let now = crate::now_millis();
        let mut batch = Vec::new();
        for (id, r) in self.rollouts.iter_mut() {
            // An ended rollout still times out devices that took it.
            let before = (r.state, r.counts());
            let actions = f(r, now);
            if !actions.is_empty() || before != (r.state, r.counts()) {
                batch.push((*id, actions));
            }
        }
        if !batch.is_empty() {
            self.act(batch, false).await;
        }
    }

    async fn events(&mut self, evs: Vec<crate::shell::queue::LifecycleEvent>) {
        let now = crate::now_millis();
        let mut batch: Vec<(CommandId, Vec<Action>)> = Vec::new();
        for ev in evs {
            let Some(&rid) = self.by_cmd.get(&ev.id) else {
                continue;
            };
            let Some(r) = self.rollouts.get_mut(&rid) else {
                continue;
            };
            if ev.state.is_final() {
                self.by_cmd.remove(&ev.id);
            }
            if let Some(actions) = feed(r, &ev, now) {
                batch.push((rid, actions));
            }
        }
        if !batch.is_empty() {
            self.act(batch, false).await;
        }
    }

    async fn request(&mut self, r: Req) {
        match r {
            Req::Start(plan, reply) => {
                let now = crate::now_millis();
                let id = CommandId::new(now, rand::random());
                let r = self.start(id, *plan, None).await;
                let _ = reply.send(r.map(|()| RolloutView::from(&self.rollouts[&id])));
            }
            Req::StartAs {
                id,
                plan,
                origin,
                reply,
            } => {
                let r = if self.rollouts.contains_key(&id) {
                    Ok(true)
                } else {
                    self.start(id, *plan, Some(origin)).await.map(|()| false)
                };
                let _ = reply.send(r);
            }
            Req::Show(id, reply) => {
                let _ = reply.send(self.rollouts.get(&id).map(RolloutView::from));
            }
            Req::List(reply) => {
                let _ = reply.send(
                    self.rollouts
                        .values()
                        .rev()
                        .map(RolloutView::from)
                        .collect(),
                );
            }
            Req::Verb(id, verb, reply) => {
                let now = crate::now_millis();
                let Some(r) = self.rollouts.get_mut(&id) else {
                    let _ = reply.send(None);
                    return;
                };
                let done = match verb {
                    Verb::Pause => r.pause(now),
                    Verb::Resume => r.resume(now),
                    Verb::Abort => r.abort(now),
                };
                match done {
                    Ok(actions) => {
                        self.act(vec![(id, actions)], true).await;
                        let _ =
                            reply.send(self.rollouts.get(&id).map(|r| Ok(RolloutView::from(r))));
                    }
                    Err(e) => {
                        let _ = reply.send(Some(Err(e.to_string())));
                    }
                }
            }
            Req::Stop(_) => unreachable!("handled in `run`"),
        }
    }

    /// Start rollout `id` (durable on return); `origin`: the hub that
    /// handed it down.
    async fn start(
        &mut self,
        id: CommandId,
        mut plan: Plan,
        origin: Option<String>,
    ) -> Result<(), String> {
        plan.check()?;
        // Pinned: one file throughout, whatever is added mid-rollout.
        if let Some(a) = &plan.artifact {
            let d = artifact_digest(&self.queue, a).map_err(|e| match origin {
                Some(_) => format!(
                    "{e}; stage it here first (`outpost artifact push EDGE {a}` on the hub)"
                ),
                None => e.to_string(),
            })?;
            plan.artifact = Some(d.to_string());
        }
        let (plan, edges) = match plan.split() {
            Some(split) => (split.hub, split.edges),
            None => (plan, Vec::new()),
        };
        let devices = if edges.is_empty() {
            self.resolve(&plan.target).await?
        } else {
            self.resolve_edges(&edges).await?
        };
        // Read now: presence is not followed while no rollout runs.
        self.online = self.online_now().await;
        let now = crate::now_millis();
        let (mut r, actions) = Rollout::start(id, plan, devices, self.online.clone(), now);
        r.edges = edges;
        r.origin = origin;
        self.rollouts.insert(id, r);
        self.act(vec![(id, actions)], true).await;
        Ok(())
    }

    /// The edges a plan through boxes below names: each enrolled here as a
    /// gateway and not revoked.
    async fn resolve_edges(&self, edges: &[(String, Plan)]) -> Result<Vec<String>, String> {
        let all = self.queue.devices().await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for (edge, _) in edges {
            match all.iter().find(|v| v.record.id.as_str() == edge) {
                Some(v) if v.record.revoked => return Err(format!("edge {edge} is revoked; take it out of the target")),
                Some(v) if v.record.tags.iter().any(|t| t == crate::engine::route::GATEWAY_TAG) => out.push(edge.clone()),
                Some(_) => return Err(format!("{edge} is a device, not a box below (enrolled with --gateway); target its devices as {edge} or tag:…")),
                None => return Err(format!("no box below named {edge} is enrolled here (`outpost devices` lists them)")),
            }
        }
        Ok(out)
    }

    async fn resolve(&self, targets: &[String]) -> Result<Vec<String>, String> {
        let all = self.queue.devices().await.map_err(|e| e.to_string())?;
        crate::engine::rollout::plan::resolve(targets, &all)
    }

    /// After a restart or a lag: re-attach each outstanding command, and
    /// feed in what happened to it while no one listened.
    async fn resume(&mut self, id: CommandId) {
        let Some(r) = self.rollouts.get_mut(&id) else {
            return;
        };
        r.online = self.online.clone();
        let (look, mut actions) = r.reattach();
        for c in &look {
            self.by_cmd.insert(*c, id);
        }
        // Time passed while the box was down: timeouts, the rate.
        if let Some(r) = self.rollouts.get_mut(&id) {
            actions.extend(r.tick(crate::now_millis()));
        }
        // `act` also reports an end a crash kept from the hub.
        self.act(vec![(id, actions)], false).await;
        self.check(look).await;
    }

    /// Look up these commands and feed in those that ended or were taken
    /// (one that ended before the runner listened: a restart, a fast
    /// device, a duplicate).
    async fn check(&mut self, cmds: Vec<CommandId>) {
        if cmds.is_empty() {
            return;
        }
        let mut set = tokio::task::JoinSet::new();
        for c in cmds {
            let q = self.queue.clone();
            set.spawn(async move { (c, q.show(c).await) });
        }
        let mut evs = Vec::new();
        while let Some(r) = set.join_next().await {
            let Ok((c, v)) = r else { continue };
            let ev = match v {
                Ok(v) => crate::shell::queue::LifecycleEvent {
                    id: c,
                    device: v.device.as_str().into(),
                    state: v.state,
                    at: v.finished_at.unwrap_or(v.created_at),
                    attempts: v.attempts,
                    outcome: v.outcome,
                    error: v.error,
                },
                // Past retention, or never taken (`workflow::UNKNOWN_TO_THE_BOX`).
                Err(QueueError::NotFound(_)) => crate::shell::queue::LifecycleEvent {
                    id: c,
                    device: "".into(),
                    state: State::Expired,
                    at: 0,
                    attempts: 0,
                    outcome: None,
                    error: Some(crate::engine::workflow::UNKNOWN_TO_THE_BOX.into()),
                },
                Err(e) => {
                    tracing::warn!(%c, error = %e, "cannot look up a rollout's command");
                    continue;
                }
            };
            if ev.state != State::Queued {
                evs.push(ev);
            }
        }
        if !evs.is_empty() {
            Box::pin(self.events(evs)).await;
        }
    }

    /// Carry out rollouts' actions. The rollouts are written first, as
    /// the engine left them (a started device `sent`, its id not yet
    /// recorded), so the record rides the same group commit as the sends
    /// and cancels that follow: no device ever holds a command its
    /// rollout's durable record does not know of (the simulation found
    /// that hole: a crash between the sends' commit and a record written
    /// after them left a start that never returned, or an abort, with
    /// devices changed behind it). A restart sends the recorded starts
    /// again under the same ids, which the queue answers as duplicates.
    /// Every send is handed to the queue before any is awaited (one group
    /// commit); the rollouts are written again with their commands' ids.
    /// Only an operator's request is flushed before it returns; the rest
    /// rides the queue's next group commit.
    async fn act(&mut self, mut batch: Vec<(CommandId, Vec<Action>)>, durable: bool) {
        let mut touched = Vec::new();
        let mut followups = Vec::new();
        while !batch.is_empty() {
            let mut sends = Vec::new();
            let mut cancels = Vec::new();
            let ahead: Vec<CommandId> = batch.iter().map(|(id, _)| *id).collect();
            self.persist(&ahead, false);
            for (id, actions) in batch.drain(..) {
                touched.push(id);
                let Some(r) = self.rollouts.get(&id) else {
                    continue;
                };
                for a in actions {
                    match a {
                        Action::Send {
                            step,
                            device,
                            rollback,
                        } => {
                            let Some((cmd, req, artifact)) = request(r, &step, &device, rollback)
                            else {
                                continue;
                            };
                            let fut = artifact_envelope(&self.queue, artifact).map(|signature| {
                                self.queue.send_as(cmd, SendRequest { signature, ..req })
                            });
                            sends.push((id, step, cmd, fut));
                        }
                        Action::Cancel(c) => cancels.push(self.queue.cancel_queued(c)),
                    }
                }
            }
            for c in cancels {
                let _ = c.await;
            }
            for (id, step, cmd, fut) in sends {
                let sent = match fut {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                };
                let Some(r) = self.rollouts.get_mut(&id) else {
                    continue;
                };
                match sent {
                    Ok(receipt) => {
                        r.sent(&step, cmd);
                        self.by_cmd.insert(receipt.id, id);
                        followups.push(receipt.id);
                        self.retry.answered();
                    }
                    Err(e) if e.is_unsure() => {
                        // Taken or not, the box cannot say: the device is
                        // sent under its derived id (an abort meanwhile
                        // cancels that id), and it is sent again under it.
                        tracing::warn!(rollout = %id, %step, error = %e, "the box could not say whether a rollout's command was queued; sending it again under the same id shortly");
                        r.sent(&step, cmd);
                        self.by_cmd.insert(cmd, id);
                        self.retry.add(id, &step, crate::now_millis());
                    }
                    Err(e) => {
                        r.sent(&step, cmd);
                        // Refused (revoked, full, no such artifact): that
                        // device failed, which the rules count.
                        tracing::warn!(rollout = %id, %step, error = %e, "a rollout's command could not be sent");
                        let more = r.ended(
                            cmd,
                            End {
                                state: State::Failed,
                                rejected: false,
                                result: Some(e.to_string()),
                            },
                            crate::now_millis(),
                        );
                        batch.push((id, more));
                    }
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        self.persist(&touched, durable);
        self.prune_at = Some(0);
        self.report(&touched).await;
        followups.retain(|c| self.by_cmd.contains_key(c));
        self.check(followups).await;
    }

    /// Record the end of each ended rollout a hub handed down as the
    /// result of its command, so the outbox carries it up (after the
    /// rollout's record: a crash in between reports again at restart, and
    /// the queue keeps the first).
    async fn report(&mut self, ids: &[CommandId]) {
        let mut done = Vec::new();
        for id in ids {
            let Some(r) = self.rollouts.get(id) else {
                continue;
            };
            if !r.state.ended() || r.reported || r.origin.is_none() {
                continue;
            }
            let view = RolloutView::from(r).json().to_string();
            let (state, outcome) = if r.state == RolloutState::Completed {
                (State::Succeeded, Outcome::Ok(view.into_bytes()))
            } else {
                (
                    State::Failed,
                    Outcome::Failed {
                        code: 1,
                        message: view,
                    },
                )
            };
            let rec = crate::shell::jobs::end_record(
                *id,
                crate::engine::rollout::ROLLOUT,
                r.origin.clone().unwrap_or_default(),
                state,
                outcome,
                (
                    r.started_at,
                    r.finished_at.unwrap_or_else(crate::now_millis),
                ),
            );
            match self.queue.record_finished(rec).await {
                Ok(()) => done.push(*id),
                Err(e) => {
                    tracing::warn!(rollout = %id, error = %e, "cannot record a handed-down rollout's end; retried at restart")
                }
            }
        }
        for id in &done {
            if let Some(r) = self.rollouts.get_mut(id) {
                r.reported = true;
            }
        }
        self.persist(&done, false);
    }

    fn persist(&self, ids: &[CommandId], durable: bool) {
        let records = crate::shell::jobs::encode(&self.rollouts, ids, "rollout");
        if let Err(e) = self.store.put_rollouts(&records, durable) {
            tracing::error!(error = %e, "cannot write rollouts");
        }
    }

    /// Forget ended rollouts the retention no longer keeps (one still
    /// waiting on a device's end or a rollback stays).
    fn prune(&mut self, now: Millis) {
        let ended = self
            .rollouts
            .values()
            .filter(|r| r.state.ended() && r.outstanding().is_empty())
            .filter(|r| r.origin.is_none() || r.reported)
            .map(|r| (r.finished_at.unwrap_or(r.started_at), r.id))
            .collect();
        let (gone, next) = self.retention.due(ended, now);
        self.prune_at = next;
        if gone.is_empty() {
            return;
        }
        for id in &gone {
            self.rollouts.remove(id);
        }
        let gone_set: std::collections::HashSet<&CommandId> = gone.iter().collect();
        self.by_cmd.retain(|_, r| !gone_set.contains(r));
        if let Err(e) = self.store.delete_rollouts(&gone) {
            tracing::warn!(error = %e, "cannot delete ended rollouts' records");
        }
    }
}

/// Whether a rollout view is over (for `--wait`).
pub fn is_over(v: &RolloutView) -> bool {
    v.state == RolloutState::Completed.as_str() || v.state == RolloutState::Aborted.as_str()
}

//! Taking the hub's frames about commands: a `Forward` queued here (its
//! artifact staged first, or handed to a job runner), a `Cancel` applied.
//! Each take runs as a task of the session, in the command's lane
//! ([`super::lanes`]): frames about one command are taken one at a time.

use super::STAGE;
use crate::device;
use crate::engine::command::{CommandId, Outcome};
use crate::engine::uplink::{request, FROM_UPSTREAM};
use crate::proto::Forward;
use crate::shell::jobs::Runners;
use crate::shell::queue::{QueueError, QueueHandle};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A frame of the hub about one command, waiting in its lane.
pub(super) enum FromHub {
    Forward(Box<Forward>),
    Cancel(CommandId),
}

impl FromHub {
    /// The command the frame is about.
    pub(super) fn id(&self) -> CommandId {
        match self {
            FromHub::Forward(f) => f.id,
            FromHub::Cancel(id) => *id,
        }
    }
}

/// The takes of one session under way, each for the command it is about.
#[derive(Default)]
pub(super) struct Takes {
    set: JoinSet<Taken>,
    ids: HashMap<tokio::task::Id, CommandId>,
}

impl Takes {
    fn spawn(&mut self, id: CommandId, take: impl Future<Output = Taken> + Send + 'static) {
        let task = self.set.spawn(take);
        self.ids.insert(task.id(), id);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next take to end: its command, and how it ended (`None`: it
    /// panicked; its lane is freed all the same, and the hub hands the
    /// command again on the next link).
    pub(super) async fn next(&mut self) -> Option<(CommandId, Option<Taken>)> {
        loop {
            let (task, r) = match self.set.join_next_with_id().await? {
                Ok((task, r)) => (task, Some(r)),
                Err(e) => (e.id(), None),
            };
            if let Some(id) = self.ids.remove(&task) {
                return Some((id, r));
            }
        }
    }
}

/// What a session takes frames with.
pub(super) struct Intake {
    pub queue: QueueHandle,
    pub jobs: Runners,
    pub staging: Staging,
    pub conn: quinn::Connection,
    pub up: device::Sender,
}

impl Intake {
    /// Start taking `m` as a task of the session.
    pub(super) fn take(&self, m: FromHub, takes: &mut Takes) {
        let id = m.id();
        match m {
            FromHub::Cancel(id) => {
                let (q, jobs) = (self.queue.clone(), self.jobs.clone());
                takes.spawn(id, async move { cancel(&q, &jobs, id).await })
            }
            FromHub::Forward(f) if Runners::is_job(&f.target) || f.target == STAGE => {
                // A whole job (a workflow, a rollout) for this box to run,
                // durable in its runner before it is accepted, its end coming
                // back up as this command's result; or `artifact push`. A
                // rollout's artifact is staged here first, so its devices
                // fetch from this box. Neither runs again once it has an
                // end here: the end a cancel left for a command this box
                // had not got yet stops its late forward.
                let lacks = self.staging.lacks(&self.queue, &f);
                let (q, c, st, up) = self.parts();
                let jobs = self.jobs.clone();
                takes.spawn(id, async move {
                    let ended = q.show_queued(id).await.is_ok_and(|v| v.state.is_final());
                    if ended {
                        return Taken::Queued(Ok(true));
                    }
                    if f.target == STAGE {
                        return st.stage_ahead(&q, &c, up, *f).await;
                    }
                    if let Some(artifact) = lacks {
                        if let Err(t) = st.staged(&q, &c, up, artifact, id).await {
                            return t;
                        }
                    }
                    let origin = format!("{FROM_UPSTREAM}{}", f.origin);
                    Taken::Queued(jobs.hand_down(&f.target, id, f.payload, origin).await)
                })
            }
            FromHub::Forward(f) => match self.staging.lacks(&self.queue, &f) {
                // Staged from the hub first, off the session's loop, then
                // queued: the edge's devices never get a command whose file
                // is not whole and verified here.
                Some(artifact) => {
                    let (q, c, st, up) = self.parts();
                    takes.spawn(id, async move {
                        st.stage_then_queue(&q, &c, up, artifact, *f).await
                    })
                }
                None => {
                    // Handed to the writer now, in arrival order.
                    let fut = self.queue.send_as(id, request(*f));
                    takes.spawn(
                        id,
                        async move { Taken::Queued(fut.await.map(|r| r.duplicate)) },
                    )
                }
            },
        }
    }

    fn parts(&self) -> (QueueHandle, quinn::Connection, Staging, device::Sender) {
        (
            self.queue.clone(),
            self.conn.clone(),
            self.staging.clone(),
            self.up.clone(),
        )
    }
}

/// The hub's cancel of `id`: the job a runner has, else the command in
/// the queue, or the end that stops a late forward of a command this box
/// has not got yet (`QueueCore::cancel_from_hub`). A job id is never a
/// queued command's, so the order of the two looks does not matter.
async fn cancel(queue: &QueueHandle, jobs: &Runners, id: CommandId) -> Taken {
    if let Some(what) = jobs.cancel(id).await {
        tracing::info!(%id, "{what} cancelled by the hub");
        return Taken::Cancel;
    }
    match queue.cancel_from_hub(id).await {
        Ok(v) if v.device.is_empty() => {
            tracing::info!(%id, "cancelled by the hub before it came here")
        }
        Ok(_) => tracing::info!(%id, "cancelled by the hub"),
        Err(e) => tracing::info!(%id, error = %e, "the hub's cancel found nothing to cancel"),
    }
    Taken::Cancel
}

/// How the intake of a forwarded command ended.
pub(super) enum Taken {
    /// Queued here (`true`: a duplicate).
    Queued(Result<bool, QueueError>),
    /// Ended before it was queued (its artifact could not be staged, or
    /// the hub cancelled it meanwhile).
    Ended(Outcome),
    /// The uplink went away mid-staging: not answered, so the hub hands
    /// it again on the next link and the staging resumes.
    Unanswered,
    /// A cancel was applied: nothing to answer (an end goes up in the
    /// outbox).
    Cancel,
}

/// Forwarded commands whose artifact is being staged from the hub.
#[derive(Clone, Default)]
pub(super) struct Staging {
    /// Command id → cancelled by the hub meanwhile.
    commands: Arc<std::sync::Mutex<HashMap<crate::engine::command::CommandId, bool>>>,
    /// One staging per artifact at a time: a second command naming it
    /// waits for the first, then finds it held.
    artifacts: Arc<
        tokio::sync::Mutex<HashMap<crate::engine::artifact::Digest, Arc<tokio::sync::Mutex<()>>>>,
    >,
    /// `--uplink-rate`, shared by every staging.
    budget: Option<Arc<crate::shell::artifact::stage::UplinkBudget>>,
}

impl Staging {
    /// Stagings sharing `--uplink-rate` (bytes/s), when it is set.
    pub(super) fn new(rate: Option<u64>) -> Staging {
        Staging {
            budget: rate.map(|r| Arc::new(crate::shell::artifact::stage::UplinkBudget::new(r))),
            ..Staging::default()
        }
    }

    /// The artifact `f` names that this box does not hold yet.
    fn lacks(&self, queue: &QueueHandle, f: &Forward) -> Option<crate::engine::artifact::Digest> {
        let d = crate::engine::trust::envelope::artifact(f.signature.as_deref()?)
            .ok()
            .flatten()
            .map(crate::engine::artifact::Digest)?;
        match queue.shelf().manifest_bytes(&d) {
            Ok(Some(_)) => None,
            _ => Some(d),
        }
    }

    /// Mark `id` cancelled if it is staging (then `true`).
    pub(super) fn cancel(&self, id: crate::engine::command::CommandId) -> bool {
        match self.commands.lock().unwrap().get_mut(&id) {
            Some(c) => {
                *c = true;
                true
            }
            None => false,
        }
    }

    async fn stage_then_queue(
        &self,
        queue: &QueueHandle,
        conn: &quinn::Connection,
        up: device::Sender,
        artifact: crate::engine::artifact::Digest,
        f: Forward,
    ) -> Taken {
        match self.staged(queue, conn, up, artifact, f.id).await {
            Ok(_) => Taken::Queued(queue.send_as(f.id, request(f)).await.map(|r| r.duplicate)),
            Err(t) => t,
        }
    }

    /// `artifact push`: stage the artifact `f` names, then record the end
    /// as `f`'s result (durable, in the outbox) before it is accepted; a
    /// second hand-over after a crash finds it staged and its result kept.
    async fn stage_ahead(
        &self,
        queue: &QueueHandle,
        conn: &quinn::Connection,
        up: device::Sender,
        f: Forward,
    ) -> Taken {
        let named = f
            .signature
            .as_deref()
            .and_then(|e| crate::engine::trust::envelope::artifact(e).ok().flatten());
        let Some(artifact) = named.map(crate::engine::artifact::Digest) else {
            return Taken::Ended(Outcome::Rejected {
                reason: format!("`{STAGE}` stages an artifact, and this command names none: use `outpost artifact push EDGE ARTIFACT`"),
            });
        };
        let now = crate::now_millis();
        let s = match self.staged(queue, conn, up, artifact, f.id).await {
            Ok(s) => s,
            Err(t) => return t,
        };
        let outcome = Outcome::Ok(
            format!(
                "staged {artifact}: {} bytes fetched, {} already here",
                s.fetched_bytes, s.reused_bytes
            )
            .into_bytes(),
        );
        let rec = crate::engine::journal::ResultRecord {
            id: f.id,
            gen: 0,
            device: STAGE.into(),
            target: STAGE.into(),
            priority: f.priority,
            state: crate::State::Succeeded,
            outcome: Some(outcome),
            error: None,
            attempts: 1,
            max_attempts: 1,
            created_at: now,
            finished_at: crate::now_millis(),
            origin: format!("{FROM_UPSTREAM}{}", f.origin),
            key: None,
            command: None,
            children: Vec::new(),
        };
        Taken::Queued(queue.record_finished(rec).await.map(|()| false))
    }

    /// Stage `artifact` for command `id`; `Err` is how the command ends
    /// instead (or that it is not answered, the link having gone).
    async fn staged(
        &self,
        queue: &QueueHandle,
        conn: &quinn::Connection,
        up: device::Sender,
        artifact: crate::engine::artifact::Digest,
        id: crate::engine::command::CommandId,
    ) -> Result<crate::shell::artifact::stage::Staged, Taken> {
        self.commands.lock().unwrap().insert(id, false);
        let lock = self
            .artifacts
            .lock()
            .await
            .entry(artifact)
            .or_default()
            .clone();
        let staged = {
            let _one = lock.lock().await;
            // Progress goes up under the command's id, as a device's does
            // (`show ID` on the hub: "fetching fw@2.1: 37 % …").
            let (tx, rx) = watch::channel((0, 0));
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let reporter = tokio::spawn(crate::device::artifacts::forward_progress(
                rx, up, id, stopped,
            ));
            let r = crate::shell::artifact::stage::stage(
                conn,
                artifact,
                queue.shelf(),
                Some(&tx),
                self.budget.as_deref(),
            )
            .await;
            let _ = stop.send(());
            let _ = reporter.await;
            r
        };
        let cancelled = self.commands.lock().unwrap().remove(&id).unwrap_or(false);
        match staged {
            Err(e) if e.is_link() => {
                tracing::info!(%id, %artifact, error = %e, "the uplink dropped while staging; it resumes on the next link");
                Err(Taken::Unanswered)
            }
            Err(e) => {
                tracing::warn!(%id, %artifact, error = %e, "staging the artifact failed");
                Err(Taken::Ended(Outcome::Rejected {
                    reason: format!("the edge could not stage artifact {artifact}: {e}"),
                }))
            }
            Ok(_) if cancelled => Err(Taken::Ended(Outcome::Rejected {
                reason: "cancelled by the hub before its artifact was staged".into(),
            })),
            Ok(s) => {
                tracing::info!(%id, %artifact, fetched = s.fetched_bytes, reused = s.reused_bytes, "artifact staged from the hub");
                Ok(s)
            }
        }
    }
}

//! A workflow's run, sans IO: the steps' states, what to send or cancel
//! next, and how a step's command ended, judged from the queue's view of
//! it. The runner (`shell::workflow`) and the simulation both drive it.

use super::*;
use crate::engine::command::Outcome;
use crate::engine::queue::{CommandView, LifecycleEvent, SendRequest};

/// A workflow's state (`workflow show`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Steps are out or still to start (compensation included).
    Running,
    /// Every main step ended and none failed or was cancelled.
    Succeeded,
    /// A main step failed or was cancelled; the `on_failure` steps, if any,
    /// have run.
    Failed,
    /// Cancelled by an operator (`workflow cancel`) or by the hub that
    /// handed it down.
    Cancelled,
    /// The workflow's `timeout` passed before it ended.
    TimedOut,
}

impl RunState {
    /// Its name in `workflow show` and the JSON (`timed_out`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::TimedOut => "timed_out",
        }
    }
}

/// A step's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepState {
    /// Waiting for what it needs.
    Pending,
    /// Its command is out.
    Running,
    /// Its command succeeded (a group step: its `min_success` was met).
    Succeeded,
    /// Its command ended otherwise (failed, dead, expired), or a group
    /// step's quorum was not met.
    Failed,
    /// Its `when` was false, or what it needs failed.
    Skipped,
    /// The run stopped (cancel, timeout) before it ended, or its command
    /// was cancelled.
    Cancelled,
}

impl StepState {
    /// Its name in `workflow show` and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::Cancelled => "cancelled",
        }
    }

    fn ended(self) -> bool {
        !matches!(self, StepState::Pending | StepState::Running)
    }
}

/// One step of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRun {
    /// The step's name, as in the workflow (the same index in both lists).
    pub name: String,
    /// Where the step is.
    pub state: StepState,
    /// Its command's id, once the shell has sent it (`None` before; a step
    /// running without one is sent again after a restart).
    pub command: Option<crate::CommandId>,
    /// The command's end state and result text (or error), once ended.
    pub end: Option<crate::State>,
    /// The command's result text, its failure's message or the box's error
    /// (a group step: a line per device); `None` until it ended.
    pub result: Option<String>,
}

/// How a step's command ended, as the shell reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    /// The command's final state.
    pub state: crate::State,
    /// The result bytes (`Ok`), or the failure text.
    pub result: Option<Vec<u8>>,
    /// For a broadcast: (children succeeded, children in all).
    pub children: Option<(u32, u32)>,
}

/// What the engine asks the shell to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send this step's command, under the id derived from the run and the
    /// step (`step_command_id`), so a send repeated after a crash is the
    /// same command.
    Send {
        /// The step's name.
        step: String,
        /// The step's target, as written.
        target: String,
        /// The step's payload (empty for a file the shell has not read).
        payload: Vec<u8>,
        /// Boxed: the variant is large beside `Cancel`.
        opts: Box<crate::SendOptions>,
        /// The step's artifact, as the run holds it.
        artifact: Option<String>,
    },
    /// Cancel this step command (the run stopped while it was out).
    Cancel(crate::CommandId),
}

/// One run of a workflow: plain data, persisted whole after each change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The run's id: a new ULID at its start, or the hub's command id for
    /// a run handed down; its steps' command ids derive from it.
    pub id: crate::CommandId,
    /// The workflow it runs, artifacts pinned to digests at its start.
    pub spec: Workflow,
    /// Where the run is.
    pub state: RunState,
    /// When it started, in ms since the Unix epoch.
    pub started_at: crate::Millis,
    /// When it ended, in ms since the Unix epoch (`None`: running).
    pub finished_at: Option<crate::Millis>,
    /// When the workflow's `timeout` ends it, in ms since the Unix epoch
    /// (`None`: no timeout); not enforced once compensation has begun.
    pub deadline: Option<crate::Millis>,
    /// Each step's progress, in the order of `spec.steps`.
    pub steps: Vec<StepRun>,
    /// The main steps ended badly: the `on_failure` steps run.
    pub compensating: bool,
    /// What the run ends as once compensation is done.
    pending_end: Option<RunState>,
    /// Who handed the run down (`upstream/...`): a hub, which sent it as
    /// command `id` and learns its end as that command's result.
    #[serde(default)]
    pub origin: Option<String>,
    /// That end is recorded (so it is not recorded again).
    #[serde(default)]
    pub reported: bool,
}

impl Run {
    /// After a restart: the step commands to look up (sent, their end not
    /// heard) and the sends to repeat (a step recorded running before its
    /// command's id was: the same derived id again, which the queue answers
    /// as a duplicate if it has it). A step a stop cancelled while its command
    /// was out is looked up too, in a run of any state: its device may have
    /// run it first, and a crash may have lost what the runner heard of it.
    pub fn reattach(&self) -> (Vec<CommandId>, Vec<Action>) {
        let run = self;
        let (mut look, mut resend) = (Vec::new(), Vec::new());
        for (i, st) in run.steps.iter().enumerate() {
            if st.state == StepState::Cancelled && st.end.is_none() {
                look.extend(st.command);
            }
            if st.state != StepState::Running || run.state != RunState::Running {
                continue;
            }
            match st.command {
                Some(c) => look.push(c),
                None => resend.push(run.send_of(i)),
            }
        }
        (look, resend)
    }

    /// Step `step`'s send again, while the run still waits on it: one the box
    /// could not say it took (`QueueError::is_unsure`), repeated under the
    /// same id. `None` once it ended or the run stopped (a cancel cancels it
    /// by its id instead).
    pub fn resend(&self, step: &str) -> Option<Action> {
        let run = self;
        if run.state != RunState::Running {
            return None;
        }
        let i = run.steps.iter().position(|s| s.name == step)?;
        (run.steps[i].state == StepState::Running).then(|| run.send_of(i))
    }

    /// Start a run (payload files already read into the spec).
    pub fn start(id: crate::CommandId, spec: Workflow, now: crate::Millis) -> (Run, Vec<Action>) {
        let steps = spec
            .steps
            .iter()
            .map(|s| StepRun {
                name: s.name.clone(),
                state: StepState::Pending,
                command: None,
                end: None,
                result: None,
            })
            .collect();
        let mut run = Run {
            id,
            deadline: spec
                .timeout
                .map(|t| now.saturating_add(t.as_millis() as u64)),
            spec,
            state: RunState::Running,
            started_at: now,
            finished_at: None,
            steps,
            compensating: false,
            pending_end: None,
            origin: None,
            reported: false,
        };
        let actions = run.advance(now);
        (run, actions)
    }

    fn idx(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    fn is_comp(&self, name: &str) -> bool {
        self.spec.on_failure.iter().any(|n| n == name)
    }

    /// The shell sent step `step` as command `id`.
    pub fn sent(&mut self, step: &str, id: crate::CommandId) {
        if let Some(i) = self.idx(step) {
            self.steps[i].command = Some(id);
        }
    }

    /// The step whose command is `id`, if it is this run's.
    pub fn step_of(&self, id: crate::CommandId) -> Option<&str> {
        self.steps
            .iter()
            .find(|s| s.command == Some(id))
            .map(|s| s.name.as_str())
    }

    /// A step's command ended.
    pub fn step_ended(
        &mut self,
        id: crate::CommandId,
        e: Ended,
        now: crate::Millis,
    ) -> Vec<Action> {
        let Some(i) = self.steps.iter().position(|s| s.command == Some(id)) else {
            return Vec::new();
        };
        match self.steps[i].state {
            StepState::Running => {}
            // Cancelled by a stop while its command was out: a device that
            // had it first ran it, and its answer says what it did (the
            // stop goes on either way).
            StepState::Cancelled
                if matches!(
                    e.state,
                    crate::State::Succeeded | crate::State::Failed | crate::State::Dead
                ) => {}
            // The cancel won: its end is known (a restart need not look).
            StepState::Cancelled => {
                self.steps[i].end.get_or_insert(e.state);
                return Vec::new();
            }
            _ => return Vec::new(),
        }
        let spec = &self.spec.steps[i];
        let ok = match (spec.min_success, e.children) {
            (Some(q), Some((succ, total))) => match q {
                MinSuccess::Percent(p) => total > 0 && succ * 100 >= p * total,
                MinSuccess::Count(n) => succ >= n,
            },
            _ => e.state == crate::State::Succeeded,
        };
        let st = &mut self.steps[i];
        st.state = if ok {
            StepState::Succeeded
        } else if e.state == crate::State::Cancelled {
            StepState::Cancelled
        } else {
            StepState::Failed
        };
        st.end = Some(e.state);
        st.result = e.result.map(|b| String::from_utf8_lossy(&b).into_owned());
        self.advance(now)
    }

    /// The send of step `i`: the one the engine makes when the step
    /// starts, and the one a shell repeats under the same id
    /// (`Run::reattach`, `Run::resend`).
    pub fn send_of(&self, i: usize) -> Action {
        let spec = &self.spec.steps[i];
        Action::Send {
            step: spec.name.clone(),
            target: spec.target.clone(),
            payload: match &spec.payload {
                Payload::Inline(b) => b.clone(),
                // Read at start by the shell; an unread file is empty.
                Payload::File(_) => Vec::new(),
            },
            opts: Box::new(crate::SendOptions {
                priority: spec.priority,
                ttl_ms: spec.ttl.map(|t| t.as_millis() as u64),
                max_attempts: spec.max_attempts,
                ..Default::default()
            }),
            artifact: spec.artifact.clone(),
        }
    }

    /// Let time pass: the workflow timeout.
    pub fn tick(&mut self, now: crate::Millis) -> Vec<Action> {
        if self.state != RunState::Running || self.compensating {
            return Vec::new();
        }
        match self.deadline {
            Some(d) if now >= d => self.stop(RunState::TimedOut, true, now),
            _ => Vec::new(),
        }
    }

    /// Cancel the run: what runs is cancelled, what waits never starts;
    /// the `on_failure` steps run if `compensate`.
    pub fn cancel(&mut self, compensate: bool, now: crate::Millis) -> Vec<Action> {
        if self.state != RunState::Running {
            return Vec::new();
        }
        self.stop(RunState::Cancelled, compensate, now)
    }

    fn stop(&mut self, end: RunState, compensate: bool, now: crate::Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        for st in &mut self.steps {
            match st.state {
                StepState::Running => {
                    if let Some(c) = st.command {
                        actions.push(Action::Cancel(c));
                    }
                    st.state = StepState::Cancelled;
                }
                StepState::Pending if !self.spec.on_failure.contains(&st.name) => {
                    st.state = StepState::Cancelled;
                }
                _ => {}
            }
        }
        if compensate && !self.spec.on_failure.is_empty() {
            self.compensating = true;
            self.pending_end = Some(end);
            actions.extend(self.advance(now));
        } else {
            self.finish(end, now);
        }
        actions
    }

    fn finish(&mut self, end: RunState, now: crate::Millis) {
        self.state = end;
        self.finished_at = Some(now);
        // Compensation steps that never ran are skipped.
        for st in &mut self.steps {
            if st.state == StepState::Pending {
                st.state = StepState::Skipped;
            }
        }
    }

    /// Start what is ready; settle the run when nothing more can happen.
    fn advance(&mut self, now: crate::Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state != RunState::Running {
            return actions;
        }
        loop {
            let mut progressed = false;
            for i in 0..self.steps.len() {
                if self.steps[i].state != StepState::Pending {
                    continue;
                }
                let spec = self.spec.steps[i].clone();
                // Compensation steps wait for compensation; main steps do
                // not start once it has begun.
                if self.is_comp(&spec.name) != self.compensating {
                    continue;
                }
                let needs: Vec<StepState> = spec
                    .needs
                    .iter()
                    .filter_map(|n| self.idx(n).map(|j| self.steps[j].state))
                    .collect();
                if !needs.iter().all(|s| s.ended()) {
                    continue;
                }
                progressed = true;
                let blocked = needs
                    .iter()
                    .any(|s| matches!(s, StepState::Failed | StepState::Cancelled));
                let go = match &spec.when {
                    Some(c) => self.holds(c),
                    None => !blocked,
                };
                if !go {
                    self.steps[i].state = StepState::Skipped;
                    continue;
                }
                self.steps[i].state = StepState::Running;
                actions.push(self.send_of(i));
            }
            if !progressed {
                break;
            }
        }
        let group: Vec<&StepRun> = self
            .steps
            .iter()
            .filter(|s| self.is_comp(&s.name) == self.compensating)
            .collect();
        if group.iter().all(|s| s.state.ended()) {
            if self.compensating {
                let end = self.pending_end.unwrap_or(RunState::Failed);
                self.finish(end, now);
            } else {
                let failed = group
                    .iter()
                    .any(|s| matches!(s.state, StepState::Failed | StepState::Cancelled));
                if failed && !self.spec.on_failure.is_empty() {
                    self.compensating = true;
                    self.pending_end = Some(RunState::Failed);
                    actions.extend(self.advance(now));
                } else {
                    self.finish(
                        if failed {
                            RunState::Failed
                        } else {
                            RunState::Succeeded
                        },
                        now,
                    );
                }
            }
        }
        actions
    }

    /// Whether a `when` condition holds, on the step it names (ended).
    fn holds(&self, c: &Condition) -> bool {
        let Some(j) = self.idx(&c.step) else {
            return false;
        };
        let st = &self.steps[j];
        let state_ok = match c.state {
            StateMatch::Succeeded => st.state == StepState::Succeeded,
            StateMatch::Failed => st.state == StepState::Failed,
            StateMatch::Any => st.state.ended(),
        };
        if !state_ok {
            return false;
        }
        let text = st.result.as_deref().unwrap_or("");
        c.result.as_ref().is_none_or(|r| r.matches(text))
    }
}

impl ResultMatch {
    /// Whether a command's result text meets this condition (a result
    /// that is not JSON fails a JSON condition).
    pub fn matches(&self, text: &str) -> bool {
        match self {
            ResultMatch::Equals(v) => text == v,
            ResultMatch::Contains(v) => text.contains(v.as_str()),
            ResultMatch::Regex(r) => regex_lite::Regex::new(r).is_ok_and(|re| re.is_match(text)),
            ResultMatch::Json { pointer, equals } => {
                serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v.pointer(pointer).cloned())
                    .is_some_and(|v| &v == equals)
            }
        }
    }
}

/// How long finished runs are kept for `workflow show` and `list`: the
/// newest `max_runs` that ended within `max_age_ms`. Without a bound every
/// run stayed in the store and in memory for ever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// How many finished runs (or rollouts) are kept at most, the newest
    /// first (default 1,000).
    pub max_runs: usize,
    /// How long after its end one is kept, in ms (default 7 days; `serve`
    /// uses the results' `results_max_age`).
    pub max_age_ms: crate::Millis,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_runs: 1_000,
            max_age_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl Retention {
    /// Which finished runs to delete now, and when the next one will be due
    /// (so the shell sleeps until then, never polls). A running run is never
    /// pruned, nor one whose end a hub has not been told yet.
    pub fn prune<'a>(
        &self,
        runs: impl IntoIterator<Item = &'a Run>,
        now: crate::Millis,
    ) -> (Vec<crate::CommandId>, Option<crate::Millis>) {
        let ended = runs
            .into_iter()
            .filter(|r| r.state != RunState::Running && (r.origin.is_none() || r.reported))
            .map(|r| (r.finished_at.unwrap_or(r.started_at), r.id))
            .collect();
        self.due(ended, now)
    }

    /// The same over anything kept until it ends (rollouts too): `ended`
    /// holds (when it ended, its id) for each one that may go.
    pub fn due(
        &self,
        mut ended: Vec<(crate::Millis, crate::CommandId)>,
        now: crate::Millis,
    ) -> (Vec<crate::CommandId>, Option<crate::Millis>) {
        // Newest first: the count keeps those.
        ended.sort_unstable_by(|a, b| b.cmp(a));
        let mut gone = Vec::new();
        let mut next = None;
        for (i, &(at, id)) in ended.iter().enumerate() {
            let due = at.saturating_add(self.max_age_ms);
            if i >= self.max_runs || due <= now {
                gone.push(id);
            } else {
                next = Some(next.map_or(due, |n: crate::Millis| n.min(due)));
            }
        }
        (gone, next)
    }
}

/// A send of run `id`'s as the queue takes it: (step, its derived command
/// id, the request unsigned, the artifact whose envelope signs it).
/// `None` for a cancel.
pub fn request(
    id: CommandId,
    a: Action,
) -> Option<(String, CommandId, SendRequest, Option<String>)> {
    let Action::Send {
        step,
        target,
        payload,
        opts,
        artifact,
    } = a
    else {
        return None;
    };
    let cmd = step_command_id(id, &step);
    let req = SendRequest {
        target,
        payload,
        opts: *opts,
        origin: "workflow".into(),
        signature: None,
    };
    Some((step, cmd, req, artifact))
}

/// A final lifecycle event's end, when it says all there is to say (a
/// step on one device); a group step's result gathers its children, so it
/// is looked up (`None`).
pub fn event_end(run: &Run, ev: &LifecycleEvent) -> Option<Ended> {
    let step = run.step_of(ev.id)?;
    let spec = run.spec.steps.iter().find(|s| s.name == step)?;
    if !matches!(
        crate::engine::route::Target::parse(&spec.target),
        Ok(crate::engine::route::Target::Device(_))
    ) {
        return None;
    }
    Some(Ended {
        state: ev.state,
        result: text(ev.outcome.as_ref(), ev.error.as_ref()),
        children: None,
    })
}

/// A command's end as text: its result, its failure's message, its
/// refusal's reason, or the box's error when it has no outcome.
pub fn text(outcome: Option<&Outcome>, error: Option<&String>) -> Option<Vec<u8>> {
    match outcome {
        Some(Outcome::Ok(b)) => Some(b.clone()),
        Some(Outcome::Failed { message, .. }) => Some(message.clone().into_bytes()),
        Some(Outcome::Rejected { reason }) => Some(reason.clone().into_bytes()),
        None => error.cloned().map(String::into_bytes),
    }
}

/// How a step's command ended, from the box's view of it (`None`: not
/// yet). A broadcast's result is each child's (`child_results`, in the
/// order of `v.children`), one line per device, and its children that
/// succeeded are counted for the step's `min_success`. The runner and the
/// simulation both call this.
pub fn ended_from(v: &CommandView, child_results: &[Vec<u8>]) -> Option<Ended> {
    if !v.state.is_final() {
        return None;
    }
    let result = if v.children.is_empty() {
        text(v.outcome.as_ref(), v.error.as_ref())
    } else {
        let mut out = Vec::new();
        for (i, c) in v.children.iter().enumerate() {
            out.extend_from_slice(c.device.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(child_results.get(i).map_or(&[][..], Vec::as_slice));
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
    Some(Ended {
        state: v.state,
        result,
        children,
    })
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

/// A job's command the box does not know: what its step or device ends
/// with (workflows and rollouts alike). Never sent again (a command pruned
/// after it ran would run twice).
pub const UNKNOWN_TO_THE_BOX: &str = "the box has no record of this command: it ended longer ago than the results' retention, or a send the box could not answer never reached its disk";

//! Rollouts (issue 26): one change to many devices in stages, at a rate,
//! stopping itself when failures rise. This module is the sans-IO engine:
//! a [`Rollout`] takes events (a device came online, took its command, its
//! command ended, time passed, an operator paused it) and returns
//! [`Action`]s (send this device its command, cancel that one). The shell
//! in `shell::rollout` does the IO; the tests below run it under a fake clock.
//!
//! Why not a workflow: a workflow is a fixed graph of steps known before it
//! starts; a rollout's steps are its devices, started one by one as the
//! rate, the canary and the devices' presence allow, and ended by rules
//! over counts. What they share is taken from the workflow engine rather
//! than written twice: the result conditions ([`ResultMatch`]), the
//! command ids derived from (run, step) so a send repeated after a crash
//! is the same command, the store's run records, and the shell's way of
//! learning how a command ended.
//!
//! The plan's semantics, which `rollout show` and the README explain:
//! - Devices are the target as resolved when the rollout starts, in order.
//!   Only online devices are started; an offline one is `waiting`, never
//!   counted as failed, and starts when it comes back, at the current rate
//!   (unless the rollout has ended: then it is cancelled).
//! - The canary: the first N devices to start. When all of them have
//!   finished, the abort rules are checked with the canary as the sample
//!   (a rule's minimum is lowered to the canary's size), then the rollout
//!   waits (`canary.wait`) or pauses until `rollout resume`.
//! - The rate spaces starts at least 60 s / R apart, so no minute ever
//!   holds more than R starts. An exponential rate multiplies R by a factor
//!   after every K successes, up to a cap.
//! - Abort rules: once at least `min` devices have finished, a rule trips
//!   when its kind of failure reaches `percent` of the finished. Then
//!   nothing new starts, what has not started is cancelled, devices that
//!   took the command finish it, and the `on_abort` command (a rollback) is
//!   sent to every device that took it and did not reject it.
//! - A per-device timeout starts when the device takes its command; a
//!   device past it is `timed_out` (its command cancelled).
//! - Success is the device's confirmation: the command succeeded and, if
//!   the plan has a `success` condition, its result meets it; with
//!   `health`, a health report after the command must then say healthy
//!   within that time (`verifying` meanwhile; no report is `timed_out`).

mod commands;
pub mod plan;

pub use commands::{end_of, feed, request};

pub use plan::{AbortRule, Canary, EdgePlan, FailKind, Plan, PlanError, Rate, Size, Split};

/// The target a hub hands a rollout to (`edge-1/rollout`): the edge's
/// rollout runner, not a device.
pub const ROLLOUT: &str = "rollout";

use crate::engine::command::{CommandId, Millis, State};
use crate::engine::workflow::ResultMatch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutState {
    /// Devices start as the canary, the rate and their presence allow.
    Running,
    /// Nothing new starts until `rollout resume` (after the canary, or an
    /// operator's `pause`); devices already started go on.
    Paused,
    /// Every device finished (some may have failed without tripping a rule).
    Completed,
    /// A rule tripped or an operator aborted it.
    Aborted,
}

impl RolloutState {
    /// Its name in `rollout show` and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
        }
    }

    /// Completed or aborted: no device starts any more.
    pub fn ended(self) -> bool {
        matches!(self, RolloutState::Completed | RolloutState::Aborted)
    }
}

/// Where one device is in a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeviceState {
    /// Not started yet (its turn has not come, or it is offline).
    Waiting,
    /// Its command is queued; the device has not taken it.
    Sent,
    /// The device took its command: its timeout runs.
    Running,
    /// Its command succeeded; the plan waits for its health report.
    Verifying,
    /// Its command succeeded, met the plan's `success` condition and, with
    /// `health`, a healthy report followed.
    Succeeded,
    /// Its command failed (or went dead, or succeeded without meeting the
    /// `success` condition), or its health report said unhealthy.
    Failed,
    /// The device refused its command (`Outcome::Rejected`).
    Rejected,
    /// No result within the plan's `timeout` from when it took the command,
    /// its command expired, or no health report came within `health`.
    TimedOut,
    /// Never started (the rollout ended first), or its command was
    /// cancelled before the device took it.
    Cancelled,
}

impl DeviceState {
    /// Its name in `rollout show` and the JSON (`timed_out`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Waiting => "waiting",
            DeviceState::Sent => "sent",
            DeviceState::Running => "running",
            DeviceState::Verifying => "verifying",
            DeviceState::Succeeded => "succeeded",
            DeviceState::Failed => "failed",
            DeviceState::Rejected => "rejected",
            DeviceState::TimedOut => "timed_out",
            DeviceState::Cancelled => "cancelled",
        }
    }

    /// Every state, in the order `rollout show` counts them.
    pub const ALL: [DeviceState; 9] = [
        DeviceState::Waiting,
        DeviceState::Sent,
        DeviceState::Running,
        DeviceState::Verifying,
        DeviceState::Succeeded,
        DeviceState::Failed,
        DeviceState::Rejected,
        DeviceState::TimedOut,
        DeviceState::Cancelled,
    ];

    /// A device that finished its command, well or badly: what the abort
    /// rules count.
    pub fn finished(self) -> bool {
        matches!(
            self,
            DeviceState::Succeeded
                | DeviceState::Failed
                | DeviceState::Rejected
                | DeviceState::TimedOut
        )
    }

    /// Nothing more happens to this device's command.
    pub fn ended(self) -> bool {
        self.finished() || self == DeviceState::Cancelled
    }

    fn is(self, kind: FailKind) -> bool {
        match kind {
            FailKind::Failed => self == DeviceState::Failed,
            FailKind::Rejected => self == DeviceState::Rejected,
            FailKind::TimedOut => self == DeviceState::TimedOut,
            FailKind::Any => matches!(
                self,
                DeviceState::Failed | DeviceState::Rejected | DeviceState::TimedOut
            ),
        }
    }
}

/// One device of a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRun {
    /// The device's id (through boxes below: the edge's).
    pub device: String,
    /// Where the device is in the rollout.
    pub state: DeviceState,
    /// Its command's id, derived from (rollout, device), once the shell has
    /// sent it (`None` before).
    pub command: Option<CommandId>,
    /// When the rollout started it, in ms since the Unix epoch (`None`:
    /// still waiting, or never started).
    pub started_at: Option<Millis>,
    /// When the device took its command (its timeout counts from here).
    pub taken_at: Option<Millis>,
    /// Its command's result text, or the failure's, with the rollout's
    /// reason where it judged (a timeout, an unmet `success`, an unhealthy
    /// report); `None` until then.
    pub result: Option<String>,
    /// The `on_abort` command sent to it, and how that ended (`None`: not
    /// yet).
    pub rollback: Option<CommandId>,
    /// Its rollback's final state (`None`: none sent, or not ended yet).
    pub rollback_end: Option<State>,
    /// Verifying: the report must come by then.
    #[serde(default)]
    pub verify_by: Option<Millis>,
    /// A report naming its command that came before the command's end
    /// (the box hears of the two on separate paths).
    #[serde(default)]
    pub early_health: Option<bool>,
}

/// How a device's command ended, as the shell reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct End {
    /// The command's final state.
    pub state: State,
    /// The device refused it (`Outcome::Rejected`).
    pub rejected: bool,
    /// The result text, or the failure's.
    pub result: Option<String>,
}

/// What the engine asks the shell to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send `device` its command (the plan's payload and artifact), or its
    /// rollback. `step` names the send within the rollout: the shell
    /// derives the command id from (rollout, step), so a send repeated
    /// after a crash is the same command.
    Send {
        /// The device's id for its command, `rollback/DEVICE` for its
        /// rollback.
        step: String,
        /// The device it goes to.
        device: String,
        /// Whether it is the `on_abort` rollback rather than the change.
        rollback: bool,
    },
    /// Cancel this command: one an abort stops before its device took it
    /// (through boxes below, an edge's rollout under way too), or one past
    /// its timeout.
    Cancel(CommandId),
}

impl Action {
    /// The send that step `step` names (a device, or `rollback/DEVICE`).
    fn send_of(step: String) -> Action {
        Action::Send {
            device: step.strip_prefix("rollback/").unwrap_or(&step).to_string(),
            rollback: step.starts_with("rollback/"),
            step,
        }
    }
}

/// The step name of a device's rollback; `/` never occurs in a device id.
fn rollback_step(device: &str) -> String {
    format!("rollback/{device}")
}

/// One rollout: plain data, persisted whole after each change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The rollout's id: a new ULID at its start, or the hub's command id
    /// for one handed down; its devices' command ids derive from it.
    pub id: CommandId,
    /// The plan it runs (the artifact pinned to a digest at start).
    pub plan: Plan,
    /// Where the rollout is.
    pub state: RolloutState,
    /// When it started, in ms since the Unix epoch.
    pub started_at: Millis,
    /// When it completed or aborted, in ms since the Unix epoch (`None`:
    /// not yet).
    pub finished_at: Option<Millis>,
    /// Its devices, the target resolved at start, in order, each once.
    pub devices: Vec<DeviceRun>,
    /// How many devices the canary is (0: none), and whether it is over.
    pub canary: usize,
    /// The canary has finished (true from the start without one).
    pub canary_done: bool,
    /// After the canary: when the rollout goes on by itself.
    pub resume_at: Option<Millis>,
    /// Why it is paused or aborted, in words (`rollout show`).
    pub reason: Option<String>,
    /// The abort rule that tripped, as written (`failed >= 20% (min 5)`).
    pub tripped: Option<String>,
    /// When the last device started (the rate spaces the next from it).
    pub last_start: Option<Millis>,
    /// Devices online now: the shell's view, fed in; not kept.
    #[serde(skip)]
    pub online: BTreeSet<String>,
    /// Through boxes below: each edge's plan (its "devices" are edges).
    #[serde(default)]
    pub edges: Vec<(String, Plan)>,
    /// Who handed it down (`upstream/…`): a hub, which sent it as command
    /// `id` and learns its end as that command's result.
    #[serde(default)]
    pub origin: Option<String>,
    /// That end is recorded.
    #[serde(default)]
    pub reported: bool,
}

/// Why an operator's request does not apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// The rollout (its id, its state's name) has completed or aborted.
    #[error("rollout {0} has ended ({1}); start a new one")]
    Ended(CommandId, &'static str),
    /// `resume` of a rollout (its id, its state's name) that is neither
    /// paused nor waiting out its canary.
    #[error("rollout {0} is not paused (it is {1})")]
    NotPaused(CommandId, &'static str),
}

impl Rollout {
    /// Start a rollout of `plan` over `devices` (resolved from its target,
    /// in order, without repeats), with `online` the devices connected now.
    pub fn start(
        id: CommandId,
        plan: Plan,
        devices: Vec<String>,
        online: BTreeSet<String>,
        now: Millis,
    ) -> (Rollout, Vec<Action>) {
        let canary = plan.canary.as_ref().map_or(0, |c| c.size.of(devices.len()));
        let mut r = Rollout {
            id,
            plan,
            state: RolloutState::Running,
            started_at: now,
            finished_at: None,
            devices: devices
                .into_iter()
                .map(|device| DeviceRun {
                    device,
                    state: DeviceState::Waiting,
                    command: None,
                    started_at: None,
                    taken_at: None,
                    result: None,
                    rollback: None,
                    rollback_end: None,
                    verify_by: None,
                    early_health: None,
                })
                .collect(),
            canary,
            canary_done: canary == 0,
            resume_at: None,
            reason: None,
            tripped: None,
            last_start: None,
            online,
            edges: Vec::new(),
            origin: None,
            reported: false,
        };
        let actions = r.advance(now);
        (r, actions)
    }

    /// The shell sent `step` as command `id`.
    pub fn sent(&mut self, step: &str, id: CommandId) {
        if let Some(dev) = step.strip_prefix("rollback/") {
            if let Some(d) = self.devices.iter_mut().find(|d| d.device == dev) {
                d.rollback = Some(id);
            }
        } else if let Some(d) = self.devices.iter_mut().find(|d| d.device == step) {
            d.command = Some(id);
        }
    }

    /// Whether command `id` is one of this rollout's (a device's command
    /// or its rollback).
    pub fn owns(&self, id: CommandId) -> bool {
        self.devices
            .iter()
            .any(|d| d.command == Some(id) || d.rollback == Some(id))
    }

    /// The commands the rollout still waits on: (step, command id).
    pub fn outstanding(&self) -> Vec<(String, Option<CommandId>)> {
        let mut out = Vec::new();
        for d in &self.devices {
            if matches!(d.state, DeviceState::Sent | DeviceState::Running) {
                out.push((d.device.clone(), d.command));
            }
            if d.rollback.is_some() && d.rollback_end.is_none() {
                out.push((rollback_step(&d.device), d.rollback));
            }
        }
        out
    }

    /// After a restart: the commands to look up (sent, their end not seen
    /// yet), whose state the shell feeds back through [`taken`](Self::taken)
    /// and [`ended`](Self::ended), and the sends to repeat (started, their
    /// id not recorded: the same id again, which the queue answers as a
    /// duplicate if it has it).
    pub fn reattach(&self) -> (Vec<CommandId>, Vec<Action>) {
        let mut look = Vec::new();
        let mut resend = Vec::new();
        for (step, cmd) in self.outstanding() {
            match cmd {
                Some(c) => look.push(c),
                None => resend.push(Action::send_of(step)),
            }
        }
        // A command the abort cancelled may have reached its device
        // before the cancel did: what became of it may not have been
        // heard before the restart.
        look.extend(
            self.devices
                .iter()
                .filter(|d| d.state == DeviceState::Cancelled && d.rollback.is_none())
                .filter_map(|d| d.command),
        );
        (look, resend)
    }

    /// The send of `step` again, while it is still out: one the box could
    /// not say it took (`QueueError::is_unsure`), repeated under the same
    /// id. `None` once it ended or the rollout stopped it (an abort
    /// cancels it by its id instead).
    pub fn resend(&self, step: &str) -> Option<Action> {
        self.outstanding()
            .into_iter()
            .any(|(s, _)| s == step)
            .then(|| Action::send_of(step.to_string()))
    }

    /// The devices connected now (the whole set).
    pub fn presence(&mut self, online: BTreeSet<String>, now: Millis) -> Vec<Action> {
        self.online = online;
        self.advance(now)
    }

    /// The device took command `id` (it was delivered): its timeout starts.
    /// A command the abort cancelled that reached its device first is
    /// running all the same (and is rolled back once it ends).
    pub fn taken(&mut self, id: CommandId, now: Millis) {
        if let Some(d) = self.devices.iter_mut().find(|d| d.command == Some(id)) {
            if matches!(d.state, DeviceState::Sent | DeviceState::Cancelled) {
                d.state = DeviceState::Running;
                d.taken_at = Some(now);
            }
        }
    }

    /// Command `id` ended.
    pub fn ended(&mut self, id: CommandId, end: End, now: Millis) -> Vec<Action> {
        if let Some(d) = self.devices.iter_mut().find(|d| d.rollback == Some(id)) {
            d.rollback_end.get_or_insert(end.state);
            return Vec::new();
        }
        let success = self.plan.success.clone();
        let health = self.plan.health;
        let Some(d) = self.devices.iter_mut().find(|d| d.command == Some(id)) else {
            return Vec::new();
        };
        // Cancelled: the abort cancelled it, and the device may have run
        // it first: only the device's own answer says so (a cancel that
        // won, or an end past retention, leaves it cancelled).
        let answered = matches!(end.state, State::Succeeded | State::Failed | State::Dead);
        match d.state {
            DeviceState::Sent | DeviceState::Running => {}
            DeviceState::Cancelled if answered => {}
            _ => return Vec::new(),
        }
        d.state = match end.state {
            State::Succeeded => {
                let text = end.result.as_deref().unwrap_or("");
                if success
                    .as_ref()
                    .is_none_or(|c: &ResultMatch| c.matches(text))
                {
                    DeviceState::Succeeded
                } else {
                    DeviceState::Failed
                }
            }
            State::Cancelled if d.taken_at.is_none() => DeviceState::Cancelled,
            _ if end.rejected => DeviceState::Rejected,
            State::Expired => DeviceState::TimedOut,
            _ => DeviceState::Failed,
        };
        if d.state == DeviceState::Failed && end.state == State::Succeeded {
            d.result = Some(format!(
                "{} (does not meet the rollout's success condition)",
                end.result.unwrap_or_default()
            ));
        } else if !(d.state == DeviceState::Succeeded && d.early_health == Some(false)) {
            // An unhealthy report that came before the end already holds
            // the verdict's reason; the command's own output is not it.
            d.result = end.result;
        }
        if let (DeviceState::Succeeded, Some(within)) = (d.state, health) {
            match d.early_health.take() {
                Some(true) => {}
                Some(false) => d.state = DeviceState::Failed,
                None => {
                    d.state = DeviceState::Verifying;
                    d.verify_by = Some(now.saturating_add(within.as_millis() as u64));
                }
            }
        }
        self.advance(now)
    }

    /// A device reported its health. It settles a device that waits for
    /// one (`verifying`); a report naming the device's command that comes
    /// before the command's end is kept for it.
    pub fn health(
        &mut self,
        device: &str,
        report: &crate::engine::command::HealthReport,
        now: Millis,
    ) -> Vec<Action> {
        if self.plan.health.is_none() {
            return Vec::new();
        }
        let Some(d) = self.devices.iter_mut().find(|d| d.device == device) else {
            return Vec::new();
        };
        match d.state {
            DeviceState::Verifying => {
                d.state = if report.healthy {
                    DeviceState::Succeeded
                } else {
                    DeviceState::Failed
                };
                d.verify_by = None;
                if !report.healthy {
                    d.result = Some(format!("unhealthy after the change: {}", report.detail));
                }
            }
            DeviceState::Sent | DeviceState::Running
                if report.command.is_some() && report.command == d.command =>
            {
                d.early_health = Some(report.healthy);
                if !report.healthy {
                    d.result = Some(format!("unhealthy after the change: {}", report.detail));
                }
                return Vec::new();
            }
            _ => return Vec::new(),
        }
        self.advance(now)
    }

    /// Let time pass: timeouts, the canary's wait, the rate.
    pub fn tick(&mut self, now: Millis) -> Vec<Action> {
        self.advance(now)
    }

    /// Pause: nothing new starts until `resume`.
    pub fn pause(&mut self, now: Millis) -> Result<Vec<Action>, RolloutError> {
        if self.state.ended() {
            return Err(RolloutError::Ended(self.id, self.state.as_str()));
        }
        self.state = RolloutState::Paused;
        self.reason = Some("paused by an operator".into());
        Ok(self.advance(now))
    }

    /// Go on after a pause or the canary (also cuts a canary's wait short).
    pub fn resume(&mut self, now: Millis) -> Result<Vec<Action>, RolloutError> {
        if self.state.ended() {
            return Err(RolloutError::Ended(self.id, self.state.as_str()));
        }
        if self.state != RolloutState::Paused && self.resume_at.is_none() {
            return Err(RolloutError::NotPaused(self.id, self.state.as_str()));
        }
        self.state = RolloutState::Running;
        self.resume_at = None;
        self.reason = None;
        Ok(self.advance(now))
    }

    /// Abort by an operator's word.
    pub fn abort(&mut self, now: Millis) -> Result<Vec<Action>, RolloutError> {
        if self.state.ended() {
            return Err(RolloutError::Ended(self.id, self.state.as_str()));
        }
        Ok(self.stop("aborted by an operator".into(), None, now))
    }

    /// Counts of devices by state, in [`DeviceState::ALL`]'s order.
    pub fn counts(&self) -> [usize; 9] {
        let mut c = [0; 9];
        for d in &self.devices {
            c[DeviceState::ALL
                .iter()
                .position(|s| *s == d.state)
                .unwrap_or(0)] += 1;
        }
        c
    }

    /// The rate now, in devices a minute (`None`: no limit).
    pub fn rate_now(&self) -> Option<f64> {
        let rate = self.plan.rate.as_ref()?;
        let ok = self.count(|s| s == DeviceState::Succeeded) as u32;
        Some(rate.at(ok))
    }

    /// When the engine next needs [`tick`](Self::tick), if ever.
    pub fn next_wake(&self) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut at = |t: Millis| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(t) = self.plan.timeout {
            let t = t.as_millis() as u64;
            for d in &self.devices {
                if let (DeviceState::Running, Some(k)) = (d.state, d.taken_at) {
                    at(k.saturating_add(t));
                }
            }
        }
        for d in &self.devices {
            if let (DeviceState::Verifying, Some(t)) = (d.state, d.verify_by) {
                at(t);
            }
        }
        if self.state == RolloutState::Running {
            if let Some(t) = self.resume_at {
                at(t);
            } else if self.may_start() && self.next_device().is_some() {
                if let Some(t) = self.next_slot() {
                    at(t);
                }
            }
        }
        next
    }

    fn count(&self, f: impl Fn(DeviceState) -> bool) -> usize {
        self.devices.iter().filter(|d| f(d.state)).count()
    }

    /// Whether the canary and the plan's parallelism let one more device
    /// start.
    fn may_start(&self) -> bool {
        let running = self.count(|s| {
            matches!(
                s,
                DeviceState::Sent | DeviceState::Running | DeviceState::Verifying
            )
        });
        (self.canary_done || self.count(|s| s != DeviceState::Waiting) < self.canary)
            && self.plan.parallel.is_none_or(|p| running < p as usize)
    }

    /// The next device to start: the first waiting one that is online.
    fn next_device(&self) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.state == DeviceState::Waiting && self.online.contains(&d.device))
    }

    /// The earliest time the rate lets the next device start.
    fn next_slot(&self) -> Option<Millis> {
        let per_minute = self.rate_now()?;
        let last = self.last_start?;
        // Rounded up: a start a millisecond early would put R + 1 in a minute.
        let gap = (60_000.0 / per_minute).ceil() as u64;
        Some(last.saturating_add(gap))
    }

    /// Apply what time and the last event changed, in order: timeouts, the
    /// abort rules, the canary, the end, then new starts.
    fn advance(&mut self, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(t) = self.plan.timeout {
            let t = t.as_millis() as u64;
            for d in &mut self.devices {
                if let (DeviceState::Running, Some(k)) = (d.state, d.taken_at) {
                    if now >= k.saturating_add(t) {
                        d.state = DeviceState::TimedOut;
                        d.result = Some(format!(
                            "no result within the rollout's timeout of {}",
                            crate::engine::duration::DurationArg(std::time::Duration::from_millis(
                                t
                            ))
                        ));
                        if let Some(c) = d.command {
                            actions.push(Action::Cancel(c));
                        }
                    }
                }
            }
        }
        for d in &mut self.devices {
            if let (DeviceState::Verifying, Some(t)) = (d.state, d.verify_by) {
                if now >= t {
                    d.state = DeviceState::TimedOut;
                    d.verify_by = None;
                    d.result = Some(format!(
                        "{} (no healthy report within the plan's health time)",
                        d.result.take().unwrap_or_default()
                    ));
                }
            }
        }
        if self.state.ended() {
            actions.extend(self.rollbacks_due());
            return actions;
        }
        // The canary is over once all it started has ended (only canary
        // devices start before then).
        let canary_over = !self.canary_done
            && self.count(|s| s != DeviceState::Waiting) >= self.canary
            && self
                .devices
                .iter()
                .all(|d| d.state == DeviceState::Waiting || d.state.ended());
        let sample = canary_over.then_some(self.canary);
        if let Some(rule) = self.tripped_rule(sample) {
            let finished = self.count(DeviceState::finished);
            let bad = self.count(|s| s.is(rule.on));
            let why = format!(
                "{bad} of {finished} finished devices {} ({}%), at or over the rule's {}%",
                rule.on.as_str(),
                bad * 100 / finished.max(1),
                rule.percent
            );
            actions.extend(self.stop(why, Some(rule.to_string()), now));
            return actions;
        }
        if canary_over {
            self.canary_done = true;
            match self.plan.canary.as_ref().and_then(|c| c.wait) {
                Some(w) => self.resume_at = Some(now.saturating_add(w.as_millis() as u64)),
                None => {
                    self.state = RolloutState::Paused;
                    self.reason = Some(format!(
                        "the canary ({} devices) finished: `outpost rollout resume {}` goes on",
                        self.canary, self.id
                    ));
                }
            }
        }
        if self.resume_at.is_some_and(|t| now >= t) {
            self.resume_at = None;
        }
        if self.devices.iter().all(|d| d.state.ended()) {
            self.state = RolloutState::Completed;
            self.finished_at = Some(now);
            self.reason = None;
            self.resume_at = None;
            return actions;
        }
        while self.state == RolloutState::Running && self.resume_at.is_none() && self.may_start() {
            let Some(i) = self.next_device() else { break };
            if self.next_slot().is_some_and(|t| now < t) {
                break;
            }
            let d = &mut self.devices[i];
            d.state = DeviceState::Sent;
            d.started_at = Some(now);
            self.last_start = Some(now);
            actions.push(Action::Send {
                step: d.device.clone(),
                device: d.device.clone(),
                rollback: false,
            });
        }
        actions
    }

    /// The first abort rule that trips now (`sample`: the canary just
    /// finished, with this many devices: rules' minimums drop to it).
    fn tripped_rule(&self, sample: Option<usize>) -> Option<AbortRule> {
        let finished = self.count(DeviceState::finished);
        self.plan.abort.iter().copied().find(|rule| {
            let min = sample.map_or(rule.min as usize, |s| s.min(rule.min as usize));
            let bad = self.count(|s| s.is(rule.on));
            finished >= min.max(1) && bad > 0 && bad * 100 >= rule.percent as usize * finished
        })
    }

    /// Abort: nothing new starts, what has not started is cancelled, and
    /// the rollback goes to every device that took the command.
    fn stop(&mut self, reason: String, tripped: Option<String>, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        // Through boxes below, an edge mid-rollout is stopped (it aborts
        // its own rollout, which rolls back its devices), and an edge whose
        // rollout aborted on its own has rolled back already.
        let through = !self.edges.is_empty();
        for d in &mut self.devices {
            match d.state {
                DeviceState::Waiting => d.state = DeviceState::Cancelled,
                DeviceState::Sent => {
                    d.state = DeviceState::Cancelled;
                    if let Some(c) = d.command {
                        actions.push(Action::Cancel(c));
                    }
                }
                DeviceState::Running if through => {
                    if let Some(c) = d.command {
                        actions.push(Action::Cancel(c));
                    }
                }
                _ => {}
            }
        }
        self.state = RolloutState::Aborted;
        self.finished_at = Some(now);
        self.resume_at = None;
        self.reason = Some(reason);
        self.tripped = tripped;
        actions.extend(self.rollbacks_due());
        actions
    }

    /// An aborted rollout's rollbacks not sent yet: one to every device
    /// that took the change, including one that took it, ended or timed
    /// out after the abort. Through boxes below, only to an edge whose
    /// rollout completed: one that failed or was stopped has rolled back
    /// its own devices.
    fn rollbacks_due(&self) -> Vec<Action> {
        if self.state != RolloutState::Aborted || self.plan.on_abort.is_none() {
            return Vec::new();
        }
        let through = !self.edges.is_empty();
        self.devices
            .iter()
            .filter(|d| d.rollback.is_none())
            .filter(|d| match d.state {
                DeviceState::Verifying | DeviceState::Succeeded => true,
                DeviceState::Running | DeviceState::Failed | DeviceState::TimedOut => !through,
                _ => false,
            })
            .map(|d| Action::Send {
                step: rollback_step(&d.device),
                device: d.device.clone(),
                rollback: true,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;

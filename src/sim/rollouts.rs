//! Rollouts in the simulation (issue 28): the real [`Rollout`] engine on
//! each box, driven the way `shell::rollout` drives it, over the box's
//! real queue core, through crashes, lost links, cancels and clock jumps.
//!
//! The shell's parts that decide anything are the runner's own functions
//! ([`resolve`], [`request`], [`end_of`], [`Rollout::reattach`],
//! [`step_command_id`]); what is modelled here is only the order of the
//! runner's writes: a rollout's record is written ahead of its sends and
//! again after them, each write durable at the box's next flush (an
//! operator's request flushes it before it returns), and a crash brings
//! back the last durable record.
//!
//! What is checked, at every step and after settling, is on
//! [`World::check_rollouts`] and [`World::check_rollouts_end`].

use super::job::Job;
use super::{Sent, World};
use crate::engine::command::{CommandId, Millis, Outcome, State};
use crate::engine::queue::core::Lookup;
use crate::engine::queue::LifecycleEvent;
use crate::engine::rollout::plan::resolve;
use crate::engine::rollout::{feed, request};
use crate::engine::rollout::{
    AbortRule, Action, Canary, DeviceState, End, FailKind, Plan, Rate, Rollout, RolloutState, Size,
};
use crate::engine::workflow::step_command_id;
use std::collections::BTreeSet;
use std::time::Duration;

/// Rollouts started on one box at once, at most (more adds little but
/// cost).
const MAX_ACTIVE: usize = 2;

/// What the simulation keeps of a rollout besides what every job has
/// ([`Job`]).
pub(super) struct Seen {
    /// The devices online as last fed to it.
    online: BTreeSet<String>,
    /// Its state when last looked at (a rule's trip is checked when it
    /// happens: later ends may take the rule back under its threshold).
    last: RolloutState,
}

impl World {
    /// An operator's `rollout start` on box `n`: a random plan over some of
    /// its devices.
    pub(super) fn op_rollout_start(&mut self, n: usize) {
        let active = self
            .rollouts
            .iter()
            .filter(|r| r.node == n && !r.gone && !r.live.state.ended())
            .count();
        if active >= MAX_ACTIVE {
            return;
        }
        let now = self.node_now(n);
        let plan = self.random_plan();
        let views = self.nodes[n].core.devices();
        let devices = match resolve(&plan.target, &views) {
            Ok(d) => d,
            Err(e) => {
                self.ev(n, "rollout-refused", 0, || e);
                return;
            }
        };
        let online = self.nodes[n].core.online();
        let id = CommandId::new(now, self.rng.next_u64() as u128 | 1 << 64);
        let (live, actions) = Rollout::start(id, plan, devices, online.clone(), now);
        let seen = Seen {
            online,
            last: RolloutState::Running,
        };
        let i = self.rollouts.push(Job::new(n, live, seen));
        self.report.counts.rollouts += 1;
        let over = self.rollouts[i].live.devices.len();
        self.ev(n, "rollout-start", id.0, || {
            format!("{id} over {over} devices")
        });
        self.rollout_act(i, actions, true);
    }

    fn random_plan(&mut self) -> Plan {
        let r = &mut self.rng;
        let target = match r.below(4) {
            0 => vec!["tag:line-a".to_string()],
            1 => vec!["tag:line-b".to_string()],
            2 => vec!["cap:cam".to_string(), "tag:line-a".to_string()],
            _ => vec![
                "dev-0".to_string(),
                "dev-1".to_string(),
                "tag:line-b".to_string(),
            ],
        };
        let canary = r.chance(500).then(|| Canary {
            size: Size::Count(1),
            wait: r.chance(600).then(|| Duration::from_millis(r.below(5_000))),
        });
        let rate = r.chance(500).then(|| Rate {
            per_minute: 30 + r.below(600) as u32,
            factor: None,
            every: 1,
            max_per_minute: None,
        });
        let parallel = r.chance(300).then(|| 1 + r.below(2) as u32);
        let abort = if r.chance(700) {
            let on = [FailKind::Failed, FailKind::TimedOut, FailKind::Any][r.below(3) as usize];
            vec![AbortRule {
                on,
                percent: 30 + r.below(71) as u32,
                min: 1 + r.below(3) as u32,
            }]
        } else {
            Vec::new()
        };
        let timeout = r
            .chance(300)
            .then(|| Duration::from_millis(1_000 + r.below(9_000)));
        let on_abort = r.chance(600).then(|| b"rollback".to_vec());
        let max_attempts = 1 + r.below(2) as u32;
        Plan {
            name: "sim".into(),
            target,
            payload: b"change".to_vec(),
            artifact: None,
            priority: crate::engine::command::Priority::Normal,
            max_attempts,
            canary,
            rate,
            parallel,
            abort,
            timeout,
            success: None,
            health: None,
            on_abort,
            edges: None,
        }
    }

    /// An operator's pause, resume or abort of a random rollout on box `n`.
    pub(super) fn op_rollout_verb(&mut self, n: usize) {
        let mine: Vec<usize> = (0..self.rollouts.len())
            .filter(|&i| self.rollouts[i].node == n && !self.rollouts[i].gone)
            .collect();
        let Some(i) = self.rng.pick(&mine) else {
            return;
        };
        // The runner reloads its rollouts before it serves any request.
        if std::mem::take(&mut self.rollouts[i].resume) {
            self.rollout_resume(i);
        }
        if self.rollouts[i].gone || !self.nodes[n].up {
            return;
        }
        let now = self.node_now(n);
        let verb = self.rng.below(3);
        self.refresh_presence(i);
        let r = &mut self.rollouts[i].live;
        let done = match verb {
            0 => r.pause(now),
            1 => r.resume(now),
            _ => r.abort(now),
        };
        let id = r.id;
        if let Ok(actions) = done {
            self.ev(n, "rollout-verb", id.0, || format!("{id} {verb}"));
            self.rollout_act(i, actions, true);
        }
    }

    /// What the runner does between operators' requests: reload after a
    /// restart, feed the queue's events, the devices' presence and the
    /// time, and carry out what the engine asks.
    pub(super) fn drive_rollouts(&mut self) {
        if self.rollouts.active.is_empty() && self.rollouts.events.is_empty() {
            return;
        }
        for i in self.rollouts.active.clone() {
            let r = &self.rollouts[i];
            if r.resume && !r.gone && self.nodes[r.node].up {
                self.rollouts[i].resume = false;
                self.rollout_resume(i);
            }
            let r = &mut self.rollouts[i];
            if !r.retry.is_empty() && !r.gone && self.nodes[r.node].up {
                let again = std::mem::take(&mut r.retry);
                let actions = again.iter().filter_map(|s| r.live.resend(s)).collect();
                self.rollout_act(i, actions, false);
            }
        }
        // Bounded: each pass only handles what the previous one caused.
        for _ in 0..8 {
            let evs = std::mem::take(&mut self.rollouts.events);
            if evs.is_empty() {
                break;
            }
            for (n, ev) in evs {
                if let Some(i) = self.owner(n, ev.id) {
                    self.rollout_feed(i, &ev);
                }
            }
        }
        for i in self.rollouts.active.clone() {
            let (n, gone) = (self.rollouts[i].node, self.rollouts[i].gone);
            if gone || !self.nodes[n].up {
                continue;
            }
            let now = self.node_now(n);
            let mut actions = Vec::new();
            let before = (self.rollouts[i].live.state, self.rollouts[i].live.counts());
            // Presence only moves a running rollout with devices still
            // waiting (an operator's resume reads it afresh first).
            let live = &self.rollouts[i].live;
            let waiting = live.devices.iter().any(|d| d.state == DeviceState::Waiting);
            if live.state == RolloutState::Running && waiting {
                let online = self.nodes[n].core.online();
                if online != self.rollouts[i].extra.online {
                    self.rollouts[i].extra.online = online.clone();
                    actions.extend(self.rollouts[i].live.presence(online, now));
                }
            }
            if self.rollouts[i].live.next_wake().is_some_and(|t| t <= now) {
                actions.extend(self.rollouts[i].live.tick(now));
            }
            let r = &self.rollouts[i].live;
            if !actions.is_empty() || before != (r.state, r.counts()) {
                self.rollout_act(i, actions, false);
            }
        }
        self.rollouts.retire(|r| {
            r.gone
                || (r.live.state.ended()
                    && r.live.outstanding().is_empty()
                    && r.record.settled()
                    && !r.resume)
        });
    }

    /// The devices online now, as the runner keeps them for a rollout
    /// that has not ended.
    fn refresh_presence(&mut self, i: usize) {
        let online = self.nodes[self.rollouts[i].node].core.online();
        let r = &mut self.rollouts[i];
        r.extra.online = online.clone();
        r.live.online = online;
    }

    /// The rollout on box `n` that owns command `id`.
    fn owner(&self, n: usize, id: CommandId) -> Option<usize> {
        let &i = self.rollouts.owned.get(&id)?;
        let r = &self.rollouts[i];
        (r.node == n && !r.gone && self.nodes[n].up).then_some(i)
    }

    /// One of its commands was taken or ended (as `runner::events`).
    fn rollout_feed(&mut self, i: usize, ev: &LifecycleEvent) {
        let n = self.rollouts[i].node;
        let now = self.node_now(n);
        self.ev(n, "rollout-hears", ev.id.0, || {
            format!("{} {:?}", ev.id, ev.state)
        });
        if let Some(actions) = feed(&mut self.rollouts[i].live, ev, now) {
            self.rollout_act(i, actions, false);
        }
    }

    /// The box restarted: the runner reloads the record the store kept
    /// and picks it up (as `runner::resume`).
    fn rollout_resume(&mut self, i: usize) {
        let n = self.rollouts[i].node;
        let now = self.node_now(n);
        self.refresh_presence(i);
        let r = &mut self.rollouts[i];
        let (look, mut actions) = r.live.reattach();
        actions.extend(r.live.tick(now));
        self.rollout_act(i, actions, false);
        self.rollout_check(i, look);
    }

    /// Look these commands up and feed in those taken or ended (as
    /// `runner::check`).
    fn rollout_check(&mut self, i: usize, cmds: Vec<CommandId>) {
        let n = self.rollouts[i].node;
        for c in cmds {
            if self.rollouts[i].gone || !self.nodes[n].up {
                return;
            }
            let ev = match self.nodes[n].core.lookup(c) {
                Lookup::Live(v) => event(c, v.state, v.attempts, None, None),
                Lookup::Finished { seq, state } => {
                    let rec = self.nodes[n].disk.view().result(seq, c);
                    let outcome = rec.and_then(|r| r.outcome.clone());
                    let error = rec.and_then(|r| r.error.clone());
                    let attempts = rec.map_or(0, |r| r.attempts);
                    event(c, state, attempts, outcome, error)
                }
                Lookup::NotFound => event(
                    c,
                    State::Expired,
                    0,
                    None,
                    Some(crate::engine::workflow::UNKNOWN_TO_THE_BOX.into()),
                ),
            };
            if ev.state != State::Queued {
                self.rollout_feed(i, &ev);
            }
        }
    }

    /// Carry out a rollout's actions as `runner::act` does: the sends and
    /// cancels in one round, then the record (durable at once for an
    /// operator's request, else at the next flush).
    fn rollout_act(&mut self, i: usize, mut actions: Vec<Action>, durable: bool) {
        let n = self.rollouts[i].node;
        self.rollouts.wake(i);
        self.check_trip(i);
        let mut followups = Vec::new();
        while !actions.is_empty() {
            if self.rollouts[i].gone || !self.nodes[n].up {
                return;
            }
            let now = self.node_now(n);
            // Written ahead of its sends: the record rides their commit.
            let r = &mut self.rollouts[i];
            r.record.write(&r.live, false);
            let mut sends = Vec::new();
            for a in actions.drain(..) {
                let r = &self.rollouts[i].live;
                match a {
                    Action::Send {
                        step,
                        device,
                        rollback,
                    } => {
                        let Some((cmd, req, _)) = request(r, &step, &device, rollback) else {
                            continue;
                        };
                        self.rollouts.owned.insert(cmd, i);
                        let target = req.target.clone();
                        let priority = req.opts.priority;
                        let sent = self.nodes[n].core.send_as(Some(cmd), req, now);
                        sends.push((step, cmd, target, priority, sent));
                    }
                    Action::Cancel(c) => {
                        let r = self.nodes[n].core.cancel(c, now);
                        self.ev(n, "rollout-cancel", c.0, || {
                            format!("{c}: {:?}", r.map(|v| v.state))
                        });
                    }
                }
            }
            let committed = self.round(n);
            if !self.nodes[n].up || self.rollouts[i].gone {
                // The box died with the round: nobody heard back, and the
                // runner reloads its record at the restart.
                return;
            }
            let now = self.node_now(n);
            for (step, cmd, target, priority, sent) in sends {
                let rid = self.rollouts[i].live.id;
                self.ev(n, "rollout-send", cmd.0, || {
                    format!("{rid} {step} as {cmd}: {sent:?}")
                });
                let sent = if committed {
                    sent
                } else {
                    Err(crate::engine::queue::QueueError::Storage(
                        "the commit failed".into(),
                    ))
                };
                match sent {
                    Ok(rc) => {
                        self.rollouts[i].live.sent(&step, cmd);
                        if !rc.duplicate {
                            let device = self.device_named(n, &target);
                            let s = Sent {
                                node: n,
                                device,
                                plain: true,
                                pool: false,
                                priority,
                                index: 0,
                                wiped: false,
                                job: true,
                                via: self.via(n, &target),
                            };
                            self.note_sent(rc.id, s, &target);
                        }
                        followups.push(cmd);
                    }
                    // As the runner: under its id, sent again later.
                    Err(e) if e.is_unsure() => {
                        self.rollouts[i].live.sent(&step, cmd);
                        self.rollouts[i].retry.push(step);
                    }
                    Err(e) => {
                        self.rollouts[i].live.sent(&step, cmd);
                        let end = End {
                            state: State::Failed,
                            rejected: false,
                            result: Some(e.to_string()),
                        };
                        let more = self.rollouts[i].live.ended(cmd, end, now);
                        actions.extend(more);
                    }
                }
            }
        }
        // A kill -9 between the sends' commit and the record's write.
        if self.faults && self.rng.chance(20) {
            self.ev(n, "crash-before-rollout-record", 0, String::new);
            self.crash(n);
            return;
        }
        let r = &mut self.rollouts[i];
        r.record.write(&r.live, durable);
        self.rollout_check(i, followups);
    }

    /// The device box `n` names `name`: its own, or one below an edge
    /// (`edge-1/dev-0`, `edge-1/sub-1/dev-0`).
    pub(super) fn device_named(&self, n: usize, name: &str) -> Option<usize> {
        let (node, dev) = match name.rsplit_once('/') {
            Some((path, dev)) => (self.node_at(n, path)?, dev),
            None => (n, name),
        };
        self.devices
            .iter()
            .position(|d| d.node == node && d.name == dev)
    }

    /// Box `n` flushed: what its runner wrote before is durable.
    pub(super) fn rollouts_flushed(&mut self, n: usize) {
        self.rollouts.flushed(n);
    }

    /// Box `n` crashed: its rollouts come back as last durable.
    pub(super) fn rollouts_crashed(&mut self, n: usize) {
        let now = self.node_now(n);
        let keep = super::limits().results_max_age_ms;
        self.rollouts
            .crashed(n, now, keep, |r| r.extra.last = r.live.state);
    }

    /// Box `n`'s database was wiped: its rollouts went with it.
    pub(super) fn rollouts_wiped(&mut self, n: usize) {
        let c = &mut self.report.counts;
        self.rollouts.wiped(n, |r| match r.state {
            RolloutState::Completed => c.rollouts_completed += 1,
            RolloutState::Aborted => c.rollouts_aborted += 1,
            _ => {}
        });
    }

    /// Settling: an operator resumes what waits for one.
    pub(super) fn settle_rollouts(&mut self) {
        for i in self.rollouts.active.clone() {
            let (n, gone) = (self.rollouts[i].node, self.rollouts[i].gone);
            if gone || !self.nodes[n].up || self.rollouts[i].live.state != RolloutState::Paused {
                continue;
            }
            let now = self.node_now(n);
            self.refresh_presence(i);
            if let Ok(actions) = self.rollouts[i].live.resume(now) {
                self.rollout_act(i, actions, true);
            }
        }
    }

    /// The earliest a rollout needs the time (world clock).
    pub(super) fn rollouts_next_wake(&self) -> Option<Millis> {
        self.rollouts
            .active
            .iter()
            .map(|&i| &self.rollouts[i])
            .filter(|r| !r.gone && self.nodes[r.node].up)
            .filter_map(|r| {
                let t = r.live.next_wake()?;
                Some((t as i64 - self.nodes[r.node].skew).max(0) as Millis)
            })
            .min()
    }

    /// Nothing left for a rollout to do.
    pub(super) fn rollouts_quiet(&self) -> bool {
        self.rollouts.events.is_empty()
            && self.rollouts.active.iter().all(|&i| {
                let r = &self.rollouts[i];
                r.gone || (r.live.state.ended() && r.live.outstanding().is_empty() && !r.resume)
            })
    }

    /// When a rollout aborts on a rule: the rule holds then.
    fn check_trip(&mut self, i: usize) {
        let r = &mut self.rollouts[i];
        let (was, now) = (r.extra.last, r.live.state);
        r.extra.last = now;
        if was == RolloutState::Aborted || now != RolloutState::Aborted {
            return;
        }
        let live = &r.live;
        let Some(t) = &live.tripped else { return };
        if !live
            .plan
            .abort
            .iter()
            .any(|a| a.to_string() == *t && holds(live, a, true))
        {
            let what = format!(
                "rollout {} aborted on {t}, which does not hold: {:?}",
                live.id,
                live.counts()
            );
            let n = r.node;
            self.violation(n, what);
        }
    }

    /// At every step: the engine's decisions follow its plan.
    /// - a completed rollout has no abort rule that holds over its
    ///   finished devices (an abort is checked when it trips, in
    ///   `check_trip`);
    /// - a device counted as failed in any way had been started.
    pub(super) fn check_rollouts(&mut self) {
        self.check_rollouts_in(false);
    }

    /// `check_rollouts` over the active rollouts, or `all` of them.
    fn check_rollouts_in(&mut self, all: bool) {
        let mut found = Vec::new();
        let picked: Vec<usize> = if all {
            (0..self.rollouts.len()).collect()
        } else {
            self.rollouts.active.clone()
        };
        for r in picked.iter().map(|&i| &self.rollouts[i]) {
            if r.gone {
                continue;
            }
            let live = &r.live;
            if live.state == RolloutState::Completed {
                if let Some(rule) = live.plan.abort.iter().find(|a| holds(live, a, false)) {
                    found.push((
                        r.node,
                        format!("rollout {} completed although {rule} holds", live.id),
                    ));
                }
            }
            for d in &live.devices {
                if matches!(
                    d.state,
                    DeviceState::Failed | DeviceState::TimedOut | DeviceState::Rejected
                ) && d.started_at.is_none()
                {
                    found.push((
                        r.node,
                        format!(
                            "rollout {}: {} counted {} and never started",
                            live.id,
                            d.device,
                            d.state.as_str()
                        ),
                    ));
                }
            }
        }
        for (n, f) in found {
            self.violation(n, f);
        }
    }

    /// After settling: every rollout ended and what it says of each
    /// device is what happened there.
    /// - no device is left waiting, sent or running;
    /// - a device counted succeeded ran the change once, and one counted
    ///   cancelled is not known to its box to have run it;
    /// - after an abort with a rollback, every device known to have run
    ///   the change (well or badly) got the rollback, and it ended;
    /// - a rollout whose start never returned changed no device.
    pub(super) fn check_rollouts_end(&mut self) {
        self.check_rollouts_in(true);
        let mut found = Vec::new();
        for r in self.rollouts.iter() {
            let live = &r.live;
            let c = &mut self.report.counts;
            match live.state {
                _ if r.gone => {}
                RolloutState::Completed => c.rollouts_completed += 1,
                RolloutState::Aborted => c.rollouts_aborted += 1,
                _ => {}
            }
            c.rollbacks += live.devices.iter().filter(|d| d.rollback.is_some()).count() as u64;
            for d in &live.devices {
                let cmd = step_command_id(live.id, &d.device);
                let dev = self
                    .device_named(r.node, &d.device)
                    .map(|x| &self.devices[x]);
                let got = dev.is_some_and(|x| x.seen.keys().any(|(c, _)| *c == cmd));
                let ok = dev.and_then(|x| x.runs.get(&cmd)).map_or(0, |x| x.0);
                // The box knows the device ran it: its end is the device's
                // answer. (A device whose answer its box lost in a crash,
                // or that hung, and whose command was then cancelled before
                // it came again, ran it without a trace the box keeps:
                // deliveries are not journalled. The rollout counts it
                // cancelled, as the queue does; see ARCHITECTURE.md.)
                let node = &self.nodes[r.node];
                let end = match node.core.lookup(cmd) {
                    Lookup::Finished { state, .. } => Some(state),
                    // Forgotten past retention: so may the rollout have.
                    Lookup::NotFound | Lookup::Live(_) => None,
                };
                let ran = matches!(end, Some(State::Succeeded | State::Failed | State::Dead));
                if r.gone {
                    // A wiped box's rollouts went with it; one whose start
                    // never returned must have changed nothing.
                    if got && !r.record.ever_durable() {
                        found.push((
                            r.node,
                            format!(
                                "rollout {}'s start never returned, yet {} got its change",
                                live.id, d.device
                            ),
                        ));
                    }
                    continue;
                }
                let bad = match d.state {
                    DeviceState::Waiting
                    | DeviceState::Sent
                    | DeviceState::Running
                    | DeviceState::Verifying => Some("is left unfinished".to_string()),
                    DeviceState::Succeeded if ok != 1 => {
                        Some(format!("is counted succeeded but ran it {ok} times"))
                    }
                    DeviceState::Cancelled if ran => Some(format!(
                        "is counted cancelled but its command ended {end:?}"
                    )),
                    _ => None,
                };
                if let Some(b) = bad {
                    found.push((
                        r.node,
                        format!(
                            "rollout {} ({}): {} {b}",
                            live.id,
                            live.state.as_str(),
                            d.device
                        ),
                    ));
                }
                let rolled = live.state == RolloutState::Aborted
                    && live.plan.on_abort.is_some()
                    && ran
                    && d.state != DeviceState::Rejected;
                if rolled && (d.rollback.is_none() || d.rollback_end.is_none()) {
                    found.push((
                        r.node,
                        format!(
                            "rollout {} aborted: {} ran the change ({}) but its rollback is {:?}, ended {:?}",
                            live.id,
                            d.device,
                            d.state.as_str(),
                            d.rollback,
                            d.rollback_end
                        ),
                    ));
                }
            }
        }
        for (n, f) in found {
            self.violation(n, f);
        }
    }
}

/// Whether `rule` holds over the rollout's finished devices (`tripped`:
/// as it may have at the canary's end, with the minimum lowered to the
/// canary's size).
fn holds(r: &Rollout, rule: &AbortRule, tripped: bool) -> bool {
    let finished = r.devices.iter().filter(|d| d.state.finished()).count();
    let bad = r
        .devices
        .iter()
        .filter(|d| match rule.on {
            FailKind::Failed => d.state == DeviceState::Failed,
            FailKind::Rejected => d.state == DeviceState::Rejected,
            FailKind::TimedOut => d.state == DeviceState::TimedOut,
            FailKind::Any => matches!(
                d.state,
                DeviceState::Failed | DeviceState::Rejected | DeviceState::TimedOut
            ),
        })
        .count();
    let min = if tripped && r.canary > 0 {
        (rule.min as usize).min(r.canary)
    } else {
        rule.min as usize
    };
    finished >= min.max(1) && bad > 0 && bad * 100 >= rule.percent as usize * finished
}

fn event(
    id: CommandId,
    state: State,
    attempts: u32,
    outcome: Option<Outcome>,
    error: Option<String>,
) -> LifecycleEvent {
    LifecycleEvent {
        id,
        device: "".into(),
        state,
        at: 0,
        attempts,
        outcome,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{walk, Config, World};
    use super::*;

    /// A world walked and settled clean, with a rollout that has a device
    /// its box knows ran the change: (the world, that rollout, device).
    fn settled() -> (World, usize, usize) {
        for seed in 300..330 {
            let mut w = World::new(seed, &Config::default());
            walk(&mut w, 3_000);
            w.settle();
            if !w.report.violations.is_empty() {
                continue;
            }
            for (i, r) in w.rollouts.iter().enumerate() {
                if r.gone {
                    continue;
                }
                let node = &w.nodes[r.node];
                let ran = r.live.devices.iter().position(|d| {
                    d.state == DeviceState::Succeeded
                        && matches!(
                            node.core.lookup(step_command_id(r.live.id, &d.device)),
                            Lookup::Finished {
                                state: State::Succeeded,
                                ..
                            }
                        )
                });
                if let Some(d) = ran {
                    return (w, i, d);
                }
            }
        }
        panic!("no seed in 300..330 settles a rollout with a device known to have succeeded");
    }

    #[test]
    fn the_end_check_catches_a_device_counted_as_it_did_not_fare() {
        let (mut w, i, d) = settled();
        w.check_rollouts_end();
        assert!(w.report.violations.is_empty(), "{:?}", w.report.violations);
        fn dev(w: &mut World, i: usize, d: usize) -> &mut crate::engine::rollout::DeviceRun {
            &mut w.rollouts[i].live.devices[d]
        }
        dev(&mut w, i, d).state = DeviceState::Cancelled;
        w.caught(
            World::check_rollouts_end,
            "is counted cancelled but its command ended Some(Succeeded)",
        );
        dev(&mut w, i, d).state = DeviceState::Running;
        w.caught(World::check_rollouts_end, "is left unfinished");
        dev(&mut w, i, d).state = DeviceState::Failed;
        dev(&mut w, i, d).started_at = None;
        w.caught(
            World::check_rollouts_end,
            "counted failed and never started",
        );
        // Its start lost in a crash, yet the device got its change.
        dev(&mut w, i, d).state = DeviceState::Succeeded;
        w.rollouts[i].gone = true;
        w.rollouts[i].record = crate::sim::record::Record::new();
        w.caught(World::check_rollouts_end, "start never returned, yet");
    }
}

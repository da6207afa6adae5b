//! Workflows in the simulation (issue 28): the real [`Run`] engine on each
//! box, driven the way `shell::workflow` drives it, over the box's real
//! queue core, through crashes, lost links, operators' cancels and clock
//! jumps. As with rollouts (`sim/rollouts.rs`), what the shell decides is
//! the runner's own functions ([`reattach`], [`request`], [`event_end`],
//! [`step_command_id`]); what is modelled is the order of its writes (the
//! run's record ahead of its sends and again after them, each durable at
//! the next flush; a start or a cancel flushed before it returns) and a
//! kill -9 between the sends' commit and the record.
//!
//! Steps target single devices (a box's own, or one below an edge from
//! the hub), chained by `needs`, some gated by `when`, with compensation
//! (`on_failure`) and a timeout. Checked as it happens: no step's command
//! is sent while a step it needs still has a command out on the box.
//! After settling: every run ended; a step counted succeeded, failed or
//! cancelled agrees with its command's end on the box; a succeeded run
//! sent no compensation step; a failed or timed-out run with compensation
//! sent it; a start that never returned sent nothing.

use super::job::Job;
use super::{Sent, World};
use crate::engine::command::{CommandId, Millis, State};
use crate::engine::queue::core::Lookup;
use crate::engine::queue::LifecycleEvent;
use crate::engine::workflow::{ended_from, event_end, request, step_command_id, text};
use crate::engine::workflow::{Action, Ended, MinSuccess, Run, RunState, StepState, Workflow};

/// Runs started on one box at once, at most.
const MAX_ACTIVE: usize = 2;

impl World {
    /// An operator's `workflow run` on box `n`: a random workflow over some
    /// of its devices.
    pub(super) fn op_workflow_start(&mut self, n: usize) {
        let active = self.runs.active_on(n).count();
        if active >= MAX_ACTIVE {
            return;
        }
        let text = self.random_workflow(n);
        let spec = match Workflow::parse(&text, "sim.toml") {
            Ok(w) => w,
            Err(e) => {
                self.violation(n, format!("a generated workflow is refused: {e:?}\n{text}"));
                return;
            }
        };
        let now = self.node_now(n);
        let id = CommandId::new(now, self.rng.next_u64() as u128 | 1 << 65);
        let (live, actions) = Run::start(id, spec, now);
        let i = self.runs.push(Job::new(n, live, ()));
        self.report.counts.workflows += 1;
        self.ev(n, "workflow-start", id.0, || format!("{id}"));
        self.run_act(i, actions, true);
    }

    /// A workflow file: 2 to 4 main steps in a chain or a fan-out, some
    /// gated by a `when`, maybe a compensation step and a timeout.
    fn random_workflow(&mut self, n: usize) -> String {
        let names = self.targets_of(n);
        let r = &mut self.rng;
        let mut t = String::from("name = \"sim\"\n");
        if r.chance(300) {
            t += &format!("timeout = \"{}ms\"\n", 2_000 + r.below(20_000));
        }
        let comp = r.chance(500);
        if comp {
            t += "on_failure = [\"undo\"]\n";
        }
        let steps = 2 + r.below(3) as usize;
        let groups = if self.workflow_groups {
            self.tag_targets_of(n)
        } else {
            Vec::new()
        };
        let r = &mut self.rng;
        for s in 0..steps {
            // A step on a tag (a broadcast), sometimes with a quorum.
            if !groups.is_empty() && r.chance(300) {
                let target = &groups[r.below(groups.len() as u64) as usize];
                t += &format!("[steps.s{s}]\ntarget = \"{target}\"\npayload = \"s{s}\"\n");
                match r.below(3) {
                    0 => t += &format!("min_success = \"{}%\"\n", 25 * (1 + r.below(4))),
                    1 => t += &format!("min_success = {}\n", 1 + r.below(3)),
                    _ => {}
                }
            } else {
                let target = &names[r.below(names.len() as u64) as usize];
                t += &format!("[steps.s{s}]\ntarget = \"{target}\"\npayload = \"s{s}\"\n");
            }
            if r.chance(300) {
                t += &format!("max_attempts = {}\n", 1 + r.below(3));
            }
            if s > 0 {
                // Needs the step before it, or the first (a fan-out).
                let need = if r.chance(500) { s - 1 } else { 0 };
                t += &format!("needs = [\"s{need}\"]\n");
                if r.chance(250) {
                    let state = ["succeeded", "failed", "any"][r.below(3) as usize];
                    t += &format!("when = {{ step = \"s{need}\", state = \"{state}\" }}\n");
                }
            }
        }
        if comp {
            let target = &names[r.below(names.len() as u64) as usize];
            t += &format!("[steps.undo]\ntarget = \"{target}\"\npayload = \"undo\"\n");
        }
        t
    }

    /// The tags box `n` may name in a step: its devices' lines, and
    /// those of the boxes below it (`edge-1/tag:line-a`).
    fn tag_targets_of(&self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for m in 0..self.nodes.len() {
            if !self.devices.iter().any(|d| d.node == m) {
                continue;
            }
            let Some(path) = self.path_from(n, m) else {
                continue;
            };
            for tag in ["tag:line-a", "tag:line-b"] {
                out.push(match path.as_str() {
                    "" => tag.to_string(),
                    p => format!("{p}/{tag}"),
                });
            }
        }
        out
    }

    /// Devices box `n` may name in a step: its own, and those of the
    /// boxes below it (`edge-1/dev-0`).
    fn targets_of(&self, n: usize) -> Vec<String> {
        self.devices
            .iter()
            .filter_map(|d| match self.path_from(n, d.node)?.as_str() {
                "" => Some(d.name.clone()),
                path => Some(format!("{path}/{}", d.name)),
            })
            .collect()
    }

    /// An operator's `workflow cancel [--compensate]` of a run on box `n`.
    pub(super) fn op_workflow_cancel(&mut self, n: usize) {
        let mine: Vec<usize> = self.runs.active_on(n).collect();
        let Some(i) = self.rng.pick(&mine) else {
            return;
        };
        let compensate = self.rng.chance(500);
        // The runner reloads its runs before it serves any request.
        if std::mem::take(&mut self.runs[i].resume) {
            self.run_resume(i);
        }
        if self.runs[i].gone || !self.nodes[n].up {
            return;
        }
        let now = self.node_now(n);
        if self.runs[i].live.state != RunState::Running {
            return;
        }
        let actions = self.runs[i].live.cancel(compensate, now);
        let id = self.runs[i].live.id;
        self.ev(n, "workflow-cancel", id.0, || {
            format!("{id} compensate {compensate}")
        });
        self.run_act(i, actions, true);
    }

    /// What the runner does between requests: reload after a restart,
    /// feed the queue's events and the time.
    pub(super) fn drive_workflows(&mut self) {
        if self.runs.active.is_empty() && self.runs.events.is_empty() {
            return;
        }
        for i in self.runs.active.clone() {
            let r = &self.runs[i];
            if r.resume && !r.gone && self.nodes[r.node].up {
                self.runs[i].resume = false;
                self.run_resume(i);
            }
            let r = &mut self.runs[i];
            if !r.retry.is_empty() && !r.gone && self.nodes[r.node].up {
                let again = std::mem::take(&mut r.retry);
                let actions = again.iter().filter_map(|s| r.live.resend(s)).collect();
                self.run_act(i, actions, false);
            }
        }
        for _ in 0..8 {
            let evs = std::mem::take(&mut self.runs.events);
            if evs.is_empty() {
                break;
            }
            for (n, ev) in evs {
                let Some(&i) = self.runs.owned.get(&ev.id) else {
                    continue;
                };
                let r = &self.runs[i];
                if r.node != n || r.gone || !self.nodes[n].up || !ev.state.is_final() {
                    continue;
                }
                match event_end(&r.live, &ev) {
                    Some(e) => self.run_feed(i, ev.id, e),
                    None => self.run_check(i, vec![ev.id]),
                }
            }
        }
        for i in self.runs.active.clone() {
            let (n, gone) = (self.runs[i].node, self.runs[i].gone);
            if gone || !self.nodes[n].up {
                continue;
            }
            let now = self.node_now(n);
            let due = self.runs[i]
                .live
                .deadline
                .is_some_and(|d| d <= now && self.runs[i].live.state == RunState::Running);
            if due {
                let actions = self.runs[i].live.tick(now);
                self.run_act(i, actions, false);
            }
        }
        self.runs.retire(|r| {
            r.gone || (r.live.state != RunState::Running && r.record.settled() && !r.resume)
        });
    }

    fn run_feed(&mut self, i: usize, cmd: CommandId, e: Ended) {
        let now = self.node_now(self.runs[i].node);
        let actions = self.runs[i].live.step_ended(cmd, e, now);
        self.run_act(i, actions, false);
    }

    /// Look these step commands up and feed in those that ended (as the
    /// runner's `ends`, for steps on one device).
    fn run_check(&mut self, i: usize, cmds: Vec<CommandId>) {
        let n = self.runs[i].node;
        for c in cmds {
            if self.runs[i].gone || !self.nodes[n].up {
                return;
            }
            let e = match self.nodes[n].core.lookup(c) {
                Lookup::Live(_) => continue,
                Lookup::Finished { seq, state } => {
                    let node = &self.nodes[n];
                    let image = node.disk.view();
                    let Some(rec) = image.result(seq, c) else {
                        self.violation(
                            n,
                            format!("step command {c} ended {state:?} with no record"),
                        );
                        continue;
                    };
                    let v = crate::engine::queue::CommandView::from(rec.clone());
                    // A broadcast's children, each read back as the runner
                    // asks the queue for it.
                    let texts: Vec<Vec<u8>> = v
                        .children
                        .iter()
                        .map(|ch| match node.core.lookup(ch.id) {
                            Lookup::Finished { seq, .. } => image
                                .result(seq, ch.id)
                                .and_then(|r| text(r.outcome.as_ref(), r.error.as_ref()))
                                .unwrap_or_default(),
                            _ => Vec::new(),
                        })
                        .collect();
                    match ended_from(&v, &texts) {
                        Some(e) => e,
                        None => continue,
                    }
                }
                Lookup::NotFound => Ended {
                    state: State::Expired,
                    result: Some(
                        crate::engine::workflow::UNKNOWN_TO_THE_BOX
                            .as_bytes()
                            .to_vec(),
                    ),
                    children: None,
                },
            };
            self.run_feed(i, c, e);
        }
    }

    /// The box restarted: the runner reloads the run and picks it up.
    fn run_resume(&mut self, i: usize) {
        let (look, resend) = self.runs[i].live.reattach();
        self.run_act(i, resend, false);
        self.run_check(i, look);
    }

    /// Carry out a run's actions as `runner::act` does.
    fn run_act(&mut self, i: usize, mut actions: Vec<Action>, durable: bool) {
        let n = self.runs[i].node;
        self.runs.wake(i);
        let mut followups = Vec::new();
        while !actions.is_empty() {
            if self.runs[i].gone || !self.nodes[n].up {
                return;
            }
            let now = self.node_now(n);
            let r = &mut self.runs[i];
            r.record.write(&r.live, false);
            let id = r.live.id;
            let mut sends = Vec::new();
            for a in actions.drain(..) {
                if let Action::Cancel(c) = a {
                    let _ = self.nodes[n].core.cancel(c, now);
                    continue;
                }
                let Some((step, cmd, req, _)) = request(id, a) else {
                    continue;
                };
                self.check_needs(i, &step);
                self.runs.owned.insert(cmd, i);
                let (target, priority) = (req.target.clone(), req.opts.priority);
                let sent = self.nodes[n].core.send_as(Some(cmd), req, now);
                sends.push((step, cmd, target, priority, sent));
            }
            let committed = self.round(n);
            if !self.nodes[n].up || self.runs[i].gone {
                return;
            }
            let now = self.node_now(n);
            for (step, cmd, target, priority, sent) in sends {
                self.ev(n, "workflow-send", cmd.0, || {
                    format!("{id} {step} as {cmd}: {sent:?}")
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
                        self.runs[i].live.sent(&step, rc.id);
                        if !rc.duplicate {
                            if target.contains("tag:") {
                                self.report.counts.workflow_group_steps += 1;
                            }
                            let device = self.device_named(n, &target);
                            let s = Sent {
                                node: n,
                                device,
                                plain: device.is_some(),
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
                        self.runs[i].live.sent(&step, cmd);
                        self.runs[i].retry.push(step);
                    }
                    Err(e) => {
                        let r = &mut self.runs[i].live;
                        r.sent(&step, cmd);
                        let end = Ended {
                            state: State::Failed,
                            result: Some(e.to_string().into_bytes()),
                            children: None,
                        };
                        actions.extend(r.step_ended(cmd, end, now));
                    }
                }
            }
        }
        if self.faults && self.rng.chance(20) {
            self.ev(n, "crash-before-workflow-record", 0, String::new);
            self.crash(n);
            return;
        }
        let r = &mut self.runs[i];
        r.record.write(&r.live, durable);
        self.run_check(i, followups);
    }

    /// A step is sent only once no step it needs has a command out on the
    /// box (the box's word, not the run's).
    fn check_needs(&mut self, i: usize, step: &str) {
        let r = &self.runs[i];
        let Some(spec) = r.live.spec.steps.iter().find(|s| s.name == step) else {
            return;
        };
        let node = &self.nodes[r.node];
        let mut out = Vec::new();
        for need in &spec.needs {
            let c = step_command_id(r.live.id, need);
            if let Lookup::Live(v) = node.core.lookup(c) {
                out.push(format!("{need} ({c} {:?})", v.state));
            }
        }
        if !out.is_empty() {
            let (n, id) = (r.node, r.live.id);
            self.violation(
                n,
                format!("run {id}: step {step} sent while {} is out", out.join(", ")),
            );
        }
    }

    /// Box `n` flushed.
    pub(super) fn workflows_flushed(&mut self, n: usize) {
        self.runs.flushed(n);
    }

    /// Box `n` crashed: its runs come back as last durable.
    pub(super) fn workflows_crashed(&mut self, n: usize) {
        let now = self.node_now(n);
        let keep = super::limits().results_max_age_ms;
        self.runs.crashed(n, now, keep, |_| {});
    }

    /// Box `n`'s database was wiped: its runs went with it.
    pub(super) fn workflows_wiped(&mut self, n: usize) {
        let c = &mut self.report.counts;
        self.runs.wiped(n, |r| match r.state {
            RunState::Succeeded => c.workflows_succeeded += 1,
            RunState::Running => {}
            _ => c.workflows_failed += 1,
        });
    }

    /// The earliest a run's timeout falls due (world clock).
    pub(super) fn workflows_next_wake(&self) -> Option<Millis> {
        self.runs
            .active
            .iter()
            .map(|&i| &self.runs[i])
            .filter(|r| !r.gone && self.nodes[r.node].up && r.live.state == RunState::Running)
            .filter_map(|r| {
                let t = r.live.deadline?;
                Some((t as i64 - self.nodes[r.node].skew).max(0) as Millis)
            })
            .min()
    }

    /// Nothing left for a run to do.
    pub(super) fn workflows_quiet(&self) -> bool {
        self.runs.events.is_empty()
            && self.runs.active.iter().all(|&i| {
                let r = &self.runs[i];
                r.gone || (r.live.state != RunState::Running && !r.resume)
            })
    }

    /// After settling: what each run says is what its box did.
    pub(super) fn check_workflows_end(&mut self) {
        let mut found = Vec::new();
        for r in self.runs.iter() {
            let run = &r.live;
            let c = &mut self.report.counts;
            match run.state {
                _ if r.gone => {}
                RunState::Succeeded => c.workflows_succeeded += 1,
                RunState::Running => {}
                _ => c.workflows_failed += 1,
            }
            let node = &self.nodes[r.node];
            // What the box says of a command now (`None`: it has
            // forgotten it, past retention, and so may the run have).
            let end_of = |c: CommandId| match node.core.lookup(c) {
                Lookup::Finished { state, .. } => Some(state),
                Lookup::NotFound => None,
                Lookup::Live(v) => Some(v.state),
            };
            let exists = |c: CommandId| {
                !matches!(node.core.lookup(c), Lookup::NotFound) || node.ended.contains_key(&c)
            };
            if r.gone {
                if !r.record.ever_durable() {
                    for st in &run.steps {
                        let c = step_command_id(run.id, &st.name);
                        if exists(c) || self.sent.contains_key(&c) {
                            found.push((
                                r.node,
                                format!(
                                    "run {}'s start never returned, yet step {} was sent",
                                    run.id, st.name
                                ),
                            ));
                        }
                    }
                }
                continue;
            }
            if run.state == RunState::Running {
                found.push((
                    r.node,
                    format!("run {} did not end: {:?}", run.id, run.steps),
                ));
                continue;
            }
            for (k, st) in run.steps.iter().enumerate() {
                let c = step_command_id(run.id, &st.name);
                let end = end_of(c);
                let ran = matches!(end, Some(State::Succeeded | State::Failed | State::Dead));
                // A broadcast step with a quorum: whether it held, counted
                // from the children's ends in the box's record.
                let quorum = run.spec.steps[k].min_success;
                let held = quorum.and_then(|q| {
                    let Lookup::Finished { seq, .. } = node.core.lookup(c) else {
                        return None;
                    };
                    let image = node.disk.view();
                    let rec = image.result(seq, c)?;
                    let total = rec.children.len() as u32;
                    let ok = rec
                        .children
                        .iter()
                        .filter(|ch| ch.state == State::Succeeded)
                        .count() as u32;
                    (total > 0).then_some(match q {
                        MinSuccess::Percent(p) => ok * 100 >= p * total,
                        MinSuccess::Count(n) => ok >= n,
                    })
                });
                let bad = match st.state {
                    StepState::Succeeded => {
                        !exists(c)
                            || match held {
                                Some(h) => !h,
                                None => end.is_some_and(|e| e != State::Succeeded),
                            }
                    }
                    StepState::Failed => match held {
                        Some(h) => h,
                        None => end == Some(State::Succeeded),
                    },
                    StepState::Cancelled => ran,
                    StepState::Pending | StepState::Running => true,
                    StepState::Skipped => exists(c),
                };
                if bad {
                    let quorum = match held {
                        Some(h) => format!(
                            ", and its min_success {quorum:?} {} by its children's ends",
                            if h { "held" } else { "did not hold" }
                        ),
                        None => String::new(),
                    };
                    found.push((
                        r.node,
                        format!(
                            "run {} ({}): step {} is {} but its command is {end:?}{quorum}",
                            run.id,
                            run.state.as_str(),
                            st.name,
                            st.state.as_str()
                        ),
                    ));
                }
            }
            for comp in &run.spec.on_failure {
                // Started: on the box, or refused there (failed, no command).
                let refused = run
                    .steps
                    .iter()
                    .any(|s| s.name == *comp && s.state == StepState::Failed);
                let sent = exists(step_command_id(run.id, comp)) || refused;
                let want = match run.state {
                    RunState::Succeeded => Some(false),
                    RunState::Failed | RunState::TimedOut => Some(true),
                    _ => None,
                };
                if want.is_some_and(|w| w != sent) {
                    found.push((
                        r.node,
                        format!(
                            "run {} {}: its compensation step {comp} was sent: {sent}",
                            run.id,
                            run.state.as_str()
                        ),
                    ));
                }
            }
        }
        for (n, f) in found {
            self.violation(n, f);
        }
    }

    /// A lifecycle event, for the run that owns the command.
    pub(super) fn workflow_event(&mut self, n: usize, ev: &LifecycleEvent) {
        if self.runs.owned.contains_key(&ev.id) {
            self.runs.events.push((n, ev.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{walk, Config, World};
    use super::*;

    /// A world walked and settled clean, with at least one run that
    /// ended with a step its box ran: the checks then see a tampered run.
    fn settled() -> World {
        for seed in 320..340 {
            let mut w = World::new(seed, &Config::default());
            walk(&mut w, 3_000);
            w.settle();
            if w.report.violations.is_empty() && ran(&w).is_some() {
                return w;
            }
        }
        panic!("no seed in 320..340 ends a workflow with a step its box has succeeded");
    }

    /// An ended run's step that its box has as succeeded: (run, step).
    fn ran(w: &World) -> Option<(usize, usize)> {
        w.runs.iter().enumerate().find_map(|(i, r)| {
            if r.gone || r.live.state == RunState::Running {
                return None;
            }
            let core = &w.nodes[r.node].core;
            let s = r.live.steps.iter().position(|s| {
                s.state == StepState::Succeeded
                    && matches!(
                        core.lookup(step_command_id(r.live.id, &s.name)),
                        Lookup::Finished {
                            state: State::Succeeded,
                            ..
                        }
                    )
            })?;
            Some((i, s))
        })
    }

    #[test]
    fn the_end_check_catches_a_run_whose_step_says_what_its_box_did_not() {
        let mut w = settled();
        w.check_workflows_end();
        assert!(w.report.violations.is_empty(), "{:?}", w.report.violations);
        // The run's word against the box's: a step it ran, called failed.
        let (i, s) = ran(&w).unwrap();
        w.runs[i].live.steps[s].state = StepState::Failed;
        w.caught(
            World::check_workflows_end,
            "is failed but its command is Some(Succeeded)",
        );
    }

    /// A broadcast step with a quorum, judged by its children's ends on
    /// the box: one the run called succeeded, called failed, is caught.
    #[test]
    fn the_end_check_judges_a_tag_steps_quorum_by_its_childrens_ends() {
        let cfg = Config {
            workflow_groups: true,
            ..Config::default()
        };
        let found = (0..40).find_map(|seed| {
            let mut w = World::new(seed, &cfg);
            walk(&mut w, 3_000);
            w.settle();
            if !w.report.violations.is_empty() {
                return None;
            }
            let (i, s) = w.runs.iter().enumerate().find_map(|(i, r)| {
                let s = r.live.steps.iter().enumerate().position(|(k, st)| {
                    st.state == StepState::Succeeded
                        && r.live.spec.steps[k].min_success.is_some()
                        && matches!(
                            w.nodes[r.node]
                                .core
                                .lookup(step_command_id(r.live.id, &st.name)),
                            Lookup::Finished { .. }
                        )
                })?;
                (!r.gone && r.live.state != RunState::Running).then_some((i, s))
            })?;
            Some((w, i, s))
        });
        let (mut w, i, s) = found.expect("a seed in 0..40 ends a quorum step its box knows");
        assert!(w.report.counts.workflow_group_steps > 0);
        w.runs[i].live.steps[s].state = StepState::Failed;
        w.caught(World::check_workflows_end, "min_success");
    }

    #[test]
    fn the_end_check_catches_a_run_that_never_ended_and_a_start_that_sent_behind_a_lost_record() {
        let mut w = settled();
        let i = w
            .runs
            .iter()
            .position(|r| !r.gone && r.live.steps.iter().any(|s| s.command.is_some()))
            .unwrap();
        w.runs[i].live.state = RunState::Running;
        w.caught(World::check_workflows_end, "did not end");
        // Its start lost in a crash, yet its steps are on the box.
        w.runs[i].gone = true;
        w.runs[i].record = crate::sim::record::Record::new();
        w.caught(World::check_workflows_end, "start never returned, yet step");
    }
}

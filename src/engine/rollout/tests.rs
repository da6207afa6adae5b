//! The engine under a fake clock: no box, no devices, no time but `now`.

use super::*;
use std::collections::BTreeMap;
use std::time::Duration;

const MIN: Millis = 60_000;

fn plan() -> Plan {
    Plan {
        name: "t".into(),
        target: vec!["tag:t".into()],
        payload: b"go".to_vec(),
        artifact: None,
        priority: crate::Priority::Normal,
        max_attempts: 1,
        canary: None,
        rate: None,
        parallel: None,
        abort: Vec::new(),
        timeout: None,
        success: None,
        health: None,
        on_abort: None,
        edges: None,
    }
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("d{i:02}")).collect()
}

/// A rollout and what it asked for, with commands numbered as sent.
struct H {
    r: Rollout,
    now: Millis,
    next: u64,
    /// step → (command, when sent)
    sent: BTreeMap<String, (CommandId, Millis)>,
    cancelled: Vec<CommandId>,
    /// Every start of a device's command, in order: (device, when).
    starts: Vec<(String, Millis)>,
}

impl H {
    fn new(plan: Plan, devices: usize, online: usize) -> H {
        let devs = names(devices);
        let on = devs.iter().take(online).cloned().collect();
        let (r, actions) = Rollout::start(CommandId::new(1, 1), plan, devs, on, 0);
        let mut h = H {
            r,
            now: 0,
            next: 1,
            sent: BTreeMap::new(),
            cancelled: Vec::new(),
            starts: Vec::new(),
        };
        h.act(actions);
        h
    }

    fn act(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send {
                    step,
                    device,
                    rollback,
                } => {
                    assert!(
                        !self.sent.contains_key(&step),
                        "{step} sent twice: a device got the rollout twice"
                    );
                    self.next += 1;
                    let id = CommandId::new(self.now, self.next as u128);
                    self.r.sent(&step, id);
                    self.sent.insert(step, (id, self.now));
                    if !rollback {
                        self.starts.push((device, self.now));
                    }
                }
                Action::Cancel(c) => self.cancelled.push(c),
            }
        }
    }

    fn cmd(&self, step: &str) -> CommandId {
        self.sent[step].0
    }

    fn at(&mut self, t: Millis) {
        self.now = t;
        let a = self.r.tick(t);
        self.act(a);
    }

    fn take(&mut self, dev: &str) {
        let c = self.cmd(dev);
        self.r.taken(c, self.now);
    }

    fn end(&mut self, dev: &str, state: State, result: &str) {
        let c = self.cmd(dev);
        self.r.taken(c, self.now);
        let a = self.r.ended(
            c,
            End {
                state,
                rejected: false,
                result: Some(result.into()),
            },
            self.now,
        );
        self.act(a);
    }

    fn reject(&mut self, dev: &str) {
        let c = self.cmd(dev);
        let a = self.r.ended(
            c,
            End {
                state: State::Failed,
                rejected: true,
                result: Some("no".into()),
            },
            self.now,
        );
        self.act(a);
    }

    fn state(&self, dev: &str) -> DeviceState {
        self.r
            .devices
            .iter()
            .find(|d| d.device == dev)
            .unwrap()
            .state
    }

    /// Devices whose command is out and not ended.
    fn out(&self) -> Vec<String> {
        self.r
            .devices
            .iter()
            .filter(|d| matches!(d.state, DeviceState::Sent | DeviceState::Running))
            .map(|d| d.device.clone())
            .collect()
    }

    /// Run the clock to `until` a second at a time, every started device
    /// answering at once: `fails` names the ones that fail.
    fn run(&mut self, until: Millis, fails: &[&str]) {
        while self.now < until && !self.r.state.ended() {
            for d in self.out() {
                let st = if fails.contains(&d.as_str()) {
                    State::Failed
                } else {
                    State::Succeeded
                };
                self.end(&d, st, "ok");
            }
            let t = self.now + 1_000;
            self.at(t);
        }
    }

    /// The most starts in any minute (a window [t, t + 60 s)).
    fn busiest_minute(&self) -> usize {
        self.starts
            .iter()
            .map(|(_, t)| {
                self.starts
                    .iter()
                    .filter(|(_, u)| *u >= *t && *u < t + MIN)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

#[test]
fn a_rate_is_never_exceeded_in_any_minute() {
    let mut p = plan();
    p.rate = Some(Rate::parse("6/min").unwrap());
    let mut h = H::new(p, 40, 40);
    assert_eq!(h.starts.len(), 1, "the first device starts at once");
    assert_eq!(h.r.next_wake(), Some(10_000), "the next one 60 s / 6 later");
    h.run(10 * MIN, &[]);
    assert_eq!(h.busiest_minute(), 6);
    // Ten minutes at 6 a minute: 60 slots, 40 devices, all done.
    assert_eq!(h.r.state, RolloutState::Completed);
    let gaps: Vec<Millis> = h.starts.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert!(gaps.iter().all(|g| *g >= 10_000), "{gaps:?}");
}

#[test]
fn an_exponential_rate_steps_up_after_each_k_successes_to_its_cap() {
    let mut p = plan();
    p.rate = Some(Rate {
        per_minute: 2,
        factor: Some(2.0),
        every: 2,
        max_per_minute: Some(8),
    });
    let mut h = H::new(p, 30, 30);
    assert_eq!(h.r.rate_now(), Some(2.0));
    h.run(3 * MIN, &[]);
    let ok = h.r.count(|s| s == DeviceState::Succeeded) as u32;
    assert!(ok >= 6, "{ok} succeeded in 3 min");
    assert_eq!(
        h.r.rate_now(),
        Some(8.0),
        "2, 4, 8 (capped) after {ok} successes"
    );
    h.run(20 * MIN, &[]);
    assert_eq!(h.r.state, RolloutState::Completed);
    // 2 a minute (30 s apart) until two successes, then 4 (15 s), then
    // 8 (7.5 s, on this test's 1 s ticks), never faster.
    let gaps: Vec<Millis> = h.starts.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert_eq!(gaps[..3], [30_000, 15_000, 15_000], "{:?}", h.starts);
    assert!(gaps[3..].iter().all(|g| *g >= 7_500), "{gaps:?}");
    assert!(gaps.contains(&8_000), "{gaps:?}");
    assert!(h.busiest_minute() <= 8, "{}", h.busiest_minute());
}

#[test]
fn an_abort_rule_trips_at_its_share_once_the_minimum_has_finished() {
    let mut p = plan();
    p.abort = vec![AbortRule {
        on: FailKind::Failed,
        percent: 30,
        min: 4,
    }];
    p.on_abort = Some(b"undo".to_vec());
    p.rate = Some(Rate::parse("60/min").unwrap());
    let mut h = H::new(p, 20, 20);
    h.at(1_000);
    h.at(2_000);
    h.at(3_000);
    h.at(4_000);
    h.at(5_000);
    assert_eq!(h.out(), names(6));
    // One failure of 3 finished: 33 %, but under the minimum of 4.
    h.end("d00", State::Failed, "boom");
    h.end("d01", State::Succeeded, "ok");
    h.end("d02", State::Succeeded, "ok");
    assert_eq!(h.r.state, RolloutState::Running);
    // d03 takes its command; d04 and d05 are still queued when it trips.
    h.take("d03");
    h.end("d04", State::Succeeded, "ok");
    assert_eq!(
        h.r.state,
        RolloutState::Running,
        "1 of 4 is 25 %, under 30 %"
    );
    h.end("d05", State::Failed, "boom");
    assert_eq!(h.r.state, RolloutState::Aborted, "2 of 5 is 40 %");
    assert_eq!(h.r.tripped.as_deref(), Some("failed >= 30% (min 4)"));
    assert!(
        h.r.reason.as_deref().unwrap().contains("2 of 5"),
        "{:?}",
        h.r.reason
    );
    // Nothing new starts; the waiting are cancelled; d03 (taken) goes on.
    assert_eq!(h.state("d06"), DeviceState::Cancelled);
    assert_eq!(h.state("d03"), DeviceState::Running);
    let starts = h.starts.len();
    h.at(60_000);
    assert_eq!(h.starts.len(), starts);
    // The rollback went to every device that took it.
    let mut rolled: Vec<&str> = h
        .sent
        .keys()
        .filter_map(|k| k.strip_prefix("rollback/"))
        .collect();
    rolled.sort();
    assert_eq!(rolled, ["d00", "d01", "d02", "d03", "d04", "d05"]);
    // d03's end still lands.
    h.end("d03", State::Succeeded, "ok");
    assert_eq!(h.state("d03"), DeviceState::Succeeded);
    assert!(
        h.r.abort(h.now).is_err(),
        "an aborted rollout cannot abort again"
    );
}

#[test]
fn the_abort_cancels_a_command_not_yet_taken() {
    let mut p = plan();
    p.abort = vec![AbortRule {
        on: FailKind::Any,
        percent: 50,
        min: 1,
    }];
    let mut h = H::new(p, 3, 3);
    h.end("d00", State::Failed, "x");
    assert_eq!(h.r.state, RolloutState::Aborted);
    let (c1, c2) = (h.cmd("d01"), h.cmd("d02"));
    assert_eq!(h.cancelled, vec![c1, c2]);
    assert_eq!(h.state("d01"), DeviceState::Cancelled);
    assert!(
        h.sent.keys().all(|k| !k.starts_with("rollback/")),
        "no on_abort: no rollback"
    );
}

#[test]
fn each_kind_of_failure_counts_only_for_its_rule() {
    let mut p = plan();
    p.abort = vec![
        AbortRule {
            on: FailKind::Rejected,
            percent: 50,
            min: 2,
        },
        AbortRule {
            on: FailKind::TimedOut,
            percent: 50,
            min: 2,
        },
    ];
    p.timeout = Some(Duration::from_secs(30));
    let mut h = H::new(p.clone(), 6, 6);
    h.end("d00", State::Failed, "x");
    h.end("d01", State::Failed, "x");
    assert_eq!(
        h.r.state,
        RolloutState::Running,
        "failed counts for neither rule"
    );
    h.reject("d02");
    assert_eq!(h.r.state, RolloutState::Running, "1 of 3 rejected");
    h.reject("d03");
    assert_eq!(h.r.state, RolloutState::Aborted, "2 of 4 rejected: 50 %");
    assert_eq!(h.r.tripped.as_deref(), Some("rejected >= 50% (min 2)"));

    // Timeouts: both devices take it and never answer.
    let mut h = H::new(p, 2, 2);
    h.take("d00");
    h.now = 10_000;
    h.take("d01");
    assert_eq!(h.r.next_wake(), Some(30_000));
    h.at(29_999);
    assert_eq!(h.state("d00"), DeviceState::Running);
    h.at(30_000);
    assert_eq!(h.state("d00"), DeviceState::TimedOut);
    assert_eq!(h.cancelled, vec![h.cmd("d00")], "its command is cancelled");
    assert_eq!(
        h.r.state,
        RolloutState::Running,
        "1 finished, under the minimum"
    );
    h.at(40_000);
    assert_eq!(h.r.state, RolloutState::Aborted);
    assert_eq!(h.r.tripped.as_deref(), Some("timed_out >= 50% (min 2)"));
}

#[test]
fn a_timeout_counts_from_when_the_device_takes_it() {
    let mut p = plan();
    p.timeout = Some(Duration::from_secs(30));
    let mut h = H::new(p, 1, 1);
    // Queued for an hour (the device did not take it): not timed out.
    h.at(3_600_000);
    assert_eq!(h.state("d00"), DeviceState::Sent);
    assert_eq!(h.r.next_wake(), None, "nothing to wake for");
    h.take("d00");
    h.at(3_600_000 + 29_000);
    assert_eq!(h.state("d00"), DeviceState::Running);
    h.at(3_600_000 + 30_000);
    assert_eq!(h.state("d00"), DeviceState::TimedOut);
    assert_eq!(h.r.state, RolloutState::Completed, "no rule: it completes");
}

#[test]
fn offline_devices_wait_and_start_at_the_rate_when_they_come_back() {
    let mut p = plan();
    p.rate = Some(Rate::parse("2/min").unwrap());
    p.abort = vec![AbortRule {
        on: FailKind::Any,
        percent: 1,
        min: 1,
    }];
    let mut h = H::new(p, 6, 2);
    h.run(5 * MIN, &[]);
    assert_eq!(h.r.count(|s| s == DeviceState::Succeeded), 2);
    for d in ["d02", "d03", "d04", "d05"] {
        assert_eq!(
            h.state(d),
            DeviceState::Waiting,
            "offline is waiting, not failed"
        );
    }
    assert_eq!(h.r.state, RolloutState::Running);
    assert_eq!(h.r.next_wake(), None, "no one to start: no wake-up");
    // Four come back at once: they start at the rate, not all together.
    let now = h.now;
    let all: BTreeSet<String> = names(6).into_iter().collect();
    let a = h.r.presence(all, now);
    h.act(a);
    assert_eq!(h.out().len(), 1);
    h.run(now + 3 * MIN, &[]);
    assert_eq!(h.r.state, RolloutState::Completed);
    assert!(h.busiest_minute() <= 2);
}

#[test]
fn pause_holds_new_starts_and_resume_goes_on() {
    let mut p = plan();
    p.rate = Some(Rate::parse("60/min").unwrap());
    let mut h = H::new(p, 10, 10);
    h.run(3_000, &[]);
    let a = h.r.pause(h.now).unwrap();
    h.act(a);
    let started = h.starts.len();
    h.run(60_000, &[]);
    assert_eq!(h.starts.len(), started, "paused: nothing new");
    assert_eq!(h.r.state, RolloutState::Paused);
    assert_eq!(h.r.next_wake(), None);
    let a = h.r.resume(h.now).unwrap();
    h.act(a);
    assert!(h.r.resume(h.now).is_err(), "not paused");
    h.run(120_000, &[]);
    assert_eq!(h.r.state, RolloutState::Completed);
    assert!(h.r.pause(h.now).is_err(), "ended");
}

#[test]
fn a_canary_pauses_for_a_resume_or_waits_then_goes_on() {
    let mut p = plan();
    p.canary = Some(Canary {
        size: Size::Count(2),
        wait: None,
    });
    let mut h = H::new(p.clone(), 10, 10);
    assert_eq!(h.out(), ["d00", "d01"], "only the canary starts");
    h.end("d00", State::Succeeded, "ok");
    h.at(1_000);
    assert_eq!(h.out(), ["d01"], "the canary's size holds");
    h.end("d01", State::Succeeded, "ok");
    assert_eq!(h.r.state, RolloutState::Paused);
    assert!(h.r.reason.as_deref().unwrap().contains("rollout resume"));
    let a = h.r.resume(h.now).unwrap();
    h.act(a);
    assert_eq!(h.out().len(), 8, "no rate: the rest at once");

    p.canary = Some(Canary {
        size: Size::Percent(20),
        wait: Some(Duration::from_secs(600)),
    });
    let mut h = H::new(p, 10, 10);
    assert_eq!(h.out().len(), 2);
    h.now = 5_000;
    h.end("d00", State::Succeeded, "ok");
    h.end("d01", State::Succeeded, "ok");
    assert_eq!(h.r.state, RolloutState::Running);
    assert_eq!(h.r.next_wake(), Some(605_000));
    h.at(604_999);
    assert!(h.out().is_empty(), "still waiting");
    h.at(605_000);
    assert_eq!(h.out().len(), 8);
}

#[test]
fn a_failed_canary_trips_a_rule_whose_minimum_is_above_its_size() {
    let mut p = plan();
    p.canary = Some(Canary {
        size: Size::Count(2),
        wait: None,
    });
    p.abort = vec![AbortRule {
        on: FailKind::Failed,
        percent: 20,
        min: 10,
    }];
    let mut h = H::new(p, 50, 50);
    h.end("d00", State::Failed, "boom");
    assert_eq!(
        h.r.state,
        RolloutState::Running,
        "1 finished, the canary not over"
    );
    h.end("d01", State::Succeeded, "ok");
    assert_eq!(
        h.r.state,
        RolloutState::Aborted,
        "1 of the 2 canary devices failed"
    );
    assert_eq!(h.starts.len(), 2, "no device beyond the canary got it");
}

#[test]
fn success_is_the_result_meeting_the_condition() {
    let mut p = plan();
    p.success = Some(ResultMatch::Contains("version=2.1".into()));
    let mut h = H::new(p, 2, 2);
    h.end("d00", State::Succeeded, "flashed, version=2.1");
    h.end("d01", State::Succeeded, "flashed, version=2.0");
    assert_eq!(h.state("d00"), DeviceState::Succeeded);
    assert_eq!(h.state("d01"), DeviceState::Failed);
    let r = h.r.devices[1].result.as_deref().unwrap();
    assert!(r.contains("success condition"), "{r}");
    assert_eq!(h.r.state, RolloutState::Completed);
}

#[test]
fn a_rollout_reloaded_from_its_record_goes_on_where_it_was() {
    let mut p = plan();
    p.rate = Some(Rate::parse("6/min").unwrap());
    let mut h = H::new(p, 5, 5);
    h.run(25_000, &[]);
    let json = serde_json::to_vec(&h.r).unwrap();
    let mut back: Rollout = serde_json::from_slice(&json).unwrap();
    assert!(back.online.is_empty(), "presence is not kept");
    back.online = h.r.online.clone();
    assert_eq!(back, h.r);
    // The reloaded one starts the same device at the same time.
    let t = h.r.next_wake().unwrap();
    let a = back.tick(t);
    h.at(t);
    assert_eq!(a.len(), 1);
    assert_eq!(
        a[0],
        Action::Send {
            step: h.starts.last().unwrap().0.clone(),
            device: h.starts.last().unwrap().0.clone(),
            rollback: false
        }
    );
}

#[test]
fn with_a_health_time_success_waits_for_a_healthy_report_after_the_command() {
    use crate::engine::command::HealthReport;
    let mut p = plan();
    p.health = Some(Duration::from_secs(300));
    p.abort = vec![AbortRule {
        on: FailKind::TimedOut,
        percent: 100,
        min: 4,
    }];
    let mut h = H::new(p, 4, 4);
    let report = |healthy, command| HealthReport {
        healthy,
        command,
        detail: "fw 2.1".into(),
    };
    // A report before the command ended, naming no command: not this
    // change's verdict.
    let a = h.r.health("d00", &report(true, None), 0);
    h.act(a);
    h.end("d00", State::Succeeded, "flashed");
    assert_eq!(h.state("d00"), DeviceState::Verifying);
    assert_eq!(h.r.next_wake(), Some(300_000));
    h.now = 10_000;
    let a = h.r.health("d00", &report(true, None), h.now);
    h.act(a);
    assert_eq!(h.state("d00"), DeviceState::Succeeded);
    // Unhealthy after the change: failed, saying why.
    h.end("d01", State::Succeeded, "flashed");
    let a = h.r.health("d01", &report(false, None), h.now);
    h.act(a);
    assert_eq!(h.state("d01"), DeviceState::Failed);
    assert!(h.r.devices[1]
        .result
        .as_deref()
        .unwrap()
        .contains("unhealthy"));
    // A report naming the command, come before its end, is kept for it.
    let c = h.cmd("d02");
    let a = h.r.health("d02", &report(true, Some(c)), h.now);
    h.act(a);
    assert_eq!(h.state("d02"), DeviceState::Sent);
    h.end("d02", State::Succeeded, "flashed");
    assert_eq!(h.state("d02"), DeviceState::Succeeded);
    assert_eq!(h.r.devices[2].result.as_deref(), Some("flashed"));
    // No report at all: timed out at the health time.
    h.end("d03", State::Succeeded, "flashed");
    h.at(10_000 + 299_999);
    assert_eq!(h.state("d03"), DeviceState::Verifying);
    assert_eq!(
        h.r.state,
        RolloutState::Running,
        "verifying is not finished"
    );
    h.at(10_000 + 300_000);
    assert_eq!(h.state("d03"), DeviceState::TimedOut);
    assert_eq!(h.r.state, RolloutState::Completed);
}

#[test]
fn an_unhealthy_report_before_the_end_fails_the_device_with_its_detail() {
    use crate::engine::command::HealthReport;
    let mut p = plan();
    p.health = Some(Duration::from_secs(300));
    let mut h = H::new(p, 1, 1);
    let c = h.cmd("d00");
    let report = HealthReport {
        healthy: false,
        command: Some(c),
        detail: "no link".into(),
    };
    let a = h.r.health("d00", &report, 0);
    h.act(a);
    h.end("d00", State::Succeeded, "flashed");
    assert_eq!(h.state("d00"), DeviceState::Failed);
    let result = h.r.devices[0].result.as_deref().unwrap();
    assert!(result.contains("no link"), "{result}");
}

/// A plan that aborts once half the finished devices failed (of `on`'s
/// kind), with a rollback.
fn undoing(on: FailKind) -> Plan {
    let mut p = plan();
    p.abort = vec![AbortRule {
        on,
        percent: 50,
        min: 1,
    }];
    p.on_abort = Some(b"undo".to_vec());
    p
}

/// Found by the simulation: the abort cancels a command it believes
/// untaken, but the device had it already. When its end says it ran, the
/// device is counted as what it did and gets its rollback.
#[test]
fn a_command_the_abort_cancelled_that_ran_first_is_counted_and_rolled_back() {
    let p = undoing(FailKind::Any);
    let mut h = H::new(p, 2, 2);
    h.end("d00", State::Failed, "x");
    assert_eq!(h.r.state, RolloutState::Aborted);
    assert_eq!(h.state("d01"), DeviceState::Cancelled);
    assert!(
        !h.sent.contains_key("rollback/d01"),
        "not known to have run"
    );
    // The cancel lost the race: the device took it and it succeeded.
    h.end("d01", State::Succeeded, "done");
    assert_eq!(h.state("d01"), DeviceState::Succeeded);
    assert!(
        h.sent.contains_key("rollback/d01"),
        "a device that ran it is rolled back"
    );
    // A cancel that won leaves a device cancelled, with no rollback.
    let p = undoing(FailKind::Any);
    let mut h = H::new(p, 2, 2);
    h.end("d00", State::Failed, "x");
    let c = h.cmd("d01");
    let a = h.r.ended(
        c,
        End {
            state: State::Cancelled,
            rejected: false,
            result: None,
        },
        h.now,
    );
    h.act(a);
    assert_eq!(h.state("d01"), DeviceState::Cancelled);
    assert!(!h.sent.contains_key("rollback/d01"));
    // After a restart the cancelled command is looked up again: what
    // became of it may not have been heard.
    let mut p = undoing(FailKind::Any);
    p.on_abort = None;
    let mut h2 = H::new(p, 2, 2);
    h2.end("d00", State::Failed, "x");
    let (look, resend) = h2.r.reattach();
    assert!(look.contains(&h2.cmd("d01")), "{look:?}");
    assert!(resend.is_empty());
}

/// A device that times out after the abort (it was running then) is
/// rolled back too, not only those finished when the rule tripped.
#[test]
fn a_device_that_times_out_after_the_abort_gets_its_rollback() {
    let mut p = undoing(FailKind::Failed);
    p.timeout = Some(Duration::from_secs(30));
    let mut h = H::new(p, 2, 2);
    h.take("d01");
    // d01 is running; an immediate rollback goes to it at the abort.
    h.end("d00", State::Failed, "x");
    assert_eq!(h.r.state, RolloutState::Aborted);
    assert!(h.sent.contains_key("rollback/d00"));
    assert!(h.sent.contains_key("rollback/d01"));
    // Without a rollback sent at the abort (a record reloaded from before
    // it was), the timeout sends it.
    let mut p = undoing(FailKind::Failed);
    p.timeout = Some(Duration::from_secs(30));
    let mut h = H::new(p, 3, 3);
    h.take("d02");
    let a = h.r.abort(h.now).unwrap();
    let undo: Vec<&Action> = a
        .iter()
        .filter(|x| matches!(x, Action::Send { rollback: true, .. }))
        .collect();
    assert_eq!(undo.len(), 1, "only the running device: {a:?}");
    // Dropped (as a crash before its send would): the next tick sends it.
    assert!(h.r.devices[2].rollback.is_none());
    h.at(31_000);
    assert_eq!(h.state("d02"), DeviceState::TimedOut);
    assert!(h.sent.contains_key("rollback/d02"), "{:?}", h.sent.keys());
}

/// A send the box could not answer is made again while its device is
/// still out, and not once the rollout stopped it: an abort cancels it by
/// the id it was sent under instead.
#[test]
fn an_unanswered_send_is_made_again_only_while_its_device_is_out() {
    let p = undoing(FailKind::Any);
    let mut h = H::new(p, 2, 2);
    assert_eq!(
        h.r.resend("d01"),
        Some(Action::Send {
            step: "d01".into(),
            device: "d01".into(),
            rollback: false
        })
    );
    assert_eq!(h.r.resend("nobody"), None, "not one of its devices");
    h.end("d00", State::Failed, "x");
    assert_eq!(h.r.state, RolloutState::Aborted);
    assert!(
        h.cancelled.contains(&h.cmd("d01")),
        "the abort cancels it by its id"
    );
    assert_eq!(h.r.resend("d01"), None, "stopped: never sent again");
    // The failed device's rollback is out, so it may be made again.
    assert!(matches!(
        h.r.resend("rollback/d00"),
        Some(Action::Send { rollback: true, .. })
    ));
}

/// What a plan's targets name on the box: enrolled, not revoked, each
/// once, in order; every target that cannot be started says why.
#[test]
fn a_plan_target_resolves_to_each_enrolled_device_once_or_says_why_not() {
    use crate::engine::queue::core::DeviceView;
    let view = |id: &str, tags: &[&str], caps: &[&str], revoked: bool| {
        let mut record = crate::engine::journal::DeviceRecord::new(id);
        record.tags = tags.iter().map(|t| t.to_string()).collect();
        record.caps = caps.iter().map(|t| t.to_string()).collect();
        record.revoked = revoked;
        DeviceView {
            record,
            online: false,
            queued: 0,
            in_flight: 0,
            sync: None,
            shared_bundle: None,
        }
    };
    let all = vec![
        view("b", &["t"], &[], false),
        view("a", &["t"], &["gpu"], false),
        view("c", &["t"], &["gpu"], true),
        view("old", &[], &[], true),
    ];
    let t = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let resolve = |xs: &[&str]| plan::resolve(&t(xs), &all);
    assert_eq!(
        resolve(&["tag:t", "cap:gpu", "b"]),
        Ok(t(&["a", "b"])),
        "sorted within a target, each once, revoked left out"
    );
    let err = |xs: &[&str]| resolve(xs).unwrap_err();
    assert!(
        err(&["old"]).contains("device old is revoked; take it out"),
        "{}",
        err(&["old"])
    );
    assert!(err(&["ghost"]).contains("no device ghost is enrolled on this box (`outpost devices`"));
    assert!(
        err(&["edge-1/tag:t"]).contains("start it on that box"),
        "{}",
        err(&["edge-1/tag:t"])
    );
    assert!(err(&["tag:none"]).contains("the target tag:none matches no enrolled device"));
    assert!(err(&["tag:"]).contains("tag"), "{}", err(&["tag:"]));
    let many: Vec<DeviceView> = (0..=plan::MAX_DEVICES)
        .map(|i| view(&format!("d{i}"), &["big"], &[], false))
        .collect();
    let e = plan::resolve(&t(&["tag:big"]), &many).unwrap_err();
    assert!(
        e.contains(&format!(
            "a rollout spans at most {}: split it",
            plan::MAX_DEVICES
        )),
        "{e}"
    );
}

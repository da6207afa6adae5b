//! Tests of the sans-IO core, driven round by round against an in-memory
//! "disk" that applies each sealed group exactly as the store does, so a
//! restart can be replayed without sled.
//!
//! Why one file of 2,800 lines: every test drives the core through the
//! harness `H` (rounds, a crash and its replay, `H::check` after each
//! step), and a split would either copy the harness or make each part
//! reach into another's.

use super::*;
use crate::engine::command::SendOptions;
use proptest::prelude::*;

#[derive(Default, Clone)]
struct MemDisk {
    journal: BTreeMap<u64, Vec<Entry>>,
    results: BTreeMap<u64, Vec<ResultRecord>>,
    outbox: BTreeMap<u64, Vec<UpEntry>>,
    outbox_next: Option<u64>,
    devices: BTreeMap<String, DeviceRecord>,
    cursors: BTreeMap<String, crate::engine::journal::Cursor>,
    cancel_marks: BTreeSet<CommandId>,
}

impl MemDisk {
    fn apply(&mut self, w: GroupWrite) {
        if !w.journal.is_empty() {
            self.journal.insert(w.seq, w.journal);
        }
        if !w.results.is_empty() {
            self.results.insert(w.seq, w.results);
        }
        for s in w.drop_journal {
            self.journal.remove(&s);
        }
        for s in w.drop_results {
            self.results.remove(&s);
        }
        assert!(
            w.outbox.is_empty() || !self.outbox.contains_key(&w.seq),
            "group {} written twice",
            w.seq
        );
        if !w.outbox.is_empty() {
            self.outbox.insert(w.seq, w.outbox);
        }
        for s in w.drop_outbox {
            self.outbox.remove(&s);
        }
        if w.outbox_next.is_some() {
            self.outbox_next = w.outbox_next;
        }
        self.cursors.extend(w.cursors);
        for (id, set) in w.cancel_marks {
            if set {
                self.cancel_marks.insert(id);
            } else {
                self.cancel_marks.remove(&id);
            }
        }
    }

    fn groups(&self) -> Vec<Group> {
        let mut seqs: BTreeSet<u64> = self.journal.keys().copied().collect();
        seqs.extend(self.results.keys());
        let mut out = Vec::new();
        for s in seqs {
            if let Some(j) = self.journal.get(&s) {
                out.push(Group::Journal(s, j.clone()));
            }
            if let Some(r) = self.results.get(&s) {
                out.push(Group::Results(s, r.clone()));
            }
        }
        out
    }

    fn result(&self, id: CommandId) -> Option<ResultRecord> {
        self.results
            .values()
            .flatten()
            .rev()
            .find(|r| r.id == id)
            .cloned()
    }
}

struct H {
    core: QueueCore,
    disk: MemDisk,
    now: Millis,
    limits: Limits,
    sessions: HashMap<String, u64>,
    /// Every delivery made, per device, in order.
    delivered: HashMap<String, Vec<DeliverEffect>>,
    cancels: Vec<(DeviceId, CommandId)>,
    events: Vec<LifecycleEvent>,
    reopens: u64,
    /// The outbox's bound, when it is on.
    outbox: Option<u64>,
}

impl H {
    fn new(limits: Limits) -> Self {
        H {
            core: QueueCore::new(limits.clone(), 7),
            disk: MemDisk::default(),
            now: 1_000_000,
            limits,
            sessions: HashMap::new(),
            delivered: HashMap::new(),
            cancels: Vec::new(),
            events: Vec::new(),
            reopens: 0,
            outbox: None,
        }
    }

    fn with_devices(limits: Limits, n: usize) -> Self {
        H::with_records(limits, (0..n).map(|i| dev(&format!("d{i}"))).collect())
    }

    fn with_records(limits: Limits, records: Vec<DeviceRecord>) -> Self {
        let mut h = H::new(limits);
        for r in records {
            h.core.enroll(r, h.now);
        }
        h.round();
        h
    }

    /// Seal, "write", take effects — what the writer thread does.
    fn round(&mut self) {
        // The round the writer and the simulation run.
        let round = self.core.round(self.now, &mut &self.disk.journal);
        assert!(
            round.missing_payloads.is_empty(),
            "a retryable result's payload is on disk: {:?}",
            round.missing_payloads
        );
        let (w, fx) = (round.write, round.effects);
        self.disk.apply(w);
        for r in fx.device_writes.into_iter().chain(fx.device_touches) {
            self.disk.devices.insert(r.id.clone(), r);
        }
        for d in fx.deliveries {
            self.delivered.entry(d.device.clone()).or_default().push(d);
        }
        self.cancels.extend(fx.cancels);
        self.events.extend(fx.events);
    }

    fn send(&mut self, target: &str, opts: SendOptions) -> Result<SendReceipt, QueueError> {
        let r = self.core.send(
            SendRequest {
                target: target.into(),
                payload: format!("payload-{}", self.now).into_bytes(),
                opts,
                origin: "cli".into(),
                signature: None,
            },
            self.now,
        );
        self.round();
        r
    }

    fn send_prio(&mut self, target: &str, p: Priority) -> CommandId {
        self.send(
            target,
            SendOptions {
                priority: p,
                ..Default::default()
            },
        )
        .unwrap()
        .id
    }

    fn connect(&mut self, d: &str) {
        let t = self.core.connect(d, 0, self.now).unwrap();
        self.sessions.insert(d.into(), t);
        self.round();
    }

    fn disconnect(&mut self, d: &str) {
        if let Some(t) = self.sessions.remove(d) {
            self.core.disconnect(d, t, self.now);
            self.round();
        }
    }

    fn ack(&mut self, d: &str, id: CommandId, o: Outcome) -> Result<(), QueueError> {
        let r = self.core.ack(d, id, o, self.now);
        self.round();
        r
    }

    /// `n` commands to `d` (connected), each acked Ok, the invariants
    /// checked after each: traffic that moves the journal head on.
    fn traffic(&mut self, d: &str, n: usize) {
        for _ in 0..n {
            let id = self.send_prio(d, Priority::Normal);
            self.ack(d, id, ok()).unwrap();
            self.check();
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.core.tick(self.now);
        self.round();
    }

    fn ids(&self, d: &str) -> Vec<CommandId> {
        self.delivered
            .get(d)
            .map(|v| v.iter().map(|x| x.id).collect())
            .unwrap_or_default()
    }

    fn state(&self, id: CommandId) -> Option<State> {
        self.core.state_of(id)
    }

    /// Crash and restart: a fresh core from what is on "disk".
    fn reopen(&mut self) {
        self.reopens += 1;
        let mut core = QueueCore::new(self.limits.clone(), self.reopens);
        for r in self.disk.devices.values() {
            core.replay_device(r.clone());
        }
        for (e, c) in &self.disk.cursors {
            core.replay_cursor(e.clone(), *c);
        }
        for id in &self.disk.cancel_marks {
            core.replay_cancelling(*id);
        }
        if let Some(max) = self.outbox {
            core.enable_outbox(max);
            core.replay_outbox_seq(self.disk.outbox_next.unwrap_or(1));
            for (g, e) in &self.disk.outbox {
                core.replay_outbox(*g, e, self.now);
            }
        }
        for g in self.disk.groups() {
            core.replay_group(g);
        }
        core.finish_replay(self.now);
        self.core = core;
        self.sessions.clear();
        self.round();
    }

    /// Invariants that hold after every round.
    fn check(&self) {
        let c = &self.core;
        // What memory alone must satisfy: the core's own check.
        if let Err(e) = c.check_invariants() {
            panic!("{e}");
        }
        // What must also be on the disk.
        for (id, l) in c.live.iter() {
            assert!(
                self.disk
                    .journal
                    .get(&l.group)
                    .is_some_and(|g| g.iter().any(|e| e.enqueues(id, l.gen))),
                "{id}: its journal group {} is not on disk",
                l.group
            );
            if let Some(rg) = l.requeue_group {
                assert!(
                    self.disk.journal.get(&rg).is_some_and(|g| g.iter().any(
                        |e| matches!(e, Entry::Requeued { id: x, gen, attempts, .. } if *x == id && *gen == l.gen && *attempts == l.attempts)
                    )),
                    "{id}: its latest requeue (group {rg}) is not on disk"
                );
            }
        }
        for (pid, p) in &c.parents {
            assert!(
                self.disk.journal.get(&p.group).is_some_and(|g| g
                    .iter()
                    .any(|e| matches!(e, Entry::Broadcast(b) if b.command.id == *pid))),
                "{pid}: its broadcast entry is not on disk"
            );
        }
        if self.outbox.is_some() {
            let seqs: Vec<u64> = self.disk.outbox.values().flatten().map(|e| e.seq).collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "outbox seqs out of order: {seqs:?}"
            );
            assert_eq!(c.outbox_stats().depth, seqs.len() as u64, "outbox depth");
            assert!(seqs.last().is_none_or(|&l| l < c.outbox_stats().next_seq));
        }
        for (id, &(seq, _)) in &c.results {
            assert!(
                self.disk
                    .results
                    .get(&seq)
                    .is_some_and(|g| g.iter().any(|r| r.id == *id)),
                "result of {id} not on disk at {seq}"
            );
        }
    }
}

fn dev(id: &str) -> DeviceRecord {
    DeviceRecord::new(id)
}

fn labelled(id: &str, tags: &[&str], caps: &[&str]) -> DeviceRecord {
    DeviceRecord {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        caps: caps.iter().map(|c| c.to_string()).collect(),
        ..DeviceRecord::new(id)
    }
}

fn ok() -> Outcome {
    Outcome::Ok(b"done".to_vec())
}

fn fail() -> Outcome {
    Outcome::Failed {
        code: 1,
        message: "boom".into(),
    }
}

#[test]
fn send_deliver_ack_succeeds_and_frees_the_journal() {
    let mut h = H::with_devices(Limits::default(), 1);
    let id = h.send_prio("d0", Priority::Normal);
    assert_eq!(h.state(id), Some(State::Queued));
    h.connect("d0");
    assert_eq!(h.ids("d0"), vec![id]);
    assert_eq!(h.state(id), Some(State::Delivered { attempt: 1 }));
    h.ack("d0", id, ok()).unwrap();
    assert_eq!(h.state(id), Some(State::Succeeded));
    let r = h.disk.result(id).unwrap();
    assert_eq!(r.outcome, Some(ok()));
    assert_eq!(r.attempts, 1);
    assert!(
        !h.disk.journal.is_empty(),
        "kept until a round after the one that ended it is durable"
    );
    h.round();
    assert!(
        h.disk.journal.is_empty(),
        "finished command's group is dropped"
    );
    h.check();
}

#[test]
fn priority_then_fifo() {
    let mut h = H::with_devices(Limits::default(), 1);
    let a = h.send_prio("d0", Priority::Normal);
    let b = h.send_prio("d0", Priority::Normal);
    let c = h.send_prio("d0", Priority::Low);
    let d = h.send_prio("d0", Priority::High);
    let e = h.send_prio("d0", Priority::High);
    h.connect("d0");
    assert_eq!(h.ids("d0"), vec![d, e, a, b, c]);
    let listed: Vec<_> = h
        .core
        .list("d0")
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(listed, vec![d, e, a, b, c]);
}

#[test]
fn the_window_bounds_what_is_in_flight() {
    let limits = Limits {
        window: 4,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 1);
    let ids: Vec<_> = (0..10)
        .map(|_| h.send_prio("d0", Priority::Normal))
        .collect();
    h.connect("d0");
    assert_eq!(h.ids("d0"), ids[..4].to_vec());
    h.ack("d0", ids[2], ok()).unwrap();
    assert_eq!(h.ids("d0"), ids[..5].to_vec());
    h.check();
}

#[test]
fn failures_back_off_then_go_dead_and_retry_revives() {
    let limits = Limits {
        backoff_base_ms: 1000,
        backoff_cap_ms: 10_000,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 1);
    let id = h
        .send(
            "d0",
            SendOptions {
                max_attempts: Some(3),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    h.connect("d0");
    h.ack("d0", id, fail()).unwrap();
    assert_eq!(h.state(id), Some(State::Queued));
    let nb = h.core.live[&id].not_before.unwrap();
    assert!(
        nb >= h.now + 500 && nb <= h.now + 1000,
        "first backoff in [base/2, base]"
    );
    assert_eq!(h.ids("d0").len(), 1, "not redelivered before its backoff");
    h.advance(1000);
    assert_eq!(h.ids("d0"), vec![id, id]);
    assert_eq!(h.delivered["d0"][1].attempt, 2);
    h.ack("d0", id, fail()).unwrap();
    h.advance(2000);
    h.ack("d0", id, fail()).unwrap();
    assert_eq!(h.state(id), Some(State::Dead));
    let r = h.disk.result(id).unwrap();
    assert_eq!(r.attempts, 3);
    assert!(
        r.command
            .as_ref()
            .is_some_and(|c| c.payload.starts_with(b"payload-")),
        "payload kept for retry"
    );
    assert_eq!(h.core.stats().dead, 1);

    let v = h.core.retry(r, h.now).unwrap();
    h.round();
    assert_eq!(
        v.state,
        State::Delivered { attempt: 4 },
        "retried and delivered at once, attempt numbers continuing"
    );
    assert_eq!(
        v.max_attempts, 6,
        "a fresh budget of 3 on top of the 3 used"
    );
    assert_eq!(h.core.stats().dead, 0);
    h.ack("d0", id, ok()).unwrap();
    assert_eq!(h.state(id), Some(State::Succeeded));
    h.check();
}

#[test]
fn an_ack_of_an_earlier_attempt_does_not_end_the_one_in_flight() {
    let mut h = H::with_devices(Limits::default(), 1);
    let id = h.send_prio("d0", Priority::Normal);
    h.connect("d0");
    assert_eq!(h.state(id), Some(State::Delivered { attempt: 1 }));
    // Attempt 1 fails; after its backoff, attempt 2 is delivered.
    let failed = Outcome::Failed {
        code: 1,
        message: "old".into(),
    };
    h.core
        .ack_attempt("d0", id, Some(1), failed.clone(), h.now)
        .unwrap();
    h.round();
    h.advance(600_000);
    let Some(State::Delivered { attempt: current }) = h.state(id) else {
        panic!("redelivered: {:?}", h.state(id));
    };
    assert_eq!(current, 2);
    // A second copy of attempt 1's failure arrives late: it changes nothing
    // (it used to end attempt 2 with attempt 1's outcome).
    let late = h.core.ack_attempt("d0", id, Some(1), failed, h.now);
    assert_eq!(
        late,
        Err(QueueError::StaleAttempt {
            id,
            acked: 1,
            current
        })
    );
    h.round();
    assert_eq!(h.state(id), Some(State::Delivered { attempt: current }));
    assert_eq!(h.core.stats().acked_total, 1, "a stale ack is not counted");
    // The current attempt's own ack ends it.
    h.core
        .ack_attempt("d0", id, Some(current), ok(), h.now)
        .unwrap();
    h.round();
    assert_eq!(h.state(id), Some(State::Succeeded));
    h.check();
}

#[test]
fn rejected_is_failed_without_retry() {
    let mut h = H::with_devices(Limits::default(), 1);
    let id = h.send_prio("d0", Priority::Normal);
    h.connect("d0");
    h.ack(
        "d0",
        id,
        Outcome::Rejected {
            reason: "bad payload".into(),
        },
    )
    .unwrap();
    assert_eq!(h.state(id), Some(State::Failed));
}

#[test]
fn ttl_expires_queued_and_in_flight_commands() {
    let mut h = H::with_devices(Limits::default(), 2);
    let q = h
        .send(
            "d0",
            SendOptions {
                ttl_ms: Some(1000),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    let f = h
        .send(
            "d1",
            SendOptions {
                ttl_ms: Some(1000),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    h.connect("d1");
    assert_eq!(h.core.next_deadline(), Some(h.now + 1000));
    h.advance(999);
    assert_eq!(h.state(q), Some(State::Queued));
    h.advance(1);
    assert_eq!(h.state(q), Some(State::Expired));
    assert_eq!(h.state(f), Some(State::Expired));
    assert_eq!(
        h.cancels,
        vec![("d1".to_string(), f)],
        "the device holding it is told"
    );
    assert!(matches!(
        h.ack("d1", f, ok()),
        Err(QueueError::NotInFlight { .. })
    ));
    h.check();
}

#[test]
fn a_backward_clock_jump_expires_nothing_early() {
    let mut h = H::with_devices(Limits::default(), 1);
    let id = h
        .send(
            "d0",
            SendOptions {
                ttl_ms: Some(1000),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    h.now -= 60_000;
    h.core.tick(h.now);
    h.round();
    h.advance(59_999);
    assert_eq!(h.state(id), Some(State::Queued));
}

#[test]
fn bad_transitions_are_clear_errors() {
    let mut h = H::with_devices(Limits::default(), 2);
    let id = h.send_prio("d0", Priority::Normal);
    let ghost = CommandId::new(1, 1);
    assert!(
        matches!(h.ack("d0", id, ok()), Err(QueueError::NotInFlight { .. })),
        "not delivered yet"
    );
    h.connect("d0");
    h.connect("d1");
    let e = h.ack("d1", id, ok()).unwrap_err();
    assert!(
        e.to_string().contains("not in flight on device `d1`"),
        "{e}"
    );
    assert!(matches!(
        h.ack("d0", ghost, ok()),
        Err(QueueError::NotInFlight { .. })
    ));
    h.ack("d0", id, ok()).unwrap();
    assert!(
        matches!(h.ack("d0", id, ok()), Err(QueueError::NotInFlight { .. })),
        "ack twice"
    );
    let e = h.core.cancel(id, h.now).unwrap_err();
    assert!(matches!(
        e,
        QueueError::InvalidTransition {
            state: State::Succeeded,
            ..
        }
    ));
    assert!(e.to_string().contains("is succeeded: cannot cancel"), "{e}");
    assert!(matches!(
        h.core.cancel(ghost, h.now),
        Err(QueueError::NotFound(_))
    ));
    assert!(matches!(
        h.send("nope", SendOptions::default()),
        Err(QueueError::UnknownDevice(_))
    ));
    assert!(matches!(
        h.send("tag:x", SendOptions::default()),
        Err(QueueError::NoRoute(_))
    ));
    assert!(matches!(
        h.send("tag:", SendOptions::default()),
        Err(QueueError::BadRequest(_))
    ));
}

#[test]
fn cancel_of_queued_and_in_flight() {
    let limits = Limits {
        window: 1,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 1);
    let a = h.send_prio("d0", Priority::Normal);
    let b = h.send_prio("d0", Priority::Normal);
    h.connect("d0");
    h.core.cancel(b, h.now).unwrap();
    h.core.cancel(a, h.now).unwrap();
    h.round();
    assert_eq!(h.state(a), Some(State::Cancelled));
    assert_eq!(h.state(b), Some(State::Cancelled));
    assert_eq!(
        h.cancels,
        vec![("d0".to_string(), a)],
        "only the in-flight one is cancelled on the device"
    );
    h.check();
}

#[test]
fn idempotency_key_returns_the_first_id_across_restarts() {
    let mut h = H::with_devices(Limits::default(), 1);
    let opts = SendOptions {
        key: Some("k1".into()),
        ..Default::default()
    };
    let a = h.send("d0", opts.clone()).unwrap();
    let b = h.send("d0", opts.clone()).unwrap();
    assert_eq!(a.id, b.id);
    assert!(!a.duplicate && b.duplicate);
    h.reopen();
    let c = h.send("d0", opts.clone()).unwrap();
    assert_eq!(c.id, a.id);
    assert_eq!(h.core.stats().queued, 1);
    h.now += h.limits.key_window_ms;
    let d = h.send("d0", opts).unwrap();
    assert_ne!(d.id, a.id, "a key is forgotten after its window");
}

#[test]
fn after_waits_for_success_and_dies_with_its_dependency() {
    let mut h = H::with_devices(Limits::default(), 1);
    let a = h.send_prio("d0", Priority::Normal);
    let b = h
        .send(
            "d0",
            SendOptions {
                after: Some(a),
                priority: Priority::High,
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    let c = h.send_prio("d0", Priority::Normal);
    let d = h
        .send(
            "d0",
            SendOptions {
                after: Some(c),
                max_attempts: Some(1),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    h.connect("d0");
    assert_eq!(
        h.ids("d0"),
        vec![a, c],
        "dependents wait despite their priority"
    );
    h.reopen(); // the blocked state survives a restart
    h.connect("d0");
    h.ack("d0", a, ok()).unwrap();
    assert!(h.ids("d0").ends_with(&[b]));
    h.ack(
        "d0",
        c,
        Outcome::Rejected {
            reason: "no".into(),
        },
    )
    .unwrap();
    assert_eq!(h.state(d), Some(State::Dead));
    assert!(h
        .disk
        .result(d)
        .unwrap()
        .error
        .unwrap()
        .contains("DependencyFailed"));
    // An `after` on a command already dead is settled at once.
    let e = h
        .send(
            "d0",
            SendOptions {
                after: Some(d),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(e.state, State::Dead);
    let ghost = CommandId::new(5, 5);
    assert!(matches!(
        h.send(
            "d0",
            SendOptions {
                after: Some(ghost),
                ..Default::default()
            }
        ),
        Err(QueueError::UnknownDependency(_))
    ));
    h.check();
}

#[test]
fn not_before_holds_delivery_until_its_time() {
    let mut h = H::with_devices(Limits::default(), 1);
    h.connect("d0");
    let id = h
        .send(
            "d0",
            SendOptions {
                not_before: Some(h.now + 5000),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    assert!(h.ids("d0").is_empty());
    h.reopen();
    h.connect("d0");
    h.advance(5000);
    assert_eq!(h.ids("d0"), vec![id]);
}

#[test]
fn a_drop_returns_in_flight_commands_without_using_an_attempt() {
    let mut h = H::with_devices(Limits::default(), 1);
    let id = h.send_prio("d0", Priority::Normal);
    h.connect("d0");
    h.disconnect("d0");
    assert_eq!(h.state(id), Some(State::Queued));
    h.connect("d0");
    assert_eq!(h.ids("d0"), vec![id, id]);
    assert_eq!(h.delivered["d0"][1].attempt, 1);
    // A crash while in flight does not use one either.
    h.reopen();
    h.connect("d0");
    assert_eq!(h.delivered["d0"][2].attempt, 1);
    h.check();
}

#[test]
fn a_second_session_replaces_the_first() {
    let mut h = H::with_devices(Limits::default(), 1);
    let id = h.send_prio("d0", Priority::Normal);
    h.connect("d0");
    let old = h.sessions["d0"];
    h.connect("d0");
    assert_ne!(h.sessions["d0"], old);
    assert_eq!(h.delivered["d0"].len(), 2, "redelivered on the new session");
    h.core.disconnect("d0", old, h.now); // the stale session's goodbye is ignored
    h.round();
    assert_eq!(h.state(id), Some(State::Delivered { attempt: 1 }));
}

#[test]
fn full_queue_refuses_or_sheds_a_lower_priority() {
    let limits = Limits {
        max_queued: 3,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 1);
    let _a = h.send_prio("d0", Priority::Normal);
    let b = h.send_prio("d0", Priority::Low);
    let c = h.send_prio("d0", Priority::Low);
    let e = h
        .send(
            "d0",
            SendOptions {
                priority: Priority::Low,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            QueueError::QueueFull {
                queued: 3,
                limit: 3
            }
        ) && e.is_refusal()
    );
    let hi = h.send_prio("d0", Priority::High);
    assert_eq!(
        h.state(c),
        Some(State::Shed),
        "the newest of the lowest priority goes"
    );
    assert_eq!(h.state(b), Some(State::Queued));
    assert_eq!(h.state(hi), Some(State::Queued));
    assert!(h.disk.result(c).unwrap().error.unwrap().contains("shed"));
}

#[test]
fn disk_budget_refuses_new_commands() {
    let limits = Limits {
        max_disk: Some(1000),
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 1);
    h.core.set_disk_usage(2000);
    let e = h.send("d0", SendOptions::default()).unwrap_err();
    assert!(matches!(
        e,
        QueueError::DiskFull {
            used: 2000,
            limit: 1000
        }
    ));
    h.core.set_disk_usage(10);
    h.send("d0", SendOptions::default()).unwrap();
}

#[test]
fn enrolling_an_existing_id_is_refused_without_force_and_the_pin_survives_a_reopen() {
    let mut h = H::with_devices(Limits::default(), 1);
    let pinned = |n: u8| DeviceRecord {
        cert: Some([n; 32]),
        ..dev("d0")
    };
    let e = h.core.enroll_new(pinned(1), false, h.now).unwrap_err();
    assert_eq!(
        e,
        QueueError::AlreadyEnrolled {
            id: "d0".into(),
            revoked: false
        }
    );
    h.core.revoke("d0", h.now).unwrap();
    let e = h.core.enroll_new(pinned(1), false, h.now).unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("revoked"), "{e}");
    h.core.enroll_new(pinned(2), true, h.now).unwrap();
    h.core.enroll_new(pinned(3), false, h.now).unwrap_err();
    h.round();
    h.reopen();
    let d = h.core.devices();
    assert_eq!(
        (d[0].record.revoked, d[0].record.cert),
        (false, Some([2; 32]))
    );
    h.connect("d0");
}

#[test]
fn revoked_devices_get_nothing_new_and_cannot_connect() {
    let mut h = H::with_devices(Limits::default(), 1);
    h.connect("d0");
    h.core.revoke("d0", h.now).unwrap();
    let fx = h.core.take_effects();
    assert_eq!(fx.close_sessions, vec!["d0".to_string()]);
    assert!(matches!(
        h.core.connect("d0", 0, h.now),
        Err(QueueError::Revoked(_))
    ));
    assert!(matches!(
        h.send("d0", SendOptions::default()),
        Err(QueueError::Revoked(_))
    ));
    h.core.enroll(dev("d0"), h.now);
    h.round();
    h.reopen();
    h.connect("d0");
}

#[test]
fn a_straggler_pins_no_more_than_its_own_group() {
    let limits = Limits {
        relocate_lag: 8,
        relocate_max_pins: 4,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 2);
    let stuck = h.send_prio("d0", Priority::Normal); // d0 never connects
    h.connect("d1");
    h.traffic("d1", 200);
    assert!(
        h.disk.journal.len() <= 3,
        "journal stays bounded: {} groups",
        h.disk.journal.len()
    );
    h.reopen();
    h.connect("d0");
    assert_eq!(h.ids("d0"), vec![stuck]);
    h.check();
}

#[test]
fn a_group_with_more_stragglers_than_the_limit_still_moves_so_retention_works() {
    let limits = Limits {
        relocate_lag: 8,
        relocate_max_pins: 4,
        results_max: 10,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 2);
    // Five for d0, which never connects, in one group: one more than a
    // cheap move.
    let stuck: Vec<CommandId> = (0..5)
        .map(|i| {
            let req = SendRequest {
                target: "d0".into(),
                payload: vec![i],
                opts: SendOptions::default(),
                origin: "cli".into(),
                signature: None,
            };
            h.core.send(req, h.now).unwrap().id
        })
        .collect();
    h.round();
    h.connect("d1");
    h.traffic("d1", 200);
    assert!(
        h.core.results.len() <= 11,
        "results stay within their retention: {} kept",
        h.core.results.len()
    );
    assert!(h.disk.journal.len() <= 3, "{} groups", h.disk.journal.len());
    h.reopen();
    h.connect("d0");
    let mut got = h.ids("d0");
    got.sort();
    let mut want = stuck.clone();
    want.sort();
    assert_eq!(got, want);
    h.check();
}

#[test]
fn results_are_kept_within_retention_and_never_contradict_the_journal() {
    let limits = Limits {
        results_max: 10,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 1);
    h.connect("d0");
    h.traffic("d0", 50);
    assert!(h.core.results.len() <= 11, "{}", h.core.results.len());
    h.check();
    h.reopen();
    assert!(
        h.core.live.is_empty(),
        "no dropped result resurrects a command"
    );
}

#[test]
fn a_relocated_dependent_keeps_its_decided_dependency_after_retention() {
    // d1 is offline, so the dependent outlives its dependency; traffic
    // relocates it past the dependency's result, which retention then
    // drops. Its copy must say the dependency is decided, or a restart
    // looks for that result, finds none, and ends it Dead.
    let limits = Limits {
        relocate_lag: 2,
        relocate_max_pins: 4,
        results_max: 4,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 3);
    h.connect("d0");
    let dep = h.send_prio("d0", Priority::Normal);
    let dependent = h
        .send(
            "d1",
            SendOptions {
                after: Some(dep),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    h.ack("d0", dep, ok()).unwrap();
    h.connect("d2");
    h.traffic("d2", 40);
    assert!(
        !h.core.results.contains_key(&dep),
        "retention dropped the dependency's result"
    );
    h.reopen();
    h.check();
    assert_eq!(h.state(dependent), Some(State::Queued));
    h.connect("d1");
    assert_eq!(h.ids("d1"), vec![dependent]);
}

// ----- property tests -----------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Send {
        dev: u8,
        prio: u8,
        ttl: Option<u16>,
        key: Option<u8>,
        after: bool,
        max_attempts: u8,
    },
    Connect(u8),
    Disconnect(u8),
    Ack {
        dev: u8,
        pick: u8,
        kind: u8,
    },
    Cancel(u8),
    Retry(u8),
    Advance(u16),
    Reopen,
    /// Toggle a device's `cam` capability and `a` tag.
    Relabel(u8),
    /// Connect offering only some capabilities (narrowing).
    ConnectNarrow(u8),
    Revoke(u8),
    Reenroll(u8),
    /// The upstream acknowledges this many more outbox entries.
    UpAck(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..5u8, 0..3u8, proptest::option::of(1..3000u16), proptest::option::of(0..4u8), any::<bool>(), 1..4u8)
            .prop_map(|(dev, prio, ttl, key, after, max_attempts)| Op::Send { dev, prio, ttl, key, after, max_attempts }),
        2 => (0..3u8).prop_map(Op::Connect),
        1 => (0..3u8).prop_map(Op::Disconnect),
        4 => (0..3u8, any::<u8>(), 0..3u8).prop_map(|(dev, pick, kind)| Op::Ack { dev, pick, kind }),
        1 => any::<u8>().prop_map(Op::Cancel),
        1 => any::<u8>().prop_map(Op::Retry),
        2 => (0..5000u16).prop_map(Op::Advance),
        1 => Just(Op::Reopen),
        1 => (0..3u8).prop_map(Op::Relabel),
        1 => (0..3u8).prop_map(Op::ConnectNarrow),
        1 => (0..3u8).prop_map(Op::Revoke),
        1 => (0..3u8).prop_map(Op::Reenroll),
        1 => any::<u8>().prop_map(Op::UpAck),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let limits = Limits {
            window: 3,
            backoff_base_ms: 100,
            backoff_cap_ms: 1000,
            relocate_lag: 4,
            relocate_max_pins: 2,
            max_queued: 40,
            ..Limits::default()
        };
        let mut h = H::with_records(limits, vec![
            labelled("d0", &["a"], &["cam"]),
            labelled("d1", &["a"], &["cam"]),
            labelled("d2", &[], &["cam"]),
        ]);
        h.outbox = Some(30);
        h.core.enable_outbox(30);
        let targets = ["d0", "d1", "d2", "tag:a", "cap:cam"];
        let mut accepted: Vec<CommandId> = Vec::new();
        for op in ops {
            match op {
                Op::Send { dev, prio, ttl, key, after, max_attempts } => {
                    let opts = SendOptions {
                        priority: [Priority::Low, Priority::Normal, Priority::High][prio as usize],
                        ttl_ms: ttl.map(u64::from),
                        key: key.map(|k| format!("k{k}")),
                        after: if after { accepted.last().copied() } else { None },
                        max_attempts: Some(max_attempts.into()),
                        not_before: None,
                    };
                    match h.send(targets[dev as usize], opts) {
                        Ok(r) => accepted.push(r.id),
                        Err(e) => prop_assert!(
                            matches!(e, QueueError::QueueFull { .. } | QueueError::Revoked(_) | QueueError::NoRoute(_) | QueueError::KeyReused { .. }),
                            "{e}"
                        ),
                    }
                }
                Op::Connect(d) => {
                    let name = format!("d{d}");
                    match h.core.connect(&name, 0, h.now) {
                        Ok(t) => { h.sessions.insert(name, t); }
                        Err(e) => prop_assert!(matches!(e, QueueError::Revoked(_)), "{e}"),
                    }
                    h.round();
                }
                Op::Disconnect(d) => h.disconnect(&format!("d{d}")),
                Op::Ack { dev, pick, kind } => {
                    let name = format!("d{dev}");
                    let mut flying: Vec<CommandId> = h.core.devs[h.core.dev_index[&name] as usize].in_flight.iter().copied().collect();
                    flying.sort();
                    if !flying.is_empty() {
                        let id = flying[pick as usize % flying.len()];
                        let o = match kind { 0 => ok(), 1 => fail(), _ => Outcome::Rejected { reason: "r".into() } };
                        h.ack(&name, id, o).unwrap();
                    }
                }
                Op::Cancel(i) => if !accepted.is_empty() {
                    let id = accepted[i as usize % accepted.len()];
                    let _ = h.core.cancel(id, h.now);
                    h.round();
                },
                Op::Retry(i) => if !accepted.is_empty() {
                    let id = accepted[i as usize % accepted.len()];
                    if let Some(r) = h.disk.result(id) {
                        if !h.core.live.contains_key(&id) {
                            let _ = h.core.retry(r, h.now);
                            h.round();
                        }
                    }
                },
                Op::Advance(ms) => h.advance(ms.into()),
                Op::Relabel(d) => {
                    let name = format!("d{d}");
                    let has = h.core.devs[h.core.dev_index[&name] as usize]
                        .record.as_ref().is_some_and(|r| r.caps.iter().any(|c| c == "cam"));
                    let flip = |on: bool| if on { vec![] } else { vec!["cam".to_string()] };
                    let r = Relabel {
                        device: name,
                        add_caps: flip(has),
                        remove_caps: flip(!has),
                        add_tags: flip(has).iter().map(|_| "a".to_string()).collect(),
                        remove_tags: flip(!has).iter().map(|_| "a".to_string()).collect(),
                    };
                    match h.core.relabel(r, h.now) {
                        Ok(_) | Err(QueueError::Revoked(_)) => {}
                        Err(e) => prop_assert!(false, "relabel: {e}"),
                    }
                    h.round();
                }
                Op::ConnectNarrow(d) => {
                    let name = format!("d{d}");
                    if let Ok(t) = h.core.connect_offering(&name, 0, Some(vec!["other".into()]), h.now) {
                        h.sessions.insert(name, t);
                    }
                    h.round();
                }
                Op::Revoke(d) => {
                    let _ = h.core.revoke(&format!("d{d}"), h.now);
                    h.sessions.remove(&format!("d{d}"));
                    h.round();
                }
                Op::UpAck(k) => {
                    let acked = h.core.outbox_stats().acked;
                    h.core.up_ack(acked + u64::from(k));
                    h.round();
                }
                Op::Reenroll(d) => {
                    let name = format!("d{d}");
                    let rec = h.core.devs[h.core.dev_index[&name] as usize].record.clone().unwrap();
                    h.core.enroll(rec, h.now);
                    h.round();
                }
                Op::Reopen => {
                    let before: HashMap<CommandId, State> =
                        accepted.iter().map(|&id| (id, h.state(id).expect("known"))).collect();
                    h.reopen();
                    for (id, s) in before {
                        let after = h.state(id).expect("every accepted command survives a restart");
                        let expect = if matches!(s, State::Delivered { .. }) { State::Queued } else { s };
                        prop_assert_eq!(after, expect, "{} changed state across a restart", id);
                    }
                }
            }
            h.check();
            for id in &accepted {
                prop_assert!(h.state(*id).is_some(), "{} was accepted and is now unknown", id);
            }
        }
    }
}

// ----- routing (DESIGN §6) --------------------------------------------------

impl H {
    fn view(&self, id: CommandId) -> CommandView {
        match self.core.lookup(id) {
            Lookup::Live(v) => *v,
            Lookup::Finished { seq, .. } => {
                let r = self.disk.results[&seq]
                    .iter()
                    .rev()
                    .find(|r| r.id == id)
                    .expect("finished result on disk")
                    .clone();
                CommandView::from(r)
            }
            Lookup::NotFound => panic!("{id} not found"),
        }
    }

    /// Ack everything in flight on `d` with `o`; returns the ids acked.
    fn ack_all(&mut self, d: &str, o: Outcome) -> Vec<CommandId> {
        let i = self.core.dev_index[d] as usize;
        let mut ids: Vec<CommandId> = self.core.devs[i].in_flight.iter().copied().collect();
        ids.sort();
        for &id in &ids {
            self.ack(d, id, o.clone()).unwrap();
        }
        ids
    }
}

fn line(n: usize) -> Vec<DeviceRecord> {
    (0..n)
        .map(|i| labelled(&format!("d{i}"), &["line-3"], &[]))
        .chain([dev("other")])
        .collect()
}

#[test]
fn broadcast_to_fifty_with_five_offline_and_a_restart() {
    let mut h = H::with_records(Limits::default(), line(50));
    for i in 0..45 {
        h.connect(&format!("d{i}"));
    }
    let pid = h.send("tag:line-3", SendOptions::default()).unwrap().id;
    h.check();
    // One child per tagged device, each delivered once, none to `other`.
    let mut children = BTreeSet::new();
    for i in 0..45 {
        let got = h.ids(&format!("d{i}"));
        assert_eq!(got.len(), 1, "d{i} gets exactly its child");
        assert!(children.insert(got[0]), "children have their own ids");
    }
    assert!(h.ids("other").is_empty());
    let v = h.view(pid);
    assert_eq!(v.children.len(), 50);
    assert_eq!(
        v.summary.as_deref(),
        Some("0/50 succeeded, 45 in flight, 5 queued")
    );
    // 30 ack, then the box restarts: no acked child comes back.
    for i in 0..30 {
        h.ack_all(&format!("d{i}"), ok());
    }
    h.check();
    h.reopen();
    h.check();
    for i in 0..50 {
        h.connect(&format!("d{i}"));
    }
    for i in 0..30 {
        assert_eq!(h.ids(&format!("d{i}")).len(), 1, "d{i} acked: never again");
    }
    for i in 30..45 {
        let got = h.ids(&format!("d{i}"));
        assert_eq!(got.len(), 2, "d{i}: its unacked child is redelivered");
        assert_eq!(got[0], got[1], "d{i}: the same child, not a new one");
    }
    for i in 45..50 {
        assert_eq!(
            h.ids(&format!("d{i}")).len(),
            1,
            "offline d{i} gets it on return"
        );
    }
    assert_eq!(
        h.view(pid).summary.as_deref(),
        Some("30/50 succeeded, 20 in flight")
    );
    h.ack_all(
        "d49",
        Outcome::Rejected {
            reason: "no".into(),
        },
    );
    for i in 30..49 {
        h.ack_all(&format!("d{i}"), ok());
    }
    h.check();
    let v = h.view(pid);
    assert_eq!(
        v.state,
        State::Failed,
        "one child failed: the broadcast failed"
    );
    assert_eq!(v.summary.as_deref(), Some("49/50 succeeded, 1 failed"));
    assert_eq!(v.children.len(), 50);
    assert_eq!(
        v.children.iter().find(|c| c.device == "d49").unwrap().state,
        State::Failed
    );
    assert!(h.core.parents.is_empty() && h.core.live.is_empty());
    assert!(
        !h.disk.journal.is_empty(),
        "kept until a round after the one that ended it is durable"
    );
    h.round();
    assert!(
        h.disk.journal.is_empty(),
        "the broadcast's group is dropped"
    );
    h.reopen();
    assert_eq!(h.state(pid), Some(State::Failed));
    assert!(
        h.core.live.is_empty(),
        "no child comes back after a restart"
    );
}

#[test]
fn broadcast_all_succeeded_releases_its_dependents() {
    let mut h = H::with_records(Limits::default(), line(3));
    let pid = h.send("tag:line-3", SendOptions::default()).unwrap().id;
    let next = h
        .send(
            "other",
            SendOptions {
                after: Some(pid),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    h.connect("other");
    assert!(h.ids("other").is_empty(), "blocked on the broadcast");
    h.reopen();
    h.connect("other");
    for i in 0..3 {
        h.connect(&format!("d{i}"));
        h.ack_all(&format!("d{i}"), ok());
    }
    assert_eq!(h.state(pid), Some(State::Succeeded));
    assert_eq!(h.view(pid).summary.as_deref(), Some("3/3 succeeded"));
    assert_eq!(
        h.ids("other"),
        vec![next],
        "released by the broadcast's success"
    );
    h.check();
}

#[test]
fn cancel_mid_broadcast_cancels_only_the_unfinished() {
    let mut h = H::with_records(Limits::default(), line(10));
    for i in 0..5 {
        h.connect(&format!("d{i}"));
    }
    let pid = h.send("tag:line-3", SendOptions::default()).unwrap().id;
    for i in 0..3 {
        h.ack_all(&format!("d{i}"), ok());
    }
    h.reopen();
    h.connect("d3");
    h.connect("d4");
    let in_flight: Vec<CommandId> = ["d3", "d4"].iter().flat_map(|d| h.ids(d)).collect();
    let v = h.core.cancel(pid, h.now).unwrap();
    h.round();
    assert_eq!(v.state, State::Cancelled);
    h.check();
    assert_eq!(h.state(pid), Some(State::Cancelled));
    for id in &in_flight {
        assert!(
            h.cancels.iter().any(|(_, c)| c == id),
            "the device holding {id} is told to stop"
        );
    }
    let v = h.view(pid);
    assert_eq!(v.summary.as_deref(), Some("3/10 succeeded, 7 cancelled"));
    for i in 5..10 {
        h.connect(&format!("d{i}"));
        assert!(
            h.ids(&format!("d{i}")).is_empty(),
            "cancelled: never delivered"
        );
    }
    assert!(matches!(
        h.core.cancel(pid, h.now),
        Err(QueueError::InvalidTransition { .. })
    ));
    h.reopen();
    assert!(h.core.live.is_empty() && h.core.parents.is_empty());
}

fn cameras(n: usize) -> Vec<DeviceRecord> {
    (0..n)
        .map(|i| labelled(&format!("c{i}"), &[], &["camera"]))
        .chain([dev("plain")])
        .collect()
}

#[test]
fn any_capable_balances_across_connected_devices() {
    let mut h = H::with_records(Limits::default(), cameras(4));
    for i in 0..4 {
        h.connect(&format!("c{i}"));
    }
    h.connect("plain");
    // Devices that answer at once: the work is shared evenly.
    for _ in 0..100 {
        let id = h.send("cap:camera", SendOptions::default()).unwrap().id;
        let on = h.view(id).device;
        assert!(on.starts_with('c'), "ran on a capable device, not {on}");
        h.ack(&on, id, ok()).unwrap();
    }
    for i in 0..4 {
        let n = h.ids(&format!("c{i}")).len();
        assert!((20..=30).contains(&n), "c{i} ran {n} of 100");
    }
    assert!(h.ids("plain").is_empty());
    // A slow device holding work gets none of the next.
    let busy: Vec<CommandId> = (0..3)
        .map(|_| h.send("cap:camera", SendOptions::default()).unwrap().id)
        .collect();
    let holders: BTreeSet<String> = busy.iter().map(|&id| h.view(id).device).collect();
    assert_eq!(
        holders.len(),
        3,
        "fewest in flight: three different devices"
    );
    let idle = (0..4)
        .map(|i| format!("c{i}"))
        .find(|d| !holders.contains(d))
        .unwrap();
    let id = h.send("cap:camera", SendOptions::default()).unwrap().id;
    assert_eq!(h.view(id).device, idle);
    h.check();
    let r = {
        h.ack(&idle, id, ok()).unwrap();
        h.disk.result(id).unwrap()
    };
    assert_eq!(r.device, idle, "the result names the device that ran it");
    assert_eq!(r.target, "cap:camera");
}

#[test]
fn any_capable_fails_over_when_the_device_drops() {
    let mut h = H::with_records(Limits::default(), cameras(2));
    h.connect("c0");
    let id = h.send("cap:camera", SendOptions::default()).unwrap().id;
    assert_eq!(h.view(id).device, "c0");
    h.connect("c1");
    h.disconnect("c0");
    h.check();
    let v = h.view(id);
    assert_eq!(v.device, "c1", "failed over");
    assert_eq!(
        v.state,
        State::Delivered { attempt: 2 },
        "the drop was an attempt"
    );
    h.reopen();
    h.connect("c1");
    assert_eq!(h.view(id).state, State::Delivered { attempt: 2 });
    h.ack("c1", id, ok()).unwrap();
    let r = h.disk.result(id).unwrap();
    assert_eq!(
        (r.device.as_str(), r.attempts, r.state),
        ("c1", 2, State::Succeeded)
    );
    // Out of attempts: dead, with the reason.
    let id = h
        .send(
            "cap:camera",
            SendOptions {
                max_attempts: Some(1),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    h.disconnect("c1");
    let r = h.disk.result(id).unwrap();
    assert_eq!(r.state, State::Dead);
    assert!(r.error.unwrap().contains("dropped"), "says why");
    h.check();
}

#[test]
fn any_capable_waits_for_the_first_capable_device_and_its_ttl() {
    let mut h = H::with_records(Limits::default(), cameras(2));
    h.connect("plain");
    let a = h.send("cap:camera", SendOptions::default()).unwrap().id;
    let b = h
        .send(
            "cap:camera",
            SendOptions {
                ttl_ms: Some(1000),
                ..Default::default()
            },
        )
        .unwrap()
        .id;
    assert_eq!(h.state(a), Some(State::Queued));
    assert_eq!(h.core.list("cap:camera").unwrap().len(), 2);
    h.advance(2000);
    assert_eq!(h.state(b), Some(State::Expired));
    h.reopen();
    h.connect("c1");
    assert_eq!(h.ids("c1"), vec![a]);
    assert!(matches!(
        h.send("cap:printer", SendOptions::default()),
        Err(QueueError::NoRoute(_))
    ));
    h.check();
}

#[test]
fn hello_narrows_capabilities_but_never_widens_them() {
    let mut h = H::with_records(Limits::default(), cameras(2));
    let t = h
        .core
        .connect_offering("c0", 0, Some(vec!["printer".into()]), h.now)
        .unwrap();
    h.sessions.insert("c0".into(), t);
    h.round();
    let id = h.send("cap:camera", SendOptions::default()).unwrap().id;
    assert!(h.ids("c0").is_empty(), "c0 offered no camera this session");
    assert!(matches!(
        h.send("cap:printer", SendOptions::default()),
        Err(QueueError::NoRoute(_))
    ));
    let t = h
        .core
        .connect_offering("c1", 0, Some(vec!["camera".into()]), h.now)
        .unwrap();
    h.sessions.insert("c1".into(), t);
    h.round();
    assert_eq!(h.ids("c1"), vec![id]);
    h.check();
}

#[test]
fn relabel_changes_routing_and_survives_a_restart() {
    let mut h = H::with_records(Limits::default(), cameras(1));
    h.core
        .relabel(
            Relabel {
                device: "plain".into(),
                add_tags: vec!["line-3".into()],
                add_caps: vec!["camera".into()],
                ..Default::default()
            },
            h.now,
        )
        .unwrap();
    h.core
        .relabel(
            Relabel {
                device: "c0".into(),
                remove_caps: vec!["camera".into()],
                ..Default::default()
            },
            h.now,
        )
        .unwrap();
    h.round();
    h.reopen();
    h.connect("c0");
    h.connect("plain");
    let id = h.send("cap:camera", SendOptions::default()).unwrap().id;
    assert_eq!(h.ids("plain"), vec![id]);
    assert!(h.ids("c0").is_empty());
    let pid = h.send("tag:line-3", SendOptions::default()).unwrap().id;
    assert_eq!(h.view(pid).children.len(), 1);
    assert!(matches!(
        h.core.relabel(
            Relabel {
                device: "plain".into(),
                add_tags: vec!["bad tag".into()],
                ..Default::default()
            },
            h.now
        ),
        Err(QueueError::BadRequest(_))
    ));
    h.check();
}

#[test]
fn device_to_device_obeys_the_acl() {
    use crate::engine::route::AclRule;
    let mut h = H::with_records(
        Limits::default(),
        vec![
            labelled("s0", &["sensors"], &[]),
            labelled("s1", &[], &[]),
            labelled("c0", &[], &["camera"]),
        ],
    );
    let req = |to: &str| SendRequest {
        target: to.into(),
        payload: b"snap".to_vec(),
        opts: SendOptions::default(),
        origin: "ignored".into(),
        signature: None,
    };
    // Default deny.
    let e = h.core.device_send("s0", req("c0"), h.now).unwrap_err();
    assert!(matches!(e, QueueError::Forbidden { .. }) && e.is_refusal());
    h.core.set_acl(
        Acl::new(vec![AclRule {
            from: vec!["tag:sensors".into()],
            to: vec!["cap:camera".into()],
        }])
        .unwrap(),
    );
    let r = h.core.device_send("s0", req("c0"), h.now).unwrap();
    let r2 = h.core.device_send("s0", req("cap:camera"), h.now).unwrap();
    h.round();
    assert_eq!(h.view(r.id).origin, "s0", "the sender is the origin");
    assert_eq!(h.view(r2.id).target, "cap:camera");
    assert!(matches!(
        h.core.device_send("s1", req("c0"), h.now),
        Err(QueueError::Forbidden { .. })
    ));
    assert!(matches!(
        h.core.device_send("s0", req("s1"), h.now),
        Err(QueueError::Forbidden { .. })
    ));
    assert!(matches!(
        h.core.device_send("ghost", req("c0"), h.now),
        Err(QueueError::UnknownDevice(_))
    ));
    h.check();
}

#[test]
fn a_broadcast_is_relocated_whole_and_never_resurrects_a_child() {
    let limits = Limits {
        relocate_lag: 2,
        relocate_max_pins: 4,
        ..Limits::default()
    };
    let mut h = H::with_records(limits, line(4));
    h.connect("d0");
    h.connect("d1");
    let pid = h.send("tag:line-3", SendOptions::default()).unwrap().id;
    h.ack_all("d0", ok());
    h.ack_all("d1", fail());
    // Traffic moves the head on; the broadcast's group is relocated.
    h.connect("other");
    h.traffic("other", 8);
    assert_ne!(h.core.parents[&pid].group, 0);
    h.check();
    h.reopen();
    h.check();
    h.connect("d0");
    assert_eq!(h.ids("d0").len(), 1, "the acked child is not resurrected");
    h.connect("d1");
    h.advance(60_000);
    for i in 1..4 {
        h.connect(&format!("d{i}"));
        h.ack_all(&format!("d{i}"), ok());
    }
    assert_eq!(h.state(pid), Some(State::Succeeded));
    h.check();
}

#[test]
fn a_device_that_loses_a_capability_keeps_what_it_holds() {
    let mut h = H::with_records(Limits::default(), cameras(2));
    h.connect("c0");
    let id = h.send("cap:camera", SendOptions::default()).unwrap().id;
    assert_eq!(h.view(id).device, "c0");
    h.core
        .relabel(
            Relabel {
                device: "c0".into(),
                remove_caps: vec!["camera".into()],
                ..Default::default()
            },
            h.now,
        )
        .unwrap();
    h.round();
    h.check();
    let next = h.send("cap:camera", SendOptions::default()).unwrap().id;
    assert_eq!(h.ids("c0"), vec![id], "no new camera work for c0");
    h.ack("c0", id, ok()).unwrap();
    assert_eq!(h.state(id), Some(State::Succeeded));
    h.connect("c1");
    assert_eq!(h.ids("c1"), vec![next]);
    h.check();
}

#[test]
fn a_live_handle_stays_small() {
    // Every queued command pays for its handle in RAM and in replay time
    // (DESIGN §4 aims at 32 B; see ARCHITECTURE's departures). A field
    // that grows it should be a deliberate choice, not an accident.
    assert!(
        std::mem::size_of::<Live>() <= 160,
        "{}",
        std::mem::size_of::<Live>()
    );
}

// ----- the upstream outbox (DESIGN §7) ---------------------------------------

fn with_outbox(max: u64, n: usize) -> H {
    let mut h = H::new(Limits::default());
    h.outbox = Some(max);
    h.core.enable_outbox(max);
    for i in 0..n {
        h.core.enroll(dev(&format!("d{i}")), h.now);
    }
    h.round();
    h
}

fn up_items(h: &H) -> Vec<(u64, u64, UpItem)> {
    h.disk
        .outbox
        .iter()
        .flat_map(|(g, es)| es.iter().map(move |e| (*g, e.seq, e.item.clone())))
        .collect()
}

#[test]
fn the_outbox_reports_each_change_in_the_batch_of_the_change() {
    let mut h = with_outbox(1000, 1);
    h.connect("d0");
    let a = h.send_prio("d0", Priority::Normal);
    let b = h.send_prio("d0", Priority::Normal);
    h.ack("d0", a, ok()).unwrap();
    h.reopen();
    h.connect("d0");
    h.ack(
        "d0",
        b,
        Outcome::Rejected {
            reason: "no".into(),
        },
    )
    .unwrap();
    h.check();
    let items = up_items(&h);
    let seqs: Vec<u64> = items.iter().map(|x| x.1).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "contiguous across a restart"
    );
    assert!(
        matches!(&items[0].2, UpItem::Device(r) if r.id == "d0"),
        "enrolment first"
    );
    // Each result is in the outbox of the very group that wrote it.
    for id in [a, b] {
        let (g, _, _) = items
            .iter()
            .find(|(_, _, i)| matches!(i, UpItem::Result(r) if r.id == id))
            .expect("the result went upstream");
        assert!(h.disk.results[g].iter().any(|r| r.id == id));
    }
    let n_results = items
        .iter()
        .filter(|x| matches!(x.2, UpItem::Result(_)))
        .count();
    assert_eq!(n_results, 2, "each result once");
    assert!(items.iter().any(
        |x| matches!(&x.2, UpItem::State { id, state: State::Delivered { .. }, .. } if *id == a)
    ));
    assert!(items
        .iter()
        .any(|x| matches!(&x.2, UpItem::Presence { device, online: true, .. } if device == "d0")));
    // Acknowledged up to the end: every group goes in the next batch.
    h.core.up_ack(*seqs.last().unwrap());
    h.round();
    assert!(h.disk.outbox.is_empty());
    assert_eq!(h.core.outbox_stats().depth, 0);
    h.reopen();
    h.send_prio("d0", Priority::Normal);
    assert_eq!(
        up_items(&h).first().map(|x| x.1),
        Some(seqs.len() as u64 + 1),
        "seqs never go back, even after the acked groups are gone"
    );
    h.check();
}

#[test]
fn a_full_outbox_skips_telemetry_but_keeps_every_result() {
    let mut h = with_outbox(5, 1);
    h.connect("d0");
    let mut ids = Vec::new();
    for _ in 0..20 {
        let id = h.send_prio("d0", Priority::Normal);
        h.ack("d0", id, ok()).unwrap();
        ids.push(id);
    }
    h.check();
    let items = up_items(&h);
    for id in ids {
        assert!(
            items
                .iter()
                .any(|x| matches!(&x.2, UpItem::Result(r) if r.id == id)),
            "result of {id} kept though the outbox is full"
        );
    }
    assert!(h.core.outbox_stats().skipped > 0, "telemetry gave way");
    assert!(items.iter().filter(|x| x.2.is_telemetry()).count() <= 5);
}

#[test]
fn low_free_space_refuses_new_commands_but_keeps_delivering() {
    let mut h = H::with_devices(Limits::default(), 1);
    h.connect("d0");
    let a = h.send_prio("d0", Priority::Normal);
    h.core.set_disk_free(1024);
    let e = h.send("d0", SendOptions::default()).unwrap_err();
    assert!(
        matches!(e, QueueError::NoSpace { free: 1024, .. }) && e.is_refusal(),
        "{e}"
    );
    assert!(
        e.to_string().contains("--min-free-disk"),
        "says what to do: {e}"
    );
    // High priority sheds nothing either: ending a command writes too.
    assert!(matches!(
        h.send(
            "d0",
            SendOptions {
                priority: Priority::High,
                ..Default::default()
            }
        ),
        Err(QueueError::NoSpace { .. })
    ));
    h.ack("d0", a, ok()).unwrap();
    assert_eq!(
        h.state(a),
        Some(State::Succeeded),
        "what is queued still runs"
    );
    h.core.set_disk_free(1 << 40);
    h.send("d0", SendOptions::default()).unwrap();
    h.check();
}

// ----- the hub side of upstream sync (DESIGN §7) ------------------------------

fn hub() -> H {
    H::with_records(
        Limits {
            window: 2,
            ..Limits::default()
        },
        vec![
            labelled("e1", &[crate::engine::route::GATEWAY_TAG], &[]),
            dev("d9"),
        ],
    )
}

/// The edge takes what the hub forwarded, under the hub's id.
fn take(edge: &mut H, id: CommandId, target: &str) -> SendReceipt {
    let r = edge
        .core
        .send_as(
            Some(id),
            SendRequest {
                target: target.into(),
                payload: b"down".to_vec(),
                opts: SendOptions::default(),
                origin: "upstream/cli".into(),
                signature: None,
            },
            edge.now,
        )
        .unwrap();
    edge.round();
    r
}

/// Everything in the edge's outbox, oldest first.
fn outbox_of(edge: &H) -> Vec<UpEntry> {
    edge.disk.outbox.values().flatten().cloned().collect()
}

fn up(hub: &mut H, entries: Vec<UpEntry>) -> u64 {
    let c = hub.core.up("e1", entries, hub.now).unwrap();
    hub.round();
    hub.check();
    c
}

fn results_for(h: &H, id: CommandId) -> usize {
    h.disk
        .results
        .values()
        .flatten()
        .filter(|r| r.id == id)
        .count()
}

#[test]
fn a_command_sent_down_runs_once_on_the_edge_and_ends_once_on_the_hub() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    hub.connect("e1");
    let ids: Vec<CommandId> = (0..3)
        .map(|_| hub.send("e1/d0", SendOptions::default()).unwrap().id)
        .collect();
    // The gateway's window (2) bounds what is forwarded but not yet taken.
    assert_eq!(hub.ids("e1"), ids[..2]);
    for &id in &ids[..2] {
        assert!(!take(&mut edge, id, "d0").duplicate);
        hub.core.handed("e1", id, hub.now).unwrap();
        hub.round();
    }
    // Taken: out of the window, so the third goes down.
    assert_eq!(hub.ids("e1"), ids);
    assert!(!take(&mut edge, ids[2], "d0").duplicate);
    // A link drop before the third was acknowledged: forwarded again, and
    // the edge queues it once.
    hub.disconnect("e1");
    hub.connect("e1");
    assert_eq!(hub.ids("e1").len(), 4, "only the one not taken goes again");
    assert!(take(&mut edge, ids[2], "d0").duplicate);
    hub.core.handed("e1", ids[2], hub.now).unwrap();
    hub.round();
    hub.check();
    let v = hub.core.list("e1").unwrap();
    assert_eq!(v.len(), 3);
    assert!(v.iter().all(|c| matches!(c.state, State::Delivered { .. })));

    // The edge runs them; its outbox goes up.
    edge.connect("d0");
    assert_eq!(
        edge.ids("d0"),
        ids,
        "the edge runs them under the hub's ids"
    );
    for &id in &ids {
        edge.ack("d0", id, Outcome::Ok(b"done".to_vec())).unwrap();
    }
    let entries = outbox_of(&edge);
    let last = entries.last().unwrap().seq;
    // Half first: the hub shows the edge's progress on the way.
    let half = entries
        .iter()
        .position(|e| matches!(e.item, UpItem::Result(_)))
        .unwrap();
    assert_eq!(
        up(&mut hub, entries[..half].to_vec()),
        entries[half - 1].seq
    );
    let shown = hub.core.list("e1").unwrap();
    assert!(
        shown.iter().any(|c| c.device == "e1/d0"),
        "the edge's device shows: {shown:?}"
    );
    assert_eq!(up(&mut hub, entries.clone()), last);
    for &id in &ids {
        assert_eq!(hub.state(id), Some(State::Succeeded));
        let r = hub.disk.result(id).unwrap();
        assert_eq!(r.device, "e1/d0");
        assert_eq!(r.target, "e1/d0");
        assert_eq!(r.outcome, Some(Outcome::Ok(b"done".to_vec())));
        assert_eq!(results_for(&hub, id), 1);
    }
    assert_eq!(hub.core.stats().in_flight, 0);
    // The same records again (a resend), and again after a hub restart:
    // nothing is applied twice.
    let applied = hub.core.stats().up_applied_total;
    assert_eq!(up(&mut hub, entries.clone()), last);
    hub.reopen();
    assert_eq!(up(&mut hub, entries.clone()), last);
    assert_eq!(
        hub.core.stats().up_applied_total,
        0,
        "a restarted hub skips them all"
    );
    assert!(hub.core.stats().up_duplicates_total >= entries.len() as u64);
    let _ = applied;
    for &id in &ids {
        assert_eq!(results_for(&hub, id), 1, "{id} recorded once");
    }
    // The edge's device is listed on the hub under the edge's name.
    assert!(hub.core.devices().iter().any(|d| d.record.id == "e1/d0"));
    // And a redelivery after the end is still a duplicate on the edge.
    assert!(take(&mut edge, ids[0], "d0").duplicate);
}

#[test]
fn results_of_the_edges_own_commands_are_kept_on_the_hub() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    edge.connect("d0");
    let id = edge.send_prio("d0", Priority::Normal);
    edge.ack("d0", id, Outcome::Ok(b"local".to_vec())).unwrap();
    up(&mut hub, outbox_of(&edge));
    let r = hub.disk.result(id).expect("recorded on the hub");
    assert_eq!((r.device.as_str(), r.state), ("e1/d0", State::Succeeded));
    assert_eq!(hub.core.stats().up_results_total, 1);
}

#[test]
fn a_cancel_of_what_the_edge_holds_waits_for_the_edge_across_restarts() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    hub.connect("e1");
    let id = hub.send("e1/d0", SendOptions::default()).unwrap().id;
    take(&mut edge, id, "d0");
    hub.core.handed("e1", id, hub.now).unwrap();
    hub.round();
    let v = hub.core.cancel(id, hub.now).unwrap();
    hub.round();
    assert!(!v.state.is_final(), "the edge may be running it");
    assert!(v.error.unwrap().contains("e1"));
    assert_eq!(hub.cancels, vec![("e1".to_string(), id)]);
    assert!(hub.disk.cancel_marks.contains(&id));
    // The hub restarts before the edge answers: the cancel is sent again
    // when the edge connects.
    hub.reopen();
    hub.cancels.clear();
    hub.connect("e1");
    assert_eq!(hub.cancels, vec![("e1".to_string(), id)]);
    // The edge cancels it; its end goes up and ends it on the hub.
    edge.core.cancel(id, edge.now).unwrap();
    edge.round();
    assert!(
        take(&mut edge, id, "d0").duplicate,
        "the redelivery is a duplicate"
    );
    up(&mut hub, outbox_of(&edge));
    assert_eq!(hub.state(id), Some(State::Cancelled));
    assert!(
        hub.disk.cancel_marks.is_empty(),
        "the mark goes with the command"
    );
    hub.reopen();
    hub.cancels.clear();
    hub.connect("e1");
    assert!(hub.cancels.is_empty());
}

/// A link lost after the edge stored a forward and before its `Accepted`
/// reached the hub puts the command back in the hub's queue while the edge
/// holds it: a cancel then is the edge's to decide, or the hub would end it
/// `cancelled` while the edge ran it.
#[test]
fn a_cancel_after_a_forward_whose_accepted_was_lost_is_decided_by_the_edge() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    hub.connect("e1");
    let id = hub.send("e1/d0", SendOptions::default()).unwrap().id;
    assert_eq!(hub.ids("e1"), vec![id], "forwarded");
    take(&mut edge, id, "d0");
    hub.disconnect("e1");
    assert_eq!(
        hub.state(id),
        Some(State::Queued),
        "back in the hub's queue"
    );
    let v = hub.core.cancel(id, hub.now).unwrap();
    hub.round();
    assert!(!v.state.is_final(), "the edge may hold it: {v:?}");
    assert!(hub.disk.cancel_marks.contains(&id), "marked durably");
    // At the next link the cancel goes down again, and the edge cancels
    // the command it holds before its device has it.
    hub.cancels.clear();
    hub.connect("e1");
    assert_eq!(hub.cancels, vec![("e1".to_string(), id)]);
    let v = edge.core.cancel_from_hub(id, edge.now).unwrap();
    edge.round();
    assert_eq!(v.state, State::Cancelled);
    edge.connect("d0");
    assert!(edge.ids("d0").is_empty(), "the device never gets it");
    up(&mut hub, outbox_of(&edge));
    assert_eq!(hub.state(id), Some(State::Cancelled));
    assert_eq!(hub.disk.result(id).unwrap().device, "e1/d0");
    assert!(hub.disk.cancel_marks.is_empty());
}

/// The forward was lost with the link, and the hub cancels: the edge, which
/// never had the command, answers with a `cancelled` end of its own, which
/// ends it on the hub and makes the forward that follows a duplicate.
#[test]
fn a_cancel_of_a_forward_the_edge_never_got_ends_there_and_its_late_forward_does_not_run() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    hub.connect("e1");
    let id = hub.send("e1/d0", SendOptions::default()).unwrap().id;
    hub.disconnect("e1");
    hub.core.cancel(id, hub.now).unwrap();
    hub.round();
    assert_eq!(hub.state(id), Some(State::Queued));
    hub.connect("e1");
    assert_eq!(
        hub.ids("e1"),
        vec![id, id],
        "forwarded again, for an edge before this fix"
    );
    // The cancel is taken first, then the forward.
    let v = edge.core.cancel_from_hub(id, edge.now).unwrap();
    edge.round();
    assert_eq!(v.state, State::Cancelled);
    let again = take(&mut edge, id, "d0");
    assert!(again.duplicate, "the late forward is a duplicate");
    edge.connect("d0");
    assert!(edge.ids("d0").is_empty(), "and does not run");
    // A second cancel (sent at every connect until the end comes) changes
    // nothing.
    assert!(edge.core.cancel_from_hub(id, edge.now).is_err());
    edge.round();
    hub.core.handed("e1", id, hub.now).unwrap();
    hub.round();
    up(&mut hub, outbox_of(&edge));
    assert_eq!(hub.state(id), Some(State::Cancelled));
    let r = hub.disk.result(id).unwrap();
    assert_eq!(
        r.device, "e1",
        "the hub keeps its own device for an end the edge had none for"
    );
    assert_eq!(results_for(&hub, id), 1);
}

/// The hub's ttl runs out on its clock while the edge, which got what was
/// left of it with the forward, runs the command at the end of it (its
/// uplink down): the hub, which said Expired, takes what the edge did. A
/// cancel's end of the edge's never replaces an end.
#[test]
fn an_end_from_the_edge_replaces_the_hubs_own_expired_but_not_a_cancel() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    hub.connect("e1");
    let opts = SendOptions {
        ttl_ms: Some(1_000),
        ..SendOptions::default()
    };
    let id = hub.send("e1/d0", opts).unwrap().id;
    take(&mut edge, id, "d0");
    hub.core.handed("e1", id, hub.now).unwrap();
    hub.round();
    hub.advance(1_001);
    assert_eq!(hub.state(id), Some(State::Expired), "the hub's clock");
    edge.connect("d0");
    edge.ack("d0", id, ok()).unwrap();
    up(&mut hub, outbox_of(&edge));
    assert_eq!(hub.state(id), Some(State::Succeeded), "what the edge did");
    assert!(hub
        .events
        .iter()
        .any(|e| e.id == id && e.state == State::Succeeded));
    // A cancelled end the edge records for a command it never had is no
    // news of a run, and leaves an Expired as it is.
    let lost = hub
        .send(
            "e1/d0",
            SendOptions {
                ttl_ms: Some(1_000),
                ..SendOptions::default()
            },
        )
        .unwrap()
        .id;
    hub.advance(1_001);
    assert_eq!(hub.state(lost), Some(State::Expired));
    let applied = hub.core.stats().up_applied_total;
    edge.core.cancel_from_hub(lost, edge.now).unwrap();
    edge.round();
    up(&mut hub, outbox_of(&edge));
    assert!(
        hub.core.stats().up_applied_total > applied,
        "the end was applied"
    );
    assert_eq!(hub.state(lost), Some(State::Expired));
}

/// What the hub has never forwarded it cancels at once; after a restart it
/// cannot know (forwarding is not journalled), so the edge decides.
#[test]
fn a_gateway_command_never_forwarded_cancels_at_once_but_not_after_a_restart() {
    let mut hub = hub();
    let first = hub.send("e1/d0", SendOptions::default()).unwrap().id;
    let v = hub.core.cancel(first, hub.now).unwrap();
    hub.round();
    assert_eq!(v.state, State::Cancelled, "the edge cannot have it");
    assert_eq!(hub.state(first), Some(State::Cancelled));
    let second = hub.send("e1/d0", SendOptions::default()).unwrap().id;
    hub.reopen();
    let v = hub.core.cancel(second, hub.now).unwrap();
    hub.round();
    assert!(
        !v.state.is_final(),
        "forwarded before the restart, maybe: {v:?}"
    );
    hub.connect("e1");
    assert!(hub.cancels.contains(&("e1".to_string(), second)));
    // An end of the edge's for a command the hub no longer has is nothing.
    let mut edge = with_outbox(1000, 1);
    edge.core.cancel_from_hub(first, edge.now).unwrap();
    edge.round();
    up(&mut hub, outbox_of(&edge));
    assert_eq!(
        hub.disk.result(first).unwrap().error.as_deref(),
        Some("cancelled by operator")
    );
    assert_eq!(results_for(&hub, first), 1);
}

#[test]
fn targets_through_a_box_need_a_gateway_and_only_a_gateway_reports_upward() {
    let mut hub = hub();
    let e = hub.send("e1", SendOptions::default()).unwrap_err();
    assert!(e.to_string().contains("e1/DEVICE"), "{e}");
    let e = hub.send("d9/dev-7", SendOptions::default()).unwrap_err();
    assert!(e.to_string().contains("--gateway"), "{e}");
    let e = hub
        .send("nobody/dev-7", SendOptions::default())
        .unwrap_err();
    assert!(matches!(e, QueueError::UnknownDevice(_)), "{e}");
    let e = hub.core.up("d9", vec![], hub.now).unwrap_err();
    assert!(matches!(e, QueueError::Forbidden { .. }), "{e}");
    // Each level of a deeper tree is a gateway of the one above.
    assert!(hub.send("e1/e2/dev-7", SendOptions::default()).is_ok());
}

#[test]
fn an_edge_keeps_results_the_hub_has_not_stored_past_their_retention() {
    let mut edge = with_outbox(1000, 1);
    edge.limits.results_max = 1;
    edge.core.limits.results_max = 1;
    edge.connect("d0");
    let ids: Vec<CommandId> = (0..5)
        .map(|_| edge.send_prio("d0", Priority::Normal))
        .collect();
    for &id in &ids {
        edge.ack("d0", id, ok()).unwrap();
    }
    edge.advance(1);
    for &id in &ids {
        assert_eq!(edge.state(id), Some(State::Succeeded), "kept while unsent");
    }
    let last = outbox_of(&edge).last().unwrap().seq;
    edge.core.up_ack(last);
    edge.advance(1);
    edge.advance(1);
    assert!(
        edge.core.results.len() <= 1,
        "retention applies once the hub has them"
    );
}

// ----- clock jumps (DESIGN §5; issue 9) ---------------------------------------

#[test]
fn a_clock_jump_keeps_ttl_and_backoff_remaining_and_not_before_on_the_wall() {
    const HOUR: u64 = 3_600_000;
    for delta in [-(HOUR as i64), HOUR as i64] {
        let mut h = H::with_devices(
            Limits {
                backoff_base_ms: 10_000,
                backoff_cap_ms: 10_000,
                ..Limits::default()
            },
            2,
        );
        h.now = 1_750_000_000_000;
        let t0 = h.now;
        // d0: a ttl of 60 s; d1: one that failed once and backs off ~10 s;
        // and one not before t0 + 10 min (a wall-clock instant).
        let ttl = h
            .send(
                "d0",
                SendOptions {
                    ttl_ms: Some(60_000),
                    ..Default::default()
                },
            )
            .unwrap()
            .id;
        let later = h
            .send(
                "d0",
                SendOptions {
                    not_before: Some(t0 + 600_000),
                    ..Default::default()
                },
            )
            .unwrap()
            .id;
        h.connect("d1");
        let retry = h.send_prio("d1", Priority::Normal);
        h.ack(
            "d1",
            retry,
            Outcome::Failed {
                code: 1,
                message: "again".into(),
            },
        )
        .unwrap();
        assert_eq!(h.ids("d1"), vec![retry]);
        // The wall clock jumps; the shell notices and says so.
        h.now = if delta < 0 { t0 - HOUR } else { t0 + HOUR };
        h.core.clock_jumped(delta, h.now);
        h.round();
        h.check();
        assert_eq!(
            h.state(ttl),
            Some(State::Queued),
            "{delta}: no early expiry"
        );
        // 30 s on: the ttl has 30 s left; the backoff (≤ 10 s) is over.
        h.advance(30_000);
        assert_eq!(h.state(ttl), Some(State::Queued), "{delta}");
        assert_eq!(
            h.ids("d1"),
            vec![retry, retry],
            "{delta}: retried after its backoff"
        );
        h.advance(31_000);
        assert_eq!(
            h.state(ttl),
            Some(State::Expired),
            "{delta}: expired after its 60 s"
        );
        // not_before is an instant: an hour forward it is past, an hour
        // back it is still 70 minutes away.
        h.connect("d0");
        let delivered = h.ids("d0").contains(&later);
        assert_eq!(
            delivered,
            delta > 0,
            "{delta}: not_before follows the wall clock"
        );
        h.check();
    }
}

#[test]
fn below_the_reserve_a_drained_queue_takes_commands_into_the_space_it_freed() {
    let mut h = H::with_devices(Limits::default(), 1);
    let ids: Vec<CommandId> = (0..10)
        .map(|_| h.send_prio("d0", Priority::Normal))
        .collect();
    // The filesystem's free space stays low: sled keeps what it freed.
    h.core.set_disk_free(1024);
    assert!(h.send("d0", SendOptions::default()).is_err());
    h.connect("d0");
    for &id in &ids[..5] {
        h.ack("d0", id, ok()).unwrap();
    }
    assert!(
        h.send("d0", SendOptions::default()).is_err(),
        "half of the queue is not yet drained"
    );
    h.ack("d0", ids[5], ok()).unwrap();
    assert!(
        h.send("d0", SendOptions::default()).is_ok(),
        "below half: room again"
    );
    assert!(
        h.send("d0", SendOptions::default()).is_err(),
        "back at half of the mark: refused again"
    );
    h.check();
}

/// A workflow handed down to an edge ends as the result of the hub's
/// command: recorded once (a runner reporting again after a crash is
/// ignored), kept across a restart, and carried up by the outbox.
#[test]
fn a_command_the_box_ran_itself_is_recorded_once_and_goes_up() {
    let mut h = H::with_devices(Limits::default(), 1);
    h.outbox = Some(100);
    h.core.enable_outbox(100);
    let id = CommandId::new(h.now, 42);
    let rec = ResultRecord {
        id,
        gen: 0,
        device: "workflow".into(),
        target: "workflow".into(),
        priority: Priority::Normal,
        state: State::Succeeded,
        outcome: Some(Outcome::Ok(b"{\"state\":\"succeeded\"}".to_vec())),
        error: None,
        attempts: 1,
        max_attempts: 1,
        created_at: h.now,
        finished_at: h.now,
        origin: "upstream/cli".into(),
        key: None,
        command: None,
        children: Vec::new(),
    };
    assert!(h.core.record_finished(rec.clone(), h.now));
    h.round();
    assert!(!h.core.record_finished(rec.clone(), h.now), "once");
    h.round();
    h.reopen();
    assert_eq!(h.state(id), Some(State::Succeeded));
    assert!(
        !h.core.record_finished(rec, h.now),
        "once, after a restart too"
    );
    let up: Vec<_> = h
        .disk
        .outbox
        .values()
        .flatten()
        .filter(|e| matches!(&e.item, UpItem::Result(r) if r.id == id))
        .collect();
    assert_eq!(up.len(), 1, "one result goes up: {up:?}");
}

#[test]
fn a_state_an_edge_held_back_is_not_published_after_the_end() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    hub.connect("e1");
    let id = hub.send("e1/d0", SendOptions::default()).unwrap().id;
    take(&mut edge, id, "d0");
    hub.core.handed("e1", id, hub.now).unwrap();
    hub.round();
    edge.connect("d0");
    edge.ack("d0", id, ok()).unwrap();
    // A full outbox writes held telemetry after later results: the state
    // comes up after the end.
    let result = outbox_of(&edge)
        .into_iter()
        .find(|e| matches!(&e.item, UpItem::Result(r) if r.id == id))
        .unwrap();
    let stale = UpItem::State {
        id,
        device: "d0".into(),
        state: State::Queued,
        at: hub.now,
        attempts: 0,
    };
    let entries = vec![
        UpEntry {
            seq: 1,
            item: result.item,
        },
        UpEntry {
            seq: 2,
            item: stale,
        },
    ];
    assert_eq!(up(&mut hub, entries), 2);
    let last = hub.events.iter().rev().find(|e| e.id == id).unwrap();
    assert_eq!(last.state, State::Succeeded, "the end is the last word");
    assert_eq!(hub.state(id), Some(State::Succeeded));
}

#[test]
fn a_command_ended_by_its_edge_in_the_round_that_delivered_it_is_not_delivered() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    hub.connect("e1");
    let id = hub.send("e1/d0", SendOptions::default()).unwrap().id;
    take(&mut edge, id, "d0");
    edge.connect("d0");
    edge.ack("d0", id, ok()).unwrap();
    // The hub restarts before it hears `Accepted`: at the next connect it
    // forwards the command again, in the round that also applies the
    // edge's result.
    hub.reopen();
    let before = hub.ids("e1").len();
    let s = hub.core.connect("e1", 0, hub.now).unwrap();
    hub.sessions.insert("e1".into(), s);
    hub.core.up("e1", outbox_of(&edge), hub.now).unwrap();
    hub.round();
    assert_eq!(hub.ids("e1").len(), before, "nothing to deliver from");
    assert_eq!(hub.state(id), Some(State::Succeeded));
    hub.check();
}

/// A command the hub sent down to `e1/d0` that the device there rejected:
/// Failed on the edge and, once the outbox went up, on the hub.
fn failed_below(hub: &mut H, edge: &mut H) -> CommandId {
    hub.connect("e1");
    let id = hub.send("e1/d0", SendOptions::default()).unwrap().id;
    take(edge, id, "d0");
    hub.core.handed("e1", id, hub.now).unwrap();
    hub.round();
    edge.connect("d0");
    let no = Outcome::Rejected {
        reason: "no".into(),
    };
    edge.ack("d0", id, no).unwrap();
    up(hub, outbox_of(edge));
    assert_eq!(hub.state(id), Some(State::Failed));
    id
}

#[test]
fn a_retry_of_what_an_edge_ran_is_refused_with_the_way_out() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    let id = failed_below(&mut hub, &mut edge);
    let e = hub
        .core
        .retry(hub.disk.result(id).unwrap(), hub.now)
        .unwrap_err();
    assert!(e.to_string().contains("send it again"), "{e}");
    assert_eq!(hub.state(id), Some(State::Failed));
}

#[test]
fn the_hub_learns_the_end_of_an_edge_side_retry() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    let id = failed_below(&mut hub, &mut edge);
    // The edge's operator retries it there; it succeeds.
    edge.core
        .retry(edge.disk.result(id).unwrap(), edge.now)
        .unwrap();
    edge.round();
    edge.ack("d0", id, Outcome::Ok(b"second".to_vec())).unwrap();
    up(&mut hub, outbox_of(&edge));
    assert_eq!(
        hub.state(id),
        Some(State::Succeeded),
        "the hub showed the end the retry followed"
    );
    assert_eq!(
        hub.disk.result(id).unwrap().outcome,
        Some(Outcome::Ok(b"second".to_vec()))
    );
    hub.reopen();
    assert_eq!(hub.state(id), Some(State::Succeeded), "and after a restart");
    // (An end of the hub's own clock, Expired, is taken over the same way:
    // `an_end_from_the_edge_replaces_the_hubs_own_expired_but_not_a_cancel`.)
}

#[test]
fn the_hub_shows_a_device_below_online_while_its_edge_says_so_and_is_connected() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    let online = |hub: &H| {
        hub.core
            .devices()
            .into_iter()
            .find(|v| v.record.id == "e1/d0")
            .map(|v| v.online)
    };
    hub.connect("e1");
    up(&mut hub, outbox_of(&edge));
    assert_eq!(online(&hub), Some(false), "enrolled below, never connected");
    edge.connect("d0");
    up(&mut hub, outbox_of(&edge));
    assert_eq!(online(&hub), Some(true));
    hub.disconnect("e1");
    assert_eq!(
        online(&hub),
        Some(false),
        "its edge is gone: not known to be there"
    );
    hub.connect("e1");
    assert_eq!(online(&hub), Some(true));
    edge.disconnect("d0");
    up(&mut hub, outbox_of(&edge));
    assert_eq!(online(&hub), Some(false));
    let seen = hub
        .core
        .devices()
        .into_iter()
        .find(|v| v.record.id == "e1/d0");
    assert_eq!(seen.unwrap().record.last_seen, Some(edge.now));

    // The edge crashes while d0 is connected: no departure is written, so
    // the hub still shows it; the next uplink session's snapshot corrects
    // that, and one after a hub restart restores what the hub lost.
    edge.connect("d0");
    up(&mut hub, outbox_of(&edge));
    assert_eq!(online(&hub), Some(true));
    edge.reopen();
    up(&mut hub, outbox_of(&edge));
    assert_eq!(online(&hub), Some(true), "no departure was reported");
    edge.core.presence_snapshot();
    edge.round();
    up(&mut hub, outbox_of(&edge));
    assert_eq!(online(&hub), Some(false), "the snapshot says it is gone");
    edge.connect("d0");
    up(&mut hub, outbox_of(&edge));
    hub.reopen();
    hub.connect("e1");
    assert_eq!(online(&hub), Some(false), "a restarted hub knows nothing");
    edge.core.presence_snapshot();
    edge.round();
    up(&mut hub, outbox_of(&edge));
    assert_eq!(online(&hub), Some(true));
}

/// A hub's cursor counts in one database of the edge (`UpFrom`): an edge
/// whose data dir was wiped comes back with its old bundle and an outbox
/// that starts again at seq 1, far below the cursor. Without the epoch the
/// hub skipped the new records as applied, and its `UpAck` let the edge
/// delete them: their results never reached the hub.
#[test]
fn a_wiped_edges_new_outbox_is_not_skipped_by_the_hubs_old_cursor() {
    let mut hub = hub();
    let mut old = with_outbox(1000, 1);
    old.connect("d0");
    old.traffic("d0", 5);
    hub.connect("e1");
    assert_eq!(hub.core.up_from("e1", 0xa1, hub.now), Ok(None));
    let cursor = up(&mut hub, outbox_of(&old));
    assert!(cursor > 3);
    // Wiped: a fresh store under the same name, with a new epoch.
    let mut fresh = with_outbox(1000, 1);
    fresh.now += 60_000; // its own ids, not the old store's
    fresh.connect("d0");
    let id = fresh.send_prio("d0", Priority::Normal);
    fresh.ack("d0", id, ok()).unwrap();
    let entries = outbox_of(&fresh);
    assert!(
        entries.last().unwrap().seq < cursor,
        "the new outbox starts below the cursor"
    );
    hub.disconnect("e1");
    hub.connect("e1");
    assert_eq!(hub.core.up_from("e1", 0xb2, hub.now), Ok(Some(0)));
    hub.round();
    assert_eq!(up(&mut hub, entries.clone()), entries.last().unwrap().seq);
    assert_eq!(
        hub.state(id),
        Some(State::Succeeded),
        "the hub took the new result"
    );
    // The reset cursor is durable: after a hub restart the same epoch is
    // not reset again, and what was applied is not applied twice.
    hub.reopen();
    hub.connect("e1");
    assert_eq!(hub.core.up_from("e1", 0xb2, hub.now), Ok(None));
    let applied = hub.core.stats().up_applied_total;
    up(&mut hub, entries);
    assert_eq!(hub.core.stats().up_applied_total, applied, "all duplicates");
}

/// An edge of the same database keeps its cursor across sessions; a
/// cursor of unknown epoch (written before 1.6) is adopted, not reset: the
/// box upgraded, its database did not change.
#[test]
fn the_same_epoch_or_a_cursor_from_before_epochs_keeps_the_cursor() {
    let mut hub = hub();
    let mut edge = with_outbox(1000, 1);
    edge.connect("d0");
    edge.traffic("d0", 3);
    hub.connect("e1");
    // No `UpFrom`: an edge older than 1.6.
    let cursor = up(&mut hub, outbox_of(&edge));
    assert_eq!(hub.disk.cursors["e1"].epoch, 0);
    assert_eq!(hub.core.up_from("e1", 7, hub.now), Ok(None));
    hub.round();
    assert_eq!(
        hub.disk.cursors["e1"],
        crate::engine::journal::Cursor {
            epoch: 7,
            seq: cursor
        },
        "adopted, durably"
    );
    assert_eq!(hub.core.up_from("e1", 7, hub.now), Ok(None));
    let dups = hub.core.stats().up_duplicates_total;
    up(&mut hub, outbox_of(&edge));
    assert!(hub.core.stats().up_duplicates_total > dups, "still skipped");
}

/// What the hub had handed to the edge's old database is gone with it:
/// under a new epoch those commands go down again (the new database takes
/// them; a restored one dedupes those it has), and one whose cancel the old
/// database never confirmed ends cancelled instead of waiting for a box
/// that no longer holds it.
#[test]
fn a_new_epoch_forwards_again_what_the_old_database_held() {
    let mut hub = hub();
    let mut old = with_outbox(1000, 1);
    hub.connect("e1");
    assert_eq!(hub.core.up_from("e1", 1, hub.now), Ok(None));
    let ids: Vec<CommandId> = (0..2)
        .map(|_| hub.send("e1/d0", SendOptions::default()).unwrap().id)
        .collect();
    for &id in &ids {
        take(&mut old, id, "d0");
        hub.core.handed("e1", id, hub.now).unwrap();
        hub.round();
    }
    hub.core.cancel(ids[1], hub.now).unwrap();
    hub.round();
    hub.check();
    // Wiped; the gateway reconnects under a new epoch.
    hub.disconnect("e1");
    hub.delivered.clear();
    hub.connect("e1");
    assert!(hub.ids("e1").is_empty(), "handed: not forwarded at connect");
    assert_eq!(hub.core.up_from("e1", 2, hub.now), Ok(Some(2)));
    hub.round();
    hub.check();
    assert_eq!(hub.ids("e1"), ids[..1], "forwarded again");
    assert_eq!(hub.state(ids[1]), Some(State::Cancelled));
    let mut fresh = with_outbox(1000, 1);
    assert!(
        !take(&mut fresh, ids[0], "d0").duplicate,
        "new to the new box"
    );
    hub.core.handed("e1", ids[0], hub.now).unwrap();
    hub.round();
    fresh.connect("d0");
    fresh.ack("d0", ids[0], ok()).unwrap();
    up(&mut hub, outbox_of(&fresh));
    assert_eq!(hub.state(ids[0]), Some(State::Succeeded));
}

#[test]
fn check_invariants_names_what_a_corrupted_state_broke() {
    let mut h = H::with_devices(Limits::default(), 2);
    let a = h.send_prio("d0", Priority::Normal);
    h.send_prio("d1", Priority::Normal);
    h.connect("d0");
    assert_eq!(h.core.check_invariants(), Ok(()));
    // Each corruption is one a bug in the core could make; each is undone
    // before the next, and the state checks clean again.
    let c = &mut h.core;
    c.devs[0].borrowed += 1;
    assert!(c.check_invariants().unwrap_err().contains("borrowed"));
    c.devs[0].borrowed -= 1;
    c.devs[1].live += 1;
    assert!(c
        .check_invariants()
        .unwrap_err()
        .contains("live commands miscounted"));
    c.devs[1].live -= 1;
    c.devs[0].in_flight.retain(|id| *id != a);
    let e = c.check_invariants().unwrap_err();
    assert!(e.contains(&a.to_string()) && e.contains("in flight"), "{e}");
    c.devs[0].in_flight.insert(a);
    c.results.insert(a, (1, State::Succeeded));
    assert!(c
        .check_invariants()
        .unwrap_err()
        .contains("both live and finished"));
    c.results.remove(&a);
    assert_eq!(c.check_invariants(), Ok(()));
}

/// A box in the middle tier (a hub with an uplink of its own) passes up
/// the end its edge reported as it records it: naming the device below by
/// its path, with the edge's attempts and children. It used to amend its
/// record after the outbox had copied it, so the top hub showed the
/// gateway's name (`m1/e1`) as the device, and no children.
#[test]
fn a_middle_box_passes_up_the_device_and_children_its_edge_reported() {
    let mut mid = hub();
    mid.outbox = Some(1000);
    mid.core.enable_outbox(1000);
    let mut low = with_outbox(1000, 0);
    // Both cores are seeded alike: another clock keeps the children's ids
    // apart from the middle box's.
    low.advance(5);
    for d in ["d0", "d1"] {
        low.core.enroll(labelled(d, &["line"], &[]), low.now);
    }
    low.round();
    mid.connect("e1");
    let direct = mid.send("e1/d0", SendOptions::default()).unwrap().id;
    let all = mid.send("e1/tag:line", SendOptions::default()).unwrap().id;
    take(&mut low, direct, "d0");
    take(&mut low, all, "tag:line");
    for id in [direct, all] {
        mid.core.handed("e1", id, mid.now).unwrap();
    }
    mid.round();
    low.connect("d0");
    low.connect("d1");
    low.ack("d0", direct, ok()).unwrap();
    for c in low.view(all).children {
        low.ack(&c.device, c.id, ok()).unwrap();
    }
    up(&mut mid, outbox_of(&low));
    let passed_up = |id: CommandId| {
        up_items(&mid)
            .into_iter()
            .find_map(|(_, _, i)| match i {
                UpItem::Result(r) if r.id == id => Some(r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{id}'s end is in the middle box's outbox"))
    };
    let r = passed_up(direct);
    assert_eq!((r.state, r.device.as_str()), (State::Succeeded, "e1/d0"));
    assert_eq!(r.attempts, 1);
    let r = passed_up(all);
    assert_eq!(r.state, State::Succeeded);
    let children: Vec<_> = r.children.iter().map(|c| c.device.as_str()).collect();
    assert_eq!(children, ["e1/d0", "e1/d1"], "{r:?}");
    assert_eq!(
        mid.disk.result(direct).unwrap().device,
        "e1/d0",
        "and on its disk"
    );
}

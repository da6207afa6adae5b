//! Tests of the sans-IO core, driven round by round against an in-memory
//! "disk" that applies each sealed group exactly as the store does, so a
//! restart can be replayed without sled.

use super::*;
use crate::command::SendOptions;
use proptest::prelude::*;

#[derive(Default, Clone)]
struct MemDisk {
    journal: BTreeMap<u64, Vec<Entry>>,
    results: BTreeMap<u64, Vec<ResultRecord>>,
    devices: BTreeMap<String, DeviceRecord>,
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
        }
    }

    fn with_devices(limits: Limits, n: usize) -> Self {
        let mut h = H::new(limits);
        for i in 0..n {
            h.core.enroll(dev(&format!("d{i}")), h.now);
        }
        h.round();
        h
    }

    /// Seal, "write", take effects — what the writer thread does.
    fn round(&mut self) {
        // As the writer does: relocate one straggler group per round.
        if let Some(seq) = self.core.relocation_candidate() {
            let entries = self.disk.journal[&seq].clone();
            self.core.relocate(seq, entries);
        }
        let sealed = self.core.seal(self.now);
        let mut w = sealed.write;
        for (i, g) in sealed.payload_from {
            let id = w.results[i].id;
            let src = if g == w.seq {
                Some(&w.journal)
            } else {
                self.disk.journal.get(&g)
            };
            let c = src
                .into_iter()
                .flatten()
                .find_map(|e| match e {
                    Entry::Enqueued(e) if e.command.id == id => Some(e.command.clone()),
                    _ => None,
                })
                .expect("a retryable result's payload is on disk");
            w.results[i].command = Some(c);
        }
        self.disk.apply(w);
        let fx = self.core.take_effects();
        for r in fx.device_writes {
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
        for (id, l) in &c.live {
            assert!(
                !c.results.contains_key(id),
                "{id} is both live and finished"
            );
            assert!(
                self.disk
                    .journal
                    .get(&l.group)
                    .is_some_and(|g| g.iter().any(
                        |e| matches!(e, Entry::Enqueued(e) if e.command.id == *id && e.gen == l.gen)
                    )),
                "{id}: its journal group {} is not on disk",
                l.group
            );
            if let Some(rg) = l.requeue_group {
                assert!(
                    self.disk.journal.get(&rg).is_some_and(|g| g.iter().any(
                        |e| matches!(e, Entry::Requeued { id: x, gen, attempts, .. } if x == id && *gen == l.gen && *attempts == l.attempts)
                    )),
                    "{id}: its latest requeue (group {rg}) is not on disk"
                );
                assert!(
                    c.requeue_holders.get(&rg).is_some_and(|v| v.contains(id)),
                    "{id} missing from requeue holders of {rg}"
                );
            }
            let dev = &c.devs[l.device as usize];
            let in_ready = dev.ready[l.priority.rank()].get(&l.order) == Some(id);
            match l.phase {
                Phase::Ready => assert!(in_ready, "{id} ready but not queued"),
                Phase::InFlight { .. } => assert!(dev.in_flight.contains(id) && !in_ready),
                Phase::Waiting | Phase::Blocked => assert!(!in_ready),
            }
        }
        for dev in &c.devs {
            let ready: usize = dev.ready.iter().map(|q| q.len()).sum();
            if let Some((_, window)) = dev.session {
                assert!(
                    dev.in_flight.len() as u32 <= window,
                    "window exceeded on {}",
                    dev.id
                );
                // Work-conserving: nothing ready waits while there is room.
                assert!(
                    ready == 0 || dev.in_flight.len() as u32 == window,
                    "{} idles with work",
                    dev.id
                );
            } else {
                assert!(
                    dev.in_flight.is_empty(),
                    "{} offline with commands in flight",
                    dev.id
                );
            }
            assert_eq!(
                dev.live as usize,
                c.live
                    .values()
                    .filter(|l| c.devs[l.device as usize].id == dev.id)
                    .count()
            );
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
    for _ in 0..200 {
        let id = h.send_prio("d1", Priority::Normal);
        h.ack("d1", id, ok()).unwrap();
        h.check();
    }
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
fn results_are_kept_within_retention_and_never_contradict_the_journal() {
    let limits = Limits {
        results_max: 10,
        ..Limits::default()
    };
    let mut h = H::with_devices(limits, 1);
    h.connect("d0");
    for _ in 0..50 {
        let id = h.send_prio("d0", Priority::Normal);
        h.ack("d0", id, ok()).unwrap();
    }
    assert!(h.core.results.len() <= 11, "{}", h.core.results.len());
    h.check();
    h.reopen();
    assert!(
        h.core.live.is_empty(),
        "no dropped result resurrects a command"
    );
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
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u8, 0..3u8, proptest::option::of(1..3000u16), proptest::option::of(0..4u8), any::<bool>(), 1..4u8)
            .prop_map(|(dev, prio, ttl, key, after, max_attempts)| Op::Send { dev, prio, ttl, key, after, max_attempts }),
        2 => (0..3u8).prop_map(Op::Connect),
        1 => (0..3u8).prop_map(Op::Disconnect),
        4 => (0..3u8, any::<u8>(), 0..3u8).prop_map(|(dev, pick, kind)| Op::Ack { dev, pick, kind }),
        1 => any::<u8>().prop_map(Op::Cancel),
        1 => any::<u8>().prop_map(Op::Retry),
        2 => (0..5000u16).prop_map(Op::Advance),
        1 => Just(Op::Reopen),
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
        let mut h = H::with_devices(limits, 3);
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
                    match h.send(&format!("d{dev}"), opts) {
                        Ok(r) => accepted.push(r.id),
                        Err(e) => prop_assert!(matches!(e, QueueError::QueueFull { .. }), "{e}"),
                    }
                }
                Op::Connect(d) => h.connect(&format!("d{d}")),
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

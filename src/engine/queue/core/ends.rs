//! Ends: a command finished (by its device or by the box), a broadcast
//! child and its parent settled, the dependents released, the result
//! recorded and kept within the retention.

use super::*;

impl QueueCore {
    /// End a live command: record its result, release its pins and its
    /// dependents, and cancel it on its device if it is there.
    pub(super) fn finish(
        &mut self,
        id: CommandId,
        state: State,
        outcome: Option<Outcome>,
        error: Option<String>,
        now: Millis,
    ) {
        self.finish_as(id, state, outcome, error, now, |_| {});
    }

    /// `finish`, with the record amended before it is recorded: the end a
    /// box below reported names its own device, attempts and children. The
    /// record is copied to the outbox and published as it is recorded, so
    /// a change made after would reach neither (a middle box sent its hub
    /// the gateway's name for the device, and no children).
    pub(super) fn finish_as(
        &mut self,
        id: CommandId,
        state: State,
        outcome: Option<Outcome>,
        error: Option<String>,
        now: Millis,
        amend: impl FnOnce(&mut ResultRecord),
    ) {
        let on = self.release(id);
        let Some(l) = self.live.remove(&id) else {
            return;
        };
        let dev = &mut self.devs[l.device as usize];
        dev.live -= 1;
        dev.ready[l.priority.rank()].remove(&l.order);
        if let Phase::Handed { .. } = l.phase {
            dev.handed -= 1;
        }
        self.remote.remove(&id);
        if self.cancelling.remove(&id) {
            self.cancel_marks.push((id, false));
        }
        if !self.maybe_held.is_empty() {
            self.maybe_held.remove(&id);
        }
        // The device it ran on (for a pool command, the one chosen for it).
        let ran_on = on.unwrap_or(l.device);
        let device = self.devs[ran_on as usize].id.clone();
        if on.is_some() && state != State::Succeeded && outcome.is_none() {
            self.effects.cancels.push((device.clone(), id));
        }
        if let Some(t) = l.not_before {
            self.wakeups.remove(&(t, id));
        }
        if let Some(e) = l.expires_at {
            self.expiries.remove(&(e, id));
        }
        if let Some(dep) = l.after() {
            if let Some(v) = self.blocked.get_mut(&dep) {
                v.retain(|x| *x != id);
            }
        }
        self.unpin(l.group);
        if let Some(g) = l.requeue_group {
            self.unpin(g);
        }
        let attempts = match l.phase {
            Phase::InFlight { attempt, .. } | Phase::Handed { attempt } if outcome.is_some() => {
                attempt
            }
            _ => l.attempts,
        };
        let keep_command = matches!(state, State::Dead | State::Failed);
        let mut record = ResultRecord {
            id,
            gen: l.gen,
            target: l
                .target()
                .map(str::to_string)
                .unwrap_or_else(|| self.devs[l.device as usize].id.clone()),
            device,
            priority: l.priority,
            state,
            outcome,
            error,
            attempts,
            max_attempts: l.max_attempts,
            created_at: l.created_at,
            finished_at: now,
            origin: self
                .origins
                .get(l.origin as usize)
                .cloned()
                .unwrap_or_else(|| ORIGIN_UNKNOWN.into()),
            key: l.key().map(str::to_string),
            // The shell fills the payload in from the journal before writing
            // (the core does not hold payloads).
            command: keep_command.then(|| Command {
                id,
                target: String::new(),
                priority: l.priority,
                payload: Vec::new(),
                created_at: l.created_at,
                expires_at: l.expires_at,
                max_attempts: l.max_attempts,
                key: None,
                after: None,
                not_before: None,
                origin: String::new(),
                signature: None,
            }),
            children: Vec::new(),
        };
        amend(&mut record);
        if keep_command {
            self.payload_from.push((self.finished.len(), l.group));
        }
        self.record_result(record, now);
        if self.blocked.contains_key(&id) {
            self.dependency_done(id, state == State::Succeeded, now);
        }
        if let Some(pid) = l.parent() {
            self.child_done(pid, id, state, now);
        }
        self.pump(l.device, now);
        if ran_on != l.device {
            self.pump(ran_on, now);
        }
    }

    /// A broadcast's child ended; the broadcast ends with its last child.
    pub(super) fn child_done(&mut self, pid: CommandId, cid: CommandId, state: State, now: Millis) {
        let Some(p) = self.parents.get_mut(&pid) else {
            return;
        };
        if let Some(i) = p.children.iter().position(|c| c.0 == cid) {
            if p.ends[i].is_none() {
                p.ends[i] = Some(state);
                p.open = p.open.saturating_sub(1);
            }
        }
        self.settle_parent(pid, now);
    }

    /// Record a broadcast's result once none of its children is open.
    pub(super) fn settle_parent(&mut self, pid: CommandId, now: Millis) {
        if self.parents.get(&pid).is_none_or(|p| p.open > 0) {
            return;
        }
        let p = self.parents.remove(&pid).expect("checked");
        let children: Vec<ChildEnd> = self
            .children_of(&p)
            .into_iter()
            .map(|c| ChildEnd {
                id: c.id,
                device: c.device,
                state: c.state,
            })
            .collect();
        let state = if p.cancelled {
            State::Cancelled
        } else if children.iter().all(|c| c.state == State::Succeeded) {
            State::Succeeded
        } else if let Some(first) = children.first().map(|c| c.state) {
            if children.iter().all(|c| c.state == first) {
                first
            } else {
                State::Failed
            }
        } else {
            State::Succeeded
        };
        let summary = summarize(children.iter().map(|c| c.state));
        let c = p.command;
        let rec = ResultRecord {
            id: pid,
            gen: 0,
            device: c.target.clone(),
            target: c.target,
            priority: c.priority,
            state,
            outcome: None,
            error: (state != State::Succeeded).then_some(summary),
            attempts: 0,
            max_attempts: c.max_attempts,
            created_at: c.created_at,
            finished_at: now,
            origin: c.origin,
            key: c.key,
            command: None,
            children,
        };
        self.record_result(rec, now);
        if self.blocked.contains_key(&pid) {
            self.dependency_done(pid, state == State::Succeeded, now);
        }
    }

    pub(super) fn record_result(&mut self, rec: ResultRecord, now: Millis) {
        self.index_result(self.open_seq, rec.id, rec.state, now);
        if self.outbox.is_on() {
            // The payload kept for `retry` stays here; the hub has its own.
            self.outbox.push(UpItem::Result(ResultRecord {
                command: None,
                ..rec.clone()
            }));
        }
        self.effects.events.push(LifecycleEvent {
            id: rec.id,
            device: rec.device.clone(),
            state: rec.state,
            at: now,
            attempts: rec.attempts,
            outcome: rec.outcome.clone(),
            error: rec.error.clone(),
        });
        self.finished.push(rec);
    }

    pub(super) fn index_result(&mut self, seq: u64, id: CommandId, state: State, at: Millis) {
        if let Some((old, s)) = self.results.insert(id, (seq, state)) {
            if s == State::Dead {
                self.results_dead -= 1;
            }
            let _ = old;
        }
        if state == State::Dead {
            self.results_dead += 1;
        }
        let g = self.result_groups.entry(seq).or_insert((at, Vec::new()));
        g.0 = g.0.max(at);
        g.1.push(id);
    }

    pub(super) fn dependency_done(&mut self, dep: CommandId, ok: bool, now: Millis) {
        let Some(dependents) = self.blocked.remove(&dep) else {
            return;
        };
        for id in dependents {
            let Some(l) = self.live.get_mut(&id) else {
                continue;
            };
            if ok {
                l.clear_after();
                self.place(id, now);
                let d = self.live[&id].device;
                self.pump(d, now);
            } else {
                let msg = format!("DependencyFailed: command {dep} did not succeed");
                self.finish(id, State::Dead, None, Some(msg), now);
            }
        }
    }

    pub(super) fn retain_results(&mut self, now: Millis) {
        // Never drop a result that a journal group still on disk could
        // contradict (see the module doc).
        // Nor one the upstream has not stored yet: an edge must still know
        // a command it ran when its hub forwards that command again.
        let oldest_journal = self
            .pins
            .keys()
            .next()
            .copied()
            .unwrap_or(self.open_seq)
            .min(self.outbox.oldest_group().unwrap_or(u64::MAX));
        while self.results.len() > self.limits.results_max
            || self
                .result_groups
                .first_key_value()
                .is_some_and(|(_, (at, _))| {
                    now.saturating_sub(*at) > self.limits.results_max_age_ms
                })
        {
            let Some((&seq, _)) = self.result_groups.first_key_value() else {
                break;
            };
            if seq >= oldest_journal {
                break;
            }
            let (_, (_, ids)) = self.result_groups.pop_first().expect("first exists");
            for id in ids {
                if self.results.get(&id).is_some_and(|&(s, _)| s == seq) {
                    if let Some((_, State::Dead)) = self.results.remove(&id) {
                        self.results_dead -= 1;
                    }
                }
            }
            self.drop_results.push(seq);
        }
    }
}

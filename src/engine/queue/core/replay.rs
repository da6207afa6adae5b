//! Replay: the core rebuilt from the store at start (device records, then
//! journal and result groups in commit order, then the outbox), and what a
//! finished replay settles (timers, pins, blocked dependencies).

use super::*;

impl QueueCore {
    /// Rebuild from the store: devices first, then every group in order,
    /// then `finish_replay`. Replay emits nothing to journal.
    pub fn replay_device(&mut self, rec: DeviceRecord) {
        if rec.id.contains('/') {
            self.replay_remote_device(rec);
            return;
        }
        let d = self.dev(&rec.id);
        self.devs[d as usize].record = Some(rec);
        self.index_caps(d);
    }

    /// Apply one group read back from disk.
    pub fn replay_group(&mut self, group: Group) {
        match group {
            Group::Journal(seq, entries) => {
                self.open_seq = self.open_seq.max(seq + 1);
                self.live.reserve(entries.len());
                // Register the group so it is dropped if nothing pins it.
                self.pins.entry(seq).or_insert(0);
                for e in entries {
                    match e {
                        Entry::Enqueued(e) => self.replay_enqueued(seq, e),
                        Entry::Requeued {
                            id,
                            gen,
                            attempts,
                            not_before,
                        } => {
                            if let Some(l) = self.live.get_mut(&id) {
                                if l.gen == gen {
                                    l.attempts = attempts;
                                    l.not_before = not_before;
                                    l.requeue_group = Some(seq);
                                }
                            }
                        }
                        Entry::Broadcast(b) => self.replay_broadcast(seq, b),
                    }
                }
            }
            Group::Results(seq, records) => {
                self.open_seq = self.open_seq.max(seq + 1);
                for r in records {
                    if let Some(l) = self.live.get(&r.id) {
                        if l.gen != r.gen {
                            continue;
                        }
                        self.live.remove(&r.id);
                    }
                    self.parents.remove(&r.id);
                    if let Some((origin, key)) = r.key.as_ref().map(|k| (r.origin.as_str(), k)) {
                        let o = self.origin(origin);
                        let payload = r.command.as_ref().map(|c| c.payload.as_slice());
                        let used = KeyUse::new(r.id, r.created_at, &r.target, payload);
                        self.remember_key(o, key, used);
                    }
                    self.index_result(seq, r.id, r.state, r.finished_at);
                }
            }
        }
    }

    pub(super) fn replay_enqueued(&mut self, seq: u64, e: Enqueued) {
        let id = e.command.id;
        if let Some(l) = self.live.get(&id) {
            if l.gen > e.gen {
                return;
            }
        }
        // A later generation (retry) supersedes the result on record.
        if let Some((rseq, state)) = self.results.remove(&id) {
            if state == State::Dead {
                self.results_dead -= 1;
            }
            let _ = rseq;
        }
        self.next_order = self.next_order.max(e.order + 1);
        let d = self.dev(&e.device);
        let origin = self.origin(&e.command.origin);
        if let Some(k) = &e.command.key {
            let c = &e.command;
            let used = KeyUse::new(id, c.created_at, &c.target, Some(&c.payload));
            self.remember_key(origin, k, used);
        }
        let live = Live {
            device: d,
            gen: e.gen,
            priority: e.command.priority,
            order: e.order,
            group: seq,
            requeue_group: None,
            attempts: e.attempts,
            max_attempts: e.command.max_attempts,
            created_at: e.command.created_at,
            expires_at: e.command.expires_at,
            not_before: e.not_before,
            phase: Phase::Ready,
            origin,
            rare: Rare::boxed(
                e.command.after,
                (e.command.target != e.device).then(|| e.command.target.into()),
                e.command.key.map(Into::into),
                None,
            ),
        };
        self.live.insert(id, live);
    }

    pub(super) fn replay_broadcast(&mut self, seq: u64, b: Broadcast) {
        let Broadcast {
            mut command,
            children,
        } = b;
        let pid = command.id;
        self.next_order = self
            .next_order
            .max(children.iter().map(|c| c.order + 1).max().unwrap_or(0));
        let origin = self.origin(&command.origin);
        if let Some(k) = &command.key {
            let used = KeyUse::new(
                pid,
                command.created_at,
                &command.target,
                Some(&command.payload),
            );
            self.remember_key(origin, k, used);
        }
        command.payload = Vec::new();
        let mut parent = Parent {
            command,
            group: seq,
            children: Vec::with_capacity(children.len()),
            ends: Vec::with_capacity(children.len()),
            open: 0,
            cancelled: false,
        };
        for c in children {
            let d = self.dev(&c.device);
            parent.children.push((c.id, d));
            parent.ends.push(c.end);
            if c.end.is_some() || self.live.get(&c.id).is_some_and(|l| l.gen > 0) {
                continue;
            }
            let live = Live {
                device: d,
                order: c.order,
                attempts: c.attempts,
                not_before: c.not_before,
                ..Live::child_of(&parent.command, origin, seq)
            };
            self.live.insert(c.id, live);
        }
        self.parents.insert(pid, parent);
    }

    /// Never reuse a group seq the store has committed, even one whose
    /// records were all dropped since.
    pub fn replay_last_seq(&mut self, seq: u64) {
        self.open_seq = self.open_seq.max(seq + 1);
    }

    /// Size the live table for about `n` commands before replay (from
    /// `Store::live_hint`; bounded by `max_queued`, so a bad hint cannot
    /// allocate more than the box may hold).
    pub fn reserve_live(&mut self, n: u64) {
        let n = n.min(self.limits.max_queued).saturating_mul(11) / 10;
        self.live.reserve(usize::try_from(n).unwrap_or(0));
    }

    /// How many commands are live (queued, waiting or in flight).
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// End a restart, after the last group: put each live command in its
    /// queue or its wait, pin the groups that hold it, settle dependencies
    /// and broadcasts the log left half-done, then tick to `now`. The
    /// effects of the rebuilding are dropped; those of the tick (an expiry)
    /// stand.
    pub fn finish_replay(&mut self, now: Millis) {
        // One pass over the live commands. Those ready now (nearly all,
        // after a power cut) go straight into their queues, each queue built
        // at once from its sorted commands; the rest are placed one by one.
        let mut pins: FxHashMap<u64, u32> = FxHashMap::default();
        let mut ready: FxHashMap<(u32, usize), Vec<(u64, CommandId)>> = FxHashMap::default();
        let mut others: Vec<(u64, CommandId)> = Vec::new();
        for (id, l) in self.live.iter_mut() {
            let id = &id;
            *pins.entry(l.group).or_insert(0) += 1;
            if let Some(rg) = l.requeue_group {
                *pins.entry(rg).or_insert(0) += 1;
                self.requeue_holders.entry(rg).or_default().push(*id);
            }
            self.devs[l.device as usize].live += 1;
            if let Some(exp) = l.expires_at {
                self.expiries.insert((exp, *id));
            }
            if l.after().is_none() && l.not_before.is_none_or(|t| t <= now) {
                l.phase = Phase::Ready;
                ready
                    .entry((l.device, l.priority.rank()))
                    .or_default()
                    .push((l.order, *id));
            } else {
                others.push((l.order, *id));
            }
        }
        for (g, n) in pins {
            *self.pins.entry(g).or_insert(0) += n;
        }
        for ((d, rank), mut q) in ready {
            q.sort_unstable();
            self.devs[d as usize].ready[rank] = q.into_iter().collect();
        }
        others.sort_unstable();
        for (_, id) in others {
            self.place(id, now);
        }
        self.unpinned = self
            .pins
            .iter()
            .filter(|(_, &n)| n == 0)
            .map(|(&s, _)| s)
            .collect();
        // A dependent whose dependency ended badly but whose own end was not
        // on disk (it always is: both are in one batch) is settled here.
        let dangling: Vec<CommandId> = self
            .blocked
            .keys()
            .filter(|dep| !self.is_live(**dep))
            .copied()
            .collect();
        for dep in dangling {
            let ok = matches!(self.results.get(&dep), Some((_, State::Succeeded)));
            self.dependency_done(dep, ok, now);
        }
        // A broadcast's children that ended after its entry was written have
        // their end in their own result; one whose last child ended is
        // settled (both are always in one batch, so this is a safety net).
        let pids: Vec<CommandId> = self.parents.keys().copied().collect();
        for pid in pids {
            let mut p = self.parents.remove(&pid).expect("listed");
            p.open = 0;
            for (i, &(cid, _)) in p.children.iter().enumerate() {
                if p.ends[i].is_some() {
                    continue;
                }
                if self.live.get(&cid).is_some_and(|l| l.parent() == Some(pid)) {
                    p.open += 1;
                } else {
                    p.ends[i] = Some(self.results.get(&cid).map_or(State::Cancelled, |r| r.1));
                }
            }
            self.parents.insert(pid, p);
            self.settle_parent(pid, now);
        }
        self.effects = Effects::default();
        self.settle_cancelling();
        self.held_before_start();
        self.tick(now);
    }

    /// The outbox's next seq, as the store kept it.
    pub fn replay_outbox_seq(&mut self, next: u64) {
        self.outbox.restore_next_seq(next);
    }

    /// Rebuild the outbox's index from a group read back at start.
    pub fn replay_outbox(&mut self, group: u64, entries: &[UpEntry], now: Millis) {
        self.open_seq = self.open_seq.max(group + 1);
        self.outbox.replay(group, entries, now);
    }
}

/// The outbox as a store holds it at start.
pub(crate) struct ReplayOutbox {
    pub max: u64,
    pub next_seq: u64,
    pub groups: Vec<(u64, Vec<crate::engine::journal::UpEntry>)>,
}

/// The first half of a restart, before the journal groups: devices, the
/// hub's per-edge cursors and pending cancels, and the outbox. Shared with
/// the simulation, so a simulated restart rebuilds in the order a real one
/// does; the groups then go to `replay_group` and the end to
/// `replay_last_seq` + `finish_replay`.
pub(crate) fn replay_start(
    core: &mut QueueCore,
    devices: impl IntoIterator<Item = DeviceRecord>,
    cursors: impl IntoIterator<Item = (DeviceId, crate::engine::journal::Cursor)>,
    cancel_marks: impl IntoIterator<Item = CommandId>,
    outbox: Option<ReplayOutbox>,
    now: Millis,
) {
    for d in devices {
        core.replay_device(d);
    }
    for (edge, cursor) in cursors {
        core.replay_cursor(edge, cursor);
    }
    for id in cancel_marks {
        core.replay_cancelling(id);
    }
    if let Some(o) = outbox {
        core.enable_outbox(o.max);
        core.replay_outbox_seq(o.next_seq);
        for (seq, entries) in o.groups {
            core.replay_outbox(seq, &entries, now);
        }
    }
}

/// Drop what replay does not use: payloads (read again from the journal
/// when delivered) and the commands and outcomes kept in results. A
/// command with an idempotency key keeps its payload: replay digests it, so
/// a reuse of the key for another payload is still refused after a restart.
pub(crate) fn strip_payloads(g: &mut Group) {
    match g {
        Group::Journal(_, entries) => {
            for e in entries {
                let c = match e {
                    Entry::Enqueued(e) => &mut e.command,
                    Entry::Broadcast(b) => &mut b.command,
                    Entry::Requeued { .. } => continue,
                };
                if c.key.is_none() {
                    c.payload = Vec::new();
                }
            }
        }
        Group::Results(_, records) => {
            for r in records {
                if r.key.is_none() {
                    r.command = None;
                }
                r.outcome = None;
            }
        }
    }
}

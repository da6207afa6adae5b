//! Delivery: a live command placed in its device's (or pool's) ready
//! queue, handed out within the window, released, and requeued after a
//! drop or a failure.

use super::*;

impl QueueCore {
    pub(super) fn admit(&mut self, id: CommandId, live: Live, now: Millis) {
        let d = live.device;
        *self.pins.entry(live.group).or_insert(0) += 1;
        if let Some(exp) = live.expires_at {
            self.expiries.insert((exp, id));
        }
        self.devs[d as usize].live += 1;
        self.stats.queued += 1;
        self.live.insert(id, live);
        self.place(id, now);
    }

    /// Put a live, not-in-flight command where it belongs: ready, waiting
    /// for a time, or blocked on its dependency.
    pub(super) fn place(&mut self, id: CommandId, now: Millis) {
        let after = self.live[&id].after();
        if let Some(dep) = after {
            let succeeded =
                !self.is_live(dep) && matches!(self.results.get(&dep), Some((_, State::Succeeded)));
            if !succeeded {
                // Blocked until the dependency ends; one that already ended
                // badly is settled by `dependency_done`.
                self.live.get_mut(&id).expect("live").phase = Phase::Blocked;
                let v = self.blocked.entry(dep).or_default();
                if !v.contains(&id) {
                    v.push(id);
                }
                return;
            }
        }
        let l = self.live.get_mut(&id).expect("placing a live command");
        l.clear_after();
        match l.not_before {
            Some(t) if t > now => {
                l.phase = Phase::Waiting;
                self.wakeups.insert((t, id));
            }
            _ => {
                l.phase = Phase::Ready;
                let (d, rank, order) = (l.device, l.priority.rank(), l.order);
                self.devs[d as usize].ready[rank].insert(order, id);
            }
        }
    }

    /// Hand ready commands to a connected device while its window allows:
    /// its own first, then those of the pools it serves. For a pool, hand
    /// its commands to its members.
    pub(super) fn pump(&mut self, d: u32, now: Millis) {
        if self.devs[d as usize].pool {
            self.pump_pool(d, now);
            return;
        }
        while self.devs[d as usize].has_room() {
            let Some(id) = self.devs[d as usize]
                .ready
                .iter_mut()
                .find_map(|q| q.pop_first().map(|(_, id)| id))
            else {
                break;
            };
            self.deliver(id, d, now);
        }
        if self.devs[d as usize].has_room() {
            for p in self.devs[d as usize].serves.clone() {
                self.pump_pool(p, now);
            }
        }
    }

    /// Hand a pool's ready commands, best first, each to the connected
    /// member with room and the fewest commands in flight (ties: the one
    /// handed the fewest so far, so equally idle devices share the work).
    pub(super) fn pump_pool(&mut self, p: u32, now: Millis) {
        loop {
            let pool = &self.devs[p as usize];
            if pool.ready.iter().all(BTreeMap::is_empty) {
                return;
            }
            let best = pool
                .members
                .iter()
                .copied()
                .filter(|&m| {
                    let dev = &self.devs[m as usize];
                    dev.has_room() && dev.serves.contains(&p)
                })
                .min_by_key(|&m| {
                    let dev = &self.devs[m as usize];
                    (dev.in_flight.len(), dev.assigned, m)
                });
            let Some(m) = best else { return };
            let id = self.devs[p as usize]
                .ready
                .iter_mut()
                .find_map(|q| q.pop_first().map(|(_, id)| id))
                .expect("checked non-empty");
            let dev = &mut self.devs[m as usize];
            dev.borrowed += 1;
            dev.assigned += 1;
            self.deliver(id, m, now);
        }
    }

    /// Put a ready command in flight on connected device `on`.
    pub(super) fn deliver(&mut self, id: CommandId, on: u32, now: Millis) {
        let gateway = self.is_gateway(on);
        let dev = &mut self.devs[on as usize];
        let session = dev.session.expect("delivering to a connected device").0;
        let l = self.live.get_mut(&id).expect("ready commands are live");
        let attempt = l.attempts + 1;
        l.phase = Phase::InFlight { attempt, on };
        dev.in_flight.insert(id);
        if gateway {
            self.maybe_held.insert(id);
        }
        self.stats.delivered_total += 1;
        self.effects.deliveries.push(DeliverEffect {
            device: dev.id.clone(),
            session,
            id,
            group: l.group,
            attempt,
            priority: l.priority,
            deadline: l.expires_at,
        });
        let ev = LifecycleEvent {
            id,
            device: dev.id.clone(),
            state: State::Delivered { attempt },
            at: now,
            attempts: l.attempts,
            outcome: None,
            error: None,
        };
        self.publish(ev);
    }

    /// Take a command off the device it is in flight on, if it is.
    /// Returns that device.
    pub(super) fn release(&mut self, id: CommandId) -> Option<u32> {
        let l = self.live.get(&id)?;
        let Phase::InFlight { on, .. } = l.phase else {
            return None;
        };
        let dev = &mut self.devs[on as usize];
        if dev.in_flight.remove(&id) && on != l.device {
            dev.borrowed -= 1;
        }
        Some(on)
    }

    pub(super) fn disconnect_dev(&mut self, d: u32, now: Millis) {
        let ids: Vec<CommandId> = self.devs[d as usize].in_flight.drain().collect();
        self.devs[d as usize].session = None;
        self.devs[d as usize].borrowed = 0;
        let mut pools = Vec::new();
        for id in ids {
            let l = &self.live[&id];
            let Phase::InFlight { attempt, .. } = l.phase else {
                continue;
            };
            if l.device == d {
                // Back in the queue with the same attempt number: a drop is
                // not an attempt that ended (DESIGN §5).
                self.place(id, now);
                continue;
            }
            // A pool command fails over to another capable device, and the
            // drop counts as an attempt: the device may have run it.
            let (pool, max) = (l.device, l.max_attempts);
            if attempt >= max {
                let msg = format!(
                    "device `{}` dropped it; gave up after {attempt} attempts",
                    self.devs[d as usize].id
                );
                self.finish(id, State::Dead, None, Some(msg), now);
            } else {
                self.requeue_at(id, attempt, None, now);
                pools.push(pool);
            }
        }
        pools.sort_unstable();
        pools.dedup();
        for p in pools {
            self.pump_pool(p, now);
        }
        self.touch(d, now);
    }

    /// A device connected or went away: its last sight, for the store and
    /// the hub.
    pub(super) fn touch(&mut self, d: u32, now: Millis) {
        let online = self.devs[d as usize].session.is_some();
        if let Some(rec) = self.devs[d as usize].record.as_mut() {
            rec.last_seen = Some(now);
            self.effects.device_touches.push(rec.clone());
            let device = rec.id.clone();
            self.outbox.push(UpItem::Presence {
                device,
                online,
                at: now,
            });
        }
    }

    /// An attempt failed with attempts left: back off, then try again.
    pub(super) fn requeue(&mut self, id: CommandId, attempt: u32, now: Millis) {
        let jitter = self.random();
        let exp = attempt.saturating_sub(1).min(32);
        let full = self
            .limits
            .backoff_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.limits.backoff_cap_ms);
        // Jitter in [full/2, full]: spreads a fleet's retries, keeps the floor.
        let delay = full / 2 + if full > 1 { jitter % (full / 2 + 1) } else { 0 };
        self.requeue_at(id, attempt, Some(now.saturating_add(delay)), now);
    }

    /// Journal an ended attempt and put the command back in its queue.
    pub(super) fn requeue_at(
        &mut self,
        id: CommandId,
        attempt: u32,
        not_before: Option<Millis>,
        now: Millis,
    ) {
        self.release(id);
        let l = self.live.get_mut(&id).expect("requeue of a live command");
        l.attempts = attempt;
        l.not_before = not_before;
        let old = l.requeue_group.replace(self.open_seq);
        self.journal.push(Entry::Requeued {
            id,
            gen: l.gen,
            attempts: attempt,
            not_before,
        });
        *self.pins.entry(self.open_seq).or_insert(0) += 1;
        self.requeue_holders
            .entry(self.open_seq)
            .or_default()
            .push(id);
        if let Some(g) = old {
            self.unpin(g);
        }
        self.event(id, State::Queued, now, None, None);
        self.place(id, now);
    }

    pub(super) fn unpin(&mut self, seq: u64) {
        if let Some(n) = self.pins.get_mut(&seq) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.unpinned.push(seq);
            }
        }
    }
}

/// What a delivery of command `c` becomes on the link: a `Forward` for a
/// command through a box below (`edge-1/…`), or the command back for a
/// device. The writer and the simulation both
/// forward through it.
pub(crate) fn forward_of(
    d: &DeliverEffect,
    c: Command,
    now: Millis,
) -> Result<crate::engine::frames::Forward, Box<Command>> {
    match crate::engine::route::Target::parse(&c.target) {
        Ok(crate::engine::route::Target::Edge { rest, .. }) => Ok(crate::engine::frames::Forward {
            id: d.id,
            target: rest.to_string(),
            priority: d.priority,
            ttl_ms: d.deadline.map(|t| t.saturating_sub(now).max(1)),
            max_attempts: c.max_attempts,
            after: c.after,
            not_before: c.not_before,
            origin: c.origin,
            signature: c.signature,
            payload: c.payload,
        }),
        _ => Err(Box::new(c)),
    }
}

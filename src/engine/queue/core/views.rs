//! What the core shows: a command's view (live, a broadcast parent, its
//! children), a device's queue, the devices and the statistics.

use super::*;

impl QueueCore {
    pub(super) fn view(&self, id: CommandId, l: &Live) -> CommandView {
        let (state, attempts, on) = match l.phase {
            Phase::InFlight { attempt, on } => (State::Delivered { attempt }, attempt, on),
            Phase::Handed { attempt } => (State::Delivered { attempt }, attempt, l.device),
            _ => (State::Queued, l.attempts, l.device),
        };
        let mut device = self.devs[on as usize].id.clone();
        // A command sent down: what the edge last said of it.
        let (state, attempts) = match self.remote_of(id) {
            Some(r) => {
                device = r.device.clone();
                (r.state, r.attempts)
            }
            None => (state, attempts),
        };
        CommandView {
            id,
            target: l
                .target()
                .map(str::to_string)
                .unwrap_or_else(|| self.devs[l.device as usize].id.clone()),
            device,
            state,
            priority: l.priority,
            attempts,
            max_attempts: l.max_attempts,
            created_at: l.created_at,
            finished_at: None,
            expires_at: l.expires_at,
            not_before: l.not_before,
            after: l.after(),
            origin: self
                .origins
                .get(l.origin as usize)
                .cloned()
                .unwrap_or_default(),
            key: l.key().map(str::to_string),
            outcome: None,
            error: match l.phase {
                Phase::Blocked => l
                    .after()
                    .map(|a| format!("waiting for command {a} to succeed")),
                _ => None,
            },
            children: Vec::new(),
            summary: None,
            progress: None,
        }
    }

    /// A broadcast's children: each one's end, or its state while open.
    pub(super) fn children_of(&self, p: &Parent) -> Vec<ChildView> {
        p.children
            .iter()
            .zip(&p.ends)
            .map(|(&(id, d), end)| ChildView {
                id,
                device: self.devs[d as usize].id.clone(),
                state: end
                    .or_else(|| self.state_of(id))
                    .unwrap_or(State::Cancelled),
            })
            .collect()
    }

    /// A live broadcast as `show` gives it: its children and the aggregate.
    pub(super) fn parent_view(&self, pid: CommandId, p: &Parent) -> CommandView {
        let children = self.children_of(p);
        let c = &p.command;
        CommandView {
            id: pid,
            target: c.target.clone(),
            device: c.target.clone(),
            state: State::Queued,
            priority: c.priority,
            attempts: 0,
            max_attempts: c.max_attempts,
            created_at: c.created_at,
            finished_at: None,
            expires_at: c.expires_at,
            not_before: c.not_before,
            after: c.after,
            origin: c.origin.clone(),
            key: c.key.clone(),
            outcome: None,
            error: None,
            summary: Some(summarize(children.iter().map(|c| c.state))),
            progress: None,
            children,
        }
    }

    /// A device's live commands, in the order they will be delivered:
    /// in flight, then ready by priority and FIFO, then waiting.
    pub fn list(&self, device: &str) -> Result<Vec<CommandView>, QueueError> {
        let d = *self
            .dev_index
            .get(device)
            .ok_or_else(|| QueueError::UnknownDevice(device.to_string()))?;
        let dev = &self.devs[d as usize];
        let mut in_flight: Vec<_> = if dev.pool {
            // A pool's commands are in flight on its members.
            self.live
                .iter()
                .filter(|(_, l)| l.device == d && matches!(l.phase, Phase::InFlight { .. }))
                .map(|(id, l)| (l.priority.rank(), l.order, id))
                .collect()
        } else {
            let mut v: Vec<_> = dev
                .in_flight
                .iter()
                .map(|id| (self.live[id].priority.rank(), self.live[id].order, *id))
                .collect();
            if dev.handed > 0 {
                v.extend(
                    self.live
                        .iter()
                        .filter(|(_, l)| l.device == d && matches!(l.phase, Phase::Handed { .. }))
                        .map(|(id, l)| (l.priority.rank(), l.order, id)),
                );
            }
            v
        };
        in_flight.sort_unstable();
        let mut out: Vec<CommandView> = in_flight
            .into_iter()
            .map(|(_, _, id)| self.view(id, &self.live[&id]))
            .collect();
        for q in &dev.ready {
            out.extend(q.values().map(|id| self.view(*id, &self.live[id])));
        }
        let mut rest: Vec<_> = self
            .live
            .iter()
            .filter(|(_, l)| l.device == d && matches!(l.phase, Phase::Waiting | Phase::Blocked))
            .map(|(id, l)| (l.priority.rank(), l.order, id))
            .collect();
        rest.sort_unstable();
        out.extend(
            rest.into_iter()
                .map(|(_, _, id)| self.view(id, &self.live[&id])),
        );
        Ok(out)
    }

    /// Where a command is, for `show`.
    pub fn lookup(&self, id: CommandId) -> Lookup {
        if let Some(l) = self.live.get(&id) {
            return Lookup::Live(Box::new(self.view(id, l)));
        }
        if let Some(p) = self.parents.get(&id) {
            return Lookup::Live(Box::new(self.parent_view(id, p)));
        }
        match self.results.get(&id) {
            Some(&(seq, state)) => Lookup::Finished { seq, state },
            None => Lookup::NotFound,
        }
    }

    /// Every enrolled device with its queue counts and session, and the
    /// devices of the boxes below as they last reported them, sorted by id.
    pub fn devices(&self) -> Vec<DeviceView> {
        let mut v: Vec<DeviceView> = self
            .devs
            .iter()
            .filter_map(|d| {
                let record = d.record.clone()?;
                let sync = record
                    .tags
                    .iter()
                    .any(|t| t == crate::engine::route::GATEWAY_TAG)
                    .then(|| EdgeSync {
                        cursor: self.cursors.get(&record.id).map_or(0, |c| c.seq),
                        last_up: self.last_up.get(&record.id).copied(),
                    });
                Some(DeviceView {
                    online: d.session.is_some(),
                    queued: d.live - d.handed - (d.in_flight.len() as u64 - d.borrowed),
                    in_flight: d.in_flight.len() as u64 + d.handed,
                    record,
                    sync,
                    shared_bundle: None,
                })
            })
            .collect();
        // The devices of the boxes below, as they last reported them (their
        // queues are those boxes' own).
        v.extend(self.remote_devices.values().map(|r| DeviceView {
            record: r.clone(),
            online: self.online_below(&r.id),
            queued: 0,
            in_flight: 0,
            sync: None,
            shared_bundle: None,
        }));
        v.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        v
    }

    /// The ids of the devices [`devices`](Self::devices) shows online,
    /// without building their views (the simulation asks every step).
    pub fn online(&self) -> std::collections::BTreeSet<String> {
        let own = self
            .devs
            .iter()
            .filter(|d| d.session.is_some())
            .filter_map(|d| d.record.as_ref().map(|r| r.id.to_string()));
        let below = self
            .remote_devices
            .values()
            .filter(|r| self.online_below(&r.id))
            .map(|r| r.id.to_string());
        own.chain(below).collect()
    }

    /// The queue's counts now, for `status` and metrics (the flush
    /// histogram is the writer's to fill in).
    pub fn stats(&self) -> QueueStats {
        let in_flight: u64 = self
            .devs
            .iter()
            .map(|d| d.in_flight.len() as u64 + d.handed)
            .sum();
        QueueStats {
            queued: self.live.len() as u64 - in_flight,
            in_flight,
            devices_online: self.devs.iter().filter(|d| d.session.is_some()).count() as u64,
            dead: self.results_dead,
            results_kept: self.results.len() as u64,
            journal_groups: self.pins.len() as u64,
            ..self.stats.clone()
        }
    }

    pub(super) fn state_of(&self, id: CommandId) -> Option<State> {
        if let Some(l) = self.live.get(&id) {
            return Some(match l.phase {
                Phase::InFlight { attempt, .. } | Phase::Handed { attempt } => {
                    State::Delivered { attempt }
                }
                _ => State::Queued,
            });
        }
        if self.parents.contains_key(&id) {
            return Some(State::Queued);
        }
        self.results.get(&id).map(|&(_, s)| s)
    }
}

/// A broadcast's aggregate: `12/14 succeeded, 1 failed, 1 queued`.
pub fn summarize(states: impl Iterator<Item = State>) -> String {
    // Succeeded, then the other ends, then what is still open.
    let mut counts = [0usize; 9];
    const NAMES: [&str; 9] = [
        "succeeded",
        "failed",
        "dead",
        "expired",
        "cancelled",
        "shed",
        "in flight",
        "queued",
        "",
    ];
    for st in states {
        let i = match st {
            State::Succeeded => 0,
            State::Failed => 1,
            State::Dead => 2,
            State::Expired => 3,
            State::Cancelled => 4,
            State::Shed => 5,
            State::Delivered { .. } => 6,
            State::Queued => 7,
        };
        counts[i] += 1;
    }
    let total: usize = counts.iter().sum();
    let mut out = format!("{}/{total} succeeded", counts[0]);
    for (n, name) in counts.iter().zip(NAMES).skip(1) {
        if *n > 0 {
            out.push_str(&format!(", {n} {name}"));
        }
    }
    out
}

//! Sends: a command checked, routed (a device, a pool, a tag's broadcast,
//! a box below), given its id and queued, from an operator, a hub or a
//! device; none is answered before the round that holds it is durable.

use super::*;

impl QueueCore {
    /// Enqueue a command. Durable once the round is sealed and written.
    pub fn send(&mut self, req: SendRequest, now: Millis) -> Result<SendReceipt, QueueError> {
        self.send_as(None, req, now)
    }

    /// Enqueue a command under an id chosen upstream (a hub forwarding it),
    /// or a new one. A known id is a redelivery: answered as a duplicate,
    /// never queued twice.
    pub fn send_as(
        &mut self,
        id: Option<CommandId>,
        req: SendRequest,
        now: Millis,
    ) -> Result<SendReceipt, QueueError> {
        if let Some(id) = id {
            if let Some(state) = self.state_of(id) {
                return Ok(SendReceipt {
                    id,
                    state,
                    duplicate: true,
                });
            }
        }
        let SendRequest {
            target,
            payload,
            opts,
            origin,
            signature,
        } = req;
        if payload.len() > self.limits.max_payload {
            return Err(QueueError::BadRequest(format!(
                "payload of {} bytes is over the limit of {} bytes; send a reference (a URL, a file name) instead",
                payload.len(),
                self.limits.max_payload
            )));
        }
        // A signed command's id and lifetime are the envelope's (its
        // signature was checked at the gate, before the writer); a second
        // intake of one id is a replay, refused while the box knows the id.
        let signed = match crate::engine::trust::envelope::sealed(signature.as_deref()) {
            Some(env) => Some(
                crate::engine::trust::envelope::open(env)
                    .map_err(|e| QueueError::Untrusted(e.into()))?
                    .claims,
            ),
            None => None,
        };
        if let (None, Some(c)) = (id, &signed) {
            if self.state_of(c.id).is_some() {
                return Err(QueueError::Untrusted(
                    crate::engine::trust::Refusal::Replay(c.id),
                ));
            }
        }
        let id = id.or(signed.as_ref().map(|c| c.id));
        let route = self.route(&target)?;
        let o = self.origin(&origin);
        if let Some(k) = &opts.key {
            self.expire_keys(now);
            if let Some(used) = self.keys.get(&(o, k.as_str().into())) {
                let id = used.id;
                // The same key for another command is a sender's bug: answering
                // with the first id would report a command that never ran.
                if let Some(what) = used.differs(&target, &payload) {
                    return Err(QueueError::KeyReused {
                        key: k.clone(),
                        id,
                        what: what.into(),
                    });
                }
                let state = self.state_of(id).unwrap_or(State::Queued);
                return Ok(SendReceipt {
                    id,
                    state,
                    duplicate: true,
                });
            }
        }
        let max_attempts = opts
            .max_attempts
            .unwrap_or(self.limits.default_max_attempts)
            .max(1);
        let expires_at = opts
            .ttl_ms
            .or(self.limits.default_ttl_ms)
            .map(|t| now.saturating_add(t));
        let expires_at = match (&signed, expires_at) {
            (Some(c), Some(e)) => Some(e.min(c.expires_at)),
            (Some(c), None) => Some(c.expires_at),
            (None, e) => e,
        };
        // An `after` already decided is settled now, so replay never needs a
        // dependency's record that retention may have dropped.
        let mut after = opts.after;
        let mut dep_failed = None;
        if let Some(dep) = after {
            if self.is_live(dep) {
                // stays blocked
            } else {
                match self.results.get(&dep) {
                    Some((_, State::Succeeded)) => after = None,
                    Some((_, s)) => dep_failed = Some(*s),
                    None => return Err(QueueError::UnknownDependency(dep)),
                }
            }
        }
        if let Route::Broadcast(devs) = &route {
            // A broadcast is admitted whole or not at all: shedding one
            // command per child would trade many for one.
            let queued = self.live.len() as u64;
            if queued + devs.len() as u64 > self.limits.max_queued {
                return Err(QueueError::QueueFull {
                    queued,
                    limit: self.limits.max_queued,
                });
            }
        }
        self.make_room(opts.priority, now)?;

        let id = match id {
            Some(id) => id,
            None => self.new_id(now),
        };
        let command = Command {
            id,
            target: target.clone(),
            priority: opts.priority,
            payload,
            created_at: now,
            expires_at,
            max_attempts,
            key: opts.key.clone(),
            after,
            not_before: opts.not_before,
            origin,
            signature,
        };
        if let Some(k) = &opts.key {
            let used = KeyUse::new(id, now, &command.target, Some(&command.payload));
            self.remember_key(o, k, used);
        }
        self.stats.enqueued_total += 1;
        if let Some(s) = dep_failed {
            let device = match &route {
                Route::Device(d) | Route::Pool(d) => self.devs[*d as usize].id.clone(),
                Route::Broadcast(_) => target.clone(),
            };
            let rec = ResultRecord {
                id,
                gen: 0,
                device,
                target,
                priority: command.priority,
                state: State::Dead,
                outcome: None,
                error: Some(format!(
                    "DependencyFailed: command {} ended {}",
                    command.after.unwrap_or(id),
                    s
                )),
                attempts: 0,
                max_attempts,
                created_at: now,
                finished_at: now,
                origin: command.origin.clone(),
                key: command.key.clone(),
                command: Some(command),
                children: Vec::new(),
            };
            self.record_result(rec, now);
            return Ok(SendReceipt {
                id,
                state: State::Dead,
                duplicate: false,
            });
        }
        let device = match route {
            Route::Device(d) | Route::Pool(d) => d,
            Route::Broadcast(devs) => {
                self.broadcast(command, o, devs, now);
                return Ok(SendReceipt {
                    id,
                    state: State::Queued,
                    duplicate: false,
                });
            }
        };
        let order = self.next_order;
        self.next_order += 1;
        let live = Live {
            device,
            gen: 0,
            priority: command.priority,
            order,
            group: self.open_seq,
            requeue_group: None,
            attempts: 0,
            max_attempts,
            created_at: now,
            expires_at,
            not_before: command.not_before,
            phase: Phase::Ready,
            origin: o,
            rare: Rare::boxed(
                after,
                (target != self.devs[device as usize].id).then(|| target.into()),
                command.key.as_deref().map(Into::into),
                None,
            ),
        };
        let entry = Enqueued {
            device: self.devs[device as usize].id.clone(),
            order,
            gen: 0,
            attempts: 0,
            not_before: command.not_before,
            command,
        };
        self.journal.push(Entry::Enqueued(entry));
        self.admit(id, live, now);
        self.event(id, State::Queued, now, None, None);
        let state = self.state_of(id).unwrap_or(State::Queued);
        self.pump(device, now);
        Ok(SendReceipt {
            id,
            state,
            duplicate: false,
        })
    }

    /// A device sends a command: allowed only if the ACL lets it address
    /// the target. Its origin is the device.
    pub fn device_send(
        &mut self,
        from: &str,
        req: SendRequest,
        now: Millis,
    ) -> Result<SendReceipt, QueueError> {
        self.device_send_as(from, None, req, now)
    }

    /// `device_send` under an id the shell chose (or a new one).
    pub fn device_send_as(
        &mut self,
        from: &str,
        id: Option<CommandId>,
        mut req: SendRequest,
        now: Millis,
    ) -> Result<SendReceipt, QueueError> {
        let sender = self
            .dev_index
            .get(from)
            .and_then(|&d| self.devs[d as usize].record.as_ref())
            .filter(|r| !r.revoked)
            .ok_or_else(|| QueueError::UnknownDevice(from.to_string()))?;
        let allowed = self.acl.allows(from, sender, &req.target, |id| {
            self.dev_index
                .get(id)
                .and_then(|&d| self.devs[d as usize].record.as_ref())
        });
        if !allowed {
            return Err(QueueError::Forbidden {
                device: from.to_string(),
                target: req.target,
            });
        }
        req.origin = from.to_string();
        self.send_as(id, req, now)
    }

    /// Fan a broadcast out: one journal entry holds the payload once and
    /// every child; each child is then a command of its own device.
    pub(super) fn broadcast(
        &mut self,
        mut command: Command,
        origin: u32,
        devs: Vec<u32>,
        now: Millis,
    ) {
        let pid = command.id;
        let seq = self.open_seq;
        let mut children = Vec::with_capacity(devs.len());
        let mut parent_children = Vec::with_capacity(devs.len());
        for &d in &devs {
            let cid = self.new_id(now);
            let order = self.next_order;
            self.next_order += 1;
            children.push(Child {
                id: cid,
                device: self.devs[d as usize].id.clone(),
                order,
                attempts: 0,
                not_before: command.not_before,
                end: None,
            });
            parent_children.push((cid, d));
        }
        let entry = Broadcast {
            command: command.clone(),
            children,
        };
        command.payload = Vec::new();
        self.parents.insert(
            pid,
            Parent {
                command,
                group: seq,
                ends: vec![None; devs.len()],
                open: devs.len() as u32,
                children: parent_children.clone(),
                cancelled: false,
            },
        );
        let template = Live::child_of(&self.parents[&pid].command, origin, seq);
        self.event(pid, State::Queued, now, None, None);
        for (c, &(cid, d)) in entry.children.iter().zip(&parent_children) {
            let live = Live {
                device: d,
                order: c.order,
                ..template.clone()
            };
            self.admit(cid, live, now);
            self.event(cid, State::Queued, now, None, None);
        }
        self.journal.push(Entry::Broadcast(entry));
        for (_, d) in parent_children {
            self.pump(d, now);
        }
    }

    pub(super) fn new_id(&mut self, now: Millis) -> CommandId {
        // Ids are random within a millisecond; a collision (a restarted
        // simulation with the same seed, or plain bad luck) must not merge
        // two commands.
        loop {
            let id = CommandId::new(now, self.random128());
            if !self.is_live(id) && !self.results.contains_key(&id) {
                return id;
            }
        }
    }

    pub(super) fn is_live(&self, id: CommandId) -> bool {
        self.live.contains_key(&id) || self.parents.contains_key(&id)
    }
}

//! The simulated network: per-connection FIFO links that drop, partition
//! and reconnect, and what each end does with a message that arrives (a
//! device, a box from its device, an edge from its hub, a hub from its
//! edge).

use super::*;

impl World {
    pub(super) fn send(&mut self, l: usize, to_box: bool, msg: Msg) {
        let link = &self.links[l];
        if !link.connected {
            return;
        }
        let epoch = link.epoch;
        let lost = self.faults && self.rng.chance(5);
        // No duplicate device frames unless asked: QUIC never repeats a
        // frame within a stream, so the real link does not produce these
        // copies. With them (`--dup-device-frames`), a copied ack reaches
        // the box after a later attempt is in flight; it names its attempt
        // (`AckAttempt`), so the box drops it as stale (seeds 10161, 20175
        // ended the later attempt with it while acks named none).
        let dup_ok =
            self.dup_device_frames || !matches!(msg, Msg::Ack { .. } | Msg::Command { .. });
        let copies = if self.faults && dup_ok && self.rng.chance(5) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(30);
            let dir = to_box as usize;
            let at = (self.now + delay).max(self.links[l].last_at[dir]);
            self.links[l].last_at[dir] = at;
            self.packet_seq += 1;
            self.net.insert(
                (at, self.packet_seq),
                Packet {
                    link: l,
                    epoch,
                    to_box,
                    lost,
                    msg: msg.clone(),
                },
            );
        }
    }

    /// End a connection: nothing more arrives on it; the box side is told
    /// at the next step.
    pub(super) fn drop_link(&mut self, l: usize) {
        let link = &mut self.links[l];
        if !link.connected {
            return;
        }
        link.connected = false;
        link.epoch += 1;
        self.drops.push((l, link.session, link.boot));
        self.report.counts.link_drops += 1;
        let name = link.name.clone();
        let node = link.node;
        self.ev(node, "link-down", l as u128, || name);
    }

    /// Every link of box `n` drops: its devices' and its uplink, from
    /// either end.
    pub(super) fn drop_links_of(&mut self, n: usize) {
        for l in 0..self.links.len() {
            if self.links[l].node == n || self.links[l].peer == Peer::Edge(n) {
                self.drop_link(l);
            }
        }
    }

    pub(super) fn apply_drops(&mut self) {
        for (l, session, boot) in std::mem::take(&mut self.drops) {
            let n = self.links[l].node;
            if self.nodes[n].up && self.nodes[n].boots == boot {
                let now = self.node_now(n);
                let name = self.links[l].name.clone();
                self.nodes[n].core.disconnect(&name, session, now);
                self.round(n);
            }
        }
    }

    pub(super) fn peer_up(&self, l: usize) -> bool {
        match self.links[l].peer {
            Peer::Device(_) => true,
            Peer::Edge(e) => self.nodes[e].up,
        }
    }

    pub(super) fn connect(&mut self, l: usize) {
        let n = self.links[l].node;
        if self.links[l].connected
            || !self.nodes[n].up
            || !self.peer_up(l)
            || self.now < self.links[l].partition_until
        {
            return;
        }
        let now = self.node_now(n);
        let name = self.links[l].name.clone();
        let Ok(session) = self.nodes[n].core.connect(&name, 0, now) else {
            return;
        };
        if let Peer::Edge(e) = self.links[l].peer {
            // As the uplink sends a 1.6 hub before its first `Up`. Only a
            // wiped edge comes back with another database.
            let epoch = self.nodes[e].db_epoch;
            let again = self.nodes[n].core.up_from(&name, epoch, now);
            // Wiped until the hub has durably moved to the new epoch (its
            // crash before that flush makes it start again once more).
            let moved = self.nodes[n]
                .disk
                .view()
                .cursors
                .get(&name)
                .map(|c| c.epoch);
            if moved == Some(epoch) {
                self.nodes[e].wiped = false;
            }
            let wiped = self.nodes[e].wiped;
            match again {
                Ok(Some(k)) if wiped => {
                    self.ev(n, "up-from-new", k as u128, || format!("{name}: {k} again"));
                }
                Ok(Some(_)) => {
                    self.violation(
                        n,
                        format!("{name}'s cursor started again, its database did not change"),
                    );
                }
                Ok(None) => {}
                Err(err) => self.violation(n, format!("UpFrom of {name} refused: {err}")),
            }
        }
        let link = &mut self.links[l];
        link.connected = true;
        link.epoch += 1;
        link.session = session;
        link.boot = self.nodes[n].boots;
        self.ev(n, "link-up", l as u128, || name);
        if let Peer::Edge(e) = self.links[l].peer {
            let acked = self.nodes[e].core.outbox_stats().acked;
            self.nodes[e].sent = acked;
            self.nodes[e].acked = acked;
        }
        if self.round(n) {
            if let Peer::Edge(e) = self.links[l].peer {
                // As the uplink does at each session's start.
                self.nodes[e].core.presence_snapshot();
                if self.round(e) {
                    self.pump(e);
                }
            }
        }
    }

    pub(super) fn deliver_due(&mut self) {
        while let Some(entry) = self.net.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let p = entry.remove();
            let link = &self.links[p.link];
            if link.epoch != p.epoch || !link.connected {
                continue;
            }
            if p.lost {
                self.drop_link(p.link);
                continue;
            }
            let n = link.node;
            match (p.to_box, link.peer) {
                (false, Peer::Device(d)) => self.at_device(d, p.msg),
                (true, Peer::Device(_)) => self.at_box(n, p.link, p.msg),
                (false, Peer::Edge(e)) => self.at_edge(e, p.msg),
                (true, Peer::Edge(_)) => self.at_hub(n, p.link, p.msg),
            }
        }
    }

    /// The device agent: runs each (id, attempt) once, remembers its outcome
    /// and answers a redelivery from memory.
    pub(super) fn at_device(&mut self, d: usize, msg: Msg) {
        let Msg::Command { id, attempt } = msg else {
            return;
        };
        let dev = &self.devices[d];
        let (node, link) = (dev.node, dev.link);
        if let Some(Some(o)) = dev.seen.get(&(id, attempt)) {
            let outcome = o.clone();
            self.answer(link, id, attempt, outcome);
            return;
        }
        let sent = self.sent.get(&id).cloned();
        if !self.devices[d].runs.contains_key(&id)
            && !self.devices[d].seen.contains_key(&(id, attempt))
        {
            if let Some(s) = sent.as_ref().filter(|s| s.plain) {
                let key = (s.node, s.priority);
                let prev = self.devices[d].fifo.get(&key).copied();
                if prev.is_some_and(|p| p > s.index) {
                    self.violation(
                        node,
                        format!(
                            "{id} ({:?}, sent #{}) first delivered to {} after #{} of the same origin and priority",
                            s.priority,
                            s.index,
                            self.devices[d].name,
                            prev.unwrap_or(0)
                        ),
                    );
                }
                let m = prev.unwrap_or(0).max(s.index);
                self.devices[d].fifo.insert(key, m);
            }
        }
        let ran_ok = self.devices[d].runs.get(&id).is_some_and(|r| r.0 > 0);
        if ran_ok && !sent.as_ref().is_some_and(|s| s.pool) {
            let name = self.devices[d].name.clone();
            self.violation(
                node,
                format!("{id} runs again on {name} (attempt {attempt}) after it succeeded there"),
            );
        }
        let roll = self.rng.below(100);
        let outcome = if roll < 4 && !self.settling {
            None
        } else if roll < 24 {
            Some(Outcome::Failed {
                code: 1,
                message: "sim".into(),
            })
        } else {
            Some(Outcome::Ok(b"ok".to_vec()))
        };
        self.devices[d].seen.insert((id, attempt), outcome.clone());
        let name = self.devices[d].name.clone();
        let Some(outcome) = outcome else {
            self.ev(node, "hang", id.0, || format!("{id} on {name}"));
            return;
        };
        let r = self.devices[d].runs.entry(id).or_insert((0, 0));
        if matches!(outcome, Outcome::Ok(_)) {
            r.0 += 1;
        } else {
            r.1 += 1;
        }
        self.report.counts.runs += 1;
        self.ev(node, "run", id.0, || {
            format!("{id} on {name} attempt {attempt}: {outcome:?}")
        });
        self.answer(link, id, attempt, outcome);
    }

    /// The device's ack, naming the attempt it answers (`AckAttempt`).
    pub(super) fn answer(&mut self, link: usize, id: CommandId, attempt: u32, outcome: Outcome) {
        let msg = Msg::Ack {
            id,
            attempt: Some(attempt),
            outcome,
        };
        self.send(link, true, msg);
    }

    pub(super) fn at_box(&mut self, n: usize, l: usize, msg: Msg) {
        let Msg::Ack {
            id,
            attempt,
            outcome,
        } = msg
        else {
            return;
        };
        let now = self.node_now(n);
        let name = self.links[l].name.clone();
        let _ = self.nodes[n]
            .core
            .ack_attempt(&name, id, attempt, outcome, now);
        self.round(n);
    }

    /// The edge's uplink (`shell::upstream`): takes forwards under the hub's id
    /// and answers only once durable, applies cancels and acks.
    pub(super) fn at_edge(&mut self, e: usize, msg: Msg) {
        let now = self.node_now(e);
        let l = self.nodes[e].uplink.expect("an edge has an uplink");
        match msg {
            Msg::Forward(f) => {
                let id = f.id;
                let r =
                    self.nodes[e]
                        .core
                        .send_as(Some(id), crate::engine::uplink::request(*f), now);
                if !self.round(e) {
                    return;
                }
                let reply = match r {
                    Ok(_) => Msg::Accepted(id),
                    Err(err) => {
                        if let Some(s) = self.sent.get_mut(&id) {
                            s.plain = false;
                        }
                        self.ev(e, "refused", id.0, || format!("{id}: {err}"));
                        Msg::Ack {
                            id,
                            attempt: None,
                            outcome: crate::engine::uplink::refusal(err),
                        }
                    }
                };
                self.send(l, true, reply);
            }
            Msg::Cancel(id) => {
                let _ = self.nodes[e].core.cancel_from_hub(id, now);
                self.round(e);
            }
            Msg::UpAck(seq) => {
                if seq > self.nodes[e].acked {
                    self.nodes[e].acked = seq;
                    self.nodes[e].core.up_ack(seq);
                    self.round(e);
                }
                self.pump(e);
            }
            _ => {}
        }
    }

    pub(super) fn at_hub(&mut self, n: usize, l: usize, msg: Msg) {
        let now = self.node_now(n);
        let edge = self.links[l].name.clone();
        match msg {
            Msg::Accepted(id) => {
                let _ = self.nodes[n].core.handed(&edge, id, now);
                self.round(n);
            }
            Msg::Ack { id, outcome, .. } => {
                let _ = self.nodes[n].core.ack(&edge, id, outcome, now);
                self.round(n);
            }
            Msg::Up(entries) => {
                let r = self.nodes[n].core.up(&edge, entries, now);
                if self.round(n) {
                    if let Ok(cursor) = r {
                        self.send(l, false, Msg::UpAck(cursor));
                    }
                }
            }
            _ => {}
        }
    }

    // ----- crashes and restarts -------------------------------------------
}

//! What happens to the world in a step: the operator's sends, cancels,
//! retries, relabels, revocations and re-enrollments, the devices' own
//! sends and events, and the faults (crashes, wipes, a rebuild in place
//! after a failed commit, clock jumps).

use super::*;

impl World {
    pub(super) fn crash(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if !node.up {
            return;
        }
        node.up = false;
        node.disk.crash();
        node.crash_mid_commit = false;
        node.down_until = self.now + 10 + self.rng.below(2_000);
        self.report.counts.crashes += 1;
        self.ev(n, "crash", 0, String::new);
        self.drop_links_of(n);
        self.rollouts_crashed(n);
        self.workflows_crashed(n);
    }

    /// An edge's data dir wiped and set up again under its old bundle: a
    /// new database (a new uplink epoch), its devices enrolled again. What
    /// only the edge held goes with it (its own operators' sends); what the
    /// hub had handed down must come down again and end once, the
    /// result of each on the hub exactly once.
    pub(super) fn op_wipe(&mut self, e: usize) {
        // Not a box in the middle tier: its boxes below would have to be
        // enrolled again, and what they reported to it only is gone with
        // it (not simulated).
        if !self.nodes[e].edge || self.is_hub(e) {
            return;
        }
        self.drop_links_of(e);
        let seed = self.rng.next_u64();
        let now = self.node_now(e);
        let mut core = fresh_core(seed);
        core.enable_outbox(OUTBOX_MAX);
        let local = self.local_devices(e);
        for &d in &local {
            let dev = &mut self.devices[d];
            dev.revoked = false;
            core.enroll(device_record(&dev.name, dev.line_a), now);
        }
        let node = &mut self.nodes[e];
        node.core = core;
        node.disk = SimDisk::default();
        node.db_epoch = seed | 1;
        node.wiped = true;
        node.boots += 1;
        node.ids.clear();
        node.open.clear();
        node.results.clear();
        node.ended.clear();
        node.pruned.clear();
        node.states.clear();
        node.retryable = PickSet::default();
        node.sent = 0;
        node.acked = 0;
        node.crash_mid_commit = false;
        self.sent.retain(|_, s| s.node != e);
        // What comes down again arrives after newer commands: no FIFO.
        for s in self.sent.values_mut() {
            if s.device.is_some_and(|d| self.devices[d].node == e) {
                s.plain = false;
                s.wiped = true;
            }
        }
        self.report.counts.wipes += 1;
        self.rollouts_wiped(e);
        self.workflows_wiped(e);
        self.ev(e, "wipe", 0, String::new);
        self.round(e);
    }

    /// What the writer does after a failed commit when it may not exit (an
    /// embedded queue, `fail_round`): nobody is told "accepted", every
    /// session is dropped, and the core is rebuilt from what the disk holds,
    /// in place: no downtime, and nothing rolled back (the failed write kept
    /// nothing; what was written before stays readable).
    pub(super) fn rebuild_in_place(&mut self, n: usize) {
        self.report.counts.rebuilds += 1;
        self.ev(n, "rebuild", 0, String::new);
        self.drop_links_of(n);
        self.restart(n);
    }

    /// A fresh core from what the disk kept, in the order `service::rebuild`
    /// replays a store (the shared `replay_start`, then the groups).
    pub(super) fn restart(&mut self, n: usize) {
        let now = self.node_now(n);
        let seed = self.rng.next_u64();
        let node = &mut self.nodes[n];
        let image = node.disk.view();
        let mut core = fresh_core(seed);
        let outbox = node.edge.then(|| ReplayOutbox {
            max: OUTBOX_MAX,
            next_seq: image.outbox_next.unwrap_or(1),
            groups: image
                .outbox
                .iter()
                .map(|(g, es)| (*g, es.clone()))
                .collect(),
        });
        replay_start(
            &mut core,
            image.devices.values().cloned(),
            image.cursors.iter().map(|(e, c)| (e.clone(), *c)),
            image.cancel_marks.iter().copied(),
            outbox,
            now,
        );
        for mut g in image.groups() {
            strip_payloads(&mut g);
            core.replay_group(g);
        }
        core.replay_last_seq(image.last_seq);
        core.finish_replay(now);
        node.core = core;
        node.up = true;
        node.boots += 1;
        self.ev(n, "restart", 0, String::new);
        let mut lost: Vec<CommandId> = self.nodes[n]
            .open
            .iter()
            .copied()
            .filter(|id| matches!(self.nodes[n].core.lookup(*id), Lookup::NotFound))
            .collect();
        lost.sort();
        for id in lost {
            self.violation(n, format!("acknowledged send {id} lost by the restart"));
        }
        self.check_labels(n);
        self.round(n);
    }

    /// After a restart: every device's labels and standing are what its
    /// box last made durable, no older (a lost relabel or revocation) and
    /// no newer (one that was never acknowledged).
    pub(super) fn check_labels(&mut self, n: usize) {
        let views = self.nodes[n].core.devices();
        let mut wrong = Vec::new();
        for d in self.devices.iter().filter(|d| d.node == n) {
            let Some(v) = views.iter().find(|v| v.record.id == d.name) else {
                wrong.push(format!("{} is not enrolled after the restart", d.name));
                continue;
            };
            let tag = if d.line_a { "line-a" } else { "line-b" };
            let tags_ok = v
                .record
                .tags
                .iter()
                .filter(|t| t.starts_with("line-"))
                .eq([tag]);
            if !tags_ok || v.record.revoked != d.revoked {
                wrong.push(format!(
                    "{} came back with tags {:?}, revoked {}; it was made durable with [{tag}], revoked {}",
                    d.name, v.record.tags, v.record.revoked, d.revoked
                ));
            }
        }
        for w in wrong {
            self.violation(n, w);
        }
    }

    // ----- the workload --------------------------------------------------

    pub(super) fn op_send(&mut self, n: usize) {
        let now = self.node_now(n);
        // A hub sends most to the boxes below it; a box in the middle
        // tier, half to its own devices.
        let below = self.below_of(n);
        let local = self.devices.iter().any(|d| d.node == n);
        let share = if self.nodes[n].edge { 500 } else { 200 };
        let (prefix, edge) = if below.is_empty() || (local && self.rng.chance(share)) {
            (String::new(), n)
        } else {
            let e = below[self.rng.below(below.len() as u64) as usize];
            let path = self.path_from(n, e).unwrap_or_default();
            (format!("{path}/"), e)
        };
        let devices = self
            .devices
            .iter()
            .filter(|d| d.node == edge)
            .count()
            .max(1) as u64;
        let m = self.rng.below(devices);
        let kind = self.rng.below(100);
        let (target, device, pool) = if kind < 76 {
            let name = format!("dev-{m}");
            let d = self
                .devices
                .iter()
                .position(|d| d.node == edge && d.name == name);
            (format!("{prefix}{name}"), d, false)
        } else if kind < 88 {
            let tag = if m % 2 == 0 { "line-a" } else { "line-b" };
            (format!("{prefix}tag:{tag}"), None, false)
        } else {
            (format!("{prefix}cap:cam"), None, true)
        };
        let priority =
            [Priority::Low, Priority::Normal, Priority::High][self.rng.below(3) as usize];
        let r = &mut self.rng;
        let ttl_ms = r.chance(150).then(|| 500 + r.below(20_000));
        let max_attempts = r.chance(200).then(|| 1 + r.below(4) as u32);
        let key = r.chance(100).then(|| format!("k{}", r.below(8)));
        let after = if r.chance(80) {
            let ids = &self.nodes[n].ids;
            self.rng.pick_recent(ids, RECENT)
        } else {
            None
        };
        let not_before = self.rng.chance(80).then(|| now + self.rng.below(3_000));
        let plain = device.is_some() && key.is_none() && after.is_none() && not_before.is_none();
        let req = SendRequest {
            target: target.clone(),
            // A keyed send repeats its key's payload, so a repeat to the same
            // target is a duplicate (answered with the first id) and one to
            // another target is a reuse (refused): both paths are run.
            payload: match &key {
                Some(k) => format!("p-{k}").into_bytes(),
                None => format!("p{}", self.step).into_bytes(),
            },
            opts: SendOptions {
                priority,
                ttl_ms,
                max_attempts,
                key,
                after,
                not_before,
            },
            origin: "cli".into(),
            signature: None,
        };
        let r = self.nodes[n].core.send(req, now);
        if !self.round(n) {
            return;
        }
        match r {
            Ok(rc) if !rc.duplicate => {
                let sent = Sent {
                    node: n,
                    device,
                    plain,
                    pool,
                    priority,
                    index: 0,
                    wiped: false,
                    job: false,
                    via: self.via(n, &target),
                };
                self.note_sent(rc.id, sent, &target);
            }
            Ok(_) => {}
            Err(e) => {
                self.report.counts.sends_refused += 1;
                self.ev(n, "send-refused", 0, || format!("{target}: {e}"));
            }
        }
    }

    /// An acknowledged send: what the checks hold the boxes to.
    pub(super) fn note_sent(&mut self, id: CommandId, mut sent: Sent, target: &str) {
        let n = sent.node;
        self.send_index += 1;
        sent.index = self.send_index;
        self.sent.insert(id, sent);
        let node = &mut self.nodes[n];
        node.ids.push(id);
        // It may have ended in its own round (a failed dependency).
        if !node.ended.contains_key(&id) {
            node.open.insert(id);
        }
        self.report.counts.sends_acked += 1;
        self.ev(n, "send", id.0, || format!("{id} → {target}"));
    }

    pub(super) fn local_devices(&self, n: usize) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|&d| self.devices[d].node == n)
            .collect()
    }

    /// `outpost relabel`: a device moves to the other line.
    pub(super) fn op_relabel(&mut self, n: usize) {
        let Some(d) = self.rng.pick(&self.local_devices(n)) else {
            return;
        };
        let (name, line_a, revoked) = {
            let dev = &self.devices[d];
            (dev.name.clone(), dev.line_a, dev.revoked)
        };
        let (from, to) = if line_a {
            ("line-a", "line-b")
        } else {
            ("line-b", "line-a")
        };
        let now = self.node_now(n);
        let r = self.nodes[n].core.relabel(
            Relabel {
                device: name.clone(),
                add_tags: vec![to.into()],
                remove_tags: vec![from.into()],
                add_caps: vec![],
                remove_caps: vec![],
            },
            now,
        );
        if !self.round(n) {
            return;
        }
        match r {
            Ok(rec) if !revoked && rec.tags.iter().any(|t| t == to) => {
                self.devices[d].line_a = !line_a;
                self.report.counts.relabels += 1;
                self.ev(n, "relabel", d as u128, || format!("{name} → {to}"));
            }
            Err(_) if revoked => {}
            other => self.violation(
                n,
                format!("relabel of {name} (revoked {revoked}) to {to} gave {other:?}"),
            ),
        }
    }

    /// A device sends another a command, through its box's ACL: devices
    /// on `line-a` may address those on `line-b`, nobody else anyone. The
    /// box must refuse what the rule and the labels it holds refuse, and
    /// take the rest as any acknowledged send.
    pub(super) fn op_device_send(&mut self, n: usize) {
        let local = self.local_devices(n);
        let (Some(s), Some(t)) = (self.rng.pick(&local), self.rng.pick(&local)) else {
            return;
        };
        let (from, to) = (self.devices[s].name.clone(), self.devices[t].name.clone());
        let allowed = self.devices[s].line_a && !self.devices[t].line_a;
        let expect_ok = allowed && !self.devices[s].revoked && !self.devices[t].revoked;
        let now = self.node_now(n);
        let req = SendRequest {
            target: to.clone(),
            payload: format!("d{}", self.step).into_bytes(),
            opts: SendOptions::default(),
            origin: String::new(),
            signature: None,
        };
        let r = self.nodes[n].core.device_send(&from, req, now);
        if !self.round(n) {
            return;
        }
        match r {
            Ok(rc) if expect_ok => {
                let sent = Sent {
                    node: n,
                    device: Some(t),
                    plain: true,
                    pool: false,
                    priority: Priority::Normal,
                    index: 0,
                    wiped: false,
                    job: false,
                    via: 0,
                };
                self.report.counts.device_sends += 1;
                self.note_sent(rc.id, sent, &format!("{from} → {to}"));
            }
            Err(_) if !expect_ok => {
                self.report.counts.sends_refused += 1;
                self.ev(n, "device-send-refused", 0, || format!("{from} → {to}"));
            }
            other => self.violation(
                n,
                format!(
                    "{from} (line-a {}, revoked {}) → {to} (line-a {}, revoked {}): the ACL {} it, the box said {other:?}",
                    self.devices[s].line_a,
                    self.devices[s].revoked,
                    self.devices[t].line_a,
                    self.devices[t].revoked,
                    if expect_ok { "allows" } else { "refuses" }
                ),
            ),
        }
    }

    /// `outpost revoke`: the device is cut off and gets nothing more
    /// until it is enrolled again.
    pub(super) fn op_revoke(&mut self, n: usize) {
        let Some(d) = self.rng.pick(&self.local_devices(n)) else {
            return;
        };
        if self.devices[d].revoked {
            return;
        }
        let name = self.devices[d].name.clone();
        let now = self.node_now(n);
        let r = self.nodes[n].core.revoke(&name, now);
        if !self.round(n) {
            return;
        }
        match r {
            Ok(rec) if rec.revoked => {
                self.devices[d].revoked = true;
                self.report.counts.revocations += 1;
                self.ev(n, "revoke", d as u128, || name);
                // Its box closed the session; the device sees it drop.
                let l = self.devices[d].link;
                self.drop_link(l);
            }
            other => self.violation(n, format!("revoke of {name} gave {other:?}")),
        }
    }

    pub(super) fn op_reenroll(&mut self, n: usize) {
        let revoked: Vec<usize> = self
            .local_devices(n)
            .into_iter()
            .filter(|&d| self.devices[d].revoked)
            .collect();
        if let Some(d) = self.rng.pick(&revoked) {
            self.reenroll(d);
        }
    }

    /// `outpost enroll --force` of a revoked id: the same labels, in again.
    pub(super) fn reenroll(&mut self, d: usize) {
        let n = self.devices[d].node;
        let name = self.devices[d].name.clone();
        let rec = device_record(&name, self.devices[d].line_a);
        let now = self.node_now(n);
        self.nodes[n].core.enroll(rec, now);
        if self.round(n) {
            self.devices[d].revoked = false;
            self.ev(n, "enroll", d as u128, || name);
        }
    }

    pub(super) fn op_cancel(&mut self, n: usize) {
        let Some(id) = self.rng.pick_recent(&self.nodes[n].ids, RECENT) else {
            return;
        };
        let now = self.node_now(n);
        let r = self.nodes[n].core.cancel(id, now);
        if self.round(n) && r.is_ok() {
            self.report.counts.cancels += 1;
            self.ev(n, "cancel", id.0, || id.to_string());
        }
    }

    /// `outpost retry`: the shell reads the result record back from disk.
    pub(super) fn op_retry(&mut self, n: usize) {
        // Among the commands last seen failed or dead: a random known id is
        // rarely one, and a refused retry tests little.
        let Some(id) = self.nodes[n].retryable.pick(&mut self.rng) else {
            return;
        };
        let Lookup::Finished { seq, .. } = self.nodes[n].core.lookup(id) else {
            return;
        };
        let Some(rec) = self.nodes[n].disk.view().result(seq, id).cloned() else {
            return;
        };
        let now = self.node_now(n);
        let r = self.nodes[n].core.retry(rec, now);
        if self.round(n) && r.is_ok() {
            if self.nodes[n].uplink.is_some() {
                self.retried_below.insert(id);
            }
            self.report.counts.retries += 1;
            self.ev(n, "retry", id.0, || id.to_string());
        }
    }

    /// Telemetry from a connected device: it goes up through the outbox,
    /// and fills it while the uplink is down.
    pub(super) fn op_event(&mut self) {
        let d = self.rng.below(self.devices.len() as u64) as usize;
        let (n, l) = (self.devices[d].node, self.devices[d].link);
        if !self.links[l].connected || !self.nodes[n].up {
            return;
        }
        let now = self.node_now(n);
        let name = self.devices[d].name.clone();
        self.nodes[n]
            .core
            .device_event(&name, format!("e{}", self.step).into_bytes(), now);
        self.round(n);
    }

    pub(super) fn op_clock(&mut self, n: usize) {
        let big = self.rng.chance(300);
        let mag = if big {
            JUMP_MS as u64 + 1 + self.rng.below(60_000)
        } else {
            self.rng.below(JUMP_MS as u64)
        } as i64;
        let delta = if self.rng.chance(500) { mag } else { -mag };
        self.nodes[n].skew += delta;
        self.report.counts.clock_jumps += 1;
        self.ev(n, "clock", delta as u128, || format!("{delta:+} ms"));
        if delta.abs() > JUMP_MS && self.nodes[n].up {
            let now = self.node_now(n);
            self.nodes[n].core.clock_jumped(delta, now);
            self.round(n);
        }
    }
}

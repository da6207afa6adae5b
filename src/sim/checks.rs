//! The invariants, checked every step (`check`) and once the world has
//! settled (`check_end`): nothing acknowledged is lost, nothing runs
//! twice, every end is where the sender can see it.

use super::*;

impl World {
    /// Invariants that hold at every step: no acknowledged send unknown to
    /// its box, bounded queues and outboxes.
    pub fn check(&mut self) {
        self.check_rollouts();
        for n in self.up_nodes() {
            let stats = self.nodes[n].core.stats();
            if stats.queued + stats.in_flight > limits().max_queued {
                self.violation(
                    n,
                    format!("{} live commands", stats.queued + stats.in_flight),
                );
            }
            let o = self.nodes[n].core.outbox_stats();
            // Telemetry is compacted to one item per device and kind when
            // full; results are never dropped, so only held items are bounded.
            let bound = 4 * (self.devices.len() as u64 + 1);
            if o.held > bound {
                self.violation(n, format!("outbox holds {} telemetry items", o.held));
            }
            let written = self.nodes[n]
                .disk
                .view()
                .outbox
                .values()
                .flatten()
                .filter(|e| e.item.is_telemetry())
                .count() as u64;
            if written > OUTBOX_MAX {
                self.violation(
                    n,
                    format!(
                        "{written} telemetry records in the outbox, over its bound {OUTBOX_MAX}"
                    ),
                );
            }
        }
    }

    /// After `settle`: every acknowledged send ended on its box, each
    /// command's effect happened once where it succeeded and never where it
    /// failed, the world is quiet, and the hub holds every result of its
    /// own sends.
    pub fn check_end(&mut self) {
        if !self.quiet() {
            let busy: Vec<String> = self
                .nodes
                .iter()
                .map(|n| {
                    let s = n.core.stats();
                    format!(
                        "{}: up {} queued {} in flight {} outbox {}",
                        n.name,
                        n.up,
                        s.queued,
                        s.in_flight,
                        n.core.outbox_stats().depth
                    )
                })
                .collect();
            self.violation(0, format!("did not settle: {}", busy.join("; ")));
        }
        self.check();
        self.check_rollouts_end();
        self.check_workflows_end();
        // Everything is connected again: every hub shows every device
        // below it online, however deep (presence through crashes of any
        // box on the way).
        let hubs: Vec<usize> = (0..self.nodes.len()).filter(|&h| self.is_hub(h)).collect();
        for h in hubs {
            let views = self.nodes[h].core.devices();
            for d in 0..self.devices.len() {
                let path = match self.path_from(h, self.devices[d].node) {
                    Some(p) if !p.is_empty() => p,
                    _ => continue,
                };
                let id = format!("{path}/{}", self.devices[d].name);
                let online = views.iter().find(|v| v.record.id == id).map(|v| v.online);
                if online != Some(true) {
                    let name = self.nodes[h].name.clone();
                    self.violation(h, format!("{id} connected but shown {online:?} on {name}"));
                }
            }
        }
        let sent: Vec<(CommandId, Sent)> =
            self.sent.iter().map(|(id, s)| (*id, s.clone())).collect();
        for (id, s) in sent {
            let node = &self.nodes[s.node];
            let state = match node.core.lookup(id) {
                Lookup::NotFound => match node.ended.get(&id) {
                    Some(&state) if node.pruned.contains(&id) => state,
                    _ => {
                        self.violation(s.node, format!("acknowledged send {id} lost"));
                        continue;
                    }
                },
                Lookup::Live(v) => {
                    let disk = self.on_disk(s.node, id);
                    self.violation(
                        s.node,
                        format!("{id} still {:?} after settling; on disk: {disk}", v.state),
                    );
                    continue;
                }
                Lookup::Finished { state, seq } => {
                    self.check_ran_on(&s, id, seq, state);
                    state
                }
            };
            if !self.nodes[s.node].ended.contains_key(&id) {
                self.violation(
                    s.node,
                    format!("{id} ended {state:?} with no result on disk"),
                );
            }
            let Some(d) = s.device else { continue };
            // A command the hub sent down ends alike on both boxes: the
            // hub says cancelled only if its edge did not run it (a cancel
            // in the window before the edge's `Accepted` used to be the
            // hub's alone).
            let below = self.devices[d].node;
            if below != s.node && matches!(state, State::Cancelled | State::Expired) {
                if let Some(State::Succeeded) = self.nodes[below].ended.get(&id) {
                    self.violation(
                        s.node,
                        format!(
                            "{id} ended {state:?} on the hub but Succeeded on {}",
                            self.nodes[below].name
                        ),
                    );
                }
            }
            let (ok, _) = self.devices[d].runs.get(&id).copied().unwrap_or((0, 0));
            let bad = match state {
                State::Succeeded => ok != 1,
                State::Failed | State::Dead if !s.wiped => ok != 0,
                _ => ok > 1,
            };
            if bad {
                self.violation(
                    s.node,
                    format!(
                        "{id} ended {state:?} but succeeded {ok} times on {}",
                        self.devices[d].name
                    ),
                );
            }
        }
    }

    /// A command that succeeded on a device names it, on its box and on
    /// every box above by the whole path (`edge-1/sub-1/dev-0`), so `show`
    /// anywhere says where it ran.
    pub(super) fn check_ran_on(&mut self, s: &Sent, id: CommandId, seq: u64, state: State) {
        let Some(d) = s.device.filter(|_| state == State::Succeeded) else {
            return;
        };
        let dev = &self.devices[d];
        let want = match self.path_from(s.node, dev.node).as_deref() {
            Some("") | None => dev.name.clone(),
            Some(path) => format!("{path}/{}", dev.name),
        };
        let image = self.nodes[s.node].disk.view();
        let got = image.result(seq, id).map(|r| r.device.clone());
        if got.as_ref().is_some_and(|g| *g != want) {
            self.violation(
                s.node,
                format!("{id} succeeded on {want} but its result names {got:?}"),
            );
        }
    }

    /// Where a command is on a box's disk, for a violation's message.
    pub(super) fn on_disk(&self, n: usize, id: CommandId) -> String {
        let image = self.nodes[n].disk.view();
        let mut out = Vec::new();
        for (g, es) in &image.journal {
            for e in es {
                match e {
                    Entry::Enqueued(e) if e.command.id == id => out.push(format!(
                        "J{g} enqueued gen {} attempts {}",
                        e.gen, e.attempts
                    )),
                    Entry::Requeued {
                        id: x,
                        gen,
                        attempts,
                        ..
                    } if *x == id => {
                        out.push(format!("J{g} requeued gen {gen} attempts {attempts}"))
                    }
                    _ => {}
                }
            }
        }
        for (g, rs) in &image.results {
            for r in rs.iter().filter(|r| r.id == id) {
                out.push(format!("R{g} {:?} gen {}", r.state, r.gen));
            }
        }
        out.join(", ")
    }
}

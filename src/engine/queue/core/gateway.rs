//! The hub side of upstream sync (DESIGN §7), in the core: commands for a
//! box below this one (`edge-1/dev-7`) and what that box reports back.
//!
//! A command for `edge-1/…` is an ordinary command of the gateway device
//! `edge-1` (enrolled with the reserved tag [`GATEWAY_TAG`]): it waits in
//! the gateway's queue, is handed over in its window, and once the edge has
//! it durably (`Accepted`) it leaves the window and is *handed*: the edge
//! runs it, and its end arrives as an outbox record. Handing over is not
//! journalled: after a restart the hub forwards it again and the edge, which
//! dedupes by id, answers `Accepted` again.
//!
//! Outbox records are applied once: the hub keeps a cursor per edge (the
//! highest seq applied), written in the same batch as what the records
//! changed, and skips any record at or below it. The seqs count in one
//! database of the edge, named by its epoch (`UpFrom`): an edge wiped or
//! restored comes back under a new epoch, and its outbox is applied from
//! the start, not skipped as seqs the old database already sent. What the
//! hub had handed to the old database is forwarded again: the new one
//! takes what it lacks and dedupes what it has.
//!
//! A cancel of a command the edge already holds cannot end it here: the
//! edge may be running it. It is marked (durably) and sent down at every
//! connect until the edge reports the command's end.

use super::{Phase, QueueCore, Route};
use crate::engine::command::{CommandId, DeviceId, Millis, Outcome, State};
use crate::engine::journal::DeviceRecord;
use crate::engine::journal::{Cursor, ResultRecord, UpEntry, UpItem};
use crate::engine::queue::{CommandView, QueueError};
use crate::engine::route::GATEWAY_TAG;

/// What an edge last reported of a command the hub sent down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Remote {
    pub state: State,
    /// `edge-1/dev-7`.
    pub device: DeviceId,
    pub attempts: u32,
}

fn below(edge: &str, name: &str) -> String {
    format!("{edge}/{name}")
}

impl QueueCore {
    /// The gateway for `edge`: enrolled, not revoked, marked a gateway.
    pub(super) fn route_edge(&self, edge: &str, target: &str) -> Result<Route, QueueError> {
        let d = self.enrolled(edge)?;
        let gateway = self.devs[d as usize]
            .record
            .as_ref()
            .is_some_and(|r| r.tags.iter().any(|t| t == GATEWAY_TAG));
        if !gateway {
            return Err(QueueError::NoRoute(format!(
                "`{target}` goes through `{edge}`, which is enrolled as a device, not as a box; enroll it with `outpost enroll {edge} --gateway`"
            )));
        }
        Ok(Route::Device(d))
    }

    /// `edge`'s index, if it is enrolled as a gateway (only a gateway may
    /// speak for a box below).
    fn gateway_of(&self, edge: &str) -> Result<u32, QueueError> {
        let d = self.enrolled(edge)?;
        if !self.is_gateway(d) {
            return Err(QueueError::Forbidden {
                device: edge.to_string(),
                target:
                    "upstream sync (only a device enrolled with --gateway may send outbox records)"
                        .into(),
            });
        }
        Ok(d)
    }

    pub(super) fn is_gateway(&self, d: u32) -> bool {
        self.devs[d as usize]
            .record
            .as_ref()
            .is_some_and(|r| r.tags.iter().any(|t| t == GATEWAY_TAG))
    }

    /// The edge has command `id` durably: it leaves the gateway's window.
    pub fn handed(&mut self, gateway: &str, id: CommandId, now: Millis) -> Result<(), QueueError> {
        let not_in_flight = || QueueError::NotInFlight {
            id,
            device: gateway.to_string(),
        };
        let d = *self.dev_index.get(gateway).ok_or_else(not_in_flight)?;
        let l = self.live.get(&id).ok_or_else(not_in_flight)?;
        let Phase::InFlight { attempt, on } = l.phase else {
            // Already handed (a duplicate `Accepted`): nothing to do.
            return match l.phase {
                Phase::Handed { .. } if l.device == d => Ok(()),
                _ => Err(not_in_flight()),
            };
        };
        if on != d {
            return Err(not_in_flight());
        }
        self.release(id);
        self.live.get_mut(&id).expect("checked").phase = Phase::Handed { attempt };
        self.devs[d as usize].handed += 1;
        self.pump(d, now);
        Ok(())
    }

    /// Apply an edge's outbox records (the gateway `edge` sent them), each
    /// once. Returns the cursor to acknowledge: every record up to it is
    /// applied, durably once this round is written.
    pub fn up(
        &mut self,
        edge: &str,
        entries: Vec<UpEntry>,
        now: Millis,
    ) -> Result<u64, QueueError> {
        let d = self.gateway_of(edge)?;
        let mut cursor = self.cursors.get(edge).copied().unwrap_or_default();
        let before = cursor.seq;
        self.last_up.insert(edge.to_string(), now);
        for e in entries {
            if e.seq <= cursor.seq {
                self.stats.up_duplicates_total += 1;
                continue;
            }
            cursor.seq = e.seq;
            self.apply_up(edge, d, e.item, now);
            self.stats.up_applied_total += 1;
        }
        if cursor.seq != before {
            self.cursors.insert(edge.to_string(), cursor);
            self.cursor_writes.push((edge.to_string(), cursor));
        }
        Ok(cursor.seq)
    }

    /// The edge `edge` says its outbox seqs count in database `epoch`
    /// (`UpFrom`, before its first `Up` of a session). A cursor of another
    /// epoch belonged to a database the edge no longer has: the cursor
    /// starts again at 0, and the commands handed to that database go back
    /// in the gateway's queue to be forwarded again. A cursor of unknown
    /// epoch (written before 1.6) is taken as this one's. Returns, when the
    /// cursor started again, how many commands go down again.
    pub fn up_from(
        &mut self,
        edge: &str,
        epoch: u64,
        now: Millis,
    ) -> Result<Option<usize>, QueueError> {
        let d = self.gateway_of(edge)?;
        // (the cursor to keep, whether the old database's are lost)
        let (cursor, lost) = match self.cursors.get(edge).copied() {
            Some(c) if c.epoch == epoch => return Ok(None),
            Some(c) if c.epoch == 0 => (Cursor { epoch, seq: c.seq }, false),
            None => (Cursor { epoch, seq: 0 }, false),
            Some(_) => (Cursor { epoch, seq: 0 }, true),
        };
        self.cursors.insert(edge.to_string(), cursor);
        self.cursor_writes.push((edge.to_string(), cursor));
        if !lost {
            return Ok(None);
        }
        let mut handed: Vec<CommandId> = self
            .live
            .iter()
            .filter(|(_, l)| l.device == d && matches!(l.phase, Phase::Handed { .. }))
            .map(|(id, _)| id)
            .collect();
        handed.sort_unstable();
        for &id in &handed {
            if self.cancelling.contains(&id) {
                // The operator wanted it gone, and the database it was
                // handed to is: there is nothing left to cancel.
                let msg = format!("cancelled: `{edge}` lost it with its old database");
                self.finish(id, State::Cancelled, None, Some(msg), now);
                continue;
            }
            self.devs[d as usize].handed -= 1;
            self.remote.remove(&id);
            let l = self.live.get_mut(&id).expect("listed live");
            l.phase = Phase::Waiting;
            self.event(id, State::Queued, now, None, None);
            self.place(id, now);
        }
        self.pump(d, now);
        Ok(Some(handed.len()))
    }

    /// A cursor as the store kept it.
    pub fn replay_cursor(&mut self, edge: DeviceId, cursor: Cursor) {
        self.cursors.insert(edge, cursor);
    }

    /// A cancel the edge has not yet confirmed, as the store kept it.
    pub fn replay_cancelling(&mut self, id: CommandId) {
        self.cancelling.insert(id);
    }

    /// After replay: what waits for a gateway may have been forwarded
    /// before this start (handing over is not journalled).
    pub(super) fn held_before_start(&mut self) {
        let held: Vec<CommandId> = self
            .live
            .iter()
            .filter(|(_, l)| self.is_gateway(l.device))
            .map(|(id, _)| id)
            .collect();
        self.maybe_held.extend(held);
    }

    /// After replay: marks of commands that are gone are cleared.
    pub(super) fn settle_cancelling(&mut self) {
        let gone: Vec<CommandId> = self
            .cancelling
            .iter()
            .filter(|id| !self.live.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.cancelling.remove(&id);
            self.cancel_marks.push((id, false));
        }
    }

    fn apply_up(&mut self, edge: &str, gw: u32, item: UpItem, now: Millis) {
        match item {
            UpItem::State {
                id,
                device,
                state,
                at,
                attempts,
            } => {
                // A full outbox holds telemetry back and writes it after
                // later results, so a state can arrive after the end it
                // precedes: published, it would walk a finished command
                // back (Succeeded → Queued) for every watcher. (Simulation
                // seed 11.)
                if !self.is_live(id) && self.results.contains_key(&id) {
                    self.stats.up_duplicates_total += 1;
                    return;
                }
                let device = below(edge, &device);
                if self.live.get(&id).is_some_and(|l| l.device == gw) {
                    self.remote.insert(
                        id,
                        Remote {
                            state,
                            device: device.clone(),
                            attempts,
                        },
                    );
                }
                self.publish(crate::engine::queue::LifecycleEvent {
                    id,
                    device,
                    state,
                    at,
                    attempts,
                    outcome: None,
                    error: None,
                });
            }
            UpItem::Result(mut rec) => {
                // An edge's end of a command it never got (a cancel that
                // came first) names no device: the hub keeps its own.
                if !rec.never_held() {
                    rec.device = below(edge, &rec.device);
                    rec.target = below(edge, &rec.target);
                }
                for c in &mut rec.children {
                    c.device = below(edge, &c.device);
                }
                self.remote_result(gw, rec, now);
            }
            UpItem::Device(mut rec) => {
                rec.id = below(edge, &rec.id);
                self.remote_devices.insert(rec.id.clone(), rec.clone());
                self.outbox.push(UpItem::Device(rec.clone()));
                self.effects.device_writes.push(rec);
            }
            UpItem::Seen { device, at } => {
                let device = below(edge, &device);
                self.seen_below(&device, at);
                self.outbox.push(UpItem::Seen { device, at });
            }
            UpItem::Presence { device, online, at } => {
                let device = below(edge, &device);
                self.seen_below(&device, at);
                self.remote_online.insert(device.clone(), online);
                self.outbox.push(UpItem::Presence { device, online, at });
            }
            UpItem::Event {
                device,
                at,
                payload,
            } => {
                // Passed on upward (a hub may itself have an uplink).
                self.outbox.push(UpItem::Event {
                    device: below(edge, &device),
                    at,
                    payload,
                });
            }
            UpItem::Audit(mut note) => {
                // The edge's name on who and from: `edge-1/uid 1000` did it
                // over `edge-1/socket`. Deduped with every other record by
                // the edge's cursor; written in this round's batch.
                note.who = below(edge, &note.who);
                note.from = below(edge, &note.from);
                self.outbox.push(UpItem::Audit(note.clone()));
                self.effects.audit.push(note);
            }
        }
    }

    fn seen_below(&mut self, device: &str, at: Millis) {
        if let Some(rec) = self.remote_devices.get_mut(device) {
            rec.last_seen = Some(at);
            self.effects.device_touches.push(rec.clone());
        }
    }

    /// Whether a device below is there now, as far as this box knows: its
    /// box said it connected and has not said it left, and that box is
    /// connected here (the first segment of `edge-1/dev-7` is the gateway).
    pub(super) fn online_below(&self, device: &str) -> bool {
        let gateway_up = device
            .split_once('/')
            .and_then(|(gw, _)| self.dev_index.get(gw))
            .is_some_and(|&d| self.devs[d as usize].session.is_some());
        gateway_up && self.remote_online.get(device) == Some(&true)
    }

    /// An entry of this box's own audit log, to go upstream (a no-op
    /// without an uplink).
    pub fn audit_up(&mut self, note: crate::engine::audit::chain::Note) {
        self.outbox.push(UpItem::Audit(note));
    }

    /// A command ended on the edge. One the hub sent down ends here with
    /// the edge's outcome; one the edge had from elsewhere is recorded so
    /// `show` finds it on the hub too; a later end after an edge-side
    /// retry replaces the end it followed.
    fn remote_result(&mut self, gw: u32, rec: ResultRecord, now: Millis) {
        let id = rec.id;
        self.remote.remove(&id);
        if self.live.get(&id).is_some_and(|l| l.device == gw) {
            let (state, outcome, error) = (rec.state, rec.outcome.clone(), rec.error.clone());
            // The edge already decided: no cancel goes back down.
            self.finish_quietly(id, state, outcome, error, now, |r| {
                if !rec.never_held() {
                    r.device = rec.device;
                }
                r.attempts = rec.attempts;
                r.children = rec.children;
                r.finished_at = rec.finished_at;
            });
            self.stats.up_results_total += 1;
            return;
        }
        if self.is_live(id) || rec.never_held() {
            // A retry under way here: the hub's own run decides. (Or the
            // edge's end of a cancel for a command it never got, which
            // has nothing to tell once the command is not live here.)
            return;
        }
        if let Some(&(_, ended)) = self.results.get(&id) {
            // Dead and Failed are the ends an operator may retry; an edge's
            // operator did, and it ended again, differently: the newer end
            // is the truth (the hub showed Dead while the retry had
            // succeeded, simulation seed 5). The hub itself ends a command
            // it handed down only as Expired or Cancelled, and never as
            // Dead or Failed (a forward the edge refused was never run
            // there, so no end of the edge's follows it). A Cancelled
            // stands: the hub decides it only for a command the edge
            // cannot hold. An Expired is the hub's clock, and the edge,
            // which got what was left of the ttl when the forward came,
            // may have run the command at the end of it, offline: what the
            // edge did is the truth. (A cancel's end for a command the
            // edge never got names no device, and never replaces one.)
            let retried_below = matches!(ended, State::Dead | State::Failed | State::Expired)
                && rec.state != ended
                && !rec.never_held();
            if !retried_below {
                return;
            }
        }
        // No record here: a command of the edge's own (or a child of a
        // broadcast it fanned out), recorded so `show` finds it on the hub.
        // One this box sent down, ended, and has since dropped by
        // retention looks the same and is recorded again (a known limit:
        // an edge-minted child carries the same `upstream/` origin, so the
        // origin cannot tell them apart).
        self.stats.up_results_total += 1;
        self.record_result(
            ResultRecord {
                command: None,
                ..rec
            },
            now,
        );
    }

    /// End a live command whose device reported the end itself (so it is
    /// not told to cancel), and drop its cancel mark.
    fn finish_quietly(
        &mut self,
        id: CommandId,
        state: State,
        outcome: Option<Outcome>,
        error: Option<String>,
        now: Millis,
        amend: impl FnOnce(&mut ResultRecord),
    ) {
        // `finish` tells the device to stop a command in flight that ends
        // without an outcome; this one ended on the device.
        if matches!(
            self.live.get(&id).map(|l| l.phase),
            Some(Phase::InFlight { .. })
        ) {
            self.release(id);
            self.live.get_mut(&id).expect("checked").phase = Phase::Waiting;
        }
        self.finish_as(id, state, outcome, error, now, amend);
    }

    /// Cancel a command that the edge holds or may hold (forwarded,
    /// handed, or put back in the queue after a forward): ask the edge,
    /// now and at every connect, until it reports the end. An edge that
    /// never got it answers with a `cancelled` end of its own, which also
    /// keeps a late forward of it from running there.
    pub(super) fn cancel_remote(&mut self, id: CommandId) -> Option<CommandView> {
        let l = self.live.get(&id)?;
        let below = matches!(l.phase, Phase::InFlight { .. } | Phase::Handed { .. })
            || self.maybe_held.contains(&id);
        if !below || !self.is_gateway(l.device) {
            return None;
        }
        let gw = self.devs[l.device as usize].id.clone();
        let mut view = self.view(id, l);
        if self.cancelling.insert(id) {
            self.cancel_marks.push((id, true));
        }
        self.effects.cancels.push((gw.clone(), id));
        view.error = Some(format!(
            "cancel sent to `{gw}`; the command ends when that box confirms"
        ));
        Some(view)
    }

    /// A gateway connected: repeat the cancels it has not confirmed.
    pub(super) fn resend_cancels(&mut self, d: u32) {
        let gw = self.devs[d as usize].id.clone();
        let mut ids: Vec<CommandId> = self
            .cancelling
            .iter()
            .filter(|id| self.live.get(id).is_some_and(|l| l.device == d))
            .copied()
            .collect();
        ids.sort_unstable();
        for id in ids {
            self.effects.cancels.push((gw.clone(), id));
        }
    }

    /// A device record of a box below this one, as the store kept it.
    pub(super) fn replay_remote_device(&mut self, rec: DeviceRecord) {
        self.remote_devices.insert(rec.id.clone(), rec);
    }

    /// What an edge last reported of a command sent down, for `show`.
    pub(super) fn remote_of(&self, id: CommandId) -> Option<&Remote> {
        self.remote.get(&id)
    }
}

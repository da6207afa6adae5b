//! Devices: enrolled, relabelled, revoked, connected with a window and
//! their capabilities, disconnected, and their acks, each attempt's end.

use super::*;

impl QueueCore {
    /// Enroll a device, refusing an id that already has a record (enrolled
    /// or revoked) unless `force`: checked here, in the writer's round, so
    /// two enrollments of one id cannot both pass.
    pub fn enroll_new(
        &mut self,
        rec: DeviceRecord,
        force: bool,
        now: Millis,
    ) -> Result<(), QueueError> {
        let existing = self
            .dev_index
            .get(rec.id.as_str())
            .and_then(|&d| self.devs[d as usize].record.as_ref());
        check_existing(&rec.id, existing, force)?;
        self.enroll(rec, now);
        Ok(())
    }

    /// Add or update an enrolled device.
    pub fn enroll(&mut self, mut rec: DeviceRecord, now: Millis) {
        let d = self.dev(&rec.id);
        rec.revoked = false;
        if rec.enrolled_at == 0 {
            rec.enrolled_at = now;
        }
        self.devs[d as usize].record = Some(rec.clone());
        self.outbox.push(UpItem::Device(rec.clone()));
        self.effects.device_writes.push(rec);
        self.index_caps(d);
        self.pump(d, now);
    }

    /// Revoke a device: its session ends, it may not connect again, and it
    /// gets no new commands. What is queued for it stays (re-enrolling
    /// re-admits it).
    pub fn revoke(&mut self, device: &str, now: Millis) -> Result<DeviceRecord, QueueError> {
        let d = *self
            .dev_index
            .get(device)
            .ok_or_else(|| QueueError::UnknownDevice(device.to_string()))?;
        let rec = {
            let dev = &mut self.devs[d as usize];
            let rec = dev
                .record
                .as_mut()
                .ok_or_else(|| QueueError::UnknownDevice(device.to_string()))?;
            rec.revoked = true;
            rec.clone()
        };
        self.effects.device_writes.push(rec.clone());
        self.outbox.push(UpItem::Device(rec.clone()));
        self.index_caps(d);
        if self.devs[d as usize].session.is_some() {
            self.disconnect_dev(d, now);
            self.effects.close_sessions.push(device.to_string());
        }
        Ok(rec)
    }

    /// Attach a device. Returns the session id that later calls must carry.
    /// A second session for the same device replaces the first: what the
    /// first had in flight is delivered again on the new one.
    pub fn connect(&mut self, device: &str, window: u32, now: Millis) -> Result<u64, QueueError> {
        self.connect_offering(device, window, None, now)
    }

    /// Attach a device whose Hello named the capabilities it offers in this
    /// session (`None`: all it is enrolled with). It serves the `cap:` pools
    /// of its enrolled capabilities that it offers.
    pub fn connect_offering(
        &mut self,
        device: &str,
        window: u32,
        offered: Option<Vec<String>>,
        now: Millis,
    ) -> Result<u64, QueueError> {
        let d = self
            .dev_index
            .get(device)
            .copied()
            .filter(|&d| self.devs[d as usize].record.is_some())
            .ok_or_else(|| QueueError::UnknownDevice(device.to_string()))?;
        if self.devs[d as usize]
            .record
            .as_ref()
            .is_some_and(|r| r.revoked)
        {
            return Err(QueueError::Revoked(device.to_string()));
        }
        if self.devs[d as usize].session.is_some() {
            self.disconnect_dev(d, now);
        }
        let token = self.next_session;
        self.next_session += 1;
        let window = if window == 0 {
            self.limits.window
        } else {
            window
        };
        self.devs[d as usize].session = Some((token, window));
        self.devs[d as usize].offered = offered;
        self.index_caps(d);
        self.touch(d, now);
        if self.is_gateway(d) {
            self.resend_cancels(d);
        }
        self.pump(d, now);
        Ok(token)
    }

    /// Detach a device's session (a stale token is ignored).
    pub fn disconnect(&mut self, device: &str, session: u64, now: Millis) {
        if let Some(&d) = self.dev_index.get(device) {
            if self.devs[d as usize].session.map(|s| s.0) == Some(session) {
                self.disconnect_dev(d, now);
            }
        }
    }

    /// A device reports an outcome, naming no attempt (a device before
    /// protocol 1.4, or an edge refusing a forward): it ends whatever
    /// attempt is in flight. Only the device the command is in flight on
    /// may report it.
    pub fn ack(
        &mut self,
        device: &str,
        id: CommandId,
        outcome: Outcome,
        now: Millis,
    ) -> Result<(), QueueError> {
        self.ack_attempt(device, id, None, outcome, now)
    }

    /// A device reports the outcome of one attempt. An ack of an attempt
    /// other than the one in flight is stale (a late answer to a delivery
    /// the box has since requeued) and changes nothing: ending the later
    /// attempt with it would turn a retry that succeeded into a failure.
    pub fn ack_attempt(
        &mut self,
        device: &str,
        id: CommandId,
        acked: Option<u32>,
        outcome: Outcome,
        now: Millis,
    ) -> Result<(), QueueError> {
        let not_in_flight = || QueueError::NotInFlight {
            id,
            device: device.to_string(),
        };
        let d = *self.dev_index.get(device).ok_or_else(not_in_flight)?;
        let l = self.live.get(&id).ok_or_else(not_in_flight)?;
        let Phase::InFlight { attempt, on } = l.phase else {
            return Err(not_in_flight());
        };
        if on != d {
            return Err(not_in_flight());
        }
        if let Some(acked) = acked.filter(|&a| a != attempt) {
            return Err(QueueError::StaleAttempt {
                id,
                acked,
                current: attempt,
            });
        }
        let max_attempts = l.max_attempts;
        self.stats.acked_total += 1;
        match outcome {
            Outcome::Ok(_) => self.finish(id, State::Succeeded, Some(outcome), None, now),
            Outcome::Rejected { .. } => self.finish(id, State::Failed, Some(outcome), None, now),
            Outcome::Failed { .. } => {
                if attempt >= max_attempts {
                    let msg = format!("gave up after {attempt} attempts");
                    self.finish(id, State::Dead, Some(outcome), Some(msg), now);
                } else {
                    self.requeue(id, attempt, now);
                }
            }
        }
        self.pump(d, now);
        Ok(())
    }
}

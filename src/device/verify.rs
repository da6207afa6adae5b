//! The device's own check of signed commands (DESIGN §10): a device runs
//! only what an operator in its bundle's trust set signed, for this box and
//! this device, whatever the box above it says. A box that is compromised
//! can still deliver, delay or drop commands, but not make one up, change
//! one, aim one at another device or replay one.

use super::ReceivedCommand;
use crate::engine::command::{CommandId, DeviceId, Millis, Outcome};
use crate::engine::trust::set::SKEW_MS;
use crate::engine::trust::{envelope, DeviceTrust, Presented, Refusal, Seat, Verified};
use crate::identity::Bundle;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// No clock showing an instant before this (2024-01-01) is right: outpost
/// did not exist. A box without a battery-backed clock boots in 1970.
pub const CLOCK_FLOOR: Millis = 1_704_067_200_000;

/// Most signed ids remembered. An id is kept until its envelope expires
/// (after that the signature itself is refused); this bounds the memory
/// (about 50 bytes an id) if a box floods the device with long-lived ones.
pub const MAX_SEEN: usize = 100_000;

/// How a command passed the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// No envelope, or a bundle without trust anchors: nothing to verify.
    Unchecked,
    /// A good envelope, first seen now.
    Signed(Verified),
    /// The same attempt of a signed id admitted before: a redelivery (after
    /// a reconnect) or a replay. Answer it with its first outcome if known;
    /// never run it again.
    Again,
}

#[derive(Clone, Copy)]
struct Seen {
    attempt: u32,
    expires_at: Millis,
    /// Its last attempt here succeeded: no later attempt may run it.
    succeeded: bool,
}

/// The check and its memory of signed ids. Share one across reconnects
/// (see [`super::ConnectOptions::guard`]) so the memory outlives a
/// connection.
pub struct Guard {
    trust: Option<DeviceTrust>,
    device: DeviceId,
    /// Below this the clock is wrong: [`CLOCK_FLOOR`] or the bundle's issue
    /// time, whichever is later. (The binary records no build time: builds
    /// are reproducible.)
    floor: Millis,
    seen: HashMap<CommandId, Seen>,
    clock_noted: bool,
}

/// A [`Guard`] shared by the connection's reader and the agent.
pub type SharedGuard = Arc<Mutex<Guard>>;

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("device", &self.device)
            .field("box", &self.trust.as_ref().map(|t| &t.box_name))
            .field("seen", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// The check for `bundle`'s device under its trust anchors, with no
    /// signed id remembered yet. A bundle without anchors lets every
    /// command through (`Admitted::Unchecked`).
    pub fn new(bundle: &Bundle) -> Self {
        Guard {
            trust: bundle.trust.clone(),
            device: bundle.id.clone(),
            floor: bundle.issued_floor().unwrap_or(0).max(CLOCK_FLOOR),
            seen: HashMap::new(),
            clock_noted: false,
        }
    }

    /// `Guard::new` behind a mutex, for `ConnectOptions::guard`: make one
    /// per device and pass it to every connection, so a replay is refused
    /// across reconnects.
    pub fn shared(bundle: &Bundle) -> SharedGuard {
        Arc::new(Mutex::new(Guard::new(bundle)))
    }

    /// Whether the bundle carries trust anchors (else every command passes).
    pub fn is_active(&self) -> bool {
        self.trust.is_some()
    }

    /// Signed ids remembered.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// Check `cmd` as of `now` (the system clock; it is judged here).
    pub fn admit(&mut self, cmd: &ReceivedCommand, now: Millis) -> Result<Admitted, Refusal> {
        let Some(trust) = &self.trust else {
            return Ok(Admitted::Unchecked);
        };
        let Some(env) = envelope::sealed(cmd.signature.as_deref()) else {
            if trust.require_signed {
                return Err(Refusal::Unsigned);
            }
            return Ok(Admitted::Unchecked);
        };
        // The frame carries no not-before (the box holds a command until
        // then), so the signed one is compared with itself and checked
        // against this clock by `verify`.
        let not_before = envelope::open(env)?.claims.not_before;
        let clock = if now < self.floor {
            if !self.clock_noted {
                self.clock_noted = true;
                tracing::warn!(
                    now = %crate::engine::command::rfc3339(now),
                    floor = %crate::engine::command::rfc3339(self.floor),
                    "this device's clock is behind its bundle's issue time, so it is wrong: signatures' expiry and not-before are not checked until it is set; everything else (signer, signature, audience, replays) still is"
                );
            }
            None
        } else {
            Some(now)
        };
        let verified = trust.set.verify(
            env,
            Seat::Device {
                name: &trust.box_name,
                id: &self.device,
            },
            Presented {
                id: cmd.id,
                payload: &cmd.payload,
                priority: cmd.priority,
                not_before,
            },
            clock,
        )?;
        if let Some(s) = self.seen.get_mut(&cmd.id) {
            if s.attempt == cmd.attempt {
                return Ok(Admitted::Again);
            }
            // A later attempt is the box's retry of one that failed (or
            // whose end this device never saw); after a success it can
            // only be a replay.
            if s.succeeded || cmd.attempt < s.attempt {
                return Err(Refusal::Replay(cmd.id));
            }
            s.attempt = cmd.attempt;
            return Ok(Admitted::Signed(verified));
        }
        self.remember(cmd.id, cmd.attempt, verified.expires_at, clock);
        Ok(Admitted::Signed(verified))
    }

    fn remember(&mut self, id: CommandId, attempt: u32, expires_at: Millis, clock: Option<Millis>) {
        if self.seen.len() >= MAX_SEEN {
            // Past expiry (plus the skew, for a clock that steps back a
            // little) the signature is refused anyway.
            if let Some(now) = clock {
                self.seen
                    .retain(|_, s| s.expires_at.saturating_add(SKEW_MS) > now);
            }
            if self.seen.len() >= MAX_SEEN {
                // Nothing expired (or no clock to tell): forget the one
                // that expires first, the least useful to a replayer.
                if let Some(first) = self.seen.iter().min_by_key(|(_, s)| s.expires_at) {
                    let first = *first.0;
                    tracing::warn!(id = %first, "too many signed commands remembered; forgetting the one expiring first");
                    self.seen.remove(&first);
                }
            }
        }
        self.seen.insert(
            id,
            Seen {
                attempt,
                expires_at,
                succeeded: false,
            },
        );
    }

    /// The device reported `outcome` for `id`.
    pub fn ended(&mut self, id: CommandId, outcome: &Outcome) {
        if let Some(s) = self.seen.get_mut(&id) {
            s.succeeded |= outcome.is_ok();
        }
    }

    /// The outcome that answers a refusal: `Rejected` (final at the box),
    /// its text saying the device refused, and why.
    pub fn refused(&self, r: &Refusal) -> Outcome {
        let why = match r {
            // Refusal::Unsigned speaks as a box; this is the bundle's rule.
            Refusal::Unsigned => "unsigned: this device's bundle requires commands signed by a trusted operator key (sign with `outpost send --sign KEY`)".to_string(),
            r => r.to_string(),
        };
        Outcome::Rejected {
            reason: format!("refused by the device {}: {why}", self.device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::command::Priority;
    use crate::engine::trust::envelope::{payload_digest, seal, Claims};
    use crate::engine::trust::key::OperatorKey;
    use crate::engine::trust::{Grant, Role, TrustSet};

    const NOW: Millis = 1_800_000_000_000;

    fn guard(alice: &OperatorKey, require: bool) -> Guard {
        let mut set = TrustSet::default();
        set.add(&alice.public, None, Grant::new(Role::Operator), 0);
        Guard {
            trust: Some(DeviceTrust {
                box_name: "edge-1".into(),
                require_signed: require,
                set,
            }),
            device: "dev-7".into(),
            floor: CLOCK_FLOOR,
            seen: HashMap::new(),
            clock_noted: false,
        }
    }

    fn signed(k: &OperatorKey, id: u128, expires_at: Millis) -> ReceivedCommand {
        let c = Claims {
            id: CommandId(id),
            target: "dev-7".into(),
            payload_sha256: payload_digest(b"reboot"),
            artifact: None,
            priority: Priority::Normal,
            not_before: None,
            expires_at,
            audience: "edge-1".into(),
            key_id: k.public.id,
        };
        ReceivedCommand {
            id: CommandId(id),
            priority: Priority::Normal,
            payload: b"reboot".to_vec(),
            attempt: 1,
            deadline: None,
            signature: Some(seal(&c, k).unwrap()),
            verified: None,
            seen_before: false,
        }
    }

    #[test]
    fn a_signed_id_runs_once_per_attempt_a_failed_one_may_be_retried_a_success_never() {
        let alice = OperatorKey::generate("alice").unwrap();
        let mut g = guard(&alice, true);
        let c = signed(&alice, 1, NOW + 60_000);
        assert!(matches!(g.admit(&c, NOW), Ok(Admitted::Signed(_))));
        assert_eq!(g.admit(&c, NOW), Ok(Admitted::Again));
        // It failed: the box's next attempt runs.
        g.ended(
            c.id,
            &Outcome::Failed {
                code: 1,
                message: "busy".into(),
            },
        );
        let mut retry = c.clone();
        retry.attempt = 2;
        assert!(matches!(g.admit(&retry, NOW), Ok(Admitted::Signed(_))));
        // It succeeded: no later attempt, and no earlier one, runs it.
        g.ended(c.id, &Outcome::Ok(Vec::new()));
        let mut third = c.clone();
        third.attempt = 3;
        assert_eq!(g.admit(&third, NOW).unwrap_err().step(), "replay");
        assert_eq!(g.admit(&c, NOW).unwrap_err().step(), "replay");
        let mut bare = c.clone();
        bare.signature = None;
        let e = g.admit(&bare, NOW).unwrap_err();
        assert_eq!(e, Refusal::Unsigned);
        let Outcome::Rejected { reason } = g.refused(&e) else {
            panic!()
        };
        assert!(
            reason.starts_with("refused by the device dev-7: unsigned: this device's bundle"),
            "{reason}"
        );
    }

    #[test]
    fn a_wrong_clock_skips_time_but_not_the_rest() {
        let alice = OperatorKey::generate("alice").unwrap();
        let mut g = guard(&alice, false);
        // 1970: the expiry cannot be judged, so an expired one passes...
        let old = signed(&alice, 1, CLOCK_FLOOR + 1);
        assert!(matches!(g.admit(&old, 5_000), Ok(Admitted::Signed(_))));
        assert!(g.clock_noted);
        // ...once, still: replays are refused by id.
        g.ended(old.id, &Outcome::Ok(Vec::new()));
        let mut again = old.clone();
        again.attempt = 2;
        assert_eq!(g.admit(&again, 5_000).unwrap_err().step(), "replay");
        // ...and the signature is still checked.
        let mut changed = signed(&alice, 2, CLOCK_FLOOR + 1);
        changed.payload = b"rm -rf /".to_vec();
        assert_eq!(g.admit(&changed, 5_000).unwrap_err().step(), "mismatch");
        // With a good clock the same envelope is expired.
        let late = signed(&alice, 3, NOW - 1);
        assert_eq!(g.admit(&late, NOW).unwrap_err().step(), "expired");
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_the_expired_first() {
        let alice = OperatorKey::generate("alice").unwrap();
        let mut g = guard(&alice, false);
        for i in 0..MAX_SEEN as u128 {
            g.remember(CommandId(i), 1, NOW + 10, Some(NOW));
        }
        // Full, nothing expired: the one expiring first makes room.
        g.remember(CommandId(u128::MAX), 1, NOW + 3_600_000, Some(NOW));
        assert_eq!(g.remembered(), MAX_SEEN);
        assert!(g.seen.contains_key(&CommandId(u128::MAX)));
        // Full, the clock past their expiry and the skew: they all go.
        let later = NOW + 10 + SKEW_MS;
        g.remember(CommandId(u128::MAX - 1), 1, NOW + 3_600_000, Some(later));
        assert_eq!(g.remembered(), 2);
    }

    /// `cargo test --lib client::verify -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn verify_cost() {
        let alice = OperatorKey::generate("alice").unwrap();
        let mut g = guard(&alice, true);
        let n = 2000u128;
        let cmds: Vec<_> = (0..n).map(|i| signed(&alice, i, NOW + 60_000)).collect();
        let t = std::time::Instant::now();
        for c in &cmds {
            g.admit(c, NOW).unwrap();
        }
        let per = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        crate::outln!("device verify: {per:.1} µs per signed command ({n} commands)");
        // Of which the signature alone (SSHSIG's SHA-512 and ed25519).
        let env = cmds[0].signature.as_deref().unwrap();
        let o = envelope::open(env).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(crate::engine::trust::key::verify(
                &alice.public.raw,
                o.signed,
                &o.signature
            ));
        }
        let sig = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        crate::outln!("  of which the signature: {sig:.1} µs");
    }
}

//! The box's trust gate: its name (the audience it answers to), whether it
//! requires signatures, and its current trust set, shared by every intake
//! path (admin socket, HTTP, device sends, a hub's `Forward`, NATS) and the
//! delivery path. Signatures are checked here, in the caller's task, so
//! the writer's round stays cheap and many intakes verify in parallel.

use super::envelope;
use super::set::{Presented, Refusal, Seat, TrustSet, Verified};
use crate::engine::command::{CommandId, Millis, Priority};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Debug)]
pub struct Gate {
    name: String,
    require: bool,
    set: RwLock<Arc<TrustSet>>,
    /// Held across read-modify-persist of the set, so two admins' changes
    /// cannot lose one another.
    pub edit: Mutex<()>,
}

/// What an intake hands the gate.
#[derive(Clone, Copy, Debug)]
pub struct Intake<'a> {
    pub envelope: Option<&'a [u8]>,
    /// The target as it is queued here.
    pub target: &'a str,
    /// The id the command will have here: a hub's, or (`None`) the
    /// envelope's.
    pub id: Option<CommandId>,
    pub payload: &'a [u8],
    pub priority: Priority,
    pub not_before: Option<Millis>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new(String::new(), false, TrustSet::default())
    }
}

impl Gate {
    pub fn new(name: String, require: bool, set: TrustSet) -> Self {
        Gate {
            name,
            require,
            set: RwLock::new(Arc::new(set)),
            edit: Mutex::new(()),
        }
    }

    /// The box's name: the audience signed commands must name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn requires_signatures(&self) -> bool {
        self.require
    }

    pub fn set(&self) -> Arc<TrustSet> {
        self.set.read().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn replace(&self, set: TrustSet) {
        if let Ok(mut s) = self.set.write() {
            *s = Arc::new(set);
        }
    }

    /// Verify a command at intake. `Ok(None)`: unsigned and allowed.
    /// An envelope is verified even where signatures are optional: a bad
    /// one is refused, never taken as unsigned.
    pub fn admit(&self, c: Intake<'_>, now: Millis) -> Result<Option<Verified>, Refusal> {
        let Some(env) = envelope::sealed(c.envelope) else {
            return if self.require {
                Err(Refusal::Unsigned)
            } else {
                Ok(None)
            };
        };
        let id = match c.id {
            Some(id) => id,
            None => envelope::open(env)?.claims.id,
        };
        let seat = Seat::Box {
            name: &self.name,
            target: c.target,
        };
        let cmd = Presented {
            id,
            payload: c.payload,
            priority: c.priority,
            not_before: c.not_before,
        };
        self.set().verify(env, seat, cmd, Some(now)).map(Some)
    }

    /// Whether a queued command may still go to its device: its signer
    /// may have been removed since it was queued, or the box may have come
    /// to require signatures. Cheap: the signature was checked at intake.
    pub fn at_delivery(&self, envelope: Option<&[u8]>) -> Option<Refusal> {
        let Some(env) = envelope::sealed(envelope) else {
            return self.require.then_some(Refusal::Unsigned);
        };
        let key_id = match envelope::open(env) {
            Ok(o) => o.claims.key_id,
            Err(e) => return Some(e.into()),
        };
        let set = self.set();
        if set.key(&key_id).is_some() {
            return None;
        }
        Some(match set.removed(&key_id) {
            Some(r) => Refusal::RemovedSigner {
                id: r.id,
                name: r.name.clone(),
                at: r.removed_at,
            },
            None => Refusal::UnknownSigner(key_id),
        })
    }
}

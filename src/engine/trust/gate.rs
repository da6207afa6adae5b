//! The box's trust gate: its name (the audience it answers to), whether it
//! requires signatures, and its current trust set, shared by every intake
//! path (admin socket, HTTP, device sends, a hub's `Forward`, NATS) and the
//! delivery path. Signatures are checked here, in the caller's task, so
//! the writer's round stays cheap and many intakes verify in parallel.

use super::envelope;
use super::set::{Presented, Refusal, Seat, TrustSet, Verified};
use crate::engine::command::{CommandId, Millis, Priority};
use std::sync::{Arc, Mutex, RwLock};

/// A box's trust gate: one per box, behind an `Arc` in its queue handle,
/// through which intake, the device link (at delivery), the admin socket
/// and enroll ask it.
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
    /// The command's envelope field as received: a signed envelope, an
    /// unsigned one (an artifact reference), or `None`.
    pub envelope: Option<&'a [u8]>,
    /// The target as it is queued here.
    pub target: &'a str,
    /// The id the command will have here: a hub's, or (`None`) the
    /// envelope's.
    pub id: Option<CommandId>,
    /// The payload as received.
    pub payload: &'a [u8],
    /// The priority it is to be queued at.
    pub priority: Priority,
    /// Deliver no earlier than this, ms since the Unix epoch (`None`: as
    /// soon as it can be).
    pub not_before: Option<Millis>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new(String::new(), false, TrustSet::default())
    }
}

impl Gate {
    /// The gate of the box named `name` (the audience it answers to),
    /// refusing unsigned commands if `require` (`serve --require-signed`),
    /// with `set` (the store's) as its current set.
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

    /// Whether the box refuses unsigned commands (`serve --require-signed`).
    pub fn requires_signatures(&self) -> bool {
        self.require
    }

    /// The current trust set: a clone of the `Arc`, so a verification uses
    /// one set throughout while an edit replaces it. An empty set if the
    /// lock is poisoned (every signer then unknown).
    pub fn set(&self) -> Arc<TrustSet> {
        self.set.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Make `set` the current one for every later intake and delivery. The
    /// writer calls it only once the set is stored and flushed, so the gate
    /// never acts on an edit a crash could undo. Nothing if the lock is
    /// poisoned.
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

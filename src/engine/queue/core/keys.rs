//! Idempotency keys: what a key was first used for, within the key window.

use super::*;

/// What an idempotency key was first used for: a later send with the same
/// key must be the same command (same target, same payload) to be answered
/// with the first one's id. Digests, not copies: 16 bytes a key.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyUse {
    pub(super) id: CommandId,
    pub(super) at: Millis,
    target: u64,
    /// None after a restart for an end whose record keeps no payload: the
    /// target is then all that is compared.
    pub(super) payload: Option<u64>,
}

impl KeyUse {
    pub(super) fn new(id: CommandId, at: Millis, target: &str, payload: Option<&[u8]>) -> KeyUse {
        KeyUse {
            id,
            at,
            target: digest(target.as_bytes()),
            payload: payload.map(digest),
        }
    }

    /// What differs from a new send with the same key, if anything.
    pub(super) fn differs(&self, target: &str, payload: &[u8]) -> Option<&'static str> {
        if self.target != digest(target.as_bytes()) {
            Some("target")
        } else if self.payload.is_some_and(|p| p != digest(payload)) {
            Some("payload")
        } else {
            None
        }
    }
}

/// A fixed-seed hash (FxHash: the same on every run, so replay agrees).
fn digest(b: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = rustc_hash::FxHasher::default();
    h.write(b);
    h.write_usize(b.len());
    h.finish()
}

impl QueueCore {
    pub(super) fn remember_key(&mut self, origin: u32, key: &str, mut used: KeyUse) {
        let k: Box<str> = key.into();
        let at = used.at;
        // A result record carries the payload only for ends that may be
        // retried: keep the digest an earlier record of the same command gave.
        let old = self.keys.get(&(origin, k.clone()));
        if let Some(old) = old.filter(|o| o.id == used.id) {
            used.payload = used.payload.or(old.payload);
        }
        if self.keys.insert((origin, k.clone()), used).is_none() {
            self.key_ages.push_back((at, origin, k));
        }
    }

    pub(super) fn expire_keys(&mut self, now: Millis) {
        while let Some((at, _, _)) = self.key_ages.front() {
            if now.saturating_sub(*at) < self.limits.key_window_ms {
                break;
            }
            let (_, o, k) = self.key_ages.pop_front().expect("front exists");
            let key = (o, k);
            if self
                .keys
                .get(&key)
                .is_some_and(|u| now.saturating_sub(u.at) >= self.limits.key_window_ms)
            {
                self.keys.remove(&key);
            }
        }
    }
}

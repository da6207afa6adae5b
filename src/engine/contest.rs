//! One bundle on two live devices: telling it from a reboot, sans IO.
//!
//! A new connection of a device replaces the old one at once (the old one is
//! usually a rebooted device's stale connection, which would otherwise hold
//! the id until its idle timeout). When two live devices share one bundle,
//! each replacement is answered by the replaced one reconnecting and
//! replacing the other: a ping-pong that never ends.
//!
//! [`Contests`] tells the two apart. A replacement is a *contest* when the
//! connection it replaces is still open and took the id less than
//! [`WINDOW`] ago (a rebooted device replaces a connection once; the stale
//! one never comes back). [`THRESHOLD`] contests within [`WINDOW`] flag the
//! id as shared: from then on a newcomer is refused while a connection holds
//! the id (close code `IN_USE`, "this bundle is in use elsewhere"), so the
//! holder keeps it and the other side stops. A newcomer finding the id free
//! still takes it. The flag lasts [`FLAG_FOR`] after the last refusal, or
//! until the device is enrolled again.
//!
//! Bounded: at most `cap` ids are tracked; a new one evicts the least
//! recently active.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Contests counted over this window; a holder younger than this is
/// contested.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Contests within [`WINDOW`] that flag an id as shared.
pub const THRESHOLD: usize = 3;
/// How long the flag lasts after the last contest or refusal.
pub const FLAG_FOR: Duration = Duration::from_secs(600);
/// Ids tracked at once.
pub const MAX_TRACKED: usize = 1024;

/// A device whose bundle two live devices share, as `devices` and `status`
/// show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedBundle {
    /// The device id whose bundle is in use on two live devices.
    pub device: String,
    /// When the box found it (ms since the epoch).
    pub since: u64,
    /// Connections refused since ("this bundle is in use elsewhere").
    pub refused: u64,
}

/// The connection that holds an id when another arrives.
#[derive(Clone, Copy, Debug)]
pub struct Holder {
    /// How long it has held the id.
    pub age: Duration,
    /// Whether its connection is still open (not closed or timed out).
    pub open: bool,
}

/// What to do with a newcomer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Take the id (closing the holder, if any).
    Take,
    /// Refuse it: the bundle is in use elsewhere.
    Refuse {
        /// This arrival is the one that flagged the id (log it once).
        detected: bool,
    },
}

/// A flagged id, for `devices`, `status` and alerts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flag {
    /// When the id was flagged.
    pub since: Instant,
    /// Newcomers refused since.
    pub refused: u64,
}

struct Track {
    contests: VecDeque<Instant>,
    flag: Option<Flag>,
    last: Instant,
}

/// Per device id, recent contests and the shared-bundle flag.
pub struct Contests {
    window: Duration,
    threshold: usize,
    flag_for: Duration,
    cap: usize,
    ids: HashMap<String, Track>,
}

impl Default for Contests {
    fn default() -> Self {
        Contests::new(WINDOW, THRESHOLD, FLAG_FOR, MAX_TRACKED)
    }
}

impl Contests {
    /// Counting contests over `window`, flagging an id at `threshold` of
    /// them (at least 1), keeping the flag `flag_for` after its last
    /// refusal, tracking at most `cap` ids (at least 1).
    pub fn new(window: Duration, threshold: usize, flag_for: Duration, cap: usize) -> Self {
        Contests {
            window,
            threshold: threshold.max(1),
            flag_for,
            cap: cap.max(1),
            ids: HashMap::new(),
        }
    }

    /// A connection of `id` arrives while `holder` (if any) holds it.
    pub fn arrive(&mut self, id: &str, holder: Option<Holder>, now: Instant) -> Verdict {
        self.expire(id, now);
        let Some(h) = holder.filter(|h| h.open) else {
            return Verdict::Take;
        };
        if let Some(t) = self.ids.get_mut(id) {
            if let Some(f) = &mut t.flag {
                f.refused += 1;
                t.last = now;
                return Verdict::Refuse { detected: false };
            }
        }
        if h.age >= self.window {
            return Verdict::Take;
        }
        if !self.ids.contains_key(id) && self.ids.len() >= self.cap {
            self.evict();
        }
        let t = self.ids.entry(id.to_string()).or_insert_with(|| Track {
            contests: VecDeque::new(),
            flag: None,
            last: now,
        });
        t.last = now;
        t.contests.push_back(now);
        while t
            .contests
            .front()
            .is_some_and(|&c| now.saturating_duration_since(c) > self.window)
            || t.contests.len() > self.threshold
        {
            t.contests.pop_front();
        }
        if t.contests.len() >= self.threshold {
            t.flag = Some(Flag {
                since: now,
                refused: 1,
            });
            return Verdict::Refuse { detected: true };
        }
        Verdict::Take
    }

    /// Forget `id` (it was enrolled again: a new bundle, a new start).
    pub fn clear(&mut self, id: &str) {
        self.ids.remove(id);
    }

    /// The flag of `id`, if it is flagged at `now`.
    pub fn flag(&self, id: &str, now: Instant) -> Option<Flag> {
        let t = self.ids.get(id)?;
        t.flag
            .filter(|_| now.saturating_duration_since(t.last) < self.flag_for)
    }

    /// Every id flagged at `now`, sorted.
    pub fn flagged(&self, now: Instant) -> Vec<(String, Flag)> {
        let mut v: Vec<_> = self
            .ids
            .keys()
            .filter_map(|id| Some((id.clone(), self.flag(id, now)?)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn expire(&mut self, id: &str, now: Instant) {
        let stale = self.ids.get(id).is_some_and(|t| {
            let quiet = now.saturating_duration_since(t.last);
            match t.flag {
                Some(_) => quiet >= self.flag_for,
                None => quiet > self.window,
            }
        });
        if stale {
            self.ids.remove(id);
        }
    }

    fn evict(&mut self) {
        // Unflagged ids first: a flag is what the operator must see.
        let victim = self
            .ids
            .iter()
            .min_by_key(|(_, t)| (t.flag.is_some(), t.last))
            .map(|(id, _)| id.clone());
        if let Some(id) = victim {
            self.ids.remove(&id);
        }
    }

    /// Ids tracked now.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// No id tracked now.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(age_s: u64) -> Option<Holder> {
        Some(Holder {
            age: Duration::from_secs(age_s),
            open: true,
        })
    }

    #[test]
    fn a_reboot_takes_the_id_at_once_every_time() {
        let t0 = Instant::now();
        let mut c = Contests::default();
        // A rebooted device: its stale connection had held the id a while,
        // or was already closed; again and again, hours apart or not.
        for i in 0..10 {
            let now = t0 + Duration::from_secs(i * 120);
            assert_eq!(c.arrive("dev-1", live(100), now), Verdict::Take);
        }
        let closed = Some(Holder {
            age: Duration::from_secs(1),
            open: false,
        });
        for i in 0..10 {
            assert_eq!(
                c.arrive("dev-1", closed, t0 + Duration::from_secs(i)),
                Verdict::Take
            );
        }
        assert_eq!(c.arrive("dev-1", None, t0), Verdict::Take);
        assert!(c.flagged(t0 + Duration::from_secs(2000)).is_empty());
        // One quick reboot (the holder is young) is not enough either.
        assert_eq!(c.arrive("dev-2", live(3), t0), Verdict::Take);
        assert_eq!(c.flag("dev-2", t0), None);
    }

    #[test]
    fn two_live_holders_are_flagged_and_the_newcomer_refused() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut c = Contests::default();
        assert_eq!(c.arrive("dev-1", live(1), s(1)), Verdict::Take);
        assert_eq!(c.arrive("dev-1", live(1), s(2)), Verdict::Take);
        assert_eq!(
            c.arrive("dev-1", live(1), s(3)),
            Verdict::Refuse { detected: true }
        );
        // Later newcomers are refused while someone holds the id, without a
        // new detection; one finding it free takes it.
        assert_eq!(
            c.arrive("dev-1", live(500), s(100)),
            Verdict::Refuse { detected: false }
        );
        assert_eq!(c.arrive("dev-1", None, s(101)), Verdict::Take);
        let f = c.flag("dev-1", s(101)).unwrap();
        assert_eq!((f.since, f.refused), (s(3), 2));
        assert_eq!(c.flagged(s(101)).len(), 1);
        // The flag ends FLAG_FOR after the last refusal.
        assert!(c.flag("dev-1", s(100) + FLAG_FOR).is_none());
        assert_eq!(c.arrive("dev-1", live(1), s(100) + FLAG_FOR), Verdict::Take);
        // Re-enrolling clears it at once.
        for i in 0..3 {
            c.arrive("dev-2", live(1), s(10 + i));
        }
        assert!(c.flag("dev-2", s(13)).is_some());
        c.clear("dev-2");
        assert!(c.flag("dev-2", s(13)).is_none());
    }

    #[test]
    fn contests_spread_wider_than_the_window_do_not_flag() {
        let t0 = Instant::now();
        let mut c = Contests::default();
        for i in 0..20 {
            let now = t0 + Duration::from_secs(i * 31);
            assert_eq!(c.arrive("dev-1", live(30), now), Verdict::Take, "{i}");
        }
    }

    #[test]
    fn the_tracked_ids_are_capped_and_flags_are_kept_longest() {
        let t0 = Instant::now();
        let mut c = Contests::new(WINDOW, 2, FLAG_FOR, 4);
        c.arrive("shared", live(1), t0);
        c.arrive("shared", live(1), t0);
        assert!(c.flag("shared", t0).is_some());
        for i in 0..100 {
            c.arrive(&format!("d{i}"), live(1), t0 + Duration::from_millis(i));
        }
        assert_eq!(c.len(), 4);
        assert!(c.flag("shared", t0 + Duration::from_secs(1)).is_some());
    }
}

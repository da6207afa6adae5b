//! What memory alone must satisfy, checked by the core itself (debug
//! builds after every round while small; the simulation and the core tests
//! always).

use super::*;

impl QueueCore {
    /// The queue's own invariants, over memory alone (what must also be on
    /// disk is checked by the tests and the simulation against their
    /// disks). The first one broken, named; linear in what is live.
    pub fn check_invariants(&self) -> Result<(), String> {
        macro_rules! ensure {
            ($cond:expr, $($why:tt)*) => {
                if !$cond {
                    return Err(format!($($why)*));
                }
            };
        }
        let mut per_device = vec![0u64; self.devs.len()];
        for (id, l) in self.live.iter() {
            let id = &id;
            ensure!(
                !self.results.contains_key(id),
                "{id} is both live and finished"
            );
            per_device[l.device as usize] += 1;
            if let Some(rg) = l.requeue_group {
                ensure!(
                    self.requeue_holders
                        .get(&rg)
                        .is_some_and(|v| v.contains(id)),
                    "{id} missing from the requeue holders of group {rg}"
                );
            }
            let dev = &self.devs[l.device as usize];
            let in_ready = dev.ready[l.priority.rank()].get(&l.order) == Some(id);
            match l.phase {
                Phase::Ready => ensure!(in_ready, "{id} is ready but not queued"),
                Phase::InFlight { on, .. } => {
                    ensure!(
                        self.devs[on as usize].in_flight.contains(id) && !in_ready,
                        "{id} is in flight but not held by its device"
                    );
                    // A pool command runs on a device (which may have lost
                    // the capability since: it keeps what it holds).
                    ensure!(
                        on == l.device
                            || (self.devs[l.device as usize].pool && !self.devs[on as usize].pool),
                        "{id} is in flight on a device outside its route"
                    );
                }
                Phase::Waiting | Phase::Blocked => {
                    ensure!(!in_ready, "{id} waits but is queued")
                }
                Phase::Handed { .. } => {
                    ensure!(
                        !in_ready && !dev.in_flight.contains(id),
                        "{id} is handed down but also queued or in flight"
                    );
                    ensure!(
                        self.is_gateway(l.device),
                        "{id} is handed to a device that is no gateway"
                    );
                }
            }
            if let Some(pid) = l.parent() {
                let Some(p) = self.parents.get(&pid) else {
                    return Err(format!("{id}: its parent {pid} is gone"));
                };
                let i = p.children.iter().position(|x| x.0 == *id);
                ensure!(
                    i.is_some_and(|i| p.ends[i].is_none()),
                    "{id} is live but its parent {pid} has its end"
                );
            }
        }
        for (pid, p) in &self.parents {
            let open = p.ends.iter().filter(|e| e.is_none()).count();
            ensure!(p.open as usize == open, "{pid}: open children miscounted");
            ensure!(
                open > 0,
                "{pid}: a parent with no open child is not settled"
            );
        }
        for (i, dev) in self.devs.iter().enumerate() {
            let borrowed = dev
                .in_flight
                .iter()
                .filter(|id| self.live.get(id).is_some_and(|l| l.device != i as u32))
                .count();
            ensure!(
                dev.borrowed as usize == borrowed,
                "{}: borrowed miscounted",
                dev.id
            );
            let ready: usize = dev.ready.iter().map(|q| q.len()).sum();
            if dev.pool && ready > 0 {
                for &m in &dev.members {
                    let mdev = &self.devs[m as usize];
                    ensure!(
                        !mdev.has_room() || !mdev.serves.contains(&(i as u32)),
                        "{} idles while pool {} has work",
                        mdev.id,
                        dev.id
                    );
                }
            }
            if let Some((_, window)) = dev.session {
                ensure!(
                    dev.in_flight.len() as u32 <= window,
                    "window exceeded on {}",
                    dev.id
                );
                // Work-conserving: nothing ready waits while there is room.
                ensure!(
                    ready == 0 || dev.in_flight.len() as u32 == window,
                    "{} idles with work",
                    dev.id
                );
            } else {
                ensure!(
                    dev.in_flight.is_empty(),
                    "{} is offline with commands in flight",
                    dev.id
                );
            }
            ensure!(
                dev.live == per_device[i],
                "{}: live commands miscounted",
                dev.id
            );
        }
        Ok(())
    }
}

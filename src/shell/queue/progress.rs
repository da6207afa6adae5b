//! How far each delivered command's artifact fetch has got, as its device
//! reports it (`DeviceFrame::Progress`). In memory only: a report a second
//! per fetch is not worth a flash write, and after a restart the device
//! reports again.

use crate::engine::command::CommandId;
use crate::engine::queue::api::Progress;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Weight of the newest interval in the rate: smooths the bursts of a
/// chunk-at-a-time transfer without hiding a stall for long.
const RATE_WEIGHT: f64 = 0.5;

struct Entry {
    artifact: Option<String>,
    bytes: u64,
    total: u64,
    at: Instant,
    rate: Option<f64>,
}

/// Shared by the device link (which writes) and `show` (which reads).
#[derive(Clone, Default)]
pub struct Board(Arc<Mutex<HashMap<CommandId, Entry>>>);

impl Board {
    /// Record a report for `id`; `artifact` labels it (`fw@2.1`).
    pub fn report(&self, id: CommandId, artifact: Option<String>, bytes: u64, total: u64) {
        self.report_at(id, artifact, bytes, total, Instant::now())
    }

    fn report_at(
        &self,
        id: CommandId,
        artifact: Option<String>,
        bytes: u64,
        total: u64,
        at: Instant,
    ) {
        let mut m = self.0.lock().expect("progress lock");
        let rate = match m.get(&id) {
            // A restarted fetch (bytes went down) starts its rate anew.
            Some(prev) if bytes >= prev.bytes => {
                let dt = at.duration_since(prev.at).as_secs_f64();
                if dt > 0.0 {
                    let now = (bytes - prev.bytes) as f64 / dt;
                    Some(match prev.rate {
                        Some(r) => r * (1.0 - RATE_WEIGHT) + now * RATE_WEIGHT,
                        None => now,
                    })
                } else {
                    prev.rate
                }
            }
            _ => None,
        };
        let artifact = artifact.or_else(|| m.get(&id).and_then(|p| p.artifact.clone()));
        m.insert(
            id,
            Entry {
                artifact,
                bytes,
                total,
                at,
                rate,
            },
        );
    }

    /// Forget `id` (its command was answered, or its device left).
    pub fn clear(&self, id: CommandId) {
        self.0.lock().expect("progress lock").remove(&id);
    }

    /// The latest progress of `id`, if its fetch reported any.
    pub fn get(&self, id: CommandId) -> Option<Progress> {
        let m = self.0.lock().expect("progress lock");
        m.get(&id).map(|e| Progress {
            artifact: e.artifact.clone(),
            bytes: e.bytes,
            total: e.total,
            percent: (e.bytes.min(e.total) * 100)
                .checked_div(e.total)
                .unwrap_or(100) as u8,
            rate_bps: e.rate.map(|r| r as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_comes_from_successive_reports_and_a_restart_resets_it() {
        let b = Board::default();
        let t0 = Instant::now();
        let id = CommandId(1);
        b.report_at(id, Some("fw@2.1".into()), 0, 1000, t0);
        let p = b.get(id).unwrap();
        assert_eq!((p.percent, p.rate_bps), (0, None));
        b.report_at(id, None, 400, 1000, t0 + Duration::from_secs(1));
        let p = b.get(id).unwrap();
        assert_eq!((p.percent, p.rate_bps), (40, Some(400)));
        assert_eq!(p.artifact.as_deref(), Some("fw@2.1"), "the label is kept");
        b.report_at(id, None, 600, 1000, t0 + Duration::from_secs(2));
        assert_eq!(
            b.get(id).unwrap().rate_bps,
            Some(300),
            "smoothed: (400+200)/2"
        );
        b.report_at(id, None, 100, 1000, t0 + Duration::from_secs(3));
        assert_eq!(b.get(id).unwrap().rate_bps, None);
        b.clear(id);
        assert!(b.get(id).is_none());
    }
}

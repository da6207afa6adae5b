//! Refusals in the log, rate-limited: a revoked or unknown device that
//! reconnects in a loop must not cost log lines per attempt.
//!
//! [`RefusalLog`] is sans IO (the time is passed in): the first refusal of a
//! key (an address, a device id, or both) is logged at once; the ones after
//! it are counted and summed up in one line per interval ("refused 123
//! handshakes from 10.0.0.5 (device dev-3 not enrolled) in the last 60 s").
//! A key quiet for a whole interval is forgotten, so its next refusal is
//! logged at once again. The map is capped; refusals of keys beyond the cap
//! are counted together in one overflow line, so a flood of addresses or
//! certificates costs at most about two lines per key slot per interval.
//!
//! [`Refusals`] is the shared shell: the log behind a lock and a wakeup for
//! the task that writes the summaries when they are due (it sleeps while
//! nothing is pending).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often repeated refusals of one key are summed up.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// Keys tracked at once.
pub const MAX_KEYS: usize = 256;

type Key = (Option<IpAddr>, Option<String>);

struct Entry {
    since: Instant,
    count: u64,
    what: String,
}

/// Counts refusals per key and says which to log now and which summaries
/// are due.
pub struct RefusalLog {
    interval: Duration,
    cap: usize,
    entries: HashMap<Key, Entry>,
    overflow: Option<Entry>,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new(INTERVAL, MAX_KEYS)
    }
}

impl RefusalLog {
    /// A log that sums up each key's repeats once per `interval` and tracks
    /// at most `cap` keys (at least 1) before counting the rest together.
    pub fn new(interval: Duration, cap: usize) -> Self {
        RefusalLog {
            interval,
            cap: cap.max(1),
            entries: HashMap::new(),
            overflow: None,
        }
    }

    /// Record one refusal of `addr`/`device` (`what`: why, e.g. "revoked
    /// device"). True when it is the key's first in an interval: log it now.
    pub fn refused(
        &mut self,
        addr: Option<IpAddr>,
        device: Option<&str>,
        what: &str,
        now: Instant,
    ) -> bool {
        let key = (addr, device.map(str::to_string));
        if let Some(e) = self.entries.get_mut(&key) {
            e.count += 1;
            if e.what != what {
                what.clone_into(&mut e.what);
            }
            return false;
        }
        if self.entries.len() >= self.cap {
            let o = self.overflow.get_or_insert_with(|| Entry {
                since: now,
                count: 0,
                what: String::new(),
            });
            o.count += 1;
            return false;
        }
        self.entries.insert(
            key,
            Entry {
                since: now,
                count: 0,
                what: what.to_string(),
            },
        );
        true
    }

    /// The summary lines due at `now`; keys quiet for a whole interval are
    /// dropped.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let interval = self.interval;
        let mut lines = Vec::new();
        self.entries.retain(|(addr, device), e| {
            if now.saturating_duration_since(e.since) < interval {
                return true;
            }
            if e.count == 0 {
                return false;
            }
            let secs = now.saturating_duration_since(e.since).as_secs();
            let n = e.count;
            lines.push(match (addr, device) {
                (Some(a), Some(d)) => {
                    format!(
                        "refused {n} handshakes from {a} ({} {d}) in the last {secs} s",
                        e.what
                    )
                }
                (Some(a), None) => {
                    format!(
                        "refused {n} handshakes from {a} ({}) in the last {secs} s",
                        e.what
                    )
                }
                (None, Some(d)) => {
                    format!(
                        "refused {n} handshakes of {} {d} in the last {secs} s",
                        e.what
                    )
                }
                (None, None) => format!("refused {n} handshakes ({}) in the last {secs} s", e.what),
            });
            e.since = now;
            e.count = 0;
            true
        });
        if let Some(o) = &self.overflow {
            if now.saturating_duration_since(o.since) >= interval {
                let secs = now.saturating_duration_since(o.since).as_secs();
                lines.push(format!(
                    "refused {} more handshakes from other addresses or devices in the last {secs} s (over {} at once are summed up here)",
                    o.count, self.cap
                ));
                self.overflow = None;
            }
        }
        lines.sort();
        lines
    }

    /// When [`RefusalLog::due`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .values()
            .chain(self.overflow.as_ref())
            .map(|e| e.since + self.interval)
            .min()
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing tracked: no key and no overflow count waiting for its line.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.overflow.is_none()
    }
}

/// The log shared by the TLS verifier and the device link, and the wakeup
/// of the task that writes its summaries.
#[derive(Default)]
pub struct Refusals {
    log: Mutex<RefusalLog>,
    wake: tokio::sync::Notify,
}

impl Refusals {
    /// Record a refusal; true if it should be logged now (the caller logs
    /// it with its own context).
    pub fn refused(&self, addr: Option<IpAddr>, device: Option<&str>, what: &str) -> bool {
        let first = self.log.lock().unwrap_or_else(|e| e.into_inner()).refused(
            addr,
            device,
            what,
            Instant::now(),
        );
        if first {
            // A new key may have the earliest deadline.
            self.wake.notify_one();
        }
        first
    }

    /// Write summaries when they are due, forever; sleeps while nothing is
    /// pending.
    pub async fn run(&self) {
        loop {
            let next = self
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_deadline();
            match next {
                None => self.wake.notified().await,
                Some(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(t)) => {}
                        _ = self.wake.notified() => {}
                    }
                }
            }
            let lines = self
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .due(Instant::now());
            for line in lines {
                tracing::info!("{line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_logged_and_the_rest_summed_up_once_per_interval() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut log = RefusalLog::new(Duration::from_secs(60), 8);
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(log.refused(Some(a), Some("dev-3"), "revoked device", t0));
        for i in 0..122 {
            assert!(!log.refused(Some(a), Some("dev-3"), "revoked device", s(i % 59)));
        }
        // Another key is its own first.
        assert!(log.refused(None, Some("dev-3"), "revoked device", t0));
        assert!(log.due(s(59)).is_empty());
        assert_eq!(log.next_deadline(), Some(s(60)));
        assert_eq!(
            log.due(s(60)),
            vec!["refused 122 handshakes from 10.0.0.5 (revoked device dev-3) in the last 60 s"]
        );
        // The per-device key had no repeat: dropped without a line.
        assert_eq!(log.len(), 1);
        // Quiet for a whole interval: forgotten, so the next one logs at once.
        assert!(log.due(s(120)).is_empty());
        assert!(log.is_empty());
        assert_eq!(log.next_deadline(), None);
        assert!(log.refused(Some(a), Some("dev-3"), "revoked device", s(130)));
    }

    #[test]
    fn the_map_is_capped_and_the_rest_is_one_overflow_line() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(60), 4);
        let mut first = 0;
        for i in 0..1000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            first += usize::from(log.refused(Some(ip), None, "bad certificate", t0));
        }
        assert_eq!((first, log.len()), (4, 4));
        let lines = log.due(t0 + Duration::from_secs(60));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("refused 996 more handshakes"),
            "{lines:?}"
        );
        assert!(log.is_empty());
    }
}

//! The uplink budget for artifact bytes (`--uplink-rate`, issue 25), as a
//! token bucket (engine: elapsed time and bytes in, a wait out).
//!
//! The edge paces how fast it reads what it stages; QUIC's flow control
//! then holds the hub to that pace, give or take one receive window, so
//! the budget holds on the uplink itself, for every staging together.

use std::time::Duration;

/// A token bucket of `rate` bytes a second, holding at most `burst`.
#[derive(Clone, Debug)]
pub struct Pacer {
    rate: u64,
    burst: u64,
    /// Bytes that may be read now without waiting (may go negative: a
    /// chunk is read whole, then paid for).
    tokens: i64,
    /// When `tokens` was last brought up to date.
    at: Duration,
}

impl Pacer {
    /// `rate` bytes/s (at least 1), with a burst of a quarter second's
    /// worth, at least one chunk, so a pause does not bank a flood.
    pub fn new(rate: u64) -> Pacer {
        let rate = rate.max(1);
        let burst = (rate / 4).max(u64::from(super::manifest::MAX_CHUNK));
        Pacer {
            rate,
            burst,
            tokens: burst as i64,
            at: Duration::ZERO,
        }
    }

    /// `bytes` were read at `now` (time since any fixed start): how long
    /// to wait before reading more.
    pub fn spend(&mut self, now: Duration, bytes: u64) -> Duration {
        let dt = now.saturating_sub(self.at);
        self.at = self.at.max(now);
        let earned = (dt.as_secs_f64() * self.rate as f64) as i64;
        self.tokens = (self.tokens.saturating_add(earned)).min(self.burst as i64);
        self.tokens = self.tokens.saturating_sub(bytes as i64);
        if self.tokens >= 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((-self.tokens) as f64 / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_reader_is_held_to_the_rate_after_its_burst() {
        let rate = 1_000_000;
        let mut p = Pacer::new(rate);
        let chunk = 65_536;
        // Read as fast as allowed for 10 s of simulated time.
        let (mut now, mut read) = (Duration::ZERO, 0u64);
        while now < Duration::from_secs(10) {
            now += p.spend(now, chunk);
            read += chunk;
        }
        let burst = (rate / 4).max(u64::from(crate::engine::artifact::manifest::MAX_CHUNK));
        let most = rate * 10 + burst + chunk;
        assert!(
            read <= most,
            "{read} bytes in 10 s at {rate}/s (at most {most})"
        );
        assert!(read >= rate * 10, "{read}: the budget is used, not wasted");
    }

    #[test]
    fn an_idle_spell_banks_no_more_than_the_burst() {
        let mut p = Pacer::new(1_000_000);
        assert_eq!(p.spend(Duration::from_secs(3600), 262_144), Duration::ZERO);
        // The burst is spent: the next chunk waits for its own tokens.
        let w = p.spend(Duration::from_secs(3600), 262_144);
        assert!(w > Duration::from_millis(200), "{w:?}");
    }
}

//! A token bucket, sans IO: the limit on one device's frame rate. The
//! caller hands it the time (a monotonic offset from any origin it picks),
//! so it is tested without a clock.

use std::time::Duration;

/// `rate` tokens a second, at most `burst` saved up; each frame takes one.
#[derive(Clone, Debug)]
pub struct Bucket {
    tokens: f64,
    last: Duration,
    rate: f64,
    burst: f64,
}

impl Bucket {
    /// A full bucket at time zero (a new session may start with a burst).
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Bucket {
            tokens: burst,
            last: Duration::ZERO,
            rate: f64::from(rate),
            burst,
        }
    }

    /// Take a token at `now`: `false` when there is none (the frame is over
    /// the rate). A `now` earlier than the last one adds nothing.
    pub fn take(&mut self, now: Duration) -> bool {
        let dt = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_then_the_rate_and_no_more() {
        let mut b = Bucket::new(10, 3);
        // The burst at once, then nothing until time passes.
        assert!((0..3).all(|_| b.take(ms(0))));
        assert!(!b.take(ms(0)));
        // 10 a second: one token per 100 ms.
        assert!(!b.take(ms(50)));
        assert!(b.take(ms(100)));
        assert!(!b.take(ms(100)));
        // A long quiet saves up no more than the burst.
        let allowed = (0..10).filter(|_| b.take(ms(60_000))).count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn time_going_back_adds_nothing_and_a_zero_burst_still_lets_one_through() {
        let mut b = Bucket::new(1, 1);
        assert!(b.take(ms(5_000)));
        assert!(!b.take(ms(1_000)), "earlier than the last take");
        assert!(!b.take(ms(5_500)));
        assert!(b.take(ms(6_000)));
        let mut z = Bucket::new(0, 0);
        assert!(z.take(ms(0)));
        assert!(!z.take(ms(1_000_000)), "rate 0: the burst only");
    }
}

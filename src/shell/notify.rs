//! systemd integration: readiness, watchdog and status, via `sd_notify`.
//!
//! Everything here is a no-op when the box is not run by systemd
//! (`NOTIFY_SOCKET` unset), and the watchdog task exists only when systemd
//! asked for one (`WATCHDOG_USEC`): an idle box wakes for nothing else.

use std::time::Duration;

/// Tell systemd the box is serving (store open, listener bound).
pub fn ready(status: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

/// Tell systemd the box is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for, if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Ping the watchdog at half its interval, for as long as the task runs.
/// `alive` is awaited before each ping, so a wedged box (its check never
/// returns) stops pinging and systemd restarts it.
pub async fn watchdog<F, Fut>(interval: Duration, alive: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        if alive().await {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }
}

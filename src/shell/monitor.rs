//! Live monitoring inside the box: the async shell around the alert engine
//! (`alert`), per-device statistics, the latest commands and a bounded
//! per-minute history, for the dashboard (`http`), `status`, `devices
//! --stats` and metrics.
//!
//! Everything is fed by the queue's lifecycle events; nothing polls. The
//! task wakes on an event, an uplink change, the alert engine's next
//! deadline, or the minute sampler — and the sampler runs only when the box
//! serves the dashboard or has rules, so a box without either stays at zero
//! CPU when idle. Alert evaluation reads the queue (and the disk size for
//! disk rules), so after an event it waits at least [`EVAL_GAP`] before
//! the next evaluation: a busy box evaluates about once a second, not once
//! per command.

use crate::engine::alert::{
    AlertState, AlertView, DeviceObs, Engine, Observation, Rule, Transition,
};
use crate::engine::command::{DeviceId, State as CmdState};
use crate::shell::queue::{LifecycleEvent, QueueHandle};
use crate::shell::upstream::UplinkStatus;
use crate::{Millis, Outcome};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// The device name alerts are reported under upstream. `:` is reserved in
/// device names, so no enrolled device can ever be called this.
pub const BOX_DEVICE: &str = "outpost:box";
/// Latest commands kept for the page.
pub const RECENT_COMMANDS: usize = 200;
/// Ends kept per device for its statistics.
pub const DEVICE_WINDOW: usize = 256;
/// Per-minute samples kept: the last hour.
pub const HISTORY_MINUTES: usize = 60;
/// Upper bounds (ms) of the enqueue → ack latency buckets; one more bucket
/// holds the rest.
pub const LATENCY_BUCKETS_MS: [u64; 9] = [10, 50, 100, 250, 500, 1_000, 5_000, 30_000, 60_000];
/// Least time between two alert evaluations caused by events.
pub const EVAL_GAP: Duration = Duration::from_secs(1);
/// How long an `exec` hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Hooks running at once; more are skipped with a warning rather than
/// queued, so a hung hook can never pile up processes.
pub const HOOKS_AT_ONCE: usize = 4;
const MINUTE: Millis = 60_000;

/// What the monitor needs.
#[derive(Clone, Debug, Default)]
pub struct MonitorOptions {
    /// The checked `[[alert]]` rules; empty: the monitor never evaluates.
    pub rules: Vec<Rule>,
    /// Take a per-minute sample (the dashboard is served).
    pub sample: bool,
    /// The box's disk budget in bytes (`--max-disk`), for disk rules and the
    /// page; `None`: no budget.
    pub max_disk: Option<u64>,
    /// Measured for disk rules and the page.
    pub data_dir: PathBuf,
    /// Report alert transitions upstream (the box has an uplink).
    pub upstream: bool,
    /// Which devices' bundles are in use on more than one live device (the
    /// device link knows), for `bundle_shared` rules.
    pub shared_bundles: Option<SharedBundles>,
}

/// Where the monitor reads the shared-bundle flags, and a wakeup for when a
/// new one is found.
#[derive(Clone)]
pub struct SharedBundles {
    /// The ids of the devices whose bundle is in use on more than one live
    /// device, read at each evaluation.
    pub list: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Bumped by the link each time it finds a shared bundle, which comes
    /// with no session change to wake the monitor.
    pub found: watch::Receiver<u64>,
}

impl std::fmt::Debug for SharedBundles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedBundles")
    }
}

/// A command as the page lists it: its latest lifecycle event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandEntry {
    /// The command's ULID, as text.
    pub id: String,
    /// The target device's id.
    pub device: String,
    /// The state the event left it in, as `state_name` writes it.
    pub state: String,
    /// When the event happened (ms since the Unix epoch).
    pub at: Millis,
    /// Deliveries attempted so far.
    pub attempts: u32,
    /// The result text (lossy UTF-8, at most 200 bytes) or the failure.
    pub result: Option<String>,
}

/// One minute of history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// The start of the minute (ms since the Unix epoch).
    pub at: Millis,
    /// Commands queued when the sample was taken.
    pub queued: u64,
    /// Commands in flight when the sample was taken.
    pub in_flight: u64,
    /// Commands in the dead letter when the sample was taken.
    pub dead: u64,
    /// Commands that ended in the minute, by how.
    pub succeeded: u64,
    /// Commands that ended any other way in the minute: failed, dead,
    /// expired, cancelled or shed.
    pub failed: u64,
}

/// A device's statistics over its last [`DEVICE_WINDOW`] ends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// The device's id.
    pub device: String,
    /// Ends in the window that succeeded.
    pub succeeded: u64,
    /// Ends in the window that failed: rejected by the device, or a
    /// broadcast whose children ended differently.
    pub failed: u64,
    /// Ends in the window that went to the dead letter.
    pub dead: u64,
    /// Ends in the window whose ttl ran out.
    pub expired: u64,
    /// Ends in the window that were cancelled.
    pub cancelled: u64,
    /// Ends in the window that were shed for a higher-priority command.
    pub shed: u64,
    /// Succeeded / ended, in percent (no ends: `None`).
    pub success_rate: Option<f64>,
    /// Enqueue → ack latency: counts per bucket of [`LATENCY_BUCKETS_MS`]
    /// (and one more for the rest).
    pub latency_buckets: Vec<u64>,
    /// The median enqueue → ack latency (ms) of the window's acked ends;
    /// `None`: none was acked.
    pub latency_p50_ms: Option<u64>,
    /// The 95th percentile of the same; `None`: none was acked.
    pub latency_p95_ms: Option<u64>,
}

// Ends are stored packed (8 B): thousands of devices × the window must
// stay small on a box with little RAM.
#[derive(Clone, Copy)]
struct End {
    /// Enqueue → ack; `u32::MAX`: ended by the box, no ack.
    latency_ms: u32,
    state: u8,
}

const END_STATES: [&str; 6] = [
    "succeeded",
    "failed",
    "dead",
    "expired",
    "cancelled",
    "shed",
];

fn end_index(s: CmdState) -> Option<u8> {
    Some(match s {
        CmdState::Succeeded => 0,
        CmdState::Failed => 1,
        CmdState::Dead => 2,
        CmdState::Expired => 3,
        CmdState::Cancelled => 4,
        CmdState::Shed => 5,
        CmdState::Queued | CmdState::Delivered { .. } => return None,
    })
}

/// A state as the page and JSON show it.
pub fn state_name(s: CmdState) -> &'static str {
    match s {
        CmdState::Queued => "queued",
        CmdState::Delivered { .. } => "delivered",
        s => END_STATES[end_index(s).unwrap_or(0) as usize],
    }
}

/// What the page hears on `/api/events`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Update {
    /// A command's latest lifecycle event.
    Command(CommandEntry),
    /// A rule's transition, pending and inactive ones too.
    Alert(Transition),
    /// A new per-minute sample.
    Sample(Sample),
}

#[derive(Default)]
struct Book {
    recent: VecDeque<CommandEntry>,
    ends: HashMap<DeviceId, VecDeque<End>>,
    history: VecDeque<Sample>,
    minute_succeeded: u64,
    minute_failed: u64,
}

impl Book {
    fn record(&mut self, ev: &LifecycleEvent) {
        let result = match (&ev.outcome, &ev.error) {
            (Some(Outcome::Ok(b)), _) => Some(clip(&String::from_utf8_lossy(b))),
            (Some(Outcome::Failed { code, message }), _) => {
                Some(clip(&format!("failed ({code}): {message}")))
            }
            (Some(Outcome::Rejected { reason }), _) => Some(clip(&format!("rejected: {reason}"))),
            (None, Some(e)) => Some(clip(e)),
            (None, None) => None,
        };
        let entry = CommandEntry {
            id: ev.id.to_string(),
            device: ev.device.clone(),
            state: state_name(ev.state).into(),
            at: ev.at,
            attempts: ev.attempts,
            result,
        };
        if let Some(i) = self.recent.iter().position(|c| c.id == entry.id) {
            self.recent.remove(i);
        }
        self.recent.push_front(entry);
        self.recent.truncate(RECENT_COMMANDS);
        let Some(state) = end_index(ev.state) else {
            return;
        };
        match ev.state {
            CmdState::Succeeded => self.minute_succeeded += 1,
            _ => self.minute_failed += 1,
        }
        // The id is a ULID: its time is when the command was accepted.
        let created = ulid::Ulid(ev.id.0).timestamp_ms();
        let latency_ms = if ev.outcome.is_some() {
            ev.at.saturating_sub(created).min(u32::MAX as u64 - 1) as u32
        } else {
            u32::MAX
        };
        let w = self.ends.entry(ev.device.clone()).or_default();
        if w.len() == DEVICE_WINDOW {
            w.pop_front();
        }
        w.push_back(End { latency_ms, state });
    }

    fn stats(&self, device: &str) -> DeviceStats {
        let mut s = DeviceStats {
            device: device.into(),
            latency_buckets: vec![0; LATENCY_BUCKETS_MS.len() + 1],
            ..DeviceStats::default()
        };
        let Some(w) = self.ends.get(device) else {
            return s;
        };
        let mut lat: Vec<u32> = Vec::with_capacity(w.len());
        for e in w {
            let c = match e.state {
                0 => &mut s.succeeded,
                1 => &mut s.failed,
                2 => &mut s.dead,
                3 => &mut s.expired,
                4 => &mut s.cancelled,
                _ => &mut s.shed,
            };
            *c += 1;
            if e.latency_ms != u32::MAX {
                lat.push(e.latency_ms);
                let b = LATENCY_BUCKETS_MS
                    .iter()
                    .position(|&b| e.latency_ms as u64 <= b)
                    .unwrap_or(LATENCY_BUCKETS_MS.len());
                s.latency_buckets[b] += 1;
            }
        }
        if !w.is_empty() {
            s.success_rate = Some(s.succeeded as f64 * 100.0 / w.len() as f64);
        }
        lat.sort_unstable();
        let pct = |p: usize| (!lat.is_empty()).then(|| lat[(lat.len() - 1) * p / 100] as u64);
        s.latency_p50_ms = pct(50);
        s.latency_p95_ms = pct(95);
        s
    }
}

fn clip(s: &str) -> String {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

struct Inner {
    book: Mutex<Book>,
    updates: broadcast::Sender<Update>,
    alerts: watch::Sender<Vec<AlertView>>,
    rule_names: Vec<String>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The monitor: cheap to clone.
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

impl Monitor {
    /// Start following `queue` (and `uplink`, when the box has one).
    pub fn start(
        queue: QueueHandle,
        uplink: Option<watch::Receiver<UplinkStatus>>,
        o: MonitorOptions,
    ) -> Monitor {
        let (updates, _) = broadcast::channel(1024);
        let (alerts, _) = watch::channel(Vec::new());
        let inner = Arc::new(Inner {
            book: Mutex::new(Book::default()),
            updates,
            alerts,
            rule_names: o.rules.iter().map(|r| r.name.clone()).collect(),
            task: Mutex::new(None),
        });
        // Subscribed before the task runs, so no event after `start` is
        // missed.
        let events = queue.subscribe();
        let task = tokio::spawn(run(inner.clone(), queue, uplink, events, o));
        *inner.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Monitor { inner }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // A panic elsewhere must not take the page down with it.
        self.inner.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest `limit` commands, newest first.
    pub fn recent(&self, limit: usize) -> Vec<CommandEntry> {
        self.book().recent.iter().take(limit).cloned().collect()
    }

    /// Per-minute samples, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.book().history.iter().cloned().collect()
    }

    /// Statistics of one device.
    pub fn device_stats(&self, device: &str) -> DeviceStats {
        self.book().stats(device)
    }

    /// Pending and firing alerts.
    pub fn alerts(&self) -> Vec<AlertView> {
        self.inner.alerts.borrow().clone()
    }

    /// Every rule with 1 when it fires, for metrics.
    pub fn alert_gauges(&self) -> Vec<(String, bool)> {
        let now = self.inner.alerts.borrow();
        self.inner
            .rule_names
            .iter()
            .map(|n| {
                let firing = now.iter().any(|a| &a.name == n && a.state == "firing");
                (n.clone(), firing)
            })
            .collect()
    }

    /// Updates from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.inner.updates.subscribe()
    }

    /// Stop the task.
    pub fn stop(&self) {
        if let Some(t) = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

async fn observe(
    queue: &QueueHandle,
    uplink: &Option<watch::Receiver<UplinkStatus>>,
    o: &MonitorOptions,
    disk_rules: bool,
) -> Option<Observation> {
    let stats = queue.stats().await.ok()?;
    let devices = queue.devices().await.ok()?;
    let outbox_oldest = match uplink {
        Some(_) => queue.outbox_stats().await.ok()?.oldest_at,
        None => None,
    };
    let disk_bytes = if disk_rules {
        let dir = o.data_dir.clone();
        // A directory walk: off the runtime's threads.
        tokio::task::spawn_blocking(move || crate::shell::store::dir_size(&dir))
            .await
            .unwrap_or(0)
    } else {
        0
    };
    Some(Observation {
        queued: stats.queued,
        in_flight: stats.in_flight,
        dead: stats.dead,
        devices: devices
            .iter()
            .filter(|d| !d.record.revoked)
            .map(|d| DeviceObs {
                id: d.record.id.clone(),
                online: d.online,
                since: d.record.last_seen.unwrap_or(d.record.enrolled_at),
            })
            .collect(),
        outbox_oldest,
        shared_bundles: o
            .shared_bundles
            .as_ref()
            .map(|s| (s.list)())
            .unwrap_or_default(),
        disk_bytes,
        max_disk: o.max_disk,
        uplink: uplink.as_ref().map(|u| {
            let s = u.borrow();
            crate::engine::alert::UplinkObs {
                connected: s.state == crate::shell::upstream::UplinkState::Connected,
                since: s.since,
            }
        }),
    })
}

fn at_millis(t: Millis) -> tokio::time::Instant {
    let now = crate::now_millis();
    tokio::time::Instant::now() + Duration::from_millis(t.saturating_sub(now))
}

async fn run(
    inner: Arc<Inner>,
    queue: QueueHandle,
    mut uplink: Option<watch::Receiver<UplinkStatus>>,
    mut events: broadcast::Receiver<LifecycleEvent>,
    o: MonitorOptions,
) {
    let mut engine = Engine::new(o.rules.clone());
    let disk_rules = o
        .rules
        .iter()
        .any(|r| matches!(r.kind, crate::engine::alert::Kind::DiskAbove(_)));
    let hooks = Arc::new(tokio::sync::Semaphore::new(HOOKS_AT_ONCE));
    let mut sessions = queue.sessions_watch();
    let mut shared_found = o.shared_bundles.as_ref().map(|s| s.found.clone());
    let ticking = o.sample || !engine.is_empty();
    // The first sample at once, so a page opened soon after a start has a
    // point to draw; then on each minute.
    let mut next_sample = crate::now_millis();
    // An evaluation owed since an event, and the earliest it may run.
    let mut owed = !engine.is_empty();
    let mut last_eval: Option<tokio::time::Instant> = None;
    loop {
        let mut wake: Option<tokio::time::Instant> = None;
        let mut at = |i: tokio::time::Instant| {
            wake = Some(wake.map_or(i, |w: tokio::time::Instant| w.min(i)))
        };
        if ticking {
            at(at_millis(next_sample));
        }
        if let Some(d) = engine.next_deadline() {
            at(at_millis(d));
        }
        if owed {
            at(last_eval.map_or_else(tokio::time::Instant::now, |l| l + EVAL_GAP));
        }
        let sleep = async {
            match wake {
                Some(w) => tokio::time::sleep_until(w).await,
                None => std::future::pending().await,
            }
        };
        let uplink_changed = async {
            match uplink.as_mut() {
                Some(u) => {
                    if u.changed().await.is_err() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => {
                    let entry = {
                        let mut b = inner.book.lock().unwrap_or_else(|e| e.into_inner());
                        b.record(&ev);
                        b.recent.front().cloned()
                    };
                    if let Some(e) = entry {
                        let _ = inner.updates.send(Update::Command(e));
                    }
                    owed |= !engine.is_empty();
                    continue;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!("monitor fell behind by {n} lifecycle events");
                    owed |= !engine.is_empty();
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = uplink_changed => {
                owed |= !engine.is_empty();
                continue;
            }
            // A shared bundle found: it comes with no session change.
            _ = async {
                let changed = match shared_found.as_mut() {
                    Some(w) => w.changed().await.is_ok(),
                    None => false,
                };
                if !changed {
                    std::future::pending::<()>().await
                }
            } => {
                owed |= !engine.is_empty();
                continue;
            }
            // A device came or went: offline rules re-arm their deadlines.
            r = sessions.changed(), if !engine.is_empty() => {
                if r.is_err() {
                    // The writer is gone: the box is stopping.
                    return;
                }
                owed = true;
                continue;
            }
            _ = sleep => {}
        }
        let now = crate::now_millis();
        if ticking && now >= next_sample {
            next_sample = (now / MINUTE + 1) * MINUTE;
            if let Ok(s) = queue.stats().await {
                let sample = {
                    let mut b = inner.book.lock().unwrap_or_else(|e| e.into_inner());
                    let sample = Sample {
                        at: now / MINUTE * MINUTE,
                        queued: s.queued,
                        in_flight: s.in_flight,
                        dead: s.dead,
                        succeeded: std::mem::take(&mut b.minute_succeeded),
                        failed: std::mem::take(&mut b.minute_failed),
                    };
                    if b.history.len() == HISTORY_MINUTES {
                        b.history.pop_front();
                    }
                    b.history.push_back(sample.clone());
                    sample
                };
                let _ = inner.updates.send(Update::Sample(sample));
            }
            owed |= !engine.is_empty();
        }
        let due = engine.next_deadline().is_some_and(|d| now >= d);
        let gap_over = last_eval.is_none_or(|l| l.elapsed() >= EVAL_GAP);
        if engine.is_empty() || !((owed && gap_over) || due) {
            continue;
        }
        owed = false;
        last_eval = Some(tokio::time::Instant::now());
        let Some(obs) = observe(&queue, &uplink, &o, disk_rules).await else {
            continue;
        };
        let now = crate::now_millis();
        let changes = engine.observe(&obs, now);
        // Details change without a transition ("160 live commands" → 170).
        let current = engine.alerts();
        inner.alerts.send_if_modified(|a| {
            let changed = *a != current;
            if changed {
                *a = current;
            }
            changed
        });
        for t in changes {
            announce(&t, engine.rule(&t.name), &queue, &o, &hooks);
            let _ = inner.updates.send(Update::Alert(t));
        }
    }
}

/// Log, hook and report one transition.
fn announce(
    t: &Transition,
    rule: Option<&Rule>,
    queue: &QueueHandle,
    o: &MonitorOptions,
    hooks: &Arc<tokio::sync::Semaphore>,
) {
    match t.state {
        AlertState::Firing => tracing::warn!(alert = %t.name, detail = %t.detail, "alert firing"),
        AlertState::Resolved => {
            tracing::info!(alert = %t.name, detail = %t.detail, "alert resolved")
        }
        AlertState::Pending | AlertState::Inactive => {
            tracing::debug!(alert = %t.name, state = t.state.as_str(), detail = %t.detail, "alert")
        }
    }
    // Pending and a pending that went away are not news outside the box.
    if !matches!(t.state, AlertState::Firing | AlertState::Resolved) {
        return;
    }
    let json = serde_json::json!({
        "alert": t.name,
        "state": t.state.as_str(),
        "at": t.at,
        "detail": t.detail,
    })
    .to_string();
    if o.upstream {
        queue.device_event(BOX_DEVICE.to_string(), json.clone().into_bytes(), t.at);
    }
    if let Some(cmd) = rule.and_then(|r| r.exec.clone()) {
        let Ok(permit) = hooks.clone().try_acquire_owned() else {
            tracing::warn!(alert = %t.name, "alert hook skipped: {HOOKS_AT_ONCE} hooks still running");
            return;
        };
        let name = t.name.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = run_hook(&cmd, &json).await {
                tracing::warn!(alert = %name, hook = %cmd, "alert hook failed: {e}");
            }
        });
    }
}

/// Why a hook did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// `/bin/sh` could not be started.
    #[error("cannot start it: {0}")]
    Spawn(std::io::Error),
    /// It ran longer than the given time (`HOOK_TIMEOUT`) and was killed.
    #[error("killed after {0:?}")]
    Timeout(Duration),
    /// It exited non-zero, or was killed by a signal.
    #[error("exited with {0}")]
    Exit(std::process::ExitStatus),
    /// Waiting for it failed.
    #[error("{0}")]
    Io(std::io::Error),
}

/// Run `cmd` (through `sh -c`, so a rule may give arguments) with `json`
/// on stdin, killed after [`HOOK_TIMEOUT`].
pub async fn run_hook(cmd: &str, json: &str) -> Result<(), HookError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(HookError::Spawn)?;
    let mut stdin = child.stdin.take();
    let body = json.to_string();
    let work = async move {
        if let Some(s) = stdin.as_mut() {
            // A hook that does not read its stdin is not an error.
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.write_all(b"\n").await;
        }
        drop(stdin);
        child.wait().await
    };
    match tokio::time::timeout(HOOK_TIMEOUT, work).await {
        Err(_) => Err(HookError::Timeout(HOOK_TIMEOUT)),
        Ok(Err(e)) => Err(HookError::Io(e)),
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(HookError::Exit(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::command::CommandId;

    fn ev(id: CommandId, device: &str, state: CmdState, at: Millis, ok: bool) -> LifecycleEvent {
        LifecycleEvent {
            id,
            device: device.into(),
            state,
            at,
            attempts: 1,
            outcome: ok.then(|| Outcome::Ok(b"done".to_vec())),
            error: None,
        }
    }

    #[test]
    fn device_stats_count_outcomes_and_bucket_latency_in_a_bounded_window() {
        let mut b = Book::default();
        let t0 = 1_700_000_000_000;
        for i in 0..300u64 {
            let id = CommandId::new(t0 + i, i as u128);
            b.record(&ev(
                id,
                "dev-1",
                CmdState::Delivered { attempt: 1 },
                t0 + i,
                false,
            ));
            // 40 ms from enqueue to ack, every tenth one fails.
            let (state, ok) = if i % 10 == 0 {
                (CmdState::Failed, false)
            } else {
                (CmdState::Succeeded, true)
            };
            let mut e = ev(id, "dev-1", state, t0 + i + 40, ok);
            if !ok {
                e.outcome = Some(Outcome::Failed {
                    code: 1,
                    message: "no".into(),
                });
            }
            b.record(&e);
        }
        let s = b.stats("dev-1");
        assert_eq!(s.succeeded + s.failed, DEVICE_WINDOW as u64, "bounded");
        assert!(s.failed >= 25 && s.failed <= 26, "{s:?}");
        assert_eq!(s.latency_buckets[1], DEVICE_WINDOW as u64, "all ≤ 50 ms");
        assert_eq!(s.latency_p50_ms, Some(40));
        let rate = s.success_rate.unwrap();
        assert!((89.0..=91.0).contains(&rate), "{rate}");
        assert_eq!(b.recent.len(), RECENT_COMMANDS);
        assert_eq!(b.recent[0].state, "succeeded");
        assert_eq!(b.recent[0].result.as_deref(), Some("done"));
        assert_eq!(b.stats("dev-2").success_rate, None);
    }
}

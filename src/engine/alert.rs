//! Alert rules: a sans-IO engine.
//!
//! [`Engine::observe`] takes what the box looks like now ([`Observation`])
//! and the time, and returns the transitions it caused (pending → firing →
//! resolved). [`Engine::next_deadline`] says when the engine must look
//! again even if nothing changes: the end of a `for` or `clear_for` wait, or
//! the instant a time-based condition (a device offline for longer than D,
//! the outbox older than D, the uplink down for D) becomes true by itself.
//! The async shell (`monitor`) calls `observe` on state changes and at that
//! deadline, so an idle box with rules never wakes for nothing, and every
//! rule here is tested under a fake clock.
//!
//! Hysteresis: a rule fires only after its condition held for `for`, and
//! resolves only after it has been false for `clear_for` (default: `for`),
//! so a value hovering at the threshold does not flap.

use crate::Millis;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a rule watches.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// Live commands (queued + in flight) above N.
    QueueDepthAbove(u64),
    /// Any enrolled, unrevoked device offline (not connected) for longer
    /// than D since it was last seen (or enrolled).
    DeviceOfflineLongerThan(Millis),
    /// Commands in the dead letter above N.
    DeadAbove(u64),
    /// The oldest record waiting for the hub older than D.
    OutboxLagAbove(Millis),
    /// Disk use above P percent of `max_disk`.
    DiskAbove(f64),
    /// The uplink not connected for longer than D.
    UplinkDownLongerThan(Millis),
    /// More than N devices whose bundle is in use on more than one live
    /// device (the box refuses the newcomers: "in use elsewhere").
    BundleShared(u64),
}

/// One `[[alert]]` table, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The rule's name, trimmed and unique among the box's rules; it names the
    /// alert in transitions, logs, `status` and metrics.
    pub name: String,
    /// The condition and its threshold.
    pub kind: Kind,
    /// How long the condition must hold before the alert fires.
    pub for_ms: Millis,
    /// How long the condition must be false before it resolves.
    pub clear_for_ms: Millis,
    /// Run with the alert's JSON on stdin when it fires or resolves.
    pub exec: Option<String>,
}

/// An `[[alert]]` table as written in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The rule's name: must be non-empty (after trimming) and unique.
    pub name: String,
    /// `queue_depth_above`, `device_offline_longer_than`, `dead_above`,
    /// `outbox_lag_above`, `disk_above`, `uplink_down_longer_than`,
    /// `bundle_shared`.
    pub kind: String,
    /// The threshold: a number, a duration (`10m`) or a percentage (`90%`),
    /// as the kind wants.
    pub value: toml::Value,
    /// `for`: how long the condition must hold before the alert fires, a
    /// duration (`5m`); `None`: at once.
    #[serde(rename = "for")]
    pub for_: Option<String>,
    /// How long the condition must be false before a firing alert resolves,
    /// a duration; `None`: the same as `for`.
    pub clear_for: Option<String>,
    /// A command for `sh -c`, run with the alert's JSON on stdin when it
    /// fires or resolves; `None` or blank: no hook.
    pub exec: Option<String>,
}

/// Why an `[[alert]]` table is unusable; names the rule and the fix.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RuleError {
    /// `kind` names no condition this box knows.
    #[error("[[alert]] {name:?}: unknown kind `{kind}` (use queue_depth_above, device_offline_longer_than, dead_above, outbox_lag_above, disk_above, uplink_down_longer_than or bundle_shared)")]
    Kind {
        /// The rule's name.
        name: String,
        /// The kind as written.
        kind: String,
    },
    /// `value` is not what the kind wants (a count, a duration or a
    /// percentage from 0 to 100).
    #[error("[[alert]] {name:?}: value {value} {why}")]
    Value {
        /// The rule's name.
        name: String,
        /// The value as written, in TOML.
        value: String,
        /// What is wrong with it and how to write it, e.g. "is not a count
        /// (write e.g. 1000)".
        why: String,
    },
    /// `for` or `clear_for` is not a duration.
    #[error("[[alert]] {name:?}: {key} = {value:?} is not a duration (write e.g. 30s, 5m)")]
    Duration {
        /// The rule's name.
        name: String,
        /// Which key: `for` or `clear_for`.
        key: &'static str,
        /// The text as written.
        value: String,
    },
    /// Two tables share a name; transitions and metrics are keyed by it.
    #[error("[[alert]] {name:?}: the name is used by another rule")]
    Duplicate {
        /// The name used twice.
        name: String,
    },
    /// A table with no name, or a blank one.
    #[error("[[alert]]: a rule needs a non-empty name")]
    NoName,
    /// A `disk_above` rule on a box with no disk budget to take a percentage
    /// of.
    #[error("[[alert]] {name:?}: disk_above needs max_disk (--max-disk) to measure against")]
    NoMaxDisk {
        /// The rule's name.
        name: String,
    },
}

fn millis(d: Duration) -> Millis {
    d.as_millis() as Millis
}

impl RuleConfig {
    /// Check one table. `max_disk` is the box's budget (disk rules need it).
    pub fn check(&self, max_disk: Option<u64>) -> Result<Rule, RuleError> {
        let name = self.name.trim().to_string();
        if name.is_empty() {
            return Err(RuleError::NoName);
        }
        let bad = |why: &str| RuleError::Value {
            name: name.clone(),
            value: self.value.to_string(),
            why: why.to_string(),
        };
        let count = || match &self.value {
            toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
            _ => Err(bad("is not a count (write e.g. 1000)")),
        };
        let dur = || match &self.value {
            toml::Value::String(s) => crate::engine::duration::parse(s.trim())
                .map(millis)
                .map_err(|_| bad("is not a duration (write e.g. \"10m\")")),
            _ => Err(bad("is not a duration (write e.g. \"10m\")")),
        };
        let kind = match self.kind.as_str() {
            "queue_depth_above" => Kind::QueueDepthAbove(count()?),
            "dead_above" => Kind::DeadAbove(count()?),
            "bundle_shared" => Kind::BundleShared(count()?),
            "device_offline_longer_than" => Kind::DeviceOfflineLongerThan(dur()?),
            "outbox_lag_above" => Kind::OutboxLagAbove(dur()?),
            "uplink_down_longer_than" => Kind::UplinkDownLongerThan(dur()?),
            "disk_above" => {
                let p = match &self.value {
                    toml::Value::Integer(n) => *n as f64,
                    toml::Value::Float(f) => *f,
                    toml::Value::String(s) => s
                        .trim()
                        .trim_end_matches('%')
                        .trim()
                        .parse()
                        .map_err(|_| bad("is not a percentage (write e.g. \"90%\")"))?,
                    _ => return Err(bad("is not a percentage (write e.g. \"90%\")")),
                };
                if !(0.0..=100.0).contains(&p) {
                    return Err(bad("is not between 0 and 100 %"));
                }
                if max_disk.is_none() {
                    return Err(RuleError::NoMaxDisk { name });
                }
                Kind::DiskAbove(p)
            }
            other => {
                return Err(RuleError::Kind {
                    name,
                    kind: other.to_string(),
                })
            }
        };
        let d = |key: &'static str, v: &Option<String>| -> Result<Option<Millis>, RuleError> {
            v.as_ref()
                .map(|s| {
                    crate::engine::duration::parse(s.trim())
                        .map(millis)
                        .map_err(|_| RuleError::Duration {
                            name: name.clone(),
                            key,
                            value: s.clone(),
                        })
                })
                .transpose()
        };
        let for_ms = d("for", &self.for_)?.unwrap_or(0);
        let clear_for_ms = d("clear_for", &self.clear_for)?.unwrap_or(for_ms);
        Ok(Rule {
            name,
            kind,
            for_ms,
            clear_for_ms,
            exec: self.exec.clone().filter(|e| !e.trim().is_empty()),
        })
    }
}

/// Check every table: names unique, each rule valid.
pub fn check_rules(tables: &[RuleConfig], max_disk: Option<u64>) -> Result<Vec<Rule>, RuleError> {
    let mut rules: Vec<Rule> = Vec::new();
    for t in tables {
        let r = t.check(max_disk)?;
        if rules.iter().any(|o| o.name == r.name) {
            return Err(RuleError::Duplicate { name: r.name });
        }
        rules.push(r);
    }
    Ok(rules)
}

/// A device as the engine sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceObs {
    /// The device's id (its enrolled name).
    pub id: String,
    /// Connected to the box now.
    pub online: bool,
    /// Last seen, or enrolled when never seen.
    pub since: Millis,
}

/// The uplink as the engine sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct UplinkObs {
    /// A session with the hub (or the NATS cluster) is up; false while
    /// connecting or offline.
    pub connected: bool,
    /// When the current state began.
    pub since: Millis,
}

/// What the box looks like now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Commands waiting in the queue for their device.
    pub queued: u64,
    /// Commands delivered to their device and not yet acked.
    pub in_flight: u64,
    /// Commands in the dead letter.
    pub dead: u64,
    /// Every enrolled, unrevoked device.
    pub devices: Vec<DeviceObs>,
    /// When the oldest record waiting for the hub was made (none waiting:
    /// `None`).
    pub outbox_oldest: Option<Millis>,
    /// Bytes the data directory takes. The monitor measures it only when a
    /// disk rule exists (a directory walk), else leaves 0.
    pub disk_bytes: u64,
    /// The box's disk budget in bytes (`--max-disk`); `None` or 0: no budget,
    /// so no disk rule holds.
    pub max_disk: Option<u64>,
    /// `None`: the box has no uplink.
    pub uplink: Option<UplinkObs>,
    /// Devices whose bundle is in use on more than one live device.
    pub shared_bundles: Vec<String>,
}

/// Where a rule is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Inactive,
    Pending {
        since: Millis,
    },
    Firing {
        since: Millis,
    },
    /// Firing, but the condition has been false since `clear_since`.
    Clearing {
        since: Millis,
        clear_since: Millis,
    },
}

/// What a transition leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The condition holds; the rule waits out its `for`.
    Pending,
    /// The condition held for `for`: the alert fires.
    Firing,
    /// A firing alert's condition has been false for `clear_for`.
    Resolved,
    /// The condition went away while pending: it never fired.
    Inactive,
}

impl AlertState {
    /// The lowercase name, as serde writes it; logs and hook JSON use it.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
            AlertState::Inactive => "inactive",
        }
    }
}

/// A change of one rule's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The rule's name.
    pub name: String,
    /// The state the rule entered.
    pub state: AlertState,
    /// When (ms since the Unix epoch): the time of the observation that
    /// caused it.
    pub at: Millis,
    /// What the condition saw, for people: "160 live commands (limit 100)".
    pub detail: String,
}

/// An alert that is pending or firing, for `status`, the page and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertView {
    /// The rule's name.
    pub name: String,
    /// `pending` or `firing`.
    pub state: String,
    /// When it entered that state (ms since the epoch).
    pub since: Millis,
    /// What the condition saw at the last observation; while a firing alert
    /// clears, what it saw when it last held.
    pub detail: String,
}

struct Slot {
    rule: Rule,
    phase: Phase,
    detail: String,
    /// When the condition will become true with no further change (time
    /// rules), as of the last observation.
    due: Option<Millis>,
}

/// The rule engine.
pub struct Engine {
    slots: Vec<Slot>,
}

/// Evaluate one rule: (holds, detail, when it will hold if it does not yet).
fn evaluate(kind: &Kind, o: &Observation, now: Millis) -> (bool, String, Option<Millis>) {
    match kind {
        Kind::QueueDepthAbove(n) => {
            let depth = o.queued + o.in_flight;
            (
                depth > *n,
                format!("{depth} live commands (limit {n})"),
                None,
            )
        }
        Kind::DeadAbove(n) => (
            o.dead > *n,
            format!("{} dead commands (limit {n})", o.dead),
            None,
        ),
        Kind::BundleShared(n) => {
            let ids = &o.shared_bundles;
            let detail = match ids.len() {
                0 => "no bundle in use on more than one device".to_string(),
                k if k <= 5 => format!(
                    "bundle in use on more than one live device: {} (limit {n}); give each device its own bundle",
                    ids.join(", ")
                ),
                k => format!(
                    "bundle in use on more than one live device: {} and {} more (limit {n}); give each device its own bundle",
                    ids[..5].join(", "),
                    k - 5
                ),
            };
            (ids.len() as u64 > *n, detail, None)
        }
        Kind::DeviceOfflineLongerThan(d) => {
            let mut late: Vec<&str> = Vec::new();
            let mut due: Option<Millis> = None;
            for dev in o.devices.iter().filter(|d| !d.online) {
                let at = dev.since.saturating_add(*d);
                if now > at {
                    late.push(&dev.id);
                } else {
                    due = Some(due.map_or(at + 1, |x| x.min(at + 1)));
                }
            }
            let detail = match late.len() {
                0 => "every device online or recently seen".to_string(),
                n if n <= 5 => format!("offline > {}: {}", human(*d), late.join(", ")),
                n => format!(
                    "offline > {}: {} and {} more",
                    human(*d),
                    late[..5].join(", "),
                    n - 5
                ),
            };
            (!late.is_empty(), detail, due)
        }
        Kind::OutboxLagAbove(d) => match o.outbox_oldest {
            None => (false, "outbox empty".into(), None),
            Some(t) => {
                let lag = now.saturating_sub(t);
                (
                    lag > *d,
                    format!("outbox lag {} (limit {})", human(lag), human(*d)),
                    (lag <= *d).then(|| t + d + 1),
                )
            }
        },
        Kind::UplinkDownLongerThan(d) => match &o.uplink {
            None => (false, "no uplink".into(), None),
            Some(u) if u.connected => (false, "uplink connected".into(), None),
            Some(u) => {
                let down = now.saturating_sub(u.since);
                (
                    down > *d,
                    format!("uplink down for {} (limit {})", human(down), human(*d)),
                    (down <= *d).then(|| u.since + d + 1),
                )
            }
        },
        Kind::DiskAbove(p) => match o.max_disk {
            None | Some(0) => (false, "no max_disk".into(), None),
            Some(max) => {
                let used = o.disk_bytes as f64 * 100.0 / max as f64;
                (
                    used > *p,
                    format!("disk {used:.1}% of max_disk (limit {p}%)"),
                    None,
                )
            }
        },
    }
}

fn human(ms: Millis) -> String {
    // Whole seconds: the milliseconds are noise in an alert.
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

impl Engine {
    /// An engine over checked `rules`, every one inactive.
    pub fn new(rules: Vec<Rule>) -> Self {
        Engine {
            slots: rules
                .into_iter()
                .map(|rule| Slot {
                    rule,
                    phase: Phase::Inactive,
                    detail: String::new(),
                    due: None,
                })
                .collect(),
        }
    }

    /// No rules: the monitor then never evaluates.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The rule called `name`, if any (the monitor looks up its `exec`).
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.slots.iter().map(|s| &s.rule).find(|r| r.name == name)
    }

    /// Take an observation at `now`; return what changed.
    pub fn observe(&mut self, o: &Observation, now: Millis) -> Vec<Transition> {
        let mut out = Vec::new();
        for s in &mut self.slots {
            let (holds, detail, due) = evaluate(&s.rule.kind, o, now);
            s.due = due;
            let mut emit = |state, detail: &str| {
                out.push(Transition {
                    name: s.rule.name.clone(),
                    state,
                    at: now,
                    detail: detail.to_string(),
                })
            };
            // Loop so that a zero `for` goes straight through pending.
            loop {
                let next = match (s.phase, holds) {
                    (Phase::Inactive, true) => {
                        emit(AlertState::Pending, &detail);
                        Phase::Pending { since: now }
                    }
                    (Phase::Inactive, false) => Phase::Inactive,
                    (Phase::Pending { since }, true) if now >= since + s.rule.for_ms => {
                        emit(AlertState::Firing, &detail);
                        Phase::Firing { since: now }
                    }
                    (Phase::Pending { .. }, true) => s.phase,
                    (Phase::Pending { .. }, false) => {
                        emit(AlertState::Inactive, &detail);
                        Phase::Inactive
                    }
                    (Phase::Firing { .. }, true) => s.phase,
                    (Phase::Firing { since }, false) => Phase::Clearing {
                        since,
                        clear_since: now,
                    },
                    (Phase::Clearing { since, .. }, true) => Phase::Firing { since },
                    (Phase::Clearing { clear_since, .. }, false)
                        if now >= clear_since + s.rule.clear_for_ms =>
                    {
                        emit(AlertState::Resolved, &detail);
                        Phase::Inactive
                    }
                    (Phase::Clearing { .. }, false) => s.phase,
                };
                let moved = next != s.phase;
                s.phase = next;
                if !moved {
                    break;
                }
            }
            // Keep the detail of what fired while it clears: "0 dead" is
            // not what the operator needs to read on a firing alert.
            if holds || matches!(s.phase, Phase::Inactive) {
                s.detail = detail;
            }
        }
        out
    }

    /// When `observe` must be called again even if nothing changes.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.slots
            .iter()
            .filter_map(|s| {
                let wait = match s.phase {
                    Phase::Pending { since } => Some(since + s.rule.for_ms),
                    Phase::Clearing { clear_since, .. } => Some(clear_since + s.rule.clear_for_ms),
                    Phase::Inactive | Phase::Firing { .. } => None,
                };
                match (wait, s.due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    /// Pending and firing alerts, in rule order.
    pub fn alerts(&self) -> Vec<AlertView> {
        self.slots
            .iter()
            .filter_map(|s| {
                let (state, since) = match s.phase {
                    Phase::Inactive => return None,
                    Phase::Pending { since } => ("pending", since),
                    Phase::Firing { since } | Phase::Clearing { since, .. } => ("firing", since),
                };
                Some(AlertView {
                    name: s.rule.name.clone(),
                    state: state.into(),
                    since,
                    detail: s.detail.clone(),
                })
            })
            .collect()
    }

    /// The names of every rule, for metrics (a rule not firing is a 0).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.rule.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Millis = 1000;
    const M: Millis = 60 * S;

    fn rule(name: &str, kind: Kind, for_ms: Millis, clear_for_ms: Millis) -> Rule {
        Rule {
            name: name.into(),
            kind,
            for_ms,
            clear_for_ms,
            exec: None,
        }
    }

    fn states(t: &[Transition]) -> Vec<(&str, AlertState)> {
        t.iter().map(|t| (t.name.as_str(), t.state)).collect()
    }

    fn depth(n: u64) -> Observation {
        Observation {
            queued: n,
            ..Observation::default()
        }
    }

    #[test]
    fn queue_depth_goes_pending_then_fires_after_for_then_resolves_after_clear_for() {
        let mut e = Engine::new(vec![rule(
            "backlog",
            Kind::QueueDepthAbove(100),
            5 * M,
            2 * M,
        )]);
        let t0 = 1_000_000;
        assert!(e.observe(&depth(50), t0).is_empty());
        assert_eq!(e.next_deadline(), None, "nothing to wait for");
        let t = e.observe(&depth(150), t0 + M);
        assert_eq!(states(&t), [("backlog", AlertState::Pending)]);
        assert_eq!(e.next_deadline(), Some(t0 + 6 * M));
        assert_eq!(e.alerts()[0].state, "pending");
        // Still above, before `for` ends: nothing.
        assert!(e.observe(&depth(160), t0 + 5 * M).is_empty());
        let t = e.observe(&depth(160), t0 + 6 * M);
        assert_eq!(states(&t), [("backlog", AlertState::Firing)]);
        assert_eq!(t[0].detail, "160 live commands (limit 100)");
        assert_eq!(e.next_deadline(), None, "firing waits for a change");
        let a = e.alerts();
        assert_eq!((a[0].state.as_str(), a[0].since), ("firing", t0 + 6 * M));
        // Drops below: still firing during clear_for, with the old detail.
        assert!(e.observe(&depth(10), t0 + 7 * M).is_empty());
        assert_eq!(e.alerts()[0].state, "firing");
        assert_eq!(e.alerts()[0].detail, "160 live commands (limit 100)");
        assert_eq!(e.next_deadline(), Some(t0 + 9 * M));
        let t = e.observe(&depth(10), t0 + 9 * M);
        assert_eq!(states(&t), [("backlog", AlertState::Resolved)]);
        assert!(e.alerts().is_empty());
        assert_eq!(e.next_deadline(), None);
    }

    #[test]
    fn bundle_shared_fires_with_the_devices_named() {
        let r = RuleConfig {
            name: "shared".into(),
            kind: "bundle_shared".into(),
            value: toml::Value::Integer(0),
            for_: None,
            clear_for: None,
            exec: None,
        }
        .check(None)
        .unwrap();
        assert_eq!(r.kind, Kind::BundleShared(0));
        let mut e = Engine::new(vec![r]);
        let shared = |ids: &[&str]| Observation {
            shared_bundles: ids.iter().map(|s| s.to_string()).collect(),
            ..Observation::default()
        };
        assert!(e.observe(&shared(&[]), 0).is_empty());
        let t = e.observe(&shared(&["d1", "d2"]), M);
        assert_eq!(
            states(&t),
            [
                ("shared", AlertState::Pending),
                ("shared", AlertState::Firing)
            ]
        );
        assert!(t[1].detail.contains("d1, d2"), "{}", t[1].detail);
        let t = e.observe(&shared(&[]), 2 * M);
        assert_eq!(states(&t), [("shared", AlertState::Resolved)]);
    }

    #[test]
    fn hysteresis_a_flapping_value_neither_fires_early_nor_resolves() {
        let mut e = Engine::new(vec![rule("dead", Kind::DeadAbove(0), M, M)]);
        let dead = |n| Observation {
            dead: n,
            ..Observation::default()
        };
        let mut t = 0;
        // Above for 30 s, below, above again: `for` starts over.
        assert_eq!(
            states(&e.observe(&dead(1), t)),
            [("dead", AlertState::Pending)]
        );
        t += 30 * S;
        assert_eq!(
            states(&e.observe(&dead(0), t)),
            [("dead", AlertState::Inactive)]
        );
        t += S;
        assert_eq!(
            states(&e.observe(&dead(2), t)),
            [("dead", AlertState::Pending)]
        );
        t += 59 * S;
        assert!(e.observe(&dead(2), t).is_empty(), "for not over yet");
        t += S;
        assert_eq!(
            states(&e.observe(&dead(2), t)),
            [("dead", AlertState::Firing)]
        );
        // Below for 30 s, then above: stays firing, no new transition, and
        // the firing time is kept.
        let since = e.alerts()[0].since;
        t += S;
        assert!(e.observe(&dead(0), t).is_empty());
        t += 30 * S;
        assert!(e.observe(&dead(3), t).is_empty());
        assert_eq!(e.alerts()[0].since, since);
        assert_eq!(e.next_deadline(), None);
        // Below for the whole clear_for: resolved.
        t += S;
        assert!(e.observe(&dead(0), t).is_empty());
        t += M;
        assert_eq!(
            states(&e.observe(&dead(0), t)),
            [("dead", AlertState::Resolved)]
        );
    }

    #[test]
    fn zero_for_fires_at_once() {
        let mut e = Engine::new(vec![rule("dead", Kind::DeadAbove(0), 0, 0)]);
        let o = Observation {
            dead: 1,
            ..Observation::default()
        };
        assert_eq!(
            states(&e.observe(&o, 5)),
            [("dead", AlertState::Pending), ("dead", AlertState::Firing)]
        );
        assert_eq!(
            states(&e.observe(&Observation::default(), 6)),
            [("dead", AlertState::Resolved)]
        );
    }

    #[test]
    fn a_device_offline_too_long_fires_at_its_deadline_without_a_new_event() {
        let mut e = Engine::new(vec![rule(
            "offline",
            Kind::DeviceOfflineLongerThan(10 * M),
            0,
            0,
        )]);
        let o = Observation {
            devices: vec![
                DeviceObs {
                    id: "dev-1".into(),
                    online: true,
                    since: 0,
                },
                DeviceObs {
                    id: "dev-2".into(),
                    online: false,
                    since: 100 * M,
                },
            ],
            ..Observation::default()
        };
        assert!(e.observe(&o, 101 * M).is_empty());
        // The shell sleeps until exactly this instant.
        let at = e.next_deadline().unwrap();
        assert_eq!(at, 110 * M + 1);
        let t = e.observe(&o, at);
        assert_eq!(
            states(&t),
            [
                ("offline", AlertState::Pending),
                ("offline", AlertState::Firing)
            ]
        );
        assert_eq!(t[1].detail, "offline > 10m: dev-2");
        // It comes back: resolved.
        let mut back = o.clone();
        back.devices[1].online = true;
        assert_eq!(
            states(&e.observe(&back, at + S)),
            [("offline", AlertState::Resolved)]
        );
    }

    #[test]
    fn outbox_lag_and_uplink_down_grow_with_time() {
        let mut e = Engine::new(vec![
            rule("lag", Kind::OutboxLagAbove(5 * M), M, 0),
            rule("down", Kind::UplinkDownLongerThan(2 * M), 0, 0),
        ]);
        let o = Observation {
            outbox_oldest: Some(10 * M),
            uplink: Some(UplinkObs {
                connected: false,
                since: 10 * M,
            }),
            ..Observation::default()
        };
        assert!(e.observe(&o, 11 * M).is_empty());
        assert_eq!(e.next_deadline(), Some(12 * M + 1), "uplink first");
        assert_eq!(
            states(&e.observe(&o, 12 * M + 1)),
            [("down", AlertState::Pending), ("down", AlertState::Firing)]
        );
        assert_eq!(e.next_deadline(), Some(15 * M + 1), "then the lag");
        assert_eq!(
            states(&e.observe(&o, 15 * M + 1)),
            [("lag", AlertState::Pending)]
        );
        assert_eq!(e.next_deadline(), Some(16 * M + 1), "its `for`");
        assert_eq!(
            states(&e.observe(&o, 16 * M + 1)),
            [("lag", AlertState::Firing)]
        );
        // The uplink connects and drains the outbox: both resolve.
        let ok = Observation {
            uplink: Some(UplinkObs {
                connected: true,
                since: 17 * M,
            }),
            ..Observation::default()
        };
        let t = e.observe(&ok, 17 * M);
        assert_eq!(
            states(&t),
            [
                ("lag", AlertState::Resolved),
                ("down", AlertState::Resolved)
            ]
        );
    }

    #[test]
    fn disk_above_a_percentage_of_max_disk() {
        let mut e = Engine::new(vec![rule("disk", Kind::DiskAbove(90.0), 0, 0)]);
        let o = |b| Observation {
            disk_bytes: b,
            max_disk: Some(1000),
            ..Observation::default()
        };
        assert!(e.observe(&o(900), 1).is_empty());
        let t = e.observe(&o(950), 2);
        assert_eq!(t.last().unwrap().state, AlertState::Firing);
        assert_eq!(t[1].detail, "disk 95.0% of max_disk (limit 90%)");
    }

    #[test]
    fn tables_are_checked_with_clear_errors() {
        let parse = |s: &str| -> Vec<RuleConfig> {
            #[derive(Deserialize)]
            struct F {
                alert: Vec<RuleConfig>,
            }
            toml::from_str::<F>(s).unwrap().alert
        };
        let r = check_rules(
            &parse(
                r#"
                [[alert]]
                name = "backlog"
                kind = "queue_depth_above"
                value = 1000
                for = "5m"
                exec = "/usr/local/bin/page"
                [[alert]]
                name = "disk"
                kind = "disk_above"
                value = "90%"
                clear_for = "10m"
                [[alert]]
                name = "gone"
                kind = "device_offline_longer_than"
                value = "15m"
            "#,
            ),
            Some(1 << 30),
        )
        .unwrap();
        assert_eq!(r[0].kind, Kind::QueueDepthAbove(1000));
        assert_eq!((r[0].for_ms, r[0].clear_for_ms), (5 * M, 5 * M));
        assert_eq!(r[0].exec.as_deref(), Some("/usr/local/bin/page"));
        assert_eq!(r[1].kind, Kind::DiskAbove(90.0));
        assert_eq!((r[1].for_ms, r[1].clear_for_ms), (0, 10 * M));
        assert_eq!(r[2].kind, Kind::DeviceOfflineLongerThan(15 * M));

        let err = |s: &str, max| check_rules(&parse(s), max).unwrap_err().to_string();
        let e = err("[[alert]]\nname='x'\nkind='queue_depth'\nvalue=1", None);
        assert!(e.contains("unknown kind `queue_depth`"), "{e}");
        let e = err("[[alert]]\nname='x'\nkind='dead_above'\nvalue='ten'", None);
        assert!(e.contains("is not a count"), "{e}");
        let e = err(
            "[[alert]]\nname='x'\nkind='outbox_lag_above'\nvalue=5",
            None,
        );
        assert!(e.contains("is not a duration"), "{e}");
        let e = err("[[alert]]\nname='x'\nkind='disk_above'\nvalue=90", None);
        assert!(e.contains("needs max_disk"), "{e}");
        let e = err(
            "[[alert]]\nname='x'\nkind='dead_above'\nvalue=1\nfor='soon'",
            None,
        );
        assert!(e.contains("for = \"soon\" is not a duration"), "{e}");
        let e = err(
            "[[alert]]\nname='x'\nkind='dead_above'\nvalue=1\n[[alert]]\nname='x'\nkind='dead_above'\nvalue=2",
            None,
        );
        assert!(e.contains("used by another rule"), "{e}");
    }
}

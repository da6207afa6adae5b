//! A rollout's plan: what goes to which devices, how fast, and when to
//! stop. Written as a TOML file (`outpost rollout start FILE.toml`) or as
//! flags for the common case; both end as one checked [`Plan`], which is
//! what the box keeps.
//!
//! ```toml
//! name = "fw-2.1"
//! target = "tag:line-3"            # or a list: ["dev-1", "tag:spare"]
//! payload = "flash"                # or payload_file = "cmd.json"
//! artifact = "fw@2.1"
//! timeout = "10m"                  # per device, from when it takes it
//! max_attempts = 1                 # the default: a failure is final
//! success = { result_contains = "ok" }
//! health = "5m"                    # then a healthy report within 5 min
//! on_abort = { payload = "rollback" }
//! [canary]
//! size = 2                         # or "10%"
//! wait = "10m"                     # without: pause for `rollout resume`
//! [rate]
//! per_minute = 10
//! factor = 2.0                     # exponential: ×2 after every 5 successes
//! every = 5
//! max_per_minute = 100
//! [[abort]]
//! on = "failed"                    # failed, rejected, timed_out or any
//! percent = 20
//! min = 5
//! ```

use crate::engine::command::Priority;
use crate::engine::workflow::{ResultMatch, ResultSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;

/// The largest inline payload a rollout carries: the plan is kept whole in
/// the box's store and rewritten as the rollout moves; a file goes as an
/// artifact (`--artifact`).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The most devices one rollout spans.
pub const MAX_DEVICES: usize = 100_000;

/// Why a plan is refused; the message names the key and what to write.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct PlanError {
    /// The plan file as the caller named it.
    pub file: String,
    /// What is wrong, naming the key.
    pub message: String,
}

/// A number of devices, or a share of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Size {
    /// This many devices, at least 1 (all of them if fewer).
    Count(u32),
    /// This share of the devices, 1 to 100 percent, rounded up.
    Percent(u32),
}

impl Size {
    /// `3` or `10%`.
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let bad = || format!("`{s}` is not a number of devices: write e.g. 3 or 10%");
        match t.strip_suffix('%') {
            Some(p) => {
                let p: u32 = p.trim().parse().map_err(|_| bad())?;
                if p == 0 || p > 100 {
                    return Err(format!("`{s}`: a share is 1% to 100%"));
                }
                Ok(Size::Percent(p))
            }
            None => match t.parse::<u32>() {
                Ok(0) => Err(format!("`{s}`: give at least 1 device")),
                Ok(n) => Ok(Size::Count(n)),
                Err(_) => Err(bad()),
            },
        }
    }

    /// How many of `total` devices (a share rounds up: 10% of 5 is 1).
    pub fn of(self, total: usize) -> usize {
        match self {
            Size::Count(n) => (n as usize).min(total),
            Size::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Count(n) => write!(f, "{n}"),
            Size::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The canary: the first devices to start, then a wait or a manual resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    /// How many devices it is, of those the target resolved to.
    pub size: Size,
    /// `None`: pause until `rollout resume`.
    pub wait: Option<Duration>,
}

/// How fast devices start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Devices a minute at the start.
    pub per_minute: u32,
    /// Exponential: the rate is multiplied by `factor` after every `every`
    /// successes, up to `max_per_minute`.
    pub factor: Option<f64>,
    /// Successes between two steps of an exponential rate (at least 1).
    pub every: u32,
    /// The cap on an exponential rate, in devices a minute (`None`: no
    /// cap).
    pub max_per_minute: Option<u32>,
}

impl Rate {
    /// `10/min`, `10` (a minute), `2/s`, `600/h`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || format!("`{s}` is not a rate: write e.g. 10/min (devices a minute)");
        let (n, per) = s.trim().split_once('/').unwrap_or((s.trim(), "min"));
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        let per_minute = match per.trim() {
            "min" | "m" | "minute" => Some(n),
            "s" | "sec" | "second" => n.checked_mul(60),
            "h" | "hour" => (n >= 60).then_some(n / 60),
            _ => return Err(bad()),
        };
        match per_minute {
            Some(p) if p > 0 => Ok(Rate {
                per_minute: p,
                factor: None,
                every: 1,
                max_per_minute: None,
            }),
            _ => Err(format!(
                "`{s}`: a rate is at least 1 device a minute and at most {} a minute",
                u32::MAX
            )),
        }
    }

    /// Devices a minute after `ok` successes.
    pub fn at(&self, ok: u32) -> f64 {
        let base = self.per_minute as f64;
        let r = match self.factor {
            Some(f) => base * f.powi((ok / self.every.max(1)).min(1_000) as i32),
            None => base,
        };
        match self.max_per_minute {
            Some(m) => r.min(m as f64),
            None => r,
        }
        .max(1.0)
    }
}

/// A kind of failure an abort rule counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailKind {
    /// Devices that end `failed` (an unmet `success` or an unhealthy
    /// report too).
    Failed,
    /// Devices that refused the command.
    Rejected,
    /// Devices that end `timed_out`.
    TimedOut,
    /// Any of the three.
    Any,
}

impl FailKind {
    /// From an abort rule's `on` (`failed`, `rejected`, `timed_out` or
    /// `timeout`, `any`).
    pub fn parse(s: &str) -> Result<FailKind, String> {
        match s {
            "failed" => Ok(FailKind::Failed),
            "rejected" => Ok(FailKind::Rejected),
            "timed_out" | "timeout" => Ok(FailKind::TimedOut),
            "any" => Ok(FailKind::Any),
            _ => Err(format!(
                "abort.on `{s}`: use failed, rejected, timed_out or any"
            )),
        }
    }

    /// As the abort's reason words it (`Any` reads "failed in any way").
    pub fn as_str(self) -> &'static str {
        match self {
            FailKind::Failed => "failed",
            FailKind::Rejected => "rejected",
            FailKind::TimedOut => "timed_out",
            FailKind::Any => "failed in any way",
        }
    }
}

/// Stop when this kind of failure reaches `percent` of the finished
/// devices, once at least `min` have finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortRule {
    /// The kind of failure it counts.
    pub on: FailKind,
    /// The share of the finished devices that trips it, 0 to 100.
    pub percent: u32,
    /// How many devices must have finished before it applies (lowered to
    /// the canary's size when the canary ends).
    pub min: u32,
}

impl std::fmt::Display for AbortRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = match self.on {
            FailKind::Any => "any",
            k => k.as_str(),
        };
        write!(f, "{on} >= {}% (min {})", self.percent, self.min)
    }
}

/// A checked rollout plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// What `rollout show` and `list` call it (1 to 255 bytes; a file's
    /// stem when the file gives none).
    pub name: String,
    /// Targets as written (a device, `tag:…`, `cap:…`); the devices are
    /// their union, resolved when the rollout starts.
    pub target: Vec<String>,
    /// The bytes each device's command carries (at most `MAX_PAYLOAD`;
    /// may be empty when there is an artifact).
    pub payload: Vec<u8>,
    /// The artifact, as written; the box pins it to a digest at start.
    pub artifact: Option<String>,
    /// The devices' commands' priority (`normal` unless the plan says).
    pub priority: Priority,
    /// Attempts a device gets at its command (default 1: a failure is the
    /// device's answer, which the abort rules count, not a cue to run a
    /// flash again).
    pub max_attempts: u32,
    /// The first devices to start, then a wait or a pause (`None`: no
    /// canary).
    pub canary: Option<Canary>,
    /// How fast devices start (`None`: as fast as `parallel` and their
    /// presence allow).
    pub rate: Option<Rate>,
    /// At most this many devices started and not finished at once.
    #[serde(default)]
    pub parallel: Option<u32>,
    /// The abort rules; the first that trips aborts the rollout.
    pub abort: Vec<AbortRule>,
    /// Per device, from when it takes the command.
    pub timeout: Option<Duration>,
    /// What a succeeded command's result must meet for its device to
    /// count as succeeded (`None`: its success is enough).
    pub success: Option<ResultMatch>,
    /// After its command succeeded, a device must report healthy
    /// (`command::HealthReport`) within this time.
    #[serde(default)]
    pub health: Option<Duration>,
    /// The rollback's payload, sent on abort to the devices that took it.
    pub on_abort: Option<Vec<u8>>,
    /// For targets through boxes below (`edge-1/tag:…`): how the edges are
    /// taken, each edge running the rest of the plan over its devices.
    #[serde(default)]
    pub edges: Option<EdgePlan>,
}

/// How a rollout through boxes below takes its edges: each edge is one
/// "device" of the hub's rollout, which hands it the plan and counts it
/// as succeeded when its own rollout completes, failed when it aborts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgePlan {
    /// The first edges to take the plan, then a wait or a pause.
    pub canary: Option<Canary>,
    /// How fast edges start, in edges a minute.
    pub rate: Option<Rate>,
    /// Edges running at once [default 1: edge by edge].
    pub parallel: Option<u32>,
    /// Abort rules over the edges (an edge whose rollout aborted counts as
    /// failed).
    pub abort: Vec<AbortRule>,
    /// Per edge, from when it takes the plan.
    pub timeout: Option<Duration>,
}

/// A plan through boxes below, split: the hub's own plan over the edges,
/// and for each edge the plan it runs over its devices.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// The hub's plan over the edges: the targets as written, with the
    /// `edges` settings in place of the devices' and no `success` or
    /// `health`.
    pub hub: Plan,
    /// (edge, its plan), in the order the targets name them.
    pub edges: Vec<(String, Plan)>,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    name: Option<String>,
    target: OneOrMany,
    payload: Option<String>,
    payload_file: Option<String>,
    artifact: Option<String>,
    priority: Option<String>,
    max_attempts: Option<u32>,
    timeout: Option<String>,
    success: Option<ResultSpec>,
    health: Option<String>,
    on_abort: Option<PayloadSpec>,
    canary: Option<CanarySpec>,
    rate: Option<RateSpec>,
    parallel: Option<u32>,
    #[serde(default)]
    abort: Vec<AbortSpec>,
    edges: Option<EdgeSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgeSpec {
    canary: Option<CanarySpec>,
    rate: Option<RateSpec>,
    parallel: Option<u32>,
    #[serde(default)]
    abort: Vec<AbortSpec>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Count(u32),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadSpec {
    payload: Option<String>,
    payload_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CanarySpec {
    size: SizeSpec,
    wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateSpec {
    per_minute: u32,
    factor: Option<f64>,
    every: Option<u32>,
    max_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortSpec {
    on: String,
    percent: u32,
    #[serde(default)]
    min: u32,
}

impl Plan {
    /// Read a plan file. `read` fetches a `payload_file` (named relative to
    /// the plan; the caller resolves it), so this stays free of IO.
    pub fn parse(
        text: &str,
        file: &str,
        read: impl Fn(&str) -> Result<Vec<u8>, String>,
    ) -> Result<Plan, PlanError> {
        let err = |message: String| PlanError {
            file: file.to_string(),
            message,
        };
        let spec: FileSpec = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let payload_of =
            |inline: Option<String>, path: Option<String>, key: &str| match (inline, path) {
                (Some(_), Some(_)) => {
                    Err(format!("give {key}payload or {key}payload_file, not both"))
                }
                (Some(p), None) => Ok(Some(p.into_bytes())),
                (None, Some(f)) => read(&f)
                    .map(Some)
                    .map_err(|e| format!("{key}payload_file {f:?}: {e}")),
                (None, None) => Ok(None),
            };
        let payload = payload_of(spec.payload, spec.payload_file, "").map_err(err)?;
        let on_abort = match spec.on_abort {
            Some(p) => Some(
                payload_of(p.payload, p.payload_file, "on_abort.")
                    .map_err(err)?
                    .ok_or_else(|| err("on_abort needs a payload or a payload_file".into()))?,
            ),
            None => None,
        };
        let duration = |key: &str, v: Option<String>| {
            v.map(|v| crate::engine::duration::parse(&v).map_err(|e| err(format!("{key}: {e}"))))
                .transpose()
        };
        let canary_of = |c: Option<CanarySpec>, key: &str| -> Result<Option<Canary>, PlanError> {
            let Some(c) = c else { return Ok(None) };
            Ok(Some(Canary {
                size: match c.size {
                    SizeSpec::Count(n) => Size::parse(&n.to_string()),
                    SizeSpec::Text(t) => Size::parse(&t),
                }
                .map_err(|e| err(format!("{key}canary.size: {e}")))?,
                wait: duration(&format!("{key}canary.wait"), c.wait)?,
            }))
        };
        let rate_of = |r: Option<RateSpec>| {
            r.map(|r| Rate {
                per_minute: r.per_minute,
                factor: r.factor,
                every: r.every.unwrap_or(1),
                max_per_minute: r.max_per_minute,
            })
        };
        let abort_of = |a: Vec<AbortSpec>| {
            a.into_iter()
                .map(|a| {
                    Ok(AbortRule {
                        on: FailKind::parse(&a.on)?,
                        percent: a.percent,
                        min: a.min,
                    })
                })
                .collect::<Result<Vec<_>, String>>()
                .map_err(err)
        };
        let canary = canary_of(spec.canary, "")?;
        let rate = rate_of(spec.rate);
        let abort = abort_of(spec.abort)?;
        let edges = match spec.edges {
            Some(e) => Some(EdgePlan {
                canary: canary_of(e.canary, "edges.")?,
                rate: rate_of(e.rate),
                parallel: e.parallel,
                abort: abort_of(e.abort)?,
                timeout: duration("edges.timeout", e.timeout)?,
            }),
            None => None,
        };
        let priority = match spec.priority {
            Some(p) => p
                .parse::<Priority>()
                .map_err(|e| err(format!("priority: {e}")))?,
            None => Priority::Normal,
        };
        let plan = Plan {
            name: spec.name.unwrap_or_else(|| default_name(file)),
            target: match spec.target {
                OneOrMany::One(t) => vec![t],
                OneOrMany::Many(ts) => ts,
            },
            payload: payload.unwrap_or_default(),
            artifact: spec.artifact,
            priority,
            max_attempts: spec.max_attempts.unwrap_or(1),
            canary,
            rate,
            parallel: spec.parallel,
            abort,
            timeout: duration("timeout", spec.timeout)?,
            success: spec
                .success
                .map(|s| s.check("success."))
                .transpose()
                .map_err(err)?
                .flatten(),
            health: duration("health", spec.health)?,
            on_abort,
            edges,
        };
        plan.check().map_err(err)?;
        Ok(plan)
    }

    /// What makes a plan unusable, whoever built it (a file, flags, or the
    /// admin API: the box checks again).
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > crate::engine::route::MAX_NAME {
            return Err("name: give 1 to 255 bytes".into());
        }
        if self.target.is_empty() {
            return Err("target: name the devices (a device id, tag:…, cap:…, or a list)".into());
        }
        let mut through = 0;
        for t in &self.target {
            match crate::engine::route::Target::parse(t) {
                Ok(edge @ crate::engine::route::Target::Edge { .. }) => {
                    through += 1;
                    if edge.last() == crate::engine::route::Target::Device(super::ROLLOUT) {
                        return Err(format!("target `{t}`: name the devices below the edge (edge-1/tag:line-3), not its runner"));
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(format!("target: {e}")),
            }
        }
        if through > 0 && through < self.target.len() {
            return Err("target: give devices on this box or devices through boxes below (edge-1/…), not both in one rollout".into());
        }
        if through == 0 && self.edges.is_some() {
            return Err("edges: only for targets through boxes below (edge-1/tag:…)".into());
        }
        if self.parallel == Some(0) || self.edges.as_ref().is_some_and(|e| e.parallel == Some(0)) {
            return Err("parallel: at least 1".into());
        }
        if self.payload.is_empty() && self.artifact.is_none() {
            return Err(
                "give a payload, a payload_file or an artifact: the rollout has nothing to send"
                    .into(),
            );
        }
        if self.payload.len() > MAX_PAYLOAD
            || self
                .on_abort
                .as_ref()
                .is_some_and(|p| p.len() > MAX_PAYLOAD)
        {
            return Err(format!(
                "a rollout's payload is at most {} KiB; send a file as an artifact (`outpost artifact add`, then artifact = \"name@version\")",
                MAX_PAYLOAD / 1024
            ));
        }
        for r in self
            .rate
            .iter()
            .chain(self.edges.iter().flat_map(|e| e.rate.iter()))
        {
            if r.per_minute == 0 {
                return Err("rate.per_minute: at least 1 device a minute".into());
            }
            if let Some(f) = r.factor {
                if !(f.is_finite() && (1.0..=100.0).contains(&f)) {
                    return Err(format!("rate.factor {f}: a factor from 1 to 100"));
                }
            }
            if r.every == 0 {
                return Err("rate.every: at least 1 success between steps".into());
            }
            if r.max_per_minute.is_some_and(|m| m < r.per_minute) {
                return Err("rate.max_per_minute is below rate.per_minute".into());
            }
        }
        for a in self
            .abort
            .iter()
            .chain(self.edges.iter().flat_map(|e| e.abort.iter()))
        {
            if a.percent > 100 {
                return Err(format!(
                    "abort.percent {}: a share from 0 to 100",
                    a.percent
                ));
            }
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err(format!("max_attempts {}: from 1 to 100", self.max_attempts));
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err("timeout: give a time above 0 (e.g. 10m), or leave it out".into());
        }
        Ok(())
    }
}

impl Plan {
    /// Whether the targets are through boxes below.
    pub fn through_edges(&self) -> bool {
        self.target.iter().any(|t| {
            matches!(
                crate::engine::route::Target::parse(t),
                Ok(crate::engine::route::Target::Edge { .. })
            )
        })
    }

    /// Split a plan through boxes below into the hub's plan over the
    /// edges and each edge's plan over its devices (`None`: the targets
    /// are on this box). The hub's plan takes `edges` (edge by edge unless
    /// it says otherwise) and succeeds on an edge's completion, so it has
    /// no result condition of its own; each edge's plan is this one, with
    /// the targets below that edge.
    pub fn split(&self) -> Option<Split> {
        if !self.through_edges() {
            return None;
        }
        let mut edges: Vec<(String, Plan)> = Vec::new();
        for t in &self.target {
            let Ok(crate::engine::route::Target::Edge { edge, rest }) =
                crate::engine::route::Target::parse(t)
            else {
                continue;
            };
            match edges.iter_mut().find(|(e, _)| e == edge) {
                Some((_, p)) => p.target.push(rest.to_string()),
                None => edges.push((
                    edge.to_string(),
                    Plan {
                        target: vec![rest.to_string()],
                        edges: None,
                        ..self.clone()
                    },
                )),
            }
        }
        let e = self.edges.clone().unwrap_or_default();
        let hub = Plan {
            target: self.target.clone(),
            canary: e.canary,
            rate: e.rate,
            parallel: Some(e.parallel.unwrap_or(1)),
            abort: e.abort,
            timeout: e.timeout,
            success: None,
            health: None,
            // An edge's own rollout retries nothing either.
            max_attempts: 1,
            ..self.clone()
        };
        Some(Split { hub, edges })
    }
}

/// A plan's name when it gives none: its file's stem.
fn default_name(file: &str) -> String {
    let base = file.rsplit(['/', '\\']).next().unwrap_or(file);
    let stem = base.strip_suffix(".toml").unwrap_or(base);
    if stem.is_empty() {
        "rollout".into()
    } else {
        stem.to_string()
    }
}

/// The devices a plan's targets name (from the box's devices `all`), in order, each once: enrolled
/// and not revoked (a named device that is not is an error).
pub fn resolve(
    targets: &[String],
    all: &[crate::engine::queue::core::DeviceView],
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for t in targets {
        let mut matched: Vec<String> = match crate::engine::route::Target::parse(t) {
            Ok(crate::engine::route::Target::Device(d)) => {
                match all.iter().find(|v| v.record.id.as_str() == d) {
                    Some(v) if !v.record.revoked => vec![d.to_string()],
                    Some(_) => return Err(format!("device {d} is revoked; take it out of the target")),
                    None => return Err(format!("no device {d} is enrolled on this box (`outpost devices` lists them)")),
                }
            }
            Ok(crate::engine::route::Target::Tag(tag)) => all
                .iter()
                .filter(|v| !v.record.revoked && v.record.tags.iter().any(|x| x == tag))
                .map(|v| v.record.id.to_string())
                .collect(),
            Ok(crate::engine::route::Target::Cap(cap)) => all
                .iter()
                .filter(|v| !v.record.revoked && v.record.caps.iter().any(|x| x == cap))
                .map(|v| v.record.id.to_string())
                .collect(),
            Ok(crate::engine::route::Target::Edge { .. }) => {
                return Err(format!("target `{t}`: a rollout through a box below is not built yet; start it on that box"))
            }
            Err(e) => return Err(e.to_string()),
        };
        matched.sort();
        out.extend(matched.into_iter().filter(|d| seen.insert(d.clone())));
    }
    if out.is_empty() {
        return Err(format!(
            "the target {} matches no enrolled device",
            targets.join(", ")
        ));
    }
    if out.len() > MAX_DEVICES {
        return Err(format!(
            "the target matches {} devices; a rollout spans at most {}: split it",
            out.len(),
            MAX_DEVICES
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Plan, PlanError> {
        Plan::parse(text, "r.toml", |f| Ok(format!("<{f}>").into_bytes()))
    }

    #[test]
    fn a_full_file_reads_into_a_plan() {
        let p = parse(
            r#"
            name = "fw"
            target = ["dev-1", "tag:line-3"]
            payload_file = "cmd.json"
            artifact = "fw@2.1"
            timeout = "10m"
            success = { result_contains = "ok" }
            on_abort = { payload = "rollback" }
            [canary]
            size = "10%"
            wait = "5m"
            [rate]
            per_minute = 10
            factor = 2.0
            every = 5
            max_per_minute = 100
            [[abort]]
            on = "failed"
            percent = 20
            min = 5
            [[abort]]
            on = "timed_out"
            percent = 50
            "#,
        )
        .unwrap();
        assert_eq!(p.name, "fw");
        assert_eq!(p.target, vec!["dev-1", "tag:line-3"]);
        assert_eq!(p.payload, b"<cmd.json>");
        assert_eq!(p.canary.as_ref().unwrap().size, Size::Percent(10));
        assert_eq!(
            p.canary.as_ref().unwrap().wait,
            Some(Duration::from_secs(300))
        );
        assert_eq!(p.rate.as_ref().unwrap().at(0), 10.0);
        assert_eq!(p.rate.as_ref().unwrap().at(5), 20.0);
        assert_eq!(p.rate.as_ref().unwrap().at(50), 100.0);
        assert_eq!(p.abort.len(), 2);
        assert_eq!(p.abort[1].on, FailKind::TimedOut);
        assert_eq!(p.abort[0].to_string(), "failed >= 20% (min 5)");
        assert_eq!(p.success, Some(ResultMatch::Contains("ok".into())));
        assert_eq!(p.on_abort.as_deref(), Some(&b"rollback"[..]));
    }

    #[test]
    fn mistakes_are_refused_naming_the_key() {
        for (text, want) in [
            ("target = \"dev-1\"", "nothing to send"),
            ("payload = \"x\"", "target"),
            ("target = [\"e/dev-1\", \"dev-2\"]\npayload = \"x\"", "not both"),
            ("target = \"e/rollout\"\npayload = \"x\"", "not its runner"),
            ("target = \"dev-2\"\npayload = \"x\"\n[edges]\nparallel = 2", "edges: only"),
            ("target = \"tag:\"\npayload = \"x\"", "target"),
            ("target = \"d\"\npayload = \"x\"\n[canary]\nsize = \"0%\"", "canary.size"),
            ("target = \"d\"\npayload = \"x\"\n[canary]\nsize = 1\nwait = \"soon\"", "canary.wait"),
            ("target = \"d\"\npayload = \"x\"\n[[abort]]\non = \"bad\"\npercent = 1", "abort.on"),
            ("target = \"d\"\npayload = \"x\"\n[[abort]]\non = \"any\"\npercent = 101", "abort.percent"),
            ("target = \"d\"\npayload = \"x\"\n[rate]\nper_minute = 0", "rate.per_minute"),
            ("target = \"d\"\npayload = \"x\"\n[rate]\nper_minute = 5\nfactor = 0.5", "rate.factor"),
            ("target = \"d\"\npayload = \"x\"\npayload_file = \"f\"", "not both"),
            ("target = \"d\"\npayload = \"x\"\nsuccess = { result_equals = \"a\", result_contains = \"b\" }", "one result condition"),
            ("target = \"d\"\npayload = \"x\"\nspeed = 3", "speed"),
            ("target = \"d\"\npayload = \"x\"\ntimeout = \"0s\"", "timeout"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with("r.toml: "), "{e}");
        }
        let big = format!(
            "target = \"d\"\npayload = \"{}\"",
            "x".repeat(MAX_PAYLOAD + 1)
        );
        assert!(parse(&big).unwrap_err().to_string().contains("artifact"));
    }

    #[test]
    fn sizes_and_rates_read_as_people_write_them() {
        assert_eq!(Size::parse("3"), Ok(Size::Count(3)));
        assert_eq!(Size::parse("25%"), Ok(Size::Percent(25)));
        assert!(Size::parse("0").is_err());
        assert!(Size::parse("three").is_err());
        assert_eq!(Size::Percent(10).of(5), 1);
        assert_eq!(Size::Percent(50).of(5), 3);
        assert_eq!(Size::Count(9).of(5), 5);
        assert_eq!(Rate::parse("10/min").unwrap().per_minute, 10);
        assert_eq!(Rate::parse("12").unwrap().per_minute, 12);
        assert_eq!(Rate::parse("2/s").unwrap().per_minute, 120);
        assert_eq!(Rate::parse("600/h").unwrap().per_minute, 10);
        assert!(Rate::parse("10/week").is_err());
        assert!(Rate::parse("0/min").is_err());
        assert!(Rate::parse("30/h").is_err());
        assert_eq!(default_name("dir/fw-2.1.toml"), "fw-2.1");
    }
}

//! `outpost rollout …`: start, show, list, pause, resume, abort.

use super::*;
use crate::engine::rollout::{AbortRule, Canary, FailKind, Plan, Rate, Size};
use crate::shell::rollout::{RolloutView, Verb};

/// `outpost rollout …`.
#[derive(Debug, clap::Subcommand)]
pub enum RolloutCmd {
    /// Start a rollout from a plan file (TOML), or from flags for the
    /// common case. Prints its id.
    Start(Box<StartArgs>),
    /// Counts by state, the rule that tripped, each device's state and
    /// result.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Every rollout the box keeps, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Start no new device until `resume` (started ones go on).
    Pause { id: String },
    /// Go on after a pause or the canary.
    Resume { id: String },
    /// Stop: nothing new starts, what has not started is cancelled, and
    /// the plan's on_abort command goes to the devices that took it.
    Abort { id: String },
}

/// `outpost rollout start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// A plan file (see the README); without one, the flags are the plan.
    pub file: Option<PathBuf>,
    /// Who gets it: a device, tag:…, cap:… (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub target: Vec<String>,
    /// The command's payload (text).
    #[arg(long)]
    pub payload: Option<String>,
    /// The command's payload, read from a file.
    #[arg(long, value_name = "FILE", conflicts_with = "payload")]
    pub payload_file: Option<PathBuf>,
    /// An artifact the command carries (name@version, name, or sha256:…).
    #[arg(long)]
    pub artifact: Option<String>,
    /// A name for `rollout list` [default: the artifact, or "rollout"].
    #[arg(long)]
    pub name: Option<String>,
    /// Start N devices (or N %) first, then pause for `rollout resume`
    /// (or wait --canary-wait).
    #[arg(long, value_parser = Size::parse, value_name = "N|N%")]
    pub canary: Option<Size>,
    /// After the canary, go on by itself after this long.
    #[arg(long, requires = "canary", value_name = "D")]
    pub canary_wait: Option<crate::engine::duration::DurationArg>,
    /// At most this many devices a minute: 10/min, 1/s, 600/h.
    #[arg(long, value_parser = Rate::parse, value_name = "N/min")]
    pub rate: Option<Rate>,
    /// Exponential rate: multiply it by F after every --rate-every
    /// successes.
    #[arg(long, requires = "rate", value_name = "F")]
    pub rate_factor: Option<f64>,
    #[arg(long, requires = "rate_factor", value_name = "K")]
    pub rate_every: Option<u32>,
    /// The most devices a minute an exponential rate reaches.
    #[arg(long, requires = "rate", value_name = "N")]
    pub rate_max: Option<u32>,
    /// At most N devices started and not finished at once.
    #[arg(long, value_name = "N")]
    pub parallel: Option<u32>,
    /// Through boxes below (edge-1/…): at most this many edges a minute.
    #[arg(long, value_parser = Rate::parse, value_name = "N/min")]
    pub edge_rate: Option<Rate>,
    /// Through boxes below: edges running at once [default 1].
    #[arg(long, value_name = "N")]
    pub edge_parallel: Option<u32>,
    /// Through boxes below: abort when this share of the finished edges
    /// aborted their own rollout.
    #[arg(long, value_parser = percent, value_name = "PCT")]
    pub edge_abort_failed: Option<u32>,
    /// Through boxes below: the edge rule applies once this many edges
    /// have finished.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub edge_abort_min: u32,
    /// Abort when this share of the finished devices failed.
    #[arg(long, value_parser = percent, value_name = "PCT")]
    pub abort_failed: Option<u32>,
    /// Abort when this share rejected it.
    #[arg(long, value_parser = percent, value_name = "PCT")]
    pub abort_rejected: Option<u32>,
    /// Abort when this share timed out.
    #[arg(long, value_parser = percent, value_name = "PCT")]
    pub abort_timed_out: Option<u32>,
    /// Abort when this share failed in any way.
    #[arg(long, value_parser = percent, value_name = "PCT")]
    pub abort_any: Option<u32>,
    /// The abort rules apply once this many devices have finished.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub abort_min: u32,
    /// Per device, from when it takes the command: later is timed_out.
    #[arg(long, value_name = "D")]
    pub timeout: Option<crate::engine::duration::DurationArg>,
    /// Success is a result containing this text (else any success).
    #[arg(long, value_name = "TEXT")]
    pub success_contains: Option<String>,
    /// After its command succeeded, a device must report healthy (the
    /// agent's --health) within this long, or it is timed_out.
    #[arg(long, value_name = "D")]
    pub health_within: Option<crate::engine::duration::DurationArg>,
    /// The rollback's payload, sent on abort to the devices that took it.
    #[arg(long, value_name = "PAYLOAD")]
    pub on_abort: Option<String>,
    #[arg(long)]
    pub priority: Option<Priority>,
    /// Attempts each device gets (default 1: a failure is final and counts).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Wait for the end (without a value, however long it takes): exit 0
    /// if it completed, 6 if it aborted, 4 if TIMEOUT came first.
    #[arg(long, num_args = 0..=1, value_name = "TIMEOUT")]
    pub wait: Option<Option<crate::engine::duration::DurationArg>>,
    #[arg(long)]
    pub json: bool,
}

/// `20` or `20%`.
fn percent(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a share: write e.g. 20 or 20%"))?;
    if n > 100 {
        return Err(format!("`{s}`: a share is 0 to 100"));
    }
    Ok(n)
}

impl StartArgs {
    /// Whether any flag that makes a plan was given (a file excludes them).
    fn has_plan_flags(&self) -> bool {
        !self.target.is_empty()
            || self.payload.is_some()
            || self.payload_file.is_some()
            || self.artifact.is_some()
            || self.name.is_some()
            || self.canary.is_some()
            || self.rate.is_some()
            || self.abort_failed.is_some()
            || self.abort_rejected.is_some()
            || self.abort_timed_out.is_some()
            || self.abort_any.is_some()
            || self.timeout.is_some()
            || self.success_contains.is_some()
            || self.on_abort.is_some()
            || self.priority.is_some()
            || self.max_attempts.is_some()
            || self.health_within.is_some()
            || self.parallel.is_some()
            || self.edge_rate.is_some()
            || self.edge_parallel.is_some()
            || self.edge_abort_failed.is_some()
    }

    /// The edge flags, as a plan's `edges` (`None` if none was given).
    fn edge_plan(&self) -> Option<crate::engine::rollout::EdgePlan> {
        if self.edge_rate.is_none()
            && self.edge_parallel.is_none()
            && self.edge_abort_failed.is_none()
        {
            return None;
        }
        Some(crate::engine::rollout::EdgePlan {
            rate: self.edge_rate.clone(),
            parallel: self.edge_parallel,
            abort: self
                .edge_abort_failed
                .map(|percent| AbortRule {
                    on: FailKind::Any,
                    percent,
                    min: self.edge_abort_min,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        })
    }

    /// The plan these arguments give, or a usage error.
    pub fn plan(&self) -> Result<Plan, String> {
        if let Some(file) = &self.file {
            if self.has_plan_flags() {
                return Err(format!(
                    "give a plan file or plan flags, not both ({} is the plan; put the rest in it)",
                    file.display()
                ));
            }
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let dir = file.parent().unwrap_or(Path::new("."));
            return Plan::parse(&text, &file.display().to_string(), |f| {
                std::fs::read(dir.join(f)).map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string());
        }
        if self.target.is_empty() {
            return Err("give a plan file, or --target (and --payload or --artifact)".into());
        }
        let payload = match (&self.payload, &self.payload_file) {
            (Some(p), _) => p.clone().into_bytes(),
            (None, Some(f)) => {
                std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
            }
            (None, None) => Vec::new(),
        };
        let mut abort = Vec::new();
        for (pct, on) in [
            (self.abort_failed, FailKind::Failed),
            (self.abort_rejected, FailKind::Rejected),
            (self.abort_timed_out, FailKind::TimedOut),
            (self.abort_any, FailKind::Any),
        ] {
            if let Some(percent) = pct {
                abort.push(AbortRule {
                    on,
                    percent,
                    min: self.abort_min,
                });
            }
        }
        let rate = self.rate.clone().map(|mut r| {
            r.factor = self.rate_factor;
            r.every = self.rate_every.unwrap_or(1);
            r.max_per_minute = self.rate_max;
            r
        });
        let plan = Plan {
            name: self
                .name
                .clone()
                .or_else(|| self.artifact.clone())
                .unwrap_or_else(|| "rollout".into()),
            target: self.target.clone(),
            payload,
            artifact: self.artifact.clone(),
            priority: self.priority.unwrap_or(Priority::Normal),
            max_attempts: self.max_attempts.unwrap_or(1),
            canary: self.canary.map(|size| Canary {
                size,
                wait: self.canary_wait.map(Duration::from),
            }),
            rate,
            parallel: self.parallel,
            abort,
            timeout: self.timeout.map(Duration::from),
            success: self
                .success_contains
                .clone()
                .map(crate::engine::workflow::ResultMatch::Contains),
            health: self.health_within.map(Duration::from),
            on_abort: self.on_abort.clone().map(String::into_bytes),
            edges: self.edge_plan(),
        };
        plan.check()?;
        Ok(plan)
    }
}

pub(super) fn print_rollout(v: &RolloutView) {
    match &v.reason {
        Some(r) => crate::outln!("{} {} — {} ({r})", v.id, v.name, v.state),
        None => crate::outln!("{} {} — {}", v.id, v.name, v.state),
    }
    let rate = v
        .rate
        .map_or("no limit".to_string(), |r| format!("{r:.1}/min"));
    crate::outln!(
        "target: {}   rate: {rate}   canary: {}",
        v.target.join(", "),
        v.canary
    );
    let counts: Vec<String> = v
        .counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    crate::outln!("devices: {}", counts.join(", "));
    if let Some(t) = &v.tripped {
        crate::outln!("tripped: {t}");
    }
    let rows: Vec<Vec<String>> = v
        .devices
        .iter()
        .map(|d| {
            vec![
                d.device.clone(),
                d.state.clone(),
                result_cell(d.result.as_deref()),
                d.rollback_state.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["DEVICE", "STATE", "RESULT", "ROLLBACK"], &rows);
}

fn shown(r: AdminResponse) -> anyhow::Result<RolloutView> {
    match r {
        AdminResponse::Rollout(v) => Ok(*v),
        other => bail!("unexpected answer from the box: {other:?}"),
    }
}

fn print(v: &RolloutView, json: bool) {
    if json {
        crate::outln!("{}", v.json());
    } else {
        print_rollout(v);
    }
}

pub(super) async fn run(cmd: RolloutCmd, data_dir: &Path) -> anyhow::Result<i32> {
    match cmd {
        RolloutCmd::Start(args) => {
            let plan = match args.plan() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(exit::USAGE);
                }
            };
            let req = AdminRequest::RolloutStart {
                plan: serde_json::to_vec(&plan)?,
            };
            let mut v = shown(call(data_dir, req).await?)?;
            let Some(limit) = args.wait else {
                if args.json {
                    crate::outln!("{}", v.json());
                } else {
                    crate::outln!("{}", v.id);
                }
                return Ok(0);
            };
            let deadline = limit.map(|t| std::time::Instant::now() + Duration::from(t));
            while !crate::shell::rollout::is_over(&v) {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    print(&v, args.json);
                    return Ok(exit::TIMED_OUT);
                }
                // The box runs it; this only looks now and then.
                tokio::time::sleep(Duration::from_millis(250)).await;
                v = shown(call(data_dir, AdminRequest::RolloutShow(v.id)).await?)?;
            }
            print(&v, args.json);
            Ok(if v.state == "completed" {
                0
            } else {
                exit::UNSUCCESSFUL
            })
        }
        RolloutCmd::Show { id, json } => {
            let v = shown(call(data_dir, AdminRequest::RolloutShow(parse_id(&id)?)).await?)?;
            print(&v, json);
            Ok(0)
        }
        RolloutCmd::List { json } => {
            let AdminResponse::Rollouts(vs) = call(data_dir, AdminRequest::RolloutList).await?
            else {
                bail!("unexpected answer from the box")
            };
            if json {
                crate::outln!(
                    "{}",
                    Value::Array(vs.iter().map(RolloutView::json).collect())
                );
            } else {
                let rows: Vec<Vec<String>> = vs
                    .iter()
                    .map(|v| {
                        let done: usize = ["succeeded", "failed", "rejected", "timed_out"]
                            .iter()
                            .map(|s| v.count(s))
                            .sum();
                        let bad = done - v.count("succeeded");
                        vec![
                            v.id.to_string(),
                            v.name.clone(),
                            v.state.clone(),
                            format!("{done}/{}", v.devices.len()),
                            bad.to_string(),
                            ago(v.started_at),
                        ]
                    })
                    .collect();
                print_table(&["ID", "NAME", "STATE", "DONE", "FAILED", "STARTED"], &rows);
            }
            Ok(0)
        }
        RolloutCmd::Pause { id } => verb(data_dir, &id, Verb::Pause).await,
        RolloutCmd::Resume { id } => verb(data_dir, &id, Verb::Resume).await,
        RolloutCmd::Abort { id } => verb(data_dir, &id, Verb::Abort).await,
    }
}

async fn verb(data_dir: &Path, id: &str, verb: Verb) -> anyhow::Result<i32> {
    let req = AdminRequest::RolloutVerb {
        id: parse_id(id)?,
        verb,
    };
    let v = shown(call(data_dir, req).await?)?;
    crate::outln!("{} {}", v.id, v.state);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `outpost rollout start ARGS` as the CLI parses it.
    fn start(args: &[&str]) -> StartArgs {
        let mut argv = vec!["outpost", "rollout", "start"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().cmd {
            Cmd::Rollout(RolloutCmd::Start(a)) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_flags_are_the_plan() {
        let p = start(&[
            "--target",
            "tag:cam,dev-9",
            "--payload",
            "flash",
            "--canary",
            "10%",
            "--canary-wait",
            "5m",
            "--rate",
            "2/s",
            "--rate-factor",
            "2",
            "--rate-every",
            "5",
            "--rate-max",
            "600",
            "--abort-failed",
            "20%",
            "--abort-timed-out",
            "50",
            "--abort-min",
            "4",
            "--timeout",
            "10m",
            "--success-contains",
            "ok",
            "--on-abort",
            "undo",
            "--max-attempts",
            "2",
            "--parallel",
            "8",
        ])
        .plan()
        .unwrap();
        assert_eq!(p.name, "rollout");
        assert_eq!(p.target, vec!["tag:cam", "dev-9"]);
        assert_eq!(p.payload, b"flash");
        let c = p.canary.unwrap();
        assert_eq!(
            (c.size, c.wait),
            (Size::Percent(10), Some(Duration::from_secs(300)))
        );
        let r = p.rate.unwrap();
        assert_eq!(
            (r.per_minute, r.factor, r.every, r.max_per_minute),
            (120, Some(2.0), 5, Some(600))
        );
        assert_eq!(
            p.abort,
            vec![
                AbortRule {
                    on: FailKind::Failed,
                    percent: 20,
                    min: 4
                },
                AbortRule {
                    on: FailKind::TimedOut,
                    percent: 50,
                    min: 4
                },
            ]
        );
        assert_eq!(p.timeout, Some(Duration::from_secs(600)));
        assert_eq!(p.on_abort.as_deref(), Some(&b"undo"[..]));
        assert_eq!((p.max_attempts, p.parallel), (2, Some(8)));
        assert!(p.edges.is_none());
        // The artifact names it when no --name does.
        let p = start(&["--target", "tag:cam", "--artifact", "fw@2"])
            .plan()
            .unwrap();
        assert_eq!(
            (p.name.as_str(), p.artifact.as_deref()),
            ("fw@2", Some("fw@2"))
        );
    }

    #[test]
    fn edge_flags_give_the_plan_through_boxes_below() {
        let p = start(&[
            "--target",
            "edge-1/tag:cam",
            "--payload",
            "x",
            "--edge-rate",
            "1/min",
            "--edge-parallel",
            "2",
            "--edge-abort-failed",
            "50",
            "--edge-abort-min",
            "2",
        ])
        .plan()
        .unwrap();
        let e = p.edges.unwrap();
        assert_eq!(e.rate.map(|r| r.per_minute), Some(1));
        assert_eq!(e.parallel, Some(2));
        assert_eq!(
            e.abort,
            vec![AbortRule {
                on: FailKind::Any,
                percent: 50,
                min: 2
            }]
        );
    }

    #[test]
    fn a_plan_file_is_read_with_its_payload_file_and_never_mixed_with_flags() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fw.bin"), b"image").unwrap();
        let file = dir.path().join("plan.toml");
        std::fs::write(
            &file,
            "name = \"fw\"\ntarget = [\"tag:cam\"]\npayload_file = \"fw.bin\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let p = start(&[f]).plan().unwrap();
        assert_eq!(
            (p.name.as_str(), p.payload.as_slice()),
            ("fw", &b"image"[..])
        );
        // Every plan flag is refused next to a file, each naming the file.
        for flag in [
            &["--target", "dev-1"][..],
            &["--payload", "x"],
            &["--name", "n"],
            &["--canary", "1"],
            &["--rate", "1/min"],
            &["--abort-any", "5"],
            &["--timeout", "1m"],
            &["--on-abort", "u"],
            &["--max-attempts", "2"],
            &["--edge-parallel", "1"],
        ] {
            let mut args = vec![f];
            args.extend_from_slice(flag);
            let e = start(&args).plan().unwrap_err();
            assert!(e.contains("not both") && e.contains(f), "{flag:?}: {e}");
        }
        let gone = dir.path().join("gone.toml");
        let e = start(&[gone.to_str().unwrap()]).plan().unwrap_err();
        assert!(
            e.starts_with("cannot read ") && e.contains("gone.toml"),
            "{e}"
        );
        let e = start(&[
            "--target",
            "dev-1",
            "--payload-file",
            gone.to_str().unwrap(),
        ])
        .plan()
        .unwrap_err();
        assert!(
            e.starts_with("cannot read ") && e.contains("gone.toml"),
            "{e}"
        );
        let e = start(&["--payload", "x"]).plan().unwrap_err();
        assert!(e.contains("--target"), "{e}");
    }

    #[test]
    fn a_share_is_a_percent_from_0_to_100() {
        assert_eq!(percent("20%"), Ok(20));
        assert_eq!(percent(" 0 "), Ok(0));
        assert!(percent("101").unwrap_err().contains("0 to 100"));
        assert!(percent("lots").is_err());
    }
}

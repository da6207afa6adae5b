//! The command line: clap definitions, and one handler per subcommand.
//!
//! Every subcommand but `serve`, `init`, `device`, `demo`, `completions` and
//! `man` talks to the running box over its admin socket. Output: aligned
//! tables with relative times for people, `--json` (one stable object, or
//! one per line for streams) for programs. Exit codes (DESIGN §8): 0 ok,
//! 1 error, 2 usage, 3 not found, 4 timed out, 5 refused, 6 the command
//! ended without success.

pub mod demo;
pub mod doctor;
pub mod fleet;

use crate::admin::{AdminClient, AdminError, AdminRequest, AdminResponse};
use crate::command::{CommandId, Outcome, Priority, SendOptions, State};
use crate::queue::core::Relabel;
use crate::queue::{CommandView, SendRequest};
use anyhow::{bail, Context};
use base64::Engine as _;
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::exit;

/// outpost: an offline-first device relay and durable command queue.
#[derive(Debug, Parser)]
#[command(name = "outpost", version, about, propagate_version = true)]
pub struct Cli {
    /// The box's data dir [default: /var/lib/outpost under systemd, else
    /// $XDG_DATA_HOME/outpost]
    #[arg(long, global = true, env = "OUTPOST_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The TOML config file [default: /etc/outpost/outpost.toml, if present]
    #[arg(long, global = true, env = "OUTPOST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
// Parsed once per process: the size of the largest variant (serve's flags)
// costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the box: QUIC listener for devices, the store, the admin socket.
    Serve(crate::config::ServeArgs),
    /// Create the data dir and the box's CA and server certificate.
    Init {
        /// Extra name or address for the server certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
    /// Enroll a device and write its bundle file.
    Enroll {
        device: String,
        /// A tag for routing (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A capability (repeatable).
        #[arg(long = "cap")]
        caps: Vec<String>,
        /// Where to write the bundle [default: ./<device>.bundle]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Enroll a box below this one (an edge), whose devices are then
        /// addressed as <device>/DEVICE; give it the bundle as its
        /// --upstream-bundle.
        #[arg(long)]
        gateway: bool,
        /// Enroll an id that already exists (enrolled or revoked): issues a
        /// new bundle, and every earlier bundle of the id is refused from
        /// now on. Also lets `--out` replace an existing regular file.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a device: refused at its next handshake, disconnected now.
    Revoke { device: String },
    /// Change an enrolled device's tags and capabilities, without
    /// re-enrolling it. New `tag:`/`cap:` sends follow the change.
    Tag {
        device: String,
        /// Add a tag (repeatable).
        #[arg(long)]
        add: Vec<String>,
        /// Remove a tag (repeatable).
        #[arg(long)]
        remove: Vec<String>,
        /// Add a capability (repeatable).
        #[arg(long)]
        add_cap: Vec<String>,
        /// Remove a capability (repeatable).
        #[arg(long)]
        remove_cap: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List enrolled devices.
    Devices {
        #[arg(long)]
        json: bool,
        /// Add each device's outcomes, success rate and enqueue → ack
        /// latency over its last 256 ends (kept in memory since the box
        /// started).
        #[arg(long)]
        stats: bool,
    },
    /// Send a command to a device, a tag (broadcast) or a capability.
    Send(SendArgs),
    /// The box at a glance.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// A device's queue, in delivery order.
    Queue {
        device: String,
        /// Only commands in this state.
        #[arg(long, value_enum, ignore_case = true)]
        state: Option<LiveState>,
        #[arg(long)]
        json: bool,
    },
    /// One command, live or finished.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a command that has not ended.
    Cancel { id: String },
    /// Put a dead or failed command back in the queue.
    Retry { id: String },
    /// Follow lifecycle events as they happen.
    Watch {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run the reference device agent.
    Device(DeviceArgs),
    /// Check the data dir, keys, certificates, the box, disk and database.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Start a throwaway box and a demo device, send a few commands, show them.
    Demo,
    /// Measure this machine: a box on loopback, N devices, workload W1.
    Bench(BenchArgs),
    /// Multi-step workflows (a TOML file of steps, needs and conditions).
    #[command(subcommand)]
    Workflow(WorkflowCmd),
    /// A fleet of edges under a NATS JetStream cluster: init, send, watch,
    /// status.
    #[command(subcommand)]
    Fleet(fleet::FleetCmd),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

/// `outpost workflow …`.
#[derive(Debug, clap::Subcommand)]
pub enum WorkflowCmd {
    /// Check a workflow file: a cycle, an unknown step, a bad target, a
    /// condition on a step that is not upstream — each named with its line
    /// (exit 2). Prints the order the steps run in.
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run a workflow on the box (payload files are read here and sent
    /// along). Prints its id.
    Run {
        file: PathBuf,
        /// Wait for the end (default 10m); exit 0 only if it succeeded.
        /// TIMEOUT: 90s, 10m, 1h, or a number of seconds.
        #[arg(long, num_args = 0..=1, default_missing_value = "10m", value_name = "TIMEOUT", allow_negative_numbers = true)]
        wait: Option<crate::duration::DurationArg>,
        #[arg(long)]
        json: bool,
    },
    /// A run's steps with their states and results.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Every run the box keeps, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run: running steps are cancelled, waiting ones never start.
    Cancel {
        id: String,
        /// Run its on_failure steps.
        #[arg(long)]
        compensate: bool,
    },
}

fn workflow_json(v: &crate::workflow::runner::RunView) -> Value {
    v.json()
}

fn print_workflow(v: &crate::workflow::runner::RunView) {
    crate::outln!("{} {} — {}", v.id, v.name, v.state);
    let rows: Vec<Vec<String>> = v
        .steps
        .iter()
        .map(|s| {
            let mut r = s.result.clone().unwrap_or_default();
            if r.chars().count() > 40 {
                r = r.chars().take(39).collect::<String>() + "…";
            }
            vec![
                s.name.clone(),
                s.state.clone(),
                s.target.clone(),
                r.replace('\n', " "),
            ]
        })
        .collect();
    print_table(&["STEP", "STATE", "TARGET", "RESULT"], &rows);
}

async fn workflow_cmd(cmd: WorkflowCmd, data_dir: &Path) -> anyhow::Result<i32> {
    let shown = |r: AdminResponse| -> anyhow::Result<crate::workflow::runner::RunView> {
        match r {
            AdminResponse::Workflow(v) => Ok(*v),
            other => bail!("unexpected answer from the box: {other:?}"),
        }
    };
    match cmd {
        WorkflowCmd::Check { .. } => unreachable!("handled without a box"),
        WorkflowCmd::Run { file, wait, json } => {
            let p = match crate::workflow::Packed::read(&file) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(exit::USAGE);
                }
            };
            let req = AdminRequest::WorkflowRun {
                file: p.file,
                text: p.text,
                payloads: p.payloads,
            };
            let mut v = shown(call(data_dir, req).await?)?;
            if let Some(timeout) = wait {
                let deadline = std::time::Instant::now() + Duration::from(timeout);
                while v.state == "running" {
                    if std::time::Instant::now() >= deadline {
                        if json {
                            crate::outln!("{}", workflow_json(&v));
                        } else {
                            print_workflow(&v);
                        }
                        return Ok(exit::TIMED_OUT);
                    }
                    // The box runs it; this only looks now and then.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    v = shown(call(data_dir, AdminRequest::WorkflowShow(v.id)).await?)?;
                }
                if json {
                    crate::outln!("{}", workflow_json(&v));
                } else {
                    print_workflow(&v);
                }
                return Ok(if v.state == "succeeded" {
                    0
                } else {
                    exit::UNSUCCESSFUL
                });
            }
            if json {
                crate::outln!("{}", workflow_json(&v));
            } else {
                crate::outln!("{}", v.id);
            }
            Ok(0)
        }
        WorkflowCmd::Show { id, json } => {
            let v = shown(call(data_dir, AdminRequest::WorkflowShow(parse_id(&id)?)).await?)?;
            if json {
                crate::outln!("{}", workflow_json(&v));
            } else {
                print_workflow(&v);
            }
            Ok(0)
        }
        WorkflowCmd::List { json } => {
            let AdminResponse::Workflows(vs) = call(data_dir, AdminRequest::WorkflowList).await?
            else {
                bail!("unexpected answer from the box")
            };
            if json {
                crate::outln!("{}", Value::Array(vs.iter().map(workflow_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = vs
                    .iter()
                    .map(|v| {
                        let done = v
                            .steps
                            .iter()
                            .filter(|s| s.state != "pending" && s.state != "running")
                            .count();
                        vec![
                            v.id.to_string(),
                            v.name.clone(),
                            v.state.clone(),
                            format!("{done}/{}", v.steps.len()),
                            ago(v.started_at),
                        ]
                    })
                    .collect();
                print_table(&["ID", "NAME", "STATE", "STEPS", "STARTED"], &rows);
            }
            Ok(0)
        }
        WorkflowCmd::Cancel { id, compensate } => {
            let req = AdminRequest::WorkflowCancel {
                id: parse_id(&id)?,
                compensate,
            };
            let v = shown(call(data_dir, req).await?)?;
            crate::outln!("{} {}", v.id, v.state);
            Ok(0)
        }
    }
}

/// `outpost send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// `dev-7` (one device), `tag:line-3` (every device with the tag, one
    /// child command each) or `cap:camera` (the least busy connected device
    /// with the capability).
    pub target: String,
    /// The payload; `-` reads stdin.
    pub payload: Option<String>,
    /// Read the payload from a file.
    #[arg(long, conflicts_with = "payload")]
    pub file: Option<PathBuf>,
    /// Bulk: send one command per line of this file (`-` for stdin).
    #[arg(long, conflicts_with_all = ["payload", "file", "wait"])]
    pub lines: Option<PathBuf>,
    #[arg(long, default_value = "normal", ignore_case = true, value_parser = priority_parser())]
    pub priority: Priority,
    /// Time to live: 30s, 10m, 2h, or a number of seconds.
    #[arg(long, allow_negative_numbers = true)]
    pub ttl: Option<crate::duration::DurationArg>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Idempotency key: the same key returns the first command's id.
    #[arg(long)]
    pub key: Option<String>,
    /// Run only once this command has succeeded.
    #[arg(long)]
    pub after: Option<String>,
    /// Not before this time: RFC 3339 with a zone (2026-11-25T10:00:00Z,
    /// …+01:00), or +DURATION from now (+10m, +90 for seconds).
    #[arg(long)]
    pub not_before: Option<String>,
    /// Wait for the end state (default 60s), and print the result.
    /// TIMEOUT: 90s, 10m, or a number of seconds.
    #[arg(long, num_args = 0..=1, default_missing_value = "60s", value_name = "TIMEOUT", allow_negative_numbers = true)]
    pub wait: Option<crate::duration::DurationArg>,
    #[arg(long)]
    pub json: bool,
}

/// The states a queued command can be in (`outpost queue --state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LiveState {
    Queued,
    Delivered,
}

impl LiveState {
    fn holds(self, s: State) -> bool {
        matches!(
            (self, s),
            (LiveState::Queued, State::Queued) | (LiveState::Delivered, State::Delivered { .. })
        )
    }
}

/// `--priority`: clap lists the values in `--help` and in a typo's error.
fn priority_parser() -> impl clap::builder::TypedValueParser<Value = Priority> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["high", "normal", "low"])
        .map(|s| s.parse::<Priority>().expect("one of the possible values"))
}

/// `outpost bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    #[arg(long, default_value_t = 100_000)]
    pub commands: usize,
    /// Payload bytes per command.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Concurrent senders.
    #[arg(long, default_value_t = 64)]
    pub producers: usize,
    /// Offered load in commands/s (default: as fast as the box accepts).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Where to put the throwaway box (use the box's real storage).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Instead of W1, run W3: an idle box (its own process) with this many
    /// connected devices, measuring its memory per device, CPU and writes.
    #[arg(long, value_name = "DEVICES", conflicts_with = "restart")]
    pub idle: Option<usize>,
    /// Instead of W1, run W2: fill a box with this many queued commands,
    /// stop it, and time a restart from open to its first delivery.
    #[arg(long, value_name = "QUEUED")]
    pub restart: Option<usize>,
    /// How long W3 stays idle.
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
    #[arg(long)]
    pub json: bool,
}

/// `outpost device`.
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// The bundle file from `outpost enroll`.
    #[arg(long, env = "OUTPOST_BUNDLE")]
    pub bundle: PathBuf,
    /// Connect here instead of the bundle's server address.
    #[arg(long)]
    pub server: Option<String>,
    /// Run this shell command per command, payload on stdin.
    #[arg(long, conflicts_with = "echo", required_unless_present = "echo")]
    pub exec: Option<String>,
    /// Answer every command with its own payload.
    #[arg(long)]
    pub echo: bool,
    /// Kill a command still running after this (90s, 10m, or a number of
    /// seconds).
    #[arg(long, default_value = "60s", allow_negative_numbers = true)]
    pub timeout: crate::duration::DurationArg,
}

/// Where the box keeps its state when no --data-dir is given.
pub fn default_data_dir() -> PathBuf {
    if std::env::var_os("INVOCATION_ID").is_some() || std::env::var_os("STATE_DIRECTORY").is_some()
    {
        return PathBuf::from("/var/lib/outpost");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("outpost");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/outpost"),
        None => PathBuf::from("/var/lib/outpost"),
    }
}

/// Parse the command line, run, and return the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let (file, file_path) = match crate::config::FileConfig::load(cli.config.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return e.exit_code();
        }
    };
    let data_dir = cli
        .data_dir
        .clone()
        .or_else(|| file.data_dir.clone())
        .unwrap_or_else(default_data_dir);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit::ERROR;
        }
    };
    match rt.block_on(run(cli.cmd, &data_dir, &file, file_path.as_deref())) {
        Ok(code) => code,
        Err(e) => {
            let code = if e.downcast_ref::<UsageError>().is_some() {
                exit::USAGE
            } else {
                match (
                    e.downcast_ref::<AdminError>(),
                    e.downcast_ref::<crate::config::ConfigError>(),
                ) {
                    (Some(a), _) => a.exit_code(),
                    (None, Some(c)) => c.exit_code(),
                    (None, None) => exit::ERROR,
                }
            };
            eprintln!("error: {}", render_error(&e));
            code
        }
    }
}

/// An error and its causes on one line, each cause once: typed errors
/// often quote their source in their own text ("cannot read X: {source}")
/// and also expose it as `source()`, which `{:#}` would print again
/// ("…: No such file or directory: No such file or directory").
pub fn render_error(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(c.trim()) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

async fn client(data_dir: &Path) -> anyhow::Result<AdminClient> {
    Ok(AdminClient::connect(data_dir).await?)
}

async fn call(data_dir: &Path, req: AdminRequest) -> anyhow::Result<AdminResponse> {
    Ok(client(data_dir).await?.call(&req).await?)
}

/// A device's shared-bundle flag in `devices --json`: `null`, or when it was
/// found and how many connections were refused since.
fn shared_json(d: &crate::queue::core::DeviceView) -> Value {
    match &d.shared_bundle {
        None => Value::Null,
        Some(b) => json!({"since": rfc3339(b.since), "refused": b.refused}),
    }
}

fn parse_id(s: &str) -> anyhow::Result<CommandId> {
    Ok(s.parse::<CommandId>()?)
}

async fn run(
    cmd: Cmd,
    data_dir: &Path,
    file: &crate::config::FileConfig,
    file_path: Option<&Path>,
) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Serve(a) => {
            let c = crate::config::resolve(&a, file, file_path)?;
            crate::serve::run(serve_options(c, data_dir)).await?;
            Ok(0)
        }
        Cmd::Init { san } => {
            let id = crate::identity::Identity::init(data_dir, &san)?;
            crate::outln!(
                "initialised {} (CA and server certificate in {})",
                data_dir.display(),
                id.dir().display()
            );
            Ok(0)
        }
        Cmd::Enroll {
            device,
            tags,
            caps,
            out,
            gateway,
            force,
        } => {
            let path = out.unwrap_or_else(|| PathBuf::from(format!("{device}.bundle")));
            // The file first: a path that cannot be written refuses the
            // enrollment, instead of enrolling a device whose key is then
            // nowhere.
            let pending = crate::identity::PendingSecret::reserve(&path, force)
                .with_context(|| format!("{device} was not enrolled"))?;
            let (text, mode) = match AdminClient::connect(data_dir).await {
                Ok(mut c) => {
                    let r = c
                        .call(&AdminRequest::Enroll {
                            id: device.clone(),
                            tags,
                            caps,
                            gateway,
                            force,
                        })
                        .await
                        .with_context(|| format!("{device} was not enrolled"))?;
                    let AdminResponse::Bundle { text } = r else {
                        bail!("unexpected answer from the box: {r:?}")
                    };
                    (text, "via the running box".to_string())
                }
                Err(AdminError::NoBox { .. }) => {
                    let req = crate::enroll::EnrollRequest {
                        id: device.clone(),
                        tags,
                        caps,
                        gateway,
                        force,
                    };
                    let b = enroll_offline(data_dir, file, file_path, &req)
                        .await
                        .with_context(|| format!("{device} was not enrolled"))?;
                    (
                        b.to_text(),
                        format!("offline in {} (the box is not running)", data_dir.display()),
                    )
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("{device} was not enrolled")))
                }
            };
            if let Err(e) = pending.commit(text.as_bytes()) {
                bail!(
                    "{device} is enrolled, but its bundle could not be written: {e}; its key exists nowhere else, so issue a new one with `outpost enroll {device} --force --out FILE`"
                );
            }
            crate::outln!("{device} enrolled {mode}");
            crate::outln!(
                "bundle written to {} (keep it secret: it holds the device's key)",
                path.display()
            );
            if gateway {
                crate::outln!(
                    "on the edge box, run: outpost serve --upstream quic://{} --upstream-bundle {}",
                    crate::identity::Bundle::read(&path)
                        .map(|b| b.server)
                        .unwrap_or_else(|_| "HUB:7443".into()),
                    path.display()
                );
            } else {
                crate::outln!(
                    "run the device with: outpost device --bundle {} --echo",
                    path.display()
                );
            }
            Ok(0)
        }
        Cmd::Revoke { device } => {
            call(data_dir, AdminRequest::Revoke(device.clone())).await?;
            crate::outln!("revoked {device}: its connection is closed and it will be refused");
            Ok(0)
        }
        Cmd::Tag {
            device,
            add,
            remove,
            add_cap,
            remove_cap,
            json,
        } => {
            let r = Relabel {
                device,
                add_tags: add,
                remove_tags: remove,
                add_caps: add_cap,
                remove_caps: remove_cap,
            };
            let AdminResponse::Device(d) = call(data_dir, AdminRequest::Relabel(r)).await? else {
                bail!("unexpected answer")
            };
            if json {
                crate::outln!("{}", json!({"id": d.id, "tags": d.tags, "caps": d.caps}));
            } else {
                crate::outln!(
                    "{}: tags [{}], caps [{}]",
                    d.id,
                    d.tags.join(", "),
                    d.caps.join(", ")
                );
            }
            Ok(0)
        }
        Cmd::Devices { json, stats: true } => {
            let AdminResponse::DeviceStats(ds) = call(data_dir, AdminRequest::DeviceStats).await?
            else {
                bail!("unexpected answer")
            };
            if json {
                let v: Vec<Value> = ds
                    .iter()
                    .map(|(d, s)| {
                        json!({"id": d.record.id, "online": d.online, "tags": d.record.tags, "caps": d.record.caps,
                           "last_seen": d.record.last_seen.map(rfc3339), "queued": d.queued, "in_flight": d.in_flight,
                           "revoked": d.record.revoked, "shared_bundle": shared_json(d), "stats": s})
                    })
                    .collect();
                crate::outln!("{}", Value::Array(v));
            } else {
                let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
                let rows: Vec<Vec<String>> = ds
                    .iter()
                    .map(|(d, s)| {
                        vec![
                            d.record.id.clone(),
                            if d.online { "online" } else { "offline" }.into(),
                            s.succeeded.to_string(),
                            (s.failed + s.dead).to_string(),
                            (s.expired + s.cancelled + s.shed).to_string(),
                            s.success_rate
                                .map_or("-".to_string(), |r| format!("{r:.1}%")),
                            ms(s.latency_p50_ms),
                            ms(s.latency_p95_ms),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "DEVICE",
                        "STATE",
                        "SUCCEEDED",
                        "FAILED",
                        "OTHER ENDS",
                        "SUCCESS",
                        "P50",
                        "P95",
                    ],
                    &rows,
                );
            }
            Ok(0)
        }
        Cmd::Devices { json, stats: false } => {
            let AdminResponse::Devices(ds) = call(data_dir, AdminRequest::Devices).await? else {
                bail!("unexpected answer")
            };
            if json {
                let v: Vec<Value> = ds
                    .iter()
                    .map(|d| {
                        json!({"id": d.record.id, "online": d.online, "tags": d.record.tags, "caps": d.record.caps,
                           "last_seen": d.record.last_seen.map(rfc3339), "queued": d.queued, "in_flight": d.in_flight,
                           "revoked": d.record.revoked, "shared_bundle": shared_json(d)})
                    })
                    .collect();
                crate::outln!("{}", Value::Array(v));
            } else {
                let rows: Vec<Vec<String>> = ds
                    .iter()
                    .map(|d| {
                        vec![
                            d.record.id.clone(),
                            if d.record.revoked {
                                "revoked".into()
                            } else if d.shared_bundle.is_some() {
                                // Said first: the operator must act on it.
                                if d.online {
                                    "online, bundle shared!"
                                } else {
                                    "bundle shared!"
                                }
                                .into()
                            } else if d.online {
                                "online".into()
                            } else {
                                "offline".into()
                            },
                            d.queued.to_string(),
                            d.in_flight.to_string(),
                            d.record
                                .last_seen
                                .map(ago)
                                .unwrap_or_else(|| "never".into()),
                            d.record.tags.join(","),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "DEVICE",
                        "STATE",
                        "QUEUED",
                        "IN FLIGHT",
                        "LAST SEEN",
                        "TAGS",
                    ],
                    &rows,
                );
            }
            Ok(0)
        }
        Cmd::Send(a) => send(a, data_dir).await,
        Cmd::Status { json } => {
            let AdminResponse::Status(s) = call(data_dir, AdminRequest::Status).await? else {
                bail!("unexpected answer")
            };
            if json {
                let u = s.uplink.as_ref();
                crate::outln!(
                    "{}",
                    json!({"version": s.version, "uptime_s": s.uptime_s, "devices_total": s.devices_total,
                       "devices_online": s.devices_online, "queued": s.queued, "in_flight": s.in_flight, "dead": s.dead,
                       "uplink": u.map_or("none", |u| u.state.as_str()),
                       "outbox": u.map_or(0, |u| u.outbox_depth),
                       "last_sync": u.and_then(|u| u.last_sync),
                       "lag_ms": u.map_or(0, |u| u.lag_ms),
                       "upstream": u,
                       "edges": s.edges,
                       "disk_bytes": s.disk_bytes, "max_disk": s.max_disk,
                       "listen": s.listen, "data_dir": s.data_dir,
                       "shared_bundles": s.shared_bundles.iter().map(|b| json!({"device": b.device,
                           "since": rfc3339(b.since), "refused": b.refused})).collect::<Vec<_>>(),
                       "alerts": s.alerts.iter().map(|a| json!({"name": a.name, "state": a.state,
                           "since": rfc3339(a.since), "detail": a.detail})).collect::<Vec<_>>()})
                );
            } else {
                crate::outln!(
                    "outpost {} — up {}",
                    s.version,
                    humantime::format_duration(Duration::from_secs(s.uptime_s))
                );
                let rows = vec![
                    vec!["listen".into(), s.listen],
                    vec!["data dir".into(), s.data_dir],
                    vec![
                        "devices".into(),
                        format!("{} online of {}", s.devices_online, s.devices_total),
                    ],
                    vec!["queued".into(), s.queued.to_string()],
                    vec!["in flight".into(), s.in_flight.to_string()],
                    vec!["dead".into(), s.dead.to_string()],
                    vec![
                        "disk".into(),
                        match s.max_disk {
                            Some(m) if m > 0 => format!(
                                "{} bytes of {m} ({:.1}%)",
                                s.disk_bytes,
                                s.disk_bytes as f64 * 100.0 / m as f64
                            ),
                            _ => format!("{} bytes", s.disk_bytes),
                        },
                    ],
                    vec!["uplink".into(), uplink_line(s.uplink.as_ref())],
                ];
                let mut rows = rows;
                for e in &s.edges {
                    rows.push(vec![
                        format!("edge {}", e.name),
                        format!(
                            "{}, outbox applied through {}{}, {} queued, {} handed down",
                            if e.online { "online" } else { "offline" },
                            e.cursor,
                            e.last_up
                                .map(|t| format!(" (last {})", ago(t)))
                                .unwrap_or_default(),
                            e.queued,
                            e.handed
                        ),
                    ]);
                }
                for b in &s.shared_bundles {
                    rows.push(vec![
                        format!("bundle shared {}", b.device),
                        format!(
                            "in use on more than one live device since {}, {} connections refused; give each device its own bundle (`outpost enroll ID`; `--force` for this one)",
                            ago(b.since),
                            b.refused
                        ),
                    ]);
                }
                print_table(&["", ""], &rows);
                if s.alerts.is_empty() {
                    crate::outln!("alerts: none");
                } else {
                    let rows: Vec<Vec<String>> = s
                        .alerts
                        .iter()
                        .map(|a| {
                            vec![
                                a.name.clone(),
                                a.state.clone(),
                                ago(a.since),
                                a.detail.clone(),
                            ]
                        })
                        .collect();
                    print_table(&["ALERT", "STATE", "SINCE", "DETAIL"], &rows);
                }
            }
            Ok(0)
        }
        Cmd::Queue {
            device,
            state,
            json,
        } => {
            let AdminResponse::Views(mut vs) =
                call(data_dir, AdminRequest::List { device }).await?
            else {
                bail!("unexpected answer")
            };
            if let Some(st) = state {
                vs.retain(|v| st.holds(v.state));
            }
            if json {
                crate::outln!("{}", Value::Array(vs.iter().map(view_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = vs
                    .iter()
                    .map(|v| {
                        vec![
                            v.id.to_string(),
                            v.state.to_string(),
                            v.priority.to_string(),
                            format!("{}/{}", v.attempts, v.max_attempts),
                            ago(v.created_at),
                        ]
                    })
                    .collect();
                print_table(&["ID", "STATE", "PRIORITY", "ATTEMPTS", "CREATED"], &rows);
            }
            Ok(0)
        }
        Cmd::Show { id, json } => {
            let AdminResponse::View(v) = call(data_dir, AdminRequest::Show(parse_id(&id)?)).await?
            else {
                bail!("unexpected answer")
            };
            print_view(&v, json);
            Ok(0)
        }
        Cmd::Cancel { id } => {
            let AdminResponse::View(v) =
                call(data_dir, AdminRequest::Cancel(parse_id(&id)?)).await?
            else {
                bail!("unexpected answer")
            };
            crate::outln!("{} cancelled", v.id);
            Ok(0)
        }
        Cmd::Retry { id } => {
            let AdminResponse::View(v) =
                call(data_dir, AdminRequest::Retry(parse_id(&id)?)).await?
            else {
                bail!("unexpected answer")
            };
            crate::outln!(
                "{} queued again (attempt {} of up to {})",
                v.id,
                v.attempts + 1,
                v.max_attempts
            );
            Ok(0)
        }
        Cmd::Watch { device, json } => {
            let mut c = client(data_dir).await?;
            c.watch(device).await?;
            while let Some(r) = c.next().await? {
                if let AdminResponse::Event(ev) = r {
                    if json {
                        let mut o = json!({"id": ev.id.to_string(), "device": ev.device, "state": ev.state.as_str(),
                                           "at": rfc3339(ev.at), "attempts": ev.attempts, "error": ev.error});
                        add_result(&mut o, ev.outcome.as_ref());
                        crate::outln!("{o}");
                    } else {
                        crate::outln!(
                            "{}  {}  {:<10} {}",
                            rfc3339(ev.at),
                            ev.id,
                            ev.state.as_str(),
                            ev.device
                        );
                    }
                }
            }
            Ok(0)
        }
        Cmd::Device(a) => {
            use crate::client::{run_agent, shutdown_signal, AgentOptions, Handler};
            let handler = match a.exec {
                Some(c) => Handler::Exec(c),
                None => Handler::Echo,
            };
            let mut o = AgentOptions::new(a.bundle, handler);
            o.command_timeout = a.timeout.into();
            o.connect.server = a.server;
            run_agent(o, shutdown_signal()).await?;
            Ok(0)
        }
        Cmd::Demo => demo::run().await,
        Cmd::Doctor { json } => {
            // The reserve the box would run with, from the file and the
            // environment; only an explicit one can exceed the disk.
            let (reserve, bad_config) = match crate::config::resolve_without_flags(file, file_path)
            {
                Ok(c) => (
                    c.reserve_origin.map(|origin| doctor::Reserve {
                        bytes: c.limits.min_free_disk,
                        origin,
                    }),
                    None,
                ),
                Err(e) => (None, Some(e)),
            };
            let mut findings = doctor::check_with(data_dir, reserve).await;
            if let Some(e) = bad_config {
                findings.push(doctor::Finding {
                    check: "config",
                    status: doctor::Status::Fail,
                    detail: e.to_string(),
                    fix: "fix the value named; `outpost serve` refuses to start with it".into(),
                });
            }
            Ok(doctor::report(&findings, json))
        }
        Cmd::Bench(a) => {
            let dir = match &a.dir {
                Some(d) => tempfile::tempdir_in(d),
                None => tempfile::tempdir(),
            }
            .context("creating a temp dir for the bench box")?;
            if let Some(n) = a.restart {
                if !a.json {
                    eprintln!(
                        "filling a box with {n} commands in {} …",
                        dir.path().display()
                    );
                }
                let r = crate::bench::restart_bench(dir.path(), n, a.devices).await?;
                if a.json {
                    crate::outln!("{}", serde_json::to_string(&r)?);
                } else {
                    crate::out!("{}", r.table());
                }
                return Ok(0);
            }
            if let Some(n) = a.idle {
                let exe = std::env::current_exe().context("finding the outpost binary")?;
                let r = crate::bench::idle_bench(&exe, dir.path(), n, a.idle_secs).await?;
                if a.json {
                    crate::outln!("{}", serde_json::to_string(&r)?);
                } else {
                    crate::out!("{}", r.table());
                }
                return Ok(0);
            }
            let o = crate::bench::LinkBenchOptions {
                devices: a.devices,
                commands: a.commands,
                payload: a.payload,
                producers: a.producers,
                rate: a.rate,
            };
            if !a.json {
                eprintln!("running W1 in {} …", dir.path().display());
            }
            let r = crate::bench::link_bench(dir.path(), &o).await?;
            if a.json {
                crate::outln!("{}", serde_json::to_string(&r)?);
            } else {
                crate::out!("{}", r.table());
            }
            Ok(0)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "outpost",
                &mut crate::stdout::Stdout,
            );
            Ok(0)
        }
        Cmd::Workflow(WorkflowCmd::Check { file, json }) => {
            let w = match crate::workflow::Workflow::load(&file) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(exit::USAGE);
                }
            };
            if json {
                let steps: Vec<Value> = w
                    .steps
                    .iter()
                    .map(|s| json!({"name": s.name, "target": s.target, "needs": s.needs, "line": s.line}))
                    .collect();
                crate::outln!(
                    "{}",
                    json!({"name": w.name, "steps": steps, "on_failure": w.on_failure,
                           "timeout_s": w.timeout.map(|t| t.as_secs())})
                );
            } else {
                let order: Vec<&str> = w
                    .steps
                    .iter()
                    .filter(|s| !w.on_failure.contains(&s.name))
                    .map(|s| s.name.as_str())
                    .collect();
                crate::outln!(
                    "{}: ok, {} steps: {}",
                    w.name,
                    order.len(),
                    order.join(" → ")
                );
                if !w.on_failure.is_empty() {
                    crate::outln!("on failure: {}", w.on_failure.join(", "));
                }
            }
            Ok(0)
        }
        Cmd::Workflow(other) => workflow_cmd(other, data_dir).await,
        Cmd::Fleet(f) => fleet::run(f).await,
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut crate::stdout::Stdout)?;
            Ok(0)
        }
    }
}

/// `enroll` with the box stopped (pre-provisioning bundles before it is
/// deployed): the data dir's identity and store, opened here, and the same
/// enrollment the box does, with the settings it would start with.
async fn enroll_offline(
    data_dir: &Path,
    file: &crate::config::FileConfig,
    file_path: Option<&Path>,
    req: &crate::enroll::EnrollRequest,
) -> anyhow::Result<crate::identity::Bundle> {
    // Before the store: a data dir without an identity is not created.
    let identity = crate::identity::Identity::load(data_dir)?;
    let c = crate::config::resolve_without_flags(file, file_path)?;
    // sled's lock refuses this while a box holds the database.
    let store = crate::store::Store::open(
        data_dir,
        &crate::store::StoreOptions {
            cache_bytes: c.cache_bytes,
        },
    )?;
    let queue = crate::queue::open(
        store,
        crate::queue::ServiceOptions {
            limits: c.limits.clone(),
            acl: c.acl.clone(),
            outbox_max: c
                .upstream
                .as_ref()
                .map(|u| u.outbox_max)
                .or(c.nats.as_ref().map(|n| n.outbox_max)),
            ..Default::default()
        },
    )?;
    let advertise = crate::serve::advertise_for(c.listen, c.advertise.as_deref());
    // The box loads the new certificate's pin from the record at its next
    // start: nothing is serving now that would need it live.
    let r = crate::enroll::enroll(&queue, &identity, &advertise, req).await;
    // Durable before the store closes, either way.
    queue.shutdown().await;
    Ok(r?.bundle)
}

fn serve_options(c: crate::config::ServeConfig, data_dir: &Path) -> crate::serve::ServeOptions {
    let mut o = crate::serve::ServeOptions::new(data_dir.to_path_buf());
    o.listen = c.listen;
    o.sans = c.sans;
    o.advertise = c.advertise;
    o.link.window = c.limits.window;
    o.limits = c.limits;
    if c.reserve_origin.is_none() {
        if let Ok((total, _)) = crate::store::fs_space_of(data_dir) {
            o.limits.min_free_disk = crate::queue::default_reserve(total);
        }
    }
    o.store.cache_bytes = c.cache_bytes;
    o.metrics = c.metrics;
    o.http = c.http;
    o.http_opts = crate::http::HttpOptions {
        token: c.http_token,
        admin: c.http_admin,
    };
    o.alerts = c.alerts;
    o.acl = c.acl;
    // EX_TEMPFAIL: systemd's Restart=on-failure brings the box back on a
    // reopened database.
    o.exit_on_store_failure = Some(exit::TEMPFAIL);
    o.upstream = c.upstream.map(|u| {
        let bundle = u
            .bundle
            .unwrap_or_else(|| data_dir.join(crate::serve::UPSTREAM_BUNDLE));
        let mut opts = crate::upstream::UplinkOptions::new(bundle, Some(u.server));
        opts.max_frame = o.link.max_frame;
        (opts, u.outbox_max)
    });
    o.nats = c.nats.map(|n| {
        let mut opts = crate::upstream::nats::NatsOptions::new(n.urls, n.name);
        opts.creds = n.creds;
        opts.ca = n.ca;
        opts.client_cert = n.client_cert;
        (opts, n.outbox_max)
    });
    o
}

async fn send(a: SendArgs, data_dir: &Path) -> anyhow::Result<i32> {
    if let Some(path) = a.lines.clone() {
        return send_lines(a, &path, data_dir).await;
    }
    let payload = match send_payload(&a, &a.target)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let req = SendRequest {
        target: a.target.clone(),
        payload,
        opts: send_options(&a)?,
        origin: "cli".into(),
        signature: None,
    };
    let mut c = client(data_dir).await?;
    let AdminResponse::Receipt(r) = c.call(&AdminRequest::Send(req)).await? else {
        bail!("unexpected answer")
    };
    let Some(timeout) = a.wait else {
        if a.json {
            crate::outln!(
                "{}",
                json!({"id": r.id.to_string(), "state": r.state.as_str(), "duplicate": r.duplicate})
            );
        } else {
            crate::outln!("{}", r.id);
        }
        return Ok(0);
    };
    let timeout: Duration = timeout.into();
    let resp = c
        .call(&AdminRequest::Wait {
            id: r.id,
            timeout_ms: timeout.as_millis() as u64,
        })
        .await?;
    match resp {
        AdminResponse::View(v) => {
            if a.json {
                let mut o = json!({"id": v.id.to_string(), "state": v.state.as_str(), "attempts": v.attempts, "error": v.error});
                add_result(&mut o, v.outcome.as_ref());
                if let Some(s) = &v.summary {
                    o["summary"] = json!(s);
                }
                crate::outln!("{o}");
            } else {
                print_outcome(&v);
            }
            Ok(if v.state == State::Succeeded {
                0
            } else {
                exit::UNSUCCESSFUL
            })
        }
        AdminResponse::TimedOut => {
            if a.json {
                crate::outln!("{}", json!({"id": r.id.to_string(), "state": "timeout"}));
            }
            eprintln!(
                "error: command {} did not end within {}; it stays queued — follow it with `outpost show {}`",
                r.id,
                humantime::format_duration(timeout),
                r.id
            );
            Ok(exit::TIMED_OUT)
        }
        other => bail!("unexpected answer from the box: {other:?}"),
    }
}

/// The options of a send, from its flags.
/// A send's payload: the positional text, `-` for stdin, `--file`; or,
/// for `EDGE/workflow` (`target` as the box below sees it, without the
/// edge), the workflow file packed with its payload files, checked here
/// first. `Err(exit code)` once the error is printed.
pub fn send_payload(a: &SendArgs, target: &str) -> anyhow::Result<Result<Vec<u8>, i32>> {
    let to_workflow = match crate::route::Target::parse(target) {
        Ok(crate::route::Target::Edge { rest, .. }) => rest == crate::workflow::runner::WORKFLOW,
        _ => false,
    };
    Ok(Ok(match (&a.file, a.payload.as_deref()) {
        // `send edge-1/workflow FILE`: the whole workflow, for the edge to
        // run.
        (f, p) if to_workflow => {
            let Some(path) = f.clone().or_else(|| p.map(PathBuf::from)) else {
                eprintln!("error: `{target}` needs the workflow file: outpost send {target} FILE");
                return Ok(Err(exit::USAGE));
            };
            match crate::workflow::Packed::read(&path) {
                Ok(p) => p.to_bytes(),
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(Err(exit::USAGE));
                }
            }
        }
        (Some(f), _) => std::fs::read(f)
            .with_context(|| format!("cannot read the payload file {}", f.display()))?,
        (None, Some("-")) => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("reading the payload from stdin")?;
            b
        }
        (None, Some(p)) => p.as_bytes().to_vec(),
        (None, None) => Vec::new(),
    }))
}

pub fn send_options(a: &SendArgs) -> anyhow::Result<SendOptions> {
    let not_before = match a.not_before.as_deref() {
        None => None,
        Some(s) => Some(parse_not_before(s, crate::now_millis()).map_err(UsageError)?),
    };
    Ok(SendOptions {
        priority: a.priority,
        ttl_ms: a.ttl.map(|t| Duration::from(t).as_millis() as u64),
        max_attempts: a.max_attempts,
        key: a.key.clone(),
        after: a.after.as_deref().map(parse_id).transpose()?,
        not_before,
    })
}

/// `--not-before`: `+DURATION` from `now`, or an RFC 3339 time with its
/// zone. A time without a zone is refused: read as UTC it would be off by
/// the site's offset, silently.
pub fn parse_not_before(s: &str, now: u64) -> Result<u64, String> {
    if let Some(d) = s.strip_prefix('+') {
        let d = crate::duration::parse(d).map_err(|e| format!("--not-before {s}: {e}"))?;
        return Ok(now.saturating_add(d.as_millis() as u64));
    }
    let bad = |why: &str| {
        format!("--not-before {s}: {why}; write an RFC 3339 time with its zone (2026-11-25T10:00:00Z, 2026-11-25T11:00:00+01:00) or +10m")
    };
    let t = s.trim();
    let (local, offset_s): (&str, i64) = if let Some(l) = t.strip_suffix(['Z', 'z']) {
        (l, 0)
    } else {
        // ±hh:mm after the seconds (a date's own `-` come before the `T`).
        let tail = t
            .rfind(['+', '-'])
            .filter(|&i| t[..i].contains(['T', 't', ' ']));
        let Some(i) = tail else {
            return Err(bad("no time zone"));
        };
        let (l, z) = t.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let hm: Vec<&str> = z[1..].split(':').collect();
        let (Some(h), Some(m), 2) = (
            hm.first().and_then(|h| h.parse::<i64>().ok()),
            hm.get(1).and_then(|m| m.parse::<i64>().ok()),
            hm.len(),
        ) else {
            return Err(bad(&format!("`{z}` is not a zone offset (±hh:mm)")));
        };
        if h > 23 || m > 59 {
            return Err(bad(&format!("`{z}` is not a zone offset (±hh:mm)")));
        }
        (l, sign * (h * 3600 + m * 60))
    };
    let at = humantime::parse_rfc3339_weak(local).map_err(|e| bad(&e.to_string()))?;
    let utc_ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        - offset_s * 1000;
    Ok(utc_ms.max(0) as u64)
}

/// A usage error found after parsing (exit 2), e.g. a flag's value that
/// only makes sense with another.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Bulk send: one command per line, over several admin connections so the
/// box folds them into shared group commits. Prints the ids in line order.
async fn send_lines(a: SendArgs, path: &Path, data_dir: &Path) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    const CONNECTIONS: usize = 16;
    let text = if path == Path::new("-") {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .context("reading payload lines from stdin")?;
        t
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let lines: Vec<(usize, String)> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .enumerate()
        .collect();
    if a.key.is_some() && lines.len() > 1 {
        bail!("--key with --lines would give every line the same idempotency key; drop --key");
    }
    let opts = send_options(&a)?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(lines.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut ids = vec![None; lines.len()];
    let mut tasks = tokio::task::JoinSet::new();
    for part in lines.chunks(lines.len().div_ceil(CONNECTIONS).max(1)) {
        let (part, opts, target, dir, bar) = (
            part.to_vec(),
            opts.clone(),
            a.target.clone(),
            data_dir.to_path_buf(),
            bar.clone(),
        );
        tasks.spawn(async move {
            let mut c = AdminClient::connect(&dir).await?;
            let mut out = Vec::with_capacity(part.len());
            for (n, line) in part {
                let req = SendRequest {
                    target: target.clone(),
                    payload: line.into_bytes(),
                    opts: opts.clone(),
                    origin: "cli".into(),
                    signature: None,
                };
                match c.call(&AdminRequest::Send(req)).await? {
                    AdminResponse::Receipt(r) => out.push((n, r)),
                    other => {
                        return Err(anyhow::anyhow!("unexpected answer from the box: {other:?}"))
                    }
                }
                bar.inc(1);
            }
            anyhow::Ok(out)
        });
    }
    while let Some(r) = tasks.join_next().await {
        for (n, receipt) in r?? {
            ids[n] = Some(receipt);
        }
    }
    bar.finish_and_clear();
    let receipts: Vec<_> = ids.into_iter().flatten().collect();
    if a.json {
        let v: Vec<Value> = receipts
            .iter()
            .map(|r| json!({"id": r.id.to_string(), "state": r.state.as_str(), "duplicate": r.duplicate}))
            .collect();
        crate::outln!("{}", Value::Array(v));
    } else {
        for r in &receipts {
            crate::outln!("{}", r.id);
        }
        eprintln!("{} commands queued for {}", receipts.len(), a.target);
    }
    Ok(0)
}

fn print_outcome(v: &CommandView) {
    match &v.outcome {
        Some(Outcome::Ok(b)) => match std::str::from_utf8(b) {
            Ok(s) => crate::out!(
                "{s}{}",
                if s.ends_with('\n') || s.is_empty() {
                    ""
                } else {
                    "\n"
                }
            ),
            Err(_) => crate::outln!("{}", base64::engine::general_purpose::STANDARD.encode(b)),
        },
        Some(Outcome::Failed { code, message }) => {
            eprintln!("{} {}: exit code {code}: {message}", v.id, v.state)
        }
        Some(Outcome::Rejected { reason }) => {
            eprintln!("{} rejected by the device: {reason}", v.id)
        }
        None => eprintln!(
            "{} {}{}",
            v.id,
            v.state,
            v.error
                .as_deref()
                .or(v.summary.as_deref())
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    }
}

fn add_result(o: &mut Value, outcome: Option<&Outcome>) {
    let m = o.as_object_mut().expect("an object");
    match outcome {
        Some(Outcome::Ok(b)) => match std::str::from_utf8(b) {
            Ok(s) => {
                m.insert("result".into(), json!(s));
            }
            Err(_) => {
                m.insert("result".into(), Value::Null);
                m.insert(
                    "result_b64".into(),
                    json!(base64::engine::general_purpose::STANDARD.encode(b)),
                );
            }
        },
        Some(Outcome::Failed { code, message }) => {
            m.insert("result".into(), Value::Null);
            m.insert("exit_code".into(), json!(code));
            if m.get("error").is_none_or(Value::is_null) {
                m.insert("error".into(), json!(message));
            }
        }
        Some(Outcome::Rejected { reason }) => {
            m.insert("result".into(), Value::Null);
            if m.get("error").is_none_or(Value::is_null) {
                m.insert("error".into(), json!(format!("rejected: {reason}")));
            }
        }
        None => {
            m.insert("result".into(), Value::Null);
        }
    }
}

/// The stable `--json` shape of one command.
pub fn view_json(v: &CommandView) -> Value {
    let mut o = json!({
        "id": v.id.to_string(), "target": v.target, "device": v.device, "state": v.state.as_str(),
        "priority": v.priority.as_str(), "attempts": v.attempts, "max_attempts": v.max_attempts,
        "created_at": rfc3339(v.created_at), "finished_at": v.finished_at.map(rfc3339),
        "origin": v.origin, "error": v.error,
        "not_before": v.not_before.map(rfc3339), "expires_at": v.expires_at.map(rfc3339),
        "after": v.after.map(|a| a.to_string()), "key": v.key,
    });
    add_result(&mut o, v.outcome.as_ref());
    if let Some(s) = &v.summary {
        o["summary"] = json!(s);
        o["children"] = v
            .children
            .iter()
            .map(|c| json!({"id": c.id.to_string(), "device": c.device, "state": c.state.as_str()}))
            .collect();
    }
    o
}

fn print_view(v: &CommandView, json: bool) {
    if json {
        crate::outln!("{}", view_json(v));
        return;
    }
    let mut rows = vec![
        vec!["id".to_string(), v.id.to_string()],
        vec!["target".into(), v.target.clone()],
    ];
    if v.device != v.target {
        rows.push(vec!["device".into(), v.device.clone()]);
    }
    rows.extend([
        vec!["state".into(), v.state.to_string()],
        vec!["priority".into(), v.priority.to_string()],
        vec![
            "attempts".into(),
            format!("{} of {}", v.attempts, v.max_attempts),
        ],
        vec!["created".into(), ago(v.created_at)],
    ]);
    // Both say why a command has not run yet (or will never), so they are
    // shown with the absolute time as well as the relative one.
    if let Some(t) = v.not_before {
        rows.push(vec![
            "not before".into(),
            format!("{} ({})", rfc3339(t), ago(t)),
        ]);
    }
    if let Some(t) = v.expires_at {
        rows.push(vec![
            "expires".into(),
            format!("{} ({})", rfc3339(t), ago(t)),
        ]);
    }
    if let Some(a) = v.after {
        rows.push(vec!["after".into(), a.to_string()]);
    }
    if let Some(k) = &v.key {
        rows.push(vec!["key".into(), k.clone()]);
    }
    if let Some(s) = &v.summary {
        rows.push(vec!["children".into(), s.clone()]);
    }
    if let Some(f) = v.finished_at {
        rows.push(vec!["finished".into(), ago(f)]);
    }
    match &v.outcome {
        Some(Outcome::Ok(b)) => rows.push(vec![
            "result".into(),
            String::from_utf8_lossy(b).trim_end().to_string(),
        ]),
        Some(Outcome::Failed { code, message }) => {
            rows.push(vec!["failure".into(), format!("exit {code}: {message}")])
        }
        Some(Outcome::Rejected { reason }) => rows.push(vec!["rejected".into(), reason.clone()]),
        None => {}
    }
    if let Some(e) = &v.error {
        rows.push(vec!["error".into(), e.clone()]);
    }
    print_table(&["", ""], &rows);
    if !v.children.is_empty() {
        crate::outln!();
        let rows: Vec<Vec<String>> = v
            .children
            .iter()
            .map(|c| vec![c.device.clone(), c.state.to_string(), c.id.to_string()])
            .collect();
        print_table(&["DEVICE", "STATE", "CHILD"], &rows);
    }
}

pub use crate::command::rfc3339;

/// "3s ago", "2h ago", "in 5m".
/// `connected to hub:7443 since 3m; outbox 12 (oldest 5s), last sync 2s ago`.
fn uplink_line(u: Option<&crate::admin::UplinkView>) -> String {
    let Some(u) = u else {
        return "none".into();
    };
    let mut line = format!("{} ({}) since {}", u.state, u.hub, ago(u.since));
    line.push_str(&format!("; outbox {}", u.outbox_depth));
    if u.outbox_depth > 0 {
        line.push_str(&format!(
            " (oldest {})",
            humantime::format_duration(Duration::from_secs(u.lag_ms / 1000))
        ));
    }
    match u.last_sync {
        Some(t) => line.push_str(&format!(", last sync {}", ago(t))),
        None => line.push_str(", never synced"),
    }
    if u.state != crate::upstream::UplinkState::Connected {
        if let Some(e) = &u.last_error {
            line.push_str(&format!("; {e}"));
        }
    }
    line
}

pub fn ago(ms: u64) -> String {
    let now = crate::now_millis();
    let (d, future) = if ms > now {
        (ms - now, true)
    } else {
        (now - ms, false)
    };
    let s = d / 1000;
    let text = match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Print rows as aligned columns (headers skipped when all empty).
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let cols = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        crate::outln!("{}", s.trim_end());
    };
    if headers.iter().any(|h| !h.is_empty()) {
        line(headers.to_vec());
    }
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(crate::config::ConfigError::Read {
            path: "/x.toml".into(),
            source: io,
        })
        .context("starting the box");
        let text = render_error(&e);
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
        assert!(text.starts_with("starting the box: cannot read the config file /x.toml"));
        // A cause the text does not quote is kept.
        let e = anyhow::anyhow!("disk gone").context("writing the bundle");
        assert_eq!(render_error(&e), "writing the bundle: disk gone");
    }

    #[test]
    fn not_before_needs_a_zone_and_reads_offsets() {
        let z = parse_not_before("2026-11-25T10:00:00Z", 0).unwrap();
        assert_eq!(z, 1_795_600_800_000);
        assert_eq!(parse_not_before("2026-11-25T11:00:00+01:00", 0).unwrap(), z);
        assert_eq!(parse_not_before("2026-11-25T05:30:00-04:30", 0).unwrap(), z);
        assert_eq!(parse_not_before("+90", 1000).unwrap(), 91_000);
        assert_eq!(parse_not_before("+10m", 0).unwrap(), 600_000);
        for bad in [
            "2026-11-25T10:00:00",
            "2026-11-25 10:00:00",
            "2026-11-25T10:00:00+1",
            "2026-11-25T10:00:00+25:00",
            "tomorrow",
            "+-5m",
        ] {
            let e = parse_not_before(bad, 0).expect_err(bad);
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(parse_not_before("2026-11-25T10:00:00", 0)
            .unwrap_err()
            .contains("no time zone"));
    }

    #[test]
    fn json_of_a_binary_result_is_base64() {
        let mut o = json!({"id": "x"});
        add_result(&mut o, Some(&Outcome::Ok(vec![0xff, 0x00])));
        assert_eq!(o["result"], Value::Null);
        assert_eq!(o["result_b64"], json!("/wA="));
    }
}

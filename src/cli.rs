//! The command line: clap definitions, and one handler per subcommand.
//!
//! Every subcommand but `serve`, `init`, `device`, `demo`, `completions` and
//! `man` talks to the running box over its admin socket. Output: aligned
//! tables with relative times for people, `--json` (one stable object, or
//! one per line for streams) for programs. Exit codes (DESIGN §8): 0 ok,
//! 1 error, 2 usage, 3 not found, 4 timed out, 5 refused, 6 the command
//! ended without success.

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

/// Exit code: the command ended without success.
pub const EXIT_UNSUCCESSFUL: i32 = 6;
/// Exit code: `--wait` timed out.
pub const EXIT_TIMEOUT: i32 = 4;

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
        /// now on.
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
        /// Only commands in this state (queued, delivered).
        #[arg(long)]
        state: Option<String>,
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
    Fleet(crate::fleet::FleetCmd),
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
        #[arg(long, num_args = 0..=1, default_missing_value = "10m", value_name = "TIMEOUT")]
        wait: Option<humantime::Duration>,
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
    println!("{} {} — {}", v.id, v.name, v.state);
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
                    return Ok(2);
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
                            println!("{}", workflow_json(&v));
                        } else {
                            print_workflow(&v);
                        }
                        return Ok(EXIT_TIMEOUT);
                    }
                    // The box runs it; this only looks now and then.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    v = shown(call(data_dir, AdminRequest::WorkflowShow(v.id)).await?)?;
                }
                if json {
                    println!("{}", workflow_json(&v));
                } else {
                    print_workflow(&v);
                }
                return Ok(if v.state == "succeeded" {
                    0
                } else {
                    EXIT_UNSUCCESSFUL
                });
            }
            if json {
                println!("{}", workflow_json(&v));
            } else {
                println!("{}", v.id);
            }
            Ok(0)
        }
        WorkflowCmd::Show { id, json } => {
            let v = shown(call(data_dir, AdminRequest::WorkflowShow(parse_id(&id)?)).await?)?;
            if json {
                println!("{}", workflow_json(&v));
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
                println!("{}", Value::Array(vs.iter().map(workflow_json).collect()));
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
            println!("{} {}", v.id, v.state);
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
    #[arg(long, default_value = "normal")]
    pub priority: Priority,
    /// Time to live, e.g. 10m.
    #[arg(long)]
    pub ttl: Option<humantime::Duration>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Idempotency key: the same key returns the first command's id.
    #[arg(long)]
    pub key: Option<String>,
    /// Run only once this command has succeeded.
    #[arg(long)]
    pub after: Option<String>,
    /// Not before this time: RFC 3339, or +DURATION from now.
    #[arg(long)]
    pub not_before: Option<String>,
    /// Wait for the end state (default 60s), and print the result.
    #[arg(long, num_args = 0..=1, default_missing_value = "60s", value_name = "TIMEOUT")]
    pub wait: Option<humantime::Duration>,
    #[arg(long)]
    pub json: bool,
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
    /// Kill a command still running after this.
    #[arg(long, default_value = "60s")]
    pub timeout: humantime::Duration,
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
            return 1;
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
            return 1;
        }
    };
    match rt.block_on(run(cli.cmd, &data_dir, &file, file_path.as_deref())) {
        Ok(code) => code,
        Err(e) => {
            let code = e
                .downcast_ref::<AdminError>()
                .map_or(1, AdminError::exit_code);
            eprintln!("error: {e:#}");
            code
        }
    }
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
            println!(
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
            let r = call(
                data_dir,
                AdminRequest::Enroll {
                    id: device.clone(),
                    tags,
                    caps,
                    gateway,
                    force,
                },
            )
            .await?;
            let AdminResponse::Bundle { text } = r else {
                bail!("unexpected answer from the box: {r:?}")
            };
            let path = out.unwrap_or_else(|| PathBuf::from(format!("{device}.bundle")));
            crate::identity::write_secret(&path, text.as_bytes())?;
            println!("enrolled {device}; bundle written to {} (keep it secret: it holds the device's key)", path.display());
            if gateway {
                println!(
                    "on the edge box, run: outpost serve --upstream quic://{} --upstream-bundle {}",
                    crate::identity::Bundle::read(&path)
                        .map(|b| b.server)
                        .unwrap_or_else(|_| "HUB:7443".into()),
                    path.display()
                );
            } else {
                println!(
                    "run the device with: outpost device --bundle {} --echo",
                    path.display()
                );
            }
            Ok(0)
        }
        Cmd::Revoke { device } => {
            call(data_dir, AdminRequest::Revoke(device.clone())).await?;
            println!("revoked {device}: its connection is closed and it will be refused");
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
                println!("{}", json!({"id": d.id, "tags": d.tags, "caps": d.caps}));
            } else {
                println!(
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
                println!("{}", Value::Array(v));
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
                println!("{}", Value::Array(v));
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
                println!(
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
                println!(
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
                    println!("alerts: none");
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
                let st = st.to_ascii_lowercase();
                vs.retain(|v| v.state.as_str() == st);
            }
            if json {
                println!("{}", Value::Array(vs.iter().map(view_json).collect()));
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
            println!("{} cancelled", v.id);
            Ok(0)
        }
        Cmd::Retry { id } => {
            let AdminResponse::View(v) =
                call(data_dir, AdminRequest::Retry(parse_id(&id)?)).await?
            else {
                bail!("unexpected answer")
            };
            println!(
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
                        println!("{o}");
                    } else {
                        println!(
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
        Cmd::Demo => crate::demo::run().await,
        Cmd::Doctor { json } => Ok(crate::doctor::report(
            &crate::doctor::check(data_dir).await,
            json,
        )),
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
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    print!("{}", r.table());
                }
                return Ok(0);
            }
            if let Some(n) = a.idle {
                let exe = std::env::current_exe().context("finding the outpost binary")?;
                let r = crate::bench::idle_bench(&exe, dir.path(), n, a.idle_secs).await?;
                if a.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    print!("{}", r.table());
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
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", r.table());
            }
            Ok(0)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "outpost",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Cmd::Workflow(WorkflowCmd::Check { file, json }) => {
            let w = match crate::workflow::Workflow::load(&file) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            };
            if json {
                let steps: Vec<Value> = w
                    .steps
                    .iter()
                    .map(|s| json!({"name": s.name, "target": s.target, "needs": s.needs, "line": s.line}))
                    .collect();
                println!(
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
                println!(
                    "{}: ok, {} steps: {}",
                    w.name,
                    order.len(),
                    order.join(" → ")
                );
                if !w.on_failure.is_empty() {
                    println!("on failure: {}", w.on_failure.join(", "));
                }
            }
            Ok(0)
        }
        Cmd::Workflow(other) => workflow_cmd(other, data_dir).await,
        Cmd::Fleet(f) => crate::fleet::run(f).await,
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(0)
        }
    }
}

fn serve_options(c: crate::config::ServeConfig, data_dir: &Path) -> crate::serve::ServeOptions {
    let mut o = crate::serve::ServeOptions::new(data_dir.to_path_buf());
    o.listen = c.listen;
    o.sans = c.sans;
    o.advertise = c.advertise;
    o.link.window = c.limits.window;
    o.limits = c.limits;
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
    o.exit_on_store_failure = Some(75);
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
            println!(
                "{}",
                json!({"id": r.id.to_string(), "state": r.state.as_str(), "duplicate": r.duplicate})
            );
        } else {
            println!("{}", r.id);
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
                println!("{o}");
            } else {
                print_outcome(&v);
            }
            Ok(if v.state == State::Succeeded {
                0
            } else {
                EXIT_UNSUCCESSFUL
            })
        }
        AdminResponse::TimedOut => {
            if a.json {
                println!("{}", json!({"id": r.id.to_string(), "state": "timeout"}));
            }
            eprintln!(
                "error: command {} did not end within {}; it stays queued — follow it with `outpost show {}`",
                r.id,
                humantime::format_duration(timeout),
                r.id
            );
            Ok(EXIT_TIMEOUT)
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
                return Ok(Err(2));
            };
            match crate::workflow::Packed::read(&path) {
                Ok(p) => p.to_bytes(),
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(Err(2));
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
        Some(s) if s.starts_with('+') => {
            let d: Duration = humantime::parse_duration(&s[1..])
                .with_context(|| format!("--not-before {s}: not a duration"))?;
            Some(crate::now_millis() + d.as_millis() as u64)
        }
        Some(s) => {
            let t = humantime::parse_rfc3339_weak(s).with_context(|| {
                format!("--not-before {s}: use RFC 3339 (2026-11-25T10:00:00Z) or +10m")
            })?;
            Some(
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            )
        }
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
        println!("{}", Value::Array(v));
    } else {
        for r in &receipts {
            println!("{}", r.id);
        }
        eprintln!("{} commands queued for {}", receipts.len(), a.target);
    }
    Ok(0)
}

fn print_outcome(v: &CommandView) {
    match &v.outcome {
        Some(Outcome::Ok(b)) => match std::str::from_utf8(b) {
            Ok(s) => print!(
                "{s}{}",
                if s.ends_with('\n') || s.is_empty() {
                    ""
                } else {
                    "\n"
                }
            ),
            Err(_) => println!("{}", base64::engine::general_purpose::STANDARD.encode(b)),
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
        println!("{}", view_json(v));
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
        println!();
        let rows: Vec<Vec<String>> = v
            .children
            .iter()
            .map(|c| vec![c.device.clone(), c.state.to_string(), c.id.to_string()])
            .collect();
        print_table(&["DEVICE", "STATE", "CHILD"], &rows);
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

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
    if u.state != "connected" {
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
        println!("{}", s.trim_end());
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
    fn json_of_a_binary_result_is_base64() {
        let mut o = json!({"id": "x"});
        add_result(&mut o, Some(&Outcome::Ok(vec![0xff, 0x00])));
        assert_eq!(o["result"], Value::Null);
        assert_eq!(o["result_b64"], json!("/wA="));
    }
}

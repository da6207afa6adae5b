//! The command line: clap definitions, and one handler per subcommand.
//!
//! Every subcommand but `serve`, `init`, `device`, `demo`, `completions` and
//! `man` talks to the running box over its admin socket. Output: aligned
//! tables with relative times for people, `--json` (one stable object, or
//! one per line for streams) for programs. Exit codes (DESIGN §8): 0 ok,
//! 1 error, 2 usage, 3 not found, 4 timed out, 5 refused, 6 the command
//! ended without success.

mod artifact;
mod audit;
mod backup;
pub mod demo;
mod devices;
pub mod doctor;
pub mod enroll;
pub mod fleet;
mod key;
mod output;
mod restore;
mod rollout;
mod send;
mod sign;
mod status;
mod trust;
mod workflow;

use output::*;
pub use output::{ago, print_table, render_error, view_json};
use send::send;
pub use send::{parse_not_before, send_options, send_payload, SendArgs, UsageError};
use workflow::workflow_cmd;
pub use workflow::WorkflowCmd;

use crate::engine::command::{CommandId, Outcome, Priority, SendOptions, State};
use crate::engine::queue::core::Relabel;
use crate::shell::admin::{AdminClient, AdminError, AdminRequest, AdminResponse};
use crate::shell::queue::{CommandView, SendRequest};
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
    /// The subcommand.
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
    Serve(crate::shell::config::ServeArgs),
    /// Create the data dir and the box's CA and server certificate.
    Init {
        /// Extra name or address for the server certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
    /// Enroll a device and write its bundle file.
    Enroll(enroll::EnrollArgs),
    /// Revoke a device: refused at its next handshake, disconnected now.
    Revoke {
        /// The device's id.
        device: String,
    },
    /// Change an enrolled device's tags and capabilities, without
    /// re-enrolling it. New `tag:`/`cap:` sends follow the change.
    Tag {
        /// The device's id.
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
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List enrolled devices.
    Devices {
        /// Print JSON instead of a table.
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
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A device's queue, in delivery order.
    Queue {
        /// The device whose queue to list.
        device: String,
        /// Only commands in this state.
        #[arg(long, value_enum, ignore_case = true)]
        state: Option<LiveState>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One command, live or finished.
    Show {
        /// The command's id (as `send` printed it).
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a command that has not ended.
    Cancel {
        /// The command's id.
        id: String,
    },
    /// Put a dead or failed command back in the queue.
    Retry {
        /// The command's id.
        id: String,
    },
    /// Follow lifecycle events as they happen.
    Watch {
        /// Only this device's events.
        #[arg(long)]
        device: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Run the reference device agent.
    Device(DeviceArgs),
    /// The audit log: who did what, from where, allowed or refused; or
    /// `--verify` its hash chain (on a stopped box's data dir too).
    Audit(audit::AuditArgs),
    /// Write a consistent snapshot of the running box (store, keys, device
    /// records, trust set, config) to one file.
    Backup(backup::BackupArgs),
    /// Restore a backup onto a stopped box's empty data dir.
    Restore(restore::RestoreArgs),
    /// Check the data dir, keys, certificates, the box, disk and database.
    Doctor {
        /// Print JSON instead of text.
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
    /// A change to many devices in stages, at a rate, stopping itself when
    /// failures rise: start, show, list, pause, resume, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// A fleet of edges under a NATS JetStream cluster: init, send, watch,
    /// status.
    #[command(subcommand)]
    Fleet(fleet::FleetCmd),
    /// Operator signing keys (OpenSSH ed25519): new, id.
    #[command(subcommand)]
    Key(key::KeyCmd),
    /// The box's trusted operator keys: add, list, remove.
    #[command(subcommand)]
    Trust(trust::TrustCmd),
    /// Files for devices (firmware, config, models), stored once in
    /// chunks: add, list, show, rm.
    #[command(subcommand)]
    Artifact(artifact::ArtifactCmd),
    /// Sign a command without sending it: an envelope (base64) for the HTTP
    /// API's envelope_b64 or a NATS Outpost-Envelope header.
    Sign(sign::SignCmd),
    /// Print shell completions.
    Completions {
        /// The shell to write them for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

/// The states a queued command can be in (`outpost queue --state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LiveState {
    /// Waiting for its device (or its `not_before`, or the command it runs after).
    Queued,
    /// Sent to its device, its ack not in yet.
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

/// `outpost bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Devices connected to the throwaway box.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Commands W1 sends.
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
    /// W2's restart, in a process of its own (run by `--restart`): open
    /// the box in DIR, wait for its first delivery, print JSON.
    #[arg(long, value_name = "DIR", hide = true)]
    pub reopen: Option<std::path::PathBuf>,
    /// W1 with the box as its own process: producers send through its
    /// admin socket, and the box's CPU per command, RSS and writes are
    /// reported apart from the devices'.
    #[arg(long, conflicts_with_all = ["idle", "restart", "signed", "rate", "artifact"])]
    pub box_process: bool,
    /// How long W3 stays idle.
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
    /// W1, then W1 again with every command operator-signed and the box
    /// requiring signatures; prints both and the ratio.
    #[arg(long, conflicts_with_all = ["idle", "restart"])]
    pub signed: bool,
    /// Instead of W1: a random file of this size (64MiB, 256MiB) added to a
    /// box (its own process) and fetched by --devices devices at once; in
    /// the same run, served by nginx over HTTPS to as many curl clients.
    #[arg(long, value_name = "SIZE", value_parser = crate::shell::config::parse_size,
          conflicts_with_all = ["idle", "restart", "signed"])]
    pub artifact: Option<u64>,
    /// Print the figures as JSON.
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
    pub timeout: crate::engine::duration::DurationArg,
    /// Where artifacts named by commands are fetched to and kept (default:
    /// beside the bundle, `dev-7.bundle` → `dev-7.artifacts/`).
    #[arg(long, env = "OUTPOST_ARTIFACT_DIR")]
    pub artifact_dir: Option<PathBuf>,
    /// Most disk the artifact dir may use, files and chunk cache together
    /// (512MiB, 2GB); the least recently used are evicted to make room.
    #[arg(long, env = "OUTPOST_MAX_ARTIFACT_DISK", default_value = "1GiB", value_parser = crate::shell::config::parse_size)]
    pub max_artifact_disk: u64,
    /// The box is taken as gone after this much silence on the link
    /// (keep-alives go at a third of it); shorter notices a dead path
    /// sooner, at the cost of more keep-alive traffic.
    #[arg(long, default_value = "25s")]
    pub idle_timeout: crate::engine::duration::DurationArg,
    /// A health check (`sh -c`), run after connecting and after each
    /// command that succeeded; its exit status goes to the box as this
    /// device's health (a rollout's `--health-within` waits for it).
    #[arg(long, value_name = "CMD")]
    pub health: Option<String>,
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
    let (file, file_path) = match crate::shell::config::FileConfig::load(cli.config.as_deref()) {
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
                    e.downcast_ref::<crate::shell::config::ConfigError>(),
                    e.downcast_ref::<crate::shell::backup::BackupError>(),
                ) {
                    (Some(a), _, _) => a.exit_code(),
                    (None, Some(c), _) => c.exit_code(),
                    (None, None, Some(b)) => b.exit_code(),
                    (None, None, None) => exit::ERROR,
                }
            };
            eprintln!("error: {}", render_error(&e));
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

/// A command, run or rollout id from the command line: a malformed one is
/// a usage error (exit 2), for every subcommand that takes one.
fn parse_id(s: &str) -> anyhow::Result<CommandId> {
    s.parse::<CommandId>()
        .map_err(|e| UsageError(e.to_string()).into())
}

async fn run(
    cmd: Cmd,
    data_dir: &Path,
    file: &crate::shell::config::FileConfig,
    file_path: Option<&Path>,
) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Serve(a) => {
            let c = crate::shell::config::resolve(&a, file, file_path)?;
            let mut o = serve_options(c, data_dir);
            o.config_file = file_path.map(Path::to_path_buf);
            crate::shell::serve::run(o).await?;
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
        Cmd::Enroll(a) => enroll::run(a, data_dir, file, file_path).await,
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
        Cmd::Devices { json, stats: true } => devices::stats(json, data_dir).await,
        Cmd::Devices { json, stats: false } => devices::list(json, data_dir).await,
        Cmd::Send(a) => send(a, data_dir).await,
        Cmd::Status { json } => status::run(json, data_dir).await,
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
            use crate::device::{run_agent, shutdown_signal, AgentOptions, Handler};
            let handler = match a.exec {
                Some(c) => Handler::Exec(c),
                None => Handler::Echo,
            };
            let mut o = AgentOptions::new(a.bundle, handler);
            o.command_timeout = a.timeout.into();
            o.connect.server = a.server;
            if let Some(d) = a.artifact_dir {
                o.artifact_dir = d;
            }
            o.max_artifact_disk = a.max_artifact_disk;
            o.health = a.health;
            let idle: std::time::Duration = a.idle_timeout.into();
            if idle < std::time::Duration::from_millis(500) {
                return Err(UsageError(format!(
                    "--idle-timeout {} is too short to keep a link up; use 500ms or more (default 25s)",
                    humantime::format_duration(idle)
                ))
                .into());
            }
            o.connect.idle_timeout = idle;
            o.connect.keep_alive = o.connect.keep_alive.min(idle / 3);
            run_agent(o, shutdown_signal()).await?;
            Ok(0)
        }
        Cmd::Demo => demo::run().await,
        Cmd::Audit(a) => audit::run(a, data_dir).await,
        Cmd::Backup(a) => backup::run(a, data_dir).await,
        Cmd::Restore(a) => restore::run(a, data_dir),
        Cmd::Doctor { json } => {
            // The reserve the box would run with, from the file and the
            // environment; only an explicit one can exceed the disk.
            let (reserve, schedule, bad_config) =
                match crate::shell::config::resolve_without_flags(file, file_path) {
                    Ok(c) => (
                        c.reserve_origin.map(|origin| doctor::Reserve {
                            bytes: c.limits.min_free_disk,
                            origin,
                        }),
                        c.backup,
                        None,
                    ),
                    Err(e) => (None, None, Some(e)),
                };
            let mut findings = doctor::check_with(data_dir, reserve).await;
            findings.push(doctor::backup_finding(
                schedule.as_ref(),
                crate::now_millis(),
            ));
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
            if let Some(d) = &a.reopen {
                let r = crate::bench::reopen(d).await?;
                crate::outln!("{}", serde_json::to_string(&r)?);
                return Ok(0);
            }
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
                let exe = std::env::current_exe().context("finding the outpost binary")?;
                let r = crate::bench::restart_bench(&exe, dir.path(), n, a.devices).await?;
                print_bench(a.json, &r, || r.table())?;
                return Ok(0);
            }
            if let Some(size) = a.artifact {
                let exe = std::env::current_exe().context("finding the outpost binary")?;
                if !a.json {
                    eprintln!(
                        "artifact bench: {size} bytes to {} devices in {} …",
                        a.devices,
                        dir.path().display()
                    );
                }
                let r = crate::bench::artifact::artifact_bench(&exe, dir.path(), size, a.devices)
                    .await?;
                print_bench(a.json, &r, || r.table())?;
                return Ok(0);
            }
            if a.box_process {
                let exe = std::env::current_exe().context("finding the outpost binary")?;
                let r = crate::bench::process::box_w1(
                    &exe,
                    dir.path(),
                    a.devices,
                    a.commands,
                    a.payload,
                    a.producers,
                )
                .await?;
                print_bench(a.json, &r, || r.table())?;
                return Ok(0);
            }
            if let Some(n) = a.idle {
                let exe = std::env::current_exe().context("finding the outpost binary")?;
                let r = crate::bench::idle_bench(&exe, dir.path(), n, a.idle_secs).await?;
                print_bench(a.json, &r, || r.table())?;
                return Ok(0);
            }
            let o = crate::bench::LinkBenchOptions {
                devices: a.devices,
                commands: a.commands,
                payload: a.payload,
                producers: a.producers,
                rate: a.rate,
                signed: false,
            };
            if !a.json {
                eprintln!("running W1 in {} …", dir.path().display());
            }
            let r = crate::bench::link_bench(dir.path(), &o).await?;
            print_bench(a.json, &r, || r.table())?;
            if a.signed {
                // The same W1 again on a fresh box that requires signatures:
                // the two figures come from one run, so their ratio holds.
                let dir2 = tempfile::tempdir_in(dir.path())?;
                if !a.json {
                    eprintln!("running W1 signed in {} …", dir2.path().display());
                }
                let s = crate::bench::link_bench(
                    dir2.path(),
                    &crate::bench::LinkBenchOptions { signed: true, ..o },
                )
                .await?;
                if a.json {
                    crate::outln!("{}", serde_json::to_string(&s)?);
                } else {
                    crate::out!("{}", s.table());
                    crate::outln!(
                        "signed / unsigned    {:>12.1} % of the throughput",
                        100.0 * s.throughput_per_s / r.throughput_per_s.max(1.0)
                    );
                }
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
            let w = match crate::engine::workflow::Workflow::load(&file) {
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
        Cmd::Rollout(r) => rollout::run(r, data_dir).await,
        Cmd::Fleet(f) => fleet::run(f).await,
        Cmd::Key(k) => key::run(k),
        Cmd::Trust(t) => trust::run(t, data_dir).await,
        Cmd::Artifact(a) => artifact::run(a, data_dir).await,
        Cmd::Sign(s) => sign::sign_cmd(s),
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut crate::stdout::Stdout)?;
            Ok(0)
        }
    }
}

fn serve_options(
    c: crate::shell::config::ServeConfig,
    data_dir: &Path,
) -> crate::shell::serve::ServeOptions {
    let mut o = crate::shell::serve::ServeOptions::new(data_dir.to_path_buf());
    o.listen = c.listen;
    o.sans = c.sans;
    o.advertise = c.advertise;
    o.link.window = c.limits.window;
    o.limits = c.limits;
    o.audit = c.audit;
    o.artifacts = c.artifacts;
    if c.reserve_origin.is_none() {
        if let Ok((total, _)) = crate::shell::store::fs_space_of(data_dir) {
            o.limits.min_free_disk = crate::shell::queue::default_reserve(total);
        }
    }
    o.store.cache_bytes = c.cache_bytes;
    o.metrics = c.metrics;
    o.http = c.http;
    o.http_opts = crate::shell::http::HttpOptions {
        token: c.http_token,
        admin: c.http_admin,
        tokens: c.http_tokens,
        max_payload: Some(o.limits.max_payload),
    };
    o.access = c.access;
    o.alerts = c.alerts;
    o.acl = c.acl;
    o.require_signed = c.require_signed;
    o.name = c.name;
    o.backup = c.backup;
    // EX_TEMPFAIL: systemd's Restart=on-failure brings the box back on a
    // reopened database.
    o.exit_on_store_failure = Some(exit::TEMPFAIL);
    o.upstream = c.upstream.map(|u| {
        let bundle = u
            .bundle
            .unwrap_or_else(|| data_dir.join(crate::shell::serve::UPSTREAM_BUNDLE));
        let mut opts = crate::shell::upstream::UplinkOptions::new(bundle, Some(u.server));
        opts.max_frame = o.link.max_frame;
        opts.artifact_rate = c.artifacts.uplink_rate;
        (opts, u.outbox_max)
    });
    o.nats = c.nats.map(|n| {
        let mut opts = crate::shell::upstream::nats::NatsOptions::new(n.urls, n.name);
        opts.creds = n.creds;
        opts.ca = n.ca;
        opts.client_cert = n.client_cert;
        (opts, n.outbox_max)
    });
    o
}

pub use crate::engine::command::rfc3339;

/// A bench's report: JSON with `--json`, else its table.
fn print_bench(
    json: bool,
    r: &impl serde::Serialize,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        crate::outln!("{}", serde_json::to_string(r)?);
    } else {
        crate::out!("{}", table());
    }
    Ok(())
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
        let e = anyhow::Error::new(crate::shell::config::ConfigError::Read {
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

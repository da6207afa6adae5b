//! Configuration: flags beat environment (`OUTPOST_*`) beat the TOML file
//! beat defaults (DESIGN §1).
//!
//! Why one file over 1,000 lines: the keys are one table (a flag, its
//! environment variable, its file key and its default side by side), and
//! the tests of each key's precedence and errors sit beside it.
//!
//! clap merges flags and environment (every `serve` flag has an `env`); it
//! must not also apply defaults, or a default would hide the file's value.
//! So flags are `Option`s, [`FileConfig`] is the file with the same keys,
//! and [`resolve`] fills what is still missing from the file, then from the
//! defaults.

use crate::shell::queue::Limits;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/outpost/outpost.toml";

/// Why the configuration is unusable. Each names the file or key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read: a `--config` path that is missing, or any
    /// read error (a missing default file is no error).
    #[error("cannot read the config file {}: {source}; fix the path given to --config (or OUTPOST_CONFIG)", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, has an unknown key, or a value of the wrong
    /// type.
    #[error("the config file {} is not valid: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, trimmed.
        message: String,
    },
    /// A key's value parses but cannot be used (out of range, not an
    /// address, a size or duration that does not parse, a missing partner).
    #[error("{key} = {value:?} in {origin}: {why}")]
    Value {
        /// The file key (`max_disk`), also naming its flag.
        key: &'static str,
        /// The value as written (empty where none was, "(hidden)" for a
        /// token).
        value: String,
        /// The file's path, `CLI_ORIGIN` for a flag or its variable, or
        /// "default".
        origin: String,
        /// What is wrong and the fix.
        why: String,
    },
    /// clap refused an `OUTPOST_*` variable when no flags were parsed
    /// (`resolve_without_flags`).
    #[error("the environment's serve settings (OUTPOST_*) are not valid: {0}")]
    Env(String),
}

impl ConfigError {
    /// The CLI exit code: a flag (or its variable) given wrong is a usage
    /// error (2); a config file that is wrong or unreadable is an error (1).
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Value { origin, .. } if origin == CLI_ORIGIN => crate::exit::USAGE,
            ConfigError::Env(_) => crate::exit::USAGE,
            _ => crate::exit::ERROR,
        }
    }
}

/// Where a value from a flag or its `OUTPOST_*` variable came from.
const CLI_ORIGIN: &str = "the command line or environment";

/// The smallest `max_disk`: one command with the largest payload must fit,
/// or the budget refuses every send.
pub const MIN_MAX_DISK: u64 = 1 << 20;

/// The TOML file. Unknown keys are refused, so a typo is an error naming
/// the key rather than a silently ignored setting.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The box's data dir (`--data-dir`, which beats it).
    pub data_dir: Option<PathBuf>,
    /// Address for devices (QUIC), `host:port` [default: [::]:7443].
    pub listen: Option<String>,
    /// `host:port` written into device bundles [default: the listen
    /// address, or `<hostname>:<port>` when listening on every address].
    pub advertise: Option<String>,
    /// Extra names or addresses for the server certificate; `--san` given
    /// at all replaces the whole list.
    pub san: Option<Vec<String>>,
    /// Unacked commands per device, at least 1 [default: 32].
    pub window: Option<u32>,
    /// Live commands held before new ones are refused or lower ones shed
    /// [default: 1000000].
    pub max_queued: Option<u64>,
    /// A size: `512MiB`, `2GB`, or a number of bytes.
    pub max_disk: Option<SizeValue>,
    /// Free space kept on the data dir's filesystem: a size.
    pub min_free_disk: Option<SizeValue>,
    /// Bytes of artifact chunks the box keeps at most: a size.
    pub max_artifact_disk: Option<SizeValue>,
    /// How long an artifact no live command names is kept: a duration.
    pub artifact_retention: Option<String>,
    /// Artifact bytes a second this edge draws from its hub: a size.
    pub uplink_rate: Option<SizeValue>,
    /// A duration: `1s`, `500ms`, or a number of seconds.
    pub backoff_base: Option<String>,
    /// Longest retry delay: a duration [default: 5m].
    pub backoff_cap: Option<String>,
    /// Time to live when the sender gives none: a duration [default: none].
    pub default_ttl: Option<String>,
    /// Attempts when the sender gives none [default: 5].
    pub max_attempts: Option<u32>,
    /// sled's page cache: a size, at least `store::MIN_CACHE_BYTES`
    /// [default: 8MiB].
    pub cache: Option<SizeValue>,
    /// Finished results kept for `show` [default: 100000].
    pub results_max: Option<usize>,
    /// How long finished results are kept: a duration [default: 7d].
    pub results_max_age: Option<String>,
    /// Audit entries kept, by count [default: 100000] and by age, a
    /// duration [default: 90d].
    pub audit_keep: Option<u64>,
    /// Audit entries' greatest age: a duration [default: 90d]. Like
    /// `audit_keep`, file-only: no flag or variable sets it.
    pub audit_max_age: Option<String>,
    /// Scheduled backups: how often (a duration), where, how many kept.
    pub backup_every: Option<String>,
    /// Where scheduled backups go; needed with `backup_every`.
    pub backup_dir: Option<PathBuf>,
    /// Scheduled backups kept, at least 1 [default: 3].
    pub backup_keep: Option<usize>,
    /// Prometheus metrics address, e.g. 127.0.0.1:9464 (off when absent).
    pub metrics: Option<String>,
    /// The hub above this box, `quic://HOST:PORT` (off when absent).
    pub upstream: Option<String>,
    /// This box's bundle from the hub (`outpost enroll NAME --gateway`).
    pub upstream_bundle: Option<PathBuf>,
    /// This box's name: the audience signed commands name, and its
    /// subjects under a NATS upstream (default: the uplink bundle's id,
    /// else the hostname).
    pub name: Option<String>,
    /// NATS credentials file (`.creds`).
    pub upstream_creds: Option<PathBuf>,
    /// A CA for the NATS servers' certificates (TLS is then required).
    pub upstream_ca: Option<PathBuf>,
    /// A client certificate and key for NATS.
    pub upstream_cert: Option<PathBuf>,
    /// The key of that client certificate; used only with it.
    pub upstream_key: Option<PathBuf>,
    /// Telemetry records (states, last-seen, events) kept for the hub while
    /// it is out of reach; results are always kept.
    pub outbox_max: Option<u64>,
    /// Which devices may send commands to which targets (`[[acl]]` tables,
    /// `from = [...]`, `to = [...]`). None: devices may not send (default
    /// deny).
    #[serde(default)]
    pub acl: Vec<crate::engine::route::AclRule>,
    /// The dashboard's address, e.g. 127.0.0.1:8080 (off when absent).
    pub http: Option<String>,
    /// The token the dashboard and its API require (needed off loopback).
    pub http_token: Option<String>,
    /// A file holding that token (first line), kept out of the config.
    pub http_token_file: Option<PathBuf>,
    /// Retry and cancel from the dashboard.
    pub http_admin: Option<bool>,
    /// Take only commands signed by a key in the trust set.
    pub require_signed: Option<bool>,
    /// Alert rules (`[[alert]]` tables).
    #[serde(default)]
    pub alert: Vec<crate::engine::alert::RuleConfig>,
    /// Roles on the admin socket by uid or user (`[[access]]` tables).
    #[serde(default)]
    pub access: Vec<crate::shell::admin::access::AccessEntry>,
    /// HTTP tokens with a role (`[[http_tokens]]` tables).
    #[serde(default)]
    pub http_tokens: Vec<crate::shell::http::access::TokenEntry>,
}

/// A size written as a number of bytes or a string with a unit.
#[derive(Clone, Debug)]
pub enum SizeValue {
    /// A TOML integer: bytes.
    Bytes(u64),
    /// A TOML string, parsed later by `parse_size` so its error names the
    /// key.
    Text(String),
}

// By hand rather than `untagged`: serde's untagged error ("did not match
// any variant of untagged enum") names neither the problem nor the fix.
impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SizeValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size: a number of bytes, or a string such as \"512MiB\" or \"2GB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SizeValue, E> {
                Ok(SizeValue::Bytes(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SizeValue, E> {
                u64::try_from(v).map(SizeValue::Bytes).map_err(|_| {
                    E::custom(format!(
                        "{v} is negative; a size is 0 or more bytes: write a number of bytes, or \"512MiB\", \"2GB\""
                    ))
                })
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<SizeValue, E> {
                Err(E::custom(format!(
                    "{v} is not a whole number of bytes; write a number of bytes, or a string such as \"1536MiB\""
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SizeValue, E> {
                Ok(SizeValue::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl FileConfig {
    /// Read `explicit`, or the default path if it exists. A missing default
    /// file is no error; a missing explicit one is.
    pub fn load(explicit: Option<&Path>) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((FileConfig::default(), None))
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let cfg = Self::parse(&text, &path)?;
        Ok((cfg, Some(path)))
    }

    /// Parse file text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })
    }
}

/// Parse a size: `512MiB`, `2GB`, `100`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "`{s}` is negative; a size is 0 or more bytes (write 512MiB, 2GB or a number of bytes)"
        ));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 512MiB or 2GB)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// `outpost serve` flags; each also reads its `OUTPOST_*` variable. None has
/// a clap default: see the module doc.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// Address for devices (QUIC) [default: [::]:7443]
    #[arg(long, env = "OUTPOST_LISTEN")]
    pub listen: Option<String>,
    /// Extra name or address for the server certificate (repeatable).
    #[arg(long, env = "OUTPOST_SAN", value_delimiter = ',')]
    pub san: Vec<String>,
    /// host:port written into device bundles [default: the listen address,
    /// or <hostname>:<port> when listening on every address]
    #[arg(long, env = "OUTPOST_ADVERTISE")]
    pub advertise: Option<String>,
    /// Unacked commands per device [default: 32]
    #[arg(long, env = "OUTPOST_WINDOW")]
    pub window: Option<u32>,
    /// Live commands held before new ones are refused or lower ones shed
    /// [default: 1000000]
    #[arg(long, env = "OUTPOST_MAX_QUEUED")]
    pub max_queued: Option<u64>,
    /// Bytes on disk before new commands are refused, e.g. 512MiB; at least
    /// 1MiB [default: none]
    #[arg(long, env = "OUTPOST_MAX_DISK", allow_negative_numbers = true)]
    pub max_disk: Option<String>,
    /// Free space kept on the data dir's filesystem: below it new commands
    /// are refused, so the database never meets a full disk [default: the
    /// smaller of 32MiB and 10% of that filesystem]
    #[arg(long, env = "OUTPOST_MIN_FREE_DISK", allow_negative_numbers = true)]
    pub min_free_disk: Option<String>,
    /// Bytes of artifact chunks kept at most, e.g. 4GiB; they count
    /// against --max-disk too [default: none]
    #[arg(long, env = "OUTPOST_MAX_ARTIFACT_DISK", allow_negative_numbers = true)]
    pub max_artifact_disk: Option<String>,
    /// How long an artifact no live command names is kept before it is
    /// removed, e.g. 7d, 12h [default: 7d]
    #[arg(
        long,
        env = "OUTPOST_ARTIFACT_RETENTION",
        allow_negative_numbers = true
    )]
    pub artifact_retention: Option<String>,
    /// Artifact bytes a second this edge draws from its hub while it
    /// stages, e.g. 1MiB (for 1 MiB/s); commands and results are not
    /// counted and never wait for it [default: no limit]
    #[arg(long, env = "OUTPOST_UPLINK_RATE", allow_negative_numbers = true)]
    pub uplink_rate: Option<String>,
    /// First retry delay after a failure; a bare number is seconds [default: 1s]
    #[arg(long, env = "OUTPOST_BACKOFF_BASE", allow_negative_numbers = true)]
    pub backoff_base: Option<String>,
    /// Longest retry delay; a bare number is seconds [default: 5m]
    #[arg(long, env = "OUTPOST_BACKOFF_CAP", allow_negative_numbers = true)]
    pub backoff_cap: Option<String>,
    /// Time to live when the sender gives none, e.g. 1h; a bare number is
    /// seconds [default: none]
    #[arg(long, env = "OUTPOST_DEFAULT_TTL", allow_negative_numbers = true)]
    pub default_ttl: Option<String>,
    /// Attempts when the sender gives none [default: 5]
    #[arg(long, env = "OUTPOST_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// sled's page cache, at least 256B [default: 8MiB]
    #[arg(long, env = "OUTPOST_CACHE", allow_negative_numbers = true)]
    pub cache: Option<String>,
    /// Finished results kept for `show` [default: 100000]
    #[arg(long, env = "OUTPOST_RESULTS_MAX")]
    pub results_max: Option<usize>,
    /// How long finished results are kept; a bare number is seconds
    /// [default: 7d]
    #[arg(long, env = "OUTPOST_RESULTS_MAX_AGE", allow_negative_numbers = true)]
    pub results_max_age: Option<String>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464
    /// [default: off]
    #[arg(long, env = "OUTPOST_METRICS")]
    pub metrics: Option<String>,
    /// The hub above this box, quic://HOST:PORT: commands come down, results
    /// and events go up, and the box works on offline [default: none]
    #[arg(long, env = "OUTPOST_UPSTREAM")]
    pub upstream: Option<String>,
    /// This box's bundle from the hub (made there with `outpost enroll
    /// NAME --gateway --out FILE`) [default: <data-dir>/upstream.bundle]
    #[arg(long, env = "OUTPOST_UPSTREAM_BUNDLE")]
    pub upstream_bundle: Option<PathBuf>,
    /// This box's name: the audience operator-signed commands must name,
    /// and under a NATS upstream its subjects (outpost.cmd.NAME.> and
    /// outpost.up.NAME.>) [default: the uplink bundle's id, else the
    /// hostname]
    #[arg(long, env = "OUTPOST_NAME")]
    pub name: Option<String>,
    /// Take a backup this often (e.g. 6h, 1d) into --backup-dir; what a
    /// restore cannot bring back is at most this old [default: off]
    #[arg(long, env = "OUTPOST_BACKUP_EVERY", allow_negative_numbers = true)]
    pub backup_every: Option<String>,
    /// Where scheduled backups go (another disk than the data dir's, best)
    #[arg(long, env = "OUTPOST_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Scheduled backups kept, the oldest removed first [default: 3]
    #[arg(long, env = "OUTPOST_BACKUP_KEEP")]
    pub backup_keep: Option<usize>,
    /// NATS credentials file, for --upstream nats://…
    #[arg(long, env = "OUTPOST_UPSTREAM_CREDS")]
    pub upstream_creds: Option<PathBuf>,
    /// CA certificate of the NATS servers (TLS is then required)
    #[arg(long, env = "OUTPOST_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Client certificate for NATS (with --upstream-key)
    #[arg(long, env = "OUTPOST_UPSTREAM_CERT", requires = "upstream_key")]
    pub upstream_cert: Option<PathBuf>,
    /// Client key for NATS (with --upstream-cert)
    #[arg(long, env = "OUTPOST_UPSTREAM_KEY", requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,
    /// Telemetry records kept for the hub while it is out of reach (results
    /// are always kept) [default: 100000]
    #[arg(long, env = "OUTPOST_OUTBOX_MAX")]
    pub outbox_max: Option<u64>,
    /// Serve the dashboard, its JSON API and /metrics on this address, e.g.
    /// 127.0.0.1:8080; off loopback it needs a token [default: off]
    #[arg(long, env = "OUTPOST_HTTP")]
    pub http: Option<String>,
    /// Token the dashboard and its API require (Authorization: Bearer, or
    /// ?token= in the page's address) [default: none, loopback only]
    #[arg(long, env = "OUTPOST_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Read that token from this file's first line
    #[arg(long, env = "OUTPOST_HTTP_TOKEN_FILE", conflicts_with = "http_token")]
    pub http_token_file: Option<PathBuf>,
    /// Let the dashboard retry and cancel commands (it asks to confirm)
    /// [default: read-only]
    #[arg(long, env = "OUTPOST_HTTP_ADMIN")]
    pub http_admin: bool,
    /// Take only commands signed by an operator key in the trust set
    /// (`outpost trust add`); unsigned ones are refused at intake, and
    /// devices enrolled from now on refuse them too [default: off]
    #[arg(long, env = "OUTPOST_REQUIRE_SIGNED")]
    pub require_signed: bool,
}

/// What `serve` runs with, every value settled.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The QUIC address devices connect to.
    pub listen: std::net::SocketAddr,
    /// `host:port` for device bundles; None: derived from `listen`.
    pub advertise: Option<String>,
    /// Extra subject alternative names for the server certificate.
    pub sans: Vec<String>,
    /// The queue's bounds and retry policy, the defaults with every key
    /// given applied.
    pub limits: Limits,
    /// Where an explicit `min_free_disk` came from; `None`: not set, so
    /// the box scales the reserve to its disk (`queue::default_reserve`).
    pub reserve_origin: Option<String>,
    /// sled's page cache in bytes.
    pub cache_bytes: u64,
    /// Where Prometheus metrics are served; None: off.
    pub metrics: Option<std::net::SocketAddr>,
    /// Which devices may send to which targets (empty: none may).
    pub acl: crate::engine::route::Acl,
    /// The hub's `host:port`, its bundle (None: `<data-dir>/upstream.bundle`)
    /// and the outbox bound, when the box has an uplink.
    pub upstream: Option<Upstream>,
    /// Or a NATS JetStream cluster above this edge.
    pub nats: Option<NatsUpstream>,
    /// Where the dashboard and its API are served; None: off.
    pub http: Option<std::net::SocketAddr>,
    /// The dashboard's admin token, trimmed and at least 16 characters
    /// (from `--http-token` or the first line of its file); None: loopback
    /// only.
    pub http_token: Option<String>,
    /// Whether the dashboard may retry and cancel commands.
    pub http_admin: bool,
    /// HTTP tokens with a role, besides `http_token` (admin).
    pub http_tokens: Vec<crate::shell::http::access::HttpToken>,
    /// Roles on the admin socket, by uid or user.
    pub access: crate::shell::admin::access::Access,
    /// The alert rules, checked.
    pub alerts: Vec<crate::engine::alert::Rule>,
    /// Whether only commands signed by a trusted operator key are taken.
    pub require_signed: bool,
    /// The box's name, when given (`--name`): the audience of signed
    /// commands. Unset: the uplink bundle's id, else the hostname.
    pub name: Option<String>,
    /// How many audit entries are kept, and for how long.
    pub audit: crate::engine::audit::Retention,
    /// What bounds the box's artifacts.
    pub artifacts: ArtifactLimits,
    /// Scheduled backups, when asked.
    pub backup: Option<crate::shell::backup::schedule::Schedule>,
}

/// What bounds the box's artifacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArtifactLimits {
    /// `max_artifact_disk` (`--max-disk` bounds them too, in `limits`).
    pub max_bytes: Option<u64>,
    /// `artifact_retention`.
    pub retention_ms: u64,
    /// `uplink_rate`: artifact bytes/s drawn from the hub.
    pub uplink_rate: Option<u64>,
}

impl Default for ArtifactLimits {
    fn default() -> Self {
        ArtifactLimits {
            max_bytes: None,
            retention_ms: crate::engine::artifact::retention::DEFAULT_RETENTION_MS,
            uplink_rate: None,
        }
    }
}

/// The NATS uplink's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsUpstream {
    /// `nats://h1:4222,nats://h2:4222`.
    pub urls: String,
    /// The edge's name, one subject token (`outpost.cmd.NAME.>`): `--name`,
    /// else the hostname's first label, else `edge`.
    pub name: String,
    /// The NATS credentials file (`.creds`); None: none sent.
    pub creds: Option<PathBuf>,
    /// A CA for the servers' certificates, which makes TLS required; None:
    /// async-nats's defaults.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key; None unless both are given.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Telemetry records the outbox keeps while NATS is out of reach, at
    /// least 1.
    pub outbox_max: u64,
}

/// The uplink's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The hub's `host:port`, from `quic://HOST:PORT` (or a bare
    /// `HOST:PORT`).
    pub server: String,
    /// This edge's bundle from the hub; None: `<data-dir>/upstream.bundle`.
    pub bundle: Option<PathBuf>,
    /// Telemetry records the outbox keeps while the hub is out of reach,
    /// at least 1.
    pub outbox_max: u64,
}

/// Default bound of the outbox's telemetry.
pub const DEFAULT_OUTBOX_MAX: u64 = 100_000;

/// `--backup-every`, `--backup-dir`, `--backup-keep` (flags beat the file).
fn backup_schedule(
    args: &ServeArgs,
    file: &FileConfig,
    cli: &str,
    f: &str,
) -> Result<Option<crate::shell::backup::schedule::Schedule>, ConfigError> {
    let picked = match (&args.backup_every, &file.backup_every) {
        (Some(v), _) => Some((v.clone(), cli.to_string())),
        (None, Some(v)) => Some((v.clone(), f.to_string())),
        (None, None) => None,
    };
    let Some((v, o)) = picked else {
        if args.backup_dir.is_some() || args.backup_keep.is_some() {
            return Err(ConfigError::Value {
                key: "backup_every",
                value: String::new(),
                origin: cli.to_string(),
                why: "--backup-dir and --backup-keep need --backup-every (how often)".into(),
            });
        }
        return Ok(None);
    };
    let every = duration("backup_every", &v, &o)?;
    if every < Duration::from_secs(1) {
        return Err(ConfigError::Value {
            key: "backup_every",
            value: v,
            origin: o,
            why: "must be at least 1s (each backup pauses the queue while it reads the store)"
                .into(),
        });
    }
    let dir = match (&args.backup_dir, &file.backup_dir) {
        (Some(d), _) | (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(ConfigError::Value {
                key: "backup_dir",
                value: String::new(),
                origin: o,
                why: "scheduled backups need a --backup-dir (backup_dir in the config file), best on another disk than the data dir".into(),
            })
        }
    };
    let (keep, origin) = match (args.backup_keep, file.backup_keep) {
        (Some(k), _) => (k, cli.to_string()),
        (None, Some(k)) => (k, f.to_string()),
        (None, None) => (crate::shell::backup::schedule::DEFAULT_KEEP, String::new()),
    };
    if keep == 0 {
        return Err(ConfigError::Value {
            key: "backup_keep",
            value: "0".into(),
            origin,
            why: "keep at least 1 backup".into(),
        });
    }
    Ok(Some(crate::shell::backup::schedule::Schedule {
        every,
        dir,
        keep,
    }))
}

fn duration(key: &'static str, v: &str, origin: &str) -> Result<Duration, ConfigError> {
    crate::engine::duration::parse(v.trim()).map_err(|e| ConfigError::Value {
        key,
        value: v.into(),
        origin: origin.into(),
        why: e,
    })
}

fn size(key: &'static str, v: &str, origin: &str) -> Result<u64, ConfigError> {
    parse_size(v).map_err(|why| ConfigError::Value {
        key,
        value: v.into(),
        origin: origin.into(),
        why,
    })
}

fn size_value(key: &'static str, v: &SizeValue, origin: &str) -> Result<u64, ConfigError> {
    match v {
        SizeValue::Bytes(n) => Ok(*n),
        SizeValue::Text(t) => size(key, t, origin),
    }
}

fn size_text(v: &SizeValue) -> String {
    match v {
        SizeValue::Bytes(n) => n.to_string(),
        SizeValue::Text(t) => t.clone(),
    }
}

/// A size for people: `8 MiB`, `256 B`, `1.5 GiB`.
pub fn show_size(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (u, name) in UNITS {
        if n >= u {
            return if n % u == 0 {
                format!("{} {name}", n / u)
            } else {
                format!("{:.1} {name}", n as f64 / u as f64)
            };
        }
    }
    format!("{n} B")
}

/// What `outpost serve` would run with if started now with no flags: the
/// environment (`OUTPOST_*`) over the file over the defaults. Commands that
/// act for a box that is not running (`doctor`, an offline `enroll`) use it
/// to act as that box would.
pub fn resolve_without_flags(
    file: &FileConfig,
    file_path: Option<&Path>,
) -> Result<ServeConfig, ConfigError> {
    #[derive(clap::Parser)]
    struct EnvOnly {
        #[command(flatten)]
        args: ServeArgs,
    }
    let args = <EnvOnly as clap::Parser>::try_parse_from(["outpost"])
        .map_err(|e| ConfigError::Env(e.to_string().trim().to_string()))?
        .args;
    resolve(&args, file, file_path)
}

/// Settle every value: flag or env, else file, else default.
pub fn resolve(
    args: &ServeArgs,
    file: &FileConfig,
    file_path: Option<&Path>,
) -> Result<ServeConfig, ConfigError> {
    let f = file_path.map_or_else(|| "(no file)".to_string(), |p| p.display().to_string());
    let cli = CLI_ORIGIN;
    let d = Limits::default();
    let pick_str = |a: &Option<String>, b: &Option<String>| -> Option<(String, String)> {
        a.clone()
            .map(|v| (v, cli.to_string()))
            .or_else(|| b.clone().map(|v| (v, f.clone())))
    };

    let (listen_s, listen_origin) =
        pick_str(&args.listen, &file.listen).unwrap_or(("[::]:7443".into(), "default".into()));
    let listen = listen_s.parse().map_err(|_| ConfigError::Value {
        key: "listen",
        value: listen_s.clone(),
        origin: listen_origin,
        why: "not an address; write host:port, e.g. [::]:7443 or 0.0.0.0:7443".into(),
    })?;
    let window_origin = if args.window.is_some() {
        cli.to_string()
    } else {
        f.clone()
    };
    let mut limits = Limits {
        window: args.window.or(file.window).unwrap_or(d.window),
        max_queued: args.max_queued.or(file.max_queued).unwrap_or(d.max_queued),
        default_max_attempts: args
            .max_attempts
            .or(file.max_attempts)
            .unwrap_or(d.default_max_attempts),
        results_max: args
            .results_max
            .or(file.results_max)
            .unwrap_or(d.results_max),
        ..d.clone()
    };
    if limits.window == 0 {
        return Err(ConfigError::Value {
            key: "window",
            value: "0".into(),
            origin: window_origin,
            why: "must be at least 1".into(),
        });
    }
    let reserve_origin = match (&args.min_free_disk, &file.min_free_disk) {
        (Some(v), _) => Some((size("min_free_disk", v, cli)?, cli.to_string())),
        (None, Some(v)) => Some((size_value("min_free_disk", v, &f)?, f.clone())),
        (None, None) => None,
    }
    .map(|(v, origin)| {
        limits.min_free_disk = v;
        origin
    });
    limits.max_disk = match (&args.max_disk, &file.max_disk) {
        (Some(v), _) => Some((size("max_disk", v, cli)?, v.clone(), cli.to_string())),
        (None, Some(v)) => Some((size_value("max_disk", v, &f)?, size_text(v), f.clone())),
        (None, None) => None,
    }
    .map(|(n, text, origin)| {
        if n < MIN_MAX_DISK {
            return Err(ConfigError::Value {
                key: "max_disk",
                value: text,
                origin,
                why: format!(
                    "is below the minimum of {} (one command of the largest payload must fit); use at least 1MiB, or leave it unset for no budget",
                    show_size(MIN_MAX_DISK)
                ),
            });
        }
        Ok(n)
    })
    .transpose()?;
    if let Some((v, o)) = pick_str(&args.backoff_base, &file.backoff_base) {
        limits.backoff_base_ms = duration("backoff_base", &v, &o)?.as_millis() as u64;
    }
    if let Some((v, o)) = pick_str(&args.backoff_cap, &file.backoff_cap) {
        limits.backoff_cap_ms = duration("backoff_cap", &v, &o)?.as_millis() as u64;
    }
    if let Some((v, o)) = pick_str(&args.default_ttl, &file.default_ttl) {
        limits.default_ttl_ms = Some(duration("default_ttl", &v, &o)?.as_millis() as u64);
    }
    if let Some((v, o)) = pick_str(&args.results_max_age, &file.results_max_age) {
        limits.results_max_age_ms = duration("results_max_age", &v, &o)?.as_millis() as u64;
    }
    let cache_bytes = match (&args.cache, &file.cache) {
        (Some(v), _) => Some((size("cache", v, cli)?, v.clone(), cli.to_string())),
        (None, Some(v)) => Some((size_value("cache", v, &f)?, size_text(v), f.clone())),
        (None, None) => None,
    };
    let cache_bytes = match cache_bytes {
        None => crate::shell::store::DEFAULT_CACHE_BYTES,
        Some((n, _, _)) if n >= crate::shell::store::MIN_CACHE_BYTES => n,
        Some((n, text, origin)) => {
            return Err(ConfigError::Value {
                key: "cache",
                value: text,
                origin,
                why: format!(
                    "{} is below sled's minimum of {}; use at least {} (default {})",
                    show_size(n),
                    show_size(crate::shell::store::MIN_CACHE_BYTES),
                    show_size(crate::shell::store::MIN_CACHE_BYTES),
                    show_size(crate::shell::store::DEFAULT_CACHE_BYTES)
                ),
            })
        }
    };
    let metrics = match pick_str(&args.metrics, &file.metrics) {
        None => None,
        Some((v, origin)) => Some(v.parse().map_err(|_| ConfigError::Value {
            key: "metrics",
            value: v.clone(),
            origin,
            why: "not an address; write host:port, e.g. 127.0.0.1:9464".into(),
        })?),
    };
    let acl = crate::engine::route::Acl::new(file.acl.clone()).map_err(|e| ConfigError::Value {
        key: "acl",
        value: e.text.clone(),
        origin: f.clone(),
        why: format!("{e}; a pattern is *, a device id, tag:NAME or cap:NAME"),
    })?;
    let outbox_max = args
        .outbox_max
        .or(file.outbox_max)
        .unwrap_or(DEFAULT_OUTBOX_MAX)
        .max(1);
    let picked = pick_str(&args.upstream, &file.upstream);
    let nats = match &picked {
        Some((v, origin)) if crate::shell::upstream::nats::is_nats_url(v) => {
            let urls =
                crate::shell::upstream::nats::parse_urls(v).map_err(|why| ConfigError::Value {
                    key: "upstream",
                    value: v.clone(),
                    origin: origin.clone(),
                    why,
                })?;
            let (name, origin) = match pick_str(&args.name, &file.name) {
                Some(n) => n,
                None => (
                    crate::identity::hostname()
                        .and_then(|h| h.split('.').next().map(str::to_string))
                        .unwrap_or_else(|| "edge".into()),
                    "the hostname".to_string(),
                ),
            };
            crate::shell::upstream::nats::check_name(&name).map_err(|why| ConfigError::Value {
                key: "name",
                value: name.clone(),
                origin,
                why,
            })?;
            let pick_path =
                |a: &Option<PathBuf>, f: &Option<PathBuf>| a.clone().or_else(|| f.clone());
            let cert = pick_path(&args.upstream_cert, &file.upstream_cert);
            let key = pick_path(&args.upstream_key, &file.upstream_key);
            Some(NatsUpstream {
                urls,
                name,
                creds: pick_path(&args.upstream_creds, &file.upstream_creds),
                ca: pick_path(&args.upstream_ca, &file.upstream_ca),
                client_cert: cert.zip(key),
                outbox_max,
            })
        }
        _ => None,
    };
    let upstream = match picked {
        None => None,
        Some(_) if nats.is_some() => None,
        Some((v, origin)) => Some(Upstream {
            server: crate::shell::upstream::parse_url(&v).map_err(|why| ConfigError::Value {
                key: "upstream",
                value: v.clone(),
                origin,
                why,
            })?,
            bundle: args
                .upstream_bundle
                .clone()
                .or_else(|| file.upstream_bundle.clone()),
            outbox_max,
        }),
    };
    let http = match pick_str(&args.http, &file.http) {
        None => None,
        Some((v, origin)) => Some(v.parse().map_err(|_| ConfigError::Value {
            key: "http",
            value: v.clone(),
            origin,
            why: "not an address; write host:port, e.g. 127.0.0.1:8080".into(),
        })?),
    };
    let token_file = match (&args.http_token, &args.http_token_file) {
        (Some(_), _) => None,
        (None, Some(p)) => Some((p.clone(), cli.to_string())),
        (None, None) if file.http_token.is_none() => {
            file.http_token_file.clone().map(|p| (p, f.clone()))
        }
        (None, None) => None,
    };
    let http_token = match token_file {
        Some((p, origin)) => {
            let text = std::fs::read_to_string(&p).map_err(|e| ConfigError::Value {
                key: "http_token_file",
                value: p.display().to_string(),
                origin: origin.clone(),
                why: format!("cannot read it: {e}"),
            })?;
            Some((text.lines().next().unwrap_or("").trim().to_string(), origin))
        }
        None => pick_str(&args.http_token, &file.http_token),
    };
    let http_token =
        match http_token {
            Some((t, origin)) if t.trim().is_empty() => {
                return Err(ConfigError::Value {
                    key: "http_token",
                    value: String::new(),
                    origin,
                    why: "is empty; a token needs at least 16 characters".into(),
                })
            }
            Some((t, origin)) if t.trim().len() < 16 => return Err(ConfigError::Value {
                key: "http_token",
                value: "(hidden)".into(),
                origin,
                why:
                    "is shorter than 16 characters; make a longer one (e.g. `openssl rand -hex 16`)"
                        .into(),
            }),
            Some((t, _)) => Some(t.trim().to_string()),
            None => None,
        };
    let alerts = crate::engine::alert::check_rules(&file.alert, limits.max_disk).map_err(|e| {
        ConfigError::Value {
            key: "alert",
            value: String::new(),
            origin: f.clone(),
            why: e.to_string(),
        }
    })?;
    let access = crate::shell::admin::access::Access::resolve(&file.access).map_err(|e| {
        ConfigError::Value {
            key: "access",
            value: String::new(),
            origin: f.clone(),
            why: e.to_string(),
        }
    })?;
    let http_tokens =
        crate::shell::http::access::resolve_tokens(&file.http_tokens, http_token.as_deref())
            .map_err(|e| ConfigError::Value {
                key: "http_tokens",
                value: String::new(),
                origin: f.clone(),
                why: e.to_string(),
            })?;
    let mut audit = crate::engine::audit::Retention::default();
    if let Some(n) = file.audit_keep {
        audit.keep = n;
    }
    if let Some(v) = &file.audit_max_age {
        audit.max_age_ms = duration("audit_max_age", v, &f)?.as_millis() as u64;
    }
    let mut artifacts = ArtifactLimits {
        max_bytes: match (&args.max_artifact_disk, &file.max_artifact_disk) {
            (Some(v), _) => Some(size("max_artifact_disk", v, cli)?),
            (None, Some(v)) => Some(size_value("max_artifact_disk", v, &f)?),
            (None, None) => None,
        },
        uplink_rate: match (&args.uplink_rate, &file.uplink_rate) {
            (Some(v), _) => Some(size("uplink_rate", v, cli)?),
            (None, Some(v)) => Some(size_value("uplink_rate", v, &f)?),
            (None, None) => None,
        },
        ..ArtifactLimits::default()
    };
    if artifacts.uplink_rate == Some(0) {
        return Err(ConfigError::Value {
            key: "uplink_rate",
            value: "0".into(),
            origin: cli.to_string(),
            why: "must be at least 1 byte a second; leave it unset for no limit".into(),
        });
    }
    if let Some((v, o)) = pick_str(&args.artifact_retention, &file.artifact_retention) {
        artifacts.retention_ms = duration("artifact_retention", &v, &o)?.as_millis() as u64;
    }
    let backup = backup_schedule(args, file, cli, &f)?;
    Ok(ServeConfig {
        backup,
        access,
        http_tokens,
        audit,
        artifacts,
        http,
        http_token,
        http_admin: args.http_admin || file.http_admin.unwrap_or(false),
        require_signed: args.require_signed || file.require_signed.unwrap_or(false),
        name: pick_str(&args.name, &file.name).map(|(n, _)| n),
        alerts,
        upstream,
        nats,
        acl,
        metrics,
        listen,
        advertise: args.advertise.clone().or_else(|| file.advertise.clone()),
        sans: if args.san.is_empty() {
            file.san.clone().unwrap_or_default()
        } else {
            args.san.clone()
        },
        limits,
        reserve_origin,
        cache_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileConfig {
        FileConfig::parse(text, Path::new("/etc/outpost/outpost.toml")).unwrap()
    }

    #[test]
    fn each_value_that_cannot_work_names_its_key_where_it_came_from_and_what_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty-token");
        std::fs::write(&empty, "\n").unwrap();
        let missing = dir.path().join("no-such-token");
        // (the file, what the error must hold)
        let cases = [
            (
                "backup_every = \"500ms\"".to_string(),
                "backup_every = \"500ms\" in /etc/outpost/outpost.toml: must be at least 1s",
            ),
            (
                "http = \"nonsense\"".into(),
                "http = \"nonsense\" in /etc/outpost/outpost.toml: not an address; write host:port",
            ),
            (
                format!(
                    "http = \"127.0.0.1:8080\"\nhttp_token_file = {:?}",
                    missing.display().to_string()
                ),
                "cannot read it",
            ),
            (
                format!(
                    "http = \"127.0.0.1:8080\"\nhttp_token_file = {:?}",
                    empty.display().to_string()
                ),
                "is empty; a token needs at least 16 characters",
            ),
            (
                "uplink_rate = 0".into(),
                "must be at least 1 byte a second; leave it unset for no limit",
            ),
            ("cache = 1.5".into(), "is not a whole number of bytes"),
            ("upstream = \"nats://\"".into(), "upstream = \"nats://\""),
            (
                "upstream = \"nats://127.0.0.1:4222\"\nname = \"a.b\"".into(),
                "name = \"a.b\"",
            ),
        ];
        for (text, words) in cases {
            let e = FileConfig::parse(&text, Path::new("/etc/outpost/outpost.toml"))
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    resolve(
                        &ServeArgs::default(),
                        &f,
                        Some(Path::new("/etc/outpost/outpost.toml")),
                    )
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                })
                .unwrap_err();
            assert!(e.contains(words), "`{words}` not in: {e}\n{text}");
        }
        // A flag that needs another names both.
        let args = ServeArgs {
            backup_keep: Some(3),
            ..Default::default()
        };
        let e = resolve(&args, &file(""), None).unwrap_err().to_string();
        assert!(
            e.contains("--backup-dir and --backup-keep need --backup-every"),
            "{e}"
        );
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let f = file("window = 8\nmax_queued = 500\nbackoff_base = \"2s\"\nmax_disk = \"1GiB\"\nlisten = \"127.0.0.1:9000\"");
        let args = ServeArgs {
            window: Some(4),
            ..Default::default()
        };
        let c = resolve(&args, &f, Some(Path::new("x.toml"))).unwrap();
        assert_eq!(c.limits.window, 4, "flag wins");
        assert_eq!(c.limits.max_queued, 500, "file fills what the flags leave");
        assert_eq!(c.limits.backoff_base_ms, 2000);
        assert_eq!(c.limits.max_disk, Some(1 << 30));
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(
            c.limits.backoff_cap_ms,
            Limits::default().backoff_cap_ms,
            "default for the rest"
        );
        let c = resolve(&ServeArgs::default(), &FileConfig::default(), None).unwrap();
        assert_eq!(c.listen.to_string(), "[::]:7443");
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn dashboard_keys_and_alert_rules_come_from_the_file_and_a_short_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("token");
        std::fs::write(&tf, "0123456789abcdef0123\n").unwrap();
        let f = file(&format!(
            "http = \"127.0.0.1:8080\"\nhttp_token_file = {:?}\nhttp_admin = true\nmax_disk = \"1GiB\"\n\
             [[alert]]\nname = \"backlog\"\nkind = \"queue_depth_above\"\nvalue = 100\nfor = \"1m\"\n",
            tf.display().to_string()
        ));
        let c = resolve(&ServeArgs::default(), &f, None).unwrap();
        assert_eq!(c.http.unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(c.http_token.as_deref(), Some("0123456789abcdef0123"));
        assert!(c.http_admin);
        assert_eq!(c.alerts.len(), 1);
        assert_eq!(c.alerts[0].for_ms, 60_000);
        let args = ServeArgs {
            http_token: Some("short".into()),
            ..Default::default()
        };
        let e = resolve(&args, &f, None).unwrap_err().to_string();
        assert!(e.contains("shorter than 16"), "{e}");
        assert!(!e.contains("short\""), "the token is not printed: {e}");
        let bad = file("[[alert]]\nname = \"x\"\nkind = \"nope\"\nvalue = 1\n");
        let e = resolve(&ServeArgs::default(), &bad, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown kind `nope`"), "{e}");
    }

    #[test]
    fn the_uplink_comes_from_flags_or_the_file_and_a_bad_url_names_the_key() {
        let f = file("upstream = \"quic://hub.local:7443\"\nupstream_bundle = \"/etc/outpost/e1.bundle\"\noutbox_max = 50");
        let c = resolve(&ServeArgs::default(), &f, None).unwrap();
        assert_eq!(
            c.upstream,
            Some(Upstream {
                server: "hub.local:7443".into(),
                bundle: Some(PathBuf::from("/etc/outpost/e1.bundle")),
                outbox_max: 50,
            })
        );
        let args = ServeArgs {
            upstream: Some("quic://10.0.0.1:9".into()),
            ..Default::default()
        };
        let c = resolve(&args, &f, None).unwrap();
        assert_eq!(c.upstream.unwrap().server, "10.0.0.1:9", "the flag wins");
        assert_eq!(
            resolve(&ServeArgs::default(), &FileConfig::default(), None)
                .unwrap()
                .upstream,
            None
        );
        let bad = file("upstream = \"http://hub:80\"");
        let e = resolve(&ServeArgs::default(), &bad, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream") && e.contains("quic://"), "{e}");
    }

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn sizes_in_the_file_may_be_numbers_or_text() {
        let c = resolve(
            &ServeArgs::default(),
            &file("cache = 1048576\nmax_disk = \"2GB\""),
            None,
        )
        .unwrap();
        assert_eq!(c.cache_bytes, 1 << 20);
        assert_eq!(c.limits.max_disk, Some(2_000_000_000));
    }

    #[test]
    fn sizes_below_what_the_box_can_run_with_are_refused_with_the_allowed_range() {
        let args = ServeArgs {
            cache: Some("100B".into()),
            ..Default::default()
        };
        let e = resolve(&args, &FileConfig::default(), None).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let m = e.to_string();
        assert!(
            m.contains("cache") && m.contains("minimum of 256 B") && m.contains("default 8 MiB"),
            "{m}"
        );
        let c = resolve(
            &ServeArgs::default(),
            &file(&format!("cache = {}", crate::shell::store::MIN_CACHE_BYTES)),
            None,
        )
        .unwrap();
        assert_eq!(
            c.cache_bytes,
            crate::shell::store::MIN_CACHE_BYTES,
            "the minimum itself is allowed"
        );
        let e = resolve(
            &ServeArgs::default(),
            &file("max_disk = \"64KiB\""),
            Some(Path::new("/etc/o.toml")),
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 1, "a wrong file is no usage error");
        let e = e.to_string();
        assert!(
            e.contains("max_disk") && e.contains("/etc/o.toml") && e.contains("at least 1MiB"),
            "{e}"
        );
        assert!(resolve(&ServeArgs::default(), &file("max_disk = 0"), None).is_err());
        assert_eq!(
            resolve(&ServeArgs::default(), &file("max_disk = \"1MiB\""), None)
                .unwrap()
                .limits
                .max_disk,
            Some(MIN_MAX_DISK)
        );
    }

    #[test]
    fn an_explicit_reserve_says_where_it_came_from_and_an_unset_one_scales() {
        let c = resolve(&ServeArgs::default(), &FileConfig::default(), None).unwrap();
        assert_eq!(c.reserve_origin, None);
        let c = resolve(
            &ServeArgs::default(),
            &file("min_free_disk = \"1GiB\""),
            Some(Path::new("/etc/o.toml")),
        )
        .unwrap();
        assert_eq!(c.limits.min_free_disk, 1 << 30);
        assert_eq!(c.reserve_origin.as_deref(), Some("/etc/o.toml"));
        assert_eq!(
            crate::shell::queue::default_reserve(64 << 20),
            (64 << 20) / 10
        );
        assert_eq!(crate::shell::queue::default_reserve(100 << 30), 32 << 20);
    }

    #[test]
    fn a_typo_in_the_file_names_the_key_and_the_file() {
        let e = FileConfig::parse("windw = 3", Path::new("/etc/outpost/outpost.toml")).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("/etc/outpost/outpost.toml") && m.contains("windw"),
            "{m}"
        );
    }

    #[test]
    fn bad_values_say_where_they_came_from_and_how_to_write_them() {
        let e = resolve(
            &ServeArgs::default(),
            &file("backoff_cap = \"soon\""),
            Some(Path::new("/etc/o.toml")),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("backoff_cap") && m.contains("/etc/o.toml") && m.contains("5m"),
            "{m}"
        );
        let args = ServeArgs {
            max_disk: Some("12 parsecs".into()),
            ..Default::default()
        };
        let m = resolve(&args, &FileConfig::default(), None)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("max_disk") && m.contains("unknown size unit"),
            "{m}"
        );
        let args = ServeArgs {
            listen: Some("nowhere".into()),
            ..Default::default()
        };
        assert!(resolve(&args, &FileConfig::default(), None)
            .unwrap_err()
            .to_string()
            .contains("host:port"));
    }

    #[test]
    fn a_missing_explicit_file_is_an_error_a_missing_default_is_not() {
        let e = FileConfig::load(Some(Path::new("/nonexistent/outpost.toml"))).unwrap_err();
        assert!(e.to_string().contains("--config"), "{e}");
        // The default path normally does not exist on a development machine.
        if !Path::new(DEFAULT_CONFIG).exists() {
            assert!(FileConfig::load(None).unwrap().1.is_none());
        }
    }

    #[test]
    fn the_shipped_example_file_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/outpost.toml"
        ))
        .unwrap();
        let f = FileConfig::parse(&text, Path::new("packaging/outpost.toml")).unwrap();
        resolve(&ServeArgs::default(), &f, None).unwrap();
        // Every commented-out setting is a real key with a valid value.
        let on: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.starts_with("[[") || rest.contains(" = ") => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let f = FileConfig::parse(&on, Path::new("uncommented")).unwrap();
        let c = resolve(&ServeArgs::default(), &f, None).unwrap();
        assert!(!c.acl.is_empty(), "the example enables an ACL rule");
        assert_eq!(c.alerts.len(), 1, "and an alert rule");
        assert!(
            c.http.is_some() && c.http_token.is_some(),
            "and the dashboard"
        );
        assert_eq!(c.http_tokens.len(), 1, "and a role token");
        assert_eq!(
            c.artifacts,
            ArtifactLimits {
                max_bytes: Some(4 << 30),
                retention_ms: 7 * 24 * 3600 * 1000,
                uplink_rate: Some(1 << 20),
            },
            "and the artifacts' budget and retention"
        );
        assert!(c.access.grant(61001).is_ok(), "and a socket role");
        assert_eq!(
            c.backup,
            Some(crate::shell::backup::schedule::Schedule {
                every: Duration::from_secs(6 * 3600),
                dir: "/mnt/backup/outpost".into(),
                keep: 3,
            }),
            "and scheduled backups"
        );
    }

    #[test]
    fn roles_come_from_the_file_and_a_bad_table_names_itself() {
        let f = file(
            "[[access]]\nuid = 4242\nrole = \"viewer\"\n\
             [[http_tokens]]\nname = \"mes\"\ntoken = \"mes-0123456789abcdef\"\nrole = \"operator\"\ntargets = [\"tag:line-3\"]\n",
        );
        let c = resolve(&ServeArgs::default(), &f, None).unwrap();
        assert_eq!(
            c.access.grant(4242).unwrap().role,
            crate::engine::trust::Role::Viewer
        );
        assert!(c.access.grant(4243).is_err(), "default deny");
        assert_eq!(c.http_tokens[0].name, "mes");
        assert_eq!(c.http_tokens[0].grant.targets.len(), 1);
        let bad = file("[[access]]\nuser = \"no-such-user-outpost\"\nrole = \"viewer\"\n");
        let e = resolve(&ServeArgs::default(), &bad, Some(Path::new("/etc/o.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/o.toml") && e.contains("[[access]] #1") && e.contains("no user"),
            "{e}"
        );
        let bad = file("[[http_tokens]]\ntoken = \"short\"\nrole = \"viewer\"\n");
        let e = resolve(&ServeArgs::default(), &bad, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[[http_tokens]] #1") && e.contains("shorter"),
            "{e}"
        );
        assert!(FileConfig::parse(
            "[[access]]\nuid = 1\nrole = \"viewer\"\ngid = 3\n",
            Path::new("x")
        )
        .unwrap_err()
        .to_string()
        .contains("gid"));
    }

    #[test]
    fn a_bad_acl_pattern_names_the_key() {
        let f = FileConfig::parse(
            "[[acl]]\nfrom = [\"tag:\"]\nto = [\"*\"]\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let e = resolve(&ServeArgs::default(), &f, Some(Path::new("x.toml"))).unwrap_err();
        assert!(
            e.to_string().contains("acl") && e.to_string().contains("x.toml"),
            "{e}"
        );
        let e = FileConfig::parse("[[acl]]\nfrom = []\nto = []\nby = 1\n", Path::new("x.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("by"), "{e}");
    }
}

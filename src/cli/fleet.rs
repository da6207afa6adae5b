//! `outpost fleet …`: operators at fleet level, over a NATS JetStream
//! cluster with edges under it (issue 13). Everything here is what any
//! NATS client could do with the subject scheme of `upstream::nats`; these
//! commands only save typing.

use super::SendArgs;
use crate::engine::command::CommandId;
use crate::shell::upstream::nats::{self, NatsOptions, CMD_STREAM, UP_STREAM};
use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use std::path::PathBuf;
use std::time::Duration;

/// How to reach the cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// The cluster: nats://HOST:PORT[,nats://HOST2:PORT…]
    #[arg(long, env = "OUTPOST_NATS")]
    pub nats: String,
    /// NATS credentials file.
    #[arg(long, env = "OUTPOST_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// CA of the servers' certificates (TLS is then required).
    #[arg(long, env = "OUTPOST_NATS_CA")]
    pub ca: Option<PathBuf>,
}

/// `outpost fleet …`.
#[derive(Debug, clap::Subcommand)]
// Parsed once per process; the size of `send`'s flags costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
pub enum FleetCmd {
    /// Create the fleet's two streams (OUTPOST_CMD, OUTPOST_UP); safe to
    /// run again. Refuses if they exist with another config.
    Init {
        /// The cluster.
        #[command(flatten)]
        nats: NatsArgs,
        /// Copies of each stream in the cluster (1, 3 or 5).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// How long to keep asking a cluster that is still forming
        /// (electing its leader, gathering its peers).
        #[arg(long, default_value = "60s", allow_negative_numbers = true)]
        wait: crate::engine::duration::DurationArg,
    },
    /// Send a command to EDGE/TARGET (EDGE/dev-7, EDGE/tag:line-3,
    /// EDGE/cap:camera, EDGE/workflow FILE).
    Send {
        /// The cluster.
        #[command(flatten)]
        nats: NatsArgs,
        /// What to send, as `outpost send` takes it.
        #[command(flatten)]
        send: SendArgs,
    },
    /// Print what the edges report (states, results, events, devices).
    Watch {
        /// The cluster.
        #[command(flatten)]
        nats: NatsArgs,
        /// Only this edge.
        #[arg(long)]
        edge: Option<String>,
        /// Only this kind of record.
        #[arg(long, value_enum, ignore_case = true)]
        kind: Option<RecordKind>,
        /// From the start of the stream, not only what comes next.
        #[arg(long)]
        all: bool,
        /// Stop after this many messages.
        #[arg(long)]
        max: Option<u64>,
        /// Stop when nothing came for this long.
        #[arg(long, allow_negative_numbers = true)]
        idle: Option<crate::engine::duration::DurationArg>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The streams, and each edge's consumer: commands waiting for it.
    Status {
        /// The cluster.
        #[command(flatten)]
        nats: NatsArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The kinds of record an edge publishes (the last token of its subject).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordKind {
    /// An edge's command states (`outpost.up.EDGE.state`).
    State,
    /// Command results.
    Result,
    /// Device events.
    Event,
    /// Device records and sightings.
    Device,
}

impl RecordKind {
    /// The subject token.
    pub fn subject(self) -> &'static str {
        match self {
            RecordKind::State => "state",
            RecordKind::Result => "result",
            RecordKind::Event => "event",
            RecordKind::Device => "device",
        }
    }
}

async fn client(a: &NatsArgs) -> anyhow::Result<async_nats::Client> {
    let urls = nats::parse_urls(&a.nats).map_err(|e| anyhow::anyhow!("--nats {e}"))?;
    let mut o = NatsOptions::new(urls, "fleet".into());
    o.creds = a.creds.clone();
    o.ca = a.ca.clone();
    nats::connect(&o, None).await.map_err(anyhow::Error::msg)
}

/// What to do when `fleet init` still fails after its minute of asking.
fn init_hint(err: &str, replicas: usize) -> String {
    if err.contains("no suitable peers") {
        format!(
            "fewer than {replicas} JetStream servers are in the cluster: start the missing ones \
             (their logs say why one stopped), or ask for fewer with --replicas"
        )
    } else {
        "is JetStream enabled on the servers (`jetstream {}` in their config)?".into()
    }
}

/// Run a fleet command; the process's exit code.
pub async fn run(cmd: FleetCmd) -> anyhow::Result<i32> {
    match cmd {
        FleetCmd::Init {
            nats: a,
            replicas,
            wait,
        } => {
            if ![1, 3, 5].contains(&replicas) {
                return Err(super::UsageError(format!(
                    "--replicas {replicas}: use 1, 3 or 5 (JetStream wants an odd count)"
                ))
                .into());
            }
            let c = client(&a).await?;
            // A cluster that has just started elects its JetStream leader
            // and gathers its peers first ("no suitable peers for
            // placement"): ask again for a while before giving up.
            let deadline = tokio::time::Instant::now() + Duration::from(wait);
            loop {
                match nats::init(&c, replicas).await {
                    Ok(said) => {
                        for s in said {
                            crate::outln!("{s}");
                        }
                        return Ok(0);
                    }
                    Err(e) if e.contains("exists with another config") => {
                        eprintln!("error: {e}");
                        return Ok(1);
                    }
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        eprintln!("error: {e}; {}", init_hint(&e, replicas));
                        return Ok(1);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        FleetCmd::Send { nats: a, send } => fleet_send(&a, send).await,
        FleetCmd::Watch {
            nats: a,
            edge,
            kind,
            all,
            max,
            idle,
            json,
        } => {
            let c = client(&a).await?;
            let js = jetstream::new(c);
            let stream = js
                .get_stream(UP_STREAM)
                .await
                .with_context(|| format!("stream {UP_STREAM}: run `outpost fleet init` first"))?;
            let filter = format!(
                "outpost.up.{}.{}",
                edge.as_deref().unwrap_or("*"),
                kind.map_or("*", RecordKind::subject)
            );
            let cons = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: filter,
                    deliver_policy: if all {
                        consumer::DeliverPolicy::All
                    } else {
                        consumer::DeliverPolicy::New
                    },
                    ..Default::default()
                })
                .await?;
            let mut msgs = cons.messages().await?;
            let mut n = 0u64;
            loop {
                if max.is_some_and(|m| n >= m) {
                    return Ok(0);
                }
                let next = match idle {
                    Some(d) => match tokio::time::timeout(d.into(), msgs.next()).await {
                        Ok(m) => m,
                        Err(_) => return Ok(0),
                    },
                    None => msgs.next().await,
                };
                let Some(m) = next else { return Ok(0) };
                let m = m?;
                n += 1;
                print_up(&m, json);
            }
        }
        FleetCmd::Status { nats: a, json } => {
            let c = client(&a).await?;
            let js = jetstream::new(c);
            let mut streams = Vec::new();
            let mut edges = Vec::new();
            for name in [CMD_STREAM, UP_STREAM] {
                let mut s = js
                    .get_stream(name)
                    .await
                    .with_context(|| format!("stream {name}: run `outpost fleet init` first"))?;
                let info = s.info().await?.clone();
                streams.push(serde_json::json!({
                    "stream": name,
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "replicas": info.config.num_replicas,
                    "leader": info.cluster.as_ref().and_then(|c| c.leader.clone()),
                }));
                if name == CMD_STREAM {
                    let mut cs = s.consumers();
                    while let Some(ci) = cs.next().await {
                        let ci = ci?;
                        let Some(edge) = ci.name.strip_prefix("edge-") else {
                            continue;
                        };
                        edges.push(serde_json::json!({
                            "edge": edge,
                            "waiting": ci.num_pending,
                            "unacked": ci.num_ack_pending,
                        }));
                    }
                }
            }
            if json {
                crate::outln!(
                    "{}",
                    serde_json::json!({"streams": streams, "edges": edges})
                );
            } else {
                for s in &streams {
                    crate::outln!(
                        "{:<12} {:>9} messages {:>12} bytes  {} replicas, leader {}",
                        s["stream"].as_str().unwrap_or(""),
                        s["messages"],
                        s["bytes"],
                        s["replicas"],
                        s["leader"].as_str().unwrap_or("-")
                    );
                }
                if edges.is_empty() {
                    crate::outln!("no edge has connected yet");
                }
                for e in &edges {
                    crate::outln!(
                        "edge {:<20} {} commands waiting, {} taken and not yet acked",
                        e["edge"].as_str().unwrap_or(""),
                        e["waiting"],
                        e["unacked"]
                    );
                }
            }
            Ok(0)
        }
    }
}

fn print_up(m: &jetstream::Message, json: bool) {
    let h = |k: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(k))
            .map(|v| v.as_str().to_string())
    };
    let mut parts = m.subject.as_str().splitn(4, '.').skip(2);
    let (edge, kind) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let body = String::from_utf8_lossy(&m.payload).to_string();
    if json {
        crate::outln!(
            "{}",
            serde_json::json!({"edge": edge, "kind": kind, "seq": h("Outpost-Seq"), "id": h("Outpost-Id"),
                "state": h("Outpost-State"), "device": h("Outpost-Device"), "outcome": h("Outpost-Outcome"),
                "body": body})
        );
    } else {
        let mut short: String = body.chars().take(80).collect();
        if short.len() < body.len() {
            short.push('…');
        }
        crate::outln!(
            "{edge} {kind} {} {} {} {short}",
            h("Outpost-Id").unwrap_or_else(|| "-".into()),
            h("Outpost-State").unwrap_or_else(|| "-".into()),
            h("Outpost-Device").unwrap_or_default(),
        );
    }
}

async fn fleet_send(a: &NatsArgs, s: SendArgs) -> anyhow::Result<i32> {
    if s.lines.is_some() {
        return Err(super::UsageError(
            "--lines is for a box's own queue; publish one message per command to NATS instead"
                .into(),
        )
        .into());
    }
    if s.artifact.is_some() {
        return Err(super::UsageError("--artifact names an artifact on a box; a fleet's artifacts (a JetStream object store) are not built yet: send it through the edge's own `outpost send --artifact`".into()).into());
    }
    let Some((edge, target)) = s.target.split_once('/') else {
        eprintln!(
            "error: `{}`: a fleet target is EDGE/TARGET, e.g. edge-1/dev-7 or edge-1/tag:line-3",
            s.target
        );
        return Ok(crate::exit::USAGE);
    };
    if let Err(e) = nats::check_name(edge) {
        eprintln!("error: {e}");
        return Ok(crate::exit::USAGE);
    }
    let payload = match super::send_payload(&s, &s.target)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let opts = super::send_options(&s)?;
    // Signed here (or elsewhere, `--envelope`): the envelope names the
    // edge as its audience, and its id is the command's.
    let mut req = crate::shell::queue::SendRequest {
        target: s.target.clone(),
        payload,
        opts: opts.clone(),
        origin: "cli".into(),
        signature: None,
    };
    let id = match (&s.signing.sign, &s.signing.envelope) {
        (Some(path), _) => {
            let key = super::sign::load_key(path)?;
            let audience = s
                .signing
                .audience
                .clone()
                .unwrap_or_else(|| super::sign::default_audience(&s.target, edge));
            let expires = s
                .signing
                .expires
                .map_or(super::sign::DEFAULT_EXPIRY, |d| d.0);
            super::sign::sign_request(&mut req, &key, expires, &audience, crate::now_millis())?
        }
        (None, Some(b64)) => {
            use base64::Engine as _;
            let env = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| super::UsageError(format!("--envelope is not base64 ({e})")))?;
            let id = crate::engine::trust::envelope::open(&env)
                .map_err(|e| super::UsageError(format!("--envelope: {e}")))?
                .claims
                .id;
            req.signature = Some(env);
            id
        }
        (None, None) => CommandId::new(crate::now_millis(), rand::random()),
    };
    let payload = req.payload;
    let c = client(a).await?;
    let js = jetstream::new(c);
    // Listen before sending, so a fast result is not missed.
    let mut results = match s.wait {
        None => None,
        Some(_) => {
            let stream = js
                .get_stream(UP_STREAM)
                .await
                .with_context(|| format!("stream {UP_STREAM}: run `outpost fleet init` first"))?;
            let cons = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: format!("outpost.up.{edge}.result"),
                    deliver_policy: consumer::DeliverPolicy::New,
                    ..Default::default()
                })
                .await?;
            Some(cons.messages().await?)
        }
    };
    let subject = format!("outpost.cmd.{edge}.{target}");
    let mut headers = nats::command_headers(id, &opts);
    if let Some(env) = &req.signature {
        nats::set_envelope(&mut headers, env);
    }
    js.publish_with_headers(subject.clone(), headers, payload.into())
        .await
        .with_context(|| format!("cannot publish to {subject}"))?
        .await
        .with_context(|| {
            format!("the cluster did not store {subject}: is there a stream for it (`outpost fleet init`)?")
        })?;
    let Some(results) = results.as_mut() else {
        if s.json {
            crate::outln!(
                "{}",
                serde_json::json!({"id": id.to_string(), "subject": subject})
            );
        } else {
            crate::outln!("{id}");
        }
        return Ok(0);
    };
    let timeout: Duration = s.wait.expect("waiting").into();
    let want = id.to_string();
    let found = tokio::time::timeout(timeout, async {
        while let Some(m) = results.next().await {
            let m = m?;
            let hid = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Outpost-Id"))
                .map(|v| v.as_str().to_string());
            if hid.as_deref() == Some(want.as_str()) {
                return anyhow::Ok(Some(m));
            }
        }
        Ok(None)
    })
    .await;
    match found {
        Ok(Ok(Some(m))) => {
            let state = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Outpost-State"))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            if s.json {
                crate::outln!(
                    "{}",
                    serde_json::json!({"id": want, "state": state,
                        "result": String::from_utf8_lossy(&m.payload)})
                );
            } else {
                crate::outln!("{want} {state}");
                crate::outln!("{}", String::from_utf8_lossy(&m.payload));
            }
            Ok(if state == "succeeded" { 0 } else { 1 })
        }
        Ok(Ok(None)) => bail!("the result stream ended before {want}'s result"),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            eprintln!("{want}: no result within {timeout:?} (the edge may be offline; it will still run it)");
            Ok(crate::exit::TIMED_OUT)
        }
    }
}

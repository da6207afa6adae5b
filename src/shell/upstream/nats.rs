//! The edge's uplink to a NATS JetStream cluster (issue 13): for fleets too
//! large for one hub box. The same offline-first rules as the uplink to a
//! hub (DESIGN §7), with the same outbox and the same cursor
//! ([`OutboxCursor`]); only the transport differs.
//!
//! The subject scheme is the contract with any NATS client (README, "A
//! fleet on NATS"):
//!
//! - down, stream `OUTPOST_CMD` (work queue): `outpost.cmd.<edge>.<target>`,
//!   the body is the payload; headers `Outpost-Id` (a ULID, optional: the
//!   edge derives one from the stream sequence, so a redelivery is the same
//!   command), `Outpost-Priority`, `Outpost-Ttl` (seconds),
//!   `Outpost-Max-Attempts`, `Outpost-Key`, `Outpost-After`,
//!   `Outpost-Not-Before` (unix milliseconds), `Outpost-Envelope` (an
//!   operator-signed envelope, standard base64: the edge queues its bytes
//!   as received and every hop below verifies them). Each edge has
//!   one durable pull consumer `edge-<edge>` filtered to its subjects; a
//!   message is acked only once the command is durable in the edge's queue.
//!   `outpost.cmd.<edge>.workflow` carries a whole workflow (TOML text).
//! - up, stream `OUTPOST_UP`: `outpost.up.<edge>.<kind>`, kind `state`,
//!   `result`, `event` or `device`; headers `Nats-Msg-Id:
//!   <edge>:<epoch>:<seq>` (JetStream drops a duplicate within its window;
//!   the epoch, hex, names the edge's database, so a wiped edge's new seq 1
//!   is not taken for its old one), `Outpost-Epoch`, `Outpost-Id`,
//!   `Outpost-State`, `Outpost-Device`, `Outpost-Seq`. A result's body is
//!   the result bytes. An outbox record is deleted only after its PubAck,
//!   and only with every record before it.

use super::{keep_up, set_state, OutboxCursor, SessionEnd, Uplink, UplinkState, UplinkStatus};
use crate::engine::command::{CommandId, Millis, Outcome, Priority, SendOptions, State};
use crate::engine::journal::{ResultRecord, UpEntry, UpItem};
use crate::shell::jobs::Runners;
use crate::shell::queue::{QueueError, QueueHandle, SendRequest};
use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// The JetStream stream of commands down to the edges (work queue, subjects
/// `outpost.cmd.>`); `fleet init` creates it.
pub const CMD_STREAM: &str = "OUTPOST_CMD";
/// The JetStream stream of the edges' outbox records going up (subjects
/// `outpost.up.>`); `fleet init` creates it.
pub const UP_STREAM: &str = "OUTPOST_UP";
/// JetStream drops a second publish with the same `Nats-Msg-Id` within
/// this window: an edge that lost a PubAck and publishes again.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);
/// Bodies above this are cut (NATS' default max_payload is 1 MiB).
const MAX_BODY: usize = 900 * 1024;

/// How to reach the cluster, and who this edge is.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// `nats://h1:4222,nats://h2:4222` (or `tls://`).
    pub urls: String,
    /// The edge's name in subjects (`--name`, default the hostname).
    pub name: String,
    /// A NATS credentials file (`.creds`: a user JWT and its NKey seed);
    /// `None`: connect without.
    pub creds: Option<PathBuf>,
    /// A CA to trust for the servers' certificates (TLS is then required).
    pub ca: Option<PathBuf>,
    /// A client certificate and key, for clusters that want one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Records read from the store per batch.
    pub batch: usize,
    /// Records published and not yet acknowledged, at most.
    pub max_unacked: u64,
    /// The first reconnect delay, doubled per failed attempt.
    pub min_backoff: Duration,
    /// The cap on the reconnect delay.
    pub max_backoff: Duration,
    /// Given to each server's connection attempt; the whole connect gives up
    /// after twice this.
    pub connect_timeout: Duration,
}

impl NatsOptions {
    /// The defaults for `urls` and edge `name`: no credentials or TLS
    /// files, batches of 1024, 4096 records unacked, backoff from 0.5 s to
    /// 60 s, a 5 s connect timeout.
    pub fn new(urls: String, name: String) -> Self {
        NatsOptions {
            urls,
            name,
            creds: None,
            ca: None,
            client_cert: None,
            batch: 1024,
            max_unacked: 4096,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Whether an `--upstream` value names a NATS cluster.
pub fn is_nats_url(url: &str) -> bool {
    url.starts_with("nats://") || url.starts_with("tls://")
}

/// Check `nats://h1:4222,nats://h2:4222`; the list as async-nats takes it.
pub fn parse_urls(urls: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for u in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let rest = u
            .strip_prefix("nats://")
            .or_else(|| u.strip_prefix("tls://"))
            .ok_or_else(|| {
                format!("`{u}`: a NATS server is nats://HOST:PORT or tls://HOST:PORT")
            })?;
        let ok = rest
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            return Err(format!(
                "`{u}`: expected nats://HOST:PORT, e.g. nats://10.0.0.5:4222"
            ));
        }
        out.push(u.to_string());
    }
    if out.is_empty() {
        return Err("no NATS server named; write nats://HOST:PORT[,nats://HOST2:PORT]".into());
    }
    Ok(out.join(","))
}

/// An edge name must be one subject token.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "edge name `{name}`: use letters, digits, - and _ only (it is a NATS subject token)"
        ))
    }
}

/// Connect, with credentials and TLS as given. `lost` hears when the
/// connection drops, so a session ends at once rather than at its next
/// timeout.
pub async fn connect(
    o: &NatsOptions,
    lost: Option<mpsc::UnboundedSender<()>>,
) -> Result<async_nats::Client, String> {
    let mut c = async_nats::ConnectOptions::new()
        .name(format!("outpost {} {}", o.name, env!("CARGO_PKG_VERSION")))
        .connection_timeout(o.connect_timeout);
    if let Some(creds) = &o.creds {
        c = c
            .credentials_file(creds)
            .await
            .map_err(|e| format!("cannot read the NATS credentials {}: {e}", creds.display()))?;
    }
    if let Some(ca) = &o.ca {
        c = c.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &o.client_cert {
        c = c.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(tx) = lost {
        c = c.event_callback(move |ev| {
            let tx = tx.clone();
            async move {
                if matches!(
                    ev,
                    async_nats::Event::Disconnected | async_nats::Event::Closed
                ) {
                    let _ = tx.send(());
                }
            }
        });
    }
    let servers: Vec<&str> = o.urls.split(',').collect();
    tokio::time::timeout(o.connect_timeout * 2, c.connect(servers))
        .await
        .map_err(|_| format!("no NATS server of {} answered in time", o.urls))?
        .map_err(|e| format!("cannot connect to NATS at {}: {e}", o.urls))
}

/// Test hook for the kill tests of the two windows that matter:
/// `OUTPOST_TEST_CRASH=POINT:MARKER` aborts the process at POINT the first
/// time it is reached, if file MARKER does not exist yet (it is created
/// first, so the restarted box goes on). Points: `nats-after-store` (a
/// command durable in the queue, its message not yet acked) and
/// `nats-after-publish` (outbox records published, their PubAcks not yet
/// in). Unset, it costs one pointer read.
fn crash_point(point: &str) {
    static HOOK: std::sync::OnceLock<Option<(String, PathBuf)>> = std::sync::OnceLock::new();
    let hook = HOOK.get_or_init(|| {
        let v = std::env::var("OUTPOST_TEST_CRASH").ok()?;
        let (p, m) = v.split_once(':')?;
        Some((p.to_string(), PathBuf::from(m)))
    });
    if let Some((p, marker)) = hook {
        if p == point && !marker.exists() && std::fs::write(marker, point).is_ok() {
            eprintln!("OUTPOST_TEST_CRASH: aborting at {point}");
            std::process::abort();
        }
    }
}

/// Start the uplink to the cluster.
pub fn start(queue: QueueHandle, workflows: Runners, opts: NatsOptions) -> Uplink {
    let (tx, rx) = watch::channel(UplinkStatus {
        state: UplinkState::Connecting,
        hub: opts.urls.clone(),
        since: crate::now_millis(),
        ..Default::default()
    });
    let task = tokio::spawn(run(queue, workflows, opts, tx));
    Uplink { status: rx, task }
}

async fn run(
    queue: QueueHandle,
    workflows: Runners,
    opts: NatsOptions,
    tx: watch::Sender<UplinkStatus>,
) {
    let backoff = crate::device::Backoff::new(opts.min_backoff, opts.max_backoff);
    keep_up(&tx, backoff, |tx| async {
        let (lost_tx, lost) = mpsc::unbounded_channel();
        match connect(&opts, Some(lost_tx)).await {
            Ok(client) => {
                let why = session(&queue, &workflows, &opts, &client, lost, tx).await;
                // It had connected if it got as far as saying so.
                let connected = tx.borrow().state == UplinkState::Connected;
                (why, connected)
            }
            Err(e) => (SessionEnd::Link(e), false),
        }
    })
    .await
}

fn missing(stream: &str, e: impl std::fmt::Display) -> SessionEnd {
    SessionEnd::Link(format!(
        "stream {stream} is not there ({e}); create the fleet's streams with `outpost fleet init --nats URL`"
    ))
}

async fn session(
    queue: &QueueHandle,
    workflows: &Runners,
    opts: &NatsOptions,
    client: &async_nats::Client,
    mut lost: mpsc::UnboundedReceiver<()>,
    tx: &watch::Sender<UplinkStatus>,
) -> SessionEnd {
    let js = jetstream::new(client.clone());
    let cmd = match js.get_stream(CMD_STREAM).await {
        Ok(s) => s,
        Err(e) => return missing(CMD_STREAM, e),
    };
    if let Err(e) = js.get_stream(UP_STREAM).await {
        return missing(UP_STREAM, e);
    }
    let durable = format!("edge-{}", opts.name);
    let consumer: consumer::PullConsumer = match cmd
        .get_or_create_consumer(
            &durable,
            consumer::pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: format!("outpost.cmd.{}.>", opts.name),
                ack_policy: consumer::AckPolicy::Explicit,
                // How long before a message taken by an edge that died is
                // offered again (then deduped by its id).
                ack_wait: Duration::from_secs(10),
                max_ack_pending: 1024,
                ..Default::default()
            },
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return SessionEnd::Link(format!("cannot make consumer {durable}: {e}")),
    };
    let mut msgs = match consumer.messages().await {
        Ok(m) => m,
        Err(e) => return SessionEnd::Link(format!("cannot pull commands: {e}")),
    };
    let start = match queue.outbox_stats().await {
        Ok(s) => s.acked,
        Err(e) => return e.into(),
    };
    set_state(tx, UplinkState::Connected, None);
    tracing::info!(servers = %opts.urls, edge = %opts.name, "NATS uplink connected");
    let mut cursor = OutboxCursor::new(start, opts.max_unacked);
    let mut grown = queue.outbox_watch();
    let mut acks: JoinSet<(u64, Result<(), String>)> = JoinSet::new();
    let mut taken: JoinSet<Result<bool, String>> = JoinSet::new();
    loop {
        if cursor.wants_read() {
            grown.borrow_and_update();
            let entries = match queue.outbox_read(cursor.sent(), opts.batch).await {
                Ok(e) => e,
                Err(e) => return e.into(),
            };
            let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
            for e in &entries {
                let (subject, headers, body) = up_message(&opts.name, queue.uplink_epoch(), e);
                let ack = match js.publish_with_headers(subject, headers, body.into()).await {
                    Ok(a) => a,
                    Err(e) => return SessionEnd::Link(format!("cannot publish: {e}")),
                };
                let seq = e.seq;
                acks.spawn(async move { (seq, ack.await.map(|_| ()).map_err(|e| e.to_string())) });
            }
            if !seqs.is_empty() {
                crash_point("nats-after-publish");
            }
            cursor.read(seqs);
            continue;
        }
        tokio::select! {
            changed = grown.changed(), if cursor.waits_for_growth() => {
                if changed.is_err() {
                    return SessionEnd::Shutdown;
                }
                cursor.grown();
            }
            Some(done) = acks.join_next(), if !acks.is_empty() => {
                let Ok((seq, r)) = done else { continue };
                if let Err(e) = r {
                    return SessionEnd::Link(format!("the cluster did not confirm outbox record {seq}: {e}"));
                }
                if let Some(through) = cursor.ack_one(seq) {
                    let before = cursor.acked();
                    if let Err(e) = queue.up_ack(through).await {
                        return e.into();
                    }
                    tx.send_modify(|s| {
                        s.last_sync = Some(crate::now_millis());
                        s.synced_total += through.saturating_sub(before).max(1);
                    });
                }
            }
            Some(done) = taken.join_next(), if !taken.is_empty() => {
                match done {
                    Ok(Ok(true)) => tx.send_modify(|s| s.forwarded_total += 1),
                    Ok(Ok(false)) | Err(_) => {}
                    Ok(Err(e)) => return SessionEnd::Link(e),
                }
            }
            m = msgs.next() => match m {
                None => return SessionEnd::Link("the cluster ended the command stream".into()),
                Some(Err(e)) => return SessionEnd::Link(format!("command stream: {e}")),
                Some(Ok(m)) => take(queue, workflows, &opts.name, m, &mut taken),
            },
            _ = lost.recv() => return SessionEnd::Link("lost the connection to the cluster".into()),
        }
    }
}

/// Take one command message: durable in the queue (or the workflow
/// runner), then acked. The queue hears of it now, in arrival order; the
/// ack waits in `taken`. `Ok(true)`: a new command.
fn take(
    queue: &QueueHandle,
    workflows: &Runners,
    edge: &str,
    m: jetstream::Message,
    taken: &mut JoinSet<Result<bool, String>>,
) {
    let parsed = command_of(edge, &m);
    let queue = queue.clone();
    let workflows = workflows.clone();
    match parsed {
        Err((id, why)) => {
            // Malformed: it will never be better. Its sender learns why
            // from a result, and the message is not redelivered.
            let rec = rejected(id, "", &why);
            taken.spawn(async move {
                queue
                    .record_finished(rec)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = m.ack_with(AckKind::Term).await;
                Ok(false)
            });
        }
        Ok((id, req)) if Runners::is_job(&req.target) => {
            taken.spawn(async move {
                let target = req.target.clone();
                let new = match workflows
                    .hand_down(&target, id, req.payload, req.origin)
                    .await
                {
                    Ok(duplicate) => !duplicate,
                    Err(QueueError::ShuttingDown) => return Err("the box is stopping".into()),
                    Err(e) => {
                        let rec = rejected(id, &target, &e.to_string());
                        queue
                            .record_finished(rec)
                            .await
                            .map_err(|e| e.to_string())?;
                        false
                    }
                };
                m.double_ack()
                    .await
                    .map_err(|e| format!("cannot ack a command: {e}"))?;
                Ok(new)
            });
        }
        Ok((id, req)) => {
            let target = req.target.clone();
            let fut = queue.send_as(id, req);
            taken.spawn(async move {
                match fut.await {
                    Ok(r) => {
                        crash_point("nats-after-store");
                        m.double_ack().await.map_err(|e| format!("cannot ack a command: {e}"))?;
                        Ok(!r.duplicate)
                    }
                    Err(QueueError::ShuttingDown) => Err("the box is stopping".into()),
                    Err(e) if e.is_passing() => {
                        // Passing: the cluster keeps it and tries again.
                        tracing::warn!(%id, error = %e, "cannot take a command now; the cluster redelivers it");
                        let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
                        Ok(false)
                    }
                    Err(e) => {
                        let rec = rejected(id, &target, &e.to_string());
                        queue.record_finished(rec).await.map_err(|e| e.to_string())?;
                        m.double_ack().await.map_err(|e| format!("cannot ack a command: {e}"))?;
                        Ok(false)
                    }
                }
            });
        }
    }
}

/// A command refused without running, as a result that goes up.
fn rejected(id: CommandId, target: &str, why: &str) -> ResultRecord {
    let now = crate::now_millis();
    ResultRecord {
        id,
        gen: 0,
        device: String::new(),
        target: target.into(),
        priority: Priority::Normal,
        state: State::Failed,
        outcome: Some(Outcome::Rejected { reason: why.into() }),
        error: Some(why.into()),
        attempts: 0,
        max_attempts: 0,
        created_at: now,
        finished_at: now,
        origin: "nats".into(),
        key: None,
        command: None,
        children: Vec::new(),
    }
}

fn header<'a>(m: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    m.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// The command a message carries: `Err((id, why))` when it is malformed.
fn command_of(
    edge: &str,
    m: &jetstream::Message,
) -> Result<(CommandId, SendRequest), (CommandId, String)> {
    // Without an Outpost-Id, the id comes from the stream: a redelivery of
    // the same message is the same command.
    let derived = match m.info() {
        Ok(i) => CommandId::new(
            (i.published.unix_timestamp_nanos() / 1_000_000) as Millis,
            u128::from(i.stream_sequence),
        ),
        Err(_) => CommandId::new(crate::now_millis(), rand::random()),
    };
    let id = match header(m, "Outpost-Id") {
        None => derived,
        Some(v) => v
            .parse()
            .map_err(|_| (derived, format!("Outpost-Id `{v}` is not a ULID")))?,
    };
    let bad = |what: &str, v: &str| (id, format!("{what} `{v}` is not valid"));
    let prefix = format!("outpost.cmd.{edge}.");
    let target = m
        .subject
        .as_str()
        .strip_prefix(&prefix)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            (
                id,
                format!("subject {} is not outpost.cmd.{edge}.TARGET", m.subject),
            )
        })?
        .to_string();
    let mut opts = SendOptions::default();
    if let Some(v) = header(m, "Outpost-Priority") {
        opts.priority = v.parse().map_err(|_| bad("Outpost-Priority", v))?;
    }
    if let Some(v) = header(m, "Outpost-Ttl") {
        let s: u64 = v
            .trim()
            .parse()
            .map_err(|_| bad("Outpost-Ttl (seconds)", v))?;
        opts.ttl_ms = Some(s.saturating_mul(1000));
    }
    if let Some(v) = header(m, "Outpost-Max-Attempts") {
        opts.max_attempts = Some(
            v.trim()
                .parse()
                .map_err(|_| bad("Outpost-Max-Attempts", v))?,
        );
    }
    if let Some(v) = header(m, "Outpost-Key") {
        opts.key = Some(v.to_string());
    }
    if let Some(v) = header(m, "Outpost-After") {
        opts.after = Some(v.trim().parse().map_err(|_| bad("Outpost-After", v))?);
    }
    if let Some(v) = header(m, "Outpost-Not-Before") {
        opts.not_before = Some(
            v.trim()
                .parse()
                .map_err(|_| bad("Outpost-Not-Before (unix ms)", v))?,
        );
    }
    let signature = envelope_of(header(m, "Outpost-Envelope")).map_err(|e| (id, e))?;
    Ok((
        id,
        SendRequest {
            target,
            payload: m.payload.to_vec(),
            opts,
            origin: "nats".into(),
            signature,
        },
    ))
}

/// The `Outpost-Envelope` header's bytes. Only decoded here: the edge's
/// intake verifies them like any other signed command, and they travel on
/// as received.
fn envelope_of(v: Option<&str>) -> Result<Option<Vec<u8>>, String> {
    use base64::Engine;
    let Some(v) = v else { return Ok(None) };
    let b = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .map_err(|e| format!("Outpost-Envelope is not base64 ({e})"))?;
    // Refused before it is queued: no envelope is this large.
    if b.len() > crate::engine::trust::envelope::MAX_LEN {
        return Err(format!(
            "Outpost-Envelope is {} bytes, over the limit of {}",
            b.len(),
            crate::engine::trust::envelope::MAX_LEN
        ));
    }
    Ok(Some(b))
}

/// An outbox record as a message: subject, headers, body.
pub fn up_message(edge: &str, epoch: u64, e: &UpEntry) -> (String, HeaderMap, Vec<u8>) {
    let mut h = HeaderMap::new();
    let epoch = format!("{epoch:016x}");
    h.insert("Nats-Msg-Id", format!("{edge}:{epoch}:{}", e.seq).as_str());
    h.insert("Outpost-Epoch", epoch.as_str());
    h.insert("Outpost-Seq", e.seq.to_string().as_str());
    let (kind, body) = match &e.item {
        UpItem::State {
            id,
            device,
            state,
            at,
            attempts,
        } => {
            h.insert("Outpost-Id", id.to_string().as_str());
            h.insert("Outpost-State", state.as_str());
            h.insert("Outpost-Device", device.as_str());
            h.insert("Outpost-At", at.to_string().as_str());
            h.insert("Outpost-Attempts", attempts.to_string().as_str());
            ("state", Vec::new())
        }
        UpItem::Result(r) => {
            h.insert("Outpost-Id", r.id.to_string().as_str());
            h.insert("Outpost-State", r.state.as_str());
            h.insert("Outpost-Device", r.device.as_str());
            h.insert("Outpost-At", r.finished_at.to_string().as_str());
            h.insert("Outpost-Attempts", r.attempts.to_string().as_str());
            let body = match &r.outcome {
                Some(Outcome::Ok(b)) => {
                    h.insert("Outpost-Outcome", "ok");
                    b.clone()
                }
                Some(Outcome::Failed { code, message }) => {
                    h.insert("Outpost-Outcome", "failed");
                    h.insert("Outpost-Code", code.to_string().as_str());
                    message.clone().into_bytes()
                }
                Some(Outcome::Rejected { reason }) => {
                    h.insert("Outpost-Outcome", "rejected");
                    reason.clone().into_bytes()
                }
                None => Vec::new(),
            };
            if let Some(err) = &r.error {
                // A header is one line.
                h.insert("Outpost-Error", err.replace(['\r', '\n'], " ").as_str());
            }
            ("result", body)
        }
        UpItem::Device(rec) => {
            h.insert("Outpost-Device", rec.id.as_str());
            ("device", serde_json::to_vec(rec).unwrap_or_default())
        }
        UpItem::Seen { device, at } => {
            h.insert("Outpost-Device", device.as_str());
            h.insert("Outpost-Seen-At", at.to_string().as_str());
            ("device", Vec::new())
        }
        UpItem::Presence { device, online, at } => {
            h.insert("Outpost-Device", device.as_str());
            h.insert("Outpost-Seen-At", at.to_string().as_str());
            h.insert("Outpost-Online", if *online { "true" } else { "false" });
            ("device", Vec::new())
        }
        UpItem::Event {
            device,
            at,
            payload,
        } => {
            h.insert("Outpost-Device", device.as_str());
            h.insert("Outpost-At", at.to_string().as_str());
            ("event", payload.clone())
        }
        UpItem::Audit(note) => {
            h.insert("Outpost-At", note.at.to_string().as_str());
            ("audit", serde_json::to_vec(note).unwrap_or_default())
        }
    };
    let mut body = body;
    if body.len() > MAX_BODY {
        h.insert("Outpost-Truncated", body.len().to_string().as_str());
        body.truncate(MAX_BODY);
    }
    (format!("outpost.up.{edge}.{kind}"), h, body)
}

/// The two streams' configs (`fleet init`).
pub fn stream_configs(replicas: usize) -> [stream::Config; 2] {
    [
        stream::Config {
            name: CMD_STREAM.into(),
            subjects: vec!["outpost.cmd.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
        stream::Config {
            name: UP_STREAM.into(),
            subjects: vec!["outpost.up.>".into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        },
    ]
}

/// Create the fleet's streams, or find them as wanted. Idempotent; a
/// stream that exists with another shape is an error saying how.
pub async fn init(client: &async_nats::Client, replicas: usize) -> Result<Vec<String>, String> {
    let js = jetstream::new(client.clone());
    let mut said = Vec::new();
    for want in stream_configs(replicas) {
        match js.get_stream(&want.name).await {
            Ok(mut s) => {
                let have = s
                    .info()
                    .await
                    .map_err(|e| format!("cannot read stream {}: {e}", want.name))?
                    .config
                    .clone();
                let same = have.subjects == want.subjects
                    && have.retention == want.retention
                    && have.num_replicas == want.num_replicas
                    && have.storage == want.storage;
                if !same {
                    return Err(format!(
                        "stream {} exists with another config (subjects {:?}, {:?}, {} replicas, {:?}); \
                         outpost wants subjects {:?}, {:?}, {} replicas, file storage: remove it (`nats stream rm {}`) or run init with --replicas {}",
                        want.name, have.subjects, have.retention, have.num_replicas, have.storage,
                        want.subjects, want.retention, want.num_replicas, want.name, have.num_replicas
                    ));
                }
                said.push(format!(
                    "stream {} is there ({} replicas)",
                    want.name, have.num_replicas
                ));
            }
            Err(_) => {
                js.create_stream(want.clone())
                    .await
                    .map_err(|e| format!("cannot create stream {}: {e}", want.name))?;
                said.push(format!(
                    "stream {} created ({} replicas)",
                    want.name, want.num_replicas
                ));
            }
        }
    }
    Ok(said)
}

/// Headers for a command sent from outside (`fleet send`): what any NATS
/// client would set.
pub fn command_headers(id: CommandId, opts: &SendOptions) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Outpost-Id", id.to_string().as_str());
    h.insert("Outpost-Priority", opts.priority.as_str());
    if let Some(t) = opts.ttl_ms {
        h.insert("Outpost-Ttl", t.div_ceil(1000).to_string().as_str());
    }
    if let Some(n) = opts.max_attempts {
        h.insert("Outpost-Max-Attempts", n.to_string().as_str());
    }
    if let Some(k) = &opts.key {
        h.insert("Outpost-Key", k.as_str());
    }
    if let Some(a) = opts.after {
        h.insert("Outpost-After", a.to_string().as_str());
    }
    if let Some(t) = opts.not_before {
        h.insert("Outpost-Not-Before", t.to_string().as_str());
    }
    h
}

/// Put an operator's envelope on a command's headers (`fleet send` of a
/// signed command): standard base64, as [`command_of`] reads it.
pub fn set_envelope(h: &mut HeaderMap, envelope: &[u8]) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(envelope);
    h.insert("Outpost-Envelope", b64.as_str());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_header_is_its_bytes_in_base64() {
        use base64::Engine;
        let env = vec![1u8, 2, 3, 250];
        let b64 = base64::engine::general_purpose::STANDARD.encode(&env);
        assert_eq!(envelope_of(Some(&b64)).unwrap(), Some(env.clone()));
        assert_eq!(envelope_of(None).unwrap(), None);
        let mut h = HeaderMap::new();
        set_envelope(&mut h, &env);
        let v = h.get("Outpost-Envelope").unwrap().as_str();
        assert_eq!(envelope_of(Some(v)).unwrap(), Some(env.clone()));
        assert!(envelope_of(Some("not base64!"))
            .unwrap_err()
            .contains("Outpost-Envelope is not base64"));
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 5000]);
        assert!(envelope_of(Some(&big))
            .unwrap_err()
            .contains("over the limit"));
    }

    #[test]
    fn urls_and_names_are_checked_with_the_way_out() {
        assert_eq!(
            parse_urls("nats://a:4222, nats://b:4223").unwrap(),
            "nats://a:4222,nats://b:4223"
        );
        assert!(parse_urls("http://a:1")
            .unwrap_err()
            .contains("nats://HOST:PORT"));
        assert!(parse_urls("nats://a").unwrap_err().contains("expected"));
        assert!(check_name("edge-1").is_ok());
        assert!(check_name("edge.1").unwrap_err().contains("subject token"));
    }

    #[test]
    fn outbox_records_become_subjects_headers_and_bodies() {
        let id = CommandId::new(1_700_000_000_000, 7);
        let rec = ResultRecord {
            id,
            gen: 0,
            device: "dev-7".into(),
            target: "dev-7".into(),
            priority: Priority::Normal,
            state: State::Succeeded,
            outcome: Some(Outcome::Ok(b"42".to_vec())),
            error: None,
            attempts: 1,
            max_attempts: 3,
            created_at: 1,
            finished_at: 2,
            origin: "nats".into(),
            key: None,
            command: None,
            children: Vec::new(),
        };
        let (s, h, b) = up_message(
            "e1",
            0xab,
            &UpEntry {
                seq: 9,
                item: UpItem::Result(rec),
            },
        );
        assert_eq!(s, "outpost.up.e1.result");
        assert_eq!(
            h.get("Nats-Msg-Id").unwrap().as_str(),
            "e1:00000000000000ab:9"
        );
        assert_eq!(h.get("Outpost-Epoch").unwrap().as_str(), "00000000000000ab");
        assert_eq!(h.get("Outpost-Id").unwrap().as_str(), id.to_string());
        assert_eq!(h.get("Outpost-State").unwrap().as_str(), "succeeded");
        assert_eq!(h.get("Outpost-Device").unwrap().as_str(), "dev-7");
        assert_eq!(b, b"42");
        let (s, _, b) = up_message(
            "e1",
            0xab,
            &UpEntry {
                seq: 10,
                item: UpItem::Event {
                    device: "d".into(),
                    at: 3,
                    payload: vec![1; MAX_BODY + 5],
                },
            },
        );
        assert_eq!(s, "outpost.up.e1.event");
        assert_eq!(b.len(), MAX_BODY, "cut to fit NATS' max_payload");
    }

    #[test]
    fn command_headers_round_trip_through_what_the_edge_reads() {
        let opts = SendOptions {
            priority: Priority::High,
            ttl_ms: Some(1500),
            max_attempts: Some(4),
            key: Some("k".into()),
            after: None,
            not_before: None,
        };
        let h = command_headers(CommandId::new(5, 6), &opts);
        assert_eq!(h.get("Outpost-Priority").unwrap().as_str(), "high");
        assert_eq!(
            h.get("Outpost-Ttl").unwrap().as_str(),
            "2",
            "seconds, rounded up"
        );
        assert_eq!(h.get("Outpost-Max-Attempts").unwrap().as_str(), "4");
    }
}

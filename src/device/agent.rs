//! The reference agent behind `outpost device`: what it runs a command
//! with (echo, or a shell command fed the payload), the memory of what ran
//! (`Dedupe`), reconnecting with backoff, fetching a command's artifact,
//! health reports. Built on the connection in `client`, as any embedder's
//! device would be.

use super::*;

/// What the agent does with a command.
#[derive(Clone, Debug)]
pub enum Handler {
    /// Answer `Ok(payload)`.
    Echo,
    /// Run this shell command (`sh -c`) with the payload on stdin.
    Exec(String),
}

/// How `outpost device` runs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The bundle file.
    pub bundle: PathBuf,
    /// What each command is run with: its payload echoed, or `--exec`.
    pub handler: Handler,
    /// A command still running after this is killed and fails.
    pub command_timeout: Duration,
    /// How many recent command ids (and outcomes) to remember.
    pub dedupe_capacity: usize,
    /// First reconnect delay...
    pub backoff_min: Duration,
    /// ... doubled per failure up to this.
    pub backoff_max: Duration,
    /// How each connection is made (server override, timeouts, `Hello`);
    /// a `None` guard is filled in by `run_agent` with one for every
    /// reconnect.
    pub connect: ConnectOptions,
    /// Where artifacts named by commands are fetched to (see
    /// [`artifacts::default_dir`]).
    pub artifact_dir: PathBuf,
    /// Most bytes the artifact dir may hold (files and chunk cache).
    pub max_artifact_disk: u64,
    /// A health check (`sh -c`), run after each connect and after each
    /// command that succeeded, reported as a [`HealthReport`] event.
    ///
    /// [`HealthReport`]: crate::engine::command::HealthReport
    pub health: Option<String>,
}

impl AgentOptions {
    /// Defaults for `bundle` and `handler`: 60 s timeout, 10k ids
    /// remembered, reconnect backoff 0.5 s → 30 s.
    pub fn new(bundle: PathBuf, handler: Handler) -> Self {
        AgentOptions {
            handler,
            command_timeout: Duration::from_secs(60),
            dedupe_capacity: 10_000,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect: ConnectOptions::default(),
            artifact_dir: artifacts::default_dir(&bundle),
            max_artifact_disk: artifacts::DEFAULT_BUDGET,
            health: None,
            bundle,
        }
    }
}

/// Most bytes of stderr kept in a failure message.
const STDERR_TAIL: usize = 2048;
/// Total bytes of outcomes the dedupe cache may hold.
const DEDUPE_BYTES: usize = 64 * 1024 * 1024;

fn outcome_size(o: &Outcome) -> usize {
    64 + match o {
        Outcome::Ok(b) => b.len(),
        Outcome::Failed { message, .. } => message.len(),
        Outcome::Rejected { reason } => reason.len(),
    }
}

/// Recent deliveries — (command id, attempt) — and their outcomes, bounded
/// in count and bytes. The attempt is part of the key: the box redelivers
/// after a crash or a reconnect with the *same* attempt number (run it once),
/// but retries a failure, or an operator retry, with a new one (run again).
pub struct Dedupe {
    done: LruCache<(CommandId, u32), Outcome>,
    bytes: usize,
    max_bytes: usize,
}

impl Dedupe {
    /// Remember up to `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Dedupe {
            done: LruCache::new(NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN)),
            bytes: 0,
            max_bytes: DEDUPE_BYTES,
        }
    }

    /// The outcome of attempt `attempt` of `id`, if it ran recently.
    pub fn get(&mut self, id: CommandId, attempt: u32) -> Option<&Outcome> {
        self.done.get(&(id, attempt))
    }

    /// Record that attempt `attempt` of `id` ended with `outcome`.
    pub fn insert(&mut self, id: CommandId, attempt: u32, outcome: Outcome) {
        self.bytes += outcome_size(&outcome);
        if let Some((_, old)) = self.done.push((id, attempt), outcome) {
            self.bytes = self.bytes.saturating_sub(outcome_size(&old));
        }
        while self.bytes > self.max_bytes && self.done.len() > 1 {
            match self.done.pop_lru() {
                Some((_, old)) => self.bytes = self.bytes.saturating_sub(outcome_size(&old)),
                None => break,
            }
        }
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }
}

/// Capped exponential backoff with jitter.
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays from `min` (the first) doubling per failure up to `max`
    /// (raised to `min` if below it).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The next delay: `min·2^n` capped at `max`, then scaled by a random
    /// factor in [0.5, 1] so a fleet does not reconnect in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Forget the failures once a connection works: the next delay starts
    /// from `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Run `cmd` via `sh -c` with `payload` on stdin. Exit 0 → `Ok(stdout)`;
/// otherwise `Failed{exit code, stderr tail}`; past `limit` the process is
/// killed and the command fails with code 124. Stdout over `max_out` bytes
/// fails the command (it could not be sent back).
pub async fn exec(cmd: &str, payload: Vec<u8>, limit: Duration, max_out: usize) -> Outcome {
    exec_with(cmd, payload, limit, max_out, &[]).await
}

/// [`exec`] with extra environment variables (an artifact's path, …).
pub async fn exec_with(
    cmd: &str,
    payload: Vec<u8>,
    limit: Duration,
    max_out: usize,
    env: &[(String, String)],
) -> Outcome {
    use std::process::Stdio;
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed {
                code: 127,
                message: format!("cannot start `sh -c {cmd}`: {e}"),
            }
        }
    };
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let feed = async move {
        if let Some(mut s) = stdin.take() {
            // A command that does not read its input closes the pipe early;
            // that is its business, not an error.
            let _ = s.write_all(&payload).await;
        }
    };
    let read_out = async move {
        let mut out = Vec::new();
        let mut over = false;
        if let Some(s) = stdout.as_mut() {
            let mut buf = [0u8; 8192];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if out.len() + n <= max_out => out.extend_from_slice(&buf[..n]),
                    // Keep draining so the child does not block on a full pipe.
                    Ok(_) => over = true,
                }
            }
        }
        (out, over)
    };
    let read_err = async move {
        let mut tail = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        tail.extend_from_slice(&buf[..n]);
                        if tail.len() > 2 * STDERR_TAIL {
                            tail.drain(..tail.len() - STDERR_TAIL);
                        }
                    }
                }
            }
        }
        if tail.len() > STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
        tail
    };
    let run = async {
        let (_, (out, over), err, status) = tokio::join!(feed, read_out, read_err, child.wait());
        (out, over, err, status)
    };
    let (out, over, err, status) = match timeout(limit, run).await {
        Ok(r) => r,
        Err(_) => {
            let _ = child.kill().await;
            return Outcome::Failed {
                code: 124,
                message: format!("timed out after {} s and was killed", limit.as_secs_f32()),
            };
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return Outcome::Failed {
                code: 127,
                message: format!("cannot wait for the command: {e}"),
            }
        }
    };
    let stderr_tail = String::from_utf8_lossy(&err).into_owned();
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1);
        return Outcome::Failed {
            code,
            message: stderr_tail,
        };
    }
    if over {
        return Outcome::Failed {
            code: -1,
            message: format!(
                "the command wrote more than {max_out} bytes to stdout, too much to send back"
            ),
        };
    }
    Outcome::Ok(out)
}

/// Room for the ack frame's own fields around a result.
const ACK_OVERHEAD: usize = 256;

struct Agent {
    opts: AgentOptions,
    dedupe: Dedupe,
    /// Also in `opts.connect.guard`: one for every connection.
    guard: SharedGuard,
    running: HashMap<CommandId, Running>,
    /// `None` outcome: not to be acked (its artifact fetch lost the link).
    tasks: JoinSet<Ended>,
    /// The connection being served, for fetching artifacts on it.
    link: Option<Link>,
    artifacts: Arc<artifacts::Artifacts>,
    /// Numbers runs, so a run superseded by a restart cannot end its
    /// successor's entry.
    runs: u64,
}

/// A command task's end: id, attempt, run, outcome.
type Ended = (CommandId, u32, u64, Option<Outcome>);

/// What artifact fetches need of the current connection.
#[derive(Clone)]
struct Link {
    conn: quinn::Connection,
    sender: Sender,
}

struct Running {
    abort: AbortHandle,
    run: u64,
    /// The attempt its ack answers: the latest delivery's, since a
    /// redelivery while it runs (after a reconnect) moves the box on to a
    /// new attempt and an ack of the old one would be stale.
    attempt: u32,
    /// The connection its artifact is being fetched on, while it is.
    fetching_on: Arc<std::sync::Mutex<Option<usize>>>,
}

impl Agent {
    fn new(opts: AgentOptions, guard: SharedGuard) -> Self {
        let artifacts =
            artifacts::Artifacts::new(opts.artifact_dir.clone(), opts.max_artifact_disk);
        Agent {
            guard,
            dedupe: Dedupe::new(opts.dedupe_capacity),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            link: None,
            artifacts,
            runs: 0,
            opts,
        }
    }

    /// The start of a command's run; a `Rejected` ack instead when its
    /// envelope cannot be read.
    fn start(&mut self, cmd: ReceivedCommand) -> Option<(CommandId, Option<u32>, Outcome)> {
        let artifact = match cmd
            .signature
            .as_deref()
            .map(crate::engine::trust::envelope::artifact)
        {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(d))) => Some(crate::engine::artifact::Digest(d)),
            Some(Err(e)) => {
                let reason = format!("the command's envelope cannot be read on the device: {e}");
                return Some((cmd.id, Some(cmd.attempt), Outcome::Rejected { reason }));
            }
        };
        let command_timeout = self.opts.command_timeout;
        let max_out = self.opts.connect.max_frame.saturating_sub(ACK_OVERHEAD);
        let handler = self.opts.handler.clone();
        let (id, attempt) = (cmd.id, cmd.attempt);
        self.runs += 1;
        let run = self.runs;
        let fetching_on = Arc::new(std::sync::Mutex::new(None));
        let (link, store, on) = (
            self.link.clone(),
            self.artifacts.clone(),
            fetching_on.clone(),
        );
        let h = self.tasks.spawn(async move {
            let lease = match artifact {
                None => None,
                Some(digest) => {
                    let Some(link) = link else {
                        // Not connected: the box delivers it again.
                        return (id, attempt, run, None);
                    };
                    *on.lock().expect("fetching lock") = Some(link.conn.stable_id());
                    let got = fetch_for(&store, &link, id, digest).await;
                    match got {
                        Ok(lease) => {
                            *on.lock().expect("fetching lock") = None;
                            Some(lease)
                        }
                        Err(e) => {
                            let mut outcome = artifacts::failed(&e, digest, &store);
                            if outcome.is_none() && link.conn.close_reason().is_none() {
                                // Only the fetch stream broke: the box will
                                // not deliver it again on this connection,
                                // so it fails (and is retried as a new
                                // attempt) rather than waiting forever.
                                outcome = Some(Outcome::Failed {
                                    code: -1,
                                    message: format!("the fetch of artifact {digest} broke off: {e}"),
                                });
                            }
                            if outcome.is_some() {
                                *on.lock().expect("fetching lock") = None;
                            }
                            // Left set for a lost link: a redelivery on the
                            // next connection, arriving before this run is
                            // reaped, starts it again instead of waiting.
                            match &outcome {
                                None => tracing::info!(%id, error = %e, "artifact fetch lost the link; waiting for the box to deliver the command again"),
                                Some(_) => tracing::warn!(%id, error = %e, "artifact fetch failed; the command does not run"),
                            }
                            return (id, attempt, run, outcome);
                        }
                    }
                }
            };
            // Taken after the fetch, so a slow fetch cannot stretch the
            // handler past the command's deadline.
            let mut limit = command_timeout;
            if let Some(deadline) = cmd.deadline {
                let left = deadline.saturating_sub(crate::now_millis());
                limit = limit.min(Duration::from_millis(left.max(1)));
            }
            let env = lease.as_ref().map(|l| l.env()).unwrap_or_default();
            let outcome = match handler {
                Handler::Echo => Outcome::Ok(cmd.payload),
                Handler::Exec(c) => exec_with(&c, cmd.payload, limit, max_out, &env).await,
            };
            drop(lease);
            (id, attempt, run, Some(outcome))
        });
        self.running.insert(
            id,
            Running {
                abort: h,
                run,
                attempt,
                fetching_on,
            },
        );
        None
    }

    /// Handle one message; an ack to send back (id, attempt, outcome), if any.
    fn on_message(&mut self, m: Received) -> Option<(CommandId, Option<u32>, Outcome)> {
        match m {
            Received::Command(cmd) => {
                if let Some(o) = self.dedupe.get(cmd.id, cmd.attempt) {
                    tracing::info!(id = %cmd.id, attempt = cmd.attempt, "command delivered again; acking its earlier outcome");
                    return Some((cmd.id, Some(cmd.attempt), o.clone()));
                }
                if let Some(r) = self.running.get_mut(&cmd.id) {
                    r.attempt = cmd.attempt;
                    let stale = {
                        let on = *r.fetching_on.lock().expect("fetching lock");
                        let now = self.link.as_ref().map(|l| l.conn.stable_id());
                        on.is_some() && on != now
                    };
                    if !stale {
                        // Still running from before the reconnect: it is
                        // acked when it finishes.
                        tracing::info!(id = %cmd.id, "command delivered again while still running");
                        return None;
                    }
                    // Fetching on a connection that is gone: start over on
                    // this one (the chunk cache keeps what arrived). Its
                    // handler has not run, so this is not a second run.
                    tracing::info!(id = %cmd.id, "command delivered again while fetching on the old connection; fetching on the new one");
                    r.abort.abort();
                    self.running.remove(&cmd.id);
                }
                if cmd.seen_before {
                    // Admitted before, its outcome no longer remembered (or
                    // never produced: a restart between): running it again
                    // is what a replayer wants.
                    tracing::warn!(id = %cmd.id, "a signed command delivered again that already ran here; refusing it");
                    let g = self.guard.lock().expect("guard lock");
                    return Some((
                        cmd.id,
                        Some(cmd.attempt),
                        g.refused(&crate::engine::trust::Refusal::Replay(cmd.id)),
                    ));
                }
                tracing::debug!(id = %cmd.id, attempt = cmd.attempt, "command received");
                self.start(cmd)
            }
            Received::Cancel(id) => {
                if let Some(r) = self.running.remove(&id) {
                    tracing::info!(%id, "command cancelled by the box; stopping it");
                    r.abort.abort();
                }
                None
            }
            Received::Error { code, message } => {
                tracing::warn!(%code, %message, "the box reported an error");
                None
            }
            Received::Forward(f) => {
                // Only a gateway is sent these; a device agent cannot route.
                tracing::warn!(id = %f.id, "the box forwarded a command to this device as if it were a box below it; rejecting it");
                // A forward has no attempt of its own: a plain `Ack`.
                Some((
                    f.id,
                    None,
                    Outcome::Rejected {
                        reason: "this is a device agent, not a box: it cannot route commands"
                            .into(),
                    },
                ))
            }
            Received::UpAck(_) => None,
        }
    }

    fn finished(
        &mut self,
        r: Result<Ended, tokio::task::JoinError>,
    ) -> Option<(CommandId, Option<u32>, Outcome)> {
        let (id, attempt, run, outcome) = match r {
            Ok(x) => x,
            // Aborted by a Cancel: nothing to report.
            Err(e) if e.is_cancelled() => return None,
            Err(e) => {
                tracing::error!(error = %e, "a command task failed");
                return None;
            }
        };
        let mut attempt = attempt;
        if self.running.get(&id).map(|r| r.run) == Some(run) {
            if let Some(r) = self.running.remove(&id) {
                attempt = r.attempt;
            }
        }
        let outcome = outcome?;
        match &outcome {
            Outcome::Ok(_) => tracing::debug!(%id, "command succeeded"),
            o => tracing::info!(%id, outcome = ?o, "command did not succeed"),
        }
        self.dedupe.insert(id, attempt, outcome.clone());
        Some((id, Some(attempt), outcome))
    }
}

/// Fetch the artifact command `id` names, reporting progress to the box
/// while it runs.
async fn fetch_for(
    store: &Arc<artifacts::Artifacts>,
    link: &Link,
    id: CommandId,
    digest: crate::engine::artifact::Digest,
) -> Result<artifacts::Lease, fetch::FetchError> {
    let (tx, rx) = tokio::sync::watch::channel((0u64, 0u64));
    let (stop, stopped) = oneshot::channel::<()>();
    let reporter = tokio::spawn(artifacts::forward_progress(
        rx,
        link.sender.clone(),
        id,
        stopped,
    ));
    let got = store.get(&link.conn, digest, Some(&tx)).await;
    drop(stop);
    // The last report goes out before the ack, on the same stream.
    let _ = reporter.await;
    if let Ok(l) = &got {
        tracing::info!(%id, artifact = %l.path.display(), fetched_bytes = l.fetched_bytes, reused_bytes = l.reused_bytes, "artifact verified");
    }
    got
}

/// A future that resolves on SIGTERM or SIGINT. The handlers are installed
/// when this is called, not when the future is first polled: from then on
/// a SIGTERM is this future's, never the default action's (which kills the
/// process). Call it before saying "ready" (systemd may stop a service the
/// moment it is ready).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Run the reference agent until `shutdown` resolves: connect, run commands
/// with the handler, ack them, reconnect with backoff when the link drops.
/// Returns an error only for what retrying cannot fix (unreadable bundle,
/// revoked or refused certificate, incompatible box).
pub async fn run_agent(
    opts: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let bundle = Bundle::read(&opts.bundle)?;
    let server = opts
        .connect
        .server
        .clone()
        .unwrap_or_else(|| bundle.server.clone());
    let mut backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    let mut opts = opts;
    let guard = opts
        .connect
        .guard
        .get_or_insert_with(|| Guard::shared(&bundle))
        .clone();
    if guard.lock().expect("guard lock").is_active() {
        tracing::info!("the bundle carries trust anchors: commands are verified before they run");
    }
    let mut agent = Agent::new(opts, guard);
    tokio::pin!(shutdown);
    // Logged once per change, not once per attempt.
    let mut was_down_logged = false;
    let mut refused = 0u32;
    loop {
        let attempt = connect(&bundle, &agent.opts.connect);
        let conn = tokio::select! {
            _ = &mut shutdown => break,
            c = attempt => c,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) if e.is_permanent() => {
                tracing::error!(error = %e, "the box refuses this device; stopping");
                return Err(e.into());
            }
            Err(e) if e.is_refusal_like() && refused + 1 >= MAX_REFUSED_ATTEMPTS => {
                tracing::error!(error = %e, attempts = refused + 1, "the box keeps refusing this device; stopping");
                return Err(anyhow::anyhow!(
                    "the box at {server} refused this device {} times in a row before admitting it (last: {e}); see the box's log, and if this bundle was revoked or replaced, install a new one (`outpost enroll ID --force` on the box)",
                    refused + 1
                ));
            }
            Err(e) => {
                refused = if e.is_refusal_like() { refused + 1 } else { 0 };
                let delay = backoff.next_delay();
                if !was_down_logged {
                    tracing::warn!(%server, error = %e, "cannot reach the box; reconnecting with backoff");
                    was_down_logged = true;
                } else {
                    tracing::debug!(%server, error = %e, delay_ms = delay.as_millis() as u64, "still cannot reach the box");
                }
                if agent.wait(delay, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        refused = 0;
        tracing::info!(%server, device = conn.device_id(), window = conn.window(), "connected to the box");
        let ended = agent.serve(&mut conn, &mut shutdown).await;
        match ended {
            None => {
                conn.close();
                break;
            }
            Some(e) if e.is_permanent() => {
                tracing::error!(error = %e, "the box refuses this device; stopping");
                return Err(e.into());
            }
            Some(e) => {
                tracing::warn!(error = %e, "disconnected from the box; reconnecting");
                was_down_logged = true;
                let delay = backoff.next_delay();
                if agent.wait(delay, &mut shutdown).await {
                    break;
                }
            }
        }
    }
    tracing::info!("device agent stopped");
    Ok(())
}

impl Agent {
    /// Serve one connection; `None` on shutdown, else why it ended.
    async fn serve(
        &mut self,
        conn: &mut DeviceConnection,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<ClientError> {
        self.link = Some(Link {
            conn: conn.connection().clone(),
            sender: conn.sender(),
        });
        // Connected (after a restart, perhaps one a change caused).
        self.report_health(None);
        let ended = self.serve_link(conn, shutdown).await;
        self.link = None;
        ended
    }

    async fn serve_link(
        &mut self,
        conn: &mut DeviceConnection,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<ClientError> {
        loop {
            let ack = tokio::select! {
                _ = shutdown.as_mut() => return None,
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => self.finished(done),
                m = conn.next() => match m {
                    Ok(Some(m)) => self.on_message(m),
                    Ok(None) => return Some(ClientError::Lost("the connection ended".into())),
                    Err(e) => return Some(e),
                },
            };
            if let Some((id, attempt, outcome)) = ack {
                let ok = matches!(outcome, Outcome::Ok(_));
                if let Err(e) = conn.sender.ack_with(id, attempt, outcome).await {
                    // The outcome is remembered: the box redelivers the
                    // command after the reconnect and gets it then.
                    return Some(e);
                }
                if ok {
                    self.report_health(Some(id));
                }
            }
        }
    }

    /// Run the health check, off the loop, and send its verdict (after the
    /// ack, on the same stream, so the box has the command's end first or
    /// knows which command the report follows).
    fn report_health(&self, command: Option<CommandId>) {
        let (Some(check), Some(link)) = (self.opts.health.clone(), &self.link) else {
            return;
        };
        let sender = link.sender.clone();
        let limit = self.opts.command_timeout;
        tokio::spawn(async move {
            let (healthy, detail) = match exec(&check, Vec::new(), limit, STDERR_TAIL).await {
                Outcome::Ok(out) => (true, String::from_utf8_lossy(&out).trim().to_string()),
                Outcome::Failed { message, .. } => (false, message),
                Outcome::Rejected { reason } => (false, reason),
            };
            let report = crate::engine::command::HealthReport {
                healthy,
                command,
                detail,
            };
            let frame = DeviceFrame::Event {
                payload: report.to_payload(),
            };
            if let Err(e) = sender.send(&frame).await {
                tracing::warn!(error = %e, "cannot send the health report; the next connect sends one");
            }
        });
    }

    /// Sleep `delay` while still recording outcomes of running commands;
    /// true if shutdown came first.
    async fn wait(
        &mut self,
        delay: Duration,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.as_mut() => return true,
                _ = &mut sleep => return false,
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.finished(done);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;
    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn the_agent_stops_after_refusals_it_cannot_read_instead_of_looping() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let id = crate::identity::Identity::init(dir.path(), &[]).unwrap();
        let tls = id
            .server_config(crate::identity::RevokedSet::new())
            .unwrap();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        // A box (or anything with its CA) that admits the handshake and
        // then hangs up with a code the agent does not know, every time.
        let admitted = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn({
            let (server, admitted) = (server.clone(), admitted.clone());
            async move {
                while let Some(incoming) = server.accept().await {
                    if let Ok(c) = incoming.await {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        c.close(VarInt::from_u32(99), b"go away");
                    }
                }
            }
        });
        let path = dir.path().join("d1.bundle");
        id.issue_device("d1", &addr.to_string())
            .unwrap()
            .write(&path)
            .unwrap();
        let mut opts = AgentOptions::new(path, Handler::Echo);
        opts.backoff_min = Duration::from_millis(1);
        opts.backoff_max = Duration::from_millis(10);
        let r = timeout(
            Duration::from_secs(60),
            run_agent(opts, std::future::pending()),
        )
        .await
        .expect("the agent stops by itself");
        let e = r.unwrap_err().to_string();
        assert!(e.contains("refused this device 10 times"), "{e}");
        assert_eq!(admitted.load(Ordering::SeqCst), MAX_REFUSED_ATTEMPTS);
        task.abort();
    }

    #[tokio::test]
    async fn exec_passes_the_payload_and_returns_stdout() {
        let o = exec("tr a-z A-Z", b"hello".to_vec(), T, MAX).await;
        assert_eq!(o, Outcome::Ok(b"HELLO".to_vec()));
        // A command that ignores stdin is fine too.
        let o = exec("echo hi", vec![7; 200_000], T, MAX).await;
        assert_eq!(o, Outcome::Ok(b"hi\n".to_vec()));
    }

    #[tokio::test]
    async fn exec_failure_carries_exit_code_and_stderr_tail() {
        let o = exec("echo out; echo oops >&2; exit 3", vec![], T, MAX).await;
        assert_eq!(
            o,
            Outcome::Failed {
                code: 3,
                message: "oops\n".into()
            }
        );
        // Only the tail of a long stderr is kept.
        let o = exec(
            "head -c 100000 /dev/zero | tr '\\0' x >&2; echo END >&2; exit 1",
            vec![],
            T,
            MAX,
        )
        .await;
        match o {
            Outcome::Failed { code: 1, message } => {
                assert!(message.len() <= STDERR_TAIL, "{}", message.len());
                assert!(message.ends_with("END\n"));
            }
            other => panic!("{other:?}"),
        }
        let o = exec("kill -9 $$", vec![], T, MAX).await;
        assert!(matches!(o, Outcome::Failed { code: 137, .. }), "{o:?}");
    }

    #[tokio::test]
    async fn exec_times_out_and_kills() {
        let started = std::time::Instant::now();
        let o = exec("sleep 30", vec![], Duration::from_millis(300), MAX).await;
        assert!(matches!(o, Outcome::Failed { code: 124, .. }), "{o:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[tokio::test]
    async fn exec_refuses_stdout_over_the_frame() {
        let o = exec("head -c 5000 /dev/zero", vec![], T, 1000).await;
        assert!(matches!(o, Outcome::Failed { code: -1, .. }), "{o:?}");
    }

    #[test]
    fn dedupe_remembers_outcomes_and_is_bounded() {
        let mut d = Dedupe::new(3);
        for i in 0..5u128 {
            d.insert(CommandId(i), 1, Outcome::Ok(vec![i as u8]));
        }
        assert_eq!(d.len(), 3);
        assert!(d.get(CommandId(0), 1).is_none());
        assert_eq!(d.get(CommandId(4), 1), Some(&Outcome::Ok(vec![4])));
        // The byte budget evicts too.
        let mut d = Dedupe::new(100);
        d.max_bytes = 1000;
        for i in 0..10u128 {
            d.insert(CommandId(i), 1, Outcome::Ok(vec![0; 300]));
        }
        assert!(d.len() <= 3, "{}", d.len());
        assert!(d.get(CommandId(9), 1).is_some());
    }

    #[test]
    fn a_retry_is_a_new_attempt_not_a_repeat() {
        let mut d = Dedupe::new(10);
        let failed = Outcome::Failed {
            code: 1,
            message: "boom".into(),
        };
        d.insert(CommandId(7), 1, failed.clone());
        assert_eq!(
            d.get(CommandId(7), 1),
            Some(&failed),
            "a redelivery of attempt 1 is a repeat"
        );
        assert!(d.get(CommandId(7), 2).is_none(), "attempt 2 must run again");
    }

    fn test_bundle() -> Bundle {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::identity::Identity::init(dir.path(), &[]).unwrap();
        id.issue_device("d1", "127.0.0.1:7443").unwrap()
    }

    #[test]
    fn agent_runs_a_command_once_and_reacks_repeats() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut opts = AgentOptions::new("x".into(), Handler::Echo);
            opts.dedupe_capacity = 10;
            let mut a = Agent::new(opts, Guard::shared(&test_bundle()));
            let cmd = ReceivedCommand {
                id: CommandId(1),
                priority: Priority::Normal,
                payload: b"p".to_vec(),
                attempt: 1,
                deadline: None,
                signature: None,
                verified: None,
                seen_before: false,
            };
            assert!(a.on_message(Received::Command(cmd.clone())).is_none());
            // Redelivered while running (a reconnect: the box moved on to
            // attempt 2): not started again, and its ack answers attempt 2,
            // since the box would drop an ack of attempt 1 as stale.
            let cmd = ReceivedCommand { attempt: 2, ..cmd };
            assert!(a.on_message(Received::Command(cmd.clone())).is_none());
            assert_eq!(a.tasks.len(), 1);
            let done = a.tasks.join_next().await.unwrap();
            assert_eq!(
                a.finished(done),
                Some((CommandId(1), Some(2), Outcome::Ok(b"p".to_vec())))
            );
            // Redelivered after it finished: the same outcome, no new run.
            let again = a.on_message(Received::Command(cmd));
            assert_eq!(
                again,
                Some((CommandId(1), Some(2), Outcome::Ok(b"p".to_vec())))
            );
            assert!(a.tasks.is_empty());
        });
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            last = b.next_delay();
            assert!(last <= Duration::from_secs(30));
        }
        assert!(last >= Duration::from_secs(15));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }
}

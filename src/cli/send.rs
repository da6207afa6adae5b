//! `outpost send`: the payload (text, stdin, a file, a packed workflow),
//! the options from the flags, one command or one per line of a file, and
//! the wait for its end.

use super::*;

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
    /// Priority: a higher one is delivered first, and is shed last when the queue is full.
    #[arg(long, default_value = "normal", ignore_case = true, value_parser = priority_parser())]
    pub priority: Priority,
    /// Time to live: 30s, 10m, 2h, or a number of seconds.
    #[arg(long, allow_negative_numbers = true)]
    pub ttl: Option<crate::engine::duration::DurationArg>,
    /// Deliveries allowed before the command is dead (default 5, or the
    /// box's `--max-attempts`); a failure is retried with backoff.
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
    pub wait: Option<crate::engine::duration::DurationArg>,
    /// Print the receipt (or with `--wait`, the result) as JSON.
    #[arg(long)]
    pub json: bool,
    /// A file for the device to fetch before it runs the command: an
    /// artifact on this box, as name@version, name (its newest version)
    /// or sha256:DIGEST (`outpost artifact add` puts it there).
    #[arg(long, value_name = "ARTIFACT")]
    pub artifact: Option<String>,
    /// Sign the command with an operator key.
    #[command(flatten)]
    pub signing: super::sign::SignArgs,
}

/// `--priority`: clap lists the values in `--help` and in a typo's error.
pub(super) fn priority_parser() -> impl clap::builder::TypedValueParser<Value = Priority> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["high", "normal", "low"])
        .map(|s| s.parse::<Priority>().expect("one of the possible values"))
}

pub(super) async fn send(a: SendArgs, data_dir: &Path) -> anyhow::Result<i32> {
    if let Some(path) = a.lines.clone() {
        return send_lines(a, &path, data_dir).await;
    }
    let payload = match send_payload(&a, &a.target)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let mut req = SendRequest {
        target: a.target.clone(),
        payload,
        opts: send_options(&a)?,
        origin: "cli".into(),
        signature: None,
    };
    if let Some(spec) = &a.artifact {
        req.signature = Some(super::artifact::reference(spec, data_dir).await?);
    }
    super::sign::maybe_sign(&mut req, &a.signing, data_dir).await?;
    deliver(req, a.wait, a.json, data_dir).await
}

/// Send `req`, print its id (or, with `wait`, its end) and return the exit
/// code: `send`'s tail, shared with `artifact push`.
pub(super) async fn deliver(
    req: SendRequest,
    wait: Option<crate::engine::duration::DurationArg>,
    json: bool,
    data_dir: &Path,
) -> anyhow::Result<i32> {
    let mut c = client(data_dir).await?;
    let AdminResponse::Receipt(r) = c.call(&AdminRequest::Send(req)).await? else {
        bail!("unexpected answer")
    };
    let Some(timeout) = wait else {
        if json {
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
            if json {
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
            if json {
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

/// A send's payload: the positional text, `-` for stdin, `--file`; or,
/// for `EDGE/workflow` (`target` as the box below sees it, without the
/// edge), the workflow file packed with its payload files, checked here
/// first. `Err(exit code)` once the error is printed.
pub fn send_payload(a: &SendArgs, target: &str) -> anyhow::Result<Result<Vec<u8>, i32>> {
    // For the runner of the box at the end of the path, however deep.
    let to_workflow = match crate::engine::route::Target::parse(target) {
        Ok(t @ crate::engine::route::Target::Edge { .. }) => {
            t.last() == crate::engine::route::Target::Device(crate::shell::workflow::WORKFLOW)
        }
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
            match crate::engine::workflow::Packed::read(&path) {
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

/// A send's `SendOptions` from its flags: priority, ttl, attempts, key,
/// `--after` and `--not-before` (ms since the Unix epoch). A bad id or time
/// is a `UsageError` (exit 2).
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
/// zone (`command::parse_time`, which the HTTP API reads too).
pub fn parse_not_before(s: &str, now: u64) -> Result<u64, String> {
    crate::engine::command::parse_time(s, now).map_err(|e| format!("--not-before {s}: {e}"))
}

/// A usage error found after parsing (exit 2), e.g. a flag's value that
/// only makes sense with another.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Bulk send: one command per line, over several admin connections so the
/// box folds them into shared group commits. Prints the ids in line order.
pub(super) async fn send_lines(a: SendArgs, path: &Path, data_dir: &Path) -> anyhow::Result<i32> {
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
        return Err(UsageError(
            "--key with --lines would give every line the same idempotency key; drop --key".into(),
        )
        .into());
    }
    if a.signing.envelope.is_some() {
        return Err(UsageError(
            "--envelope signs one command; with --lines use --sign KEY, which signs each line"
                .into(),
        )
        .into());
    }
    // Each line names the same artifact (resolved once) ...
    let reference = match &a.artifact {
        Some(spec) => Some(super::artifact::reference(spec, data_dir).await?),
        None => None,
    };
    // ... and is signed with the same key, audience and lifetime.
    let signer = match &a.signing.sign {
        Some(path) => {
            let key = super::sign::load_key(path)?;
            let audience = super::sign::audience(&a.signing, &a.target, data_dir).await?;
            let expires = a
                .signing
                .expires
                .map_or(super::sign::DEFAULT_EXPIRY, |d| d.0);
            Some(std::sync::Arc::new((key, audience, expires)))
        }
        None => None,
    };
    let opts = send_options(&a)?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(lines.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut ids = vec![None; lines.len()];
    let mut tasks = tokio::task::JoinSet::new();
    for part in lines.chunks(lines.len().div_ceil(CONNECTIONS).max(1)) {
        let (part, opts, target, dir, bar, signer, reference) = (
            part.to_vec(),
            opts.clone(),
            a.target.clone(),
            data_dir.to_path_buf(),
            bar.clone(),
            signer.clone(),
            reference.clone(),
        );
        tasks.spawn(async move {
            let mut c = AdminClient::connect(&dir).await?;
            let mut out = Vec::with_capacity(part.len());
            for (n, line) in part {
                let mut req = SendRequest {
                    target: target.clone(),
                    payload: line.into_bytes(),
                    opts: opts.clone(),
                    origin: "cli".into(),
                    signature: reference.clone(),
                };
                if let Some(s) = &signer {
                    let (key, audience, expires) = &**s;
                    super::sign::sign_request(
                        &mut req,
                        key,
                        *expires,
                        audience,
                        crate::now_millis(),
                    )?;
                }
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

pub(super) fn print_outcome(v: &CommandView) {
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

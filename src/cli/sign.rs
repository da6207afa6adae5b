//! Signing a command: `send --sign KEY`, and `outpost sign`, which makes an
//! envelope for a sender that is not the CLI (the HTTP API's
//! `envelope_b64`, a NATS header).

use super::*;
use crate::engine::trust::{envelope, Claims, OperatorKey};

/// How long a signature is good for unless `--expires` says.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(3600);

/// The flags that sign.
#[derive(Debug, Clone, clap::Args)]
pub struct SignArgs {
    /// Sign with this operator key (an OpenSSH ed25519 private key file,
    /// from `outpost key new` or `ssh-keygen -t ed25519`)
    #[arg(long, env = "OUTPOST_SIGNING_KEY", value_name = "KEY")]
    pub sign: Option<PathBuf>,
    /// How long the signature is good for: 30m, 2h, or seconds [default: 1h]
    #[arg(long, value_name = "DURATION", requires = "sign")]
    pub expires: Option<crate::engine::duration::DurationArg>,
    /// The box the command is meant for [default: for `edge-1/…` the edge,
    /// else the box's name]
    #[arg(long, requires = "sign")]
    pub audience: Option<String>,
    /// Send with this envelope (base64, from `outpost sign`) instead of
    /// signing here: signed elsewhere, offline
    #[arg(long, value_name = "BASE64", conflicts_with = "sign")]
    pub envelope: Option<String>,
}

/// The audience a target implies: the box right above the device.
pub fn default_audience(target: &str, box_name: &str) -> String {
    let mut parts: Vec<&str> = target.split('/').collect();
    parts.pop();
    parts.pop().unwrap_or(box_name).to_string()
}

/// Sign a request in place: its id becomes the envelope's, and the
/// artifact its unsigned envelope named (`send --artifact`) is signed too.
pub fn sign_request(
    req: &mut SendRequest,
    key: &OperatorKey,
    expires: Duration,
    audience: &str,
    now: crate::Millis,
) -> anyhow::Result<CommandId> {
    let id = CommandId::new(now, rand::random());
    let claims = Claims {
        id,
        target: req.target.clone(),
        payload_sha256: envelope::payload_digest(&req.payload),
        artifact: match req.signature.as_deref() {
            Some(e) if envelope::sealed(Some(e)).is_none() => envelope::artifact(e)?,
            _ => None,
        },
        priority: req.opts.priority,
        not_before: req.opts.not_before,
        expires_at: now + expires.as_millis() as u64,
        audience: audience.to_string(),
        key_id: key.public.id,
    };
    req.signature = Some(envelope::seal(&claims, key)?);
    Ok(id)
}

pub fn load_key(path: &Path) -> anyhow::Result<OperatorKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the signing key {}", path.display()))?;
    OperatorKey::from_openssh(&text).with_context(|| format!("signing key {}", path.display()))
}

/// Sign `req` as `a` asks, asking the box its name when no audience is
/// given. Nothing when `--sign` is absent.
pub(super) async fn maybe_sign(
    req: &mut SendRequest,
    a: &SignArgs,
    data_dir: &Path,
) -> anyhow::Result<()> {
    if let Some(b64) = &a.envelope {
        let env = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| UsageError(format!("--envelope is not base64 ({e})")))?;
        req.signature = Some(env);
        return Ok(());
    }
    let Some(path) = &a.sign else {
        return Ok(());
    };
    let key = load_key(path)?;
    let audience = audience(a, &req.target, data_dir).await?;
    let expires = a.expires.map_or(DEFAULT_EXPIRY, |d| d.0);
    sign_request(req, &key, expires, &audience, crate::now_millis())?;
    Ok(())
}

/// `--audience`, or the one `target` implies on the box (its name asked).
pub(super) async fn audience(
    a: &SignArgs,
    target: &str,
    data_dir: &Path,
) -> anyhow::Result<String> {
    if let Some(x) = &a.audience {
        return Ok(x.clone());
    }
    let mut c = client(data_dir).await?;
    let AdminResponse::Trust(t) = c.call(&AdminRequest::TrustList).await? else {
        bail!("unexpected answer")
    };
    Ok(default_audience(target, &t.name))
}

/// `outpost sign`: an envelope on stdout, for a sender that is not the CLI.
#[derive(Debug, clap::Args)]
pub struct SignCmd {
    pub target: String,
    /// The payload; `-` reads stdin.
    pub payload: Option<String>,
    #[arg(long, conflicts_with = "payload")]
    pub file: Option<PathBuf>,
    #[arg(long, default_value = "normal", ignore_case = true, value_parser = send::priority_parser())]
    pub priority: Priority,
    /// As `send --not-before`: the command must be sent with the same.
    #[arg(long)]
    pub not_before: Option<String>,
    /// The operator key (OpenSSH ed25519 private key file)
    #[arg(long, env = "OUTPOST_SIGNING_KEY", value_name = "KEY")]
    pub key: PathBuf,
    /// The box the command is meant for (its `--name`)
    #[arg(long)]
    pub audience: String,
    /// How long the signature is good for [default: 1h]
    #[arg(long, value_name = "DURATION")]
    pub expires: Option<crate::engine::duration::DurationArg>,
    #[arg(long)]
    pub json: bool,
}

pub(super) fn sign_cmd(a: SignCmd) -> anyhow::Result<i32> {
    let payload = match (&a.payload, &a.file) {
        (_, Some(f)) => std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?,
        (Some(p), None) if p == "-" => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            b
        }
        (Some(p), None) => p.clone().into_bytes(),
        (None, None) => Vec::new(),
    };
    let not_before = match &a.not_before {
        Some(t) => Some(parse_not_before(t, crate::now_millis()).map_err(UsageError)?),
        None => None,
    };
    let mut req = SendRequest {
        target: a.target.clone(),
        payload,
        opts: SendOptions {
            priority: a.priority,
            not_before,
            ..Default::default()
        },
        origin: "cli".into(),
        signature: None,
    };
    let key = load_key(&a.key)?;
    let expires = a.expires.map_or(DEFAULT_EXPIRY, |d| d.0);
    let id = sign_request(&mut req, &key, expires, &a.audience, crate::now_millis())?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(req.signature.unwrap_or_default());
    if a.json {
        crate::outln!("{}", json!({"id": id.to_string(), "envelope_b64": b64}));
    } else {
        crate::outln!("{b64}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audience_is_the_box_above_the_device() {
        assert_eq!(default_audience("dev-7", "hub"), "hub");
        assert_eq!(default_audience("edge-1/dev-7", "hub"), "edge-1");
        assert_eq!(default_audience("hub/edge-1/tag:x", "top"), "edge-1");
    }
}

//! `outpost backup`: a consistent snapshot of the running box, streamed
//! over the admin socket into one file (`crate::shell::backup` has the format).

use super::*;
use crate::shell::backup::{BackupFile, Encrypt, Header};

/// `outpost backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Write the backup here: atomically (whole or not at all), mode 0600,
    /// since it holds the box's CA key.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Encrypt it (age, scrypt) with the passphrase on this file's first
    /// line.
    #[arg(long, value_name = "FILE", conflicts_with = "recipient")]
    pub passphrase_file: Option<PathBuf>,
    /// Encrypt it to this age X25519 public key (`age1…`, repeatable);
    /// `outpost restore --identity` with the matching secret key opens it.
    #[arg(long, value_name = "AGE-PUBKEY")]
    pub recipient: Vec<String>,
    /// Print the backup's header as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The passphrase on a file's first line (a trailing newline is not part
/// of it).
pub(super) fn read_passphrase(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the passphrase file {}", path.display()))?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        bail!(
            "the passphrase file {} is empty; write the passphrase on its first line",
            path.display()
        );
    }
    Ok(line)
}

pub(super) async fn run(a: BackupArgs, data_dir: &Path) -> anyhow::Result<i32> {
    let encrypt = match (&a.passphrase_file, a.recipient.is_empty()) {
        (Some(p), _) => Some(Encrypt::Passphrase(read_passphrase(p)?)),
        (None, false) => Some(Encrypt::Recipients(a.recipient.clone())),
        (None, true) => None,
    };
    let mut c = client(data_dir).await?;
    // Created before the box is asked, so a bad --out or key fails first.
    let mut file = BackupFile::create(&a.out, encrypt.as_ref())?;
    let t = std::time::Instant::now();
    c.request(&AdminRequest::Backup).await?;
    let info = loop {
        match c.next().await? {
            Some(AdminResponse::BackupPiece(p)) => file.write(&p)?,
            Some(AdminResponse::BackupDone(info)) => break info,
            Some(_) => bail!("unexpected answer from the box during the backup"),
            None => return Err(AdminError::Closed.into()),
        }
    };
    let header = file.finish(&info)?;
    if a.json {
        crate::outln!("{}", serde_json::to_string(&header)?);
    } else {
        print_header(&header, &a.out, Some(t.elapsed()));
    }
    Ok(0)
}

/// A backup's header for people.
pub(super) fn print_header(h: &Header, path: &Path, took: Option<Duration>) {
    let bytes = crate::shell::backup::HEADER_BYTES as u64 + h.body_bytes + 32;
    crate::outln!(
        "backup of {} (store {}) up to group {} written to {}",
        h.box_name,
        h.box_id,
        h.last_group,
        path.display()
    );
    let mut rows = vec![
        vec![
            "taken".into(),
            crate::engine::command::rfc3339(h.created_ms),
        ],
        vec!["size".into(), crate::shell::config::show_size(bytes)],
        vec![
            "holds".into(),
            format!("{} trees, {} keys, {} files", h.trees, h.keys, h.files),
        ],
        vec![
            "encryption".into(),
            format!("{:?}", h.encryption).to_lowercase(),
        ],
        vec!["sha256".into(), h.body_sha256.clone()],
    ];
    if let Some(t) = took {
        rows.push(vec!["took".into(), format!("{:.2} s", t.as_secs_f64())]);
    }
    print_table(&["", ""], &rows);
}

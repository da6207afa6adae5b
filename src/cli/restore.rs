//! `outpost restore`: a backup onto a stopped box's empty data dir.

use super::*;
use crate::shell::backup::Decrypt;

/// `outpost restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The file `outpost backup` wrote.
    pub file: PathBuf,
    /// Restore into a data dir that is not empty: what is there is moved
    /// into DATA_DIR/replaced-<time>/ first (nothing is deleted).
    #[arg(long)]
    pub force: bool,
    /// The passphrase of an encrypted backup, on this file's first line.
    #[arg(long, value_name = "FILE", conflicts_with = "identity")]
    pub passphrase_file: Option<PathBuf>,
    /// An age identity file (`AGE-SECRET-KEY-1…`) of a recipient the
    /// backup was encrypted to.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(a: RestoreArgs, data_dir: &Path) -> anyhow::Result<i32> {
    let key = match (&a.passphrase_file, &a.identity) {
        (Some(p), _) => Some(Decrypt::Passphrase(super::backup::read_passphrase(p)?)),
        (None, Some(i)) => Some(Decrypt::Identities(
            std::fs::read_to_string(i)
                .with_context(|| format!("reading the identity file {}", i.display()))?,
        )),
        (None, None) => None,
    };
    let opts = crate::shell::store::StoreOptions::default();
    let r = crate::shell::backup::restore(&a.file, data_dir, a.force, key.as_ref(), &opts)?;
    if a.json {
        crate::outln!(
            "{}",
            json!({"header": r.header, "data_dir": data_dir, "groups": r.groups,
                   "moved_aside": r.moved_aside, "config": r.config})
        );
        return Ok(0);
    }
    let h = &r.header;
    crate::outln!(
        "restored {} (store {}) up to group {}, taken {}, into {}",
        h.box_name,
        h.box_id,
        h.last_group,
        crate::engine::command::rfc3339(h.created_ms),
        data_dir.display()
    );
    if let Some(aside) = &r.moved_aside {
        crate::outln!("what was in the data dir is now in {}", aside.display());
    }
    if let Some(c) = &r.config {
        crate::outln!(
            "the box's config file is in {}: put it where `outpost serve --config` reads it",
            c.display()
        );
    }
    crate::outln!(
        "start the box with `outpost serve --data-dir {}`: devices reconnect with their bundles; what was acknowledged after {} is not in this backup",
        data_dir.display(),
        crate::engine::command::rfc3339(h.created_ms)
    );
    Ok(0)
}

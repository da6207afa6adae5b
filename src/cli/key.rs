//! `outpost key new NAME`: an operator's signing key, as an OpenSSH
//! ed25519 key pair (`NAME` 0600, `NAME.pub`), the same files
//! `ssh-keygen -t ed25519 -N ''` writes: either may be used.

use super::*;
use crate::engine::trust::OperatorKey;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;

#[derive(Debug, clap::Subcommand)]
pub enum KeyCmd {
    /// Make a signing key: NAME (private, mode 0600) and NAME.pub.
    New {
        /// The key's name (its file name and the .pub comment).
        name: String,
        /// Where to write the files [default: the current directory]
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print a key's id (SHA256:…), from its private or public file.
    Id { file: PathBuf },
}

pub(super) fn run(cmd: KeyCmd) -> anyhow::Result<i32> {
    match cmd {
        KeyCmd::New { name, dir, json } => {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(UsageError(format!(
                    "`{name}` cannot be a key's file name: use letters, digits, - or _"
                ))
                .into());
            }
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let private = dir.join(&name);
            let public = dir.join(format!("{name}.pub"));
            let key = OperatorKey::generate(&name)?;
            // create_new: never overwrite a key someone may already trust.
            write_new(&private, key.to_openssh()?.as_bytes(), 0o600)?;
            if let Err(e) = write_new(
                &public,
                format!("{}\n", key.public.to_openssh()).as_bytes(),
                0o644,
            ) {
                let _ = std::fs::remove_file(&private);
                return Err(e);
            }
            if json {
                crate::outln!(
                    "{}",
                    json!({"id": key.public.id.to_string(), "private": private, "public": public})
                );
            } else {
                crate::outln!(
                    "wrote {} (private, 0600) and {}",
                    private.display(),
                    public.display()
                );
                crate::outln!("key id {}", key.public.id);
                crate::outln!(
                    "on the box: outpost trust add {} --role operator",
                    public.display()
                );
            }
            Ok(0)
        }
        KeyCmd::Id { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let id = if text.trim_start().starts_with("-----BEGIN") {
                OperatorKey::from_openssh(&text)?.public.id
            } else {
                crate::engine::trust::OperatorPublic::from_openssh(&text)?.id
            };
            crate::outln!("{id}");
            Ok(0)
        }
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (a key there is never overwritten: pick another name or --dir)",
                path.display()
            )
        })?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

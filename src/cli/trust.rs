//! `outpost trust add | list | remove`: the box's operator keys.

use super::*;
use crate::engine::trust::{Grant, Pattern, Role, TrustEdit};

#[derive(Debug, clap::Subcommand)]
pub enum TrustCmd {
    /// Trust an operator key (its .pub file, or - for stdin): commands it
    /// signs are taken, within its role and targets.
    Add {
        file: PathBuf,
        /// viewer (reads only), operator (send, cancel, retry) or admin
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["viewer", "operator", "admin"]))]
        role: String,
        /// Only targets matching this pattern (`*` is any run of
        /// characters: dev-*, tag:line-3, edge-1/*); repeat for several
        /// [default: every target]
        #[arg(long = "targets", value_name = "PATTERN")]
        targets: Vec<String>,
        /// The name it is listed under [default: the .pub comment]
        #[arg(long)]
        name: Option<String>,
    },
    /// The trusted keys, the box's name (the audience) and whether it
    /// requires signatures.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting a key (by name or SHA256:… id): what it signed and is
    /// not yet delivered ends rejected, saying why.
    Remove { key: String },
}

pub(super) async fn run(cmd: TrustCmd, data_dir: &Path) -> anyhow::Result<i32> {
    match cmd {
        TrustCmd::Add {
            file,
            role,
            targets,
            name,
        } => {
            let public = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read the public key {}", file.display()))?
            };
            let role: Role = role.parse().map_err(UsageError)?;
            let targets = targets
                .iter()
                .map(|t| Pattern::new(t))
                .collect::<Result<Vec<_>, _>>()
                .map_err(UsageError)?;
            let edit = TrustEdit::Add {
                public: public.trim().to_string(),
                name,
                grant: Grant { role, targets },
            };
            let mut c = client(data_dir).await?;
            let AdminResponse::Trusted(k) = c.call(&AdminRequest::Trust(edit)).await? else {
                bail!("unexpected answer")
            };
            crate::outln!("trusted {} ({}) as {}", k.name, k.id, k.grant.role);
            Ok(0)
        }
        TrustCmd::Remove { key } => {
            let mut c = client(data_dir).await?;
            let AdminResponse::Trusted(k) = c
                .call(&AdminRequest::Trust(TrustEdit::Remove { key }))
                .await?
            else {
                bail!("unexpected answer")
            };
            crate::outln!(
                "removed {} ({}); what it signed and is not yet delivered ends rejected",
                k.name,
                k.id
            );
            Ok(0)
        }
        TrustCmd::List { json } => {
            let mut c = client(data_dir).await?;
            let AdminResponse::Trust(t) = c.call(&AdminRequest::TrustList).await? else {
                bail!("unexpected answer")
            };
            if json {
                let keys: Vec<Value> = t
                    .set
                    .keys
                    .iter()
                    .map(|k| {
                        json!({
                            "name": k.name,
                            "id": k.id.to_string(),
                            "role": k.grant.role.as_str(),
                            "targets": k.grant.targets.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                            "added_at": crate::engine::command::rfc3339(k.added_at),
                        })
                    })
                    .collect();
                let removed: Vec<Value> = t
                    .set
                    .removed
                    .iter()
                    .map(|r| json!({"name": r.name, "id": r.id.to_string(), "removed_at": crate::engine::command::rfc3339(r.removed_at)}))
                    .collect();
                crate::outln!(
                    "{}",
                    json!({"name": t.name, "require_signed": t.require_signed, "keys": keys, "removed": removed})
                );
                return Ok(0);
            }
            crate::outln!(
                "box {}: signatures {}",
                t.name,
                if t.require_signed {
                    "required"
                } else {
                    "optional"
                }
            );
            let rows: Vec<Vec<String>> = t
                .set
                .keys
                .iter()
                .map(|k| {
                    vec![
                        k.name.clone(),
                        k.id.to_string(),
                        k.grant.role.to_string(),
                        if k.grant.targets.is_empty() {
                            "*".into()
                        } else {
                            k.grant
                                .targets
                                .iter()
                                .map(|p| p.as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        },
                        ago(k.added_at),
                    ]
                })
                .collect();
            if rows.is_empty() {
                crate::outln!(
                    "no trusted keys (add one with `outpost trust add KEY.pub --role operator`)"
                );
            } else {
                print_table(&["NAME", "ID", "ROLE", "TARGETS", "ADDED"], &rows);
            }
            Ok(0)
        }
    }
}

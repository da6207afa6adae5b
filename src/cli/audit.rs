//! `outpost audit`: the audit log as a table or JSON lines, and `--verify`,
//! the walk of its hash chain. Both ask the running box, or read a stopped
//! box's data dir themselves (an auditor checking a box's log offline).

use super::*;
use crate::engine::audit::View;

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Entries at or after this time: RFC 3339 (2026-11-25T10:00:00Z) or a
    /// duration ago (1h, 7d)
    #[arg(long, value_name = "TIME|DURATION")]
    pub since: Option<String>,
    /// The newest N entries only
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Walk the hash chain: exit 0 if it is intact, else 6 naming the
    /// first bad seq and what is wrong
    #[arg(long, conflicts_with_all = ["since", "limit", "json"])]
    pub verify: bool,
}

/// `--since`: a duration ago, or a time.
fn since(s: &str, now: u64) -> Result<u64, UsageError> {
    if let Ok(d) = crate::engine::duration::parse(s) {
        return Ok(now.saturating_sub(d.as_millis() as u64));
    }
    // A time is read as `--not-before` reads it; its `+10m` form (from now
    // on) means nothing here.
    match s.starts_with('+') {
        false => parse_not_before(s, now).ok(),
        true => None,
    }
    .ok_or_else(|| {
        UsageError(format!(
            "--since {s}: write an RFC 3339 time with its zone (2026-11-25T10:00:00Z) or a duration ago (1h, 7d)"
        ))
    })
}

pub(super) async fn run(a: AuditArgs, data_dir: &Path) -> anyhow::Result<i32> {
    let req = if a.verify {
        AdminRequest::AuditVerify
    } else {
        AdminRequest::Audit {
            since: a
                .since
                .as_deref()
                .map(|s| since(s, crate::now_millis()))
                .transpose()?,
            limit: a.limit,
        }
    };
    let resp = match AdminClient::connect(data_dir).await {
        Ok(mut c) => c.call(&req).await?,
        Err(AdminError::NoBox { .. }) => offline(data_dir, &req)?,
        Err(e) => return Err(e.into()),
    };
    match resp {
        AdminResponse::AuditVerified { intact: true, text } => {
            crate::outln!("{text}");
            Ok(exit::OK)
        }
        AdminResponse::AuditVerified {
            intact: false,
            text,
        } => {
            eprintln!("error: {text}");
            Ok(exit::UNSUCCESSFUL)
        }
        AdminResponse::Audit(views) => {
            print(&views, a.json);
            Ok(exit::OK)
        }
        _ => bail!("unexpected answer"),
    }
}

/// A stopped box: its store, opened here (sled's lock refuses this while a
/// box holds it), answers as the box would.
fn offline(data_dir: &Path, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
    if !data_dir.join(crate::shell::store::DB_DIR).exists() {
        bail!(
            "no box is running at {} and it holds no database — pass --data-dir (or OUTPOST_DATA_DIR) for the box you mean",
            data_dir.display()
        );
    }
    let store = crate::shell::store::Store::open(data_dir, &Default::default())?;
    Ok(match req {
        AdminRequest::AuditVerify => {
            AdminResponse::audit_verified(crate::shell::queue::audit::verify(&store)?)
        }
        AdminRequest::Audit { since, limit } => {
            AdminResponse::Audit(crate::shell::queue::audit::read(&store, *since, *limit)?)
        }
        _ => bail!("not an audit request"),
    })
}

fn print(views: &[View], json: bool) {
    if json {
        for v in views {
            crate::outln!("{}", serde_json::to_string(v).unwrap_or_default());
        }
        return;
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.seq.to_string(),
                ago(v.at),
                v.who.clone(),
                v.from.clone(),
                v.what.clone(),
                if v.target.is_empty() {
                    v.command.clone().unwrap_or_default()
                } else {
                    v.target.clone()
                },
                if v.allowed {
                    "allowed".into()
                } else {
                    format!("refused: {}", v.why.as_deref().unwrap_or(""))
                },
            ]
        })
        .collect();
    print_table(
        &["SEQ", "WHEN", "WHO", "FROM", "WHAT", "TARGET", "DECISION"],
        &rows,
    );
}

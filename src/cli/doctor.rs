//! `outpost doctor`: checks a data dir the way a technician would, and says
//! for each thing what is wrong and how to fix it.
//!
//! Checks: the data dir and its permissions, the key files' modes, the CA
//! and server certificates' expiry, whether a box answers on the admin
//! socket, free disk, and the database itself (a full replay of every group,
//! only when no box holds it open).

use crate::identity::{CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, TLS_DIR};
use crate::shell::admin::{AdminClient, AdminRequest, AdminResponse};
use crate::shell::store::{Store, StoreError, StoreOptions};
use serde::Serialize;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Pass,
    /// Worth a look, but the box runs: `report` still exits 0.
    Warn,
    /// Broken, or about to break the box: `report` exits 1.
    Fail,
}

/// One check's finding.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// The thing checked, as printed in the report's first column ("data dir",
    /// "disk", "database", "box", "reserve", "backup", …).
    pub check: &'static str,
    /// How it came out.
    pub status: Status,
    /// What was found, in one line: the value or error behind the status.
    pub detail: String,
    /// What to do (empty when it passed).
    pub fix: String,
}

fn f(
    check: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        check,
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// An explicit free-space reserve and where it was set (the file, or the
/// command line or environment).
#[derive(Clone, Debug)]
pub struct Reserve {
    /// The reserve in bytes: the free space below which the box refuses
    /// new commands (`min_free_disk`).
    pub bytes: u64,
    /// Where it was set: the config file's path, or the command line or
    /// environment, as named in the finding.
    pub origin: String,
}

/// Run every check on `data_dir`.
pub async fn check(data_dir: &Path) -> Vec<Finding> {
    check_with(data_dir, None).await
}

/// [`check`], also checking an explicitly set reserve against the disk.
pub async fn check_with(data_dir: &Path, reserve: Option<Reserve>) -> Vec<Finding> {
    let mut out = Vec::new();
    let d = data_dir.display();
    match std::fs::metadata(data_dir) {
        Err(e) => {
            out.push(f(
                "data dir",
                Status::Fail,
                format!("{d}: {e}"),
                "create it with `outpost init --data-dir DIR`, or pass the right --data-dir",
            ));
            return out;
        }
        Ok(m) if !m.is_dir() => {
            // Nothing else can be checked: every other file lives in it.
            out.push(f(
                "data dir",
                Status::Fail,
                format!("{d} is not a directory ({})", file_kind(&m)),
                "pass the data dir itself as --data-dir (or OUTPOST_DATA_DIR); if this file is not needed, move it away and run `outpost init --data-dir DIR`",
            ));
            return out;
        }
        Ok(m) if m.permissions().mode() & 0o002 != 0 => out.push(f(
            "data dir",
            Status::Fail,
            format!(
                "{d} is world-writable (mode {:o})",
                m.permissions().mode() & 0o777
            ),
            format!("chmod o-w {d}"),
        )),
        Ok(m) => out.push(f(
            "data dir",
            Status::Pass,
            format!("{d} (mode {:o})", m.permissions().mode() & 0o777),
            "",
        )),
    }

    let tls = data_dir.join(TLS_DIR);
    // A store without its CA: `serve` refuses to start (a new CA would lock
    // out every enrolled device), and so does this check.
    let ca_missing = crate::identity::Identity::check_ca_present(data_dir).err();
    if let Some(e) = &ca_missing {
        out.push(f(
            "identity",
            Status::Fail,
            e.to_string(),
            format!("restore {} from a backup of this box", tls.display()),
        ));
    }
    let has_store = data_dir.join(crate::shell::store::DB_DIR).exists();
    for key in [CA_KEY, SERVER_KEY] {
        let p = tls.join(key);
        match std::fs::metadata(&p) {
            Err(_) => out.push(f(
                "keys",
                Status::Fail,
                format!("{} is missing", p.display()),
                if key == CA_KEY && has_store {
                    "restore it from a backup of this box (a new CA would lock out every enrolled device)"
                } else {
                    "run `outpost init` to create the box's identity"
                },
            )),
            Ok(m) if m.permissions().mode() & 0o077 != 0 => out.push(f(
                "keys",
                Status::Fail,
                format!(
                    "{} is readable by others (mode {:o})",
                    p.display(),
                    m.permissions().mode() & 0o777
                ),
                format!("chmod 600 {}", p.display()),
            )),
            Ok(_) => out.push(f(
                "keys",
                Status::Pass,
                format!("{} is private (0600)", p.display()),
                "",
            )),
        }
    }
    for cert in [CA_CERT, SERVER_CERT] {
        out.push(cert_expiry(&tls.join(cert)));
    }

    let running = match AdminClient::connect(data_dir).await {
        Ok(mut c) => match c.call(&AdminRequest::Status).await {
            Ok(AdminResponse::Status(s)) => {
                out.push(f(
                    "box",
                    Status::Pass,
                    format!(
                        "running, up {} s, listening on {}, {}/{} devices online",
                        s.uptime_s, s.listen, s.devices_online, s.devices_total
                    ),
                    "",
                ));
                true
            }
            Ok(_) | Err(_) => {
                out.push(f(
                    "box",
                    Status::Fail,
                    "the admin socket accepts but does not answer",
                    "look at the box's log: journalctl -u outpost",
                ));
                true
            }
        },
        Err(e) => {
            out.push(f(
                "box",
                Status::Warn,
                format!("not running ({e})"),
                "start it: systemctl start outpost, or outpost serve",
            ));
            false
        }
    };

    out.push(disk(data_dir));
    if let Some(r) = reserve {
        if let Some(x) = reserve_check(data_dir, &r) {
            out.push(x);
        }
    }

    if running {
        out.push(f(
            "database",
            Status::Pass,
            "in use by the running box; its integrity was checked when it opened",
            "",
        ));
    } else if !data_dir.join("db").exists() {
        out.push(f(
            "database",
            Status::Warn,
            "no database yet",
            "it is created by the first `outpost serve`",
        ));
    } else {
        out.push(database(data_dir));
        if ca_missing.is_none() {
            if let Some(x) = store_ca(data_dir) {
                out.push(x);
            }
        }
    }
    out
}

/// The CA against the one the store recorded (only with no box running:
/// a running box checked it when it started).
fn store_ca(dir: &Path) -> Option<Finding> {
    let identity = crate::identity::Identity::load(dir).ok()?;
    let store = Store::open(dir, &StoreOptions::default()).ok()?;
    let recorded = store.ca_fingerprint().ok()?;
    Some(match identity.check_store_ca(dir, recorded) {
        Ok(()) => f(
            "identity",
            Status::Pass,
            if recorded.is_some() {
                "the CA is the one the store's devices were enrolled under"
            } else {
                "the store has not recorded its CA yet (the next start does)"
            },
            "",
        ),
        Err(e) => f(
            "identity",
            Status::Fail,
            e.to_string(),
            format!(
                "restore {} from a backup of this box",
                dir.join(TLS_DIR).display()
            ),
        ),
    })
}

fn cert_expiry(path: &Path) -> Finding {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) => {
            return f(
                "certificates",
                Status::Fail,
                format!("{}: {e}", path.display()),
                "run `outpost init`",
            )
        }
    };
    let der = match rustls_pemfile::certs(&mut text.as_slice()).next() {
        Some(Ok(c)) => c,
        _ => {
            return f(
                "certificates",
                Status::Fail,
                format!("{} holds no PEM certificate", path.display()),
                "restore it from a backup, or re-initialise the data dir",
            )
        }
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return f(
            "certificates",
            Status::Fail,
            format!("{} does not parse", path.display()),
            "restore it from a backup",
        );
    };
    let not_after = cert.validity().not_after.timestamp();
    let now = (crate::now_millis() / 1000) as i64;
    let days = (not_after - now) / 86_400;
    match days {
        d if d < 0 => f(
            "certificates",
            Status::Fail,
            format!("{} expired {} days ago", path.display(), -d),
            "re-initialise the box's identity and re-enroll devices",
        ),
        d if d < 30 => f(
            "certificates",
            Status::Warn,
            format!("{} expires in {d} days", path.display()),
            "plan a re-issue before it expires",
        ),
        d => f(
            "certificates",
            Status::Pass,
            format!("{} valid for {d} more days", path.display()),
            "",
        ),
    }
}

fn disk(dir: &Path) -> Finding {
    let (total, free) = match crate::shell::store::fs_space(dir) {
        Ok((t, f)) => (t as u128, f as u128),
        Err(e) => return f("disk", Status::Warn, format!("statvfs failed: {e}"), ""),
    };
    let pct = if total == 0 {
        100.0
    } else {
        free as f64 * 100.0 / total as f64
    };
    let detail = format!(
        "{:.1}% free ({} MiB of {} MiB)",
        pct,
        free >> 20,
        total >> 20
    );
    if pct < 1.0 {
        f(
            "disk",
            Status::Fail,
            detail,
            "free space now: the box refuses new commands when the disk is full",
        )
    } else if pct < 10.0 {
        f(
            "disk",
            Status::Warn,
            detail,
            "free some space, or set --max-disk so the box refuses early and cleanly",
        )
    } else {
        f("disk", Status::Pass, detail, "")
    }
}

fn file_kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_fifo() {
        "a fifo"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device node"
    } else {
        "not a directory"
    }
}

/// A reserve the filesystem can never leave free refuses every send.
fn reserve_check(dir: &Path, r: &Reserve) -> Option<Finding> {
    use crate::shell::config::show_size;
    let (total, _) = crate::shell::store::fs_space(dir).ok()?;
    if !crate::shell::serve::reserve_exceeds_disk(r.bytes, total) {
        return None;
    }
    Some(f(
        "reserve",
        Status::Fail,
        format!(
            "the free-space reserve ({}, from {}) is not smaller than the whole filesystem holding {} ({}): the box refuses every new command",
            show_size(r.bytes),
            r.origin,
            dir.display(),
            show_size(total)
        ),
        format!(
            "lower --min-free-disk (OUTPOST_MIN_FREE_DISK, or min_free_disk in the config file) below {}, or leave it unset for the smaller of 32 MiB and 10 % of the disk ({})",
            show_size(total),
            show_size(crate::shell::queue::default_reserve(total))
        ),
    ))
}

fn database(dir: &Path) -> Finding {
    let store = match Store::open(dir, &StoreOptions::default()) {
        Ok(s) => s,
        Err(e @ StoreError::Locked { .. }) => {
            return f(
                "database",
                Status::Warn,
                e.to_string(),
                "stop the process holding it, then run doctor again",
            )
        }
        Err(e @ StoreError::Corrupt { .. }) => {
            return f(
                "database",
                Status::Fail,
                e.to_string(),
                "the damage is named above: restore a backup of the data dir, or move it aside to start empty (what is in it is then lost)",
            )
        }
        // Not damage: the data dir is to be kept, and the message says what
        // to do.
        Err(e) => {
            return f(
                "database",
                Status::Fail,
                e.to_string(),
                "no damage was found: keep the data dir, fix what is named above, and run doctor again",
            )
        }
    };
    let (mut groups, mut errors) = (0u64, Vec::new());
    for g in store.replay() {
        match g {
            Ok(_) => groups += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    let devices = store.devices().map(|d| d.len()).unwrap_or(0);
    if errors.is_empty() {
        f(
            "database",
            Status::Pass,
            format!(
                "{groups} groups replayed, {devices} devices, last group {}",
                store.last_seq()
            ),
            "",
        )
    } else {
        f(
            "database",
            Status::Fail,
            format!("{} damaged records, e.g. {}", errors.len(), errors[0]),
            "the damaged records are named above: restore a backup of the data dir, or move it aside to start empty (what is in it is then lost)",
        )
    }
}

/// Print the findings; the exit code is 1 when any check failed.
pub fn report(findings: &[Finding], json: bool) -> i32 {
    if json {
        crate::outln!(
            "{}",
            serde_json::to_string(findings).unwrap_or_else(|_| "[]".into())
        );
    } else {
        for x in findings {
            let tag = match x.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            crate::outln!("{tag}  {:<13} {}", x.check, x.detail);
            if !x.fix.is_empty() {
                crate::outln!("      {:<13} → {}", "", x.fix);
            }
        }
    }
    i32::from(findings.iter().any(|x| x.status == Status::Fail))
}

/// The scheduled backups: the newest one's age against the schedule.
pub fn backup_finding(s: Option<&crate::shell::backup::schedule::Schedule>, now: u64) -> Finding {
    let Some(s) = s else {
        return f(
            "backup",
            Status::Pass,
            "no scheduled backups (backup_every unset): a dead box's replacement gets only what `outpost backup` last wrote",
            "",
        );
    };
    let every = humantime::format_duration(s.every);
    match crate::shell::backup::schedule::list(&s.dir).pop() {
        None => f(
            "backup",
            Status::Warn,
            format!("no backup yet in {} (one every {every})", s.dir.display()),
            "start the box (it takes the first at once), and see `outpost status` for why one failed",
        ),
        Some((at, path)) => {
            let age = std::time::Duration::from_millis(now.saturating_sub(at));
            let shown = humantime::format_duration(std::time::Duration::from_secs(age.as_secs()));
            if age > 2 * s.every {
                f(
                    "backup",
                    Status::Warn,
                    format!("the newest backup, {}, is {shown} old (one every {every})", path.display()),
                    "`outpost status` shows why the last one failed (a full disk, a stopped box); a restore would lose everything since",
                )
            } else {
                f(
                    "backup",
                    Status::Pass,
                    format!("the newest backup, {}, is {shown} old (one every {every})", path.display()),
                    "",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fresh_box_passes_and_damage_fails_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        crate::identity::Identity::init(dir.path(), &[]).unwrap();
        drop(Store::open(dir.path(), &StoreOptions::default()).unwrap());
        let r = check(dir.path()).await;
        let fails: Vec<_> = r.iter().filter(|x| x.status == Status::Fail).collect();
        assert!(fails.is_empty(), "{fails:?}");
        assert!(r
            .iter()
            .any(|x| x.check == "database" && x.status == Status::Pass));
        assert!(
            r.iter()
                .any(|x| x.check == "box" && x.status == Status::Warn),
            "no box running is a warning"
        );

        let key = dir.path().join(TLS_DIR).join(CA_KEY);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(dir.path().join("db").join("db"), b"").unwrap();
        let r = check(dir.path()).await;
        let keys = r
            .iter()
            .find(|x| x.check == "keys" && x.status == Status::Fail)
            .expect("open key reported");
        assert!(keys.fix.starts_with("chmod 600"), "{keys:?}");
        let db = r.iter().find(|x| x.check == "database").unwrap();
        assert_eq!(db.status, Status::Fail, "{db:?}");
        assert_eq!(report(&r, true), 1);
    }

    #[tokio::test]
    async fn a_missing_data_dir_says_how_to_create_one() {
        let r = check(Path::new("/nonexistent/outpost")).await;
        assert_eq!(r[0].status, Status::Fail);
        assert!(r[0].fix.contains("outpost init"));
    }
}

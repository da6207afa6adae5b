//! `outpost status`: uptime, devices, queue, disk, the uplink, the edges
//! below, shared bundles and alerts.

use super::*;

/// `outpost status`: the box at a glance.
pub(super) async fn run(json: bool, data_dir: &Path) -> anyhow::Result<i32> {
    let AdminResponse::Status(s) = call(data_dir, AdminRequest::Status).await? else {
        bail!("unexpected answer")
    };
    if json {
        let u = s.uplink.as_ref();
        crate::outln!(
            "{}",
            json!({"version": s.version, "uptime_s": s.uptime_s, "devices_total": s.devices_total,
               "devices_online": s.devices_online, "queued": s.queued, "in_flight": s.in_flight, "dead": s.dead,
               "uplink": u.map_or("none", |u| u.state.as_str()),
               "outbox": u.map_or(0, |u| u.outbox_depth),
               "last_sync": u.and_then(|u| u.last_sync),
               "lag_ms": u.map_or(0, |u| u.lag_ms),
               "upstream": u,
               "edges": s.edges,
               "backup": s.backup.as_ref().map(|b| json!({"dir": b.dir, "last": b.at.map(rfc3339),
                   "age_s": b.at.map(|t| crate::now_millis().saturating_sub(t) / 1000),
                   "file": b.file, "bytes": b.bytes, "error": b.error,
                   "error_at": b.error_at.map(rfc3339)})),
               "disk_bytes": s.disk_bytes, "max_disk": s.max_disk,
               "listen": s.listen, "data_dir": s.data_dir,
               "shared_bundles": s.shared_bundles.iter().map(|b| json!({"device": b.device,
                   "since": rfc3339(b.since), "refused": b.refused})).collect::<Vec<_>>(),
               "alerts": s.alerts.iter().map(|a| json!({"name": a.name, "state": a.state,
                   "since": rfc3339(a.since), "detail": a.detail})).collect::<Vec<_>>()})
        );
    } else {
        crate::outln!(
            "outpost {} — up {}",
            s.version,
            humantime::format_duration(Duration::from_secs(s.uptime_s))
        );
        let rows = vec![
            vec!["listen".into(), s.listen],
            vec!["data dir".into(), s.data_dir],
            vec![
                "devices".into(),
                format!("{} online of {}", s.devices_online, s.devices_total),
            ],
            vec!["queued".into(), s.queued.to_string()],
            vec!["in flight".into(), s.in_flight.to_string()],
            vec!["dead".into(), s.dead.to_string()],
            vec![
                "disk".into(),
                match s.max_disk {
                    Some(m) if m > 0 => format!(
                        "{} bytes of {m} ({:.1}%)",
                        s.disk_bytes,
                        s.disk_bytes as f64 * 100.0 / m as f64
                    ),
                    _ => format!("{} bytes", s.disk_bytes),
                },
            ],
            vec!["uplink".into(), uplink_line(s.uplink.as_ref())],
        ];
        let mut rows = rows;
        if let Some(b) = &s.backup {
            rows.push(vec!["last backup".into(), backup_line(b)]);
        }
        for e in &s.edges {
            rows.push(vec![
                format!("edge {}", e.name),
                format!(
                    "{}, outbox applied through {}{}, {} queued, {} handed down",
                    if e.online { "online" } else { "offline" },
                    e.cursor,
                    e.last_up
                        .map(|t| format!(" (last {})", ago(t)))
                        .unwrap_or_default(),
                    e.queued,
                    e.handed
                ),
            ]);
        }
        for b in &s.shared_bundles {
            rows.push(vec![
                format!("bundle shared {}", b.device),
                format!(
                    "in use on more than one live device since {}, {} connections refused; give each device its own bundle (`outpost enroll ID`; `--force` for this one)",
                    ago(b.since),
                    b.refused
                ),
            ]);
        }
        print_table(&["", ""], &rows);
        if s.alerts.is_empty() {
            crate::outln!("alerts: none");
        } else {
            let rows: Vec<Vec<String>> = s
                .alerts
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.state.clone(),
                        ago(a.since),
                        a.detail.clone(),
                    ]
                })
                .collect();
            print_table(&["ALERT", "STATE", "SINCE", "DETAIL"], &rows);
        }
    }
    Ok(0)
}

/// The scheduled backups in one line: the newest, and what went wrong since.
fn backup_line(b: &crate::shell::backup::schedule::LastBackup) -> String {
    let mut line = match (&b.at, &b.file) {
        (Some(at), Some(f)) => format!("{} ({f}, {} bytes)", ago(*at), b.bytes),
        _ => format!("none yet in {}", b.dir),
    };
    if let (Some(e), Some(at)) = (&b.error, b.error_at) {
        line.push_str(&format!("; the last attempt, {}, failed: {e}", ago(at)));
    }
    line
}

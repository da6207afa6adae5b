//! `outpost devices [--stats]`: the enrolled devices, online or not.

use super::*;

/// `outpost devices --stats`: each device's ends, success rate and latency.
pub(super) async fn stats(json: bool, data_dir: &Path) -> anyhow::Result<i32> {
    let AdminResponse::DeviceStats(ds) = call(data_dir, AdminRequest::DeviceStats).await? else {
        bail!("unexpected answer")
    };
    if json {
        let v: Vec<Value> = ds
            .iter()
            .map(|(d, s)| {
                json!({"id": d.record.id, "online": d.online, "tags": d.record.tags, "caps": d.record.caps,
                   "last_seen": d.record.last_seen.map(rfc3339), "queued": d.queued, "in_flight": d.in_flight,
                   "revoked": d.record.revoked, "shared_bundle": shared_json(d), "stats": s})
            })
            .collect();
        crate::outln!("{}", Value::Array(v));
    } else {
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
        let rows: Vec<Vec<String>> = ds
            .iter()
            .map(|(d, s)| {
                vec![
                    d.record.id.clone(),
                    if d.online { "online" } else { "offline" }.into(),
                    s.succeeded.to_string(),
                    (s.failed + s.dead).to_string(),
                    (s.expired + s.cancelled + s.shed).to_string(),
                    s.success_rate
                        .map_or("-".to_string(), |r| format!("{r:.1}%")),
                    ms(s.latency_p50_ms),
                    ms(s.latency_p95_ms),
                ]
            })
            .collect();
        print_table(
            &[
                "DEVICE",
                "STATE",
                "SUCCEEDED",
                "FAILED",
                "OTHER ENDS",
                "SUCCESS",
                "P50",
                "P95",
            ],
            &rows,
        );
    }
    Ok(0)
}

/// `outpost devices`: every enrolled device.
pub(super) async fn list(json: bool, data_dir: &Path) -> anyhow::Result<i32> {
    let AdminResponse::Devices(ds) = call(data_dir, AdminRequest::Devices).await? else {
        bail!("unexpected answer")
    };
    if json {
        let v: Vec<Value> = ds
            .iter()
            .map(|d| {
                json!({"id": d.record.id, "online": d.online, "tags": d.record.tags, "caps": d.record.caps,
                   "last_seen": d.record.last_seen.map(rfc3339), "queued": d.queued, "in_flight": d.in_flight,
                   "revoked": d.record.revoked, "shared_bundle": shared_json(d)})
            })
            .collect();
        crate::outln!("{}", Value::Array(v));
    } else {
        let rows: Vec<Vec<String>> = ds
            .iter()
            .map(|d| {
                vec![
                    d.record.id.clone(),
                    if d.record.revoked {
                        "revoked".into()
                    } else if d.shared_bundle.is_some() {
                        // Said first: the operator must act on it.
                        if d.online {
                            "online, bundle shared!"
                        } else {
                            "bundle shared!"
                        }
                        .into()
                    } else if d.online {
                        "online".into()
                    } else {
                        "offline".into()
                    },
                    d.queued.to_string(),
                    d.in_flight.to_string(),
                    d.record
                        .last_seen
                        .map(ago)
                        .unwrap_or_else(|| "never".into()),
                    d.record.tags.join(","),
                ]
            })
            .collect();
        print_table(
            &[
                "DEVICE",
                "STATE",
                "QUEUED",
                "IN FLIGHT",
                "LAST SEEN",
                "TAGS",
            ],
            &rows,
        );
    }
    Ok(0)
}

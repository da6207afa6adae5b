//! Prometheus text exposition (version 0.0.4), served on `/metrics` by the
//! box's HTTP listener (`http`, `--http` or `--metrics`). The numbers are
//! read on each scrape from the queue (`QueueHandle::stats`), the device
//! link (`LinkStats`) and the monitor's alerts, so nothing runs between
//! scrapes: an idle box stays idle.

use crate::device::LinkStats;
use crate::queue::{QueueStats, FLUSH_BUCKETS_S};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

/// Render the exposition text.
pub fn render(q: &QueueStats, link: Option<&LinkStats>) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v.to_string())];
    metric(
        "outpost_commands",
        "gauge",
        "Live and dead commands by state.",
        &[
            ("{state=\"queued\"}".into(), q.queued.to_string()),
            ("{state=\"delivered\"}".into(), q.in_flight.to_string()),
            ("{state=\"dead\"}".into(), q.dead.to_string()),
        ],
    );
    metric(
        "outpost_enqueued_total",
        "counter",
        "Commands accepted (durably).",
        &one(q.enqueued_total),
    );
    metric(
        "outpost_delivered_total",
        "counter",
        "Deliveries to devices.",
        &one(q.delivered_total),
    );
    metric(
        "outpost_acked_total",
        "counter",
        "Outcomes reported by devices.",
        &one(q.acked_total),
    );
    metric(
        "outpost_group_commits_total",
        "counter",
        "Group commits (one sled batch and flush each).",
        &one(q.group_commits_total),
    );
    metric(
        "outpost_devices_online",
        "gauge",
        "Devices connected now.",
        &one(q.devices_online),
    );
    metric(
        "outpost_journal_groups",
        "gauge",
        "Journal groups on disk.",
        &one(q.journal_groups),
    );
    metric(
        "outpost_results_kept",
        "gauge",
        "Finished results kept for show.",
        &one(q.results_kept),
    );
    metric(
        "outpost_uplink_up",
        "gauge",
        "1 when the upstream link is up (no uplink yet: 0).",
        &one(0),
    );
    let mut lines = Vec::new();
    let mut cumulative = 0;
    for (i, b) in FLUSH_BUCKETS_S.iter().enumerate() {
        cumulative += q.flush_buckets.get(i).copied().unwrap_or(0);
        lines.push((format!("_bucket{{le=\"{b}\"}}"), cumulative.to_string()));
    }
    cumulative += q
        .flush_buckets
        .get(FLUSH_BUCKETS_S.len())
        .copied()
        .unwrap_or(0);
    lines.push(("_bucket{le=\"+Inf\"}".into(), cumulative.to_string()));
    lines.push(("_sum".into(), format!("{}", q.flush_seconds_sum)));
    lines.push(("_count".into(), cumulative.to_string()));
    metric(
        "outpost_flush_seconds",
        "histogram",
        "Group-commit flush latency.",
        &lines,
    );
    if let Some(l) = link {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        metric(
            "outpost_link_connections_total",
            "counter",
            "Device connections accepted.",
            &one(get(&l.connections_accepted)),
        );
        metric(
            "outpost_link_handshakes_failed_total",
            "counter",
            "TLS handshakes refused or failed.",
            &one(get(&l.handshakes_failed)),
        );
        metric(
            "outpost_link_shared_bundles_found_total",
            "counter",
            "Times a bundle was found in use on two live devices.",
            &one(get(&l.shared_bundles_found)),
        );
        metric(
            "outpost_link_in_use_refused_total",
            "counter",
            "Connections refused: their bundle is in use elsewhere.",
            &one(get(&l.in_use_refused)),
        );
        metric(
            "outpost_artifact_chunks_served_total",
            "counter",
            "Artifact chunks served on fetch streams (to devices and boxes below).",
            &one(get(&l.chunks_served)),
        );
        metric(
            "outpost_artifact_chunk_bytes_served_total",
            "counter",
            "Bytes of the artifact chunks served.",
            &one(get(&l.chunk_bytes_served)),
        );
        metric(
            "outpost_link_protocol_errors_total",
            "counter",
            "Connections closed for a protocol error.",
            &one(get(&l.protocol_errors)),
        );
        metric(
            "outpost_link_frames_in_total",
            "counter",
            "Frames received from devices.",
            &one(get(&l.frames_in)),
        );
        metric(
            "outpost_link_frames_out_total",
            "counter",
            "Frames sent to devices.",
            &one(get(&l.frames_out)),
        );
        metric(
            "outpost_link_events_total",
            "counter",
            "Events received from devices.",
            &one(get(&l.events)),
        );
    }
    o
}

/// Append `outpost_alerts_firing{name=..}`: 1 for each rule firing, 0 for
/// the others, so a rule that never fired is still a series.
pub fn render_alerts(o: &mut String, rules: &[(String, bool)]) {
    if rules.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "# HELP outpost_alerts_firing 1 while the alert rule fires."
    );
    let _ = writeln!(o, "# TYPE outpost_alerts_firing gauge");
    for (name, firing) in rules {
        let name = name.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            o,
            "outpost_alerts_firing{{name=\"{name}\"}} {}",
            u8::from(*firing)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let mut q = QueueStats {
            queued: 3,
            ..QueueStats::default()
        };
        q.flush_buckets = vec![0; FLUSH_BUCKETS_S.len() + 1];
        q.flush_buckets[3] = 2; // <= 1 ms
        q.flush_buckets[FLUSH_BUCKETS_S.len()] = 1; // > 1 s
        let t = render(&q, None);
        assert!(t.contains("outpost_commands{state=\"queued\"} 3"), "{t}");
        assert!(
            t.contains("outpost_flush_seconds_bucket{le=\"0.0005\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("outpost_flush_seconds_bucket{le=\"0.001\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("outpost_flush_seconds_bucket{le=\"1\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("outpost_flush_seconds_bucket{le=\"+Inf\"} 3"),
            "{t}"
        );
        assert!(t.contains("outpost_flush_seconds_count 3"), "{t}");
        assert!(t.contains("# TYPE outpost_flush_seconds histogram"));
    }

    #[test]
    fn shared_bundles_are_counted() {
        let l = LinkStats::default();
        l.shared_bundles_found.store(2, Ordering::Relaxed);
        l.in_use_refused.store(7, Ordering::Relaxed);
        l.chunk_bytes_served.store(65536, Ordering::Relaxed);
        let t = render(&QueueStats::default(), Some(&l));
        assert!(
            t.contains("outpost_link_shared_bundles_found_total 2"),
            "{t}"
        );
        assert!(t.contains("outpost_link_in_use_refused_total 7"), "{t}");
        assert!(
            t.contains("outpost_artifact_chunk_bytes_served_total 65536"),
            "{t}"
        );
    }

    #[test]
    fn alert_gauges_name_every_rule() {
        let mut t = String::new();
        render_alerts(&mut t, &[("backlog".into(), true), ("a\"b".into(), false)]);
        assert!(
            t.contains("outpost_alerts_firing{name=\"backlog\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("outpost_alerts_firing{name=\"a\\\"b\"} 0"),
            "{t}"
        );
    }
}

//! Prometheus text exposition (version 0.0.4), served on `/metrics` by the
//! box's HTTP listener (`http`, `--http` or `--metrics`), written by
//! prometheus-client, the official crate. The numbers are read on each
//! scrape from the queue (`QueueHandle::stats`), the device link
//! (`LinkStats`) and the monitor's alerts, and handed to the crate as a
//! collector of constant metrics, so nothing runs between scrapes: an
//! idle box stays idle.

use crate::shell::link::LinkStats;
use crate::shell::queue::{QueueStats, FLUSH_BUCKETS_S};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::atomic::Ordering;

/// The `Content-Type` of what [`render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Render the exposition text: the queue's figures, the link's counters
/// when there is a link, and `outpost_alerts_firing{name=..}` for each
/// alert rule (1 firing, 0 not, so a rule that never fired is a series).
pub fn render(q: &QueueStats, link: Option<&LinkStats>, alerts: &[(String, bool)]) -> String {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let link = link.map(|l| {
        [
            (
                "outpost_link_connections",
                "Device connections accepted.",
                get(&l.connections_accepted),
            ),
            (
                "outpost_link_handshakes_failed",
                "TLS handshakes refused or failed.",
                get(&l.handshakes_failed),
            ),
            (
                "outpost_link_shared_bundles_found",
                "Times a bundle was found in use on two live devices.",
                get(&l.shared_bundles_found),
            ),
            (
                "outpost_link_in_use_refused",
                "Connections refused: their bundle is in use elsewhere.",
                get(&l.in_use_refused),
            ),
            (
                "outpost_artifact_chunks_served",
                "Artifact chunks served on fetch streams (to devices and boxes below).",
                get(&l.chunks_served),
            ),
            (
                "outpost_artifact_chunk_bytes_served",
                "Bytes of the artifact chunks served.",
                get(&l.chunk_bytes_served),
            ),
            (
                "outpost_link_protocol_errors",
                "Connections closed for a protocol error.",
                get(&l.protocol_errors),
            ),
            (
                "outpost_link_frames_in",
                "Frames received from devices.",
                get(&l.frames_in),
            ),
            (
                "outpost_link_frames_out",
                "Frames sent to devices.",
                get(&l.frames_out),
            ),
            (
                "outpost_link_events",
                "Events received from devices.",
                get(&l.events),
            ),
        ]
    });
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        q: q.clone(),
        link,
        alerts: alerts.to_vec(),
    }));
    let mut out = String::new();
    // Writing to a String fails only if an encoder does, which the
    // collector's own errors (none) would be.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

/// One scrape's figures, read once (counter names without `_total`: the
/// crate appends it).
#[derive(Debug)]
struct Scrape {
    q: QueueStats,
    link: Option<[(&'static str, &'static str, u64); 10]>,
    alerts: Vec<(String, bool)>,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A gauge with one label, a series per row.
fn gauges(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    rows: &[(&str, u64)],
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for &(value, v) in rows {
        let labels = [(label, value)];
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let q = &self.q;
        gauges(
            &mut e,
            "outpost_commands",
            "Live and dead commands by state.",
            "state",
            &[
                ("queued", q.queued),
                ("delivered", q.in_flight),
                ("dead", q.dead),
            ],
        )?;
        let counters = [
            (
                "outpost_enqueued",
                "Commands accepted (durably).",
                q.enqueued_total,
            ),
            (
                "outpost_delivered",
                "Deliveries to devices.",
                q.delivered_total,
            ),
            (
                "outpost_acked",
                "Outcomes reported by devices.",
                q.acked_total,
            ),
            (
                "outpost_group_commits",
                "Group commits (one sled batch and flush each).",
                q.group_commits_total,
            ),
        ];
        for (name, help, v) in counters {
            counter(&mut e, name, help, v)?;
        }
        let plain = [
            (
                "outpost_devices_online",
                "Devices connected now.",
                q.devices_online,
            ),
            (
                "outpost_journal_groups",
                "Journal groups on disk.",
                q.journal_groups,
            ),
            (
                "outpost_results_kept",
                "Finished results kept for show.",
                q.results_kept,
            ),
            (
                "outpost_uplink_up",
                "1 when the upstream link is up (no uplink yet: 0).",
                0,
            ),
        ];
        for (name, help, v) in plain {
            gauge(&mut e, name, help, v)?;
        }
        // Per bucket, the last one past the largest bound (+Inf); the
        // crate writes them cumulative.
        let n = |i: usize| q.flush_buckets.get(i).copied().unwrap_or(0);
        let mut buckets: Vec<(f64, u64)> = FLUSH_BUCKETS_S
            .iter()
            .enumerate()
            .map(|(i, &b)| (b, n(i)))
            .collect();
        buckets.push((f64::INFINITY, n(FLUSH_BUCKETS_S.len())));
        let count = buckets.iter().map(|b| b.1).sum();
        e.encode_descriptor(
            "outpost_flush_seconds",
            "Group-commit flush latency.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            q.flush_seconds_sum,
            count,
            &buckets,
            None,
        )?;
        for &(name, help, v) in self.link.iter().flatten() {
            counter(&mut e, name, help, v)?;
        }
        if !self.alerts.is_empty() {
            let rows: Vec<(&str, u64)> = self
                .alerts
                .iter()
                .map(|(name, firing)| (name.as_str(), u64::from(*firing)))
                .collect();
            gauges(
                &mut e,
                "outpost_alerts_firing",
                "1 while the alert rule fires.",
                "name",
                &rows,
            )?;
        }
        Ok(())
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
        let t = render(&q, None, &[]);
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
        let t = render(&QueueStats::default(), Some(&l), &[]);
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
        let t = render(
            &QueueStats::default(),
            None,
            &[("backlog".into(), true), ("a\"b".into(), false)],
        );
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

//! Prometheus text exposition on `--metrics ADDR` (off by default).
//!
//! A deliberately tiny HTTP/1.1 server: `GET /metrics` answers the text
//! format (version 0.0.4), anything else 404; requests are bounded in size
//! and time, one per connection. The numbers are read on each scrape from
//! the queue (`QueueHandle::stats`) and the device link (`LinkStats`), so
//! nothing runs between scrapes: an idle box stays idle.

use crate::device::LinkStats;
use crate::queue::{QueueHandle, QueueStats, FLUSH_BUCKETS_S};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub queue: QueueHandle,
    pub link: Option<Arc<crate::device::DeviceLink>>,
}

/// Bind `addr` and serve scrapes until the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let s = sources.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, s)).await;
            });
        }
    });
    Ok((local, task))
}

async fn answer(mut stream: TcpStream, s: Sources) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, ctype) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            match s.queue.stats().await {
                Ok(q) => (
                    "200 OK",
                    render(&q, s.link.as_deref().map(|l| l.stats())),
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                Err(e) => (
                    "503 Service Unavailable",
                    format!("queue unavailable: {e}\n"),
                    "text/plain; charset=utf-8",
                ),
            }
        } else {
            (
                "404 Not Found",
                "try GET /metrics\n".to_string(),
                "text/plain; charset=utf-8",
            )
        };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
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

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn scrapes_over_http_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), &Default::default()).unwrap();
        let queue = crate::queue::open(store, Default::default()).unwrap();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            Sources {
                queue: queue.clone(),
                link: None,
            },
        )
        .await
        .unwrap();
        let r = get(addr, "/metrics").await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("outpost_enqueued_total 0"), "{r}");
        let r = get(addr, "/").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        task.abort();
        queue.shutdown().await;
    }
}

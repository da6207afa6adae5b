//! How the CLI shows things: tables with relative times for people,
//! stable JSON for programs, errors with each cause once.

use super::*;

/// An error and its causes on one line, each cause once: typed errors
/// often quote their source in their own text ("cannot read X: {source}")
/// and also expose it as `source()`, which `{:#}` would print again
/// ("…: No such file or directory: No such file or directory").
pub fn render_error(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(c.trim()) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

/// A device's shared-bundle flag in `devices --json`: `null`, or when it was
/// found and how many connections were refused since.
pub(super) fn shared_json(d: &crate::engine::queue::core::DeviceView) -> Value {
    match &d.shared_bundle {
        None => Value::Null,
        Some(b) => json!({"since": rfc3339(b.since), "refused": b.refused}),
    }
}

// One JSON shape for `show --json` and the HTTP API: see `queue::json`.
pub use crate::shell::queue::json::{add_result, view_json};

pub(super) fn print_view(v: &CommandView, json: bool) {
    if json {
        crate::outln!("{}", view_json(v));
        return;
    }
    let mut rows = vec![
        vec!["id".to_string(), v.id.to_string()],
        vec!["target".into(), v.target.clone()],
    ];
    if v.device != v.target {
        rows.push(vec!["device".into(), v.device.clone()]);
    }
    rows.extend([
        vec!["state".into(), v.state.to_string()],
        vec!["priority".into(), v.priority.to_string()],
        vec![
            "attempts".into(),
            format!("{} of {}", v.attempts, v.max_attempts),
        ],
        vec!["created".into(), ago(v.created_at)],
    ]);
    // Both say why a command has not run yet (or will never), so they are
    // shown with the absolute time as well as the relative one.
    if let Some(t) = v.not_before {
        rows.push(vec![
            "not before".into(),
            format!("{} ({})", rfc3339(t), ago(t)),
        ]);
    }
    if let Some(t) = v.expires_at {
        rows.push(vec![
            "expires".into(),
            format!("{} ({})", rfc3339(t), ago(t)),
        ]);
    }
    if let Some(a) = v.after {
        rows.push(vec!["after".into(), a.to_string()]);
    }
    if let Some(k) = &v.key {
        rows.push(vec!["key".into(), k.clone()]);
    }
    if let Some(s) = &v.summary {
        rows.push(vec!["children".into(), s.clone()]);
    }
    if let Some(p) = &v.progress {
        rows.push(vec![
            "progress".into(),
            crate::shell::queue::json::progress_line(p),
        ]);
    }
    if let Some(f) = v.finished_at {
        rows.push(vec!["finished".into(), ago(f)]);
    }
    match &v.outcome {
        Some(Outcome::Ok(b)) => rows.push(vec![
            "result".into(),
            String::from_utf8_lossy(b).trim_end().to_string(),
        ]),
        Some(Outcome::Failed { code, message }) => {
            rows.push(vec!["failure".into(), format!("exit {code}: {message}")])
        }
        Some(Outcome::Rejected { reason }) => rows.push(vec!["rejected".into(), reason.clone()]),
        None => {}
    }
    if let Some(e) = &v.error {
        rows.push(vec!["error".into(), e.clone()]);
    }
    print_table(&["", ""], &rows);
    if !v.children.is_empty() {
        crate::outln!();
        let rows: Vec<Vec<String>> = v
            .children
            .iter()
            .map(|c| vec![c.device.clone(), c.state.to_string(), c.id.to_string()])
            .collect();
        print_table(&["DEVICE", "STATE", "CHILD"], &rows);
    }
}

/// "3s ago", "2h ago", "in 5m".
/// `connected to hub:7443 since 3m; outbox 12 (oldest 5s), last sync 2s ago`.
pub(super) fn uplink_line(u: Option<&crate::shell::admin::UplinkView>) -> String {
    let Some(u) = u else {
        return "none".into();
    };
    let mut line = format!("{} ({}) since {}", u.state, u.hub, ago(u.since));
    line.push_str(&format!("; outbox {}", u.outbox_depth));
    if u.outbox_depth > 0 {
        line.push_str(&format!(
            " (oldest {})",
            humantime::format_duration(Duration::from_secs(u.lag_ms / 1000))
        ));
    }
    match u.last_sync {
        Some(t) => line.push_str(&format!(", last sync {}", ago(t))),
        None => line.push_str(", never synced"),
    }
    if u.state != crate::shell::upstream::UplinkState::Connected {
        if let Some(e) = &u.last_error {
            line.push_str(&format!("; {e}"));
        }
    }
    line
}

/// A result as a table cell: one line, at most 40 characters.
pub(super) fn result_cell(result: Option<&str>) -> String {
    let r = result.unwrap_or_default();
    let r = if r.chars().count() > 40 {
        r.chars().take(39).collect::<String>() + "…"
    } else {
        r.to_string()
    };
    r.replace('\n', " ")
}

/// A time (ms since the Unix epoch) relative to now, in its largest whole
/// unit: `42s ago`, `3h ago`, or `in 10m` for one still to come.
pub fn ago(ms: u64) -> String {
    let now = crate::now_millis();
    let (d, future) = if ms > now {
        (ms - now, true)
    } else {
        (now - ms, false)
    };
    let s = d / 1000;
    let text = match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Print rows as aligned columns (headers skipped when all empty).
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let cols = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        crate::outln!("{}", s.trim_end());
    };
    if headers.iter().any(|h| !h.is_empty()) {
        line(headers.to_vec());
    }
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

//! The stable JSON shape of a command, as `outpost show --json` prints it
//! and the HTTP API answers it: one serializer, so the two never drift.

use super::CommandView;
use crate::engine::command::{rfc3339, Outcome};
use base64::Engine as _;
use serde_json::{json, Value};

/// The outcome's fields of a command's JSON: `result` (text), or
/// `result_b64`, `exit_code`, `error`.
pub fn add_result(o: &mut Value, outcome: Option<&Outcome>) {
    let m = o.as_object_mut().expect("an object");
    match outcome {
        Some(Outcome::Ok(b)) => match std::str::from_utf8(b) {
            Ok(s) => {
                m.insert("result".into(), json!(s));
            }
            Err(_) => {
                m.insert("result".into(), Value::Null);
                m.insert(
                    "result_b64".into(),
                    json!(base64::engine::general_purpose::STANDARD.encode(b)),
                );
            }
        },
        Some(Outcome::Failed { code, message }) => {
            m.insert("result".into(), Value::Null);
            m.insert("exit_code".into(), json!(code));
            if m.get("error").is_none_or(Value::is_null) {
                m.insert("error".into(), json!(message));
            }
        }
        Some(Outcome::Rejected { reason }) => {
            m.insert("result".into(), Value::Null);
            if m.get("error").is_none_or(Value::is_null) {
                m.insert("error".into(), json!(format!("rejected: {reason}")));
            }
        }
        None => {
            m.insert("result".into(), Value::Null);
        }
    }
}

/// `fetching fw@2.1: 37 % (1.2 MB/s)`, for people.
pub fn progress_line(p: &super::Progress) -> String {
    let what = p.artifact.as_deref().unwrap_or("the artifact");
    let mut s = format!("fetching {what}: {} %", p.percent);
    if let Some(r) = p.rate_bps {
        s += &format!(" ({}/s)", indicatif::HumanBytes(r));
    }
    s
}

/// One command as `outpost show --json` prints it and the HTTP API
/// answers it: times as RFC 3339, the outcome's fields, and `progress` or a
/// broadcast's `summary` and `children` when there are any.
pub fn view_json(v: &CommandView) -> Value {
    let mut o = json!({
        "id": v.id.to_string(), "target": v.target, "device": v.device, "state": v.state.as_str(),
        "priority": v.priority.as_str(), "attempts": v.attempts, "max_attempts": v.max_attempts,
        "created_at": rfc3339(v.created_at), "finished_at": v.finished_at.map(rfc3339),
        "origin": v.origin, "error": v.error,
        "not_before": v.not_before.map(rfc3339), "expires_at": v.expires_at.map(rfc3339),
        "after": v.after.map(|a| a.to_string()), "key": v.key,
    });
    add_result(&mut o, v.outcome.as_ref());
    if let Some(p) = &v.progress {
        o["progress"] = json!({
            "artifact": p.artifact, "bytes": p.bytes, "total": p.total,
            "percent": p.percent, "rate_bps": p.rate_bps,
        });
    }
    if let Some(s) = &v.summary {
        o["summary"] = json!(s);
        o["children"] = v
            .children
            .iter()
            .map(|c| json!({"id": c.id.to_string(), "device": c.device, "state": c.state.as_str()}))
            .collect();
    }
    o
}

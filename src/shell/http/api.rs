//! The command API for programs (MES, SCADA, scripts): send a command, see
//! it, cancel and retry it. A send answers 201 only once the queue says the
//! command is durable: it goes through the same `QueueHandle::send` as the
//! CLI, which returns after the group commit. The command's JSON is the one
//! `outpost show --json` prints (`queue::json`); queue errors map to HTTP
//! statuses by the queue's own classification (`ErrorClass`).

use super::access::{denied, Caller};
use super::{HttpOptions, St};
use crate::engine::command::{CommandId, Priority, SendOptions};
use crate::engine::trust::{Role, Verb};
use crate::shell::admin::AdminContext;
use crate::shell::queue::{ErrorClass, QueueError, SendRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use serde_json::{json, Map, Value};

/// Room in a send's body beyond its payload: the other fields and the
/// envelope.
pub const BODY_SLACK: usize = 64 * 1024;

/// What a send's body may weigh: its payload as base64 (4/3 of it) plus
/// slack.
pub fn body_limit(opts: &HttpOptions) -> usize {
    let max = opts
        .max_payload
        .unwrap_or_else(|| crate::shell::queue::Limits::default().max_payload);
    max.div_ceil(3) * 4 + BODY_SLACK
}

/// The fields a send's JSON may carry.
pub const FIELDS: [&str; 10] = [
    "target",
    "payload",
    "payload_b64",
    "priority",
    "ttl",
    "key",
    "after",
    "not_before",
    "max_attempts",
    "envelope_b64",
];

/// A field of a send that is wrong, and why: the 400's message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {why}")]
pub struct FieldError {
    pub field: &'static str,
    pub why: String,
}

fn bad(field: &'static str, why: impl Into<String>) -> FieldError {
    FieldError {
        field,
        why: why.into(),
    }
}

fn text<'a>(o: &'a Map<String, Value>, field: &'static str) -> Result<Option<&'a str>, FieldError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad(field, format!("must be a string, not {other}"))),
    }
}

fn b64(field: &'static str, s: &str) -> Result<Vec<u8>, FieldError> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| bad(field, format!("not base64 ({e})")))
}

/// A send's JSON body as the queue's request. `now` places `+DURATION`
/// not_before times; `origin` names the sender.
pub fn parse_send(body: &Value, now: u64, origin: &str) -> Result<SendRequest, FieldError> {
    let Value::Object(o) = body else {
        return Err(bad(
            "body",
            "must be a JSON object such as {\"target\": \"dev-1\", \"payload\": \"reboot\"}",
        ));
    };
    if let Some(k) = o.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        // An unknown field is refused, not ignored: a typo in `priority`
        // must not send at normal priority unnoticed.
        return Err(bad(
            "body",
            format!("unknown field `{k}`; known: {}", FIELDS.join(", ")),
        ));
    }
    let target = match text(o, "target")? {
        Some(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            return Err(bad(
                "target",
                "is required: a device id, tag:T, cap:C or EDGE/…",
            ))
        }
    };
    let payload = match (text(o, "payload")?, text(o, "payload_b64")?) {
        (Some(_), Some(_)) => {
            return Err(bad("payload_b64", "give payload or payload_b64, not both"))
        }
        (Some(p), None) => p.as_bytes().to_vec(),
        (None, Some(p)) => b64("payload_b64", p)?,
        (None, None) => Vec::new(),
    };
    let priority = match text(o, "priority")? {
        None => Priority::Normal,
        Some(p) => p
            .parse::<Priority>()
            .map_err(|_| bad("priority", format!("`{p}` is not high, normal or low")))?,
    };
    let ttl_ms = match o.get("ttl") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .and_then(|s| s.checked_mul(1000))
                .ok_or_else(|| bad("ttl", format!("{n} is not a whole number of seconds")))?,
        ),
        Some(Value::String(s)) => Some(
            crate::engine::duration::parse(s)
                .map_err(|e| bad("ttl", e))?
                .as_millis() as u64,
        ),
        Some(other) => {
            return Err(bad(
                "ttl",
                format!("must be a duration such as \"10m\" or a number of seconds, not {other}"),
            ))
        }
    };
    let max_attempts = match o.get("max_attempts") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n >= 1)
                .ok_or_else(|| bad("max_attempts", format!("{v} is not a whole number from 1")))?,
        ),
    };
    let after = text(o, "after")?
        .map(|a| {
            a.parse::<CommandId>()
                .map_err(|e| bad("after", e.to_string()))
        })
        .transpose()?;
    let not_before = text(o, "not_before")?
        .map(|t| crate::engine::command::parse_time(t, now).map_err(|e| bad("not_before", e)))
        .transpose()?;
    let signature = text(o, "envelope_b64")?
        .map(|e| b64("envelope_b64", e))
        .transpose()?;
    Ok(SendRequest {
        target,
        payload,
        opts: SendOptions {
            priority,
            ttl_ms,
            max_attempts,
            key: text(o, "key")?.map(str::to_string),
            after,
            not_before,
        },
        origin: origin.to_string(),
        signature,
    })
}

/// A queue error as an HTTP answer, by the queue's own classification. A
/// refusal that may pass (full, short of space, stopping) is a 503 with
/// Retry-After, so clients back off instead of giving up.
pub fn queue_error(e: &QueueError) -> Response {
    let code = match e.class() {
        ErrorClass::NotFound => StatusCode::NOT_FOUND,
        ErrorClass::BadRequest => StatusCode::BAD_REQUEST,
        ErrorClass::Refused if !e.is_passing() => StatusCode::CONFLICT,
        ErrorClass::Refused | ErrorClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    let kind = match e.class() {
        ErrorClass::NotFound => "not_found",
        ErrorClass::Refused => "refused",
        ErrorClass::BadRequest => "bad_request",
        ErrorClass::Unavailable => "unavailable",
    };
    let body = Json(json!({"error": e.to_string(), "kind": kind}));
    if e.is_passing() {
        (code, [(header::RETRY_AFTER, "5")], body).into_response()
    } else {
        (code, body).into_response()
    }
}

fn bad_request(why: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": why.to_string(), "kind": "bad_request"})),
    )
        .into_response()
}

/// Whether `caller` may `verb` the command `id`: a bounded operator only
/// within its patterns, so the command's target is looked up first.
pub(super) async fn may_act_on(
    ctx: &AdminContext,
    caller: &Caller,
    verb: Verb,
    id: CommandId,
) -> Result<(), Response> {
    let g = &caller.grant;
    if g.role == Role::Admin || g.targets.is_empty() {
        return Ok(());
    }
    let v = ctx.queue.show(id).await.map_err(|e| queue_error(&e))?;
    g.check(&caller.who, verb, Some(&v.target))
        .map_err(|d| denied(&d))
}

/// `POST /api/commands`.
pub(super) async fn send(
    State(st): State<St>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = body_limit(&st.opts);
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(json!({
                    "error": format!("the body is over {limit} bytes, the most this box takes (payloads up to {} bytes; send larger data as a reference)", limit - BODY_SLACK),
                    "kind": "too_large",
                })),
            )
                .into_response();
        }
        Err(r) => return bad_request(format!("cannot read the body: {r}")),
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("`body`: not JSON ({e})")),
    };
    let req = match parse_send(&v, crate::now_millis(), &caller.origin) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    if let Err(d) = caller
        .grant
        .check(&caller.who, Verb::Send, Some(&req.target))
    {
        return denied(&d);
    }
    match st.ctx.queue.send(req).await {
        Ok(r) => {
            let id = r.id.to_string();
            let code = if r.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            (
                code,
                [(header::LOCATION, format!("/api/commands/{id}"))],
                Json(json!({"id": id, "state": r.state.as_str(), "duplicate": r.duplicate})),
            )
                .into_response()
        }
        Err(e) => queue_error(&e),
    }
}

/// `GET /api/commands/ID`: the command as `outpost show --json` prints it.
pub(super) async fn show(State(st): State<St>, Path(id): Path<String>) -> Response {
    let id: CommandId = match id.parse() {
        Ok(id) => id,
        Err(e) => return bad_request(format!("`id`: {e}")),
    };
    match st.ctx.queue.show(id).await {
        Ok(v) => Json(crate::shell::queue::json::view_json(&v)).into_response(),
        Err(e) => queue_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<SendRequest, FieldError> {
        parse_send(&v, 1_000_000, "http:test")
    }

    #[test]
    fn a_send_body_becomes_the_queues_request() {
        let r = parse(json!({
            "target": "dev-1", "payload": "reboot", "priority": "high", "ttl": "10m",
            "key": "k1", "max_attempts": 3, "not_before": "+1s",
            "after": "01J9ZQ3M8E5V6X7Y8Z9A0B1C2D", "envelope_b64": "AAEC",
        }))
        .unwrap();
        assert_eq!(r.target, "dev-1");
        assert_eq!(r.payload, b"reboot");
        assert_eq!(r.opts.priority, Priority::High);
        assert_eq!(r.opts.ttl_ms, Some(600_000));
        assert_eq!(r.opts.key.as_deref(), Some("k1"));
        assert_eq!(r.opts.max_attempts, Some(3));
        assert_eq!(r.opts.not_before, Some(1_001_000));
        assert!(r.opts.after.is_some());
        assert_eq!(r.signature, Some(vec![0, 1, 2]));
        assert_eq!(r.origin, "http:test");
        let r = parse(json!({"target": "dev-1", "payload_b64": "/wA=", "ttl": 90,
                             "not_before": "2026-11-25T11:00:00+01:00"}))
        .unwrap();
        assert_eq!(r.payload, vec![0xff, 0]);
        assert_eq!(r.opts.ttl_ms, Some(90_000));
        assert_eq!(r.opts.not_before, Some(1_795_600_800_000));
        assert_eq!(r.opts.priority, Priority::Normal);
    }

    #[test]
    fn a_bad_field_is_named() {
        let field = |v: Value| parse(v).unwrap_err().field;
        assert_eq!(field(json!({"payload": "x"})), "target");
        assert_eq!(field(json!({"target": 7})), "target");
        assert_eq!(
            field(json!({"target": "d", "priority": "urgent"})),
            "priority"
        );
        assert_eq!(field(json!({"target": "d", "ttl": "soon"})), "ttl");
        assert_eq!(field(json!({"target": "d", "ttl": -1})), "ttl");
        assert_eq!(
            field(json!({"target": "d", "max_attempts": 0})),
            "max_attempts"
        );
        assert_eq!(field(json!({"target": "d", "after": "nope"})), "after");
        assert_eq!(
            field(json!({"target": "d", "not_before": "2026-11-25T10:00:00"})),
            "not_before"
        );
        assert_eq!(
            field(json!({"target": "d", "payload_b64": "***"})),
            "payload_b64"
        );
        assert_eq!(
            field(json!({"target": "d", "payload": "a", "payload_b64": "YQ=="})),
            "payload_b64"
        );
        assert_eq!(
            field(json!({"target": "d", "envelope_b64": 5})),
            "envelope_b64"
        );
        assert_eq!(field(json!(["d"])), "body");
        let e = parse(json!({"target": "d", "prio": "high"})).unwrap_err();
        assert!(e.to_string().contains("unknown field `prio`"), "{e}");
        let e = parse(json!({"target": "d", "not_before": "2026-11-25T10:00:00"})).unwrap_err();
        assert!(e.to_string().contains("no time zone"), "{e}");
    }

    #[test]
    fn queue_errors_map_by_their_class() {
        let s = |e: QueueError| queue_error(&e).status();
        assert_eq!(s(QueueError::NotFound(CommandId(1))), StatusCode::NOT_FOUND);
        assert_eq!(
            s(QueueError::BadRequest("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(s(QueueError::Revoked("d".into())), StatusCode::CONFLICT);
        let full = queue_error(&QueueError::QueueFull {
            queued: 1,
            limit: 1,
        });
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(full.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(s(QueueError::ShuttingDown), StatusCode::SERVICE_UNAVAILABLE);
    }
}

//! The box's HTTP listener (`--http ADDR`, and `--metrics ADDR` as an
//! alias): Prometheus text on `/metrics`, the dashboard page on `/`, JSON
//! under `/api/`, and live updates as server-sent events on `/api/events`.
//!
//! axum over hyper (HTTP/1.1 only). Read-only by default. The page and the
//! API are served without a token only on loopback; with `--http-token`
//! they need `Authorization: Bearer TOKEN` (or `?token=`, since an
//! `EventSource` cannot set headers). `/metrics` stays open, as it was
//! before the dashboard, so existing scrapers keep working; it carries
//! counters only. Acting (retry, cancel) needs `--http-admin`. Tokens
//! of the config's `[[http_tokens]]` carry a role of their own (`access`);
//! programs send, show, cancel and retry commands through `api`.
//!
//! Nothing here runs between requests: every answer is read from the queue,
//! the monitor or the runner when asked.

use crate::shell::admin::AdminContext;
use crate::shell::monitor::Update;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub mod access;
mod api;

/// The dashboard: one hand-written file, embedded.
pub const PAGE: &str = include_str!("dashboard.html");
/// Event streams open at once: each holds a connection and a queue of
/// updates, and a box has little RAM.
pub const MAX_STREAMS: usize = 16;
/// Most commands `/api/commands` returns.
pub const MAX_COMMANDS: usize = crate::shell::monitor::RECENT_COMMANDS;

/// How the listener is set up.
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    /// Required on the page and the API (`None`: loopback only).
    pub token: Option<String>,
    /// Retry and cancel from the page.
    pub admin: bool,
    /// Tokens with a role (`[[http_tokens]]`).
    pub tokens: Vec<access::HttpToken>,
    /// The largest payload the queue takes (`None`: its default), which
    /// bounds a send's body.
    pub max_payload: Option<usize>,
}

impl HttpOptions {
    /// Whether any token is configured, so every caller must give one.
    pub fn has_tokens(&self) -> bool {
        self.token.is_some() || !self.tokens.is_empty()
    }
}

/// Why the listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// `--http` names an address off loopback and no token is set: the page
    /// and the API would be open to the network.
    #[error("refusing to serve the dashboard on {addr}: it is not a loopback address and no token is set; set --http-token TOKEN (or --http-token-file FILE, or http_token in the config file), or listen on 127.0.0.1")]
    NotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The TCP listener could not be bound (port taken, no such address, a
    /// privileged port).
    #[error("cannot listen on {addr} for the dashboard and metrics: {source}{}", bind_hint(.source))]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The bind's error; its kind picks the hint in the message.
        #[source]
        source: std::io::Error,
    },
}

fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "; another program (or another outpost) uses this TCP port: stop it, or pick a free port with --http / --metrics (http = / metrics = in the config)",
        std::io::ErrorKind::AddrNotAvailable => "; this machine has no such address: use 127.0.0.1 or an address of one of its interfaces",
        std::io::ErrorKind::PermissionDenied => "; ports below 1024 need privileges: pick a port above 1024",
        _ => "",
    }
}

struct Shared {
    ctx: Arc<AdminContext>,
    opts: HttpOptions,
    /// This listener serves the page and the API (false: `--metrics` on a
    /// non-loopback address without a token, which serves `/metrics` only).
    api: bool,
    /// Open event streams, bounded by [`MAX_STREAMS`].
    streams: Arc<tokio::sync::Semaphore>,
}

type St = Arc<Shared>;

/// Bind `addr` and serve until the task is aborted. `dashboard`: the
/// address came from `--http` (must be loopback or have a token); from
/// `--metrics` alone, a non-loopback address without a token still serves
/// `/metrics`, as before, and answers 404 for the rest.
pub async fn serve(
    addr: SocketAddr,
    ctx: Arc<AdminContext>,
    opts: HttpOptions,
    dashboard: bool,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let open = addr.ip().is_loopback() || opts.has_tokens();
    if dashboard {
        check(addr, &opts)?;
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    let app = router(Arc::new(Shared {
        ctx,
        opts,
        api: open,
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
    }));
    let task = tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("http listener on {local} stopped: {e}");
        }
    });
    Ok((local, task))
}

/// The dashboard's rule: loopback, or a token.
pub fn check(addr: SocketAddr, opts: &HttpOptions) -> Result<(), HttpError> {
    if addr.ip().is_loopback() || opts.has_tokens() {
        Ok(())
    } else {
        Err(HttpError::NotLoopback { addr })
    }
}

fn router(st: St) -> Router {
    let body_limit = api::body_limit(&st.opts);
    let api = Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/devices", get(devices))
        .route("/api/commands", get(commands).post(api::send))
        .route("/api/commands/{id}", get(api::show))
        .route("/api/workflows", get(workflows))
        .route("/api/rollouts", get(rollouts))
        .route("/api/alerts", get(alerts))
        .route("/api/history", get(history))
        .route("/api/events", get(events))
        .route("/api/commands/{id}/{action}", post(act))
        .layer(axum::middleware::from_fn_with_state(st.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit));
    Router::new()
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try / or /metrics\n") })
        .with_state(st)
}

/// Constant-time comparison: the token must not leak through timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn query_token(q: Option<&str>) -> Option<String> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "token").then(|| {
            // Tokens are plain; undo only what a browser escapes in them.
            v.replace("%2B", "+")
                .replace("%2F", "/")
                .replace("%3D", "=")
                .replace("%20", " ")
        })
    })
}

fn err(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({"error": message.into()}))).into_response()
}

async fn guard(State(st): State<St>, mut req: Request, next: Next) -> Response {
    if !st.api {
        return err(
            StatusCode::NOT_FOUND,
            "the dashboard is served only on loopback or with --http-token",
        );
    }
    let caller = match access::identify(&st.opts, req.headers(), req.uri().query()) {
        Ok(c) => c,
        Err(refusal) => return refusal,
    };
    if let Err(refusal) = access::admit(&caller, req.method(), req.uri().path(), req.headers()) {
        return refusal;
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            // The page loads nothing from elsewhere; say so to the browser.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src 'self' data:",
            ),
        ],
        Html(PAGE),
    )
}

async fn metrics(State(st): State<St>) -> Response {
    match st.ctx.queue.stats().await {
        Ok(q) => {
            let alerts = st
                .ctx
                .monitor
                .as_ref()
                .map(|m| m.alert_gauges())
                .unwrap_or_default();
            let text = crate::shell::metrics::render(&q, Some(st.ctx.link.stats()), &alerts);
            (
                [(header::CONTENT_TYPE, crate::shell::metrics::CONTENT_TYPE)],
                text,
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("queue unavailable: {e}\n"),
        )
            .into_response(),
    }
}

async fn status(
    State(st): State<St>,
    axum::Extension(caller): axum::Extension<access::Caller>,
) -> Response {
    match crate::shell::admin::status_view(&st.ctx).await {
        Ok(s) => {
            let mut v = serde_json::to_value(&s).unwrap_or(Value::Null);
            if let Value::Object(o) = &mut v {
                // The page shows retry and cancel to whoever may use them.
                let acts = caller.grant.role.allows(crate::engine::trust::Verb::Cancel);
                o.insert("admin".into(), acts.into());
                o.insert(
                    "uplink_state".into(),
                    s.uplink
                        .as_ref()
                        .map_or("none", |u| u.state.as_str())
                        .into(),
                );
            }
            Json(v).into_response()
        }
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Devices with their statistics, as the page and `/api/devices` give them.
pub async fn devices_json(ctx: &AdminContext) -> Result<Value, crate::shell::queue::QueueError> {
    let ds = crate::shell::admin::devices(ctx).await?;
    Ok(Value::Array(
        ds.iter()
            .map(|d| {
                let stats = ctx.monitor.as_ref().map(|m| m.device_stats(&d.record.id));
                json!({
                    "id": d.record.id, "online": d.online, "last_seen": d.record.last_seen,
                    "enrolled_at": d.record.enrolled_at, "revoked": d.record.revoked,
                    "tags": d.record.tags, "caps": d.record.caps,
                    "queued": d.queued, "in_flight": d.in_flight, "stats": stats,
                    "shared_bundle": d.shared_bundle,
                })
            })
            .collect(),
    ))
}

async fn devices(State(st): State<St>) -> Response {
    match devices_json(&st.ctx).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn commands(State(st): State<St>, Query(q): Query<Limit>) -> Response {
    let n = q.limit.unwrap_or(50).min(MAX_COMMANDS);
    let v = st
        .ctx
        .monitor
        .as_ref()
        .map(|m| m.recent(n))
        .unwrap_or_default();
    // A delivered command still fetching its artifact shows how far, in
    // its result column (from memory, like `show`).
    let v: Vec<_> = v
        .into_iter()
        .map(|mut c| {
            if c.state == "delivered" && c.result.is_none() {
                let p =
                    c.id.parse()
                        .ok()
                        .and_then(|id| st.ctx.queue.progress().get(id));
                c.result = p.map(|p| crate::shell::queue::json::progress_line(&p));
            }
            c
        })
        .collect();
    Json(v).into_response()
}

/// Rollouts as `rollout list --json` prints them (progress by counts).
async fn rollouts(State(st): State<St>) -> Response {
    let Some(r) = &st.ctx.rollouts else {
        return Json(json!([])).into_response();
    };
    let v: Vec<Value> = r.list().await.iter().map(|v| v.json()).collect();
    Json(v).into_response()
}

async fn workflows(State(st): State<St>) -> Response {
    let Some(w) = &st.ctx.workflows else {
        return Json(json!([])).into_response();
    };
    let runs: Vec<Value> = w
        .list()
        .await
        .iter()
        .map(|r| {
            let steps: Vec<Value> = r
                .steps
                .iter()
                .map(|s| {
                    json!({"name": s.name, "state": s.state, "target": s.target,
                           "command": s.command.map(|c| c.to_string()), "result": s.result})
                })
                .collect();
            json!({"id": r.id.to_string(), "name": r.name, "state": r.state,
                   "started_at": r.started_at, "finished_at": r.finished_at, "steps": steps})
        })
        .collect();
    Json(runs).into_response()
}

async fn alerts(State(st): State<St>) -> Response {
    let (rules, firing) = match &st.ctx.monitor {
        Some(m) => (
            m.alert_gauges()
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
            m.alerts(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    Json(json!({"rules": rules, "alerts": firing})).into_response()
}

async fn history(State(st): State<St>) -> Response {
    let h = st
        .ctx
        .monitor
        .as_ref()
        .map(|m| m.history())
        .unwrap_or_default();
    Json(json!({"minutes": crate::shell::monitor::HISTORY_MINUTES, "samples": h})).into_response()
}

async fn events(State(st): State<St>) -> Response {
    let Some(m) = &st.ctx.monitor else {
        return err(StatusCode::SERVICE_UNAVAILABLE, "no monitor on this box");
    };
    let Ok(permit) = st.streams.clone().try_acquire_owned() else {
        return err(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} event streams are open already; close a page"),
        );
    };
    let rx = m.subscribe();
    // The permit lives as long as the stream: dropped when the page goes.
    let stream = futures_util::stream::unfold((rx, permit), |(mut rx, permit)| async move {
        let ev = match rx.recv().await {
            Ok(u) => {
                let kind = match &u {
                    Update::Command(_) => "command",
                    Update::Alert(_) => "alert",
                    Update::Sample(_) => "sample",
                };
                let data = serde_json::to_string(&u).unwrap_or_default();
                Event::default().event(kind).data(data)
            }
            // A slow page missed some: it reloads its lists.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Event::default().event("lagged").data(n.to_string())
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(ev), (rx, permit)))
    });
    // A comment every 30 s keeps proxies from closing an idle stream; it
    // runs only while a page is open.
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(30)))
        .into_response()
}

/// `act_on`, and its audit entry with the answer's status (its text, for
/// a refusal): a dashboard retry or cancel is a write like the socket's.
async fn act(
    State(st): State<St>,
    axum::Extension(caller): axum::Extension<access::Caller>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let (target, what) = (id.clone(), action.clone());
    let who = caller.who.clone();
    let resp = act_on(st.clone(), caller, id, action).await;
    let refused = !resp.status().is_success();
    st.ctx.queue.audit(crate::engine::audit::Note {
        at: crate::now_millis(),
        who,
        from: format!("http {peer}"),
        what,
        target: String::new(),
        command: Some(target),
        payload_sha256: None,
        allowed: !refused,
        why: refused.then(|| resp.status().to_string()),
    });
    resp
}

async fn act_on(st: St, caller: access::Caller, id: String, action: String) -> Response {
    // The role and the X-Outpost header were checked by the guard.
    let id: crate::CommandId = match id.parse() {
        Ok(id) => id,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    let verb = match action.as_str() {
        "retry" => crate::engine::trust::Verb::Retry,
        _ => crate::engine::trust::Verb::Cancel,
    };
    if let Err(refusal) = api::may_act_on(&st.ctx, &caller, verb, id).await {
        return refusal;
    }
    let r = match action.as_str() {
        "retry" => st.ctx.queue.retry(id).await,
        "cancel" => st.ctx.queue.cancel(id).await,
        other => {
            return err(
                StatusCode::NOT_FOUND,
                format!("unknown action `{other}` (retry or cancel)"),
            )
        }
    };
    match r {
        Ok(v) => {
            tracing::info!(command = %id, "{action} from the dashboard");
            Json(json!({"id": v.id.to_string(), "state": v.state.as_str()})).into_response()
        }
        Err(e) => api::queue_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_and_come_from_the_query() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert_eq!(query_token(Some("a=1&token=s%2Bx")), Some("s+x".into()));
        assert_eq!(query_token(Some("a=1")), None);
        assert_eq!(query_token(None), None);
    }
}

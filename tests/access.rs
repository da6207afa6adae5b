//! Roles end to end (issue 23): every verb under every role, through the
//! admin socket as other uids (the real CLI, run with setuid) and over HTTP
//! with role tokens; and the HTTP send API: 201 only once durable, the
//! command then seen over HTTP and by `outpost show`, delivered to a
//! device, bad fields named, unknown ids 404, operators bounded by their
//! patterns.
//!
//! No timed assertions: waits have generous deadlines that only stop a
//! hang.

use base64::Engine as _;
use outpost::device::{run_agent, AgentOptions, Handler};
use outpost::engine::trust::{Role, Verb};
use outpost::shell::admin::access::{Access, AccessEntry};
use outpost::shell::http::access::{HttpToken, TokenEntry};
use outpost::shell::queue::SendRequest;
use outpost::shell::serve::{self, RunningBox, ServeOptions};
use outpost::shell::store::DeviceRecord;
use outpost::{CommandId, SendOptions};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "common/run.rs"]
mod run;
use run::{text, BIN};

const DEADLINE: Duration = Duration::from_secs(30);

const VIEWER: &str = "viewer-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";
const BOUNDED: &str = "bounded-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

struct TestBox {
    b: RunningBox,
    dir: tempfile::TempDir,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

fn tokens() -> Vec<HttpToken> {
    let e = |name: &str, token: &str, role: &str, targets: &[&str]| TokenEntry {
        name: Some(name.into()),
        token: Some(token.into()),
        token_file: None,
        role: role.into(),
        targets: targets.iter().map(|t| t.to_string()).collect(),
    };
    outpost::shell::http::access::resolve_tokens(
        &[
            e("view", VIEWER, "viewer", &[]),
            e("mes", OPERATOR, "operator", &[]),
            e("line", BOUNDED, "operator", &["away-*", "dev-*"]),
            e("ops", ADMIN, "admin", &[]),
        ],
        None,
    )
    .unwrap()
}

async fn start(f: impl FnOnce(&mut ServeOptions)) -> TestBox {
    let dir = tempfile::tempdir().unwrap();
    let mut o = ServeOptions::new(dir.path().to_path_buf());
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.http = Some("127.0.0.1:0".parse().unwrap());
    o.limits.backoff_base_ms = 10;
    o.limits.backoff_cap_ms = 20;
    f(&mut o);
    let b = serve::start(o).await.unwrap();
    for id in ["away-1", "other-1"] {
        b.queue.enroll(DeviceRecord::new(id)).await.unwrap();
    }
    TestBox {
        b,
        dir,
        stop: Vec::new(),
    }
}

impl TestBox {
    fn http(&self) -> SocketAddr {
        self.b.http_addr.unwrap()
    }

    async fn device(&mut self, id: &str, handler: Handler) {
        self.b
            .queue
            .enroll(DeviceRecord {
                enrolled_at: outpost::now_millis(),
                ..DeviceRecord::new(id)
            })
            .await
            .unwrap();
        let bundle = self.b.identity.issue_device(id, &self.b.advertise).unwrap();
        let path = self.dir.path().join(format!("{id}.bundle"));
        bundle.write(&path).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop.push(tx);
        tokio::spawn(run_agent(AgentOptions::new(path, handler), async move {
            let _ = rx.await;
        }));
        let t0 = std::time::Instant::now();
        loop {
            let ds = self.b.queue.devices().await.unwrap();
            if ds.iter().any(|d| d.record.id == id && d.online) {
                break;
            }
            assert!(t0.elapsed() < DEADLINE, "{id} never connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send(&self, target: &str, opts: SendOptions) -> CommandId {
        self.b
            .queue
            .send(SendRequest {
                target: target.into(),
                payload: b"x".to_vec(),
                opts,
                origin: "test".into(),
                signature: None,
            })
            .await
            .unwrap()
            .id
    }

    async fn state(&self, id: CommandId) -> String {
        self.b
            .queue
            .show(id)
            .await
            .unwrap()
            .state
            .as_str()
            .to_string()
    }

    async fn stop(self) {
        for s in self.stop {
            let _ = s.send(());
        }
        self.b.stop().await;
    }
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request on its own connection. Only the head is read for
/// the event stream, which never ends.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Answer {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            let n = c.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if path == "/api/events" && out.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the server answered");
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Answer {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        head: head.to_string(),
        body: body.to_string(),
    }
}

// ----- HTTP ---------------------------------------------------------------

#[tokio::test]
async fn every_http_route_under_every_role() {
    let mut t = start(|o| o.http_opts.tokens = tokens()).await;
    t.device("dev-bad", Handler::Exec("exit 3".into())).await;
    let addr = t.http();
    let roles = [
        (VIEWER, Role::Viewer, "token `view`"),
        (OPERATOR, Role::Operator, "token `mes`"),
        (ADMIN, Role::Admin, "token `ops`"),
    ];
    for (token, role, who) in roles {
        let queued = t.send("away-1", SendOptions::default()).await;
        let one = SendOptions {
            max_attempts: Some(1),
            ..SendOptions::default()
        };
        let dead = t.send("dev-bad", one).await;
        let v = t.b.queue.wait(dead, DEADLINE).await.unwrap().unwrap();
        assert_eq!(v.state.as_str(), "dead");
        let routes: Vec<(&str, String, Verb, u16)> = vec![
            ("GET", "/".into(), Verb::Read, 200),
            ("GET", "/api/status".into(), Verb::Read, 200),
            ("GET", "/api/devices".into(), Verb::Read, 200),
            ("GET", "/api/commands".into(), Verb::Read, 200),
            ("GET", format!("/api/commands/{queued}"), Verb::Read, 200),
            ("GET", "/api/workflows".into(), Verb::Read, 200),
            ("GET", "/api/alerts".into(), Verb::Read, 200),
            ("GET", "/api/history".into(), Verb::Read, 200),
            ("GET", "/api/events".into(), Verb::Read, 200),
            ("POST", "/api/commands".into(), Verb::Send, 201),
            (
                "POST",
                format!("/api/commands/{queued}/cancel"),
                Verb::Cancel,
                200,
            ),
            (
                "POST",
                format!("/api/commands/{dead}/retry"),
                Verb::Retry,
                200,
            ),
        ];
        for (method, path, verb, ok) in routes {
            let a = request(
                addr,
                method,
                &path,
                Some(token),
                r#"{"target": "away-1", "payload": "hi"}"#,
            )
            .await;
            if role.allows(verb) {
                assert_eq!(a.status, ok, "{role} {method} {path}: {}", a.body);
            } else {
                assert_eq!(a.status, 403, "{role} {method} {path}: {}", a.body);
                let j = a.json();
                assert_eq!(j["kind"], "denied");
                assert_eq!(
                    j["error"],
                    format!("`{verb}` needs the {} role; {who} has {role}", verb.needs())
                );
            }
        }
        let cancelled = role.allows(Verb::Cancel);
        assert_eq!(
            t.state(queued).await,
            if cancelled { "cancelled" } else { "queued" }
        );
    }
    // The page offers retry and cancel to whoever may use them.
    for (token, acts) in [(VIEWER, false), (OPERATOR, true), (ADMIN, true)] {
        let a = request(addr, "GET", "/api/status", Some(token), "").await;
        assert_eq!(a.json()["admin"], acts, "{token}");
    }
    // Without a token, or with a wrong one: 401, as before roles.
    let a = request(addr, "GET", "/api/status", None, "").await;
    assert_eq!(a.status, 401, "{}", a.body);
    let a = request(
        addr,
        "POST",
        "/api/commands",
        Some("not-a-token-of-this-box"),
        "{}",
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("does not match"), "{}", a.body);
    // A route nobody classed is no route.
    let a = request(
        addr,
        "POST",
        "/api/commands/01J9ZQ3M8E5V6X7Y8Z9A0B1C2D/delete",
        Some(ADMIN),
        "",
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.body);
    t.stop().await;
}

#[tokio::test]
async fn an_http_send_is_durable_visible_and_delivered() {
    let mut t = start(|o| o.http_opts.tokens = tokens()).await;
    t.device("dev-1", Handler::Echo).await;
    let addr = t.http();
    let a = request(
        addr,
        "POST",
        "/api/commands",
        Some(OPERATOR),
        r#"{"target": "dev-1", "payload": "from the MES", "priority": "high", "ttl": "10m", "key": "order-77"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let j = a.json();
    assert_eq!(j["duplicate"], false);
    let id: CommandId = j["id"].as_str().unwrap().parse().unwrap();
    assert!(
        a.head
            .to_ascii_lowercase()
            .contains(&format!("location: /api/commands/{id}").to_ascii_lowercase()),
        "{}",
        a.head
    );
    // Durable when answered: the queue knows it now, with the fields given.
    let v = t.b.queue.show(id).await.unwrap();
    assert_eq!(v.priority.as_str(), "high");
    assert_eq!(v.key.as_deref(), Some("order-77"));
    assert!(v.origin.contains("mes"), "{}", v.origin);
    let v = t.b.queue.wait(id, DEADLINE).await.unwrap().unwrap();
    assert_eq!(v.state.as_str(), "succeeded");

    let got = request(
        addr,
        "GET",
        &format!("/api/commands/{id}"),
        Some(OPERATOR),
        "",
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    let got = got.json();
    assert_eq!(got["result"], "from the MES");
    assert_eq!(got["device"], "dev-1");
    // The same JSON `outpost show --json` prints: one serializer.
    let dir = t.dir.path().to_path_buf();
    let id_text = id.to_string();
    let shown =
        tokio::task::spawn_blocking(move || cli_as(None, &dir, &["show", &id_text, "--json"]))
            .await
            .unwrap();
    let shown: Value =
        serde_json::from_slice(&shown.stdout).unwrap_or_else(|_| panic!("{}", text(&shown)));
    assert_eq!(shown, got);

    // The same key again: the first command, not a second one.
    let again = request(
        addr,
        "POST",
        "/api/commands",
        Some(OPERATOR),
        r#"{"target": "dev-1", "payload": "from the MES", "key": "order-77"}"#,
    )
    .await;
    assert!(again.status == 200 || again.status == 201, "{}", again.body);
    assert_eq!(again.json()["id"], id.to_string());
    assert_eq!(again.json()["duplicate"], true);

    // Binary payloads pass as bytes; an envelope is verified: bytes that
    // are none are refused, a signed one is taken under its own id.
    let bogus = request(
        addr,
        "POST",
        "/api/commands",
        Some(OPERATOR),
        &json!({"target": "away-1", "payload_b64": "/wA=", "envelope_b64": "c2lnbmVk", "ttl": 60})
            .to_string(),
    )
    .await;
    assert_eq!(bogus.status, 409, "{}", bogus.body);
    assert!(bogus.body.contains("envelope"), "{}", bogus.body);
    let alice = outpost::engine::trust::OperatorKey::generate("alice").unwrap();
    t.b.queue
        .edit_trust(outpost::engine::trust::TrustEdit::Add {
            public: alice.public.to_openssh(),
            name: None,
            grant: outpost::engine::trust::Grant::new(outpost::engine::trust::Role::Operator),
        })
        .await
        .unwrap();
    let now = outpost::now_millis();
    let claims = outpost::engine::trust::Claims {
        id: CommandId::new(now, 9),
        target: "away-1".into(),
        payload_sha256: outpost::engine::trust::envelope::payload_digest(&[0xff, 0]),
        artifact: None,
        priority: outpost::Priority::Normal,
        not_before: None,
        expires_at: now + 600_000,
        audience: t.b.queue.gate().name().to_string(),
        key_id: alice.public.id,
    };
    let env = outpost::engine::trust::envelope::seal(&claims, &alice).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(env);
    let a = request(
        addr,
        "POST",
        "/api/commands",
        Some(OPERATOR),
        &json!({"target": "away-1", "payload_b64": "/wA=", "envelope_b64": b64, "ttl": 60})
            .to_string(),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.json()["id"], claims.id.to_string(), "{}", a.body);
    t.stop().await;
}

#[tokio::test]
async fn http_refusals_name_the_field_the_id_or_the_pattern() {
    let t = start(|o| {
        o.http_opts.tokens = tokens();
        o.limits.max_payload = 4096;
    })
    .await;
    let addr = t.http();
    let send = |token: &'static str, body: String| async move {
        request(addr, "POST", "/api/commands", Some(token), &body).await
    };
    for (body, field) in [
        ("{not json".to_string(), "body"),
        (r#"{"payload": "x"}"#.into(), "target"),
        (
            r#"{"target": "away-1", "priority": "urgent"}"#.into(),
            "priority",
        ),
        (r#"{"target": "away-1", "ttl": "soon"}"#.into(), "ttl"),
        (
            r#"{"target": "away-1", "not_before": "2026-11-25T10:00:00"}"#.into(),
            "not_before",
        ),
        (
            r#"{"target": "away-1", "max_attempts": "three"}"#.into(),
            "max_attempts",
        ),
        (
            r#"{"target": "away-1", "payload_b64": "***"}"#.into(),
            "payload_b64",
        ),
        (r#"{"target": "away-1", "prio": "high"}"#.into(), "prio"),
    ] {
        let a = send(OPERATOR, body.clone()).await;
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        let e = a.json()["error"].as_str().unwrap().to_string();
        assert!(e.contains(&format!("`{field}`")), "{body}: {e}");
    }
    // Unknown ids: 404 for show, cancel and retry.
    let unknown = "01J9ZQ3M8E5V6X7Y8Z9A0B1C2D";
    for (method, path) in [
        ("GET", format!("/api/commands/{unknown}")),
        ("POST", format!("/api/commands/{unknown}/cancel")),
        ("POST", format!("/api/commands/{unknown}/retry")),
    ] {
        let a = request(addr, method, &path, Some(OPERATOR), "").await;
        assert_eq!(a.status, 404, "{method} {path}: {}", a.body);
    }
    // A bounded operator, outside its patterns: refused, nothing queued.
    let a = send(BOUNDED, r#"{"target": "other-1", "payload": "x"}"#.into()).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(a.json()["kind"], "denied");
    let e = a.json()["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("`away-*`, `dev-*`") && e.contains("`other-1`"),
        "{e}"
    );
    assert_eq!(t.b.queue.stats().await.unwrap().queued, 0);
    let a = send(BOUNDED, r#"{"target": "away-1", "payload": "x"}"#.into()).await;
    assert_eq!(a.status, 201, "inside them: {}", a.body);
    let theirs = t.send("other-1", SendOptions::default()).await;
    let a = request(
        addr,
        "POST",
        &format!("/api/commands/{theirs}/cancel"),
        Some(BOUNDED),
        "",
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(t.state(theirs).await, "queued");
    // A body over the box's payload limit: 413, saying the limit.
    let big = json!({"target": "away-1", "payload": "x".repeat(200_000)}).to_string();
    let a = send(OPERATOR, big).await;
    assert_eq!(a.status, 413, "{}", a.body);
    assert!(
        a.json()["error"].as_str().unwrap().contains("bytes"),
        "{}",
        a.body
    );
    // A queue refusal keeps the queue's classification: revoked is 409.
    t.b.queue.revoke("other-1".into()).await.unwrap();
    let a = send(OPERATOR, r#"{"target": "other-1", "payload": "x"}"#.into()).await;
    assert_eq!(a.status, 409, "{}", a.body);
    t.stop().await;
}

#[tokio::test]
async fn the_dashboard_without_tokens_acts_only_with_http_admin() {
    // Loopback, no token configured: the dashboard's caller, as before.
    let t = start(|_| {}).await;
    let body = r#"{"target": "away-1", "payload": "x"}"#;
    let a = request(t.http(), "POST", "/api/commands", None, body).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("--http-admin"), "{}", a.body);
    t.stop().await;
    let t = start(|o| o.http_opts.admin = true).await;
    let a = request(t.http(), "POST", "/api/commands", None, body).await;
    assert_eq!(a.status, 403, "a browser's cross-site post: {}", a.body);
    assert!(a.body.contains("X-Outpost"), "{}", a.body);
    let mut c = TcpStream::connect(t.http()).await.unwrap();
    let req = format!(
        "POST /api/commands HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Outpost: 1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 201"), "{out}");
    t.stop().await;
}

// ----- the admin socket ---------------------------------------------------

/// `outpost ARGS` as `uid` (None: as this process, root), in the box's
/// group (gid 0 here), as a deployment puts its operators in the box's
/// group for the socket's mode 0660.
fn cli_as(uid: Option<u32>, dir: &Path, args: &[&str]) -> Output {
    let mut c = std::process::Command::new(BIN);
    c.args(args)
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        .env("OUTPOST_CONFIG", "/dev/null")
        .current_dir("/")
        .stdin(Stdio::null());
    if let Some(u) = uid {
        c.uid(u).gid(0);
    }
    c.output().expect("run outpost")
}

fn root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_request_under_every_uid() {
    if !root() {
        println!("SKIPPED: running the CLI as other uids needs root");
        return;
    }
    let entry = |uid: u32, role: &str, targets: &[&str]| AccessEntry {
        uid: Some(uid),
        user: None,
        role: role.into(),
        targets: targets.iter().map(|t| t.to_string()).collect(),
    };
    let access = Access::resolve(&[
        entry(1001, "viewer", &[]),
        entry(1002, "operator", &["away-*"]),
    ])
    .unwrap();
    let t = start(|o| o.access = access).await;
    let dir = t.dir.path().to_path_buf();
    // The group may traverse the data dir, as under systemd's
    // StateDirectory with its group.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    // Where each caller may write the bundle `enroll` asks for.
    let outs = dir.join("out");
    std::fs::create_dir(&outs).unwrap();
    std::fs::set_permissions(&outs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let callers: [(Option<u32>, Option<Role>); 4] = [
        (Some(1001), Some(Role::Viewer)),
        (Some(1002), Some(Role::Operator)),
        (None, Some(Role::Admin)),
        (Some(1003), None),
    ];
    for (uid, role) in callers {
        let queued = t.send("away-1", SendOptions::default()).await.to_string();
        let to_cancel = t.send("away-1", SendOptions::default()).await.to_string();
        let n = uid.unwrap_or(0);
        let out = format!("{}/new-{n}.bundle", outs.display());
        let rows: Vec<(Verb, Vec<String>)> = vec![
            (Verb::Read, vec!["status".into(), "--json".into()]),
            (Verb::Read, vec!["devices".into(), "--json".into()]),
            (Verb::Read, vec!["show".into(), queued.clone()]),
            (Verb::Read, vec!["queue".into(), "away-1".into()]),
            (Verb::Read, vec!["workflow".into(), "list".into()]),
            (
                Verb::Send,
                vec!["send".into(), "away-1".into(), "hello".into()],
            ),
            (Verb::Cancel, vec!["cancel".into(), to_cancel.clone()]),
            // A queued command cannot be retried: allowed, it fails with 1.
            (Verb::Retry, vec!["retry".into(), queued.clone()]),
            (
                Verb::Tag,
                vec![
                    "tag".into(),
                    "away-1".into(),
                    "--add".into(),
                    format!("t{n}"),
                ],
            ),
            (
                Verb::Enroll,
                vec!["enroll".into(), format!("new-{n}"), "--out".into(), out],
            ),
            (Verb::Revoke, vec!["revoke".into(), format!("new-{n}")]),
        ];
        for (verb, args) in rows {
            let d = dir.clone();
            let a = args.clone();
            let o = tokio::task::spawn_blocking(move || {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                cli_as(uid, &d, &a)
            })
            .await
            .unwrap();
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            let who = format!("uid {n}");
            match role {
                Some(r) if r.allows(verb) => {
                    let want = if verb == Verb::Retry { 1 } else { 0 };
                    assert_eq!(o.status.code(), Some(want), "{who} {args:?}: {}", text(&o));
                }
                Some(r) => {
                    assert_eq!(o.status.code(), Some(5), "{who} {args:?}: {}", text(&o));
                    assert!(
                        err.contains(&format!(
                            "`{verb}` needs the {} role; {who} has {r}",
                            verb.needs()
                        )),
                        "{who} {args:?}: {err}"
                    );
                }
                None => {
                    assert_eq!(o.status.code(), Some(5), "{who} {args:?}: {}", text(&o));
                    assert!(
                        err.contains(&format!("{who} is not mapped to any role (default deny)")),
                        "{who} {args:?}: {err}"
                    );
                }
            }
        }
        let want = if role.is_some_and(|r| r.allows(Verb::Cancel)) {
            "cancelled"
        } else {
            "queued"
        };
        assert_eq!(t.state(to_cancel.parse().unwrap()).await, want, "uid {n}");
    }
    // The operator outside its patterns: refused naming them, and a
    // command of another target cannot be cancelled either.
    let theirs = t.send("other-1", SendOptions::default()).await;
    for args in [
        vec!["send".to_string(), "other-1".into(), "x".into()],
        vec!["cancel".into(), theirs.to_string()],
    ] {
        let d = dir.clone();
        let a = args.clone();
        let o = tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            cli_as(Some(1002), &d, &a)
        })
        .await
        .unwrap();
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr)
                .contains("only to targets matching `away-*`; `other-1` is not one of them"),
            "{args:?}: {}",
            text(&o)
        );
    }
    assert_eq!(t.state(theirs).await, "queued");
    t.stop().await;
}

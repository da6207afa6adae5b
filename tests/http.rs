//! The dashboard's HTTP listener end to end, on loopback: every JSON
//! endpoint, `/metrics` through the new router, the SSE stream, the token
//! and loopback rules, the read-only default, an alert rule firing through
//! the real shell (status, metrics, exec hook), and a real headless
//! Chromium watching a command finish without a reload.
//!
//! No timed assertions: waits have generous deadlines that only stop a
//! hang.

use outpost::device::{run_agent, AgentOptions, Handler};
use outpost::shell::queue::SendRequest;
use outpost::shell::serve::{self, RunningBox, ServeOptions};
use outpost::shell::store::DeviceRecord;
use outpost::{CommandId, SendOptions};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(30);

struct TestBox {
    b: RunningBox,
    dir: tempfile::TempDir,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

fn options(dir: &std::path::Path) -> ServeOptions {
    let mut o = ServeOptions::new(dir.to_path_buf());
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.http = Some("127.0.0.1:0".parse().unwrap());
    o.limits.backoff_base_ms = 10;
    o.limits.backoff_cap_ms = 20;
    o
}

async fn start(f: impl FnOnce(&mut ServeOptions)) -> TestBox {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    f(&mut o);
    let b = serve::start(o).await.unwrap();
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

    /// Enroll `id` with a tag and a capability and run an agent for it.
    async fn device(&mut self, id: &str, handler: Handler) {
        self.b
            .queue
            .enroll(DeviceRecord {
                tags: vec!["line-1".into()],
                caps: vec!["camera".into()],
                enrolled_at: outpost::now_millis(),
                ..DeviceRecord::new(id)
            })
            .await
            .unwrap();
        let bundle = self.b.identity.issue_device(id, &self.b.advertise).unwrap();
        let path: PathBuf = self.dir.path().join(format!("{id}.bundle"));
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

    async fn send(&self, target: &str, payload: &str, opts: SendOptions) -> CommandId {
        self.b
            .queue
            .send(SendRequest {
                target: target.into(),
                payload: payload.as_bytes().to_vec(),
                opts,
                origin: "test".into(),
                signature: None,
            })
            .await
            .unwrap()
            .id
    }

    async fn wait(&self, id: CommandId) -> String {
        let v = self.b.queue.wait(id, DEADLINE).await.unwrap().unwrap();
        v.state.as_str().to_string()
    }

    async fn stop(self) {
        for s in self.stop {
            let _ = s.send(());
        }
        self.b.stop().await;
    }
}

/// One HTTP/1.1 request on its own connection: (status, body).
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, c.read_to_end(&mut out))
        .await
        .expect("the server answered")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = request(addr, "GET", path, &[]).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

#[tokio::test]
async fn every_json_endpoint_answers_and_the_event_stream_carries_a_finished_command() {
    let mut t = start(|_| {}).await;
    t.device("dev-1", Handler::Echo).await;
    t.device("dev-2", Handler::Echo).await;
    let addr = t.http();

    // Subscribe first, then send: the stream must carry the end.
    let mut sse = TcpStream::connect(addr).await.unwrap();
    sse.write_all(format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut sse = BufReader::new(sse);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        sse.read_line(&mut line).await.unwrap();
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    // The handler subscribes before it answers the head, so from here on
    // no event is missed.

    let id = t
        .send("dev-1", "hello dashboard", SendOptions::default())
        .await;
    assert_eq!(t.wait(id).await, "succeeded");
    let id2 = t.send("dev-2", "second", SendOptions::default()).await;
    assert_eq!(t.wait(id2).await, "succeeded");

    let found = tokio::time::timeout(DEADLINE, async {
        let mut event = String::new();
        loop {
            let mut line = String::new();
            if sse.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.trim().to_string();
            }
            if let Some(d) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(d.trim()).unwrap();
                if event == "command" && v["id"] == id.to_string() && v["state"] == "succeeded" {
                    return Some(v);
                }
            }
        }
    })
    .await
    .expect("the stream carried the command's end");
    let v = found.unwrap();
    assert_eq!(v["device"], "dev-1");
    assert_eq!(v["result"], "hello dashboard");

    let (status, page) = request(addr, "GET", "/", &[]).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>outpost</title>"), "{page}");
    assert!(
        page.contains("new EventSource("),
        "the page listens for events"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing from elsewhere"
    );

    let s = get_json(addr, "/api/status").await;
    assert_eq!(s["devices_total"], 2);
    assert_eq!(s["devices_online"], 2);
    assert_eq!(s["admin"], false);
    assert_eq!(s["uplink_state"], "none");
    assert_eq!(s["alerts"], Value::Array(vec![]));

    let ds = get_json(addr, "/api/devices").await;
    let d1 = ds
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "dev-1")
        .unwrap();
    assert_eq!(d1["online"], true);
    assert_eq!(d1["tags"][0], "line-1");
    assert_eq!(d1["caps"][0], "camera");
    assert_eq!(d1["stats"]["succeeded"], 1);
    assert_eq!(d1["stats"]["success_rate"], 100.0);
    assert!(d1["stats"]["latency_p50_ms"].is_u64(), "{d1}");

    let cs = get_json(addr, "/api/commands?limit=10").await;
    let cs = cs.as_array().unwrap();
    assert_eq!(cs[0]["id"], id2.to_string(), "newest first");
    assert_eq!(cs[1]["id"], id.to_string());
    assert_eq!(cs[1]["state"], "succeeded");
    assert_eq!(
        get_json(addr, "/api/commands?limit=1")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );

    assert_eq!(get_json(addr, "/api/workflows").await, Value::Array(vec![]));
    assert_eq!(get_json(addr, "/api/rollouts").await, Value::Array(vec![]));
    let a = get_json(addr, "/api/alerts").await;
    assert_eq!(a["alerts"], Value::Array(vec![]));
    let h = get_json(addr, "/api/history").await;
    assert_eq!(h["minutes"], 60);
    assert!(h["samples"].is_array());

    // /metrics moved into the same router and still scrapes.
    let (status, m) = request(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(m.contains("outpost_devices_online 2"), "{m}");
    assert!(m.contains("outpost_acked_total 2"), "{m}");
    let (status, _) = request(addr, "GET", "/nope", &[]).await;
    assert_eq!(status, 404);

    // A rollout shows with its progress.
    let plan = outpost::engine::rollout::Plan {
        name: "fw".into(),
        target: vec!["tag:line-1".into()],
        payload: b"go".to_vec(),
        artifact: None,
        priority: outpost::Priority::Normal,
        max_attempts: 1,
        canary: None,
        rate: None,
        parallel: None,
        abort: Vec::new(),
        timeout: None,
        success: None,
        health: None,
        on_abort: None,
        edges: None,
    };
    let r = t.b.rollouts.start_rollout(plan).await.unwrap();
    let t0 = std::time::Instant::now();
    let rs = loop {
        let rs = get_json(addr, "/api/rollouts").await;
        if rs[0]["state"] == "completed" {
            break rs;
        }
        assert!(t0.elapsed() < DEADLINE, "{rs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rs[0]["id"], r.id.to_string());
    assert_eq!(rs[0]["counts"]["succeeded"], 2, "{rs}");
    assert_eq!(rs[0]["devices"].as_array().unwrap().len(), 2);
    t.stop().await;
}

#[tokio::test]
async fn metrics_alone_still_scrapes_and_serves_the_same_router() {
    let t = start(|o| {
        o.http = None;
        o.metrics = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = t.b.metrics_addr.unwrap();
    let (status, m) = request(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(m.contains("outpost_enqueued_total 0"), "{m}");
    assert_eq!(get_json(addr, "/api/status").await["devices_total"], 0);
    t.stop().await;
}

#[tokio::test]
async fn with_a_token_the_page_and_api_need_it_and_metrics_stay_open() {
    let token = "s3cret-token-0123456789";
    let t = start(|o| o.http_opts.token = Some(token.into())).await;
    let addr = t.http();
    for path in ["/", "/api/status", "/api/devices", "/api/events"] {
        let (status, body) = request(addr, "GET", path, &[]).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("a token is required"), "{path}: {body}");
        // A wrong token is told apart from a missing one: the fix differs.
        let (status, body) =
            request(addr, "GET", path, &["Authorization: Bearer wrong-token"]).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        assert!(
            body.contains("does not match") && !body.contains("is required"),
            "{path}: {body}"
        );
    }
    let bearer = format!("Authorization: Bearer {token}");
    let (status, body) = request(addr, "GET", "/api/status", &[&bearer]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = request(addr, "GET", &format!("/?token={token}"), &[]).await;
    assert_eq!(status, 200, "the page's address may carry it");
    let (status, _) = request(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200, "scrapers keep working without it");
    t.stop().await;
}

#[tokio::test]
async fn a_non_loopback_address_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    // Refused before anything binds, so nothing listens beyond loopback.
    o.http = Some("0.0.0.0:0".parse().unwrap());
    let e = match serve::start(o).await {
        Ok(_) => panic!("started on 0.0.0.0 without a token"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("not a loopback address"), "{e}");
    assert!(e.contains("--http-token"), "{e}");
}

#[tokio::test]
async fn acting_needs_http_admin_and_the_header() {
    // Read-only: the POST is refused, the command untouched.
    let t = start(|_| {}).await;
    t.b.queue.enroll(DeviceRecord::new("away")).await.unwrap();
    let id = t.send("away", "x", SendOptions::default()).await;
    let path = format!("/api/commands/{id}/cancel");
    let (status, body) = request(t.http(), "POST", &path, &["X-Outpost: 1"]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--http-admin"), "{body}");
    assert_eq!(t.b.queue.show(id).await.unwrap().state.as_str(), "queued");
    t.stop().await;

    let t = start(|o| o.http_opts.admin = true).await;
    t.b.queue.enroll(DeviceRecord::new("away")).await.unwrap();
    let id = t.send("away", "x", SendOptions::default()).await;
    let path = format!("/api/commands/{id}/cancel");
    let (status, _) = request(t.http(), "POST", &path, &[]).await;
    assert_eq!(status, 403, "no cross-site form posts");
    let (status, body) = request(t.http(), "POST", &path, &["X-Outpost: 1"]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        t.b.queue.show(id).await.unwrap().state.as_str(),
        "cancelled"
    );
    assert_eq!(get_json(t.http(), "/api/status").await["admin"], true);
    t.stop().await;
}

#[tokio::test]
async fn a_dead_command_fires_an_alert_in_status_metrics_and_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let hook_out = dir.path().join("hook.json");
    let rules = outpost::engine::alert::check_rules(
        &toml::from_str::<Rules>(&format!(
            "[[alert]]\nname = \"dead\"\nkind = \"dead_above\"\nvalue = 0\nexec = \"cat > {}\"\n\
             [[alert]]\nname = \"backlog\"\nkind = \"queue_depth_above\"\nvalue = 1000\nfor = \"5m\"\n",
            hook_out.display()
        ))
        .unwrap()
        .alert,
        None,
    )
    .unwrap();
    let mut t = start(|o| o.alerts = rules).await;
    t.device("bad", Handler::Exec("exit 3".into())).await;
    let id = t
        .send(
            "bad",
            "x",
            SendOptions {
                max_attempts: Some(1),
                ..SendOptions::default()
            },
        )
        .await;
    assert_eq!(t.wait(id).await, "dead");
    let addr = t.http();
    // The alert follows the event; wait for it without timing it.
    let t0 = std::time::Instant::now();
    let alerts = loop {
        let a = get_json(addr, "/api/alerts").await;
        if a["alerts"].as_array().is_some_and(|v| !v.is_empty()) {
            break a;
        }
        assert!(t0.elapsed() < DEADLINE, "the alert never fired: {a}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(alerts["alerts"][0]["name"], "dead");
    assert_eq!(alerts["alerts"][0]["state"], "firing");
    assert_eq!(alerts["alerts"][0]["detail"], "1 dead commands (limit 0)");
    assert_eq!(alerts["rules"], serde_json::json!(["dead", "backlog"]));
    let s = get_json(addr, "/api/status").await;
    assert_eq!(s["alerts"][0]["name"], "dead");
    let (_, m) = request(addr, "GET", "/metrics", &[]).await;
    assert!(m.contains("outpost_alerts_firing{name=\"dead\"} 1"), "{m}");
    assert!(
        m.contains("outpost_alerts_firing{name=\"backlog\"} 0"),
        "{m}"
    );
    let t0 = std::time::Instant::now();
    let hook = loop {
        let text = std::fs::read_to_string(&hook_out).unwrap_or_default();
        if text.ends_with('\n') {
            break text;
        }
        assert!(t0.elapsed() < DEADLINE, "the hook never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: Value = serde_json::from_str(hook.trim()).unwrap();
    assert_eq!(v["alert"], "dead");
    assert_eq!(v["state"], "firing");
    // The device's statistics count the dead command.
    let ds = get_json(addr, "/api/devices").await;
    assert_eq!(ds[0]["stats"]["dead"], 1);
    assert_eq!(ds[0]["stats"]["success_rate"], 0.0);
    t.stop().await;
}

#[derive(serde::Deserialize)]
struct Rules {
    alert: Vec<outpost::engine::alert::RuleConfig>,
}

// ----- the browser ------------------------------------------------------

/// A WebDriver call to chromedriver: plain JSON over HTTP/1.1.
async fn wd(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut c = TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    // chromedriver keeps the connection open whatever we ask: read the
    // head, then exactly the body it announces.
    let read = async {
        let mut c = BufReader::new(c);
        let mut len = 0usize;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            c.read_line(&mut line).await.unwrap();
            let l = line.to_ascii_lowercase();
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                c.read_line(&mut size).await.unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let mut chunk = vec![0; n + 2];
                c.read_exact(&mut chunk).await.unwrap();
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            body.resize(len, 0);
            c.read_exact(&mut body).await.unwrap();
        }
        String::from_utf8_lossy(&body).to_string()
    };
    let body = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("chromedriver answered");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// A WebDriver session, deleted on drop (blocking: drop cannot await).
struct Session {
    port: u16,
    path: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
        let req = format!(
            "DELETE {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n",
            self.path, self.port
        );
        if c.write_all(req.as_bytes()).is_ok() {
            // The answer comes once the browser has quit.
            let _ = c.read(&mut [0u8; 512]);
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_sees_a_command_finish_without_a_reload() {
    let (chromium, driver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
    if !std::path::Path::new(chromium).exists() || !std::path::Path::new(driver).exists() {
        println!(
            "SKIPPED: {chromium} or {driver} missing (apt-get install chromium chromium-driver)"
        );
        return;
    }
    let mut t = start(|_| {}).await;
    t.device("cam-1", Handler::Exec("sleep 1; echo photo taken".into()))
        .await;
    t.device("cam-2", Handler::Echo).await;
    let http = t.http();
    println!("page weight: {} bytes", outpost::shell::http::PAGE.len());

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut drv = tokio::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(t0.elapsed() < DEADLINE, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let profile = tempfile::tempdir().unwrap();
    let session = wd(
        port,
        "POST",
        "/session",
        Some(serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,1000",
                     format!("--user-data-dir={}", profile.path().display())]
        }}}})),
    )
    .await;
    let sid = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {session}"))
        .to_string();
    let s = format!("/session/{sid}");
    // Ends the browser even when an assertion fails: killing chromedriver
    // alone would leave Chromium running.
    let _session = Session {
        port,
        path: s.clone(),
    };
    let rss_before = rss_kib();
    wd(
        port,
        "POST",
        &format!("{s}/url"),
        Some(serde_json::json!({"url": format!("http://{http}/")})),
    )
    .await;
    let script = |js: &str| serde_json::json!({"script": js, "args": []});
    // Loaded and listening (the page says "live" once the stream is open).
    let t0 = std::time::Instant::now();
    loop {
        let v = wd(
            port,
            "POST",
            &format!("{s}/execute/sync"),
            Some(script("return document.getElementById('live').textContent + '|' + document.getElementById('devices').textContent + '|' + document.getElementById('rollouts').textContent")),
        )
        .await;
        let text = v["value"].as_str().unwrap_or("").to_string();
        // Every list drew (the rollouts' says it has none).
        if text.starts_with("live|")
            && text.contains("cam-1")
            && text.contains("cam-2")
            && text.contains("no rollout")
        {
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "the page never went live: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Mark the document: a reload would lose the mark.
    wd(
        port,
        "POST",
        &format!("{s}/execute/sync"),
        Some(script("window.__noReload = 42; return 1")),
    )
    .await;
    let id = t.send("cam-1", "take photo", SendOptions::default()).await;
    let row = format!(
        "var r = document.querySelector('tr[data-id=\"{id}\"]'); return [window.__noReload, r ? r.dataset.state : '', r ? r.textContent : ''];"
    );
    let mut seen = Vec::new();
    let t0 = std::time::Instant::now();
    let text = loop {
        let v = wd(
            port,
            "POST",
            &format!("{s}/execute/sync"),
            Some(script(&row)),
        )
        .await;
        assert_eq!(v["value"][0], 42, "the page was reloaded: {v}");
        let state = v["value"][1].as_str().unwrap_or("").to_string();
        if !state.is_empty() && seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == "succeeded" {
            break v["value"][2].as_str().unwrap_or("").to_string();
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "the page never showed {id} finish: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("states the page showed for {id}: {seen:?}");
    assert!(text.contains("photo taken"), "{text}");
    assert!(text.contains("cam-1"), "{text}");
    // The device row follows by itself too: its statistics count the end.
    let t0 = std::time::Instant::now();
    loop {
        let v = wd(
            port,
            "POST",
            &format!("{s}/execute/sync"),
            Some(script(
                "return document.querySelector('tr[data-device=\"cam-1\"]').textContent",
            )),
        )
        .await;
        if v["value"].as_str().is_some_and(|t| t.contains("100.0%")) {
            break;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "cam-1's statistics never showed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_after = rss_kib();
    println!(
        "box process RSS: {rss_before} KiB before the page, {rss_after} KiB with it open and one command shown (+{} KiB)",
        rss_after.saturating_sub(rss_before)
    );
    let shot = wd(port, "GET", &format!("{s}/screenshot"), None).await;
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["value"].as_str().unwrap())
        .unwrap();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, &png).unwrap();
    println!("screenshot: {} ({} bytes)", out.display(), png.len());
    drop(_session);
    let _ = drv.kill().await;
    t.stop().await;
}

#[tokio::test]
async fn on_an_edge_an_alert_goes_into_the_outbox_as_an_event_of_outpost_box() {
    let dir = tempfile::tempdir().unwrap();
    let rules = outpost::engine::alert::check_rules(
        &toml::from_str::<Rules>(
            "[[alert]]\nname = \"hub-away\"\nkind = \"uplink_down_longer_than\"\nvalue = \"0s\"\n",
        )
        .unwrap()
        .alert,
        None,
    )
    .unwrap();
    let t = start(|o| {
        o.alerts = rules;
        // A hub that is not there (no bundle, a closed port): the uplink
        // stays down and the outbox keeps what goes up.
        o.upstream = Some((
            outpost::shell::upstream::UplinkOptions::new(
                dir.path().join("missing.bundle"),
                Some("127.0.0.1:9".into()),
            ),
            1000,
        ));
    })
    .await;
    let t0 = std::time::Instant::now();
    let payload = loop {
        let records = t.b.queue.outbox_read(0, 1000).await.unwrap();
        let found = records.iter().find_map(|r| match &r.item {
            outpost::engine::journal::UpItem::Event {
                device, payload, ..
            } if device == outpost::shell::monitor::BOX_DEVICE => Some(payload.clone()),
            _ => None,
        });
        if let Some(p) = found {
            break p;
        }
        assert!(t0.elapsed() < DEADLINE, "no alert event in the outbox");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["alert"], "hub-away");
    assert_eq!(v["state"], "firing");
    let s = get_json(t.http(), "/api/status").await;
    assert_ne!(s["uplink_state"], "none");
    assert_eq!(s["alerts"][0]["name"], "hub-away");
    t.stop().await;
}

#[tokio::test]
async fn a_device_that_goes_away_fires_its_offline_rule_at_the_deadline() {
    let rules = outpost::engine::alert::check_rules(
        &toml::from_str::<Rules>(
            "[[alert]]\nname = \"gone\"\nkind = \"device_offline_longer_than\"\nvalue = \"1s\"\n",
        )
        .unwrap()
        .alert,
        None,
    )
    .unwrap();
    let mut t = start(|o| o.alerts = rules).await;
    t.device("cam-9", Handler::Echo).await;
    assert_eq!(
        get_json(t.http(), "/api/alerts").await["alerts"],
        serde_json::json!([])
    );
    // Stop the agent: no command event follows, only the disconnect; the
    // rule must fire by its own deadline, a second after last seen.
    let _ = t.stop.pop().unwrap().send(());
    let t0 = std::time::Instant::now();
    let a = loop {
        let a = get_json(t.http(), "/api/alerts").await;
        if a["alerts"][0]["state"] == "firing" {
            break a;
        }
        assert!(t0.elapsed() < DEADLINE, "the offline rule never fired: {a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(a["alerts"][0]["detail"], "offline > 1s: cam-9");
    t.stop().await;
}

#[tokio::test]
async fn event_streams_are_bounded() {
    let t = start(|_| {}).await;
    let addr = t.http();
    let mut open = Vec::new();
    for _ in 0..outpost::shell::http::MAX_STREAMS {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut c = BufReader::new(c);
        let mut line = String::new();
        c.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        open.push(c);
    }
    let (status, body) = request(addr, "GET", "/api/events", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("event streams are open already"), "{body}");
    // The rest of the API still answers.
    assert_eq!(get_json(addr, "/api/status").await["devices_total"], 0);
    drop(open);
    t.stop().await;
}

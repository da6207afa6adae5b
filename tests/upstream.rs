//! Upstream sync end to end over loopback: an edge box under a hub box,
//! each a real `serve::start` with its store, QUIC listener and uplink, and
//! a device on the edge. After each fault, every result is on the hub
//! exactly once (counted in the hub's store) and the edge ran every command
//! exactly once (counted in the edge's store, and by the device).

use outpost::device::{self, ConnectOptions, Received};
use outpost::identity::Bundle;
use outpost::shell::queue::{QueueHandle, SendRequest};
use outpost::shell::serve::{self, RunningBox, ServeOptions};
use outpost::shell::store::{DeviceRecord, Group, Store, StoreOptions};
use outpost::shell::upstream::UplinkOptions;
use outpost::{CommandId, Outcome, SendOptions, State};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[path = "common/run.rs"]
mod run;
use run::free_port;

fn options(dir: &Path, port: u16) -> ServeOptions {
    let mut o = ServeOptions::new(dir.to_path_buf());
    o.listen = SocketAddr::from(([127, 0, 0, 1], port));
    o.limits.backoff_base_ms = 20;
    o.limits.backoff_cap_ms = 200;
    o.limits.min_free_disk = 0;
    o
}

async fn hub(dir: &Path, port: u16) -> RunningBox {
    serve::start(options(dir, port)).await.unwrap()
}

async fn edge(dir: &Path, port: u16, hub_port: u16, bundle: &Path) -> RunningBox {
    let mut o = options(dir, port);
    let mut u = UplinkOptions::new(bundle.to_path_buf(), Some(format!("127.0.0.1:{hub_port}")));
    u.min_backoff = Duration::from_millis(50);
    u.max_backoff = Duration::from_millis(300);
    u.connect_timeout = Duration::from_secs(1);
    // Small batches: a stream of many frames, so drops land mid-stream.
    u.batch = 64;
    u.max_unacked = 256;
    o.upstream = Some((u, 100_000));
    serve::start(o).await.unwrap()
}

async fn enroll(b: &RunningBox, id: &str, gateway: bool) -> Bundle {
    let mut rec = DeviceRecord::new(id);
    if gateway {
        rec.tags.push(outpost::engine::route::GATEWAY_TAG.into());
    }
    b.queue.enroll(rec).await.unwrap();
    b.identity.issue_device(id, &b.advertise).unwrap()
}

/// A device that runs each command once (it dedupes by id, as an agent
/// must) and counts every delivery.
#[derive(Default)]
struct Runs {
    deliveries: HashMap<CommandId, u32>,
    executed: HashMap<CommandId, u32>,
}

fn device(bundle: Bundle, runs: Arc<Mutex<Runs>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(mut c) = device::connect(&bundle, &ConnectOptions::default()).await {
                while let Ok(Some(m)) = c.next().await {
                    if let Received::Command(cmd) = m {
                        {
                            let mut r = runs.lock().unwrap();
                            *r.deliveries.entry(cmd.id).or_default() += 1;
                            let first = !r.executed.contains_key(&cmd.id);
                            if first {
                                r.executed.insert(cmd.id, 1);
                            }
                        }
                        if c.ack(cmd.id, Outcome::Ok(cmd.payload)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn send(q: &QueueHandle, target: &str, payload: String) -> CommandId {
    q.send(SendRequest {
        target: target.into(),
        payload: payload.into_bytes(),
        opts: SendOptions::default(),
        origin: "cli".into(),
        signature: None,
    })
    .await
    .unwrap()
    .id
}

/// Wait (bounded) until the box shows every id ended.
async fn all_end(
    q: &QueueHandle,
    ids: &[CommandId],
    what: &str,
) -> Vec<(CommandId, State, String)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut out = Vec::new();
    for &id in ids {
        loop {
            match q.show(id).await {
                Ok(v) if v.state.is_final() => {
                    out.push((id, v.state, v.device));
                    break;
                }
                _ if tokio::time::Instant::now() > deadline => {
                    panic!(
                        "{what}: command {id} did not end within {WAIT:?}: {:?}",
                        q.show(id).await
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    out
}

async fn outbox_drained(edge: &RunningBox) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = edge.queue.outbox_stats().await.unwrap();
        if s.depth == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox did not drain: {s:?}, uplink {:?}",
            edge.uplink.as_ref().map(|u| u.status())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Result records per command id in a stopped box's store.
fn results_on_disk(dir: &Path) -> HashMap<CommandId, Vec<(State, String)>> {
    let store = Store::open(dir, &StoreOptions::default()).unwrap();
    let mut out: HashMap<CommandId, Vec<(State, String)>> = HashMap::new();
    for g in store.replay() {
        if let Group::Results(_, rs) = g.unwrap() {
            for r in rs {
                out.entry(r.id).or_default().push((r.state, r.device));
            }
        }
    }
    out
}

struct World {
    _tmp: tempfile::TempDir,
    hub_dir: PathBuf,
    edge_dir: PathBuf,
    port: u16,
    /// The edge's own port, kept across its restarts (its device's bundle
    /// names it).
    edge_port: u16,
    bundle: PathBuf,
    runs: Arc<Mutex<Runs>>,
}

/// A hub with gateway `e1` enrolled (then stopped), and its bundle.
async fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hub");
    let edge_dir = tmp.path().join("edge");
    let port = free_port();
    let h = hub(&hub_dir, port).await;
    let bundle = tmp.path().join("e1.bundle");
    enroll(&h, "e1", true).await.write(&bundle).unwrap();
    h.stop().await;
    World {
        _tmp: tmp,
        hub_dir,
        edge_dir,
        port,
        edge_port: free_port(),
        bundle,
        runs: Arc::default(),
    }
}

impl World {
    fn check_device(&self, ids: &[CommandId]) {
        let r = self.runs.lock().unwrap();
        for id in ids {
            assert_eq!(r.executed.get(id), Some(&1), "{id} ran once on the device");
        }
        assert_eq!(r.executed.len(), ids.len(), "the device ran nothing else");
    }

    /// Both boxes stopped: each id has one result on the edge and one on
    /// the hub, where it names the edge's device.
    fn check_stores(&self, ids: &[CommandId]) {
        let edge = results_on_disk(&self.edge_dir);
        let hub = results_on_disk(&self.hub_dir);
        for id in ids {
            assert_eq!(
                edge.get(id).map(|v| v.len()),
                Some(1),
                "{id} ended once on the edge: {:?}",
                edge.get(id)
            );
            assert_eq!(
                hub.get(id),
                Some(&vec![(State::Succeeded, "e1/d0".to_string())]),
                "{id} recorded once on the hub"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_offline_for_its_whole_backlog_catches_up_then_takes_commands_down() {
    let w = world().await;
    // The edge starts with its hub down and works on its own.
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let dev = device(enroll(&e, "d0", false).await, w.runs.clone());
    let mut local = Vec::new();
    for i in 0..300 {
        local.push(send(&e.queue, "d0", format!("local-{i}")).await);
    }
    all_end(&e.queue, &local, "edge").await;
    let mut status = e.uplink.as_ref().unwrap().watch();
    let st = tokio::time::timeout(WAIT, status.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("the uplink says why it is down")
        .unwrap()
        .clone();
    assert_ne!(
        st.state,
        outpost::shell::upstream::UplinkState::Connected,
        "{st:?}"
    );
    let depth = e.queue.outbox_stats().await.unwrap().depth;
    assert!(depth >= 300, "the backlog waits in the outbox: {depth}");

    // The hub comes back: the backlog goes up, and commands come down.
    let h = hub(&w.hub_dir, w.port).await;
    let seen = all_end(&h.queue, &local, "hub").await;
    assert!(
        seen.iter()
            .all(|(_, s, d)| *s == State::Succeeded && d == "e1/d0"),
        "{seen:?}"
    );
    outbox_drained(&e).await;
    let st = e.uplink.as_ref().unwrap().status();
    assert_eq!(st.state, outpost::shell::upstream::UplinkState::Connected);
    assert!(st.last_sync.is_some() && st.synced_total >= 300, "{st:?}");

    let mut down = Vec::new();
    for i in 0..100 {
        down.push(send(&h.queue, "e1/d0", format!("down-{i}")).await);
    }
    // A broadcast and a cap target on the edge go through too.
    let ended = all_end(&h.queue, &down, "hub").await;
    assert!(
        ended
            .iter()
            .all(|(_, s, d)| *s == State::Succeeded && d == "e1/d0"),
        "{ended:?}"
    );
    // A broadcast and an any-capable target on the edge, from the hub.
    e.queue
        .relabel(outpost::engine::queue::core::Relabel {
            device: "d0".into(),
            add_tags: vec!["line".into()],
            add_caps: vec!["cam".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let b = send(&h.queue, "e1/tag:line", "all".into()).await;
    let c = send(&h.queue, "e1/cap:cam", "any".into()).await;
    let ended = all_end(&h.queue, &[b, c], "hub").await;
    assert!(
        ended.iter().all(|(_, s, _)| *s == State::Succeeded),
        "{ended:?}"
    );
    let v = h.queue.show(b).await.unwrap();
    assert_eq!(v.children.len(), 1, "{v:?}");
    assert_eq!(v.children[0].device, "e1/d0");
    down.extend([v.children[0].id, c]);
    let v = h.queue.show(down[0]).await.unwrap();
    assert_eq!(v.outcome, Some(Outcome::Ok(b"down-0".to_vec())));
    let devices = h.queue.devices().await.unwrap();
    assert!(
        devices.iter().any(|d| d.record.id == "e1/d0" && d.online),
        "the edge's device shows online on the hub: {devices:?}"
    );
    outbox_drained(&e).await;

    dev.abort();
    h.stop().await;
    e.stop().await;
    let all: Vec<CommandId> = local.iter().chain(&down).copied().collect();
    w.check_device(&all);
    w.check_stores(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_drops_and_restarts_mid_stream_repeat_and_lose_nothing() {
    let w = world().await;
    let mut h = hub(&w.hub_dir, w.port).await;
    let mut e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let bundle = enroll(&e, "d0", false).await;
    let dev = device(bundle, w.runs.clone());
    let mut ids = Vec::new();
    for round in 0..4 {
        for i in 0..150 {
            ids.push(send(&h.queue, "e1/d0", format!("down-{round}-{i}")).await);
            ids.push(send(&e.queue, "d0", format!("local-{round}-{i}")).await);
            if i % 40 == 20 {
                // The hub drops the edge's connection mid-stream.
                h.link.disconnect("e1");
            }
        }
        match round {
            // Each side restarts with records in flight.
            1 => {
                h.stop().await;
                h = hub(&w.hub_dir, w.port).await;
            }
            2 => {
                e.stop().await;
                e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
            }
            _ => {}
        }
    }
    let ended = all_end(&h.queue, &ids, "hub").await;
    assert!(
        ended
            .iter()
            .all(|(_, s, d)| *s == State::Succeeded && d == "e1/d0"),
        "{:?}",
        ended
            .iter()
            .find(|x| x.1 != State::Succeeded || x.2 != "e1/d0")
    );
    outbox_drained(&e).await;
    dev.abort();
    h.stop().await;
    e.stop().await;
    w.check_device(&ids);
    w.check_stores(&ids);
}

/// `send e1/workflow FILE` on the hub (issue 14): the edge runs the whole
/// workflow itself. Sent while the edge is away, taken when it comes, and
/// finished with its hub down; the hub learns the end once, as the result
/// of the command it sent, with every step in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_handed_to_an_edge_runs_there_offline_and_reports_once() {
    let w = world().await;
    let dir = w._tmp.path().join("wf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("blob.bin"), [0u8, 159, 146, 150]).unwrap();
    let file = dir.join("job.toml");
    std::fs::write(
        &file,
        r#"name = "handed"
[steps.stop]
target = "d0"
payload = "stop"
[steps.flash]
target = "d0"
payload_file = "blob.bin"
needs = ["stop"]
[steps.start]
target = "d0"
payload = "start"
needs = ["flash"]
when = { step = "flash", state = "succeeded" }
"#,
    )
    .unwrap();
    let packed = outpost::engine::workflow::Packed::read(&file).unwrap();

    // The edge has its device, then goes away: the hub keeps the
    // workflow for it.
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let d0 = enroll(&e, "d0", false).await;
    e.stop().await;
    let h = hub(&w.hub_dir, w.port).await;
    let id = h
        .queue
        .send(SendRequest {
            target: "e1/workflow".into(),
            payload: packed.to_bytes(),
            opts: SendOptions::default(),
            origin: "cli".into(),
            signature: None,
        })
        .await
        .unwrap()
        .id;

    // The edge comes, takes it, and loses its hub at once.
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while e.workflows.show(id).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge never took the workflow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
    let dev = device(d0, w.runs.clone());
    let run = loop {
        let v = e.workflows.show(id).await.unwrap();
        if v.state != "running" {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not end: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(run.state, "succeeded", "{run:?}");
    assert!(run.steps.iter().all(|s| s.state == "succeeded"), "{run:?}");
    let flash = run.steps.iter().find(|s| s.name == "flash").unwrap();
    let flash_id = flash.command.unwrap();

    // The hub returns: the end goes up, as the result of its command.
    let h = hub(&w.hub_dir, w.port).await;
    let ended = all_end(&h.queue, &[id], "hub").await;
    assert_eq!(ended[0].1, State::Succeeded, "{ended:?}");
    let v = h.queue.show(id).await.unwrap();
    let Some(Outcome::Ok(body)) = v.outcome else {
        panic!("the hub has the run as the command's result: {v:?}")
    };
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["state"], "succeeded");
    assert_eq!(j["steps"].as_array().unwrap().len(), 3, "{j}");
    outbox_drained(&e).await;
    dev.abort();
    h.stop().await;
    e.stop().await;

    // Each step ran once on the device, the binary payload intact; the
    // hub recorded the workflow's end once.
    let r = w.runs.lock().unwrap();
    assert_eq!(r.executed.len(), 3, "{:?}", r.executed);
    assert!(r.executed.values().all(|&n| n == 1));
    assert!(r.executed.contains_key(&flash_id));
    drop(r);
    let hub_results = results_on_disk(&w.hub_dir);
    assert_eq!(
        hub_results.get(&id),
        Some(&vec![(State::Succeeded, "e1/workflow".to_string())]),
        "the workflow's end is on the hub once"
    );
    // The steps went up too, as the edge's commands.
    assert_eq!(
        hub_results.get(&flash_id).map(|v| v.len()),
        Some(1),
        "{:?}",
        hub_results.get(&flash_id)
    );
}

/// A device for rollouts: it runs each command once and answers failed if
/// `fails`, noting in `ran` each command it ran.
fn rollout_device(
    bundle: Bundle,
    fails: bool,
    ran: Arc<Mutex<Vec<(String, CommandId)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let me = bundle.id.clone();
        loop {
            if let Ok(mut c) = device::connect(&bundle, &ConnectOptions::default()).await {
                while let Ok(Some(m)) = c.next().await {
                    if let Received::Command(cmd) = m {
                        {
                            let mut r = ran.lock().unwrap();
                            if !r.iter().any(|(_, id)| *id == cmd.id) {
                                r.push((me.to_string(), cmd.id));
                            }
                        }
                        let outcome = if fails {
                            Outcome::Failed {
                                code: 1,
                                message: "flash failed".into(),
                            }
                        } else {
                            Outcome::Ok(b"ok".to_vec())
                        };
                        if c.ack(cmd.id, outcome).await.is_err() {
                            break;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_handed_to_an_edge_cut_off_from_its_hub_aborts_there_and_the_hub_learns_it() {
    let w = world().await;
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let mut bundles = Vec::new();
    for i in 0..6 {
        let id = format!("d{i}");
        let mut rec = DeviceRecord::new(id.as_str());
        rec.tags.push("line".into());
        e.queue.enroll(rec).await.unwrap();
        bundles.push(e.identity.issue_device(&id, &e.advertise).unwrap());
    }
    let h = hub(&w.hub_dir, w.port).await;
    // Wait for the edge's uplink: the hub starts only edges that are there.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !h
        .queue
        .devices()
        .await
        .unwrap()
        .iter()
        .any(|d| d.record.id.as_str() == "e1" && d.online)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One device at a time on the edge; any failure over 30 % once three
    // finished aborts it there; an edge that aborts fails the hub's.
    let rule = |percent, min| outpost::engine::rollout::AbortRule {
        on: outpost::engine::rollout::FailKind::Any,
        percent,
        min,
    };
    let plan = outpost::engine::rollout::Plan {
        name: "fw".into(),
        target: vec!["e1/tag:line".into()],
        payload: b"flash".to_vec(),
        artifact: None,
        priority: outpost::Priority::Normal,
        max_attempts: 1,
        canary: None,
        rate: None,
        parallel: Some(1),
        abort: vec![rule(30, 3)],
        timeout: None,
        success: None,
        health: None,
        on_abort: None,
        edges: Some(outpost::engine::rollout::EdgePlan {
            abort: vec![rule(50, 1)],
            ..Default::default()
        }),
    };
    let hv = h.rollouts.start_rollout(plan).await.unwrap();
    assert_eq!(
        hv.devices.len(),
        1,
        "the hub's rollout has one edge: {hv:?}"
    );

    // The edge takes it, then loses its hub; its devices come only now.
    let ev = loop {
        if let Some(v) = e.rollouts.list().await.into_iter().next() {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge never took the rollout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    h.stop().await;
    assert_eq!(ev.target, vec!["tag:line"], "{ev:?}");
    // They connect one by one, so the order they start in is known (a
    // rollout starts the devices that are online).
    let ran = Arc::new(Mutex::new(Vec::new()));
    let mut devs = Vec::new();
    for (i, b) in bundles.into_iter().enumerate() {
        let id = b.id.clone();
        devs.push(rollout_device(b, i == 1 || i == 2, ran.clone()));
        while !e
            .queue
            .devices()
            .await
            .unwrap()
            .iter()
            .any(|d| d.record.id == id && d.online)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never connected"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let ev = loop {
        let v = e.rollouts.show(ev.id).await.unwrap();
        if v.state == "aborted" {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge's rollout did not abort: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ev.count("failed"), 2, "{ev:?}");
    assert_eq!(ev.count("succeeded"), 1, "{ev:?}");
    assert_eq!(ev.count("cancelled"), 3, "{ev:?}");
    let who: Vec<String> = ran.lock().unwrap().iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(
        who,
        ["d0", "d1", "d2"],
        "no device beyond the three started got it"
    );

    // The hub returns and learns the edge's abort, as its edge's end.
    // In one process the stopped hub's UDP socket can stay bound for a
    // while (~20 s here: quinn keeps it while a closed connection drains),
    // which a restarted process never meets; wait for it, bounded.
    let t0 = std::time::Instant::now();
    while std::net::UdpSocket::bind(("127.0.0.1", w.port)).is_err() {
        assert!(t0.elapsed() < WAIT, "the hub's port was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h = hub(&w.hub_dir, w.port).await;
    let hv = loop {
        let v = h.rollouts.show(hv.id).await.unwrap();
        if v.state == "aborted" {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub never learnt it: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(hv.devices[0].device, "e1");
    assert_eq!(hv.devices[0].state, "failed", "{hv:?}");
    let r: serde_json::Value =
        serde_json::from_str(hv.devices[0].result.as_deref().unwrap()).unwrap();
    assert_eq!(r["state"], "aborted", "the edge's own view came up: {r}");
    assert_eq!(r["counts"]["cancelled"], 3, "{r}");
    for d in devs {
        d.abort();
    }
    h.stop().await;
    e.stop().await;
}

/// A signed request for `target` on the hub, meant for `audience`.
fn signed(
    key: &outpost::engine::trust::OperatorKey,
    target: &str,
    payload: &str,
    audience: &str,
) -> SendRequest {
    use outpost::engine::trust::{envelope, Claims};
    let now = outpost::now_millis();
    let claims = Claims {
        id: CommandId::new(now, rand::random()),
        target: target.into(),
        payload_sha256: envelope::payload_digest(payload.as_bytes()),
        artifact: None,
        priority: outpost::Priority::Normal,
        not_before: None,
        expires_at: now + 3_600_000,
        audience: audience.into(),
        key_id: key.public.id,
    };
    SendRequest {
        target: target.into(),
        payload: payload.as_bytes().to_vec(),
        opts: SendOptions::default(),
        origin: "cli".into(),
        signature: Some(envelope::seal(&claims, key).unwrap()),
    }
}

async fn trust(b: &RunningBox, key: &outpost::engine::trust::OperatorKey) {
    b.queue
        .edit_trust(outpost::engine::trust::TrustEdit::Add {
            public: key.public.to_openssh(),
            name: None,
            grant: outpost::engine::trust::Grant::new(outpost::engine::trust::Role::Operator),
        })
        .await
        .unwrap();
}

/// Replace `from` by `to` (same length) in every value of a stopped box's
/// database: an attacker with the hub's disk.
fn tamper(dir: &Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let db = sled::open(dir.join("db")).unwrap();
    let mut n = 0;
    for name in db.tree_names() {
        let t = db.open_tree(&name).unwrap();
        for kv in t.iter() {
            let (k, v) = kv.unwrap();
            if let Some(at) = v.windows(from.len()).position(|w| w == from) {
                let mut v = v.to_vec();
                v[at..at + from.len()].copy_from_slice(to);
                t.insert(k, v).unwrap();
                n += 1;
            }
        }
    }
    db.flush().unwrap();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_hub_cannot_forge_or_change_a_signed_command_the_edge_refuses_it() {
    let w = world().await;
    let alice = outpost::engine::trust::OperatorKey::generate("alice").unwrap();
    let mallory = outpost::engine::trust::OperatorKey::generate("mallory").unwrap();
    let mut o = options(&w.hub_dir, w.port);
    o.require_signed = true;
    o.name = Some("hub".into());
    let h = serve::start(o).await.unwrap();
    trust(&h, &alice).await;
    let e = {
        let mut o = options(&w.edge_dir, w.edge_port);
        let mut u = UplinkOptions::new(w.bundle.clone(), Some(format!("127.0.0.1:{}", w.port)));
        u.min_backoff = Duration::from_millis(50);
        u.max_backoff = Duration::from_millis(300);
        o.upstream = Some((u, 100_000));
        o.require_signed = true;
        serve::start(o).await.unwrap()
    };
    // The edge's name is its id at the hub: the audience the hub's
    // operators sign for.
    assert_eq!(e.queue.gate().name(), "e1");
    trust(&e, &alice).await;
    let dev = device(enroll(&e, "d0", false).await, w.runs.clone());

    // A good signed command goes down and runs.
    let good = h
        .queue
        .send(signed(&alice, "e1/d0", "good-1", "e1"))
        .await
        .unwrap()
        .id;
    let ended = all_end(&h.queue, &[good], "hub").await;
    assert_eq!(ended[0].1, State::Succeeded, "{ended:?}");

    // The hub is taken over: the attacker trusts their own key there and
    // sends with it; the edge, with its own trust set, refuses.
    trust(&h, &mallory).await;
    let forged = h
        .queue
        .send(signed(&mallory, "e1/d0", "evil-1", "e1"))
        .await
        .unwrap()
        .id;
    let ended = all_end(&h.queue, &[forged], "hub").await;
    let v = h.queue.show(forged).await.unwrap();
    assert_ne!(ended[0].1, State::Succeeded, "{v:?}");
    let why = format!("{v:?}");
    assert!(why.contains("does not trust"), "{why}");

    // The attacker changes a queued signed command's payload on the hub's
    // disk; the edge refuses it as changed in flight.
    e.stop().await;
    let changed = h
        .queue
        .send(signed(&alice, "e1/d0", "reboot-2", "e1"))
        .await
        .unwrap()
        .id;
    h.stop().await;
    assert!(
        tamper(&w.hub_dir, b"reboot-2", b"reboot-X") > 0,
        "the payload is on the hub's disk"
    );
    let mut o = options(&w.hub_dir, w.port);
    o.name = Some("hub".into());
    let h = serve::start(o).await.unwrap();
    let e = {
        let mut o = options(&w.edge_dir, w.edge_port);
        let u = UplinkOptions::new(w.bundle.clone(), Some(format!("127.0.0.1:{}", w.port)));
        o.upstream = Some((u, 100_000));
        o.require_signed = true;
        serve::start(o).await.unwrap()
    };
    all_end(&h.queue, &[changed], "hub").await;
    let v = h.queue.show(changed).await.unwrap();
    assert_ne!(v.state, State::Succeeded, "{v:?}");
    let why = format!("{v:?}");
    assert!(why.contains("payload is not the one signed"), "{why}");

    dev.abort();
    h.stop().await;
    e.stop().await;
    // The device ran the good command only.
    w.check_device(&[good]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edges_audit_entries_reach_the_hubs_log_under_the_edges_name_once() {
    let w = world().await;
    let h = hub(&w.hub_dir, w.port).await;
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let _dev = device(enroll(&e, "d0", false).await, w.runs.clone());
    e.queue.audit(outpost::engine::audit::Note {
        at: outpost::now_millis(),
        who: "uid 1000".into(),
        from: "socket".into(),
        what: "revoke".into(),
        target: "d9".into(),
        command: None,
        payload_sha256: None,
        allowed: false,
        why: Some("no device `d9`".into()),
    });
    let id = send(&h.queue, "e1/d0", "x".into()).await;
    all_end(&h.queue, &[id], "hub").await;
    outbox_drained(&e).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let log = loop {
        let log = h.queue.audit_read(None, None).await.unwrap();
        if log.len() >= 2 || tokio::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seen: Vec<_> = log
        .iter()
        .map(|v| (v.who.as_str(), v.from.as_str(), v.what.as_str(), v.allowed))
        .collect();
    assert_eq!(
        seen,
        [
            ("e1/uid 1000", "e1/socket", "revoke", false),
            ("e1/hub", "e1/upstream", "send", true),
        ],
        "{log:?}"
    );
    assert_eq!(log[1].command, Some(id.to_string()));
    assert_eq!(log[1].target, "d0");
    e.stop().await;
    h.stop().await;
}

/// An edge whose data dir is wiped and set up again under the same bundle
/// (a replaced SD card, `rm -rf` by mistake) starts its outbox again at seq
/// 1, below the hub's cursor for it. The `UpFrom` epoch tells the hub it is
/// a new database: what the new box reports reaches the hub, and the
/// commands the hub had handed to the old one go down again and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_edge_set_up_again_reports_its_new_results_and_gets_the_old_ones_commands_again() {
    let w = world().await;
    let h = hub(&w.hub_dir, w.port).await;
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let dev = device(enroll(&e, "d0", false).await, w.runs.clone());
    let mut old = Vec::new();
    for i in 0..20 {
        old.push(send(&e.queue, "d0", format!("old-{i}")).await);
    }
    all_end(&h.queue, &old, "hub, before the wipe").await;
    outbox_drained(&e).await;
    // Commands the old box takes but never runs: its device is away.
    dev.abort();
    let _ = dev.await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while e.queue.devices().await.unwrap().iter().any(|d| d.online) {
        assert!(tokio::time::Instant::now() < deadline, "d0 stays online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(send(&h.queue, "e1/d0", format!("held-{i}")).await);
    }
    for &id in &held {
        while e.queue.show(id).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the edge never took {id}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let the hub take the edge's `Accepted`s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    e.stop().await;
    std::fs::remove_dir_all(&w.edge_dir).unwrap();

    // Set up again: d0 enrolled before the uplink starts, so nothing the
    // hub sends down meets a box that does not know d0 yet.
    let fresh = serve::start(options(&w.edge_dir, w.edge_port))
        .await
        .unwrap();
    let bundle = enroll(&fresh, "d0", false).await;
    fresh.stop().await;
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let runs: Arc<Mutex<Runs>> = Arc::default();
    let dev = device(bundle, runs.clone());
    let mut new = Vec::new();
    for i in 0..5 {
        new.push(send(&e.queue, "d0", format!("new-{i}")).await);
    }
    let both: Vec<CommandId> = held.iter().chain(&new).copied().collect();
    let ended = all_end(&h.queue, &both, "hub, after the wipe").await;
    for (id, state, device) in &ended {
        assert_eq!(
            (state, device.as_str()),
            (&State::Succeeded, "e1/d0"),
            "{id}"
        );
    }
    outbox_drained(&e).await;
    dev.abort();
    e.stop().await;
    h.stop().await;
    let r = runs.lock().unwrap();
    for id in &both {
        assert_eq!(r.executed.get(id), Some(&1), "{id} ran once on the new box");
    }
    let hub = results_on_disk(&w.hub_dir);
    for id in old.iter().chain(&both) {
        assert_eq!(
            hub.get(id).map(Vec::len),
            Some(1),
            "{id} recorded once on the hub"
        );
    }
}

/// Device `d0` of edge `e` connects at last and is sent a marker: once
/// the marker ended, the commands it was ever given, and the marker.
async fn device_comes(w: &World, e: &RunningBox, d0: Bundle) -> (CommandId, Vec<CommandId>) {
    let dev = device(d0, w.runs.clone());
    let marker = send(&e.queue, "d0", "after".into()).await;
    all_end(&e.queue, &[marker], "edge").await;
    dev.abort();
    let got = w.runs.lock().unwrap().deliveries.keys().copied().collect();
    (marker, got)
}

/// A command the hub handed down is cancelled from the hub: the cancel is
/// asked of the edge, kept on the hub's disk until the edge confirms (the
/// hub restarts in between, with the edge away), and the edge's device
/// never runs it. The command ends Cancelled on both boxes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_cancel_of_a_handed_down_command_reaches_the_edge_across_a_hub_restart() {
    let w = world().await;
    let h = hub(&w.hub_dir, w.port).await;
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    // d0 is enrolled on the edge but not connected: the command waits there.
    let d0 = enroll(&e, "d0", false).await;
    let id = send(&h.queue, "e1/d0", "not-yet".into()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while e.queue.show(id).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never handed down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The edge's word that it holds it (its answer, and the state it
    // sends up after) has reached the hub: a drop before that puts the
    // command back in the hub's queue, where a cancel is the hub's alone.
    outbox_drained(&e).await;
    // The edge goes away; the hub's cancel must wait for it.
    e.stop().await;
    let v = h.queue.cancel(id).await.unwrap();
    assert!(!v.state.is_final(), "the edge holds it: {v:?}");
    assert!(
        v.error
            .as_deref()
            .is_some_and(|m| m.contains("cancel sent to `e1`")),
        "{v:?}"
    );
    h.stop().await;
    assert!(
        Store::open(&w.hub_dir, &StoreOptions::default())
            .unwrap()
            .cancel_marks()
            .unwrap()
            .contains(&id),
        "the pending cancel is on the hub's disk"
    );
    // Both come back; the hub asks again at the edge's connect, and only
    // then does the device connect.
    let h = hub(&w.hub_dir, w.port).await;
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let ended = all_end(&h.queue, &[id], "hub").await;
    assert_eq!(ended[0].1, State::Cancelled, "{ended:?}");
    assert_eq!(e.queue.show(id).await.unwrap().state, State::Cancelled);
    let (_, got) = device_comes(&w, &e, d0).await;
    assert!(
        !got.contains(&id),
        "the device never got the cancelled command"
    );
    outbox_drained(&e).await;
    e.stop().await;
    h.stop().await;
    assert!(
        Store::open(&w.hub_dir, &StoreOptions::default())
            .unwrap()
            .cancel_marks()
            .unwrap()
            .is_empty(),
        "the mark went with the command"
    );
    let hub_results = results_on_disk(&w.hub_dir);
    assert_eq!(
        hub_results
            .get(&id)
            .map(|v| v.iter().map(|r| r.0).collect::<Vec<_>>()),
        Some(vec![State::Cancelled]),
        "ended once on the hub"
    );
}

/// A hub restarted cannot know whether it forwarded a command before (it
/// does not journal forwarding, and a link lost before the edge's
/// `Accepted` leaves the edge holding one the hub has in its queue): its
/// cancel is the edge's to decide. The edge, which never got this one,
/// takes the cancel (and the forward the hub sends at the same connect,
/// in either order) without running it, and the command ends Cancelled on
/// both boxes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_cancel_after_a_restart_is_decided_by_the_edge_which_never_runs_it() {
    let w = world().await;
    // d0 is enrolled on the edge first (with the hub away), so the forward
    // has a device to queue for whichever frame comes first.
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let d0 = enroll(&e, "d0", false).await;
    e.stop().await;
    let h = hub(&w.hub_dir, w.port).await;
    let id = send(&h.queue, "e1/d0", "never".into()).await;
    h.stop().await;
    let h = hub(&w.hub_dir, w.port).await;
    let v = h.queue.cancel(id).await.unwrap();
    assert!(!v.state.is_final(), "the edge may hold it: {v:?}");
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let ended = all_end(&h.queue, &[id], "hub").await;
    assert_eq!(ended[0].1, State::Cancelled, "{ended:?}");
    assert_eq!(e.queue.show(id).await.unwrap().state, State::Cancelled);
    let (_, got) = device_comes(&w, &e, d0).await;
    assert!(!got.contains(&id), "the device never got it");
    outbox_drained(&e).await;
    e.stop().await;
    h.stop().await;
    let on_hub = results_on_disk(&w.hub_dir);
    assert_eq!(
        on_hub
            .get(&id)
            .map(|v| v.iter().map(|r| r.0).collect::<Vec<_>>()),
        Some(vec![State::Cancelled]),
        "ended once on the hub"
    );
    assert_eq!(
        results_on_disk(&w.edge_dir).get(&id).map(Vec::len),
        Some(1),
        "ended once on the edge"
    );
}

/// The hub cancels a workflow it handed to an edge: the edge cancels the
/// run (its running step's command with it, before the device, offline,
/// ever gets it), and the run's end comes up as the command's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_cancel_of_a_handed_down_workflow_cancels_the_run_on_the_edge() {
    let w = world().await;
    let h = hub(&w.hub_dir, w.port).await;
    let e = edge(&w.edge_dir, w.edge_port, w.port, &w.bundle).await;
    let d0 = enroll(&e, "d0", false).await;
    let id = h
        .queue
        .send(SendRequest {
            target: "e1/workflow".into(),
            payload: b"name = \"long\"\n[steps.a]\ntarget = \"d0\"\npayload = \"a\"\n[steps.b]\ntarget = \"d0\"\npayload = \"b\"\nneeds = [\"a\"]\n".to_vec(),
            opts: SendOptions::default(),
            origin: "cli".into(),
            signature: None,
        })
        .await
        .unwrap()
        .id;
    let deadline = tokio::time::Instant::now() + WAIT;
    let step = loop {
        if let Some(c) = e
            .workflows
            .show(id)
            .await
            .and_then(|v| v.steps.first().and_then(|s| s.command))
        {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge never sent step a"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    h.queue.cancel(id).await.unwrap();
    let ended = all_end(&h.queue, &[id], "hub").await;
    assert_eq!(ended[0].1, State::Cancelled, "{ended:?}");
    let run = e.workflows.show(id).await.unwrap();
    assert_eq!(run.state, "cancelled", "{run:?}");
    assert_eq!(
        run.steps
            .iter()
            .map(|s| s.state.as_str())
            .collect::<Vec<_>>(),
        ["cancelled", "cancelled"],
        "{run:?}"
    );
    assert_eq!(e.queue.show(step).await.unwrap().state, State::Cancelled);
    // The device comes: it never gets either step.
    let (marker, got) = device_comes(&w, &e, d0).await;
    assert_eq!(got, vec![marker], "only the marker ran");
    e.stop().await;
    h.stop().await;
}

/// A hub above a hub (issue 28): top → `m1` → `e1` → `d0`, and `d1` on
/// `m1` itself. Commands from the top to `m1/e1/d0` cross two uplinks,
/// with both links dropped mid-stream and the middle box restarted; each
/// runs once on its device and ends once on every box it passed, naming
/// its device by the whole path. A cancel from the top of a command the
/// bottom box holds is decided there and ends Cancelled on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_above_a_hub_carries_commands_down_two_tiers_and_results_up_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (top_dir, mid_dir, low_dir) = (
        tmp.path().join("top"),
        tmp.path().join("mid"),
        tmp.path().join("low"),
    );
    let (top_port, mid_port, low_port) = (free_port(), free_port(), free_port());
    let top = hub(&top_dir, top_port).await;
    let m1 = tmp.path().join("m1.bundle");
    enroll(&top, "m1", true).await.write(&m1).unwrap();
    let mut mid = edge(&mid_dir, mid_port, top_port, &m1).await;
    let e1 = tmp.path().join("e1.bundle");
    enroll(&mid, "e1", true).await.write(&e1).unwrap();
    let low = edge(&low_dir, low_port, mid_port, &e1).await;
    let (runs0, runs1) = (Arc::<Mutex<Runs>>::default(), Arc::<Mutex<Runs>>::default());
    let dev0 = device(enroll(&low, "d0", false).await, runs0.clone());
    let dev1 = device(enroll(&mid, "d1", false).await, runs1.clone());

    let (mut deep, mut near, mut own) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        for i in 0..60 {
            deep.push(send(&top.queue, "m1/e1/d0", format!("deep-{round}-{i}")).await);
            if i % 2 == 0 {
                near.push(send(&top.queue, "m1/d1", format!("near-{round}-{i}")).await);
                own.push(send(&mid.queue, "e1/d0", format!("own-{round}-{i}")).await);
            }
            if i % 25 == 10 {
                top.link.disconnect("m1");
                mid.link.disconnect("e1");
            }
        }
        if round == 1 {
            // The middle box restarts with records in flight both ways.
            mid.stop().await;
            mid = edge(&mid_dir, mid_port, top_port, &m1).await;
        }
    }
    let ended = all_end(&top.queue, &deep, "top").await;
    let wrong = ended
        .iter()
        .find(|(_, s, d)| *s != State::Succeeded || d != "m1/e1/d0");
    assert!(wrong.is_none(), "{wrong:?}");
    let ended = all_end(&top.queue, &near, "top").await;
    let wrong = ended
        .iter()
        .find(|(_, s, d)| *s != State::Succeeded || d != "m1/d1");
    assert!(wrong.is_none(), "{wrong:?}");
    let ended = all_end(&mid.queue, &own, "mid").await;
    let wrong = ended
        .iter()
        .find(|(_, s, d)| *s != State::Succeeded || d != "e1/d0");
    assert!(wrong.is_none(), "{wrong:?}");
    let v = top.queue.show(deep[0]).await.unwrap();
    assert_eq!(v.outcome, Some(Outcome::Ok(b"deep-0-0".to_vec())));
    // A broadcast two tiers down names its children by the whole path,
    // and the top sees the devices of both boxes below it online.
    low.queue
        .relabel(outpost::engine::queue::core::Relabel {
            device: "d0".into(),
            add_tags: vec!["line".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let b = send(&top.queue, "m1/e1/tag:line", "all".into()).await;
    let ended = all_end(&top.queue, &[b], "top").await;
    assert_eq!(ended[0].1, State::Succeeded, "{ended:?}");
    let v = top.queue.show(b).await.unwrap();
    let children: Vec<_> = v.children.iter().map(|c| c.device.as_str()).collect();
    assert_eq!(children, ["m1/e1/d0"], "{v:?}");
    deep.push(v.children[0].id);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let devices = top.queue.devices().await.unwrap();
        let online = |id: &str| devices.iter().any(|d| d.record.id == id && d.online);
        if online("m1/e1/d0") && online("m1/d1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the devices below show online on the top: {devices:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A cancel from the top of a command the bottom box holds for a
    // device that is away.
    let dx = enroll(&low, "dx", false).await;
    let id = send(&top.queue, "m1/e1/dx", "never".into()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while low.queue.show(id).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never handed down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    outbox_drained(&low).await;
    outbox_drained(&mid).await;
    let v = top.queue.cancel(id).await.unwrap();
    assert!(!v.state.is_final(), "a box below holds it: {v:?}");
    let ended = all_end(&top.queue, &[id], "top").await;
    assert_eq!(ended[0].1, State::Cancelled, "{ended:?}");
    for (name, q) in [("mid", &mid.queue), ("low", &low.queue)] {
        let s = q.show(id).await.unwrap().state;
        assert_eq!(s, State::Cancelled, "on {name}");
    }
    let dev = device(dx, Arc::default());
    let marker = send(&low.queue, "dx", "after".into()).await;
    all_end(&low.queue, &[marker], "low").await;
    dev.abort();

    outbox_drained(&low).await;
    outbox_drained(&mid).await;
    dev0.abort();
    dev1.abort();
    low.stop().await;
    mid.stop().await;
    top.stop().await;
    for (runs, ids) in [
        (&runs0, deep.iter().chain(&own)),
        (&runs1, near.iter().chain(&[])),
    ] {
        let r = runs.lock().unwrap();
        let ids: Vec<_> = ids.collect();
        for id in &ids {
            assert_eq!(r.executed.get(id), Some(&1), "{id} ran once");
        }
        assert_eq!(r.executed.len(), ids.len(), "nothing else ran");
    }
    let (on_top, on_mid, on_low) = (
        results_on_disk(&top_dir),
        results_on_disk(&mid_dir),
        results_on_disk(&low_dir),
    );
    let once = |on: &HashMap<CommandId, Vec<(State, String)>>, id: &CommandId, box_: &str| {
        assert_eq!(
            on.get(id).map(Vec::len),
            Some(1),
            "{id} ended once on {box_}: {:?}",
            on.get(id)
        );
    };
    for id in deep.iter().chain(&[id]) {
        once(&on_top, id, "top");
        once(&on_mid, id, "mid");
        once(&on_low, id, "low");
    }
    for id in &near {
        once(&on_top, id, "top");
        once(&on_mid, id, "mid");
    }
    for id in &own {
        once(&on_mid, id, "mid");
        once(&on_low, id, "low");
        assert!(!on_top.contains_key(id) || on_top[id].len() == 1, "{id}");
    }
}

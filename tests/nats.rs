//! An edge under a 3-node NATS JetStream cluster on 127.0.0.1 (issue 13),
//! started by the test from Debian's `nats-server` (installed by .ci/run;
//! each test is skipped with a message where it is missing). Commands are
//! published by a plain NATS client — no outpost code on that side — so the
//! subject scheme of the README is what is tested.

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use outpost::device::{self, ConnectOptions, Received};
use outpost::identity::Bundle;
use outpost::shell::queue::SendRequest;
use outpost::shell::serve::{self, RunningBox, ServeOptions};
use outpost::shell::store::DeviceRecord;
use outpost::shell::upstream::nats::NatsOptions;
use outpost::{CommandId, Outcome, SendOptions};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common/nats_cluster.rs"]
mod nats_cluster;
use nats_cluster::{nats_server, Cluster};

const WAIT: Duration = Duration::from_secs(90);

/// One cluster at a time: three servers per test on a 2-core CI machine
/// are enough; twelve starve each other's elections.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// `outpost fleet init --replicas 3` with the binary: the operator's way.
fn fleet(urls: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("fleet")
        .args(args)
        .args(["--nats", urls])
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run outpost fleet")
}

async fn edge(dir: &Path, urls: &str, name: &str) -> RunningBox {
    let mut o = ServeOptions::new(dir.to_path_buf());
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.limits.min_free_disk = 0;
    o.limits.backoff_base_ms = 20;
    o.limits.backoff_cap_ms = 200;
    let mut n = NatsOptions::new(urls.into(), name.into());
    n.min_backoff = Duration::from_millis(100);
    n.max_backoff = Duration::from_millis(500);
    n.connect_timeout = Duration::from_secs(2);
    n.batch = 64;
    n.max_unacked = 128;
    o.nats = Some((n, 100_000));
    serve::start(o).await.unwrap()
}

/// An echo device that counts what it ran (deduping by id, as an agent
/// must) and every delivery.
#[derive(Default)]
struct Runs {
    executed: HashMap<CommandId, u32>,
    deliveries: u64,
}

fn device(bundle: Bundle, runs: Arc<Mutex<Runs>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(mut c) = device::connect(&bundle, &ConnectOptions::default()).await {
                while let Ok(Some(m)) = c.next().await {
                    if let Received::Command(cmd) = m {
                        {
                            let mut r = runs.lock().unwrap();
                            r.deliveries += 1;
                            r.executed.entry(cmd.id).or_insert(1);
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

async fn enroll(b: &RunningBox, id: &str) -> Bundle {
    b.queue.enroll(DeviceRecord::new(id)).await.unwrap();
    b.identity.issue_device(id, &b.advertise).unwrap()
}

/// A plain NATS client, as any fleet tool would use.
async fn plain(urls: &str) -> jetstream::Context {
    let servers: Vec<&str> = urls.split(',').collect();
    let c = async_nats::connect(servers).await.expect("connect to NATS");
    jetstream::new(c)
}

/// Publish a command, retrying (same headers: deduped) while a node is
/// down.
async fn publish(js: &jetstream::Context, subject: &str, id: Option<&str>, body: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut h = async_nats::HeaderMap::new();
        if let Some(id) = id {
            h.insert("Outpost-Id", id);
            h.insert("Nats-Msg-Id", id);
        }
        let r = match js
            .publish_with_headers(subject.to_string(), h, body.to_string().into())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot publish {subject}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Every result message on the UP stream for `edge`, by Outpost-Id:
/// (count, body of the first).
async fn results_upstream(js: &jetstream::Context, edge: &str) -> HashMap<String, (u32, String)> {
    // While a node is down the cluster may take a while to answer (its
    // stream leaders move): ask again, within bounds.
    let deadline = Instant::now() + WAIT;
    let mut msgs = loop {
        let attempt = async {
            let stream = js.get_stream("OUTPOST_UP").await?;
            let cons = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: format!("outpost.up.{edge}.result"),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await?;
            anyhow::Ok(cons.messages().await?)
        };
        match attempt.await {
            Ok(m) => break m,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot read OUTPOST_UP: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut out: HashMap<String, (u32, String)> = HashMap::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(1500), msgs.next()).await
    {
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Outpost-Id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let e = out
            .entry(id)
            .or_insert((0, String::from_utf8_lossy(&m.payload).into()));
        e.0 += 1;
    }
    out
}

async fn outbox_drained(b: &RunningBox) {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = b.queue.outbox_stats().await.unwrap();
        if s.depth == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox did not drain: {s:?}, uplink {:?}",
            b.uplink.as_ref().map(|u| u.status())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "{what} within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait (bounded) until each of `ids` has a result on `OUTPOST_UP`.
async fn every_result_up(js: &jetstream::Context, ids: &[String]) {
    wait_until("every result comes up", || async {
        let r = results_upstream(js, "e1").await;
        ids.iter().all(|id| r.contains_key(id))
    })
    .await;
}

/// Enroll `id` on the box and run an echo device for it.
async fn with_device(b: &RunningBox, id: &str) -> (Arc<Mutex<Runs>>, tokio::task::JoinHandle<()>) {
    let runs = Arc::new(Mutex::new(Runs::default()));
    let dev = device(enroll(b, id).await, runs.clone());
    (runs, dev)
}

fn init_streams(urls: &str) {
    let o = fleet(urls, &["init", "--replicas", "3"]);
    assert!(
        o.status.success(),
        "fleet init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("OUTPOST_CMD") && out.contains("OUTPOST_UP"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_nats_client_sends_and_reads_the_result_once_and_fleet_init_is_idempotent() {
    let Some(bin) = nats_server() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&bin, tmp.path());
    let urls = cluster.urls();
    // Before the streams exist, the edge says so and works on.
    let e = edge(&tmp.path().join("e1"), &urls, "e1").await;
    let mut status = e.uplink.as_ref().unwrap().watch();
    let st = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| {
            s.last_error
                .as_ref()
                .is_some_and(|e| e.contains("fleet init"))
        }),
    )
    .await
    .expect("the edge names the missing streams")
    .unwrap()
    .clone();
    assert_ne!(
        st.state,
        outpost::shell::upstream::UplinkState::Connected,
        "{st:?}"
    );
    init_streams(&urls);
    // Again: nothing changes; with another shape: refused, saying how.
    let again = fleet(&urls, &["init", "--replicas", "3"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("is there"));
    let other = fleet(&urls, &["init", "--replicas", "1"]);
    assert_eq!(other.status.code(), Some(1));
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        err.contains("exists with another config") && err.contains("--replicas 3"),
        "{err}"
    );

    let (runs, dev) = with_device(&e, "d1").await;
    let js = plain(&urls).await;
    // No Outpost-Id: the edge derives one from the stream sequence.
    publish(&js, "outpost.cmd.e1.d1", None, "hello").await;
    let hello = {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = results_upstream(&js, "e1").await;
            if let Some(found) = r.into_iter().find(|(_, (_, b))| b == "hello") {
                break found;
            }
            assert!(
                Instant::now() < deadline,
                "the result came up within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (id, _) = hello;
    // A malformed command is refused with a result that says why.
    publish(&js, "outpost.cmd.e1.d1", Some("not-a-ulid"), "x").await;
    wait_until("the refusal comes up", || {
        let js = js.clone();
        async move {
            results_upstream(&js, "e1")
                .await
                .values()
                .any(|(_, b)| b.contains("not a ULID"))
        }
    })
    .await;
    // A whole workflow, as TOML text from any client: the edge runs it and
    // its end comes up as the result of that message's command.
    let wf_id = CommandId::new(1_800_000_000_000, 77).to_string();
    publish(
        &js,
        "outpost.cmd.e1.workflow",
        Some(&wf_id),
        "name = \"w\"\n[steps.a]\ntarget = \"d1\"\npayload = \"one\"\n[steps.b]\ntarget = \"d1\"\npayload = \"two\"\nneeds = [\"a\"]\n",
    )
    .await;
    wait_until("the workflow's end comes up", || {
        let js = js.clone();
        let wf_id = wf_id.clone();
        async move { results_upstream(&js, "e1").await.contains_key(&wf_id) }
    })
    .await;
    outbox_drained(&e).await;
    let all = results_upstream(&js, "e1").await;
    assert_eq!(all[&id].0, 1, "the result is on the stream once");
    let wf: serde_json::Value = serde_json::from_str(&all[&wf_id].1).unwrap();
    assert_eq!(wf["state"], "succeeded", "{wf}");
    assert_eq!(all[&wf_id].0, 1);
    let st = e.uplink.as_ref().unwrap().status();
    assert_eq!(
        st.state,
        outpost::shell::upstream::UplinkState::Connected,
        "{st:?}"
    );

    // The operator's view: fleet status and watch.
    let o = fleet(&urls, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["edges"][0]["edge"], "e1", "{v}");
    // The same without --json: a line per stream, one per edge.
    let o = fleet(&urls, &["status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.lines().any(|l| l.starts_with("edge e1 ")), "{text}");
    assert!(text.contains("3 replicas, leader "), "{text}");
    // `fleet send --wait`: the result as the edge reports it, exit 0.
    let o = {
        let urls = urls.clone();
        tokio::task::spawn_blocking(move || {
            fleet(&urls, &["send", "e1/d1", "via-fleet", "--wait", "60s"])
        })
        .await
        .unwrap()
    };
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let mut lines = out.lines();
    let first = lines.next().unwrap_or_default();
    assert!(first.ends_with(" succeeded"), "{out}");
    assert_eq!(lines.next(), Some("via-fleet"), "{out}");
    let o = fleet(
        &urls,
        &[
            "watch", "--all", "--edge", "e1", "--kind", "result", "--idle", "2s", "--json",
        ],
    );
    let watched = String::from_utf8_lossy(&o.stdout);
    assert!(
        watched.contains(&id) && watched.contains("hello"),
        "{watched}"
    );
    dev.abort();
    e.stop().await;
    assert_eq!(
        runs.lock().unwrap().executed.len(),
        4,
        "hello, two steps and the fleet send"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_mid_stream_loses_nothing() {
    let Some(bin) = nats_server() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&bin, tmp.path());
    let urls = cluster.urls();
    init_streams(&urls);
    let e = edge(&tmp.path().join("e1"), &urls, "e1").await;
    let (runs, dev) = with_device(&e, "d1").await;
    let js = plain(&urls).await;
    let ids: Vec<String> = (0..200)
        .map(|i| CommandId::new(1_800_000_000_000 + i, 9).to_string())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        if i == 80 {
            cluster.kill(1);
        }
        publish(&js, "outpost.cmd.e1.d1", Some(id), &format!("c{i}")).await;
    }
    every_result_up(&js, &ids).await;
    outbox_drained(&e).await;
    let r = results_upstream(&js, "e1").await;
    for id in &ids {
        assert_eq!(r[id].0, 1, "{id} is on the stream once");
    }
    dev.abort();
    e.stop().await;
    let runs = runs.lock().unwrap();
    assert_eq!(runs.executed.len(), ids.len(), "each ran, once");
}

/// A node that is not there (it failed to start, it is switched off):
/// `fleet init --replicas 3` waits as long as `--wait` says, then names
/// what is missing, not JetStream's config; with the node back, it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_init_with_a_node_missing_says_which_and_works_once_it_is_back() {
    let Some(bin) = nats_server() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_some(&bin, tmp.path(), 2);
    let urls = cluster.urls();
    let o = fleet(&urls, &["init", "--replicas", "3", "--wait", "2s"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("fewer than 3 JetStream servers are in the cluster"),
        "{err}"
    );
    assert!(!err.contains("is JetStream enabled"), "{err}");
    cluster.start_node(2);
    init_streams(&urls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_nats_node_down_the_edge_works_on_and_drains_once_when_they_return() {
    let Some(bin) = nats_server() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&bin, tmp.path());
    let urls = cluster.urls();
    init_streams(&urls);
    let e = edge(&tmp.path().join("e1"), &urls, "e1").await;
    let (_runs, dev) = with_device(&e, "d1").await;
    let mut status = e.uplink.as_ref().unwrap().watch();
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.state == outpost::shell::upstream::UplinkState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
    for i in 0..3 {
        cluster.kill(i);
    }
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.state != outpost::shell::upstream::UplinkState::Connected),
    )
    .await
    .expect("the edge sees the cluster gone")
    .unwrap();
    // Offline: the edge serves its device; the results wait.
    let mut local = Vec::new();
    for i in 0..150 {
        let r = e
            .queue
            .send(SendRequest {
                target: "d1".into(),
                payload: format!("offline-{i}").into_bytes(),
                opts: SendOptions::default(),
                origin: "cli".into(),
                signature: None,
            })
            .await
            .unwrap();
        local.push(r.id);
    }
    for id in &local {
        let v = e.queue.wait(*id, WAIT).await.unwrap();
        assert!(v.is_some_and(|v| v.state.is_final()));
    }
    let depth = e.queue.outbox_stats().await.unwrap().depth;
    assert!(depth >= 150, "the results wait in the outbox: {depth}");
    for i in 0..3 {
        cluster.start_node(i);
    }
    outbox_drained(&e).await;
    let js = plain(&urls).await;
    let r = results_upstream(&js, "e1").await;
    for id in &local {
        assert_eq!(r.get(&id.to_string()).map(|x| x.0), Some(1), "{id} once");
    }
    dev.abort();
    e.stop().await;
}

/// The real binary as the edge, aborted (as by kill -9) in each window:
/// after a command is durable and before its message is acked, and after
/// outbox records are published and before their PubAcks. Restarted, it
/// neither runs a command twice nor puts a result up twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_between_store_and_ack_or_publish_and_puback_has_no_duplicate_effect() {
    let Some(bin) = nats_server() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&bin, tmp.path());
    let urls = cluster.urls();
    init_streams(&urls);
    let dir = tmp.path().join("e1");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bundle = tmp.path().join("d1.bundle");
    let serve = |point: &str| -> Child {
        let marker = tmp.path().join(format!("{point}.crashed"));
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
                &urls,
                "--name",
                "e1",
            ])
            .env("OUTPOST_DATA_DIR", &dir)
            .env("OUTPOST_LOG", "warn")
            .env(
                "OUTPOST_TEST_CRASH",
                format!("{point}:{}", marker.display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let admin = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("OUTPOST_DATA_DIR", &dir)
            .env("OUTPOST_LOG", "warn")
            .output()
            .unwrap()
    };
    let js = plain(&urls).await;
    let runs = Arc::new(Mutex::new(Runs::default()));
    let mut dev = None;
    let mut ids = Vec::new();
    for (round, point) in ["nats-after-store", "nats-after-publish"]
        .iter()
        .enumerate()
    {
        let mut child = serve(point);
        let deadline = Instant::now() + WAIT;
        while !admin(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "the edge did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        if dev.is_none() {
            let o = admin(&["enroll", "d1", "--out", bundle.to_str().unwrap()]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            dev = Some(device(Bundle::read(&bundle).unwrap(), runs.clone()));
        }
        for i in 0..20 {
            let id = CommandId::new(1_800_000_000_000 + (round * 100 + i) as u64, 3).to_string();
            publish(
                &js,
                "outpost.cmd.e1.d1",
                Some(&id),
                &format!("r{round}-{i}"),
            )
            .await;
            ids.push(id);
        }
        // It aborts at the point, once: wait for that, then restart it.
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success(), "it died at the crash point");
                break;
            }
            assert!(Instant::now() < deadline, "the edge never reached {point}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut again = serve(point);
        every_result_up(&js, &ids).await;
        // The message taken before the crash comes again once its ack
        // wait is over: a duplicate, acked, nothing run.
        wait_until("the cluster has nothing unacked for the edge", || {
            let urls = urls.clone();
            async move {
                let o = fleet(&urls, &["status", "--json"]);
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
                v["edges"][0]["unacked"] == 0 && v["edges"][0]["waiting"] == 0
            }
        })
        .await;
        let shown = admin(&["show", &ids[0], "--json"]);
        assert!(shown.status.success(), "the edge has the command");
        let _ = again.kill();
        let _ = again.wait();
    }
    let r = results_upstream(&js, "e1").await;
    for id in &ids {
        assert_eq!(r[id].0, 1, "{id}: its result is on the stream once");
    }
    dev.unwrap().abort();
    let runs = runs.lock().unwrap();
    assert_eq!(runs.executed.len(), ids.len(), "each command ran");
}

/// A signed command from the cluster: its envelope rides in the
/// `Outpost-Envelope` header, the edge queues its bytes as received, and the
/// device below verifies them against its bundle's trust anchors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_command_from_the_cluster_reaches_the_device_with_its_envelope() {
    use base64::Engine;
    use outpost::engine::trust::envelope::{payload_digest, seal, Claims};
    use outpost::engine::trust::key::OperatorKey;
    use outpost::engine::trust::{Grant, Role, TrustSet};
    let Some(bin) = nats_server() else { return };
    let _one = ONE_CLUSTER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&bin, tmp.path());
    let urls = cluster.urls();
    init_streams(&urls);
    let e = edge(&tmp.path().join("e1"), &urls, "e1").await;

    let alice = OperatorKey::generate("alice").unwrap();
    let mut set = TrustSet::default();
    set.add(&alice.public, None, Grant::new(Role::Operator), 0);
    // The edge checks at intake with its own trust set.
    e.queue
        .edit_trust(outpost::engine::trust::TrustEdit::Add {
            public: alice.public.to_openssh(),
            name: None,
            grant: Grant::new(Role::Operator),
        })
        .await
        .unwrap();
    let mut bundle = enroll(&e, "d1").await;
    bundle.set_trust("e1", &set, true).unwrap();
    let now = outpost::now_millis();
    let claims = Claims {
        id: CommandId::new(now, 1),
        target: "d1".into(),
        payload_sha256: payload_digest(b"signed"),
        artifact: None,
        priority: outpost::Priority::Normal,
        not_before: None,
        expires_at: now + 3_600_000,
        audience: "e1".into(),
        key_id: alice.public.id,
    };
    let env = seal(&claims, &alice).unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let dev = tokio::spawn(async move {
        let mut c = device::connect(&bundle, &ConnectOptions::default())
            .await
            .unwrap();
        while let Ok(Some(m)) = c.next().await {
            if let Received::Command(cmd) = m {
                c.ack(cmd.id, Outcome::Ok(vec![])).await.unwrap();
                let _ = tx.send(cmd).await;
            }
        }
    });
    let js = plain(&urls).await;
    let mut h = async_nats::HeaderMap::new();
    let id = claims.id.to_string();
    h.insert("Outpost-Id", id.as_str());
    h.insert("Nats-Msg-Id", id.as_str());
    h.insert(
        "Outpost-Envelope",
        base64::engine::general_purpose::STANDARD
            .encode(&env)
            .as_str(),
    );
    js.publish_with_headers("outpost.cmd.e1.d1", h, "signed".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let cmd = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the signed command reaches the device")
        .unwrap();
    assert_eq!(cmd.id, claims.id);
    assert_eq!(
        cmd.signature.as_deref(),
        Some(&env[..]),
        "the bytes as signed"
    );
    assert_eq!(cmd.verified.unwrap().signer, "alice");

    // The operator's way: `outpost fleet send --sign KEY` puts the envelope
    // in the header (the edge is the audience), and the device verifies it.
    let keyfile = tmp.path().join("alice");
    std::fs::write(&keyfile, alice.to_openssh().unwrap()).unwrap();
    let o = fleet(
        &urls,
        &[
            "send",
            "e1/d1",
            "by-cli",
            "--sign",
            keyfile.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cmd = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the CLI-signed command reaches the device")
        .unwrap();
    assert_eq!(cmd.payload, b"by-cli");
    assert_eq!(cmd.verified.unwrap().signer, "alice");
    dev.abort();
    e.stop().await;
}

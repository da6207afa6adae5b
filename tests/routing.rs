//! Routing end to end over loopback QUIC (DESIGN §6): a broadcast to fifty
//! devices with five offline and a box restart in the middle, any-capable
//! balance and failover, and device-to-device sends under the ACL.

use outpost::device::{self, ClientError, ConnectOptions, DeviceConnection, Received};
use outpost::engine::route::{Acl, AclRule};
use outpost::identity::{Bundle, Identity, RevokedSet};
use outpost::proto::ErrorCode;
use outpost::shell::link::{DeviceLink, LinkOptions};
use outpost::shell::queue::{self, CommandView, QueueHandle, SendRequest, ServiceOptions};
use outpost::shell::store::{DeviceRecord, Store, StoreOptions};
use outpost::{CommandId, Outcome, SendOptions, State};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

struct TestBox {
    identity: Identity,
    queue: QueueHandle,
    link: DeviceLink,
    addr: SocketAddr,
}

/// A box on `dir` (made on first use, reopened after), listening on a
/// fresh loopback port.
async fn start(dir: &Path, acl: Acl) -> TestBox {
    let identity = if Identity::exists(dir) {
        Identity::load(dir).unwrap()
    } else {
        Identity::init(dir, &[]).unwrap()
    };
    let store = Store::open(&dir.join("store"), &StoreOptions::default()).unwrap();
    let mut sopts = ServiceOptions {
        acl,
        ..ServiceOptions::default()
    };
    sopts.limits.backoff_base_ms = 10;
    sopts.limits.backoff_cap_ms = 50;
    let queue = queue::open(store, sopts).unwrap();
    let revoked = RevokedSet::new();
    let link = DeviceLink::start(
        "127.0.0.1:0".parse().unwrap(),
        identity.server_config(revoked.clone()).unwrap(),
        revoked,
        queue.clone(),
        LinkOptions::default(),
    )
    .unwrap();
    let addr = link.local_addr().unwrap();
    TestBox {
        identity,
        queue,
        link,
        addr,
    }
}

impl TestBox {
    async fn enroll(&self, id: &str, tags: &[&str], caps: &[&str]) -> Bundle {
        self.queue
            .enroll(DeviceRecord {
                tags: tags.iter().map(|t| t.to_string()).collect(),
                caps: caps.iter().map(|c| c.to_string()).collect(),
                ..DeviceRecord::new(id)
            })
            .await
            .unwrap();
        self.identity
            .issue_device(id, &self.addr.to_string())
            .unwrap()
    }

    async fn send(&self, target: &str, payload: &[u8]) -> CommandId {
        self.queue
            .send(SendRequest {
                target: target.into(),
                payload: payload.to_vec(),
                opts: SendOptions::default(),
                origin: "test".into(),
                signature: None,
            })
            .await
            .unwrap()
            .id
    }

    async fn wait_final(&self, id: CommandId) -> CommandView {
        self.queue
            .wait(id, WAIT)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} did not end within {WAIT:?}"))
    }

    /// Poll `show` until `pred` holds (bounded).
    async fn wait_for(&self, id: CommandId, pred: impl Fn(&CommandView) -> bool) -> CommandView {
        for _ in 0..600 {
            let v = self.queue.show(id).await.unwrap();
            if pred(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} never reached the expected state");
    }

    async fn stop(self) {
        self.link.shutdown().await;
        self.queue.shutdown().await;
    }
}

/// What a test device does with a command.
#[derive(Clone, Copy)]
enum Behaviour {
    Succeed,
    Reject,
}

/// Every command id and payload each device received, across sessions.
type Log = Arc<Mutex<HashMap<String, Vec<(CommandId, Vec<u8>)>>>>;

async fn connect(addr: SocketAddr, bundle: &Bundle, caps: &[&str]) -> DeviceConnection {
    let opts = ConnectOptions {
        server: Some(addr.to_string()),
        caps: caps.iter().map(|c| c.to_string()).collect(),
        ..ConnectOptions::default()
    };
    device::connect(bundle, &opts).await.unwrap()
}

/// A device that logs what it receives and answers per `b`.
async fn device(
    addr: SocketAddr,
    bundle: &Bundle,
    caps: &[&str],
    b: Behaviour,
    log: Log,
) -> JoinHandle<()> {
    let mut c = connect(addr, bundle, caps).await;
    let id = c.device_id().to_string();
    tokio::spawn(async move {
        while let Ok(Some(m)) = c.next().await {
            let Received::Command(cmd) = m else { continue };
            log.lock()
                .unwrap()
                .entry(id.clone())
                .or_default()
                .push((cmd.id, cmd.payload.clone()));
            let outcome = match b {
                Behaviour::Succeed => Outcome::Ok(id.clone().into_bytes()),
                Behaviour::Reject => Outcome::Rejected {
                    reason: "not today".into(),
                },
            };
            if c.ack(cmd.id, outcome).await.is_err() {
                break;
            }
        }
        c.close();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_to_fifty_with_five_offline_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path(), Acl::default()).await;
    let mut bundles = Vec::new();
    for i in 0..50 {
        bundles.push(b.enroll(&format!("d{i:02}"), &["line-3"], &[]).await);
    }
    let other = b.enroll("other", &["line-4"], &[]).await;
    let log = Log::default();
    let mut tasks = Vec::new();
    for (i, bundle) in bundles.iter().enumerate().take(45) {
        let how = if i == 44 {
            Behaviour::Reject
        } else {
            Behaviour::Succeed
        };
        tasks.push(device(b.addr, bundle, &[], how, log.clone()).await);
    }
    tasks.push(device(b.addr, &other, &[], Behaviour::Succeed, log.clone()).await);

    let pid = b.send("tag:line-3", b"reflash").await;
    let v = b
        .wait_for(pid, |v| {
            v.summary.as_deref() == Some("44/50 succeeded, 1 failed, 5 queued")
        })
        .await;
    assert_eq!(v.state, State::Queued, "open while children are queued");
    assert_eq!(v.children.len(), 50);
    assert!(
        !log.lock().unwrap().contains_key("other"),
        "untagged device"
    );

    // The box restarts mid-broadcast; the online devices come back with it.
    for t in &tasks {
        t.abort();
    }
    b.stop().await;
    let b = start(dir.path(), Acl::default()).await;
    let v = b.queue.show(pid).await.unwrap();
    assert_eq!(
        v.summary.as_deref(),
        Some("44/50 succeeded, 1 failed, 5 queued"),
        "the aggregate survives a restart"
    );
    for bundle in &bundles {
        tasks.push(device(b.addr, bundle, &[], Behaviour::Succeed, log.clone()).await);
    }
    let v = b.wait_final(pid).await;
    assert_eq!(v.state, State::Failed, "one child was rejected");
    assert_eq!(v.summary.as_deref(), Some("49/50 succeeded, 1 failed"));
    let log = log.lock().unwrap().clone();
    for i in 0..50 {
        let got = &log[&format!("d{i:02}")];
        assert_eq!(got.len(), 1, "d{i:02} got its child exactly once: {got:?}");
        assert_eq!(got[0].1, b"reflash");
        let child = v.children.iter().find(|c| c.id == got[0].0).unwrap();
        assert_eq!(child.device, format!("d{i:02}"));
    }
    // A child is a command of its own: its result names its device.
    let c = b.queue.show(v.children[3].id).await.unwrap();
    assert_eq!(
        (c.device.as_str(), c.target.as_str()),
        ("d03", "tag:line-3")
    );
    assert_eq!(c.outcome, Some(Outcome::Ok(b"d03".to_vec())));
    for t in tasks {
        t.abort();
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_capable_balances_and_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path(), Acl::default()).await;
    let log = Log::default();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let bundle = b.enroll(&format!("c{i}"), &[], &["camera"]).await;
        tasks.push(device(b.addr, &bundle, &[], Behaviour::Succeed, log.clone()).await);
    }
    // Enrolled with the capability but not offering it this session.
    let narrow = b.enroll("c-narrow", &[], &["camera"]).await;
    tasks.push(
        device(
            b.addr,
            &narrow,
            &["printer"],
            Behaviour::Succeed,
            log.clone(),
        )
        .await,
    );
    let plain = b.enroll("plain", &[], &[]).await;
    tasks.push(device(b.addr, &plain, &[], Behaviour::Succeed, log.clone()).await);

    let mut ids = Vec::new();
    for i in 0..200u32 {
        ids.push(b.send("cap:camera", &i.to_be_bytes()).await);
    }
    let mut per: HashMap<String, u32> = HashMap::new();
    for id in ids {
        let v = b.wait_final(id).await;
        assert_eq!(v.state, State::Succeeded);
        assert_eq!(v.target, "cap:camera");
        assert_eq!(
            v.outcome,
            Some(Outcome::Ok(v.device.clone().into_bytes())),
            "show names the device that ran it"
        );
        *per.entry(v.device).or_default() += 1;
    }
    assert_eq!(
        per.len(),
        4,
        "only the four offering cameras ran them: {per:?}"
    );
    for (d, n) in &per {
        assert!((25..=75).contains(n), "{d} ran {n} of 200: {per:?}");
    }
    for t in tasks.drain(..) {
        t.abort();
    }

    // Failover: the chosen device holds the command and drops.
    let hang = b.enroll("c-hang", &[], &["camera"]).await;
    let mut hung = connect(b.addr, &hang, &[]).await;
    let id = b.send("cap:camera", b"snap").await;
    let Some(Received::Command(cmd)) = tokio::time::timeout(WAIT, hung.next())
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("c-hang got no command")
    };
    assert_eq!(cmd.id, id);
    let c1 = b.enroll("c1", &[], &["camera"]).await;
    tasks.push(device(b.addr, &c1, &[], Behaviour::Succeed, log.clone()).await);
    hung.close();
    let v = b.wait_final(id).await;
    assert_eq!(
        (v.state, v.device.as_str(), v.attempts),
        (State::Succeeded, "c1", 2),
        "failed over to c1, the drop counted as an attempt"
    );
    for t in tasks {
        t.abort();
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_to_device_under_the_acl() {
    let dir = tempfile::tempdir().unwrap();
    let acl = Acl::new(vec![AclRule {
        from: vec!["tag:sensors".into()],
        to: vec!["cap:camera".into()],
    }])
    .unwrap();
    let b = start(dir.path(), acl).await;
    let s0 = b.enroll("s0", &["sensors"], &[]).await;
    let s1 = b.enroll("s1", &[], &[]).await;
    let cam = b.enroll("cam", &[], &["camera"]).await;
    let log = Log::default();
    let cam_task = device(b.addr, &cam, &[], Behaviour::Succeed, log.clone()).await;
    let s0c = connect(b.addr, &s0, &[]).await;
    let s1c = connect(b.addr, &s1, &[]).await;

    // Allowed: by tag to the capability, and to a device that has it.
    let sent = s0c
        .send_command("cap:camera", b"snap".to_vec(), SendOptions::default())
        .await
        .unwrap();
    let direct = s0c
        .send_command("cam", b"zoom".to_vec(), SendOptions::default())
        .await
        .unwrap();
    assert!(!sent.duplicate);
    let v = b.wait_final(sent.id).await;
    assert_eq!((v.origin.as_str(), v.device.as_str()), ("s0", "cam"));
    let st = s0c.query(sent.id).await.unwrap();
    assert_eq!(st.state, State::Succeeded);
    assert_eq!(st.outcome, Some(Outcome::Ok(b"cam".to_vec())));
    b.wait_final(direct.id).await;

    // Refused, each with its code; the connection stays up.
    let refused = |r: Result<device::Sent, ClientError>| match r {
        Err(ClientError::SendRefused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let no = s1c
        .send_command("cap:camera", b"x".to_vec(), SendOptions::default())
        .await;
    assert_eq!(refused(no), ErrorCode::Forbidden, "s1 is not a sensor");
    let no = s0c
        .send_command("s1", b"x".to_vec(), SendOptions::default())
        .await;
    assert_eq!(refused(no), ErrorCode::Forbidden, "s1 is not a camera");
    let operator = b.send("cam", b"op").await;
    match s0c.query(operator).await {
        Err(ClientError::SendRefused { code, .. }) => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("a device sees only its own commands: {other:?}"),
    }
    // Pipelined sends are answered in order.
    let opts = |k: &str| SendOptions {
        key: Some(k.into()),
        ..SendOptions::default()
    };
    let (a, bb, again) = tokio::join!(
        s0c.send_command("cap:camera", b"1".to_vec(), opts("a")),
        s0c.send_command("cap:camera", b"2".to_vec(), opts("b")),
        s0c.send_command("cap:camera", b"1".to_vec(), opts("a")),
    );
    let (a, bb, again) = (a.unwrap(), bb.unwrap(), again.unwrap());
    assert_ne!(a.id, bb.id);
    assert!(again.duplicate && again.id == a.id, "deduped by key");
    // A device's sends keep their order: `1` reaches the camera before `2`.
    b.wait_final(bb.id).await;
    let got: Vec<Vec<u8>> = log.lock().unwrap()["cam"]
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(&got[got.len() - 2..], &[b"1".to_vec(), b"2".to_vec()]);
    cam_task.abort();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_sends_are_audited_allowed_or_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let acl = Acl::new(vec![AclRule {
        from: vec!["s0".into()],
        to: vec!["cam".into()],
    }])
    .unwrap();
    let b = start(dir.path(), acl).await;
    let s0 = b.enroll("s0", &[], &[]).await;
    b.enroll("cam", &[], &[]).await;
    let s0c = connect(b.addr, &s0, &[]).await;
    let sent = s0c
        .send_command("cam", b"snap".to_vec(), SendOptions::default())
        .await
        .unwrap();
    assert!(s0c
        .send_command("s0", b"x".to_vec(), SendOptions::default())
        .await
        .is_err());
    let log = b.queue.audit_read(None, None).await.unwrap();
    let seen: Vec<_> = log
        .iter()
        .map(|v| {
            (
                v.who.as_str(),
                v.from.as_str(),
                v.target.as_str(),
                v.allowed,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("device s0", "device link", "cam", true),
            ("device s0", "device link", "s0", false),
        ],
        "{log:?}"
    );
    assert_eq!(log[0].command, Some(sent.id.to_string()));
    assert!(
        log[1].why.as_deref().unwrap().contains("no [[acl]] rule"),
        "{log:?}"
    );
    b.stop().await;
}

//! The device's own check of signed commands (issue 23, DESIGN §10): a box
//! that is compromised (here a fake one that speaks the frames and holds the
//! box's CA) forges, re-aims and replays commands; the device refuses each
//! with its reason, answers `Rejected`, and never runs it. And with a real
//! box, a refusal is final: the box does not retry it.

use outpost::device::{self, AgentOptions, ConnectOptions, Handler, Received};
use outpost::engine::command::Millis;
use outpost::engine::trust::envelope::{self, payload_digest, seal, Claims};
use outpost::engine::trust::key::OperatorKey;
use outpost::engine::trust::{Grant, Role, TrustSet};
use outpost::identity::{Bundle, Identity, RevokedSet};
use outpost::proto::{self, BoxFrame, DeviceFrame, VERSION};
use outpost::shell::link::{DeviceLink, LinkOptions};
use outpost::shell::queue::{self, SendRequest, ServiceOptions};
use outpost::shell::store::{DeviceRecord, Store, StoreOptions};
use outpost::{CommandId, Outcome, Priority, SendOptions, State};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout;

const MAX: usize = proto::DEFAULT_MAX_FRAME;
const WAIT: Duration = Duration::from_secs(20);
const HOUR: Millis = 3_600_000;

/// The box's CA and a QUIC endpoint with its server certificate: all a
/// compromised box has. It speaks the frames by hand.
struct FakeBox {
    dir: tempfile::TempDir,
    identity: Identity,
    endpoint: quinn::Endpoint,
}

struct Session {
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: proto::FrameReader<quinn::RecvStream>,
}

fn fake_box() -> FakeBox {
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::init(dir.path(), &[]).unwrap();
    let tls = identity.server_config(RevokedSet::new()).unwrap();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    FakeBox {
        dir,
        identity,
        endpoint,
    }
}

impl FakeBox {
    fn addr(&self) -> String {
        self.endpoint.local_addr().unwrap().to_string()
    }

    /// The device's bundle: the trust anchors the real box's enroll writes.
    fn bundle(&self, id: &str, set: &TrustSet, require_signed: bool) -> (Bundle, PathBuf) {
        let mut b = self.identity.issue_device(id, &self.addr()).unwrap();
        b.set_trust("edge-1", set, require_signed).unwrap();
        let path = self.dir.path().join(format!("{id}.bundle"));
        b.write(&path).unwrap();
        // Through the file, as a device reads it.
        (Bundle::read(&path).unwrap(), path)
    }

    /// Admit the next device: its Hello, our Welcome.
    async fn accept(&self) -> Session {
        let incoming = timeout(WAIT, self.endpoint.accept())
            .await
            .expect("a device connects")
            .unwrap();
        let conn = incoming.await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        let mut s = Session {
            _conn: conn,
            send,
            recv: proto::frame_reader(recv),
        };
        let hello = s.read().await;
        assert!(matches!(hello, DeviceFrame::Hello { .. }), "{hello:?}");
        s.write(&BoxFrame::Welcome {
            version: VERSION,
            device_id: "d1".into(),
            window: 64,
        })
        .await;
        s
    }
}

impl Session {
    async fn read(&mut self) -> DeviceFrame {
        timeout(
            WAIT,
            proto::read_frame::<DeviceFrame, _>(&mut self.recv, MAX),
        )
        .await
        .expect("a frame from the device")
        .unwrap()
        .expect("the device keeps the stream open")
    }

    async fn write(&mut self, f: &BoxFrame) {
        proto::write_frame(&mut self.send, f, MAX).await.unwrap();
    }

    async fn command(&mut self, c: &Cmd, attempt: u32) {
        self.write(&BoxFrame::Command {
            id: c.id,
            priority: Priority::Normal,
            payload: c.payload.clone(),
            attempt,
            deadline: None,
            signature: c.envelope.clone(),
        })
        .await;
    }

    /// The next `n` acks, by id (pings skipped).
    async fn acks(&mut self, n: usize) -> HashMap<CommandId, Outcome> {
        let mut got = HashMap::new();
        while got.len() < n {
            match self.read().await {
                // The device names the attempt it answers to a 1.4 box
                // (this fake box welcomes it with the current version).
                DeviceFrame::AckAttempt { id, outcome, .. } | DeviceFrame::Ack { id, outcome } => {
                    assert!(got.insert(id, outcome).is_none(), "acked twice: {id}");
                }
                DeviceFrame::Ping => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        got
    }
}

struct Cmd {
    id: CommandId,
    payload: Vec<u8>,
    envelope: Option<Vec<u8>>,
}

struct Ops {
    alice: OperatorKey,
    mallory: OperatorKey,
    set: TrustSet,
}

fn ops() -> Ops {
    let alice = OperatorKey::generate("alice").unwrap();
    let mallory = OperatorKey::generate("mallory").unwrap();
    let mut set = TrustSet::default();
    set.add(&alice.public, None, Grant::new(Role::Operator), 0);
    Ops {
        alice,
        mallory,
        set,
    }
}

fn claims(k: &OperatorKey, n: u128, payload: &[u8]) -> Claims {
    let now = outpost::now_millis();
    Claims {
        id: CommandId::new(now, n),
        target: "d1".into(),
        payload_sha256: payload_digest(payload),
        artifact: None,
        priority: Priority::Normal,
        not_before: None,
        expires_at: now + HOUR,
        audience: "edge-1".into(),
        key_id: k.public.id,
    }
}

fn signed(c: &Claims, k: &OperatorKey, payload: &[u8]) -> Cmd {
    Cmd {
        id: c.id,
        payload: payload.to_vec(),
        envelope: Some(seal(c, k).unwrap()),
    }
}

/// The cases a compromised box tries, each with the words its refusal must
/// carry. Ids 1..: `good` first.
fn attacks(o: &Ops) -> (Cmd, Vec<(&'static str, Cmd, &'static str)>) {
    let good = signed(&claims(&o.alice, 1, b"good"), &o.alice, b"good");
    // Alice's signature over other claims: another payload.
    let c = claims(&o.alice, 2, b"good");
    let sig = envelope::open(&seal(&c, &o.alice).unwrap())
        .unwrap()
        .signature;
    let mut evil = c.clone();
    evil.payload_sha256 = payload_digest(b"rm -rf /");
    let forged = Cmd {
        id: c.id,
        payload: b"rm -rf /".to_vec(),
        envelope: Some(envelope::forge(&evil, &sig)),
    };
    // A good envelope with another payload in the frame.
    let mut swapped = signed(&claims(&o.alice, 3, b"good"), &o.alice, b"good");
    swapped.payload = b"rm -rf /".to_vec();
    let unknown = signed(&claims(&o.mallory, 4, b"x"), &o.mallory, b"x");
    let mut c = claims(&o.alice, 5, b"x");
    c.audience = "box-b".into();
    let other_box = signed(&c, &o.alice, b"x");
    let mut c = claims(&o.alice, 6, b"x");
    c.target = "d2".into();
    let other_device = signed(&c, &o.alice, b"x");
    let mut c = claims(&o.alice, 7, b"x");
    c.expires_at = outpost::now_millis() - 1000;
    let expired = signed(&c, &o.alice, b"x");
    let unsigned = Cmd {
        id: CommandId::new(outpost::now_millis(), 8),
        payload: b"x".to_vec(),
        envelope: None,
    };
    (
        good,
        vec![
            ("forged", forged, "bad signature"),
            ("payload swapped", swapped, "payload is not the one signed"),
            ("unknown key", unknown, "which this box does not trust"),
            ("another box", other_box, "signed for `box-b`"),
            (
                "another device",
                other_device,
                "target is not the one signed",
            ),
            ("expired", expired, "the signature expired"),
            ("unsigned", unsigned, "this device's bundle requires"),
        ],
    )
}

fn rejected(o: &Outcome) -> &str {
    match o {
        Outcome::Rejected { reason } => reason,
        other => panic!("not rejected: {other:?}"),
    }
}

/// The reference agent, running `sh`, which logs each run to a file: the
/// count of executions.
fn agent(path: PathBuf, runs: &Path, dedupe: usize) -> tokio::task::JoinHandle<()> {
    let mut opts = AgentOptions::new(
        path,
        Handler::Exec(format!("cat >> {0}; echo >> {0}", runs.display())),
    );
    opts.dedupe_capacity = dedupe;
    opts.backoff_min = Duration::from_millis(10);
    opts.backoff_max = Duration::from_millis(50);
    tokio::spawn(async move {
        device::run_agent(opts, std::future::pending())
            .await
            .unwrap()
    })
}

fn executions(runs: &Path) -> Vec<String> {
    std::fs::read_to_string(runs)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_device_runs_only_what_a_trusted_operator_signed_for_it() {
    let fb = fake_box();
    let o = ops();
    let (_, path) = fb.bundle("d1", &o.set, true);
    let runs = fb.dir.path().join("runs");
    let agent = agent(path, &runs, 1);
    let mut s = fb.accept().await;

    let (good, attacks) = attacks(&o);
    s.command(&good, 1).await;
    for (_, c, _) in &attacks {
        s.command(c, 1).await;
    }
    let acks = s.acks(1 + attacks.len()).await;
    assert_eq!(acks[&good.id], Outcome::Ok(vec![]));
    for (what, c, why) in &attacks {
        let r = rejected(&acks[&c.id]);
        assert!(r.starts_with("refused by the device d1: "), "{what}: {r}");
        assert!(r.contains(why), "{what}: wanted `{why}` in: {r}");
    }
    assert_eq!(executions(&runs), ["good"], "only the good one ran");

    // Replays. The same attempt again: its outcome, not a run.
    s.command(&good, 1).await;
    assert_eq!(s.acks(1).await[&good.id], Outcome::Ok(vec![]));
    // Another attempt of a signed id that ran: a replay.
    s.command(&good, 2).await;
    let r = s.acks(1).await.remove(&good.id).unwrap();
    assert!(rejected(&r).contains("replay: command"), "{r:?}");
    // Its outcome pushed out of the agent's small memory by another
    // command: the id is still remembered until it expires.
    let next = signed(&claims(&o.alice, 9, b"next"), &o.alice, b"next");
    s.command(&next, 1).await;
    assert_eq!(s.acks(1).await[&next.id], Outcome::Ok(vec![]));
    s.command(&good, 1).await;
    let r = s.acks(1).await.remove(&good.id).unwrap();
    assert!(rejected(&r).contains("replay"), "{r:?}");

    // Across a reconnect too.
    drop(s);
    let mut s = fb.accept().await;
    s.command(&good, 1).await;
    s.command(&next, 3).await;
    let acks = s.acks(2).await;
    assert!(rejected(&acks[&good.id]).contains("replay"), "{acks:?}");
    assert!(rejected(&acks[&next.id]).contains("replay"), "{acks:?}");
    assert_eq!(executions(&runs), ["good", "next"]);
    agent.abort();
}

#[tokio::test]
async fn the_library_answers_refusals_itself_and_yields_only_verified_commands() {
    let fb = fake_box();
    let o = ops();
    let (bundle, _) = fb.bundle("d1", &o.set, false);
    let dev = tokio::spawn(async move {
        let mut c = device::connect(&bundle, &ConnectOptions::default())
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Ok(Some(m)) = c.next().await {
            if let Received::Command(cmd) = m {
                let done = cmd.payload == b"last";
                c.ack(cmd.id, Outcome::Ok(vec![])).await.unwrap();
                got.push(cmd);
                if done {
                    break;
                }
            }
        }
        got
    });
    let mut s = fb.accept().await;
    let (good, attacks) = attacks(&o);
    for (_, c, _) in attacks.iter().filter(|(w, _, _)| *w != "unsigned") {
        s.command(c, 1).await;
    }
    s.command(&good, 1).await;
    // Not required here: an unsigned command passes.
    let last = Cmd {
        id: CommandId::new(outpost::now_millis(), 99),
        payload: b"last".to_vec(),
        envelope: None,
    };
    s.command(&last, 1).await;
    let acks = s.acks(attacks.len() + 1).await;
    for (what, c, why) in attacks.iter().filter(|(w, _, _)| *w != "unsigned") {
        let r = rejected(&acks[&c.id]);
        assert!(
            r.starts_with("refused by the device d1: ") && r.contains(why),
            "{what}: {r}"
        );
    }
    let got = timeout(WAIT, dev).await.unwrap().unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].id, good.id);
    assert_eq!(got[0].verified.as_ref().unwrap().signer, "alice");
    assert!(got[1].verified.is_none() && got[1].signature.is_none());
}

/// With a real box: the device's refusal is final (`Rejected`, one attempt,
/// no retry) and a signed command it verified runs.
#[tokio::test]
async fn a_real_box_records_the_devices_refusal_as_final() {
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::init(dir.path(), &[]).unwrap();
    let store = Store::open(&dir.path().join("store"), &StoreOptions::default()).unwrap();
    let mut sopts = ServiceOptions::default();
    sopts.limits.backoff_base_ms = 10;
    sopts.limits.backoff_cap_ms = 50;
    let o = ops();
    // The box trusts alice too (it checks at intake); it does not require
    // signatures, so the unsigned one reaches the device, which does.
    sopts.gate = std::sync::Arc::new(outpost::engine::trust::Gate::new(
        "edge-1".into(),
        false,
        o.set.clone(),
    ));
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
    queue.enroll(DeviceRecord::new("d1")).await.unwrap();
    let mut b = identity.issue_device("d1", &addr.to_string()).unwrap();
    b.set_trust("edge-1", &o.set, true).unwrap();
    let path = dir.path().join("d1.bundle");
    b.write(&path).unwrap();
    let runs = dir.path().join("runs");
    let agent = agent(path, &runs, 100);

    let send = |payload: &[u8], signature: Option<Vec<u8>>, id: Option<CommandId>| {
        let queue = queue.clone();
        let payload = payload.to_vec();
        async move {
            let opts = SendOptions {
                max_attempts: Some(5),
                ..SendOptions::default()
            };
            let req = SendRequest {
                target: "d1".into(),
                payload,
                opts,
                origin: "test".into(),
                signature,
            };
            match id {
                // A signed command's id is the one signed.
                Some(id) => queue.send_as(id, req).await.unwrap().id,
                None => queue.send(req).await.unwrap().id,
            }
        }
    };
    let c = claims(&o.alice, 1, b"ok");
    let good = send(b"ok", Some(seal(&c, &o.alice).unwrap()), Some(c.id)).await;
    let bare = send(b"bare", None, None).await;
    for (id, want) in [(good, State::Succeeded), (bare, State::Failed)] {
        let rec = timeout(WAIT, async {
            loop {
                let r = queue.show(id).await.unwrap();
                if r.state.is_final() {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the command ends");
        assert_eq!(rec.state, want, "{rec:?}");
        assert_eq!(rec.attempts, 1, "not retried: {rec:?}");
        if want == State::Failed {
            let r = rejected(rec.outcome.as_ref().unwrap());
            assert!(r.starts_with("refused by the device d1: unsigned"), "{r}");
        }
    }
    assert_eq!(executions(&runs), ["ok"]);
    agent.abort();
}

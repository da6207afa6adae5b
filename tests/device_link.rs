//! The device link end to end over loopback QUIC: enrolment, delivery and
//! acks, redelivery, every refused input, and many devices at once.

use outpost::device::{self, AgentOptions, ClientError, ConnectOptions, Handler, Received};
use outpost::identity::{Bundle, Identity, RevokedSet, Validity, SERVER_NAME};
use outpost::proto::{self, BoxFrame, DeviceFrame, ErrorCode, Version, VERSION};
use outpost::shell::link::{close_code, DeviceLink, LinkOptions};
use outpost::shell::queue::{self, QueueHandle, SendRequest, ServiceOptions};
use outpost::shell::store::{DeviceRecord, Store, StoreOptions};
use outpost::{CommandId, Outcome, SendOptions, State};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout;

const MAX: usize = proto::DEFAULT_MAX_FRAME;
const WAIT: Duration = Duration::from_secs(20);

struct TestBox {
    dir: tempfile::TempDir,
    identity: Identity,
    queue: QueueHandle,
    link: DeviceLink,
    addr: SocketAddr,
}

async fn start_box(opts: LinkOptions) -> TestBox {
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::init(dir.path(), &[]).unwrap();
    let store = Store::open(&dir.path().join("store"), &StoreOptions::default()).unwrap();
    let mut sopts = ServiceOptions::default();
    sopts.limits.backoff_base_ms = 10;
    sopts.limits.backoff_cap_ms = 50;
    let queue = queue::open(store, sopts).unwrap();
    let revoked = RevokedSet::new();
    let link = DeviceLink::start(
        "127.0.0.1:0".parse().unwrap(),
        identity.server_config(revoked.clone()).unwrap(),
        revoked,
        queue.clone(),
        opts,
    )
    .unwrap();
    let addr = link.local_addr().unwrap();
    TestBox {
        dir,
        identity,
        queue,
        link,
        addr,
    }
}

impl TestBox {
    async fn enroll(&self, id: &str) -> Bundle {
        self.queue
            .enroll(DeviceRecord {
                id: id.into(),
                tags: vec![],
                caps: vec![],
                enrolled_at: outpost::now_millis(),
                revoked: false,
                last_seen: None,
                cert: None,
            })
            .await
            .unwrap();
        self.identity
            .issue_device(id, &self.addr.to_string())
            .unwrap()
    }

    async fn send_with(&self, target: &str, payload: &[u8], opts: SendOptions) -> CommandId {
        self.queue
            .send(SendRequest {
                target: target.into(),
                payload: payload.to_vec(),
                opts,
                origin: "test".into(),
                signature: None,
            })
            .await
            .unwrap()
            .id
    }

    async fn send(&self, target: &str, payload: &[u8]) -> CommandId {
        self.send_with(target, payload, SendOptions::default())
            .await
    }

    /// Polls until the command reaches a final state (bounded).
    async fn wait_final(&self, id: CommandId) -> outpost::shell::queue::CommandView {
        for _ in 0..400 {
            let v = self.queue.show(id).await.unwrap();
            if v.state.is_final() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("command {id} did not finish in 20 s");
    }

    async fn stop(self) {
        self.link.shutdown().await;
        self.queue.shutdown().await;
    }
}

/// A device speaking raw frames, for the tests of bad input.
struct Raw {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _endpoint: quinn::Endpoint,
}

async fn raw_connect(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<Raw, quinn::ConnectionError> {
    let endpoint = device::client_endpoint(addr).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let conn = endpoint
        .connect_with(cfg, addr, SERVER_NAME)
        .unwrap()
        .await?;
    let (send, recv) = conn.open_bi().await?;
    Ok(Raw {
        conn,
        send,
        recv,
        _endpoint: endpoint,
    })
}

impl Raw {
    async fn hello(addr: SocketAddr, bundle: &Bundle, version: Version) -> (Raw, BoxFrame) {
        let mut raw = raw_connect(addr, bundle.client_config().unwrap())
            .await
            .unwrap();
        raw.write(&DeviceFrame::Hello {
            version,
            agent: "raw".into(),
            caps: vec![],
        })
        .await;
        let first = raw.read().await.unwrap();
        (raw, first)
    }

    async fn welcomed(addr: SocketAddr, bundle: &Bundle) -> Raw {
        let (raw, first) = Raw::hello(addr, bundle, VERSION).await;
        assert!(matches!(first, BoxFrame::Welcome { .. }), "{first:?}");
        raw
    }

    async fn write(&mut self, f: &DeviceFrame) {
        proto::write_frame(&mut self.send, f, MAX).await.unwrap();
    }

    async fn write_bytes(&mut self, b: &[u8]) {
        self.send.write_all(b).await.unwrap();
    }

    /// The next frame, or None once the stream or connection ended.
    async fn read(&mut self) -> Option<BoxFrame> {
        timeout(WAIT, proto::read_frame::<BoxFrame, _>(&mut self.recv, MAX))
            .await
            .expect("the box answered nothing in 20 s")
            .ok()
            .flatten()
    }

    /// Expects a fatal Error with `code`, then the connection closed.
    async fn expect_fatal(mut self, code: ErrorCode) -> String {
        let message = match self.read().await {
            Some(BoxFrame::Error { code: c, message }) if c == code => message,
            other => panic!("expected Error {code:?}, got {other:?}"),
        };
        let closed = timeout(WAIT, self.conn.closed()).await.expect("not closed");
        match closed {
            quinn::ConnectionError::ApplicationClosed(a) => {
                assert_eq!(a.error_code.into_inner(), u64::from(close_code::PROTOCOL))
            }
            other => panic!("unexpected close {other:?}"),
        }
        message
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_connect_deliver_ack() {
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-1").await;
    // Through the bundle file, as a device would.
    let path = b.dir.path().join("dev-1.bundle");
    bundle.write(&path).unwrap();
    let bundle = Bundle::read(&path).unwrap();
    let mut conn = device::connect(&bundle, &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(conn.device_id(), "dev-1");
    assert_eq!(conn.window(), proto::DEFAULT_WINDOW);
    assert!(b.link.is_connected("dev-1"));

    let id = b.send("dev-1", b"hello").await;
    let cmd = match timeout(WAIT, conn.next()).await.unwrap().unwrap() {
        Some(Received::Command(c)) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (cmd.id, cmd.payload.as_slice(), cmd.attempt),
        (id, &b"hello"[..], 1)
    );
    conn.ack(id, Outcome::Ok(b"world".to_vec())).await.unwrap();
    let v = b.wait_final(id).await;
    assert_eq!(v.state, State::Succeeded);
    assert_eq!(v.outcome, Some(Outcome::Ok(b"world".to_vec())));
    conn.close();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_arrives_in_order_and_an_oversized_command_is_rejected_not_retried() {
    // The backlog goes out in batched writes; a command too big for the
    // link in the middle of one ends Rejected and the rest still arrive.
    let b = start_box(LinkOptions {
        max_frame: 512,
        ..LinkOptions::default()
    })
    .await;
    let bundle = b.enroll("dev-1").await;
    let mut ids = Vec::new();
    for i in 0..40u32 {
        ids.push(b.send("dev-1", format!("cmd-{i}").as_bytes()).await);
    }
    let big = b.send("dev-1", &[7u8; 2000]).await;
    for i in 40..80u32 {
        ids.push(b.send("dev-1", format!("cmd-{i}").as_bytes()).await);
    }
    let mut conn = device::connect(&bundle, &ConnectOptions::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < ids.len() {
        match timeout(WAIT, conn.next()).await.unwrap().unwrap() {
            Some(Received::Command(c)) => {
                assert_ne!(c.id, big, "the oversized command was sent");
                conn.ack(c.id, Outcome::Ok(Vec::new())).await.unwrap();
                got.push(c.id);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, ids, "FIFO across the batched writes");
    let v = b.wait_final(big).await;
    assert_eq!(v.state, State::Failed, "{v:?}");
    assert!(
        matches!(&v.outcome, Some(Outcome::Rejected { reason }) if reason.contains("frame limit of 512 bytes")),
        "{v:?}"
    );
    for id in ids {
        assert_eq!(b.wait_final(id).await.state, State::Succeeded);
    }
    conn.close();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_agent_runs_exec_and_reports_failures() {
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-x").await;
    let path = b.dir.path().join("dev-x.bundle");
    bundle.write(&path).unwrap();
    let script = r#"read p; if [ "$p" = fail ]; then echo bad >&2; exit 3; fi; echo "got $p""#;
    let mut opts = AgentOptions::new(path, Handler::Exec(script.into()));
    opts.backoff_min = Duration::from_millis(50);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(device::run_agent(opts, async {
        let _ = stop_rx.await;
    }));
    let ok = b.send("dev-x", b"one\n").await;
    let fail = b
        .send_with(
            "dev-x",
            b"fail\n",
            SendOptions {
                max_attempts: Some(1),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(
        b.wait_final(ok).await.outcome,
        Some(Outcome::Ok(b"got one\n".to_vec()))
    );
    let v = b.wait_final(fail).await;
    assert_eq!(
        v.outcome,
        Some(Outcome::Failed {
            code: 3,
            message: "bad\n".into()
        })
    );
    stop_tx.send(()).unwrap();
    timeout(WAIT, agent).await.unwrap().unwrap().unwrap();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_device_gets_its_command_again() {
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-k").await;
    let id = b.send("dev-k", b"work").await;
    let mut first = Raw::welcomed(b.addr, &bundle).await;
    match first.read().await {
        Some(BoxFrame::Command {
            id: got, attempt, ..
        }) => assert_eq!((got, attempt), (id, 1)),
        other => panic!("{other:?}"),
    }
    // Killed mid-command: the connection vanishes without an ack.
    first.conn.close(0u32.into(), b"");
    drop(first);
    let mut second = Raw::welcomed(b.addr, &bundle).await;
    match second.read().await {
        Some(BoxFrame::Command { id: got, .. }) => assert_eq!(got, id),
        other => panic!("{other:?}"),
    }
    second
        .write(&DeviceFrame::Ack {
            id,
            outcome: Outcome::Ok(vec![]),
        })
        .await;
    assert_eq!(b.wait_final(id).await.state, State::Succeeded);
    b.stop().await;
}

async fn lines(path: &std::path::Path) -> usize {
    tokio::fs::read_to_string(path)
        .await
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// The agent is cut off while a command runs; the box delivers it again
/// (same id) and the agent neither runs it twice nor loses its outcome:
/// once while it still runs, once after it finished offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_after_a_cut_is_deduped_by_the_agent() {
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-r").await;
    let path = b.dir.path().join("dev-r.bundle");
    bundle.write(&path).unwrap();
    let runs = b.dir.path().join("runs");
    let script = format!("echo run >> {}; sleep 1; echo done", runs.display());
    let mut opts = AgentOptions::new(path, Handler::Exec(script));
    // Long enough that the second command finishes while disconnected.
    opts.backoff_min = Duration::from_millis(2500);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(device::run_agent(opts, async {
        let _ = stop_rx.await;
    }));

    for round in 1..=2 {
        let sent_before = b
            .link
            .stats()
            .commands_sent
            .load(std::sync::atomic::Ordering::Relaxed);
        let id = b.send("dev-r", b"").await;
        for _ in 0..200 {
            if lines(&runs).await == round {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(lines(&runs).await, round, "the command did not start");
        assert!(b.link.disconnect("dev-r"));
        let v = b.wait_final(id).await;
        assert_eq!(v.state, State::Succeeded);
        assert_eq!(v.outcome, Some(Outcome::Ok(b"done\n".to_vec())));
        // Delivered twice, run once.
        let sent = b
            .link
            .stats()
            .commands_sent
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(sent - sent_before, 2, "round {round}: not redelivered");
        assert_eq!(lines(&runs).await, round, "round {round}: ran twice");
    }
    stop_tx.send(()).unwrap();
    timeout(WAIT, agent).await.unwrap().unwrap().unwrap();
    b.stop().await;
}

fn is_refused(e: &ClientError, what: &str) -> bool {
    matches!(e, ClientError::Refused(m) if m.contains(what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_another_ca_expired_or_absent_are_refused() {
    let b = start_box(LinkOptions::default()).await;
    b.enroll("dev-1").await;
    let opts = ConnectOptions::default();

    // A device certificate from another box's CA (with our CA to trust).
    let other_dir = tempfile::tempdir().unwrap();
    let other = Identity::init(other_dir.path(), &[]).unwrap();
    let mut foreign = other.issue_device("dev-1", &b.addr.to_string()).unwrap();
    foreign.ca_der = b.identity.ca_der().clone();
    let e = device::connect(&foreign, &opts).await.err().unwrap();
    assert!(is_refused(&e, "unknown CA"), "{e}");
    assert!(e.is_permanent());

    // The whole foreign bundle: the device refuses the box.
    let foreign = other.issue_device("dev-1", &b.addr.to_string()).unwrap();
    let e = device::connect(&foreign, &opts).await.err().unwrap();
    assert!(matches!(e, ClientError::Tls(_)), "{e}");

    // Expired.
    let past = std::time::SystemTime::now() - Duration::from_secs(30 * 86400);
    let expired = b
        .identity
        .issue_device_with(
            "dev-1",
            &b.addr.to_string(),
            Validity {
                not_before: past - Duration::from_secs(86400),
                not_after: past,
            },
        )
        .unwrap();
    let e = device::connect(&expired, &opts).await.err().unwrap();
    assert!(is_refused(&e, "expired"), "{e}");

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(b.identity.ca_der().clone()).unwrap();
    let mut anon = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    anon.alpn_protocols = vec![outpost::identity::ALPN.to_vec()];
    let refused = async {
        let mut raw = raw_connect(b.addr, anon).await?;
        // The refusal may arrive before or after this write.
        let _ = proto::write_frame(&mut raw.send, &DeviceFrame::Ping, MAX).await;
        match raw.read().await {
            Some(f) => Ok(Some(f)),
            None => Err(timeout(WAIT, raw.conn.closed()).await.unwrap()),
        }
    }
    .await;
    match refused {
        Err(quinn::ConnectionError::ConnectionClosed(c)) => {
            // certificate_required
            assert_eq!(u64::from(c.error_code), 0x100 + 116, "{c}");
        }
        Ok(None) => {}
        other => panic!("a device without a certificate got {other:?}"),
    }
    assert!(!b.link.is_connected("dev-1"));
    assert!(
        b.link
            .stats()
            .handshakes_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_closes_the_live_connection_and_refuses_the_next() {
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-v").await;
    let mut conn = device::connect(&bundle, &ConnectOptions::default())
        .await
        .unwrap();
    b.link.revoke("dev-v");
    let e = timeout(Duration::from_secs(1), conn.next())
        .await
        .expect("the live connection was not closed within 1 s of revoke")
        .err()
        .unwrap();
    assert!(e.is_permanent(), "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");
    let e = device::connect(&bundle, &ConnectOptions::default())
        .await
        .err()
        .unwrap();
    assert!(is_refused(&e, "revoked"), "{e}");
    // Re-admitted, it connects again.
    b.link.readmit("dev-v");
    device::connect(&bundle, &ConnectOptions::default())
        .await
        .unwrap();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_replaces_the_first() {
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-2").await;
    let mut first = device::connect(&bundle, &ConnectOptions::default())
        .await
        .unwrap();
    let _second = device::connect(&bundle, &ConnectOptions::default())
        .await
        .unwrap();
    let e = timeout(WAIT, first.next()).await.unwrap().err().unwrap();
    assert!(e.to_string().contains("replaced"), "{e}");
    assert!(!e.is_permanent());
    assert_eq!(b.link.connected(), vec!["dev-2".to_string()]);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_an_error_and_a_closed_connection() {
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-b").await;

    // Over the limit: the claimed length alone is enough.
    let mut raw = Raw::welcomed(b.addr, &bundle).await;
    raw.write_bytes(&((MAX as u32) + 1).to_be_bytes()).await;
    let m = raw.expect_fatal(ErrorCode::FrameTooLarge).await;
    assert!(m.contains("limit"), "{m}");

    // Malformed: an Ack whose id is cut short.
    let mut raw = Raw::welcomed(b.addr, &bundle).await;
    raw.write_bytes(&[0, 0, 0, 2, 0x01, 0xff]).await;
    raw.expect_fatal(ErrorCode::Malformed).await;

    // Unknown message tag.
    let mut raw = Raw::welcomed(b.addr, &bundle).await;
    raw.write_bytes(&[0, 0, 0, 1, 0x2a]).await;
    let m = raw.expect_fatal(ErrorCode::UnknownMessage).await;
    assert!(m.contains("42"), "{m}");

    // Garbage instead of Hello.
    let mut raw = raw_connect(b.addr, bundle.client_config().unwrap())
        .await
        .unwrap();
    raw.write_bytes(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
    raw.expect_fatal(ErrorCode::Malformed).await;

    // Something other than Hello first.
    let mut raw = raw_connect(b.addr, bundle.client_config().unwrap())
        .await
        .unwrap();
    raw.write(&DeviceFrame::Ping).await;
    raw.expect_fatal(ErrorCode::ProtocolViolation).await;

    // Major version mismatch: both versions named.
    let (raw, first) = Raw::hello(b.addr, &bundle, Version { major: 9, minor: 1 }).await;
    match first {
        BoxFrame::Error {
            code: ErrorCode::UnsupportedVersion,
            message,
        } => assert!(
            message.contains("9.1") && message.contains(&VERSION.to_string()),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    timeout(WAIT, raw.conn.closed()).await.unwrap();

    // A newer minor is fine.
    let (_raw, first) = Raw::hello(
        b.addr,
        &bundle,
        Version {
            major: VERSION.major,
            minor: VERSION.minor + 5,
        },
    )
    .await;
    assert!(matches!(first, BoxFrame::Welcome { .. }));
    drop(_raw);

    // A 1.0 device never gets a 1.1 answer: its Send is unsupported.
    let (mut old, first) = Raw::hello(b.addr, &bundle, Version { major: 1, minor: 0 }).await;
    assert!(matches!(first, BoxFrame::Welcome { .. }));
    old.write(&DeviceFrame::Send {
        to: "x".into(),
        payload: vec![],
        opts: SendOptions::default(),
    })
    .await;
    match old.read().await {
        Some(BoxFrame::Error {
            code: ErrorCode::Unsupported,
            message,
        }) => assert!(message.contains("1.1"), "{message}"),
        f => panic!("{f:?}"),
    }
    old.write(&DeviceFrame::Ping).await;
    assert_eq!(old.read().await, Some(BoxFrame::Pong), "still connected");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_for_another_devices_command_is_refused_but_not_fatal() {
    let (etx, mut erx) = tokio::sync::mpsc::channel(8);
    let b = start_box(LinkOptions {
        events: Some(etx),
        ..Default::default()
    })
    .await;
    let ba = b.enroll("dev-a").await;
    let bb = b.enroll("dev-b").await;
    let mut a = Raw::welcomed(b.addr, &ba).await;
    let mut other = Raw::welcomed(b.addr, &bb).await;
    let id = b.send("dev-a", b"mine").await;
    assert!(matches!(a.read().await, Some(BoxFrame::Command { .. })));

    other
        .write(&DeviceFrame::Ack {
            id,
            outcome: Outcome::Ok(b"forged".to_vec()),
        })
        .await;
    match other.read().await {
        Some(BoxFrame::Error {
            code: ErrorCode::NotYourCommand,
            message,
        }) => assert!(message.contains(&id.to_string()), "{message}"),
        f => panic!("{f:?}"),
    }
    // Still connected and served.
    other.write(&DeviceFrame::Ping).await;
    assert_eq!(other.read().await, Some(BoxFrame::Pong));
    // A device-to-device send with no ACL rule is refused (default deny),
    // also not fatally.
    other
        .write(&DeviceFrame::Send {
            to: "dev-a".into(),
            payload: vec![],
            opts: SendOptions::default(),
        })
        .await;
    match other.read().await {
        Some(BoxFrame::Refused {
            code: ErrorCode::Forbidden,
            message,
        }) => assert!(message.contains("[[acl]]"), "{message}"),
        f => panic!("{f:?}"),
    }
    // Events reach the hook with the certificate's id.
    other
        .write(&DeviceFrame::Event {
            payload: vec![1, 2, 3],
        })
        .await;
    let ev = timeout(WAIT, erx.recv()).await.unwrap().unwrap();
    assert_eq!(
        (ev.device.as_str(), ev.payload.as_slice()),
        ("dev-b", &[1u8, 2, 3][..])
    );

    // The real owner's ack still counts.
    a.write(&DeviceFrame::Ack {
        id,
        outcome: Outcome::Ok(b"real".to_vec()),
    })
    .await;
    assert_eq!(
        b.wait_final(id).await.outcome,
        Some(Outcome::Ok(b"real".to_vec()))
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_naming_an_earlier_attempt_does_not_end_the_current_one() {
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-a").await;
    let mut a = Raw::welcomed(b.addr, &bundle).await;
    let id = b.send("dev-a", b"job").await;
    let failed = Outcome::Failed {
        code: 1,
        message: "first try".into(),
    };
    match a.read().await {
        Some(BoxFrame::Command { attempt: 1, .. }) => {}
        f => panic!("{f:?}"),
    }
    a.write(&DeviceFrame::AckAttempt {
        id,
        attempt: 1,
        outcome: failed.clone(),
    })
    .await;
    // Retried after the (short) backoff as attempt 2.
    match a.read().await {
        Some(BoxFrame::Command { attempt: 2, .. }) => {}
        f => panic!("{f:?}"),
    }
    // A late copy of attempt 1's answer: dropped quietly, not fatal, and
    // attempt 2 stays in flight.
    a.write(&DeviceFrame::AckAttempt {
        id,
        attempt: 1,
        outcome: failed,
    })
    .await;
    a.write(&DeviceFrame::Ping).await;
    assert_eq!(a.read().await, Some(BoxFrame::Pong));
    assert_eq!(
        b.queue.show(id).await.unwrap().state,
        State::Delivered { attempt: 2 }
    );
    a.write(&DeviceFrame::AckAttempt {
        id,
        attempt: 2,
        outcome: Outcome::Ok(b"second try".to_vec()),
    })
    .await;
    let v = b.wait_final(id).await;
    assert_eq!(
        (v.state, v.outcome),
        (State::Succeeded, Some(Outcome::Ok(b"second try".to_vec())))
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_closed_and_others_stay_served() {
    let b = start_box(LinkOptions {
        frame_rate: 500,
        frame_burst: 1000,
        ..Default::default()
    })
    .await;
    let bf = b.enroll("flood").await;
    let bg = b.enroll("good").await;
    let mut good = device::connect(&bg, &ConnectOptions::default())
        .await
        .unwrap();
    let mut flood = Raw::welcomed(b.addr, &bf).await;
    let ping = proto::encode(&DeviceFrame::Ping);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 20_000)
        .collect();
    let flooding = tokio::spawn(async move {
        // The box stops reading once it closes us; the write then fails.
        let _ = timeout(WAIT, flood.send.write_all(&burst)).await;
        let mut pongs = 0u32;
        let code = loop {
            match flood.read().await {
                Some(BoxFrame::Pong) => pongs += 1,
                Some(BoxFrame::Error { code, .. }) => break Some(code),
                Some(other) => panic!("{other:?}"),
                None => break None,
            }
        };
        let closed = timeout(WAIT, flood.conn.closed()).await.is_ok();
        (code, pongs, closed)
    });
    // Meanwhile another device gets and acks its commands.
    for i in 0..5u8 {
        let id = b.send("good", &[i]).await;
        match timeout(WAIT, good.next()).await.unwrap().unwrap() {
            Some(Received::Command(c)) => assert_eq!(c.id, id),
            other => panic!("{other:?}"),
        }
        good.ack(id, Outcome::Ok(vec![i])).await.unwrap();
        assert_eq!(b.wait_final(id).await.state, State::Succeeded);
    }
    let (code, pongs, closed) = timeout(WAIT, flooding).await.unwrap().unwrap();
    assert_eq!(code, Some(ErrorCode::TooManyFrames));
    assert!(pongs <= 1100, "{pongs} pongs");
    assert!(closed);
    assert!(b.link.is_connected("good"));
    assert!(!b.link.is_connected("flood"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_at_once() {
    const N: usize = 200;
    let b = Arc::new(start_box(LinkOptions::default()).await);
    let mut bundles = Vec::new();
    for i in 0..N {
        bundles.push(b.enroll(&format!("dev-{i:03}")).await);
    }
    let all = async {
        let mut set = tokio::task::JoinSet::new();
        for bundle in bundles {
            set.spawn(async move { device::connect(&bundle, &ConnectOptions::default()).await });
        }
        let mut conns = Vec::new();
        while let Some(r) = set.join_next().await {
            conns.push(r.unwrap().unwrap());
        }
        conns
    };
    let mut conns = timeout(Duration::from_secs(120), all)
        .await
        .expect("200 devices did not connect in 120 s");
    assert_eq!(b.link.connected().len(), N);
    // Each gets one command and acks it.
    let mut ids = Vec::new();
    for c in &conns {
        ids.push(b.send(c.device_id(), b"x").await);
    }
    let serve = async {
        for c in conns.iter_mut() {
            match c.next().await.unwrap() {
                Some(Received::Command(cmd)) => c.ack(cmd.id, Outcome::Ok(vec![])).await.unwrap(),
                other => panic!("{other:?}"),
            }
        }
    };
    timeout(Duration::from_secs(120), serve)
        .await
        .expect("acks did not complete");
    for id in ids {
        assert_eq!(b.wait_final(id).await.state, State::Succeeded);
    }
    drop(conns);
    if let Ok(b) = Arc::try_unwrap(b) {
        b.stop().await;
    }
}

/// A device that goes silent (power cut: no close, no keep-alives) is
/// noticed by the idle timeout, and its command goes back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_is_dropped_and_its_command_requeued() {
    let b = start_box(LinkOptions {
        idle_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let bundle = b.enroll("dev-s").await;
    let id = b.send("dev-s", b"x").await;
    let dead = bundle.clone();
    // The device runs on its own runtime, which is then stopped dead.
    let device = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let mut conn = device::connect(&dead, &ConnectOptions::default())
                .await
                .unwrap();
            let got = matches!(conn.next().await, Ok(Some(Received::Command(_))));
            // Never closed: the box must notice the silence by itself.
            std::mem::forget(conn);
            got
        });
        rt.shutdown_background();
        got
    });
    assert!(device.join().unwrap(), "the device got no command");
    let mut gone = false;
    for _ in 0..200 {
        if !b.link.is_connected("dev-s") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the silent device was not dropped in 20 s");
    // Back to the queue: the device's next connection gets it again.
    let mut conn = device::connect(&bundle, &ConnectOptions::default())
        .await
        .unwrap();
    match timeout(WAIT, conn.next()).await.unwrap().unwrap() {
        Some(Received::Command(c)) => assert_eq!(c.id, id),
        other => panic!("{other:?}"),
    }
    b.stop().await;
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// Memory per idle connected device, box and device sides together (both
/// run in this process, so this is an upper bound for the box). Run with
/// `cargo test --release --test device_link rss -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rss_per_idle_device() {
    const N: usize = 500;
    let b = start_box(LinkOptions::default()).await;
    let mut bundles = Vec::new();
    for i in 0..N {
        bundles.push(b.enroll(&format!("idle-{i}")).await);
    }
    let endpoint = device::client_endpoint(b.addr).unwrap();
    // Warm up allocators and the queue with one device first.
    let first = device::connect_with(&endpoint, b.addr, &bundles[0], &ConnectOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let started = std::time::Instant::now();
    let mut conns = vec![first];
    for bundle in &bundles[1..] {
        conns.push(
            device::connect_with(&endpoint, b.addr, bundle, &ConnectOptions::default())
                .await
                .unwrap(),
        );
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    println!(
        "{} devices connected one after another in {:?} ({:.0}/s); RSS {} KiB -> {} KiB: {:.1} KiB per idle device (box + device sides)",
        N - 1,
        took,
        (N - 1) as f64 / took.as_secs_f64(),
        before,
        after,
        (after.saturating_sub(before)) as f64 / (N - 1) as f64
    );
    drop(conns);
    b.stop().await;
}

/// Hostile peers at once: connections that finish TLS but never open their
/// control stream, and an enrolled device that never reads. An honest
/// device stays served throughout; its latency under attack is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_connections_and_a_device_that_never_reads_do_not_stall_honest_ones() {
    let b = start_box(LinkOptions {
        hello_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let honest = b.enroll("honest").await;
    let lazy = b.enroll("lazy").await;
    let mute = b.enroll("mute").await;
    let mut dev = device::connect(&honest, &ConnectOptions::default())
        .await
        .unwrap();
    // Enqueue → receipt on the honest device, n times.
    async fn probe(b: &TestBox, dev: &mut device::DeviceConnection, n: u8) -> Vec<Duration> {
        let mut lat = Vec::new();
        for i in 0..n {
            let t = std::time::Instant::now();
            let id = b.send("honest", &[i]).await;
            match timeout(WAIT, dev.next()).await.unwrap().unwrap() {
                Some(Received::Command(c)) => assert_eq!(c.id, id),
                other => panic!("{other:?}"),
            }
            lat.push(t.elapsed());
            dev.ack(id, Outcome::Ok(vec![i])).await.unwrap();
        }
        lat.sort();
        lat
    }
    let calm = probe(&b, &mut dev, 50).await;

    // Never reads: the box may only hold its window of commands for it,
    // then its stream stalls; the rest stays queued on disk.
    let lazy_raw = Raw::welcomed(b.addr, &lazy).await;
    for _ in 0..100 {
        b.send("lazy", &[7u8; 20_000]).await;
    }
    // 300 connections that complete TLS and then say nothing.
    let endpoint = device::client_endpoint(b.addr).unwrap();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(mute.client_config().unwrap()).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut mutes = Vec::new();
    for _ in 0..300 {
        let c = endpoint
            .connect_with(cfg.clone(), b.addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        mutes.push(c);
    }
    let attacked = probe(&b, &mut dev, 100).await;
    println!(
        "honest device, enqueue → receipt: calm p50 {:?} p99 {:?}; under attack (300 mute connections, a device that never reads) p50 {:?} p99 {:?}",
        calm[25], calm[49], attacked[50], attacked[98]
    );
    // The box closed every mute connection after its hello timeout.
    for c in &mutes {
        timeout(WAIT, c.closed())
            .await
            .expect("a mute connection was closed");
    }
    // The lazy device holds at most its window; the rest is queued.
    let queued = b.queue.list("lazy".into()).await.unwrap();
    let in_flight = queued
        .iter()
        .filter(|v| matches!(v.state, State::Delivered { .. }))
        .count();
    assert!(
        in_flight <= 32,
        "{in_flight} in flight on a device that never reads"
    );
    assert_eq!(queued.len(), 100, "nothing lost");
    drop(lazy_raw);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_1_3_device_gets_artifact_commands_rejected_with_upgrade_the_agent() {
    use outpost::engine::artifact::chunker::chunk_all;
    let b = start_box(LinkOptions::default()).await;
    let bundle = b.enroll("dev-old").await;
    let shelf = b.queue.shelf();
    let m = chunk_all(&[7u8; 5000][..], "fw", "1", |c, bytes| {
        shelf
            .chunks()
            .put(&c.sha256, bytes)
            .map(|_| ())
            .map_err(std::io::Error::other)
    })
    .unwrap();
    shelf.chunks().sync().unwrap();
    let d = shelf.commit(m.encode(), outpost::now_millis()).unwrap();
    let (mut old, first) = Raw::hello(b.addr, &bundle, Version { major: 1, minor: 2 }).await;
    assert!(matches!(first, BoxFrame::Welcome { .. }), "{first:?}");
    let id = b
        .queue
        .send(SendRequest {
            target: "dev-old".into(),
            payload: b"flash".to_vec(),
            opts: SendOptions::default(),
            origin: "test".into(),
            signature: Some(outpost::engine::trust::envelope::unsigned(Some(d.0))),
        })
        .await
        .unwrap()
        .id;
    let v = b.wait_final(id).await;
    match &v.outcome {
        Some(Outcome::Rejected { reason }) => {
            assert!(reason.contains("upgrade the agent"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // It never reached the device; the session goes on. A Progress for a
    // command not fetching on this connection is ignored, not fatal.
    old.write(&DeviceFrame::Progress {
        id,
        bytes: 1,
        total: 2,
    })
    .await;
    old.write(&DeviceFrame::Ping).await;
    assert_eq!(old.read().await, Some(BoxFrame::Pong));
    assert!(b.queue.show(id).await.unwrap().progress.is_none());
    b.stop().await;
}

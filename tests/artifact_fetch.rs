//! Artifact fetch (protocol 1.3) over loopback QUIC: devices get
//! byte-identical files, a new version moves only changed chunks, and an
//! artifact not delivered to a device is refused.

use outpost::device::fetch::{fetch, FetchError};
use outpost::device::{self, ConnectOptions, Received};
use outpost::engine::artifact::{chunker::chunk_all, Digest};
use outpost::engine::trust::envelope;
use outpost::identity::{Identity, RevokedSet};
use outpost::proto::ErrorCode;
use outpost::shell::link::{DeviceLink, LinkOptions};
use outpost::shell::queue::{self, QueueHandle, SendRequest, ServiceOptions};
use outpost::shell::store::{DeviceRecord, Store, StoreOptions};
use outpost::SendOptions;
use rand::{RngCore, SeedableRng};
use std::time::Duration;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

struct TestBox {
    _dir: tempfile::TempDir,
    identity: Identity,
    queue: QueueHandle,
    link: DeviceLink,
}

async fn start_box() -> TestBox {
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::init(dir.path(), &[]).unwrap();
    let store = Store::open(&dir.path().join("store"), &StoreOptions::default()).unwrap();
    let queue = queue::open(store, ServiceOptions::default()).unwrap();
    let revoked = RevokedSet::new();
    let link = DeviceLink::start(
        "127.0.0.1:0".parse().unwrap(),
        identity.server_config(revoked.clone()).unwrap(),
        revoked,
        queue.clone(),
        LinkOptions::default(),
    )
    .unwrap();
    TestBox {
        _dir: dir,
        identity,
        queue,
        link,
    }
}

impl TestBox {
    async fn connect(&self, id: &str) -> device::DeviceConnection {
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
        let addr = self.link.local_addr().unwrap().to_string();
        let bundle = self.identity.issue_device(id, &addr).unwrap();
        device::connect(&bundle, &ConnectOptions::default())
            .await
            .unwrap()
    }

    fn shelve(&self, data: &[u8], version: &str) -> Digest {
        let shelf = self.queue.shelf();
        let m = chunk_all(data, "fw", version, |c, b| {
            shelf
                .chunks()
                .put(&c.sha256, b)
                .map(|_| ())
                .map_err(std::io::Error::other)
        })
        .unwrap();
        shelf.chunks().sync().unwrap();
        shelf.commit(m.encode(), outpost::now_millis()).unwrap()
    }

    /// Sends a command naming `artifact` and waits for it on `conn`.
    async fn deliver(&self, conn: &mut device::DeviceConnection, target: &str, artifact: Digest) {
        self.queue
            .send(SendRequest {
                target: target.into(),
                payload: b"install".to_vec(),
                opts: SendOptions::default(),
                origin: "test".into(),
                signature: Some(envelope::unsigned(Some(artifact.0))),
            })
            .await
            .unwrap();
        match timeout(WAIT, conn.next()).await.unwrap().unwrap() {
            Some(Received::Command(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}

fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_get_identical_files_and_a_new_version_moves_only_changes() {
    let b = start_box().await;
    let v1 = data(3 * 1024 * 1024, 7);
    let d1 = b.shelve(&v1, "1");
    let mut v2 = v1.clone();
    // ~1 %: one run of 32 KiB changed in the middle.
    for x in &mut v2[1_500_000..1_532_768] {
        *x ^= 0x5a;
    }
    let d2 = b.shelve(&v2, "2");
    let mut dirs = Vec::new();
    for i in 0..3 {
        let id = format!("dev-{i}");
        let mut conn = b.connect(&id).await;
        b.deliver(&mut conn, &id, d1).await;
        let dir = tempfile::tempdir().unwrap();
        let f = timeout(WAIT, fetch(conn.connection(), d1, dir.path()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::read(&f.path).unwrap(), v1);
        assert_eq!((f.fetched_bytes, f.reused_bytes), (v1.len() as u64, 0));
        if i == 0 {
            // Not delivered yet on this connection: refused.
            let e = fetch(conn.connection(), d2, dir.path()).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    FetchError::Refused {
                        code: ErrorCode::Forbidden,
                        ..
                    }
                ),
                "{e}"
            );
            b.deliver(&mut conn, &id, d2).await;
            let f2 = timeout(WAIT, fetch(conn.connection(), d2, dir.path()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(std::fs::read(&f2.path).unwrap(), v2);
            assert!(
                f2.fetched_bytes < v2.len() as u64 / 10,
                "fetched {} of {}",
                f2.fetched_bytes,
                v2.len()
            );
            assert_eq!(f2.fetched_bytes + f2.reused_bytes, v2.len() as u64);
        }
        dirs.push((dir, conn));
    }
    b.link.shutdown().await;
    b.queue.shutdown().await;
}

/// A command a device sends naming an artifact holds it like an
/// operator's: the artifact cannot be removed while the command is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sent_command_keeps_its_artifact_while_live() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store"), &StoreOptions::default()).unwrap();
    let acl = outpost::engine::route::Acl::new(vec![outpost::engine::route::AclRule {
        from: vec!["s0".into()],
        to: vec!["d1".into()],
    }])
    .unwrap();
    let queue = queue::open(
        store,
        ServiceOptions {
            acl,
            ..Default::default()
        },
    )
    .unwrap();
    for id in ["s0", "d1"] {
        queue
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
    }
    let shelf = queue.shelf();
    let m = chunk_all(&data(100_000, 4)[..], "cfg", "1", |c, b| {
        shelf
            .chunks()
            .put(&c.sha256, b)
            .map(|_| ())
            .map_err(std::io::Error::other)
    })
    .unwrap();
    let d = shelf.commit(m.encode(), outpost::now_millis()).unwrap();
    let sent = queue
        .device_send(
            "s0".into(),
            SendRequest {
                target: "d1".into(),
                payload: b"apply".to_vec(),
                opts: SendOptions::default(),
                origin: String::new(),
                signature: Some(envelope::unsigned(Some(d.0))),
            },
        )
        .await
        .unwrap();
    let spec = outpost::engine::artifact::ArtifactSpec::Digest(d);
    match queue.remove_artifact(&spec).await {
        Err(queue::QueueError::ArtifactInUse { by, .. }) => assert_eq!(by, sent.id),
        other => panic!("the live command holds it: {other:?}"),
    }
    queue.cancel_queued(sent.id).await.unwrap();
    queue
        .remove_artifact(&spec)
        .await
        .expect("removable once it ended");
    queue.shutdown().await;
}

//! The queue service over a real sled store: the group-commit writer, the
//! device session API, restarts, and payloads read back from the journal.

use outpost::shell::queue::{
    self, Delivery, DeviceSession, QueueError, QueueHandle, SendRequest, ServiceOptions,
};
use outpost::shell::store::{DeviceRecord, Store, StoreOptions};
use outpost::{CommandId, Outcome, Priority, SendOptions, State};
use std::path::Path;
use std::time::Duration;

fn device(id: &str) -> DeviceRecord {
    DeviceRecord::new(id)
}

fn open(dir: &Path) -> QueueHandle {
    let store = Store::open(dir, &StoreOptions::default()).unwrap();
    queue::open(store, ServiceOptions::default()).unwrap()
}

fn req(target: &str, payload: &str, opts: SendOptions) -> SendRequest {
    SendRequest {
        target: target.into(),
        payload: payload.as_bytes().to_vec(),
        opts,
        origin: "test".into(),
        signature: None,
    }
}

async fn next_command(s: &mut DeviceSession) -> outpost::shell::queue::DeliveredCommand {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.rx.recv()).await {
            Ok(Some(Delivery::Command(c))) => return c,
            Ok(Some(Delivery::Cancel(_))) => continue,
            Ok(Some(Delivery::Forward(f))) => panic!("a device was forwarded {f:?}"),
            Ok(None) => panic!("session closed"),
            Err(_) => panic!("no delivery within 10 s"),
        }
    }
}

#[tokio::test]
async fn lifecycle_through_a_session_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    q.enroll(device("d0")).await.unwrap();
    let mut events = q.subscribe();
    let id = q
        .send(req("d0", "hello", SendOptions::default()))
        .await
        .unwrap()
        .id;
    let mut s = q.connect("d0".into(), 0).await.unwrap();
    let c = next_command(&mut s).await;
    assert_eq!(
        (c.id, c.payload.as_slice(), c.attempt),
        (id, &b"hello"[..], 1)
    );
    s.ack(id, Outcome::Ok(b"world".to_vec())).await.unwrap();
    let v = q.show(id).await.unwrap();
    assert_eq!(v.state, State::Succeeded);
    assert_eq!(v.outcome, Some(Outcome::Ok(b"world".to_vec())));
    let seen: Vec<State> = (0..3).map(|_| events.try_recv().unwrap().state).collect();
    assert_eq!(
        seen,
        vec![
            State::Queued,
            State::Delivered { attempt: 1 },
            State::Succeeded
        ]
    );
    drop(s);
    q.shutdown().await;

    let q = open(dir.path());
    let v = q.show(id).await.unwrap();
    assert_eq!(v.state, State::Succeeded, "the result is durable");
    assert_eq!(v.outcome, Some(Outcome::Ok(b"world".to_vec())));
    q.shutdown().await;
}

#[tokio::test]
async fn in_flight_commands_come_back_after_a_restart_with_the_same_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    q.enroll(device("d0")).await.unwrap();
    let a = q
        .send(req("d0", "a", SendOptions::default()))
        .await
        .unwrap()
        .id;
    let b = q
        .send(req(
            "d0",
            "b",
            SendOptions {
                priority: Priority::High,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .id;
    let mut s = q.connect("d0".into(), 0).await.unwrap();
    assert_eq!(next_command(&mut s).await.id, b, "high priority first");
    assert_eq!(next_command(&mut s).await.id, a);
    drop(s);
    q.shutdown().await;

    let q = open(dir.path());
    let mut s = q.connect("d0".into(), 0).await.unwrap();
    let again = [next_command(&mut s).await, next_command(&mut s).await];
    assert_eq!(again.iter().map(|c| c.id).collect::<Vec<_>>(), vec![b, a]);
    assert!(
        again.iter().all(|c| c.attempt == 1),
        "a crash in flight uses no attempt"
    );
    q.shutdown().await;
}

#[tokio::test]
async fn dead_commands_keep_their_payload_for_retry() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    q.enroll(device("d0")).await.unwrap();
    let opts = SendOptions {
        max_attempts: Some(1),
        ..Default::default()
    };
    let id = q.send(req("d0", "flash fw-2.1", opts)).await.unwrap().id;
    let mut s = q.connect("d0".into(), 0).await.unwrap();
    next_command(&mut s).await;
    s.ack(
        id,
        Outcome::Failed {
            code: 2,
            message: "no space".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(q.show(id).await.unwrap().state, State::Dead);
    assert_eq!(q.stats().await.unwrap().dead, 1);
    drop(s);
    q.shutdown().await;

    // Retry after a restart: the payload comes back from the result record.
    let q = open(dir.path());
    let v = q.retry(id).await.unwrap();
    assert_eq!(v.state, State::Queued);
    let mut s = q.connect("d0".into(), 0).await.unwrap();
    let c = next_command(&mut s).await;
    assert_eq!(
        (c.id, c.payload.as_slice(), c.attempt),
        (id, &b"flash fw-2.1"[..], 2),
        "the operator retry is attempt 2, not a redelivery of attempt 1"
    );
    s.ack(id, Outcome::Ok(vec![])).await.unwrap();
    assert_eq!(q.show(id).await.unwrap().state, State::Succeeded);
    let e = q.retry(id).await.unwrap_err();
    assert!(
        matches!(
            e,
            QueueError::InvalidTransition {
                state: State::Succeeded,
                ..
            }
        ),
        "{e}"
    );
    q.shutdown().await;
}

#[tokio::test]
async fn ttl_runs_out_while_the_box_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    q.enroll(device("d0")).await.unwrap();
    let opts = SendOptions {
        ttl_ms: Some(200),
        ..Default::default()
    };
    let id = q.send(req("d0", "x", opts)).await.unwrap().id;
    q.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = open(dir.path());
    let v = q.show(id).await.unwrap();
    assert_eq!(v.state, State::Expired);
    let mut s = q.connect("d0".into(), 0).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), s.rx.recv())
            .await
            .is_err(),
        "an expired command is not delivered"
    );
    q.shutdown().await;
}

#[tokio::test]
async fn a_straggler_is_relocated_and_the_journal_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    q.enroll(device("offline")).await.unwrap();
    q.enroll(device("busy")).await.unwrap();
    let stuck = q
        .send(req("offline", "wait for me", SendOptions::default()))
        .await
        .unwrap()
        .id;
    let mut s = q.connect("busy".into(), 0).await.unwrap();
    for i in 0..300 {
        let id = q
            .send(req("busy", &format!("n{i}"), SendOptions::default()))
            .await
            .unwrap()
            .id;
        assert_eq!(next_command(&mut s).await.id, id);
        s.ack(id, Outcome::Ok(vec![])).await.unwrap();
    }
    let groups = q.stats().await.unwrap().journal_groups;
    assert!(
        groups <= 4,
        "journal bounded by relocation, {groups} groups"
    );
    drop(s);
    q.shutdown().await;
    let q = open(dir.path());
    let mut s = q.connect("offline".into(), 0).await.unwrap();
    let c = next_command(&mut s).await;
    assert_eq!((c.id, c.payload.as_slice()), (stuck, &b"wait for me"[..]));
    q.shutdown().await;
}

#[tokio::test]
async fn refusals_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let e = q
        .send(req("ghost", "x", SendOptions::default()))
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::UnknownDevice(_)));
    assert!(e.to_string().contains("outpost enroll ghost"), "{e}");
    q.enroll(device("d0")).await.unwrap();
    q.revoke("d0".into()).await.unwrap();
    let e = q
        .send(req("d0", "x", SendOptions::default()))
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Revoked(_)) && e.is_refusal());
    let Err(e) = q.connect("d0".into(), 0).await else {
        panic!("revoked device connected")
    };
    assert!(matches!(e, QueueError::Revoked(_)));
    let ghost: CommandId = "01J9ZQ3M8E5V6X7Y8Z9A0B1C2D".parse().unwrap();
    assert!(matches!(q.show(ghost).await, Err(QueueError::NotFound(_))));
    q.shutdown().await;
}

#[tokio::test]
async fn wait_returns_the_end_state_or_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    q.enroll(device("d0")).await.unwrap();
    let id = q
        .send(req("d0", "x", SendOptions::default()))
        .await
        .unwrap()
        .id;
    assert_eq!(
        q.wait(id, Duration::from_millis(100)).await.unwrap(),
        None,
        "times out while queued"
    );
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.wait(id, Duration::from_secs(10)).await })
    };
    let mut s = q.connect("d0".into(), 0).await.unwrap();
    next_command(&mut s).await;
    s.ack(id, Outcome::Ok(b"ok".to_vec())).await.unwrap();
    let v = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("ended before the timeout");
    assert_eq!(v.state, State::Succeeded);
    // Already ended: answered at once.
    let v = q.wait(id, Duration::from_millis(1)).await.unwrap().unwrap();
    assert_eq!(v.outcome, Some(Outcome::Ok(b"ok".to_vec())));
    q.shutdown().await;
}

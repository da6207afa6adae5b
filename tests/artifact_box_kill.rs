//! The box killed -9 in the middle of a device's artifact fetch (issue
//! 24): the artifact is still there when the box comes back, the command
//! that names it is delivered again, and the device fetches only what it
//! had not got, ending with a verified, byte-identical file.

#[path = "common/run.rs"]
mod run;
use run::{json, ok};
#[path = "common/cli_box.rs"]
mod cli_box;
use cli_box::Box_;
use outpost::bench::relay::{Impairment, Relay};
use outpost::device::fetch::{fetch, FetchError};
use outpost::device::{self, ConnectOptions, Received};
use outpost::engine::artifact::Digest;
use rand::{RngCore, SeedableRng};
use std::time::{Duration, Instant};
use tokio::time::timeout;

const SIZE: usize = 8 << 20;

fn cached_bytes(dir: &std::path::Path) -> u64 {
    run::stored_bytes(&dir.join("chunks"))
}

/// Connect through `relay` and wait for the command naming the artifact.
async fn connect_and_receive(
    bundle: &outpost::identity::Bundle,
    relay: &Relay,
) -> device::DeviceConnection {
    // A box killed -9 says nothing: the device learns it by the silence.
    let opts = ConnectOptions {
        server: Some(relay.addr().to_string()),
        idle_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_secs(1),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        match device::connect(bundle, &opts).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "the box did not come back: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    match timeout(Duration::from_secs(30), conn.next()).await {
        Ok(Ok(Some(Received::Command(_)))) => conn,
        other => panic!("expected the artifact's command: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_killed_mid_fetch_serves_the_rest_after_its_restart() {
    let mut b = Box_::start();
    let mut data = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(24).fill_bytes(&mut data);
    let file = b.dir.path().join("fw.img");
    std::fs::write(&file, &data).unwrap();
    let a = json(&b.run(&[
        "artifact",
        "add",
        file.to_str().unwrap(),
        "--name",
        "fw",
        "--version",
        "1",
        "--json",
    ]));
    let digest = Digest::parse(a["digest"].as_str().unwrap()).unwrap();
    ok(&b.enroll("dev-1", "dev-1", &[]));
    ok(&b.run(&["send", "dev-1", "flash", "--artifact", "fw@1"]));
    let bundle = outpost::identity::Bundle::read(&b.bundle_path("dev-1")).unwrap();
    // A slow path, so the kill lands inside the transfer.
    let relay = Relay::start(
        0,
        b.listen.parse().unwrap(),
        Impairment {
            delay: Duration::from_millis(15),
            loss: 0.0,
        },
    )
    .await
    .unwrap();
    let dev = tempfile::tempdir().unwrap();

    let conn = connect_and_receive(&bundle, &relay).await;
    let dir = dev.path().to_path_buf();
    let first = tokio::spawn(async move {
        let r = fetch(conn.connection(), digest, &dir).await;
        drop(conn);
        r
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while cached_bytes(dev.path()) < (SIZE / 8) as u64 {
        assert!(Instant::now() < deadline, "the fetch did not start");
        assert!(
            !first.is_finished(),
            "the fetch ended before the kill: {:?}",
            first.await
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.stop(); // kill -9
    let e = timeout(Duration::from_secs(60), first)
        .await
        .expect("the fetch notices the box is gone")
        .unwrap()
        .expect_err("a fetch cut short is an error, not a file");
    assert!(matches!(e, FetchError::Link(_)), "a link error: {e}");
    let before = cached_bytes(dev.path());
    assert!(before < SIZE as u64, "the kill came before the end");
    assert!(
        std::fs::read_dir(dev.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("fw-")),
        "no file before it is whole and verified"
    );

    b.serve = Some(b.spawn_serve());
    b.wait_ready();
    let shown = json(&b.run(&["artifact", "show", "fw@1", "--json"]));
    assert_eq!(
        shown["digest"], a["digest"],
        "the artifact survived the kill"
    );
    // The command was never acked: it comes again, and so does the fetch.
    let conn = connect_and_receive(&bundle, &relay).await;
    let got = timeout(
        Duration::from_secs(120),
        fetch(conn.connection(), digest, dev.path()),
    )
    .await
    .expect("the second fetch ends")
    .expect("and verifies");
    assert_eq!(std::fs::read(&got.path).unwrap(), data, "byte-identical");
    assert_eq!(got.fetched_bytes + got.reused_bytes, SIZE as u64);
    assert!(
        got.reused_bytes >= before,
        "what arrived before the kill is not fetched again: reused {} of {before}",
        got.reused_bytes
    );
    eprintln!(
        "before the kill: {before} bytes cached; after: {} fetched, {} reused",
        got.fetched_bytes, got.reused_bytes
    );
}

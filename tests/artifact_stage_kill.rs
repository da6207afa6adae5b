//! An edge box killed -9 in the middle of staging an artifact from its hub
//! (issue 25), both boxes real processes: the hub hands the staging again
//! when the edge comes back, the edge fetches only the chunks it had not
//! stored, and the staging ends with the artifact whole on the edge.

#[path = "common/run.rs"]
mod run;
use run::{json, ok, text};
#[path = "common/cli_box.rs"]
mod cli_box;
use cli_box::{wait_for, Box_};
use outpost::bench::relay::{Impairment, Relay};
use rand::{RngCore, SeedableRng};
use std::time::Duration;

const SIZE: usize = 8 << 20;

fn chunk_bytes(b: &Box_) -> u64 {
    run::stored_bytes(&b.dir.path().join("chunks"))
}

#[test]
fn an_edge_killed_mid_staging_fetches_only_what_it_had_not_stored() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hub = Box_::start();
    let mut data = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(251).fill_bytes(&mut data);
    let file = hub.dir.path().join("fw.img");
    std::fs::write(&file, &data).unwrap();
    let a = json(&hub.run(&[
        "artifact",
        "add",
        file.to_str().unwrap(),
        "--name",
        "fw",
        "--version",
        "1",
        "--json",
    ]));
    let bundle = hub.dir.path().join("edge-1.bundle");
    ok(&hub.run(&[
        "enroll",
        "edge-1",
        "--gateway",
        "--out",
        bundle.to_str().unwrap(),
    ]));
    // A thin uplink (3 MB/s), so the kill lands mid-staging.
    let relay = rt
        .block_on(Relay::start_limited(
            0,
            hub.listen.parse().unwrap(),
            Impairment {
                delay: Duration::from_millis(5),
                loss: 0.0,
            },
            3_000_000,
        ))
        .unwrap();
    let upstream = format!("quic://{}", relay.addr());
    let mut edge = Box_::start_with(&[
        "--upstream",
        &upstream,
        "--upstream-bundle",
        bundle.to_str().unwrap(),
    ]);
    let id = ok(&hub.run(&["artifact", "push", "edge-1", "fw@1"]))
        .trim()
        .to_string();
    wait_for(60, "the edge to start staging", || {
        chunk_bytes(&edge) >= (SIZE / 4) as u64
    });
    edge.stop(); // kill -9
    let stored = chunk_bytes(&edge);
    assert!(stored < SIZE as u64, "the kill came before the end");
    edge.serve = Some(edge.spawn_serve());
    edge.wait_ready();
    let mut last = serde_json::Value::Null;
    wait_for(120, "the staging to end on the hub", || {
        last = json(&hub.run(&["show", &id, "--json"]));
        last["state"] == "succeeded" || last["state"] == "failed"
    });
    assert_eq!(last["state"], "succeeded", "{last}\n{}", edge.log());
    // "staged sha256:…: N bytes fetched, M already here"
    let result = last["result"].as_str().unwrap_or_default().to_string();
    let num = |after: &str| -> u64 {
        let i = result.find(after).unwrap_or_else(|| panic!("{result}"));
        result[..i]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{result}"))
    };
    let (fetched, here) = (num(" bytes fetched"), num(" already here"));
    assert_eq!(fetched + here, SIZE as u64, "{result}");
    assert!(
        here >= stored,
        "what the edge had stored before the kill is not fetched again: {here} reused of {stored} stored ({result})"
    );
    let shown = json(&edge.run(&["artifact", "show", "fw@1", "--json"]));
    assert_eq!(
        shown["digest"],
        a["digest"],
        "{}",
        text(&edge.run(&["artifact", "list"]))
    );
    eprintln!("stored {stored} before the kill; then {fetched} fetched, {here} already there");
}

#[test]
fn a_hub_killed_mid_staging_serves_the_rest_after_its_restart() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut hub = Box_::start();
    let mut data = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(252).fill_bytes(&mut data);
    let file = hub.dir.path().join("fw.img");
    std::fs::write(&file, &data).unwrap();
    json(&hub.run(&[
        "artifact",
        "add",
        file.to_str().unwrap(),
        "--name",
        "fw",
        "--version",
        "1",
        "--json",
    ]));
    let bundle = hub.dir.path().join("edge-1.bundle");
    ok(&hub.run(&[
        "enroll",
        "edge-1",
        "--gateway",
        "--out",
        bundle.to_str().unwrap(),
    ]));
    let relay = rt
        .block_on(Relay::start_limited(
            0,
            hub.listen.parse().unwrap(),
            Impairment {
                delay: Duration::from_millis(5),
                loss: 0.0,
            },
            3_000_000,
        ))
        .unwrap();
    let upstream = format!("quic://{}", relay.addr());
    let edge = Box_::start_with(&[
        "--upstream",
        &upstream,
        "--upstream-bundle",
        bundle.to_str().unwrap(),
    ]);
    let id = ok(&hub.run(&["artifact", "push", "edge-1", "fw@1"]))
        .trim()
        .to_string();
    wait_for(60, "the edge to start staging", || {
        chunk_bytes(&edge) >= (SIZE / 4) as u64
    });
    hub.stop(); // kill -9
    let stored = chunk_bytes(&edge);
    assert!(stored < SIZE as u64, "the kill came before the end");
    hub.serve = Some(hub.spawn_serve());
    hub.wait_ready();
    let mut last = serde_json::Value::Null;
    wait_for(120, "the staging to end on the hub", || {
        last = json(&hub.run(&["show", &id, "--json"]));
        last["state"] == "succeeded" || last["state"] == "failed"
    });
    assert_eq!(last["state"], "succeeded", "{last}\n{}", edge.log());
    let result = last["result"].as_str().unwrap_or_default().to_string();
    let here: u64 = result
        .split(", ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{result}"));
    assert!(
        here >= stored,
        "what the edge had stored before the hub died is not fetched again: {here} of {stored} ({result})"
    );
    eprintln!("stored {stored} before the hub's kill; result: {result}");
}

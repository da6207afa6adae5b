//! Artifacts through tiers (issue 25), hub → edge → devices over loopback,
//! each box a real `serve::start`: a hub command for `edge-1/tag:line`
//! naming an artifact makes the edge stage it from the hub once (each
//! chunk crosses the uplink once, counted on the hub), the edge queues the
//! command only once the artifact is whole there, and its devices fetch
//! from the edge, getting byte-identical files.

#[path = "common/run.rs"]
mod run;

use outpost::device::fetch::fetch;
use outpost::device::{self, ConnectOptions, Received};
use outpost::engine::artifact::{chunker::chunk_all, Digest};
use outpost::identity::Bundle;
use outpost::shell::queue::SendRequest;
use outpost::shell::serve::{self, RunningBox, ServeOptions};
use outpost::shell::store::DeviceRecord;
use outpost::shell::upstream::UplinkOptions;
use outpost::{Outcome, SendOptions, State};
use rand::{RngCore, SeedableRng};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn options(dir: &Path) -> ServeOptions {
    let mut o = ServeOptions::new(dir.to_path_buf());
    o.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    o.limits.backoff_base_ms = 20;
    o.limits.backoff_cap_ms = 200;
    o.limits.min_free_disk = 0;
    o
}

async fn enroll(b: &RunningBox, id: &str, tags: &[&str]) -> Bundle {
    let mut rec = DeviceRecord::new(id);
    rec.tags = tags.iter().map(|t| t.to_string()).collect();
    b.queue.enroll(rec).await.unwrap();
    b.identity.issue_device(id, &b.addr.to_string()).unwrap()
}

/// A device that fetches each command's artifact from its box and answers
/// with the file's bytes' SHA-256.
fn device(bundle: Bundle, dir: std::path::PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(mut c) = device::connect(&bundle, &ConnectOptions::default()).await {
                while let Ok(Some(Received::Command(cmd))) = c.next().await {
                    let named = cmd
                        .signature
                        .as_deref()
                        .and_then(|e| outpost::engine::trust::envelope::artifact(e).ok().flatten());
                    let outcome = match named {
                        None => Outcome::Ok(b"no artifact".to_vec()),
                        Some(d) => match fetch(c.connection(), Digest(d), &dir).await {
                            Ok(f) => Outcome::Ok(
                                Digest::of(&std::fs::read(f.path).unwrap())
                                    .to_string()
                                    .into_bytes(),
                            ),
                            Err(e) => Outcome::Failed {
                                code: 1,
                                message: e.to_string(),
                            },
                        },
                    };
                    if c.ack(cmd.id, outcome).await.is_err() {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

fn shelve(b: &RunningBox, data: &[u8]) -> Digest {
    let shelf = b.queue.shelf();
    let m = chunk_all(data, "fw", "2.1", |c, bytes| {
        shelf
            .chunks()
            .put(&c.sha256, bytes)
            .map(|_| ())
            .map_err(std::io::Error::other)
    })
    .unwrap();
    shelf.chunks().sync().unwrap();
    shelf.commit(m.encode(), outpost::now_millis()).unwrap()
}

/// An edge `edge-1` under `hub`, its uplink to `via` (the hub, or a relay
/// in front of it).
async fn edge_under(hub: &RunningBox, dir: &Path, via: SocketAddr) -> RunningBox {
    edge_paced(hub, dir, via, None).await
}

/// [`edge_under`] with an uplink budget for artifact bytes.
async fn edge_paced(
    hub: &RunningBox,
    dir: &Path,
    via: SocketAddr,
    rate: Option<u64>,
) -> RunningBox {
    let mut gw = DeviceRecord::new("edge-1");
    gw.tags.push(outpost::engine::route::GATEWAY_TAG.into());
    hub.queue.enroll(gw).await.unwrap();
    let bundle = dir.join("upstream.bundle");
    std::fs::write(
        &bundle,
        hub.identity
            .issue_device("edge-1", &hub.addr.to_string())
            .unwrap()
            .to_text(),
    )
    .unwrap();
    let mut o = options(dir);
    let mut u = UplinkOptions::new(bundle, Some(via.to_string()));
    u.min_backoff = Duration::from_millis(50);
    u.max_backoff = Duration::from_millis(300);
    u.idle_timeout = Duration::from_secs(2);
    u.artifact_rate = rate;
    o.upstream = Some((u, 100_000));
    serve::start(o).await.unwrap()
}

fn unique_bytes(b: &RunningBox, artifact: &Digest) -> u64 {
    let m = b.queue.shelf().manifest(artifact).unwrap().unwrap();
    let mut seen = std::collections::HashSet::new();
    m.chunks
        .iter()
        .filter(|c| seen.insert(c.sha256))
        .map(|c| u64::from(c.len))
        .sum()
}

async fn send_naming(b: &RunningBox, target: &str, artifact: Digest) -> outpost::CommandId {
    b.queue
        .send(SendRequest {
            target: target.into(),
            payload: b"flash".to_vec(),
            opts: SendOptions::default(),
            origin: "test".into(),
            signature: Some(outpost::engine::trust::envelope::unsigned(Some(artifact.0))),
        })
        .await
        .unwrap()
        .id
}

async fn succeeds(b: &RunningBox, id: outpost::CommandId) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let v = loop {
        let v = b.queue.show(id).await.unwrap();
        if v.state.is_final() {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} did not end: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(v.state, State::Succeeded, "{v:?}");
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_stages_a_hub_artifact_once_and_its_devices_fetch_it_there() {
    let (hub_dir, edge_dir, dev_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let hub = serve::start(options(hub_dir.path())).await.unwrap();
    let edge = edge_under(&hub, edge_dir.path(), hub.addr).await;
    let mut devices = Vec::new();
    for i in 0..3 {
        let b = enroll(&edge, &format!("d{i}"), &["line"]).await;
        devices.push(device(b, dev_dir.path().join(format!("d{i}"))));
    }

    let data = random(3 << 20, 25);
    let artifact = shelve(&hub, &data);
    let unique = unique_bytes(&hub, &artifact);
    let first = send_naming(&hub, "edge-1/tag:line", artifact).await;
    let second = send_naming(&hub, "edge-1/d0", artifact).await;
    let want = Digest::of(&data);
    succeeds(&hub, first).await;
    succeeds(&hub, second).await;
    // Every device ran the verified file.
    for i in 0..3 {
        let got = std::fs::read(dev_dir.path().join(format!("d{i}")).join("fw-2.1")).unwrap();
        assert_eq!(Digest::of(&got), want, "d{i} has the file byte for byte");
    }
    assert!(
        edge.queue
            .shelf()
            .manifest_bytes(&artifact)
            .unwrap()
            .is_some(),
        "the edge holds the artifact"
    );
    // The uplink carried each chunk once, for two commands and three
    // devices; the devices' bytes came from the edge.
    let hub_sent = hub.link.stats().chunk_bytes_served.load(Ordering::Relaxed);
    assert_eq!(hub_sent, unique, "each chunk crossed the uplink once");
    let edge_sent = edge.link.stats().chunk_bytes_served.load(Ordering::Relaxed);
    assert_eq!(edge_sent, 3 * unique, "each device fetched from the edge");
    for d in devices {
        d.abort();
    }
    edge.stop().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uplink_cut_mid_staging_resumes_without_resending_what_arrived() {
    let (hub_dir, edge_dir, dev_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let hub = serve::start(options(hub_dir.path())).await.unwrap();
    // A thin uplink (4 MB/s), so the cut lands mid-staging.
    let relay = outpost::bench::relay::Relay::start_limited(
        0,
        hub.addr,
        outpost::bench::relay::Impairment {
            delay: Duration::from_millis(5),
            loss: 0.0,
        },
        4_000_000,
    )
    .await
    .unwrap();
    let edge = edge_under(&hub, edge_dir.path(), relay.addr()).await;
    let b = enroll(&edge, "d0", &[]).await;
    let dev = device(b, dev_dir.path().join("d0"));
    let data = random(8 << 20, 26);
    let artifact = shelve(&hub, &data);
    let unique = unique_bytes(&hub, &artifact);
    let id = send_naming(&hub, "edge-1/d0", artifact).await;
    let held = || edge.queue.shelf().chunks().bytes();
    let deadline = tokio::time::Instant::now() + WAIT;
    while held() < unique / 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the staging did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The edge reports its staging up: `show` on the hub says how far.
    let deadline = tokio::time::Instant::now() + WAIT;
    let p = loop {
        if let Some(p) = hub.queue.show(id).await.unwrap().progress {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress on the hub"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(p.artifact.as_deref(), Some("fw@2.1"), "{p:?}");
    assert_eq!(p.total, data.len() as u64, "{p:?}");
    relay.set_cut(true);
    // The edge takes the hub as gone after its 2 s idle timeout; nothing
    // moves meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (arrived, served) = (
        held(),
        hub.link.stats().chunk_bytes_served.load(Ordering::Relaxed),
    );
    assert!(arrived < unique, "the cut came before the end");
    assert!(
        edge.queue.show(id).await.is_err(),
        "the command is not queued on the edge before its artifact is whole"
    );
    relay.set_cut(false);
    succeeds(&hub, id).await;
    let resent = hub.link.stats().chunk_bytes_served.load(Ordering::Relaxed) - served;
    assert_eq!(
        resent,
        unique - arrived,
        "after the cut only what had not arrived crossed the uplink"
    );
    let got = std::fs::read(dev_dir.path().join("d0").join("fw-2.1")).unwrap();
    assert_eq!(Digest::of(&got), Digest::of(&data));
    eprintln!("staged {arrived} of {unique} bytes before the cut; {resent} after it");
    dev.abort();
    edge.stop().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_pushed_to_an_edge_is_staged_ahead_of_any_command() {
    let (hub_dir, edge_dir, dev_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let hub = serve::start(options(hub_dir.path())).await.unwrap();
    let edge = edge_under(&hub, edge_dir.path(), hub.addr).await;
    let data = random(2 << 20, 27);
    let artifact = shelve(&hub, &data);
    let unique = unique_bytes(&hub, &artifact);
    // The operator's command on the hub, as the binary runs it.
    let dir = hub_dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        run::outpost(
            &dir,
            &[
                "artifact", "push", "edge-1", "fw@2.1", "--wait", "60s", "--json",
            ],
        )
    })
    .await
    .unwrap();
    let v = run::json(&out);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(
        v["result"].as_str().unwrap_or_default().contains("staged"),
        "{v}"
    );
    assert!(
        edge.queue
            .shelf()
            .manifest_bytes(&artifact)
            .unwrap()
            .is_some(),
        "the edge holds it before any command names it"
    );
    assert_eq!(
        hub.link.stats().chunk_bytes_served.load(Ordering::Relaxed),
        unique
    );
    // A command for a device under the edge moves nothing more over the
    // uplink.
    let b = enroll(&edge, "d0", &[]).await;
    let dev = device(b, dev_dir.path().join("d0"));
    let id = send_naming(&hub, "edge-1/d0", artifact).await;
    succeeds(&hub, id).await;
    assert_eq!(
        hub.link.stats().chunk_bytes_served.load(Ordering::Relaxed),
        unique,
        "staged once"
    );
    // Pushed again: nothing crosses, and the result says it was there.
    let dir = hub_dir.path().to_path_buf();
    let again = tokio::task::spawn_blocking(move || {
        run::outpost(
            &dir,
            &[
                "artifact", "push", "edge-1", "fw@2.1", "--wait", "60s", "--json",
            ],
        )
    })
    .await
    .unwrap();
    let v = run::json(&again);
    assert_eq!(v["state"], "succeeded", "{v}");
    let want = format!("0 bytes fetched, {} already here", data.len());
    assert!(
        v["result"].as_str().unwrap_or_default().ends_with(&want),
        "{v}"
    );
    // A push that names no artifact says what to do.
    let bare = hub
        .queue
        .send(SendRequest {
            target: "edge-1/artifact".into(),
            payload: b"stage".to_vec(),
            opts: SendOptions::default(),
            origin: "test".into(),
            signature: None,
        })
        .await
        .unwrap()
        .id;
    let deadline = tokio::time::Instant::now() + WAIT;
    let v = loop {
        let v = hub.queue.show(bare).await.unwrap();
        if v.state.is_final() {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(v.state, State::Failed, "{v:?}");
    assert!(
        matches!(&v.outcome, Some(Outcome::Rejected { reason }) if reason.contains("artifact push")),
        "says what to do: {v:?}"
    );
    dev.abort();
    edge.stop().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_keeps_to_the_uplink_budget_and_commands_do_not_wait_for_it() {
    let (hub_dir, edge_dir, dev_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let hub = serve::start(options(hub_dir.path())).await.unwrap();
    let rate = 1 << 20;
    let edge = edge_paced(&hub, edge_dir.path(), hub.addr, Some(rate)).await;
    let b = enroll(&edge, "d0", &[]).await;
    let dev = device(b, dev_dir.path().join("d0"));
    let size = 3 << 20;
    let artifact = shelve(&hub, &random(size, 28));
    let started = tokio::time::Instant::now();
    let push = send_naming(&hub, "edge-1/artifact", artifact).await;
    // While it stages, a plain command goes down and back at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ping = hub
        .queue
        .send(SendRequest {
            target: "edge-1/d0".into(),
            payload: b"ping".to_vec(),
            opts: SendOptions::default(),
            origin: "test".into(),
            signature: None,
        })
        .await
        .unwrap()
        .id;
    succeeds(&hub, ping).await;
    assert!(
        !hub.queue.show(push).await.unwrap().state.is_final(),
        "the command did not wait for the staging"
    );
    succeeds(&hub, push).await;
    let took = started.elapsed();
    // The pacer lets a quarter second's worth (or a chunk) go at once, the
    // rest at the rate: it cannot be faster than that, however fast the
    // machine (a lower bound, not a timing assertion).
    let burst = (rate / 4).max(256 * 1024);
    let least = Duration::from_secs_f64((size as u64 - burst) as f64 / rate as f64);
    assert!(
        took >= least,
        "{took:?} for {size} bytes at {rate} B/s (at least {least:?})"
    );
    eprintln!(
        "staged {size} bytes in {took:?}: {:.0} B/s against a budget of {rate}",
        size as f64 / took.as_secs_f64()
    );
    dev.abort();
    edge.stop().await;
    hub.stop().await;
}

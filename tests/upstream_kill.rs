//! Upstream sync under kill -9: the real binary as hub and as edge, a real
//! `outpost device --exec` on the edge that appends each payload it runs to
//! a file, and SIGKILL of each box, several times, while commands flow both
//! ways. At the end every command ended `succeeded` on the hub, each result
//! is in the hub's store once, and the device ran each payload once.

use outpost::bench::relay::{Impairment, Relay};
use outpost::shell::store::{Group, Store, StoreOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/run.rs"]
mod run;
use run::{json, ok, outpost, BIN};

use run::free_port;

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `outpost serve` in `dir`, ready once its admin socket answers.
fn serve(dir: &Path, port: u16, extra: &[&str]) -> Child {
    serve_in(None, dir, port, extra)
}

/// A command of the binary, inside network namespace `ns` when given.
fn bin_in(ns: Option<&str>) -> Command {
    match ns {
        None => Command::new(BIN),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
    }
}

fn serve_in(ns: Option<&str>, dir: &Path, port: u16, extra: &[&str]) -> Child {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--backoff-base",
        "50ms",
        "--backoff-cap",
        "300ms",
    ];
    args.extend_from_slice(extra);
    let mut child = bin_in(ns)
        .args(&args)
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if outpost(dir, &["status", "--json"]).status.success() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the box in {} did not start within 30 s", dir.display());
}

fn send_lines(dir: &Path, target: &str, prefix: &str, n: usize, tmp: &Path) -> Vec<String> {
    let file = tmp.join(format!("{prefix}.lines"));
    let lines: String = (0..n).map(|i| format!("{prefix}-{i}\n")).collect();
    std::fs::write(&file, lines).unwrap();
    ok(&outpost(
        dir,
        &["send", target, "--lines", file.to_str().unwrap()],
    ))
    .lines()
    .map(str::to_string)
    .collect()
}

fn results_on_disk(dir: &Path) -> HashMap<String, Vec<String>> {
    let store = Store::open(dir, &StoreOptions::default()).unwrap();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for g in store.replay() {
        if let Group::Results(_, rs) = g.unwrap() {
            for r in rs {
                out.entry(r.id.to_string())
                    .or_default()
                    .push(format!("{} {}", r.state, r.device));
            }
        }
    }
    out
}

/// Hub and edge (and the edge's exec device) in `ns` or on this host's
/// loopback: commands both ways, `kills` rounds of SIGKILL of each box, then
/// every command must end once on the hub and run once on the device.
fn sync_under_faults(
    ns: Option<&str>,
    uplink: Option<Impairment>,
    n: usize,
    kill_rounds: usize,
    wait: Duration,
) {
    let tmp = tempfile::tempdir().unwrap();
    let (hub_dir, edge_dir) = (tmp.path().join("hub"), tmp.path().join("edge"));
    let (hub_port, edge_port) = (free_port(), free_port());
    // The uplink through an impaired relay, when asked.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = uplink.map(|imp| {
        rt.block_on(Relay::start(
            0,
            std::net::SocketAddr::from(([127, 0, 0, 1], hub_port)),
            imp,
        ))
        .unwrap()
    });
    let up_port = relay.as_ref().map_or(hub_port, |r| r.addr().port());
    let runs: PathBuf = tmp.path().join("runs");
    let mut hub = serve_in(ns, &hub_dir, hub_port, &[]);
    let gw = tmp.path().join("e1.bundle");
    ok(&outpost(
        &hub_dir,
        &["enroll", "e1", "--gateway", "--out", gw.to_str().unwrap()],
    ));
    let upstream = format!("quic://127.0.0.1:{up_port}");
    let edge_args = [
        "--upstream",
        upstream.as_str(),
        "--upstream-bundle",
        gw.to_str().unwrap(),
    ];
    let mut edge = serve_in(ns, &edge_dir, edge_port, &edge_args);
    let d0 = tmp.path().join("d0.bundle");
    ok(&outpost(
        &edge_dir,
        &["enroll", "d0", "--out", d0.to_str().unwrap()],
    ));
    // One small O_APPEND write per run: concurrent runs do not interleave.
    let exec = format!("line=$(cat); echo \"$line\" >> {}", runs.display());
    let device = bin_in(ns)
        .args(["device", "--bundle", d0.to_str().unwrap(), "--exec", &exec])
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _device = Procs(vec![device]);

    let mut ids = send_lines(&hub_dir, "e1/d0", "down", n, tmp.path());
    ids.extend(send_lines(&edge_dir, "d0", "local", n, tmp.path()));
    let mut kills = 0;
    for _ in 0..kill_rounds {
        std::thread::sleep(Duration::from_millis(150));
        edge.kill().unwrap(); // SIGKILL
        edge.wait().unwrap();
        edge = serve_in(ns, &edge_dir, edge_port, &edge_args);
        std::thread::sleep(Duration::from_millis(150));
        hub.kill().unwrap();
        hub.wait().unwrap();
        hub = serve_in(ns, &hub_dir, hub_port, &[]);
        kills += 2;
    }
    let started = Instant::now();
    // Everything ends on the hub (bounded wait).
    let deadline = Instant::now() + wait;
    for id in &ids {
        loop {
            let o = outpost(&hub_dir, &["show", id, "--json"]);
            if o.status.success() {
                let v = json(&o);
                if v["state"] == "succeeded" {
                    assert_eq!(v["device"], "e1/d0", "{v}");
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not succeed on the hub: {}\nedge status: {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&outpost(&edge_dir, &["status", "--json"]).stdout)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let settled = started.elapsed();
    let status = json(&outpost(&edge_dir, &["status", "--json"]));
    assert_eq!(status["uplink"], "connected", "{status}");
    // The hub's view of its edge: its outbox applied, and online once the
    // edge is back from the hub's last restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hub_status = json(&outpost(&hub_dir, &["status", "--json"]));
        let e1 = &hub_status["edges"][0];
        assert_eq!(e1["name"], "e1", "{hub_status}");
        assert!(e1["cursor"].as_u64().unwrap() > 0, "{hub_status}");
        if e1["online"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the edge is not online on the hub: {hub_status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = ok(&outpost(&hub_dir, &["status"]));
    assert!(
        text.contains("edge e1") && text.contains("online, outbox applied through"),
        "{text}"
    );
    // Stop both cleanly to read their stores.
    for c in [&mut hub, &mut edge] {
        let term = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        c.wait().unwrap();
    }
    let on_hub = results_on_disk(&hub_dir);
    for id in &ids {
        assert_eq!(
            on_hub.get(id),
            Some(&vec!["succeeded e1/d0".to_string()]),
            "{id} recorded once on the hub"
        );
    }
    let text = std::fs::read_to_string(&runs).unwrap();
    let mut counts: HashMap<&str, u32> = HashMap::new();
    for l in text.lines() {
        *counts.entry(l).or_default() += 1;
    }
    assert_eq!(
        counts.len(),
        ids.len(),
        "the device ran exactly the commands sent"
    );
    assert!(
        counts.values().all(|&n| n == 1),
        "a payload ran twice: {counts:?}"
    );
    eprintln!(
        "{kills} kill -9s survived; {} commands, each run once; all ended {:.1} s after the last restart",
        ids.len(),
        settled.as_secs_f64()
    );
}

#[test]
fn kill_9_of_edge_and_hub_mid_sync_loses_and_repeats_nothing() {
    sync_under_faults(None, None, 150, 3, Duration::from_secs(90));
}

#[test]
fn sync_through_a_relay_with_300_ms_round_trips_and_10_percent_loss() {
    // Where the kernel has no netem: a loopback relay that delays and drops
    // the uplink's datagrams, both ways, through kills of both boxes.
    let imp = Impairment {
        delay: Duration::from_millis(150),
        loss: 0.10,
    };
    sync_under_faults(None, Some(imp), 60, 1, Duration::from_secs(240));
}

/// A network namespace of this test's own, removed on drop.
struct Netns(String);

impl Netns {
    /// `None` (and why) where namespaces cannot be made: not root, no `ip`,
    /// no netem.
    fn new(delay_ms: u32, loss_pct: u32) -> Result<Netns, String> {
        let name = format!("outpost-test-{}", std::process::id());
        let run = |args: &[&str]| -> Result<(), String> {
            let o = Command::new(args[0])
                .args(&args[1..])
                .output()
                .map_err(|e| format!("{}: {e}", args.join(" ")))?;
            if o.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
        };
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns(name);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"])?;
        // Every packet on the namespace's loopback is delayed and some are
        // lost: both directions of every link in it.
        let delay = format!("{delay_ms}ms");
        let loss = format!("{loss_pct}%");
        run(&[
            "tc", "-n", &ns.0, "qdisc", "add", "dev", "lo", "root", "netem", "delay", &delay,
            "loss", &loss,
        ])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn sync_over_a_lossy_slow_link_loses_and_repeats_nothing() {
    // 150 ms each way (300 ms round trip) and 10% loss, on the loopback of
    // a namespace this test makes: no address outside it is used.
    let ns = match Netns::new(150, 10) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIPPED: cannot make a network namespace with netem here ({why}); run as root with iproute2 and the sch_netem module");
            return;
        }
    };
    sync_under_faults(Some(&ns.0), None, 40, 1, Duration::from_secs(240));
}

#[test]
fn a_box_restarted_after_kill_9_resets_the_connections_of_its_previous_run() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut b = serve(tmp.path(), port, &[]);
    let file = tmp.path().join("d0.bundle");
    ok(&outpost(
        tmp.path(),
        &["enroll", "d0", "--out", file.to_str().unwrap()],
    ));
    let bundle = outpost::identity::Bundle::read(&file).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt
        .block_on(outpost::device::connect(
            &bundle,
            &outpost::device::ConnectOptions::default(),
        ))
        .unwrap();
    b.kill().unwrap(); // SIGKILL: no CONNECTION_CLOSE reaches the device
    b.wait().unwrap();
    let mut b = serve(tmp.path(), port, &[]);
    // The device's next packet meets the new run, which knows the old
    // run's reset key: the device learns at once, not after its 25 s idle
    // timeout.
    let closed = rt.block_on(async {
        let _ = c.sender().send(&outpost::proto::DeviceFrame::Ping).await;
        tokio::time::timeout(Duration::from_secs(20), c.connection().closed()).await
    });
    let _ = b.kill();
    let _ = b.wait();
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::Reset)),
        "expected a stateless reset, got {closed:?}"
    );
}

//! Crash loop: the real box under steady load from senders (over its admin
//! socket) and from three `outpost device --exec` agents, SIGKILLed at
//! random instants and restarted each time. At the end every command whose
//! enqueue was acknowledged ended once (`succeeded`, one result record in
//! the store), every device ran each of its commands exactly once (the
//! agent dedupes by id; its exec appends the payload to a file), and
//! nothing ran that was not sent.
//!
//! CI runs 20 kills; `OUTPOST_CRASH_KILLS=200 cargo test --release --test
//! crash_loop -- --nocapture` is the long run.

use outpost::shell::admin::{AdminClient, AdminRequest, AdminResponse};
use outpost::shell::queue::SendRequest;
use outpost::shell::store::{Group, Store, StoreOptions};
use outpost::SendOptions;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const DEVICES: usize = 3;

#[path = "common/run.rs"]
mod run;
use run::free_port;

fn serve(dir: &Path, port: u16) -> Child {
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &listen,
            "--backoff-base",
            "50ms",
            "--backoff-cap",
            "200ms",
            "--min-free-disk",
            "0",
        ])
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ok = Command::new(BIN)
            .args(["status", "--json"])
            .env("OUTPOST_DATA_DIR", dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the box did not start within 30 s");
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the senders did: every payload they tried, and the id of each one
/// whose enqueue was acknowledged.
#[derive(Default)]
struct Sent {
    tried: HashSet<String>,
    acked: HashMap<String, String>,
}

/// A sender: enqueues over the admin socket until told to stop,
/// reconnecting whenever the box is gone.
async fn sender(
    dir: PathBuf,
    n: usize,
    sent: Arc<Mutex<Sent>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok(mut admin) = AdminClient::connect(&dir).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let payload = format!("s{n}-{i}");
            i += 1;
            sent.lock().unwrap().tried.insert(payload.clone());
            let req = AdminRequest::Send(SendRequest {
                target: format!("d{}", i % DEVICES),
                payload: payload.clone().into_bytes(),
                opts: SendOptions {
                    max_attempts: Some(1000),
                    ..Default::default()
                },
                origin: "crash-loop".into(),
                signature: None,
            });
            match admin.call(&req).await {
                Ok(AdminResponse::Receipt(r)) => {
                    sent.lock().unwrap().acked.insert(payload, r.id.to_string());
                    // Steady load, not a flood: the devices (a shell per
                    // command) keep up, so the backlog stays bounded.
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
                // The box died under the request: not acknowledged.
                _ => break,
            }
        }
    }
}

fn results_on_disk(dir: &Path) -> HashMap<String, Vec<String>> {
    let store = Store::open(dir, &StoreOptions::default()).unwrap();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for g in store.replay() {
        if let Group::Results(_, rs) = g.unwrap() {
            for r in rs {
                out.entry(r.id.to_string())
                    .or_default()
                    .push(r.state.to_string());
            }
        }
    }
    out
}

#[test]
fn a_box_killed_at_random_under_load_ends_every_acknowledged_command_once() {
    let kills: usize = std::env::var("OUTPOST_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("box");
    let port = free_port();
    let runs = tmp.path().join("runs");
    let mut b = serve(&dir, port);
    let mut agents = Vec::new();
    for d in 0..DEVICES {
        let bundle = tmp.path().join(format!("d{d}.bundle"));
        let o = Command::new(BIN)
            .args([
                "enroll",
                &format!("d{d}"),
                "--out",
                bundle.to_str().unwrap(),
            ])
            .env("OUTPOST_DATA_DIR", &dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        // One O_APPEND write per run, so concurrent runs do not interleave.
        let exec = format!("line=$(cat); echo \"$line\" >> {}", runs.display());
        agents.push(
            Command::new(BIN)
                .args([
                    "device",
                    "--bundle",
                    bundle.to_str().unwrap(),
                    "--exec",
                    &exec,
                ])
                .env("OUTPOST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let _agents = Procs(agents);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let sent = Arc::new(Mutex::new(Sent::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for n in 0..4 {
        rt.spawn(sender(dir.clone(), n, sent.clone(), stop.clone()));
    }
    // Kill at random instants (seeded, so a failure can be replayed).
    let mut seed: u64 = 0xC0FF_EE00_5EED;
    let started = Instant::now();
    for _ in 0..kills {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 400));
        b.kill().unwrap(); // SIGKILL
        b.wait().unwrap();
        b = serve(&dir, port);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    let (tried, acked) = {
        let s = sent.lock().unwrap();
        (s.tried.clone(), s.acked.clone())
    };
    assert!(
        acked.len() > kills,
        "the senders got through: {}",
        acked.len()
    );

    // Every acknowledged command ends (bounded wait), succeeded.
    let drain = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120 + acked.len() as u64 / 200);
    rt.block_on(async {
        let mut admin = AdminClient::connect(&dir).await.unwrap();
        for id in acked.values() {
            let id = id.parse().unwrap();
            loop {
                match admin.call(&AdminRequest::Show(id)).await.unwrap() {
                    AdminResponse::View(v) if v.state.is_final() => {
                        assert_eq!(v.state, outpost::State::Succeeded, "{v:?}");
                        break;
                    }
                    other => {
                        assert!(
                            Instant::now() < deadline,
                            "{id} did not end in time: {other:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    });
    let term = Command::new("kill")
        .args(["-TERM", &b.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    b.wait().unwrap();

    let results = results_on_disk(&dir);
    for id in acked.values() {
        assert_eq!(
            results.get(id).map(Vec::as_slice),
            Some(&["succeeded".to_string()][..]),
            "{id}: exactly one end"
        );
    }
    let text = std::fs::read_to_string(&runs).unwrap_or_default();
    let mut ran: HashMap<&str, u32> = HashMap::new();
    for l in text.lines() {
        *ran.entry(l).or_default() += 1;
    }
    for (payload, n) in &ran {
        assert_eq!(*n, 1, "{payload} ran {n} times");
        assert!(tried.contains(*payload), "{payload} ran but was never sent");
    }
    for payload in acked.keys() {
        assert!(
            ran.contains_key(payload.as_str()),
            "{payload} was acknowledged but never ran"
        );
    }
    eprintln!(
        "{kills} kills in {:.1} s (then {:.1} s to drain): {} commands acknowledged, {} tried, {} ran, each once",
        started.elapsed().as_secs_f64(),
        drain.elapsed().as_secs_f64(),
        acked.len(),
        tried.len(),
        ran.len()
    );
}

/// A 5-step workflow, the box SIGKILLed at 10 random instants while it
/// runs: it resumes after each restart, ends `succeeded`, and each step ran
/// exactly once on the device.
#[test]
fn a_workflow_survives_kill_9_at_random_points_and_runs_each_step_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("box");
    let port = free_port();
    let runs = tmp.path().join("runs");
    let mut b = serve(&dir, port);
    let bundle = tmp.path().join("d0.bundle");
    let o = Command::new(BIN)
        .args(["enroll", "d0", "--out", bundle.to_str().unwrap()])
        .env("OUTPOST_DATA_DIR", &dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    // Each step takes a while, so the kills land inside steps too.
    let exec = format!(
        "line=$(cat); sleep 0.15; echo \"$line\" >> {}; echo ok",
        runs.display()
    );
    let _agent = Procs(vec![Command::new(BIN)
        .args([
            "device",
            "--bundle",
            bundle.to_str().unwrap(),
            "--exec",
            &exec,
        ])
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()]);
    let wf = tmp.path().join("five.toml");
    let mut text = String::from("name = \"five\"\n");
    for i in 1..=5 {
        text.push_str(&format!(
            "[steps.s{i}]\ntarget = \"d0\"\npayload = \"step-{i}\"\n"
        ));
        if i > 1 {
            text.push_str(&format!("needs = [\"s{}\"]\n", i - 1));
        }
    }
    std::fs::write(&wf, text).unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("OUTPOST_DATA_DIR", &dir)
            .output()
            .unwrap()
    };
    let o = run(&["workflow", "run", wf.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let mut seed: u64 = 0x005E_ED0F_F1FE;
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 200));
        b.kill().unwrap(); // SIGKILL
        b.wait().unwrap();
        b = serve(&dir, port);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let o = run(&["workflow", "show", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if v["state"] != "running" && !v.is_null() {
            break v;
        }
        assert!(Instant::now() < deadline, "the workflow did not end: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = b.kill();
    let _ = b.wait();
    assert_eq!(v["state"], "succeeded", "{v}");
    let text = std::fs::read_to_string(&runs).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec!["step-1", "step-2", "step-3", "step-4", "step-5"],
        "each step once, in order"
    );
}

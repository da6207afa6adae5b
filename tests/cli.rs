//! Black-box tests of the real binary: a box in a temp dir on a loopback
//! port, devices run as `outpost device`, and the operator CLI against them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/run.rs"]
mod run;
use run::{json, ok, outpost, BIN};

struct Box_ {
    dir: tempfile::TempDir,
    serve: Child,
    devices: Vec<Child>,
}

impl Drop for Box_ {
    fn drop(&mut self) {
        for d in &mut self.devices {
            let _ = d.kill();
            let _ = d.wait();
        }
        run::stop(&mut self.serve);
    }
}

fn spawn_serve(dir: &Path) -> Child {
    spawn_serve_with(dir, None)
}

fn spawn_serve_with(dir: &Path, config: Option<&Path>) -> Child {
    let mut cmd = Command::new(BIN);
    if let Some(c) = config {
        cmd.env("OUTPOST_CONFIG", c);
    }
    let mut child = cmd
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--backoff-base",
            "100ms",
            "--backoff-cap",
            "500ms",
        ])
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve");
    // Ready once the admin socket answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if outpost(dir, &["status", "--json"]).status.success() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the box did not start within 30 s");
}

fn start_box() -> Box_ {
    let dir = tempfile::tempdir().unwrap();
    let serve = spawn_serve(dir.path());
    Box_ {
        dir,
        serve,
        devices: Vec::new(),
    }
}

impl Box_ {
    fn run(&self, args: &[&str]) -> Output {
        outpost(self.dir.path(), args)
    }

    fn enroll(&self, id: &str) -> PathBuf {
        let out = self.dir.path().join(format!("{id}.bundle"));
        ok(&self.run(&["enroll", id, "--tag", "t1", "--out", out.to_str().unwrap()]));
        out
    }

    fn device(&mut self, id: &str, handler: &[&str]) {
        let bundle = self.enroll(id);
        let mut args = vec!["device", "--bundle", bundle.to_str().unwrap()];
        args.extend_from_slice(handler);
        let child = Command::new(BIN)
            .args(&args)
            .env("OUTPOST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.devices.push(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ds = json(&self.run(&["devices", "--json"]));
            if ds
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["id"] == id && d["online"] == true)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("device {id} did not come online within 30 s");
    }
}

#[test]
fn send_wait_show_queue_status_and_their_json() {
    let mut b = start_box();
    b.device("echo-1", &["--echo"]);
    let r = json(&b.run(&["send", "echo-1", "hello", "--wait", "20s", "--json"]));
    assert_eq!(r["state"], "succeeded");
    assert_eq!(r["result"], "hello");
    let id = r["id"].as_str().unwrap().to_string();

    let v = json(&b.run(&["show", &id, "--json"]));
    for k in [
        "id",
        "target",
        "state",
        "priority",
        "attempts",
        "created_at",
        "result",
        "error",
    ] {
        assert!(v.get(k).is_some(), "show --json lacks {k}: {v}");
    }
    assert_eq!(v["target"], "echo-1");
    assert_eq!(v["attempts"], 1);
    assert!(ok(&b.run(&["show", &id])).contains("succeeded"));

    let s = json(&b.run(&["status", "--json"]));
    for k in [
        "version",
        "uptime_s",
        "devices_total",
        "devices_online",
        "queued",
        "in_flight",
        "dead",
        "uplink",
        "outbox",
        "disk_bytes",
    ] {
        assert!(s.get(k).is_some(), "status --json lacks {k}: {s}");
    }
    assert_eq!(s["devices_online"], 1);

    let ds = json(&b.run(&["devices", "--json"]));
    let d = &ds.as_array().unwrap()[0];
    for k in [
        "id",
        "online",
        "tags",
        "caps",
        "last_seen",
        "queued",
        "in_flight",
    ] {
        assert!(d.get(k).is_some(), "devices --json lacks {k}: {d}");
    }
    assert_eq!(d["tags"], serde_json::json!(["t1"]));

    // A device that is offline: its queue lists commands in delivery order.
    b.enroll("offline-1");
    let low = ok(&b.run(&["send", "offline-1", "a", "--priority", "low"]))
        .trim()
        .to_string();
    let high = ok(&b.run(&["send", "offline-1", "b", "--priority", "high"]))
        .trim()
        .to_string();
    let q = json(&b.run(&["queue", "offline-1", "--json"]));
    let ids: Vec<&str> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![high.as_str(), low.as_str()]);
    assert!(ok(&b.run(&["queue", "offline-1"])).contains("high"));
}

#[test]
fn exit_codes_follow_the_contract() {
    let mut b = start_box();
    b.device(
        "fail-1",
        &["--exec", "cat >/dev/null; echo broken >&2; exit 7"],
    );
    b.enroll("offline-1");

    // 6: ended without success (dead after its only attempt).
    let o = b.run(&[
        "send",
        "fail-1",
        "x",
        "--max-attempts",
        "1",
        "--wait",
        "20s",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "dead");
    let dead = v["id"].as_str().unwrap().to_string();

    // 4: --wait timed out (the device is offline).
    let o = b.run(&["send", "offline-1", "x", "--wait", "300ms"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("did not end within"));

    // 3: not found.
    let o = b.run(&["send", "nobody", "x"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("outpost enroll nobody"));
    let o = b.run(&["show", "01J9ZQ3M8E5V6X7Y8Z9A0B1C2D"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");

    // 5: refused (revoked).
    ok(&b.run(&["revoke", "offline-1"]));
    let o = b.run(&["send", "offline-1", "x"]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");

    // 2: usage.
    let o = b.run(&["send"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = b.run(&["send", "fail-1", "x", "--priority", "urgent"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");

    // 1: a bad transition, with the reason.
    let o = b.run(&["cancel", &dead]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("is dead: cannot cancel"));

    // retry of a dead command: queued again, fails again on this device.
    ok(&b.run(&["retry", &dead]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = json(&b.run(&["show", &dead, "--json"]));
        if v["state"] == "dead" && v["attempts"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retried command did not end: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cancel_of_a_queued_command() {
    let b = start_box();
    b.enroll("offline-1");
    let id = ok(&b.run(&["send", "offline-1", "x"])).trim().to_string();
    ok(&b.run(&["cancel", &id]));
    let v = json(&b.run(&["show", &id, "--json"]));
    assert_eq!(v["state"], "cancelled");
}

#[test]
fn no_box_running_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let o = outpost(dir.path(), &["status"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no box is running at") && err.contains("outpost serve"),
        "{err}"
    );
}

#[test]
fn kill_9_of_the_box_keeps_the_queue() {
    let mut b = start_box();
    b.enroll("offline-1");
    let ids: Vec<String> = (0..5)
        .map(|i| {
            ok(&b.run(&["send", "offline-1", &format!("p{i}")]))
                .trim()
                .to_string()
        })
        .collect();
    b.serve.kill().unwrap(); // SIGKILL
    b.serve.wait().unwrap();
    b.serve = spawn_serve(b.dir.path());
    let q = json(&b.run(&["queue", "offline-1", "--json"]));
    let got: Vec<&str> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    // ...and they are delivered once the device comes.
    // The restarted box listens on a new loopback port (a real box keeps
    // 7443); point the device at it.
    let listen = json(&b.run(&["status", "--json"]))["listen"]
        .as_str()
        .unwrap()
        .to_string();
    let bundle = b.dir.path().join("offline-1.bundle");
    let child = Command::new(BIN)
        .args([
            "device",
            "--bundle",
            bundle.to_str().unwrap(),
            "--server",
            &listen,
            "--echo",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    b.devices.push(child);
    let v = json(&b.run(&["send", "offline-1", "last", "--wait", "20s", "--json"]));
    assert_eq!(v["state"], "succeeded");
    for id in &ids {
        assert_eq!(json(&b.run(&["show", id, "--json"]))["state"], "succeeded");
    }
}

#[test]
fn demo_runs_end_to_end() {
    let o = Command::new(BIN)
        .arg("demo")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "demo failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("demo passed"), "{out}");
}

#[test]
fn completions_and_man_page() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ok(&outpost(dir.path(), &["completions", "bash"])).contains("outpost"));
    assert!(ok(&outpost(dir.path(), &["man"])).contains(".TH"));
}

#[test]
fn bench_smoke_run_prints_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let o = outpost(
        dir.path(),
        &["bench", "--devices", "4", "--commands", "200", "--json"],
    );
    let v: Value = serde_json::from_slice(&ok(&o).into_bytes()).unwrap();
    assert_eq!(v["commands"], 200);
    assert!(v["throughput_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["latency_p99_us"].as_u64().is_some());
}

#[test]
fn artifact_bench_smoke_run_checks_every_copy() {
    let dir = tempfile::tempdir().unwrap();
    let o = outpost(
        dir.path(),
        &[
            "bench",
            "--artifact",
            "1MiB",
            "--devices",
            "2",
            "--dir",
            dir.path().to_str().unwrap(),
            "--json",
        ],
    );
    let v: Value = serde_json::from_slice(&ok(&o).into_bytes()).unwrap();
    assert_eq!(v["size_bytes"], 1 << 20);
    assert_eq!(v["verified"], true, "{v}");
    assert!(v["box_peak_rss_bytes"].as_u64().unwrap() > 0, "{v}");
    // nginx is not required: without it the comparison says why it was
    // skipped; with it, its copies are checked too.
    match v["nginx"]["status"].as_str().unwrap() {
        "ran" => assert_eq!(v["nginx"]["verified"], true, "{v}"),
        "skipped" => assert!(v["nginx"]["reason"].as_str().is_some(), "{v}"),
        other => panic!("nginx status {other}: {v}"),
    }
}

#[test]
fn the_config_file_supplies_what_flags_and_env_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("outpost.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nwindow = 4\n",
            data
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env_remove("OUTPOST_DATA_DIR")
            .env("OUTPOST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let mut serve = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env_remove("OUTPOST_DATA_DIR")
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = None;
    while Instant::now() < deadline {
        let o = run(&["status", "--json"]);
        if o.status.success() {
            status = Some(serde_json::from_slice::<Value>(&o.stdout).unwrap());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = serve.kill();
    let _ = serve.wait();
    let s = status.expect("the box found through the file's data_dir");
    assert!(
        s["listen"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{s}"
    );
    assert_eq!(s["data_dir"], data.display().to_string());

    std::fs::write(&cfg, "windw = 4\n").unwrap();
    let o = run(&["status"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("windw") && err.contains("outpost.toml"),
        "{err}"
    );
}

#[test]
fn bulk_send_queues_one_command_per_line() {
    let b = start_box();
    b.enroll("offline-1");
    let file = b.dir.path().join("payloads.txt");
    let payloads: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
    std::fs::write(&file, payloads.join("\n")).unwrap();
    let v = json(&b.run(&[
        "send",
        "offline-1",
        "--lines",
        file.to_str().unwrap(),
        "--json",
    ]));
    let sent: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(sent.len(), 50);
    // Sent over several connections, so their FIFO order interleaves; what
    // matters is that every line became exactly one queued command.
    let q = json(&b.run(&["queue", "offline-1", "--json"]));
    assert_eq!(q.as_array().unwrap().len(), 50);
    for id in &sent {
        assert_eq!(json(&b.run(&["show", id, "--json"]))["state"], "queued");
    }
    let o = b.run(&[
        "send",
        "offline-1",
        "--lines",
        file.to_str().unwrap(),
        "--key",
        "k",
    ]);
    // Flags that cannot go together: a usage error.
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

#[test]
fn idle_bench_measures_the_box_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let o = outpost(
        dir.path(),
        &["bench", "--idle", "20", "--idle-secs", "1", "--json"],
    );
    let v: Value = serde_json::from_slice(&ok(&o).into_bytes()).unwrap();
    assert_eq!(v["devices"], 20);
    assert!(v["rss_base_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["cpu_seconds"].as_f64().is_some(), "{v}");
}

#[test]
fn box_process_bench_reports_the_boxs_own_cpu_rss_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let o = outpost(
        dir.path(),
        &[
            "bench",
            "--box-process",
            "--devices",
            "3",
            "--commands",
            "90",
            "--producers",
            "4",
            "--json",
        ],
    );
    let v: Value = serde_json::from_slice(&ok(&o).into_bytes()).unwrap();
    assert_eq!(v["commands"], 90);
    assert_eq!(v["producers"], 4);
    assert!(v["throughput_per_s"].as_f64().unwrap() > 0.0, "{v}");
    // Measured on the box's PID: it did work and wrote to its store.
    assert!(v["box_cpu_us_per_command"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["box_peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{v}");
    assert!(
        v["box_bytes_written_per_command"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    // W1's other variants do not combine with it.
    let e = outpost(dir.path(), &["bench", "--box-process", "--idle", "3"]);
    assert_eq!(e.status.code(), Some(2), "{e:?}");
}

#[test]
fn restart_bench_reopens_the_filled_box_in_a_process_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let o = outpost(
        dir.path(),
        &["bench", "--restart", "3000", "--devices", "3", "--json"],
    );
    let v: Value = serde_json::from_slice(&ok(&o).into_bytes()).unwrap();
    assert_eq!(v["queued"], 3000);
    // The reopened process holds the backlog's handles: its RSS grew.
    assert!(v["rss_bytes_per_queued"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["open_to_first_delivery_s"].as_f64().unwrap() > 0.0, "{v}");
    // The hidden child refuses a dir that holds no box, and creates none.
    let nowhere = dir.path().join("no-box");
    let e = outpost(
        dir.path(),
        &["bench", "--reopen", nowhere.to_str().unwrap()],
    );
    assert_ne!(e.status.code(), Some(0), "{e:?}");
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("holds no box"),
        "{e:?}"
    );
    assert!(
        !nowhere.exists(),
        "the child made a store where there was none"
    );
}

#[test]
fn watch_streams_a_devices_lifecycle_events_and_only_that_devices() {
    use std::io::BufRead;
    let mut b = start_box();
    b.device("w1", &["--echo"]);
    b.device("w2", &["--echo"]);
    let mut watch = run::command(b.dir.path(), &["watch", "--device", "w1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watch subscribes on its own time: send until one of w1's
    // commands is seen to its end, a command to w2 beside each.
    let mut lines: Vec<Value> = Vec::new();
    let mut ended = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ended.is_none() && Instant::now() < deadline {
        let id = ok(&b.run(&["send", "w1", "hello-w1"])).trim().to_string();
        ok(&b.run(&["send", "w2", "hello-w2"]));
        let until = Instant::now() + Duration::from_secs(3);
        while let Ok(l) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let done = v["id"] == id.as_str() && v["state"] == "succeeded";
            lines.push(v);
            if done {
                ended = Some(id.clone());
                break;
            }
        }
    }
    // The box stops: the watch ends with it, cleanly.
    run::stop(&mut b.serve);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exited = loop {
        match watch.try_wait().unwrap() {
            Some(st) => break Some(st),
            None if Instant::now() > deadline => break None,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(exited.is_some(), "watch outlived the box");
    let id = ended.unwrap_or_else(|| panic!("no end of a w1 command was watched: {lines:?}"));
    let end = lines
        .iter()
        .find(|v| v["id"] == id.as_str() && v["state"] == "succeeded")
        .unwrap();
    assert_eq!(end["device"], "w1");
    assert_eq!(end["result"], "hello-w1", "the echo's result: {end}");
    assert!(end["at"].as_str().unwrap().ends_with('Z'), "{end}");
    assert!(
        lines.iter().all(|v| v["device"] == "w1"),
        "only w1's events: {lines:?}"
    );
}

#[test]
fn send_wait_prints_what_the_device_answered_or_why_it_failed() {
    let mut b = start_box();
    b.device("e1", &["--echo"]);
    b.device("bad", &["--exec", "echo broken >&2; exit 3"]);
    // The device's result is what `send --wait` prints, and exit 0.
    let o = b.run(&["send", "e1", "hello there", "--wait", "20s"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello there\n");
    // The payload from stdin (`-`), and from a file, byte for byte.
    let mut child = run::command(b.dir.path(), &["send", "e1", "-", "--wait", "20s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"from stdin\n").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from stdin\n");
    let file = b.dir.path().join("payload.txt");
    std::fs::write(&file, "from a file").unwrap();
    let o = b.run(&[
        "send",
        "e1",
        "--file",
        file.to_str().unwrap(),
        "--wait",
        "20s",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from a file\n", "{o:?}");
    // A failed command: exit 6, and its exit code and message on stderr.
    let o = b.run(&["send", "bad", "x", "--wait", "20s", "--max-attempts", "1"]);
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("exit code 3") && err.contains("broken"),
        "{err}"
    );
    // A payload file that is not there: a clear error, nothing sent.
    let o = b.run(&["send", "e1", "--file", "/nonexistent/p.bin"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot read the payload file"),
        "{o:?}"
    );
}

#[test]
fn tag_broadcast_wait_show_and_cancel_from_the_cli() {
    let mut b = start_box();
    b.device("e1", &["--echo"]);
    b.device("e2", &["--echo"]);
    let d = json(&b.run(&["tag", "e2", "--add", "line-3", "--add-cap", "cam", "--json"]));
    assert_eq!(d["tags"], serde_json::json!(["line-3", "t1"]));
    assert_eq!(d["caps"], serde_json::json!(["cam"]));
    ok(&b.run(&["tag", "e1", "--add", "line-3"]));

    // --wait on a broadcast waits for every child; exit 0 when all succeed.
    let r = json(&b.run(&["send", "tag:line-3", "hi", "--wait", "20s", "--json"]));
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["summary"], "2/2 succeeded");
    let id = r["id"].as_str().unwrap().to_string();
    let v = json(&b.run(&["show", &id, "--json"]));
    let children = v["children"].as_array().unwrap();
    assert_eq!(children.len(), 2);
    assert!(children.iter().all(|c| c["state"] == "succeeded"));
    let text = ok(&b.run(&["show", &id]));
    assert!(text.contains("DEVICE") && text.contains("e1") && text.contains("e2"));

    // Any capable device: only e2 has `cam`; show names it.
    let r = json(&b.run(&["send", "cap:cam", "x", "--wait", "20s", "--json"]));
    let v = json(&b.run(&["show", r["id"].as_str().unwrap(), "--json"]));
    assert_eq!(
        (v["target"].as_str(), v["device"].as_str()),
        (Some("cap:cam"), Some("e2"))
    );

    // One offline child: --wait times out, cancel ends the rest.
    b.enroll("off");
    let o = b.run(&["send", "tag:t1", "y", "--wait", "2s", "--json"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "timed out waiting for the offline child"
    );
    let t: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = t["id"].as_str().unwrap().to_string();
    ok(&b.run(&["cancel", &id]));
    let v = json(&b.run(&["show", &id, "--json"]));
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["summary"], "2/3 succeeded, 1 cancelled");

    // Clear errors: no such tag (exit 3), a bad tag name (exit 1).
    let o = b.run(&["send", "tag:nope", "z"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no enrolled device has tag `nope`"));
    let o = b.run(&["tag", "e1", "--add", "bad:tag"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("reserved"));
}

#[test]
fn the_admin_socket_refuses_other_users() {
    // Needs root to run a client as another uid; elsewhere it says so.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: not root, cannot run a client as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let b = start_box();
    // Let others reach the socket's directory, so only the socket's own
    // mode (0660, the box's user and group) stands in the way.
    let mut p = std::path::PathBuf::new();
    for c in b.dir.path().components() {
        p.push(c);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o711)).unwrap();
    }
    let sock = std::fs::metadata(b.dir.path().join("admin.sock")).unwrap();
    assert_eq!(sock.permissions().mode() & 0o777, 0o660, "socket mode");
    let nobody = Command::new(BIN)
        .args(["status"])
        .env("OUTPOST_DATA_DIR", b.dir.path())
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!nobody.status.success(), "another user was served");
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("group"), "says what to do: {err}");
    // The box's own user still is.
    ok(&b.run(&["status"]));
}

#[test]
fn a_data_dir_that_cannot_be_used_is_named_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let dir = file.join("data");
    let o = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("OUTPOST_DATA_DIR", &dir)
        .env("OUTPOST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(dir.to_str().unwrap()) && err.contains("Not a directory"),
        "{err}"
    );
    // A read-only filesystem (root only: the test mounts one).
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&ro)
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("SKIPPED the read-only part: cannot mount a tmpfs here (not root)");
        return;
    }
    let o = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("OUTPOST_DATA_DIR", ro.join("data"))
        .env("OUTPOST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&ro).status();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Read-only file system"), "{err}");
}

#[test]
fn workflow_check_names_the_step_and_line_and_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "name = \"w\"\non_failure = [\"undo\"]\n[steps.a]\ntarget = \"d1\"\npayload = \"x\"\n[steps.b]\ntarget = \"tag:t\"\npayload = \"y\"\nneeds = [\"a\"]\nwhen = { step = \"a\", result_contains = \"ok\" }\n[steps.undo]\ntarget = \"d1\"\npayload = \"z\"\n",
    )
    .unwrap();
    let out = ok(&outpost(
        tmp.path(),
        &["workflow", "check", good.to_str().unwrap()],
    ));
    assert!(
        out.contains("w: ok, 2 steps: a → b") && out.contains("on failure: undo"),
        "{out}"
    );
    // --json: the steps in dependency order, each with its line.
    let v: serde_json::Value = serde_json::from_str(&ok(&outpost(
        tmp.path(),
        &["workflow", "check", good.to_str().unwrap(), "--json"],
    )))
    .unwrap();
    assert_eq!(v["name"], "w", "{v}");
    assert_eq!(v["on_failure"], serde_json::json!(["undo"]), "{v}");
    assert!(v["timeout_s"].is_null(), "{v}");
    let steps = v["steps"].as_array().unwrap();
    let b = steps.iter().find(|s| s["name"] == "b").unwrap();
    assert_eq!(
        (b["target"].as_str(), b["needs"].clone(), b["line"].as_u64()),
        (Some("tag:t"), serde_json::json!(["a"]), Some(6)),
        "{v}"
    );
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"w\"\n[steps.a]\ntarget = \"d1\"\npayload = \"x\"\nneeds = [\"ghost\"]\n",
    )
    .unwrap();
    let o = outpost(tmp.path(), &["workflow", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.toml:5: step `a`: it needs `ghost`, which is not a step"),
        "{err}"
    );
    // Handing a workflow to an edge checks it first, on the sender.
    let o = outpost(tmp.path(), &["send", "e1/workflow", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.toml:5: step `a`"), "{err}");
    let o = outpost(tmp.path(), &["send", "e1/workflow"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("needs the workflow file"), "{err}");
}

#[test]
fn a_workflow_runs_on_the_box_survives_kill_9_and_shows_every_step() {
    let mut b = start_box();
    let wf = b.dir.path().join("wf.toml");
    std::fs::write(b.dir.path().join("fw.bin"), b"firmware-v2").unwrap();
    std::fs::write(
        &wf,
        "name = \"reflash\"\non_failure = [\"undo\"]\n[steps.stop]\ntarget = \"d1\"\npayload = \"ok stop\"\n[steps.flash]\ntarget = \"tag:t1\"\npayload_file = \"fw.bin\"\nneeds = [\"stop\"]\nmin_success = \"100%\"\n[steps.start]\ntarget = \"d1\"\npayload = \"start\"\nneeds = [\"flash\"]\nwhen = { step = \"flash\", result_contains = \"firmware\" }\n[steps.skipped]\ntarget = \"d1\"\npayload = \"never\"\nneeds = [\"stop\"]\nwhen = { step = \"stop\", state = \"failed\" }\n[steps.undo]\ntarget = \"d1\"\npayload = \"undo\"\n",
    )
    .unwrap();
    // The device is not there yet: the run waits on its first step.
    b.enroll("d1");
    let id = ok(&b.run(&["workflow", "run", wf.to_str().unwrap()]))
        .trim()
        .to_string();
    let v = json(&b.run(&["workflow", "show", &id, "--json"]));
    assert_eq!(v["state"], "running");
    assert_eq!(v["steps"][0]["name"], "stop");
    assert_eq!(v["steps"][0]["state"], "running");
    let stop_cmd = v["steps"][0]["command"].as_str().unwrap().to_string();
    // A crash: the run and its step's command survive.
    b.serve.kill().unwrap();
    b.serve.wait().unwrap();
    b.serve = spawn_serve(b.dir.path());
    let v = json(&b.run(&["workflow", "show", &id, "--json"]));
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(
        v["steps"][0]["command"],
        stop_cmd.as_str(),
        "the same command"
    );
    // The device comes (to the restarted box's new port) and the run ends.
    let listen = json(&b.run(&["status", "--json"]))["listen"]
        .as_str()
        .unwrap()
        .to_string();
    let bundle = b.dir.path().join("d1.bundle");
    let child = Command::new(BIN)
        .args([
            "device",
            "--bundle",
            bundle.to_str().unwrap(),
            "--server",
            &listen,
            "--echo",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    b.devices.push(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let v = json(&b.run(&["workflow", "show", &id, "--json"]));
        if v["state"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "the run did not end: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["state"], "succeeded", "{v}");
    let states: Vec<(String, String)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, state) in [
        ("stop", "succeeded"),
        ("flash", "succeeded"),
        ("start", "succeeded"),
        ("skipped", "skipped"),
        ("undo", "skipped"),
    ] {
        assert!(
            states.contains(&(name.into(), state.into())),
            "{name}: {states:?}"
        );
    }
    let flash = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "flash")
        .unwrap();
    assert_eq!(flash["target"], "tag:t1");
    // The human views: a row per step with its state and target, and the
    // list's count of steps done.
    let shown = ok(&b.run(&["workflow", "show", &id]));
    assert!(
        shown.starts_with(&format!("{id} reflash — succeeded")),
        "{shown}"
    );
    let row = |name: &str| {
        shown
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {shown}"))
            .to_string()
    };
    assert!(
        row("flash").contains("succeeded") && row("flash").contains("tag:t1"),
        "{shown}"
    );
    assert!(row("skipped").contains("skipped"), "{shown}");
    let list = ok(&b.run(&["workflow", "list"]));
    let line = list.lines().find(|l| l.starts_with(&id)).expect("its row");
    assert!(line.contains("succeeded") && line.contains("5/5"), "{list}");
    // `run --wait` of a run whose first step cannot be routed: failed, exit 6.
    let bad = b.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"b\"\n[steps.x]\ntarget = \"ghost\"\npayload = \"p\"\n",
    )
    .unwrap();
    let o = b.run(&[
        "workflow",
        "run",
        bad.to_str().unwrap(),
        "--wait",
        "30s",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "failed");
    assert!(
        v["steps"][0]["result"].as_str().unwrap().contains("ghost"),
        "{v}"
    );
    let list = json(&b.run(&["workflow", "list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 2);
}

#[test]
fn an_alert_rule_fires_in_status_and_devices_stats_count_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        "[[alert]]\nname = \"dead\"\nkind = \"dead_above\"\nvalue = 0\n",
    )
    .unwrap();
    let serve = spawn_serve_with(dir.path(), Some(&config));
    let mut b = Box_ {
        dir,
        serve,
        devices: Vec::new(),
    };
    b.device("bad-1", &["--exec", "exit 3"]);
    let o = b.run(&[
        "send",
        "bad-1",
        "x",
        "--max-attempts",
        "1",
        "--wait",
        "20s",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(6), "ended without success");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["state"], "dead");
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = json(&b.run(&["status", "--json"]));
        if s["alerts"].as_array().is_some_and(|a| !a.is_empty()) {
            break s;
        }
        assert!(Instant::now() < deadline, "no alert in status: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let a = &s["alerts"][0];
    assert_eq!(a["name"], "dead");
    assert_eq!(a["state"], "firing");
    assert_eq!(a["detail"], "1 dead commands (limit 0)");
    assert!(a["since"].is_string(), "{a}");
    let text = ok(&b.run(&["status"]));
    assert!(text.contains("ALERT") && text.contains("firing"), "{text}");
    let ds = json(&b.run(&["devices", "--stats", "--json"]));
    assert_eq!(ds[0]["id"], "bad-1");
    assert_eq!(ds[0]["stats"]["dead"], 1);
    assert_eq!(ds[0]["stats"]["success_rate"], 0.0);
    let text = ok(&b.run(&["devices", "--stats"]));
    assert!(text.contains("SUCCESS") && text.contains("0.0%"), "{text}");
}

#[test]
fn serve_refuses_a_non_loopback_dashboard_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0"])
        .env("OUTPOST_DATA_DIR", dir.path())
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("--http-token"), "{err}");
}

/// Run outpost with stdout a pipe whose read end is already closed, as
/// `outpost … | head` leaves it once head has gone.
fn outpost_into_closed_pipe(dir: &Path, args: &[&str]) -> Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two fresh descriptors, owned from here on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let mut child = Command::new(BIN)
        .args(args)
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .expect("run outpost");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{args:?} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Every subcommand path (`workflow list`, `fleet send`, …) in the CLI's
/// definition.
fn subcommand_paths() -> Vec<Vec<String>> {
    use clap::CommandFactory;
    fn walk(c: &clap::Command, at: Vec<String>, out: &mut Vec<Vec<String>>) {
        for s in c.get_subcommands() {
            let mut p = at.clone();
            p.push(s.get_name().to_string());
            out.push(p.clone());
            walk(s, p, out);
        }
    }
    let mut out = Vec::new();
    walk(&outpost::cli::Cli::command(), Vec::new(), &mut out);
    out
}

#[test]
fn every_subcommand_ends_quietly_on_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt;
    let mut b = start_box();
    b.device("echo-1", &["--echo"]);
    let r = json(&b.run(&["send", "echo-1", "x", "--wait", "20s", "--json"]));
    let id = r["id"].as_str().unwrap().to_string();
    let wf = b.dir.path().join("w.toml");
    std::fs::write(
        &wf,
        "name = \"w\"\n[steps.a]\ntarget = \"echo-1\"\npayload = \"p\"\n",
    )
    .unwrap();
    let wf = wf.to_str().unwrap();
    let quiet = |args: &[&str], must_write: bool| {
        let o = outpost_into_closed_pipe(b.dir.path(), args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && o.status.code() != Some(101),
            "{args:?} on a closed pipe: {:?}\n{err}",
            o.status
        );
        if must_write {
            // It wrote, met the closed pipe, and ended as coreutils do.
            assert_eq!(
                o.status.signal(),
                Some(libc::SIGPIPE),
                "{args:?}: {:?}\n{err}",
                o.status
            );
            assert!(err.is_empty(), "{args:?} said: {err}");
        }
    };
    // Every subcommand's help (clap's own writer).
    let paths = subcommand_paths();
    assert!(paths.len() > 20, "{paths:?}");
    for p in &paths {
        let mut args: Vec<&str> = p.iter().map(String::as_str).collect();
        args.push("--help");
        quiet(&args, false);
    }
    // Every subcommand that prints to stdout, for real.
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["devices"],
        &["devices", "--stats", "--json"],
        &["queue", "echo-1"],
        &["show", &id],
        &["show", &id, "--json"],
        &["send", "echo-1", "y"],
        &["tag", "echo-1", "--add", "t2"],
        &["doctor"],
        &["completions", "bash"],
        &["man"],
        &["workflow", "check", wf],
        &["workflow", "run", wf],
        &["workflow", "list"],
        &["retry", &id],
    ] {
        let must_write = args[0] != "retry"; // refused: a succeeded command
        quiet(args, must_write);
    }
    // enroll prints after writing the bundle, which must be there.
    let bundle = b.dir.path().join("late.bundle");
    quiet(&["enroll", "late", "--out", bundle.to_str().unwrap()], true);
    assert!(bundle.exists());
    // A stream: watch ends at the first event it cannot print.
    let watch = std::thread::scope(|s| {
        let h = s.spawn(|| outpost_into_closed_pipe(b.dir.path(), &["watch"]));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !h.is_finished() && Instant::now() < deadline {
            ok(&b.run(&["send", "echo-1", "z"]));
            std::thread::sleep(Duration::from_millis(200));
        }
        h.join().unwrap()
    });
    assert_eq!(watch.status.signal(), Some(libc::SIGPIPE), "{watch:?}");
}

#[test]
fn every_flag_with_a_set_of_values_refuses_a_typo_with_exit_2_and_the_values() {
    use clap::CommandFactory;
    let dir = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    fn walk(c: &clap::Command, at: Vec<String>, out: &mut Vec<(Vec<String>, clap::Arg)>) {
        for a in c.get_arguments() {
            if a.get_action().takes_values() && !a.get_possible_values().is_empty() {
                out.push((at.clone(), a.clone()));
            }
        }
        for s in c.get_subcommands() {
            let mut p = at.clone();
            p.push(s.get_name().to_string());
            walk(s, p, out);
        }
    }
    let mut flags = Vec::new();
    walk(&outpost::cli::Cli::command(), Vec::new(), &mut flags);
    for (path, arg) in &flags {
        let mut args: Vec<String> = path.clone();
        match arg.get_long() {
            Some(l) => args.extend([format!("--{l}"), "dlivered".into()]),
            None => args.push("dlivered".into()),
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = outpost(dir.path(), &argv);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{argv:?}: {err}");
        assert!(err.contains("dlivered"), "{argv:?}: {err}");
        for v in arg.get_possible_values() {
            assert!(
                err.contains(v.get_name()),
                "{argv:?} does not list {}: {err}",
                v.get_name()
            );
        }
        checked.push(argv.join(" "));
    }
    // The flags the issue names are among them.
    for must in ["queue --state", "send --priority", "fleet watch --kind"] {
        assert!(
            checked.iter().any(|c| c.starts_with(must)),
            "{must} not checked: {checked:?}"
        );
    }
}

#[test]
fn durations_read_a_bare_number_as_seconds_and_refuse_negatives() {
    let b = start_box();
    b.enroll("offline-1");
    let r = json(&b.run(&["send", "offline-1", "x", "--ttl", "30", "--json"]));
    let v = json(&b.run(&["show", r["id"].as_str().unwrap(), "--json"]));
    let at = |k: &str| humantime::parse_rfc3339(v[k].as_str().unwrap()).unwrap();
    let ttl = at("expires_at").duration_since(at("created_at")).unwrap();
    assert_eq!(ttl, Duration::from_secs(30), "{v}");
    // --wait 1 waits one second, not a usage error.
    let o = b.run(&["send", "offline-1", "x", "--wait", "1"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("within 1s"),
        "{o:?}"
    );
    for args in [
        &["send", "offline-1", "x", "--ttl", "-1"][..],
        &["send", "offline-1", "x", "--wait", "-1"],
        &["send", "offline-1", "x", "--ttl", "soon"],
        &["device", "--bundle", "b", "--echo", "--timeout", "-1"],
    ] {
        let o = b.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("number of seconds"), "{args:?}: {err}");
    }
    // --help says so.
    let help = ok(&b.run(&["send", "--help"]));
    assert!(help.contains("number of seconds"), "{help}");
    // A duration that parses but cannot work says what can.
    let o = b.run(&[
        "device",
        "--bundle",
        "b",
        "--echo",
        "--idle-timeout",
        "100ms",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--idle-timeout 100ms is too short to keep a link up; use 500ms or more"),
        "{err}"
    );
}

#[test]
fn show_names_not_before_and_expiry_and_a_zoneless_time_is_refused() {
    let b = start_box();
    b.enroll("offline-1");
    let id = ok(&b.run(&[
        "send",
        "offline-1",
        "x",
        "--not-before",
        "2099-01-01T10:00:00+02:00",
        "--ttl",
        "1h",
    ]));
    let id = id.trim();
    let v = json(&b.run(&["show", id, "--json"]));
    assert_eq!(v["not_before"], "2099-01-01T08:00:00.000Z", "{v}");
    assert!(v["expires_at"].is_string(), "{v}");
    let text = ok(&b.run(&["show", id]));
    assert!(
        text.contains("not before") && text.contains("2099-01-01T08:00:00"),
        "{text}"
    );
    assert!(text.contains("expires"), "{text}");
    let o = b.run(&[
        "send",
        "offline-1",
        "x",
        "--not-before",
        "2099-01-01T10:00:00",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no time zone"),
        "{o:?}"
    );
}

#[test]
fn a_key_reused_for_another_command_is_refused_and_the_same_command_is_not() {
    let b = start_box();
    b.enroll("a");
    b.enroll("b");
    let first = ok(&b.run(&["send", "a", "x", "--key", "k1"]));
    // The same command again: the first id, as before.
    assert_eq!(ok(&b.run(&["send", "a", "x", "--key", "k1"])), first);
    for (target, payload, what) in [("b", "x", "target"), ("a", "y", "payload")] {
        let o = b.run(&["send", target, payload, "--key", "k1"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "{err}");
        assert!(
            err.contains("k1") && err.contains(first.trim()) && err.contains(what),
            "{err}"
        );
    }
    // After a restart (the key rebuilt from the journal) too.
    let mut b = b;
    let _ = b.serve.kill();
    let _ = b.serve.wait();
    b.serve = spawn_serve(b.dir.path());
    assert_eq!(ok(&b.run(&["send", "a", "x", "--key", "k1"])), first);
    let o = b.run(&["send", "a", "y", "--key", "k1"]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
}

#[test]
fn config_and_listener_errors_name_their_origin_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let serve_with = |cfg: &str, extra: &[&str]| {
        let path = dir.path().join("outpost.toml");
        std::fs::write(&path, cfg).unwrap();
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let o = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .args(&args)
            .env("OUTPOST_DATA_DIR", dir.path().join("data"))
            .env("OUTPOST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{cfg}: {o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = serve_with("window = 0\n", &[]);
    assert!(
        e.contains("outpost.toml") && !e.contains("command line"),
        "{e}"
    );
    let e = serve_with("max_disk = -5\n", &[]);
    assert!(e.contains("negative") && !e.contains("untagged"), "{e}");
    let e = serve_with("", &["--max-disk", "-5"]);
    assert!(e.contains("negative"), "{e}");
    // A port in use: the error says what to do, once.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = serve_with("", &["--http", &addr]);
    assert!(e.contains("another program") && e.contains("--http"), "{e}");
    let os = std::io::Error::from(std::io::ErrorKind::AddrInUse).to_string();
    assert!(
        e.matches("in use").count() <= 1,
        "the OS text twice ({os}): {e}"
    );
}

#[test]
fn finished_workflow_runs_and_rollouts_are_pruned_after_the_retention_and_stay_gone() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outpost.toml");
    // A bare number: seconds.
    std::fs::write(&config, "results_max_age = \"2\"\n").unwrap();
    let serve = spawn_serve_with(dir.path(), Some(&config));
    let mut b = Box_ {
        dir,
        serve,
        devices: Vec::new(),
    };
    b.device("echo-1", &["--echo"]);
    let wf = b.dir.path().join("w.toml");
    std::fs::write(
        &wf,
        "name = \"w\"\n[steps.a]\ntarget = \"echo-1\"\npayload = \"p\"\n",
    )
    .unwrap();
    let v = json(&b.run(&[
        "workflow",
        "run",
        wf.to_str().unwrap(),
        "--wait",
        "20",
        "--json",
    ]));
    assert_eq!(v["state"], "succeeded", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    // A rollout follows the same retention.
    let r = json(&b.run(&[
        "rollout",
        "start",
        "--target",
        "echo-1",
        "--payload",
        "p",
        "--wait",
        "20s",
        "--json",
    ]));
    assert_eq!(r["state"], "completed", "{r}");
    let rid = r["id"].as_str().unwrap().to_string();
    for what in ["workflow", "rollout"] {
        assert_eq!(
            json(&b.run(&[what, "list", "--json"]))
                .as_array()
                .unwrap()
                .len(),
            1,
            "{what}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for what in ["workflow", "rollout"] {
        while !json(&b.run(&[what, "list", "--json"]))
            .as_array()
            .unwrap()
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "the {what} outlived its retention"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(b.run(&["workflow", "show", &id]).status.code(), Some(3));
    assert_eq!(b.run(&["rollout", "show", &rid]).status.code(), Some(3));
    // Gone from the store too: a restart does not bring it back.
    let _ = b.serve.kill();
    let _ = b.serve.wait();
    b.serve = spawn_serve_with(b.dir.path(), Some(&config));
    for what in ["workflow", "rollout"] {
        assert!(
            json(&b.run(&[what, "list", "--json"]))
                .as_array()
                .unwrap()
                .is_empty(),
            "{what} came back after the restart"
        );
    }
}

#[test]
fn doctor_names_a_fresh_a_world_writable_and_a_non_directory_data_dir() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let finding = |dir: &Path, check: &str| -> (i32, Value) {
        let o = outpost(dir, &["doctor", "--json"]);
        let all: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
        let f = all
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == check)
            .cloned()
            .unwrap_or_else(|| panic!("no `{check}` finding: {all}"));
        (o.status.code().unwrap(), f)
    };
    // A dir no box has used yet: no identity is a failure that names
    // `outpost init`; no database yet only a warning.
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let (code, f) = finding(&fresh, "keys");
    assert_eq!((code, f["status"].as_str()), (1, Some("fail")), "{f}");
    assert!(f["fix"].as_str().unwrap().contains("outpost init"), "{f}");
    let (_, f) = finding(&fresh, "database");
    assert_eq!(f["status"], "warn", "{f}");
    assert!(
        f["detail"].as_str().unwrap().contains("no database yet"),
        "{f}"
    );
    assert!(f["fix"].as_str().unwrap().contains("outpost serve"), "{f}");
    // World-writable: a failure, and the chmod that fixes it.
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, f) = finding(&fresh, "data dir");
    assert_eq!((code, f["status"].as_str()), (1, Some("fail")), "{f}");
    assert!(
        f["detail"]
            .as_str()
            .unwrap()
            .contains("world-writable (mode 777)"),
        "{f}"
    );
    assert_eq!(f["fix"], format!("chmod o-w {}", fresh.display()));
    // A fifo where the dir should be: named as such, and left alone.
    let fifo = tmp.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (code, f) = finding(&fifo, "data dir");
    assert_eq!((code, f["status"].as_str()), (1, Some("fail")), "{f}");
    assert!(
        f["detail"]
            .as_str()
            .unwrap()
            .contains("is not a directory (a fifo)"),
        "{f}"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata(&fifo).unwrap().file_type().is_fifo(),
        "left a fifo"
    );
}

#[test]
fn a_cancelled_workflow_cancels_its_running_step_and_compensates_only_when_asked() {
    let mut b = start_box();
    b.enroll("away"); // never connects: its step stays running
    b.device("fixer", &["--echo"]);
    let wf = b.dir.path().join("wf.toml");
    std::fs::write(
        &wf,
        "name = \"patch\"\non_failure = [\"undo\"]\n[steps.apply]\ntarget = \"away\"\npayload = \"apply\"\n[steps.after]\ntarget = \"fixer\"\npayload = \"after\"\nneeds = [\"apply\"]\n[steps.undo]\ntarget = \"fixer\"\npayload = \"undo\"\n",
    )
    .unwrap();
    let step = |v: &Value, name: &str| -> Value {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no step {name}: {v}"))
    };
    let wait_end = |id: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = json(&b.run(&["workflow", "show", id, "--json"]));
            let undo = step(&v, "undo")["state"].clone();
            if v["state"] != "running" && undo != "running" && undo != "pending" {
                return v;
            }
            assert!(Instant::now() < deadline, "the run did not end: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for compensate in [false, true] {
        let id = ok(&b.run(&["workflow", "run", wf.to_str().unwrap()]))
            .trim()
            .to_string();
        let v = json(&b.run(&["workflow", "show", &id, "--json"]));
        assert_eq!(step(&v, "apply")["state"], "running", "{v}");
        let apply_cmd = step(&v, "apply")["command"].as_str().unwrap().to_string();
        let mut args = vec!["workflow", "cancel", id.as_str()];
        if compensate {
            args.push("--compensate");
        }
        let said = ok(&b.run(&args));
        assert!(said.starts_with(&id), "{said}");
        let v = wait_end(&id);
        assert_eq!(v["state"], "cancelled", "{v}");
        assert_eq!(step(&v, "apply")["state"], "cancelled", "{v}");
        assert_eq!(
            step(&v, "after")["state"],
            "cancelled",
            "never started: {v}"
        );
        let undo = step(&v, "undo");
        if compensate {
            assert_eq!(undo["state"], "succeeded", "{v}");
            assert_eq!(undo["result"], "undo", "{v}");
        } else {
            assert_eq!(undo["state"], "skipped", "{v}");
        }
        // The running step's command was cancelled on the box too.
        let c = json(&b.run(&["show", &apply_cmd, "--json"]));
        assert_eq!(c["state"], "cancelled", "{c}");
    }
}

/// Flags that parse but cannot go together are usage errors (exit 2),
/// each naming the flag and what to do, before anything is sent or any
/// cluster is dialled (the NATS address is one nothing listens on).
#[test]
fn flags_that_cannot_go_together_exit_2_naming_the_flag_before_anything_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = tmp.path().join("lines.txt");
    std::fs::write(&lines, "a\nb\n").unwrap();
    let l = lines.to_str().unwrap();
    let nats = "nats://127.0.0.1:1";
    let cases: &[(&[&str], &str)] = &[
        (
            &["send", "tag:t", "--lines", l, "--key", "k"],
            "--key with --lines",
        ),
        (
            &["send", "tag:t", "--lines", l, "--envelope", "AAAA"],
            "--envelope signs one command",
        ),
        (
            &["fleet", "send", "--nats", nats, "e1/d1", "--lines", l],
            "--lines is for a box's own queue",
        ),
        (
            &[
                "fleet",
                "send",
                "--nats",
                nats,
                "e1/d1",
                "x",
                "--artifact",
                "fw",
            ],
            "--artifact names an artifact on a box",
        ),
        (
            &["fleet", "init", "--nats", nats, "--replicas", "2"],
            "--replicas 2: use 1, 3 or 5",
        ),
        (
            &["fleet", "send", "--nats", nats, "d1", "x"],
            "a fleet target is EDGE/TARGET",
        ),
    ];
    for (args, words) in cases {
        let o = outpost(tmp.path(), args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(words), "{args:?}: `{words}` not in {err}");
    }
}

/// A run or rollout id the box does not hold is not found (exit 3) for
/// every verb, named, and a malformed id is a usage error (exit 2).
#[test]
fn an_unknown_run_or_rollout_is_not_found_for_every_verb() {
    let b = start_box();
    let id = "01J9ZQ3M8E5V6X7Y8Z9A0B1C2D";
    for args in [
        &["workflow", "show", id][..],
        &["workflow", "show", id, "--json"],
        &["workflow", "cancel", id],
        &["workflow", "cancel", id, "--compensate"],
        &["rollout", "show", id],
        &["rollout", "pause", id],
        &["rollout", "resume", id],
        &["rollout", "abort", id],
    ] {
        let o = b.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {err}");
        assert!(err.contains(id), "{args:?} names the id: {err}");
    }
    for args in [
        // Every subcommand that takes an id (they share one parser).
        &["workflow", "show", "nope"][..],
        &["workflow", "cancel", "nope"],
        &["rollout", "show", "nope"],
        &["rollout", "abort", "nope"],
        &["show", "nope"],
        &["cancel", "nope"],
        &["retry", "nope"],
        &["send", "d1", "x", "--after", "nope"],
    ] {
        let o = b.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("`nope` is not a command id (expected a 26-character ULID"),
            "{args:?}: {err}"
        );
    }
    // Empty lists say so, and --json is an empty array.
    assert_eq!(
        json(&b.run(&["workflow", "list", "--json"])),
        serde_json::json!([])
    );
    assert_eq!(
        json(&b.run(&["rollout", "list", "--json"])),
        serde_json::json!([])
    );
}

/// The artifact commands as a technician reads them: an empty shelf says
/// how to fill it, a file added with no flags is named by its file and
/// versioned by its mtime, `show` and `rm` speak plainly, and a directory
/// is a usage error.
#[test]
fn artifact_commands_read_plainly_without_json() {
    let b = start_box();
    let out = ok(&b.run(&["artifact", "list"]));
    assert!(
        out.contains("no artifacts; `outpost artifact add FILE` adds one"),
        "{out}"
    );
    let o = b.run(&["artifact", "add", b.dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a file"), "{err}");
    let fw = b.dir.path().join("fw.bin");
    std::fs::write(&fw, vec![7u8; 300_000]).unwrap();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
    std::fs::File::options()
        .write(true)
        .open(&fw)
        .unwrap()
        .set_modified(t)
        .unwrap();
    ok(&b.run(&["artifact", "add", fw.to_str().unwrap()]));
    // 1,796,000,000 s is 2026-11-30T00:53:20Z.
    let shown = ok(&b.run(&["artifact", "show", "fw.bin"]));
    assert!(
        shown.contains("artifact  fw.bin@20261130.005320"),
        "{shown}"
    );
    assert!(
        shown.contains("size      ") && shown.contains("chunks"),
        "{shown}"
    );
    assert!(
        shown.contains("sha256    ") && shown.contains("added     "),
        "{shown}"
    );
    let out = ok(&b.run(&["artifact", "rm", "fw.bin"]));
    assert!(out.contains("removed fw.bin@20261130.005320 ("), "{out}");
    assert!(out.contains("freed)"), "{out}");
    let out = ok(&b.run(&["artifact", "list"]));
    assert!(out.contains("no artifacts"), "{out}");
}

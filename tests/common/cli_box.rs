//! A box run as the real binary in a temp dir on a loopback port, with
//! devices run as `outpost device --echo`: shared by the black-box tests
//! that need a live box (security, trust).
// Each test file uses what it needs of these.
#![allow(dead_code)]

use super::run::{json, outpost, Proc, BIN};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Box_ {
    pub dir: tempfile::TempDir,
    /// Where it listens: port 0 at first, then the port it got, so a
    /// restart keeps the address the bundles name.
    pub listen: String,
    pub serve: Option<Proc>,
    pub agents: Vec<Proc>,
    /// Extra `serve` flags, kept for a restart.
    pub extra: Vec<String>,
}

impl Drop for Box_ {
    fn drop(&mut self) {
        // Agents first (each a `Proc`, stopped as it goes), then the box,
        // as systemd stops it: it writes its coverage profile on the way.
        self.agents.clear();
        if let Some(mut s) = self.serve.take() {
            s.stop();
        }
    }
}

/// Poll `f` every 50 ms for at most `secs`.
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {secs} s");
}

/// Wait for `child` to exit, at most `secs`; its exit status.
pub fn exits_within(child: &mut Child, secs: u64) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

impl Box_ {
    /// A box in a new temp dir; its log (level info) goes to `serve.log`.
    pub fn start() -> Box_ {
        Box_::start_with(&[])
    }

    /// A box with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> Box_ {
        let mut b = Box_ {
            dir: tempfile::tempdir().unwrap(),
            listen: "127.0.0.1:0".into(),
            serve: None,
            agents: Vec::new(),
            extra: Vec::new(),
        };
        b.extra = extra.iter().map(|s| s.to_string()).collect();
        b.serve = Some(b.spawn_serve());
        b.wait_ready();
        let s = json(&b.run(&["status", "--json"]));
        b.listen = s["listen"].as_str().unwrap().to_string();
        b
    }

    pub fn spawn_serve(&self) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        Command::new(BIN)
            .args(["serve", "--listen", &self.listen])
            .args(&self.extra)
            .env("OUTPOST_DATA_DIR", self.dir.path())
            .env("OUTPOST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Proc)
            .expect("start serve")
    }

    pub fn wait_ready(&self) {
        wait_for(30, "the box answers on its admin socket", || {
            self.run(&["status", "--json"]).status.success()
        });
    }

    /// kill -9 the box: no shutdown at all, as a crash or a power cut
    /// (the tests that restart a box mean exactly that).
    pub fn stop(&mut self) {
        if let Some(mut s) = self.serve.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("serve.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        outpost(self.dir.path(), args)
    }

    pub fn bundle_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.bundle"))
    }

    pub fn enroll(&self, id: &str, file: &str, extra: &[&str]) -> Output {
        let out = self.bundle_path(file);
        let mut args = vec!["enroll", id, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Start `outpost device --echo` with bundle `file`; its stderr goes to
    /// `<file>.<n>.log`. Returns its index in `agents`.
    pub fn agent(&mut self, file: &str) -> usize {
        let n = self.agents.len();
        let log = std::fs::File::create(self.dir.path().join(format!("{file}.{n}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(["device", "--echo", "--bundle"])
            .arg(self.bundle_path(file))
            .env("OUTPOST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push(Proc(child));
        n
    }

    /// Start `outpost device ARGS --bundle <file>` (ARGS: `--exec …` or
    /// `--echo`, and any flags), logging at `info` to `<file>.<n>.log`.
    /// Returns its index in `agents`.
    pub fn agent_with(&mut self, file: &str, args: &[&str]) -> usize {
        self.agent_logging(file, args, "info")
    }

    /// [`Box_::agent_with`] with this `OUTPOST_LOG` filter.
    pub fn agent_logging(&mut self, file: &str, args: &[&str], filter: &str) -> usize {
        let n = self.agents.len();
        let log = std::fs::File::create(self.dir.path().join(format!("{file}.{n}.log"))).unwrap();
        let child = Command::new(BIN)
            .arg("device")
            .args(args)
            .arg("--bundle")
            .arg(self.bundle_path(file))
            .env("OUTPOST_LOG", filter)
            .env("NO_COLOR", "1")
            .env_remove("OUTPOST_ARTIFACT_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push(Proc(child));
        n
    }

    pub fn agent_log(&self, file: &str, n: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{file}.{n}.log"))).unwrap_or_default()
    }

    pub fn device(&self, id: &str) -> Value {
        let ds = json(&self.run(&["devices", "--json"]));
        ds.as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// A command to `id` round-trips: a live agent holds its session.
    pub fn echo(&self, id: &str) {
        let r = json(&self.run(&["send", id, "ping", "--wait", "20s", "--json"]));
        assert_eq!(r["state"], "succeeded", "{r}");
    }
}

//! Running the real binary from a black-box test: one command against a
//! data dir, its output checked. Shared by the test files that drive the
//! CLI, so each does not carry its own copy.
// Each test file uses what it needs of these.
#![allow(dead_code)]

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// A child process that is killed and reaped when dropped, so a test that
/// panics, or lets one go early, leaves nothing running (a `Child` on its
/// own is only forgotten).
pub struct Proc(pub Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Proc {
    /// Stop it as systemd would (see [`stop`]).
    pub fn stop(&mut self) {
        stop(&mut self.0);
    }
}

/// Stop `child` as systemd would: SIGTERM, then SIGKILL if it has not gone
/// within 10 s. A box that exits on its own writes its coverage profile
/// (under cargo-llvm-cov), and its shutdown path is exercised by every test
/// that starts one; a test that means a crash kills it first.
pub fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the PID of a child we own and have not
        // reaped, so the PID cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// `outpost ARGS` on the box at `dir`, quietly and never with the
/// machine's own `/etc/outpost/outpost.toml`, stdin closed: for a test that
/// streams its output or writes its stdin (set them before spawning).
pub fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        .env("OUTPOST_CONFIG", "/dev/null")
        .stdin(Stdio::null());
    c
}

/// Run `outpost ARGS` on the box at `dir` (see [`command`]).
pub fn outpost(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("run outpost")
}

/// The exit code and both streams, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Its stdout, once it has succeeded.
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Its stdout as the JSON `--json` prints, once it has succeeded.
pub fn json(o: &Output) -> Value {
    serde_json::from_str(ok(o).trim()).expect("--json prints JSON")
}

/// Its stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Bytes of the files under `dir`, recursively, leaving out `*.tmp` files
/// (a chunk being written): what a chunk store or cache holds.
pub fn stored_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        stored_bytes(&p)
                    } else if p.extension().is_some_and(|x| x == "tmp") {
                        0
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A free UDP port on loopback for a box that must come back on the same
/// address after a restart. Taken below the kernel's ephemeral range
/// (`ip_local_port_range`, 32768 and up by default): a port the kernel
/// handed out for `:0` goes back to that pool when the box stops, and a
/// client socket bound meanwhile by another test could take it, so the
/// restart found it in use.
/// Never the same port twice in one test process: two tests could draw
/// the same free port and keep it for their boxes' restarts, and the
/// second to restart found it taken (in `tests/upstream.rs`, nine tests
/// drawing two ports each from 12,000, about one run in eighty; the
/// likely cause of a hub that once failed to start there).
pub fn free_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_000);
        if !given.contains(&port) && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free UDP port in 20000..32000 on 127.0.0.1");
}

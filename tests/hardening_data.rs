//! The data part of the hardening issue, black-box: the real binary on a
//! data dir in a temp dir, a box on a loopback port.

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

fn outpost(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        // Never the machine's own /etc/outpost/outpost.toml.
        .env("OUTPOST_CONFIG", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .expect("run outpost")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A box serving `dir` until dropped.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Serving {
    /// Stop it as systemd does (SIGTERM), and wait (bounded) until it has.
    fn stop(mut self) {
        // SAFETY: kill(2) on the pid of a child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.0.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the box did not stop within 20 s of SIGTERM");
    }
}

fn serve(dir: &Path) -> Serving {
    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        .env("OUTPOST_CONFIG", "/dev/null")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve");
    let mut s = Serving(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if outpost(dir, &["status", "--json"]).status.success() {
            return s;
        }
        if let Some(st) = s.0.try_wait().unwrap() {
            panic!("the box exited with {st} instead of serving");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the box did not start within 30 s");
}

fn queue_ids(dir: &Path, device: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(ok(&outpost(dir, &["queue", device, "--json"])).trim())
        .expect("--json prints JSON");
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_unfinished_sled_snapshot_left_in_the_data_dir_does_not_cost_a_command() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let bundle = tmp.path().join("d1.bundle");
    let b = serve(&dir);
    ok(&outpost(
        &dir,
        &["enroll", "d1", "--out", bundle.to_str().unwrap()],
    ));
    let sent: Vec<String> = (0..20)
        .map(|i| {
            ok(&outpost(&dir, &["send", "d1", &format!("c{i}")]))
                .trim()
                .to_string()
        })
        .collect();
    b.stop();
    // Once more, so sled has a finished snapshot as well as the leftover.
    serve(&dir).stop();
    // What a full disk leaves of the snapshot sled writes at open: the file
    // created, nothing in it, its lsn past the finished one's.
    std::fs::write(
        dir.join("db")
            .join(format!("snap.{:016X}.generating", u64::MAX >> 8)),
        b"",
    )
    .unwrap();
    let _b = serve(&dir);
    let ids = queue_ids(&dir, "d1");
    assert_eq!(ids, sent, "every acknowledged command, in order");
}

#[test]
fn a_cache_below_sleds_minimum_is_a_usage_error_naming_the_range() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    for (value, shown) in [("100", "100 B"), ("0", "0 B"), ("255B", "255 B")] {
        let o = outpost(
            &dir,
            &["serve", "--listen", "127.0.0.1:0", "--cache", value],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("{shown} is below sled's minimum of 256 B"))
                && err.contains("use at least 256 B (default 8 MiB)"),
            "{err}"
        );
        assert!(
            !err.contains("corrupt") && !err.contains("panicked"),
            "{err}"
        );
    }
    assert!(
        !dir.join("db").exists(),
        "refused before anything was opened"
    );
}

#[test]
fn doctor_fails_a_data_dir_that_is_a_regular_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("data");
    std::fs::write(&file, b"not a directory\n").unwrap();
    let o = outpost(&file, &["doctor"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{out}{}", stderr(&o));
    assert!(
        out.contains("FAIL") && out.contains("is not a directory (a regular file)"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"not a directory\n",
        "doctor leaves the file as it was"
    );
}

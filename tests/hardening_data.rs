//! The data part of the hardening issue, black-box: the real binary on a
//! data dir in a temp dir, a box on a loopback port. Also `outpost
//! enroll`: the bundle is written before the device is enrolled, never
//! over an existing path without --force nor through a link; and with the
//! box stopped it enrolls straight on the data dir.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/run.rs"]
mod run;
use run::{ok, outpost, stderr, BIN};

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

// ----- enroll --out and offline enroll -----

fn bundle_id(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("id = "))
        .unwrap_or_else(|| panic!("{} is no bundle:\n{text}", path.display()))
        .to_string()
}

fn device_ids(dir: &Path) -> Vec<String> {
    let v: Value = serde_json::from_str(ok(&outpost(dir, &["devices", "--json"])).trim()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

#[test]
fn enroll_out_to_a_path_that_cannot_be_written_leaves_no_enrollment_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let _b = serve(&dir);
    let bad = tmp.path().join("no-such-dir").join("d1.bundle");
    let o = outpost(&dir, &["enroll", "d1", "--out", bad.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no-such-dir") && err.contains("not enrolled"),
        "{err}"
    );
    assert!(!device_ids(&dir).contains(&"d1".to_string()), "{err}");
    // The same id then enrolls normally.
    let good = tmp.path().join("d1.bundle");
    ok(&outpost(
        &dir,
        &["enroll", "d1", "--out", good.to_str().unwrap()],
    ));
    assert_eq!(bundle_id(&good), "d1");
    assert!(device_ids(&dir).contains(&"d1".to_string()));
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
}

#[test]
fn enroll_out_never_replaces_an_existing_path_without_force_nor_writes_through_a_link() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let _b = serve(&dir);
    let t = tmp.path();
    let file = t.join("file.bundle");
    std::fs::write(&file, b"keep me\n").unwrap();
    let target = t.join("target");
    std::fs::write(&target, b"link target\n").unwrap();
    let link = t.join("link.bundle");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dangling = t.join("dangling.bundle");
    std::os::unix::fs::symlink(t.join("nowhere"), &dangling).unwrap();
    let fifo = t.join("fifo.bundle");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let subdir = t.join("dir.bundle");
    std::fs::create_dir(&subdir).unwrap();

    let before = device_ids(&dir);
    for (i, (path, what)) in [
        (&file, "exists"),
        (&link, "symbolic link"),
        (&dangling, "symbolic link"),
        (&fifo, "fifo"),
        (&subdir, "directory"),
        (&PathBuf::from("/dev/null"), "device node"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("n{i}");
        let o = outpost(&dir, &["enroll", &id, "--out", path.to_str().unwrap()]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", path.display());
        assert!(
            err.contains(&path.display().to_string()) && err.contains(what),
            "{}: {err}",
            path.display()
        );
        assert!(err.contains("not enrolled"), "{err}");
    }
    assert_eq!(device_ids(&dir), before, "nothing was enrolled");

    // --force replaces a regular file, and only that.
    for (path, what) in [
        (&link, "symbolic link"),
        (&dangling, "symbolic link"),
        (&fifo, "fifo"),
        (&subdir, "directory"),
        (&PathBuf::from("/dev/null"), "device node"),
    ] {
        let o = outpost(
            &dir,
            &["enroll", "f1", "--force", "--out", path.to_str().unwrap()],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", path.display());
        assert!(err.contains(what), "{err}");
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"link target\n");
    assert!(
        !t.join("nowhere").exists(),
        "nothing written through a link"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(device_ids(&dir), before, "nothing was enrolled");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me\n");
    ok(&outpost(
        &dir,
        &["enroll", "f1", "--force", "--out", file.to_str().unwrap()],
    ));
    assert_eq!(bundle_id(&file), "f1");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "it holds a private key");
    assert!(leftovers(t).is_empty(), "{:?}", leftovers(t));
}

#[test]
fn enroll_with_the_box_stopped_works_on_the_data_dir_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let bundle = tmp.path().join("pre.bundle");
    // No identity yet: refused, saying to run init; nothing created.
    let o = outpost(&dir, &["enroll", "pre", "--out", bundle.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("outpost init"), "{err}");
    assert!(!dir.join("db").exists() && !bundle.exists(), "{err}");

    ok(&outpost(&dir, &["init"]));
    // The bundle names the address the box will advertise, from the
    // settings it will start with.
    let out = ok(&Command::new(BIN)
        .args([
            "enroll",
            "pre",
            "--tag",
            "line-3",
            "--out",
            bundle.to_str().unwrap(),
        ])
        .env("OUTPOST_DATA_DIR", &dir)
        .env("OUTPOST_CONFIG", "/dev/null")
        .env("OUTPOST_ADVERTISE", "box-7.example:7443")
        .stdin(Stdio::null())
        .output()
        .unwrap());
    assert!(
        out.contains(&format!(
            "enrolled offline in {} (the box is not running)",
            dir.display()
        )),
        "{out}"
    );
    assert_eq!(bundle_id(&bundle), "pre");
    let text = std::fs::read_to_string(&bundle).unwrap();
    assert!(text.contains("\nserver = box-7.example:7443\n"), "{text}");

    // The box, started later, has it, with its tag, and the bundle works.
    let _b = serve(&dir);
    let v: Value = serde_json::from_str(ok(&outpost(&dir, &["devices", "--json"])).trim()).unwrap();
    let d = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "pre")
        .unwrap_or_else(|| panic!("offline enrollment lost: {v}"));
    assert_eq!(d["tags"], serde_json::json!(["line-3"]), "{v}");
    let status: Value =
        serde_json::from_str(ok(&outpost(&dir, &["status", "--json"])).trim()).unwrap();
    let listen = status["listen"].as_str().unwrap().to_string();
    let mut dev = Serving(
        Command::new(BIN)
            .args(["device", "--bundle", bundle.to_str().unwrap(), "--echo"])
            .args(["--server", &listen])
            .env("OUTPOST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let id = ok(&outpost(
        &dir,
        &["send", "pre", "hello", "--wait", "30s", "--json"],
    ));
    let v: Value = serde_json::from_str(id.trim()).unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let _ = dev.0.kill();

    // With the box running, the same command says it went through the box.
    let b2 = tmp.path().join("live.bundle");
    let out = ok(&outpost(
        &dir,
        &["enroll", "live", "--out", b2.to_str().unwrap()],
    ));
    assert!(out.contains("enrolled via the running box"), "{out}");
}

#[test]
fn offline_enroll_refuses_a_store_held_by_a_running_box() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let b = serve(&dir);
    // A box whose admin socket is gone (deleted by hand) still holds the
    // database: the CLI must not open it beside the box.
    std::fs::remove_file(dir.join("admin.sock")).unwrap();
    let bundle = tmp.path().join("x.bundle");
    let o = outpost(&dir, &["enroll", "x", "--out", bundle.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("locked") && err.contains("is another outpost running?"),
        "{err}"
    );
    assert!(
        !bundle.exists() && leftovers(tmp.path()).is_empty(),
        "{err}"
    );
    b.stop();
}

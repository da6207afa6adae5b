//! A full disk: the box's data dir on a small tmpfs this test mounts (root
//! only; skipped with a message elsewhere). New commands are refused with a
//! clear NoSpace error while what was accepted is still delivered and
//! acknowledged; nothing accepted is lost, nothing panics, and once the
//! device has worked the backlog off the box takes commands again by itself.

use outpost::device::{self, ConnectOptions, Received};
use outpost::shell::queue::{QueueError, SendRequest};
use outpost::shell::serve::{self, ServeOptions};
use outpost::shell::store::DeviceRecord;
use outpost::{CommandId, Outcome, SendOptions, State};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

async fn send(q: &outpost::shell::queue::QueueHandle, i: usize) -> Result<CommandId, QueueError> {
    q.send(SendRequest {
        target: "d0".into(),
        payload: vec![(i % 251) as u8; 16 * 1024],
        opts: SendOptions::default(),
        origin: "test".into(),
        signature: None,
    })
    .await
    .map(|r| r.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_commands_keeps_delivering_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = match Tmpfs::mount(&tmp.path().join("small"), "48m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: cannot mount a small tmpfs here ({why}); run as root");
            return;
        }
    };
    let mut o = ServeOptions::new(fs.0.join("data"));
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.limits.min_free_disk = 12 * 1024 * 1024;
    let b = serve::start(o).await.unwrap();
    b.queue.enroll(DeviceRecord::new("d0")).await.unwrap();
    let bundle = b.identity.issue_device("d0", &b.advertise).unwrap();

    // Fill the disk while the device is away, until the box refuses.
    let mut accepted = Vec::new();
    let mut refusal = None;
    for i in 0..20_000 {
        match send(&b.queue, i).await {
            Ok(id) => accepted.push(id),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("the box refuses before 320 MB fit on 48 MB");
    assert!(
        matches!(refusal, QueueError::NoSpace { .. }),
        "a full disk is NoSpace: {refusal}"
    );
    assert!(refusal.is_refusal() && refusal.to_string().contains("--min-free-disk"));
    assert!(accepted.len() > 100, "some fit first: {}", accepted.len());

    // The device comes and works the backlog off; senders keep trying.
    let dev = tokio::spawn(async move {
        loop {
            if let Ok(mut c) = device::connect(&bundle, &ConnectOptions::default()).await {
                while let Ok(Some(m)) = c.next().await {
                    if let Received::Command(cmd) = m {
                        if c.ack(cmd.id, Outcome::Ok(vec![])).await.is_err() {
                            break;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut refused_meanwhile = 0;
    for id in &accepted {
        loop {
            match b.queue.show(*id).await {
                Ok(v) if v.state.is_final() => {
                    assert_eq!(v.state, State::Succeeded, "{v:?}");
                    break;
                }
                Ok(_) => {}
                // A store that failed a write answers with why, and comes
                // back by itself.
                Err(QueueError::Storage(_)) => {}
                Err(e) => panic!("{id}: {e}"),
            }
            assert!(Instant::now() < deadline, "{id} did not end in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // And the box takes new commands again, by itself (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        match send(&b.queue, 0).await {
            Ok(id) => break id,
            Err(e) => {
                refused_meanwhile += 1;
                assert!(
                    Instant::now() < deadline,
                    "the box did not take commands again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let v = b.queue.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(v.map(|v| v.state), Some(State::Succeeded));
    dev.abort();
    b.stop().await;
    eprintln!(
        "{} accepted before the reserve, all succeeded; {refused_meanwhile} refused while draining; then accepted again",
        accepted.len()
    );
}

/// The real binary with no reserve at all: the disk fills under sled
/// itself. sled cannot go on after a failed write (nor be closed), so the
/// box exits with code 75 and says why; restarted once space is back, it
/// has every command it acknowledged.
#[test]
fn a_disk_that_fills_under_the_database_exits_for_a_restart_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = match Tmpfs::mount(&tmp.path().join("small"), "40m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: cannot mount a small tmpfs here ({why}); run as root");
            return;
        }
    };
    // Ballast, deleted later to "free space".
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![0u8; 16 << 20]).unwrap();
    let dir = fs.0.join("data");
    let bin = env!("CARGO_BIN_EXE_outpost");
    let serve = || {
        Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--min-free-disk", "0"])
            .env("OUTPOST_DATA_DIR", &dir)
            .env("OUTPOST_LOG", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut b = serve();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked: Vec<String> = rt.block_on(async {
        use outpost::shell::admin::{AdminClient, AdminRequest, AdminResponse};
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut admin = loop {
            match AdminClient::connect(&dir).await {
                Ok(a) => break a,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("the box did not start: {e}"),
            }
        };
        let enroll = AdminRequest::Enroll {
            id: "d0".into(),
            tags: vec![],
            caps: vec![],
            gateway: false,
            force: false,
        };
        admin.call(&enroll).await.unwrap();
        let mut acked = Vec::new();
        for i in 0..5_000 {
            let req = AdminRequest::Send(SendRequest {
                target: "d0".into(),
                payload: vec![(i % 251) as u8; 64 * 1024],
                opts: SendOptions::default(),
                origin: "test".into(),
                signature: None,
            });
            // Bounded: a box whose store stalls on the full disk must exit
            // by itself (the stall watch, after two of its periods), and
            // this call then fails.
            let answer = tokio::time::timeout(Duration::from_secs(90), admin.call(&req))
                .await
                .expect("the box neither answered nor exited in 90 s");
            match answer {
                Ok(AdminResponse::Receipt(r)) => acked.push(r.id.to_string()),
                _ => break,
            }
        }
        acked
    });
    // Bounded: the box exits by itself once a write failed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = b.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the box did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    use std::io::Read;
    b.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("exiting with code 75"), "{stderr}");
    assert!(acked.len() > 10, "some fit first: {}", acked.len());
    // Whatever the failed write left free is taken too (bounded: the
    // filesystem is 40 MiB), so the disk is as full as a disk gets.
    let filler = fs.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let page = [0u8; 4096];
        for _ in 0..(40 << 20) / 4096 {
            if f.write_all(&page).and_then(|()| f.flush()).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
    }
    // systemd restarts it while the disk is still full: it cannot open (sled
    // writes a snapshot at open), says so, and leaves sled's unfinished
    // snapshot behind; that is no damage and must not be called any.
    let full = serve().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&full.stderr);
    assert!(!full.status.success(), "{err}");
    assert!(err.contains("is full"), "{err}");
    assert!(
        !err.contains("corrupt") && !err.contains("aside"),
        "no data to discard: {err}"
    );
    std::fs::remove_file(&filler).unwrap();
    // Space comes back; the restarted box has every acknowledged command.
    std::fs::remove_file(&ballast).unwrap();
    let mut b = serve();
    let deadline = Instant::now() + Duration::from_secs(30);
    let queue = loop {
        let o = Command::new(bin)
            .args(["queue", "d0", "--json"])
            .env("OUTPOST_DATA_DIR", &dir)
            .output()
            .unwrap();
        if o.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();
        }
        if b.try_wait().unwrap().is_some() {
            let mut err = String::new();
            b.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("the restarted box exited: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "the restarted box did not answer"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = b.kill();
    let _ = b.wait();
    let ids: std::collections::HashSet<&str> = queue
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    let gone: Vec<String> = acked
        .iter()
        .enumerate()
        .filter(|(_, id)| !ids.contains(id.as_str()))
        .map(|(i, id)| format!("#{i} {id}"))
        .collect();
    assert!(
        gone.is_empty(),
        "{} of {} acknowledged commands are gone after the restart ({} listed): {gone:?}",
        gone.len(),
        acked.len(),
        ids.len()
    );
    eprintln!(
        "{} acknowledged before the disk filled; exit 75; all {} there after the restart",
        acked.len(),
        acked.len()
    );
}

fn outpost(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_CONFIG", "/dev/null")
        .env("OUTPOST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// A disk smaller than the default 32 MiB reserve: the default scales to it
/// (a tenth of the disk), so sends are taken; an explicit reserve larger
/// than the disk is warned about by `serve` and failed by `doctor`, each
/// naming both sizes and the setting to change.
#[test]
fn a_reserve_larger_than_the_disk_is_named_and_the_default_scales_to_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = match Tmpfs::mount(&tmp.path().join("small"), "8m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: cannot mount a small tmpfs here ({why}); run as root");
            return;
        }
    };
    let dir = fs.0.join("data");
    let bin = env!("CARGO_BIN_EXE_outpost");
    let start = |extra: &[&str]| {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("OUTPOST_DATA_DIR", &dir)
            .env("OUTPOST_CONFIG", "/dev/null")
            .env("OUTPOST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !outpost(&dir, &["status"], &[]).status.success() {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("the box exited with {s}");
            }
            assert!(Instant::now() < deadline, "the box did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let stop = |child: std::process::Child| {
        // SAFETY: kill(2) on the pid of a child this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // No reserve set: a tenth of 8 MiB is kept, so a send is taken.
    let b = start(&[]);
    let bundle = fs.0.join("d0.bundle");
    let o = outpost(
        &dir,
        &["enroll", "d0", "--out", bundle.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{o:?}");
    let o = outpost(&dir, &["send", "d0", "hello"], &[]);
    assert!(
        o.status.success(),
        "the default reserve refused a send on an 8 MiB disk: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let log = stop(b);
    assert!(!log.contains("reserve"), "{log}");
    let o = outpost(&dir, &["doctor"], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("reserve"), "{out}");

    // 64 MiB asked for on 8 MiB: the box starts (what is queued is still
    // delivered) and warns; doctor fails it.
    let b = start(&["--min-free-disk", "64MiB"]);
    let o = outpost(&dir, &["send", "d0", "x"], &[]);
    assert_eq!(o.status.code(), Some(5), "refused: {o:?}");
    let log = stop(b);
    assert!(
        log.contains("WARN")
            && log.contains("the free-space reserve (64 MiB)")
            && log.contains("(8 MiB)")
            && log.contains("--min-free-disk"),
        "{log}"
    );
    let o = outpost(&dir, &["doctor"], &[("OUTPOST_MIN_FREE_DISK", "64MiB")]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL  reserve")
            && out.contains("64 MiB")
            && out.contains("(8 MiB)")
            && out.contains("min_free_disk"),
        "{out}"
    );
}

/// `enroll --out` onto a full disk: the file is reserved (an empty file
/// needs no space), the device enrolled, and then the write fails. It says
/// the device is enrolled and how to issue a new bundle, and leaves no
/// half-written file behind.
#[test]
fn a_bundle_that_cannot_be_written_after_the_enrollment_says_how_to_reissue_it() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = match Tmpfs::mount(&tmp.path().join("small"), "1m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: cannot mount a small tmpfs here ({why}); run as root");
            return;
        }
    };
    {
        use std::io::Write;
        let mut f = std::fs::File::create(fs.0.join("filler")).unwrap();
        let page = [0u8; 4096];
        for _ in 0..(1 << 20) / 4096 + 1 {
            if f.write_all(&page).and_then(|()| f.flush()).is_err() {
                break;
            }
        }
    }
    let dir = tmp.path().join("data");
    let mut b = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("OUTPOST_DATA_DIR", &dir)
        .env("OUTPOST_CONFIG", "/dev/null")
        .env("OUTPOST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !outpost(&dir, &["status"], &[]).status.success() {
        assert!(Instant::now() < deadline, "the box did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = fs.0.join("d9.bundle");
    let o = outpost(&dir, &["enroll", "d9", "--out", out.to_str().unwrap()], &[]);
    let devices = outpost(&dir, &["devices", "--json"], &[]);
    let _ = b.kill();
    let _ = b.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("d9 is enrolled, but its bundle could not be written")
            && err.contains("outpost enroll d9 --force --out FILE"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&devices.stdout).contains("\"d9\""));
    let left: Vec<_> = std::fs::read_dir(&fs.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("filler")], "{err}");
}

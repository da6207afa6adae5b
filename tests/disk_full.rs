//! A full disk: the box's data dir on a small tmpfs this test mounts (root
//! only; skipped with a message elsewhere). New commands are refused with a
//! clear NoSpace error while what was accepted is still delivered and
//! acknowledged; nothing accepted is lost, nothing panics, and once the
//! device has worked the backlog off the box takes commands again by itself.

use outpost::client::{self, ConnectOptions, Received};
use outpost::queue::{QueueError, SendRequest};
use outpost::serve::{self, ServeOptions};
use outpost::store::DeviceRecord;
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

async fn send(q: &outpost::queue::QueueHandle, i: usize) -> Result<CommandId, QueueError> {
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
            if let Ok(mut c) = client::connect(&bundle, &ConnectOptions::default()).await {
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
        use outpost::admin::{AdminClient, AdminRequest, AdminResponse};
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
            match admin.call(&req).await {
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
    for id in &acked {
        assert!(
            ids.contains(id.as_str()),
            "{id} was acknowledged and is gone"
        );
    }
    eprintln!(
        "{} acknowledged before the disk filled; exit 75; all {} there after the restart",
        acked.len(),
        acked.len()
    );
}

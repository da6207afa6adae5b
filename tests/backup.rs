//! Black-box tests of backup and restore (issue 27), with the real binary:
//! a backup taken while senders run, restored on another data dir for a
//! box that replaces the first on its address; devices with their old
//! bundles are served by it; damaged files, full dirs and wrong keys are
//! refused before anything is written.

#[path = "common/run.rs"]
mod run;
use run::{free_port, json, ok, outpost, stderr, text};
#[path = "common/cli_box.rs"]
mod cli_box;
use cli_box::{wait_for, Box_};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A box on a fixed loopback port, so a replacement can take its address.
fn box_on_port() -> Box_ {
    let mut b = Box_ {
        dir: tempfile::tempdir().unwrap(),
        listen: format!("127.0.0.1:{}", free_port()),
        serve: None,
        agents: Vec::new(),
        extra: Vec::new(),
    };
    b.serve = Some(b.spawn_serve());
    b.wait_ready();
    b
}

/// A box started on `dir` (a restored data dir) at `listen`.
fn box_at(dir: tempfile::TempDir, listen: &str) -> Box_ {
    let mut b = Box_ {
        dir,
        listen: listen.to_string(),
        serve: None,
        agents: Vec::new(),
        extra: Vec::new(),
    };
    b.serve = Some(b.spawn_serve());
    b.wait_ready();
    b
}

fn send(dir: &Path, target: &str, payload: &str) -> String {
    let r = json(&outpost(dir, &["send", target, payload, "--json"]));
    r["id"].as_str().unwrap().to_string()
}

fn queued_ids(b: &Box_, device: &str) -> HashSet<String> {
    json(&b.run(&["queue", device, "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_box_restored_from_a_backup_taken_under_load_keeps_every_acknowledged_command_and_its_devices()
{
    let mut a = box_on_port();
    ok(&a.enroll("dev-1", "dev-1", &[]));
    ok(&a.enroll("dev-2", "dev-2", &[]));
    // dev-2 runs: its commands end succeeded before the backup.
    a.agent("dev-2");
    let mut done = Vec::new();
    for i in 0..5 {
        let r = json(&a.run(&["send", "dev-2", &format!("d{i}"), "--wait", "20s", "--json"]));
        assert_eq!(r["state"], "succeeded", "{r}");
        done.push(r["id"].as_str().unwrap().to_string());
    }
    // dev-1 is offline: its commands wait in the queue.
    let mut before: Vec<String> = (0..20)
        .map(|i| send(a.dir.path(), "dev-1", &format!("q{i}")))
        .collect();

    // Four senders keep going while the backup is taken; each notes when
    // the box acknowledged each send.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let dir = a.dir.path().to_path_buf();
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 500 {
                    let id = send(&dir, "dev-1", &format!("s{s}-{n}"));
                    acked.lock().unwrap().push((id, Instant::now()));
                    n += 1;
                }
            })
        })
        .collect();
    wait_for(30, "the senders get going", || {
        acked.lock().unwrap().len() >= 20
    });
    let file = a.dir.path().join("box.backup");
    let started = Instant::now();
    let h = json(&a.run(&["backup", "--out", file.to_str().unwrap(), "--json"]));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    before.extend(
        acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| *at < started)
            .map(|(id, _)| id.clone()),
    );
    assert!(h["last_group"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(h["encryption"], "none", "{h}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The box dies; its replacement gets the backup and its address.
    let listen = a.listen.clone();
    a.agents.clear();
    a.stop();
    let target = tempfile::tempdir().unwrap();
    let r = json(&outpost(
        target.path(),
        &["restore", file.to_str().unwrap(), "--json"],
    ));
    assert_eq!(r["header"]["last_group"], h["last_group"], "{r}");
    // A hub above must not take the restored outbox for the dead box's:
    // the restore names a new uplink epoch (`UpFrom`).
    let epoch = |d: &Path| {
        outpost::shell::store::Store::open(d, &outpost::shell::store::StoreOptions::default())
            .and_then(|s| s.uplink_epoch())
            .unwrap()
    };
    assert_ne!(
        epoch(target.path()),
        epoch(a.dir.path()),
        "a new uplink epoch"
    );
    let mut b = box_at(target, &listen);

    let queued = queued_ids(&b, "dev-1");
    eprintln!(
        "{} commands acknowledged before the backup, {} queued on the restored box, {} sent in all",
        before.len(),
        queued.len(),
        20 + acked.lock().unwrap().len()
    );
    let missing: Vec<_> = before.iter().filter(|id| !queued.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} commands acknowledged before the backup are missing: {missing:?}",
        missing.len(),
        before.len()
    );
    for id in &done {
        let v = json(&b.run(&["show", id, "--json"]));
        assert_eq!(v["state"], "succeeded", "{v}");
    }
    let devices = json(&b.run(&["devices", "--json"]));
    assert_eq!(devices.as_array().unwrap().len(), 2, "{devices}");

    // dev-1's old bundle (written by the dead box) connects to the new one
    // and gets its commands: no re-enrolment.
    std::fs::copy(a.bundle_path("dev-1"), b.bundle_path("dev-1")).unwrap();
    std::fs::copy(a.bundle_path("dev-2"), b.bundle_path("dev-2")).unwrap();
    b.agent("dev-1");
    b.agent("dev-2");
    wait_for(60, "dev-1 gets every queued command", || {
        queued_ids(&b, "dev-1").is_empty()
    });
    let v = json(&b.run(&["show", &before[0], "--json"]));
    assert_eq!(v["state"], "succeeded", "{v}");
    b.echo("dev-2");
}

#[test]
fn damaged_backups_full_dirs_and_wrong_keys_are_refused_before_anything_is_written() {
    let b = Box_::start();
    ok(&b.enroll("dev-1", "dev-1", &[]));
    let id = send(b.dir.path(), "dev-1", "hello");
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("plain.backup");
    ok(&b.run(&["backup", "--out", file.to_str().unwrap()]));
    let good = std::fs::read(&file).unwrap();
    let restore = |file: &Path, dir: &Path, extra: &[&str]| {
        let mut args = vec!["restore", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        outpost(dir, &args)
    };

    // Cut short, and one bit flipped in the body: refused, nothing written.
    let target = work.path().join("target");
    let cut = work.path().join("cut.backup");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let o = restore(&cut, &target, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("truncated"), "{}", text(&o));
    assert!(stderr(&o).contains("nothing was written"), "{}", text(&o));
    assert!(!target.exists());
    let flipped = work.path().join("flipped.backup");
    let mut bad = good.clone();
    bad[good.len() - 100] ^= 0x10;
    std::fs::write(&flipped, &bad).unwrap();
    let o = restore(&flipped, &target, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("damaged"), "{}", text(&o));
    assert!(!target.exists());

    // A data dir that is not empty: refused (5), then moved aside with --force.
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("notes.txt"), b"mine").unwrap();
    let o = restore(&file, &target, &[]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(stderr(&o).contains("--force"), "{}", text(&o));
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 1);
    let r = json(&restore(&file, &target, &["--force", "--json"]));
    let aside = r["moved_aside"].as_str().unwrap();
    assert_eq!(
        std::fs::read(Path::new(aside).join("notes.txt")).unwrap(),
        b"mine"
    );
    // What it restored opens: the audit chain verifies on the stopped dir.
    ok(&outpost(&target, &["audit", "--verify"]));

    // A box serving the dir: refused even with --force.
    let o = restore(&file, b.dir.path(), &["--force"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(stderr(&o).contains("stop it"), "{}", text(&o));

    // Encrypted with a passphrase: only that passphrase opens it.
    let pass = work.path().join("pass");
    std::fs::write(&pass, "correct horse\n").unwrap();
    let wrong = work.path().join("wrong");
    std::fs::write(&wrong, "battery staple\n").unwrap();
    let enc = work.path().join("enc.backup");
    let h = json(&b.run(&[
        "backup",
        "--out",
        enc.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(h["encryption"], "passphrase", "{h}");
    let raw = std::fs::read(&enc).unwrap();
    assert!(
        !raw.windows(5).any(|w| w == b"hello"),
        "the payload is in the clear"
    );
    let t2 = work.path().join("t2");
    let o = restore(&enc, &t2, &[]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(stderr(&o).contains("--passphrase-file"), "{}", text(&o));
    let o = restore(&enc, &t2, &["--passphrase-file", wrong.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("cannot be decrypted"), "{}", text(&o));
    assert!(!t2.exists());
    ok(&restore(
        &enc,
        &t2,
        &["--passphrase-file", pass.to_str().unwrap()],
    ));

    // To an age recipient: only its identity opens it.
    let me = age::x25519::Identity::generate();
    let other = age::x25519::Identity::generate();
    use age::secrecy::ExposeSecret;
    let id_file = work.path().join("me.key");
    std::fs::write(&id_file, format!("{}\n", me.to_string().expose_secret())).unwrap();
    let other_file = work.path().join("other.key");
    std::fs::write(
        &other_file,
        format!("{}\n", other.to_string().expose_secret()),
    )
    .unwrap();
    let enc2 = work.path().join("enc2.backup");
    let h = json(&b.run(&[
        "backup",
        "--out",
        enc2.to_str().unwrap(),
        "--recipient",
        &me.to_public().to_string(),
        "--json",
    ]));
    assert_eq!(h["encryption"], "recipients", "{h}");
    // Restored into an empty dir that exists (a new box's StateDirectory).
    let t3 = tempfile::tempdir().unwrap();
    let o = restore(
        &enc2,
        t3.path(),
        &["--identity", other_file.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(std::fs::read_dir(t3.path()).unwrap().count(), 0);
    ok(&restore(
        &enc2,
        t3.path(),
        &["--identity", id_file.to_str().unwrap()],
    ));

    // What came back holds the command.
    let c = box_at(t3, "127.0.0.1:0");
    let v = json(&c.run(&["show", &id, "--json"]));
    assert_eq!(v["state"], "queued", "{v}");
}

#[test]
fn scheduled_backups_rotate_keeping_n_and_status_shows_the_newest() {
    let backups = tempfile::tempdir().unwrap();
    let b = Box_::start_with(&[
        "--backup-every",
        "1s",
        "--backup-dir",
        backups.path().to_str().unwrap(),
        "--backup-keep",
        "2",
    ]);
    ok(&b.enroll("dev-1", "dev-1", &[]));
    let id = send(b.dir.path(), "dev-1", "scheduled");
    wait_for(60, "four scheduled backups are written", || {
        b.log().matches("scheduled backup written").count() >= 4
    });
    let files: Vec<_> = std::fs::read_dir(backups.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let s = json(&b.run(&["status", "--json"]));
    assert!(s["backup"]["age_s"].as_u64().unwrap() < 30, "{s}");
    assert!(s["backup"]["error"].is_null(), "{s}");
    assert!(ok(&b.run(&["status"])).contains("last backup"));
    // doctor reads the schedule from the environment (or the config file).
    let d = std::process::Command::new(run::BIN)
        .args(["doctor", "--json"])
        .env("OUTPOST_DATA_DIR", b.dir.path())
        .env("OUTPOST_CONFIG", "/dev/null")
        .env("OUTPOST_BACKUP_EVERY", "1h")
        .env("OUTPOST_BACKUP_DIR", backups.path())
        .output()
        .unwrap();
    let findings: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
    let f = findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "backup")
        .cloned()
        .unwrap();
    assert_eq!(f["status"], "pass", "{f}");
    assert!(f["detail"].as_str().unwrap().contains("old"), "{f}");

    // The newest holds the command sent before it.
    let newest = s["backup"]["file"].as_str().unwrap().to_string();
    let target = tempfile::tempdir().unwrap();
    ok(&outpost(target.path(), &["restore", &newest]));
    let c = box_at(target, "127.0.0.1:0");
    let v = json(&c.run(&["show", &id, "--json"]));
    assert_eq!(v["state"], "queued", "{v}");
}

#[test]
fn a_schedule_without_a_dir_or_with_keep_0_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let o = outpost(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0", "--backup-every", "1h"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("--backup-dir"), "{}", text(&o));
    let o = outpost(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--backup-every",
            "1h",
            "--backup-dir",
            "/tmp",
            "--backup-keep",
            "0",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("backup_keep"), "{}", text(&o));
}

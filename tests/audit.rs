//! Black-box tests of the audit log (issue 23): the real binary, a box in a
//! temp dir; requests over the admin socket become entries with who, from,
//! what and the decision; the chain is checked on the stopped box's data
//! dir, after an entry is edited and after one is removed.

use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/run.rs"]
mod run;
use run::{ok, outpost, stderr, text, BIN};

fn serve(dir: &std::path::Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("OUTPOST_DATA_DIR", dir)
        .env("OUTPOST_LOG", "warn")
        .env("OUTPOST_CONFIG", "/dev/null")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start serve")
}

/// SIGTERM, as systemd stops it: the writer's last round writes what waits.
fn stop(mut child: Child) {
    // SAFETY: kill(2) on the pid of a child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("the box did not stop on SIGTERM");
}

fn entries(dir: &std::path::Path) -> Vec<Value> {
    ok(&outpost(dir, &["audit", "--json"]))
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect()
}

/// Edit the stored audit value at `seq` with `f` (None: remove it).
fn tamper(dir: &std::path::Path, seq: u64, f: impl FnOnce(&mut Vec<u8>) -> bool) -> Vec<u8> {
    let db = sled::open(dir.join("db")).unwrap();
    let t = db.open_tree("audit").unwrap();
    let k = seq.to_be_bytes();
    let before = t.get(k).unwrap().expect("the entry is stored").to_vec();
    let mut v = before.clone();
    if f(&mut v) {
        t.insert(k, v).unwrap();
    } else {
        t.remove(k).unwrap();
    }
    db.flush().unwrap();
    before
}

fn restore(dir: &std::path::Path, seq: u64, bytes: Vec<u8>) {
    let db = sled::open(dir.join("db")).unwrap();
    db.open_tree("audit")
        .unwrap()
        .insert(seq.to_be_bytes(), bytes)
        .unwrap();
    db.flush().unwrap();
}

#[test]
fn admin_requests_are_audited_and_verify_names_an_edited_and_a_removed_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let child = serve(dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !outpost(dir, &["status", "--json"]).status.success() {
        assert!(Instant::now() < deadline, "the box did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bundle = dir.join("dev-1.bundle");
    ok(&outpost(
        dir,
        &["enroll", "dev-1", "--out", bundle.to_str().unwrap()],
    ));
    let id = ok(&outpost(dir, &["send", "dev-1", "reboot"]))
        .trim()
        .to_string();
    ok(&outpost(dir, &["revoke", "dev-1"]));
    let refused = outpost(dir, &["send", "dev-1", "again"]);
    assert_eq!(refused.status.code(), Some(5), "{}", text(&refused));
    ok(&outpost(dir, &["status"]));

    let log = entries(dir);
    let uid = format!("uid {}", unsafe { libc::getuid() });
    let what: Vec<(&str, &str, bool)> = log
        .iter()
        .map(|e| {
            assert_eq!(e["who"], uid.as_str(), "{e}");
            assert_eq!(e["from"], "socket", "{e}");
            (
                e["what"].as_str().unwrap(),
                e["target"].as_str().unwrap(),
                e["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    // Plain reads (status) are not entries.
    assert_eq!(
        what,
        [
            ("enroll", "dev-1", true),
            ("send", "dev-1", true),
            ("revoke", "dev-1", true),
            ("send", "dev-1", false),
        ],
        "{log:?}"
    );
    assert_eq!(log[1]["command"], id.as_str());
    // SHA-256 of "reboot".
    assert_eq!(
        log[1]["payload_sha256"],
        "92bf8ea876da2855facd9e176e481364a9e1d709c9bbfe6e2bd8109bcf7ed20a"
    );
    assert!(
        log[3]["why"].as_str().unwrap().contains("revoked"),
        "{}",
        log[3]
    );
    // Reading the log is a security function: the read above is entry 5.
    let table = ok(&outpost(dir, &["audit", "--limit", "2"]));
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows[1].contains("refused: device `dev-1` is revoked"),
        "{table}"
    );
    assert!(
        rows[2].starts_with('5') && rows[2].contains("audit"),
        "{table}"
    );
    stop(child);

    // An enrollment on the stopped box is an entry too; the log reads
    // offline.
    let b2 = dir.join("dev-2.bundle");
    ok(&outpost(
        dir,
        &["enroll", "dev-2", "--out", b2.to_str().unwrap()],
    ));
    let log = entries(dir);
    let last = log.last().unwrap();
    assert_eq!(
        (&last["what"], &last["from"], &last["target"]),
        (
            &Value::from("enroll"),
            &Value::from("offline"),
            &Value::from("dev-2")
        ),
        "{log:?}"
    );

    // --since: a duration ago keeps everything this test wrote; a time in
    // the future keeps nothing; a time in the past, with its zone, all.
    let count = |since: &str| {
        ok(&outpost(dir, &["audit", "--since", since, "--json"]))
            .lines()
            .count()
    };
    let all = entries(dir).len();
    assert!(count("1h") >= all, "the log's last hour holds all {all}");
    assert_eq!(count("2099-01-01T00:00:00Z"), 0);
    assert!(count("2020-01-01T00:00:00Z") >= all);
    for bad in ["yesterday", "+1h", "2026-01-01T00:00:00"] {
        let o = outpost(dir, &["audit", "--since", bad]);
        assert_eq!(o.status.code(), Some(2), "--since {bad}: {}", text(&o));
        assert!(
            stderr(&o).contains("RFC 3339"),
            "--since {bad}: {}",
            text(&o)
        );
    }

    let verify =
        |d: &std::path::Path| outpost(d, &["audit", "--verify", "--data-dir", d.to_str().unwrap()]);
    let v = verify(dir);
    let good = ok(&v);
    assert!(
        good.contains("entries, chain intact from seq 1 to"),
        "{good}"
    );

    // An edited entry: the target of the first send, dev-1 → dev-2.
    let original = tamper(dir, 2, |v| {
        let at = v.windows(5).position(|w| w == b"dev-1").unwrap();
        v[at + 4] = b'2';
        true
    });
    let v = verify(dir);
    assert_eq!(v.status.code(), Some(6), "{}", text(&v));
    assert!(stderr(&v).contains("seq 2: edited"), "{}", text(&v));
    restore(dir, 2, original);
    ok(&verify(dir));

    // A removed entry: a gap.
    tamper(dir, 3, |_| false);
    let v = verify(dir);
    assert_eq!(v.status.code(), Some(6), "{}", text(&v));
    assert!(stderr(&v).contains("seq 3: removed"), "{}", text(&v));
    assert!(stderr(&v).contains("gap"), "{}", text(&v));
}

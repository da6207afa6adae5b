//! Black-box tests of the security hardening (issue 21): the real binary, a
//! box in a temp dir on a loopback port, devices run as `outpost device`.
//!
//! - a device's identity is the certificate issued last (`enroll --force`),
//!   and an existing id is not enrolled again without `--force`;
//! - a box with a store does not mint a new CA when `tls/` is gone;
//! - two live devices sharing one bundle are stopped, a reboot is not;
//! - refusals cost a bounded number of log lines, and a refused agent stops.

use serde_json::Value;
use std::time::{Duration, Instant};

#[path = "common/run.rs"]
mod run;
use run::{json, ok, outpost, text};
#[path = "common/cli_box.rs"]
mod cli_box;
use cli_box::{exits_within, Box_};

#[test]
fn enroll_force_locks_out_every_earlier_bundle_and_the_new_one_connects() {
    let mut b = Box_::start();
    ok(&b.enroll("d1", "old", &[]));
    let old = b.agent("old");
    b.echo("d1");

    // Without --force an existing id is refused, named, with the way on.
    let o = b.enroll("d1", "again", &[]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`d1`") && err.contains("--force"), "{err}");
    assert!(!b.bundle_path("again").exists(), "no bundle written");

    ok(&b.enroll("d1", "new", &["--force"]));
    // The live connection of the old bundle is closed and its agent stops,
    // saying why, instead of reconnecting.
    let s = exits_within(&mut b.agents[old], 30).expect("the old agent stops");
    assert!(!s.success());
    assert!(
        b.agent_log("old", old).contains("superseded"),
        "{}",
        b.agent_log("old", old)
    );

    b.agent("new");
    b.echo("d1");
    // The old bundle stays out at the handshake, also after a restart.
    b.stop();
    b.serve = Some(b.spawn_serve());
    b.wait_ready();
    let again = b.agent("old");
    let s = exits_within(&mut b.agents[again], 30).expect("the old bundle is refused");
    assert!(!s.success());
    let log = b.agent_log("old", again);
    assert!(
        log.contains("superseded") && log.contains("alert 46"),
        "{log}"
    );
    b.echo("d1");
}

#[test]
fn re_enrolling_a_revoked_id_keeps_its_revoked_bundle_out() {
    let mut b = Box_::start();
    ok(&b.enroll("d1", "stolen", &[]));
    ok(&b.run(&["revoke", "d1"]));

    let o = b.enroll("d1", "new", &[]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("`d1`") && err.contains("revoked") && err.contains("--force"),
        "{err}"
    );

    ok(&b.enroll("d1", "new", &["--force"]));
    let thief = b.agent("stolen");
    let s = exits_within(&mut b.agents[thief], 30).expect("the stolen bundle is refused");
    assert!(!s.success());
    assert!(b.agent_log("stolen", thief).contains("superseded"));
    b.agent("new");
    b.echo("d1");
    assert_eq!(b.device("d1")["revoked"], false);
}

#[test]
fn a_box_with_a_store_and_no_ca_refuses_to_start_and_names_the_way_out() {
    let mut b = Box_::start();
    ok(&b.enroll("d1", "d1", &[]));
    b.stop();
    let tls = b.dir.path().join("tls");
    std::fs::remove_dir_all(&tls).unwrap();

    let mut serve = b.spawn_serve();
    let s = exits_within(&mut serve, 30);
    if s.is_none() {
        let _ = serve.kill();
        let _ = serve.wait();
    }
    let s = s.expect("serve refuses to start");
    assert!(!s.success());
    let log = b.log().to_lowercase();
    for want in [
        "ca.crt",
        "ca.key",
        "restore",
        "backup",
        "move",
        "enrolled again",
    ] {
        assert!(log.contains(want), "`{want}` missing from: {log}");
    }
    assert!(!tls.join("ca.crt").exists(), "no new CA was made");

    // `init` refuses the same way, and `doctor` fails it.
    let o = b.run(&["init"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("backup"));
    let o = b.run(&["doctor"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("backup"),
        "{}",
        text(&o)
    );
    assert!(!tls.join("ca.crt").exists());

    // An empty data dir still initialises.
    let fresh = tempfile::tempdir().unwrap();
    ok(&outpost(fresh.path(), &["init"]));
    assert!(fresh.path().join("tls").join("ca.crt").exists());
}

#[test]
fn a_box_whose_tls_dir_is_another_boxs_refuses_to_start() {
    let mut b = Box_::start();
    ok(&b.enroll("d1", "d1", &[]));
    b.stop();
    // tls/ restored from the wrong backup: a CA its devices do not trust.
    let other = tempfile::tempdir().unwrap();
    ok(&outpost(other.path(), &["init"]));
    let tls = b.dir.path().join("tls");
    std::fs::remove_dir_all(&tls).unwrap();
    std::fs::rename(other.path().join("tls"), &tls).unwrap();

    let o = b.run(&["doctor"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("is not the CA of this box's store"),
        "{}",
        text(&o)
    );

    let mut serve = b.spawn_serve();
    let s = exits_within(&mut serve, 30);
    if s.is_none() {
        let _ = serve.kill();
        let _ = serve.wait();
    }
    assert!(!s.expect("serve refuses to start").success());
    let log = b.log();
    assert!(
        log.contains("is not the CA of this box's store") && log.contains("backup"),
        "{log}"
    );
}

#[test]
fn two_live_devices_sharing_a_bundle_one_stops_and_devices_and_status_show_it() {
    let mut b = Box_::start();
    ok(&b.enroll("d1", "d1", &[]));
    assert_eq!(b.device("d1")["shared_bundle"], Value::Null);
    let first = b.agent("d1");
    let second = b.agent("d1");
    let deadline = Instant::now() + Duration::from_secs(60);
    let stopped = loop {
        assert!(
            Instant::now() < deadline,
            "neither agent stopped within 60 s"
        );
        if b.agents[first].try_wait().unwrap().is_some() {
            break first;
        }
        if b.agents[second].try_wait().unwrap().is_some() {
            break second;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let kept = if stopped == first { second } else { first };
    let log = b.agent_log("d1", stopped);
    assert!(log.contains("in use elsewhere"), "{log}");
    assert!(!b.agents[stopped].wait().unwrap().success());
    // The other one keeps the id and works.
    assert!(b.agents[kept].try_wait().unwrap().is_none());
    b.echo("d1");

    let d = b.device("d1");
    assert!(d["shared_bundle"]["refused"].as_u64().unwrap() >= 1, "{d}");
    let s = json(&b.run(&["status", "--json"]));
    assert_eq!(s["shared_bundles"][0]["device"], "d1", "{s}");
    assert!(ok(&b.run(&["devices"])).contains("bundle shared"));
    // One line in the box's log for the finding, not one per connection.
    assert_eq!(b.log().matches("keep taking this device's id").count(), 1);
}

#[test]
fn a_rebooted_device_replaces_its_stale_connection_at_once() {
    let mut b = Box_::start();
    ok(&b.enroll("d1", "d1", &[]));
    for boot in 0..2 {
        let n = b.agent("d1");
        b.echo("d1");
        // Power cut: the box still holds the connection until its idle
        // timeout (25 s); the rebooted agent must not wait for that.
        b.agents[n].kill().unwrap();
        b.agents[n].wait().unwrap();
        assert_eq!(
            b.device("d1")["online"],
            true,
            "boot {boot}: the stale connection is held"
        );
    }
    let n = b.agent("d1");
    b.echo("d1");
    assert!(
        b.agents[n].try_wait().unwrap().is_none(),
        "{}",
        b.agent_log("d1", n)
    );
    assert_eq!(b.device("d1")["shared_bundle"], Value::Null);
    assert!(b.log().contains("replaces the old one"));
}

#[test]
fn a_revoked_agent_stops_and_its_retries_cost_a_bounded_number_of_log_lines() {
    let mut b = Box_::start();
    ok(&b.enroll("d1", "d1", &[]));
    ok(&b.run(&["revoke", "d1"]));
    let n = b.agent("d1");
    let s = exits_within(&mut b.agents[n], 30).expect("a revoked agent stops");
    assert!(!s.success());
    let log = b.agent_log("d1", n);
    assert!(log.contains("revoked") && log.contains("enroll"), "{log}");

    // A client that retries anyway, 30 times: not 30 times the log lines.
    for _ in 0..30 {
        let i = b.agent("d1");
        exits_within(&mut b.agents[i], 30).expect("refused");
    }
    let refusals = b
        .log()
        .lines()
        .filter(|l| l.contains("refused") || l.contains("handshake failed"))
        .count();
    assert!(
        (1..=4).contains(&refusals),
        "{refusals} refusal lines:\n{}",
        b.log()
    );
}

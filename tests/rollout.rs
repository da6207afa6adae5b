//! Rollouts end to end, with the real binary: a box (`outpost serve`) and
//! devices (`outpost device --exec`, each writing its id to a log of what
//! it ran), driven by `outpost rollout …`.
//!
//! No timed assertions: waits have generous deadlines that only stop a
//! hang; the rates are high enough that the tests take seconds.

#[path = "common/run.rs"]
mod run;

#[path = "common/cli_box.rs"]
mod cli_box;

use cli_box::{wait_for, Box_};
use run::{json, ok, text};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Enroll `n` devices tagged `fleet` and start an agent for each; the
/// ones `fails` picks exit 3 (a failed command). Every run of a command
/// appends the device's id and payload to `ran.log`.
fn fleet(b: &mut Box_, n: usize, fails: impl Fn(usize) -> bool) -> Vec<String> {
    let log = b.dir.path().join("ran.log");
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("d{i:02}");
        let o = b.enroll(&id, &id, &["--tag", "fleet"]);
        assert!(o.status.success(), "{}", text(&o));
        let end = if fails(i) { "exit 3" } else { "echo ok" };
        let exec = format!("echo \"{id} $(cat)\" >> {}; {end}", log.display());
        b.agent_with(&id, &["--exec", &exec]);
        ids.push(id);
    }
    wait_for(60, "every device connected", || {
        let ds = json(&b.run(&["devices", "--json"]));
        ds.as_array()
            .unwrap()
            .iter()
            .filter(|d| d["online"] == true)
            .count()
            == n
    });
    ids
}

/// What each device ran: id → the payloads, in order.
fn ran(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let text = std::fs::read_to_string(dir.join("ran.log")).unwrap_or_default();
    for line in text.lines() {
        let (id, payload) = line.split_once(' ').unwrap_or((line, ""));
        out.entry(id.to_string())
            .or_default()
            .push(payload.to_string());
    }
    out
}

fn show(b: &Box_, id: &str) -> Value {
    json(&b.run(&["rollout", "show", id, "--json"]))
}

#[test]
fn a_fifth_of_sixty_failing_aborts_after_the_minimum_and_no_one_else_gets_it() {
    let mut b = Box_::start();
    // Every fifth device fails: d04, d09, ...
    fleet(&mut b, 60, |i| i % 5 == 4);
    let o = b.run(&[
        "rollout",
        "start",
        "--target",
        "tag:fleet",
        "--payload",
        "flash",
        "--rate",
        "300/min",
        "--abort-failed",
        "15",
        "--abort-min",
        "10",
        "--on-abort",
        "undo",
        "--wait",
        "120s",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(6), "aborted is exit 6: {}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "aborted", "{v}");
    assert_eq!(v["tripped"], "failed >= 15% (min 10)", "{v}");
    let counts = &v["counts"];
    let finished: u64 = ["succeeded", "failed", "rejected", "timed_out"]
        .iter()
        .map(|s| counts[s].as_u64().unwrap())
        .sum();
    assert!(finished >= 10, "it aborts only after the minimum: {counts}");
    let devices = v["devices"].as_array().unwrap();
    let started: Vec<&str> = devices
        .iter()
        .filter(|d| !d["command"].is_null())
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert!(started.len() < 60, "the abort stopped it: {counts}");
    assert!(counts["cancelled"].as_u64().unwrap() > 0, "{counts}");

    // Let any rollback finish, then read what the devices ran.
    wait_for(60, "every rollback ended", || {
        let v = show(&b, v["id"].as_str().unwrap());
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["rollback_state"].is_null() || d["rollback_state"] != "sent")
    });
    let ran = ran(b.dir.path());
    for (dev, payloads) in &ran {
        assert!(
            started.contains(&dev.as_str()),
            "{dev} was never started but ran {payloads:?}"
        );
        assert_eq!(
            payloads.iter().filter(|p| *p == "flash").count(),
            1,
            "{dev} ran it once: {payloads:?}"
        );
    }
    // The rollback reached every device that took it.
    let v = show(&b, v["id"].as_str().unwrap());
    for d in v["devices"].as_array().unwrap() {
        let took =
            ["succeeded", "failed", "timed_out", "running"].contains(&d["state"].as_str().unwrap());
        assert_eq!(took, !d["rollback"].is_null(), "{d}");
        if took {
            let dev = d["device"].as_str().unwrap();
            assert_eq!(ran[dev].last().map(String::as_str), Some("undo"), "{dev}");
        }
    }
    // list and the dashboard's view of it agree.
    let l = json(&b.run(&["rollout", "list", "--json"]));
    assert_eq!(l[0]["id"], v["id"]);

    // What an operator reads without --json says the same: the state and
    // why, the rule that tripped, a row per device, and the list's counts.
    let id = v["id"].as_str().unwrap();
    let shown = ok(&b.run(&["rollout", "show", id]));
    let head = shown.lines().next().unwrap();
    assert!(head.starts_with(id) && head.contains("aborted"), "{shown}");
    assert!(shown.contains("tripped: "), "{shown}");
    assert!(
        shown.contains("DEVICE") && shown.contains("ROLLBACK"),
        "{shown}"
    );
    assert_eq!(
        shown
            .lines()
            .filter(|l| l.starts_with('d') && l[1..].starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        60,
        "a row per device: {shown}"
    );
    let list = ok(&b.run(&["rollout", "list"]));
    let row = list.lines().find(|l| l.starts_with(id)).expect("its row");
    let failed = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| ["failed", "rejected", "timed_out"].contains(&d["state"].as_str().unwrap()))
        .count();
    assert!(
        row.contains("aborted") && row.contains(&format!(" {failed} ")),
        "{list}"
    );
}

#[test]
fn a_rollout_survives_five_kills_of_the_box_and_each_device_runs_it_once() {
    let mut b = Box_::start();
    fleet(&mut b, 12, |_| false);
    let o = b.run(&[
        "rollout",
        "start",
        "--target",
        "tag:fleet",
        "--payload",
        "flash",
        "--rate",
        "40/min",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let id = json(&o)["id"].as_str().unwrap().to_string();
    for kill in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(1_500 + 300 * kill));
        // kill -9: no shutdown at all.
        b.stop();
        b.serve = Some(b.spawn_serve());
        b.wait_ready();
    }
    wait_for(120, "the rollout completed", || {
        show(&b, &id)["state"] == "completed"
    });
    let v = show(&b, &id);
    assert_eq!(v["counts"]["succeeded"], 12, "{v}");
    let ran = ran(b.dir.path());
    assert_eq!(ran.len(), 12, "{ran:?}");
    for (dev, payloads) in &ran {
        assert_eq!(payloads, &["flash"], "{dev} ran it once");
    }
    // A finished rollout cannot be paused, resumed or aborted.
    for verb in ["pause", "resume", "abort"] {
        let o = b.run(&["rollout", verb, &id]);
        assert_eq!(o.status.code(), Some(5), "{verb}: {}", text(&o));
        assert!(text(&o).contains("has ended"), "{}", text(&o));
    }
}

#[test]
fn a_canary_pauses_until_resumed_and_mistakes_are_usage_errors() {
    let mut b = Box_::start();
    fleet(&mut b, 5, |_| false);
    let o = b.run(&[
        "rollout",
        "start",
        "--target",
        "tag:fleet",
        "--payload",
        "go",
        "--canary",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let id = json(&o)["id"].as_str().unwrap().to_string();
    wait_for(30, "the canary finished and paused", || {
        show(&b, &id)["state"] == "paused"
    });
    let v = show(&b, &id);
    assert_eq!(v["counts"]["succeeded"], 2, "{v}");
    assert_eq!(v["counts"]["waiting"], 3, "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("rollout resume"),
        "{v}"
    );
    assert_eq!(ran(b.dir.path()).len(), 2, "only the canary ran it");
    let o = b.run(&["rollout", "resume", &id]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for(30, "the rest completed", || {
        show(&b, &id)["state"] == "completed"
    });
    assert_eq!(ran(b.dir.path()).len(), 5);

    for (args, want) in [
        (vec!["rollout", "start", "--payload", "x"], "--target"),
        (
            vec!["rollout", "start", "--target", "tag:fleet"],
            "nothing to send",
        ),
        (
            vec![
                "rollout",
                "start",
                "--target",
                "tag:fleet",
                "--payload",
                "x",
                "--rate",
                "5/week",
            ],
            "not a rate",
        ),
        (
            vec![
                "rollout",
                "start",
                "--target",
                "tag:fleet",
                "--payload",
                "x",
                "--canary",
                "0%",
            ],
            "1% to 100%",
        ),
        (
            vec![
                "rollout",
                "start",
                "--target",
                "edge-1/tag:x,dev-1",
                "--payload",
                "x",
            ],
            "not both",
        ),
    ] {
        let o = b.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
    // A target that matches no device is refused by the box, by name.
    let o = b.run(&[
        "rollout",
        "start",
        "--target",
        "tag:nobody",
        "--payload",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("matches no enrolled device"),
        "{}",
        text(&o)
    );
    let o = b.run(&[
        "rollout",
        "start",
        "--target",
        "edge-1/tag:x",
        "--payload",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no box below named edge-1"),
        "{}",
        text(&o)
    );
    let o = b.run(&["rollout", "show", "00000000000000000000000000"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[test]
fn with_health_within_a_device_succeeds_only_once_its_agent_reports_healthy() {
    let mut b = Box_::start();
    for (i, check) in [
        "echo fw 2.1 up",
        "echo fw 2.1 up",
        "echo no link >&2; exit 1",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("h{i}");
        let o = b.enroll(&id, &id, &["--tag", "fleet"]);
        assert!(o.status.success(), "{}", text(&o));
        b.agent_with(&id, &["--echo", "--health", check]);
    }
    wait_for(60, "every device connected", || {
        let ds = json(&b.run(&["devices", "--json"]));
        ds.as_array()
            .unwrap()
            .iter()
            .filter(|d| d["online"] == true)
            .count()
            == 3
    });
    let o = b.run(&[
        "rollout",
        "start",
        "--target",
        "tag:fleet",
        "--payload",
        "flash",
        "--health-within",
        "30s",
        "--wait",
        "90s",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "it completed: {}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["counts"]["succeeded"], 2, "{v}");
    assert_eq!(v["counts"]["failed"], 1, "{v}");
    let sick = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "h2")
        .unwrap();
    assert_eq!(sick["state"], "failed", "{sick}");
    assert!(
        sick["result"].as_str().unwrap().contains("no link"),
        "the report's detail is the result: {sick}"
    );
}

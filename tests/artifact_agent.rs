//! The reference agent runs artifact commands: a real `outpost serve` and
//! real `outpost device` processes on loopback. The agent fetches the
//! artifact a command names before its handler runs, hands `--exec` the
//! verified file, stays within its disk budget, resumes after kill -9, and
//! never hands over a file whose cached chunks were damaged.

#[path = "common/run.rs"]
mod run;
use run::{json, ok};
#[path = "common/cli_box.rs"]
mod cli_box;
use cli_box::{wait_for, Box_};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};

const MAX_CHUNK: u64 = 256 * 1024;

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn sha_hex(b: &[u8]) -> String {
    outpost::engine::artifact::Digest::of(b).hex()
}

fn add(b: &Box_, bytes: &[u8], name: &str, version: &str) -> Value {
    let f = b.dir.path().join(format!("{name}-{version}.src"));
    std::fs::write(&f, bytes).unwrap();
    json(&b.run(&[
        "artifact",
        "add",
        f.to_str().unwrap(),
        "--name",
        name,
        "--version",
        version,
        "--json",
    ]))
}

fn send(b: &Box_, dev: &str, spec: &str) -> String {
    ok(&b.run(&["send", dev, "flash", "--artifact", spec]))
        .trim()
        .to_string()
}

fn show(b: &Box_, id: &str) -> Value {
    json(&b.run(&["show", id, "--json"]))
}

fn ended(b: &Box_, id: &str, secs: u64) -> Value {
    let mut last = Value::Null;
    wait_for(secs, "the command ends", || {
        last = show(b, id);
        last["state"] != "queued" && last["state"] != "delivered"
    });
    last
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn cache_bytes(dir: &Path) -> u64 {
    files(&dir.join("chunks"))
        .iter()
        .filter_map(|p| p.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Prints the file's SHA-256, then the four names, so the result shows
/// exactly what the handler was given.
const REPORT: &str = r#"sha256sum "$OUTPOST_ARTIFACT" | cut -d' ' -f1; echo "$OUTPOST_ARTIFACT_NAME $OUTPOST_ARTIFACT_VERSION $OUTPOST_ARTIFACT_DIGEST"; basename "$OUTPOST_ARTIFACT""#;

#[test]
fn exec_runs_with_the_verified_artifact_and_its_names() {
    let mut b = Box_::start();
    assert!(b.enroll("dev-1", "dev-1", &[]).status.success());
    let data = random(2 << 20, 1);
    let a = add(&b, &data, "fw", "2.1");
    let dir = b.dir.path().join("dev-1-artifacts");
    b.agent_with(
        "dev-1",
        &["--exec", REPORT, "--artifact-dir", dir.to_str().unwrap()],
    );
    let id = send(&b, "dev-1", "fw@2.1");
    let v = ended(&b, &id, 60);
    assert_eq!(v["state"], "succeeded", "{v}\n{}", b.agent_log("dev-1", 0));
    let out = v["result"].as_str().unwrap().to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], sha_hex(&data), "the handler saw the file: {out}");
    assert_eq!(
        lines[1],
        format!("fw 2.1 {}", a["digest"].as_str().unwrap()),
        "{out}"
    );
    assert_eq!(lines[2], "fw-2.1");
    assert_eq!(std::fs::read(dir.join("fw-2.1")).unwrap(), data);
    assert!(
        v.get("progress").is_none(),
        "progress is dropped at the ack: {v}"
    );

    // A second command naming it uses the verified file: nothing fetched.
    let id2 = send(&b, "dev-1", "fw@2.1");
    let v = ended(&b, &id2, 30);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(
        b.agent_log("dev-1", 0).contains("fetched_bytes=0"),
        "{}",
        b.agent_log("dev-1", 0)
    );
}

#[test]
fn an_artifact_over_the_disk_budget_is_rejected_and_leaves_nothing() {
    let mut b = Box_::start();
    assert!(b.enroll("dev-2", "dev-2", &[]).status.success());
    add(&b, &random(2 << 20, 2), "big", "1");
    let dir = b.dir.path().join("dev-2-artifacts");
    b.agent_with(
        "dev-2",
        &[
            "--echo",
            "--artifact-dir",
            dir.to_str().unwrap(),
            "--max-artifact-disk",
            "1MiB",
        ],
    );
    let id = send(&b, "dev-2", "big@1");
    let v = ended(&b, &id, 60);
    let err = v["error"].as_str().unwrap_or_default();
    assert!(
        err.starts_with("rejected:")
            && err.contains("--max-artifact-disk")
            && err.contains("1048576"),
        "the reason names the budget and what to do: {v}"
    );
    let left = files(&dir);
    assert!(left.is_empty(), "nothing partial left behind: {left:?}");
}

#[test]
fn a_damaged_cached_chunk_is_fetched_again_and_the_handler_sees_only_the_verified_file() {
    let mut b = Box_::start();
    assert!(b.enroll("dev-3", "dev-3", &[]).status.success());
    let data = random(1 << 20, 3);
    add(&b, &data, "cfg", "7");
    let dir = b.dir.path().join("dev-3-artifacts");
    b.agent_with(
        "dev-3",
        &["--exec", REPORT, "--artifact-dir", dir.to_str().unwrap()],
    );
    let v = ended(&b, &send(&b, "dev-3", "cfg@7"), 60);
    assert_eq!(v["state"], "succeeded", "{v}");
    // Between two fetches: one cached chunk and the finished file are
    // damaged on the device's disk (a flipped byte each).
    let chunk = files(&dir.join("chunks"))[0].clone();
    for p in [&chunk, &dir.join("cfg-7")] {
        let mut bytes = std::fs::read(p).unwrap();
        bytes[10] ^= 0x55;
        std::fs::write(p, bytes).unwrap();
    }
    let v = ended(&b, &send(&b, "dev-3", "cfg@7"), 60);
    assert_eq!(v["state"], "succeeded", "{v}");
    let out = v["result"].as_str().unwrap();
    assert_eq!(out.lines().next(), Some(sha_hex(&data).as_str()), "{out}");
    let log = b.agent_log("dev-3", 0);
    assert!(
        log.contains("cached chunks failed verification; fetching them again"),
        "{log}"
    );
    assert_eq!(std::fs::read(dir.join("cfg-7")).unwrap(), data);
}

/// `(digest hex, bytes)` of every chunk an agent's log says it received.
fn received(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter(|l| l.contains("chunk received"))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(str::to_string)
            };
            Some((field("chunk=")?, field("bytes=")?.parse().ok()?))
        })
        .collect()
}

#[test]
fn an_agent_killed_mid_fetch_resumes_and_refetches_at_most_a_chunk_per_kill() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut b = Box_::start();
    assert!(b.enroll("dev-4", "dev-4", &[]).status.success());
    let size = 8 << 20;
    let data = random(size, 4);
    add(&b, &data, "img", "3");
    // A 4 MB/s path, so the fetch takes a few seconds to cut into.
    let relay = rt
        .block_on(outpost::bench::relay::Relay::start_limited(
            0,
            b.listen.parse().unwrap(),
            outpost::bench::relay::Impairment {
                delay: std::time::Duration::from_millis(5),
                loss: 0.0,
            },
            4_000_000,
        ))
        .unwrap();
    let server = relay.addr().to_string();
    let dir = b.dir.path().join("dev-4-artifacts");
    let args = [
        "--echo",
        "--server",
        &server,
        "--artifact-dir",
        dir.to_str().unwrap(),
        "--idle-timeout",
        "1s",
    ];
    let log = "info,outpost::device::fetch=debug";
    let id = send(&b, "dev-4", "img@3");
    let mut rng = rand::rngs::StdRng::seed_from_u64(44);
    let mut kills = 0;
    let mut refetched = Vec::new();
    let mut durable = 0u64;
    while kills < 10 && durable + (1 << 20) < size as u64 {
        let n = b.agent_logging("dev-4", &args, log);
        // Killed once a random share more of the file is on its disk.
        let at = durable + rng.gen_range(64 * 1024..1 << 20);
        wait_for(30, "the fetch makes progress", || cache_bytes(&dir) >= at);
        b.agents[n].kill().unwrap();
        b.agents[n].wait().unwrap();
        kills += 1;
        durable = cache_bytes(&dir);
        // Received by the killed agent but not yet on its disk: asked
        // again by the next one.
        let lost: u64 = received(&b.agent_log("dev-4", n))
            .iter()
            .filter(|(hex, _)| !dir.join("chunks").join(hex).exists())
            .map(|(_, n)| n)
            .sum();
        refetched.push(lost);
        // A rebooted device comes back after the box saw it go.
        wait_for(20, "the box sees the killed agent gone", || {
            b.device("dev-4")["online"] == false
        });
    }
    let n = b.agent_logging("dev-4", &args, log);
    let v = ended(&b, &id, 60);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(kills >= 3, "only {kills} kills");
    assert_eq!(std::fs::read(dir.join("img-3")).unwrap(), data);
    eprintln!("kills {kills}, bytes refetched per kill {refetched:?}, durable before the last run {durable}");
    for (k, r) in refetched.iter().enumerate() {
        assert!(
            *r <= MAX_CHUNK,
            "kill {k} lost {r} bytes: more than one chunk"
        );
    }
    // The last run asked only for what was not on disk.
    let last = b.agent_log("dev-4", n);
    let fetched: u64 = received(&last).iter().map(|(_, n)| n).sum();
    assert!(
        fetched <= size as u64 - durable + MAX_CHUNK,
        "the last run fetched {fetched} with {durable} of {size} on disk"
    );
    let total: u64 = (0..=n)
        .map(|i| {
            received(&b.agent_log("dev-4", i))
                .iter()
                .map(|(_, n)| n)
                .sum::<u64>()
        })
        .sum();
    eprintln!("chunk bytes received in all {total} for a {size}-byte file");
    assert!(total >= size as u64, "every byte arrived once: {total}");
    assert!(
        total <= size as u64 + kills as u64 * MAX_CHUNK,
        "{total} bytes fetched in all for {size} ({kills} kills)"
    );
    drop(relay);
}

#[test]
fn show_reports_fetch_progress_with_a_rate_while_the_agent_fetches() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut b = Box_::start();
    assert!(b.enroll("dev-5", "dev-5", &[]).status.success());
    let size = 4 << 20;
    add(&b, &random(size, 5), "fw", "9");
    // 1 MB/s: about four seconds of fetch to watch.
    let relay = rt
        .block_on(outpost::bench::relay::Relay::start_limited(
            0,
            b.listen.parse().unwrap(),
            outpost::bench::relay::Impairment {
                delay: std::time::Duration::from_millis(5),
                loss: 0.0,
            },
            1_000_000,
        ))
        .unwrap();
    let server = relay.addr().to_string();
    let dir = b.dir.path().join("dev-5-artifacts");
    b.agent_with(
        "dev-5",
        &[
            "--echo",
            "--server",
            &server,
            "--artifact-dir",
            dir.to_str().unwrap(),
        ],
    );
    let id = send(&b, "dev-5", "fw@9");
    let mut seen = Value::Null;
    wait_for(30, "show reports progress with a rate", || {
        seen = show(&b, &id);
        seen["progress"]["rate_bps"].as_u64().is_some_and(|r| r > 0)
    });
    let p = &seen["progress"];
    assert_eq!(p["artifact"], "fw@9", "{seen}");
    assert_eq!(p["total"], size as u64, "{seen}");
    let (bytes, percent) = (p["bytes"].as_u64().unwrap(), p["percent"].as_u64().unwrap());
    assert!(
        bytes <= size as u64 && percent == bytes * 100 / size as u64,
        "{seen}"
    );
    let rate = p["rate_bps"].as_u64().unwrap();
    assert!(
        rate < 4_000_000,
        "the path carries 1 MB/s, not {rate}: {seen}"
    );
    let human = ok(&b.run(&["show", &id]));
    // Unless the fetch ended in between, people see the same.
    if human.contains("delivered") {
        assert!(
            human.contains("fetching fw@9: ") && human.contains("/s)"),
            "{human}"
        );
    }
    eprintln!("{human}");
    // The fetch runs in its command's task: another command goes by.
    let ping = json(&b.run(&["send", "dev-5", "ping", "--wait", "20s", "--json"]));
    assert_eq!(ping["state"], "succeeded", "{ping}");
    let v = ended(&b, &id, 60);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(v.get("progress").is_none(), "{v}");
    let ping = show(&b, ping["id"].as_str().unwrap());
    assert!(
        ping["finished_at"].as_str() < v["finished_at"].as_str(),
        "the plain command ended first: {ping} {v}"
    );
    drop(relay);
}

#[test]
fn a_link_lost_mid_fetch_is_not_acked_and_the_fetch_resumes_after_the_reconnect() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut b = Box_::start();
    assert!(b.enroll("dev-6", "dev-6", &[]).status.success());
    let size = 3 << 20;
    let data = random(size, 6);
    add(&b, &data, "fw", "6");
    let relay = rt
        .block_on(outpost::bench::relay::Relay::start_limited(
            0,
            b.listen.parse().unwrap(),
            outpost::bench::relay::Impairment {
                delay: std::time::Duration::from_millis(5),
                loss: 0.0,
            },
            1_000_000,
        ))
        .unwrap();
    let server = relay.addr().to_string();
    let dir = b.dir.path().join("dev-6-artifacts");
    b.agent_with(
        "dev-6",
        &[
            "--echo",
            "--server",
            &server,
            "--artifact-dir",
            dir.to_str().unwrap(),
            "--idle-timeout",
            "1s",
        ],
    );
    let id = send(&b, "dev-6", "fw@6");
    wait_for(30, "the fetch is under way", || {
        cache_bytes(&dir) >= 512 * 1024
    });
    relay.set_cut(true);
    wait_for(20, "the agent sees its fetch lose the link", || {
        b.agent_log("dev-6", 0)
            .contains("artifact fetch lost the link")
    });
    let v = show(&b, &id);
    assert!(
        v["state"] == "queued" || v["state"] == "delivered",
        "not acked: {v}"
    );
    let kept = cache_bytes(&dir);
    relay.set_cut(false);
    let v = ended(&b, &id, 60);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(std::fs::read(dir.join("fw-6")).unwrap(), data);
    let log = b.agent_log("dev-6", 0);
    let verified = log
        .lines()
        .find(|l| l.contains("artifact verified"))
        .unwrap_or_default();
    let reused: u64 = verified
        .split_whitespace()
        .find_map(|w| w.strip_prefix("reused_bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        reused >= kept && kept > 0,
        "the second fetch reused the {kept} cached bytes: {verified}"
    );
    drop(relay);
}

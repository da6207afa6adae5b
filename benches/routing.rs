//! `cargo bench --bench routing`: routing decisions in the sans-IO core
//! with 1,000 connected devices (DESIGN §6), no disk and no network, so the
//! figures are the decision alone. Prints figures; asserts nothing.
//!
//! - direct (`d0042`), any-capable (`cap:camera`, 500 capable devices):
//!   latency of one `send` (route, admit, pick a device, hand it over).
//! - broadcast (`tag:all`, 1,000 children): time per broadcast and children
//!   fanned out per second.

use outpost::shell::queue::{Limits, QueueCore, SendRequest};
use outpost::shell::store::DeviceRecord;
use outpost::{Outcome, SendOptions};
use std::time::{Duration, Instant};

const DEVICES: usize = 1000;

fn main() {
    // `cargo bench` passes --bench; under `cargo test` this is a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let samples = if full { 100_000 } else { 2_000 };
    let broadcasts = if full { 200 } else { 5 };
    outpost::outln!("routing in the core, {DEVICES} connected devices");
    outpost::outln!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "decision",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs"
    );
    for (name, target) in [
        ("direct (d0042)", "d0042"),
        ("any capable (cap:camera, 500)", "cap:camera"),
    ] {
        let mut core = fleet();
        let mut lat = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            core.send(req(target), NOW).expect("routed");
            lat.push(t.elapsed());
            settle(&mut core);
        }
        lat.sort_unstable();
        let us = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
        outpost::outln!(
            "{name:<34} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            us(0.5),
            us(0.99),
            us(0.999),
            us(1.0)
        );
    }
    let mut core = fleet();
    let mut total = Duration::ZERO;
    for _ in 0..broadcasts {
        let t = Instant::now();
        core.send(req("tag:all"), NOW).expect("routed");
        total += t.elapsed();
        settle(&mut core);
    }
    let per = total.as_secs_f64() / broadcasts as f64;
    outpost::outln!(
        "broadcast (tag:all, {DEVICES} children): {:.2} ms per broadcast, {:.0} children fanned out per second",
        per * 1e3,
        DEVICES as f64 / per
    );
}

const NOW: u64 = 1_700_000_000_000;

/// 1,000 enrolled, connected devices: all tagged `all`, every other one
/// capable of `camera`.
fn fleet() -> QueueCore {
    let limits = Limits {
        max_queued: 10_000_000,
        ..Limits::default()
    };
    let mut core = QueueCore::new(limits, 1);
    for i in 0..DEVICES {
        let rec = DeviceRecord {
            tags: vec!["all".into(), format!("line-{}", i % 10)],
            caps: if i % 2 == 0 {
                vec!["camera".into()]
            } else {
                vec![]
            },
            ..DeviceRecord::new(format!("d{i:04}"))
        };
        core.enroll(rec, NOW);
    }
    for i in 0..DEVICES {
        core.connect(&format!("d{i:04}"), 0, NOW).expect("enrolled");
    }
    settle(&mut core);
    core
}

/// Seal the round and ack what was delivered, so devices keep room (not
/// timed: the decision is).
fn settle(core: &mut QueueCore) {
    core.seal(NOW);
    let fx = core.take_effects();
    for d in fx.deliveries {
        let _ = core.ack(&d.device, d.id, Outcome::Ok(Vec::new()), NOW);
    }
    core.seal(NOW);
    core.take_effects();
}

fn req(target: &str) -> SendRequest {
    SendRequest {
        target: target.into(),
        payload: vec![0; 100],
        opts: SendOptions::default(),
        origin: "bench".into(),
        signature: None,
    }
}

//! The deterministic simulation (src/sim): hub, edges and devices on the
//! real cores under crashes, partitions, disk faults, lossy links and clock
//! jumps. A failing seed replays with
//! `cargo run --example simulate -- --seed N --steps 3000 --trace`.

use outpost::sim::{run, Config};

const STEPS: u64 = 3_000;

fn assert_clean(seed: u64, steps: u64, cfg: &Config) -> outpost::sim::Report {
    let r = run(seed, steps, cfg);
    assert!(
        r.violations.is_empty(),
        "seed {seed} ({steps} steps): replay with `cargo run --example simulate -- --seed {seed} --steps {steps} --trace`\n{}",
        r.violations.join("\n")
    );
    r
}

#[test]
fn twenty_seeds_under_faults_keep_every_invariant() {
    let cfg = Config::default();
    let mut crashes = 0;
    for seed in 100..120 {
        let r = assert_clean(seed, STEPS, &cfg);
        crashes += r.counts.crashes;
        assert!(
            r.counts.sends_acked > 0 && r.counts.runs > 0,
            "{:?}",
            r.counts
        );
    }
    assert!(crashes > 100, "the faults happen: {crashes} crashes");
}

#[test]
fn a_seed_replays_bit_for_bit() {
    let cfg = Config::default();
    let a = run(42, STEPS, &cfg);
    let b = run(42, STEPS, &cfg);
    assert_eq!((a.hash, &a.counts), (b.hash, &b.counts));
    assert_ne!(run(43, STEPS, &cfg).hash, a.hash);
}

#[test]
fn without_faults_every_command_ends_once() {
    let cfg = Config {
        faults: false,
        ..Config::default()
    };
    for seed in 0..3 {
        let r = assert_clean(seed, STEPS, &cfg);
        assert_eq!(r.counts.crashes, 0);
    }
}

/// Seeds that found bugs, kept as they were found. The world changes with
/// the code, so each bug also has a unit test in `queue::core::tests`.
#[test]
fn regression_seeds() {
    let cfg = Config::default();
    // 11: a full edge outbox wrote held telemetry after a later result; the
    // hub published the stale state after the end (Succeeded → Queued).
    // 10: a command delivered to a gateway and ended by the edge's result
    // in the same round reached the shell as a delivery with no record.
    // 1, 2, 53: a hub retry of a command its edge had ended was forwarded
    // under the same id, deduped by the edge, and never ended.
    for seed in [1, 2, 10, 11, 53] {
        assert_clean(seed, STEPS, &cfg);
    }
}

/// Was a known bug: an edge's operator retries a command the hub sent
/// down after it ended Dead or Failed; it runs again on the edge and
/// succeeds, and the hub ignored the edge's newer end ("the hub's own
/// record stands") and kept showing Dead. The hub now takes a newer end
/// from below after a Dead or Failed one (the ends a retry may follow),
/// and keeps the ends it decides itself (Expired, Cancelled).
/// `cargo run --example simulate -- --seed 5 --steps 3000 --retry-forwarded --trace`.
#[test]
fn an_edge_retry_of_a_hub_command_reaches_the_hub() {
    let cfg = Config {
        retry_forwarded: true,
        ..Config::default()
    };
    assert_clean(5, STEPS, &cfg);
}

/// Was a known weakness: `Ack{id, outcome}` named no attempt, so an ack of
/// an earlier attempt that arrived once a later attempt was in flight ended
/// the later one with the earlier outcome (a retry that succeeded on the
/// device ended Dead, and the next retry ran it again). Here a copied
/// `Command`/`Ack` frame delivers the stale ack; devices now send
/// `AckAttempt` (protocol 1.4) and the box drops an ack of another attempt.
/// QUIC never copies a frame within a stream, so the simulation does not
/// either by default.
#[test]
fn a_copied_ack_of_an_earlier_attempt_is_dropped_as_stale() {
    let cfg = Config {
        dup_device_frames: true,
        ..Config::default()
    };
    assert_clean(10161, 5_000, &cfg);
}

/// Issue 28's CI sweep: two million steps across 400 seeds, a quarter each
/// with edge-side retries, copied device frames and no faults. Bounded in
/// count; about a minute in a debug build here (the cost of a step does not
/// grow with the run any more).
#[test]
fn two_million_steps_across_seeds_keep_every_invariant() {
    let started = std::time::Instant::now();
    let (mut steps, mut acked) = (0u64, 0u64);
    for seed in 1_000..1_400u64 {
        let cfg = Config {
            retry_forwarded: seed % 4 == 1,
            dup_device_frames: seed % 4 == 2,
            faults: seed % 4 != 3,
            ..Config::default()
        };
        let r = assert_clean(seed, 5_000, &cfg);
        steps += r.steps;
        acked += r.counts.sends_acked;
    }
    assert_eq!(steps, 2_000_000);
    assert!(
        acked > 100_000,
        "the workload ran: {acked} sends acknowledged"
    );
    let s = started.elapsed().as_secs_f64();
    eprintln!(
        "{steps} steps in {s:.1} s: {:.0} steps/s (debug build)",
        steps as f64 / s
    );
}

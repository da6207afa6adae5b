//! Replay one seed of the deterministic simulation, or run a range of seeds.
//!
//! ```text
//! cargo run --release --example simulate -- --seed 42 --steps 5000 --trace
//! cargo run --release --example simulate -- --seeds 0..200 --steps 5000
//! ```
//!
//! A seed that finds a violation prints it and makes the exit code 1; its
//! `--seed N --trace` run shows every event that led there, and
//! `--shrink` cuts it down to a short tape of choices that still fails,
//! printed as a test to paste into `tests/simulation.rs`.

use outpost::sim::{run, Config};
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: simulate (--seed N | --seeds A..B) [--steps M] [--trace] [--no-faults] [--retry-forwarded] [--dup-device-frames] [--no-rollouts] [--no-workflows] [--workflow-groups] [--edges E] [--devices D] [--sub-edges S] [--shrink] [--shrink-runs N]"
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut seeds, mut steps) = (0..1u64, 5_000u64);
    let mut cfg = Config::default();
    let mut shrink_runs: Option<u64> = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--seed" => {
                let s: u64 = val().parse().unwrap_or_else(|_| usage());
                seeds = s..s + 1;
            }
            "--seeds" => {
                let v = val();
                let (a, b) = v.split_once("..").unwrap_or_else(|| usage());
                seeds =
                    a.parse().unwrap_or_else(|_| usage())..b.parse().unwrap_or_else(|_| usage());
            }
            "--steps" => steps = val().parse().unwrap_or_else(|_| usage()),
            "--edges" => cfg.edges = val().parse().unwrap_or_else(|_| usage()),
            "--devices" => cfg.devices_per_edge = val().parse().unwrap_or_else(|_| usage()),
            "--sub-edges" => cfg.sub_edges = val().parse().unwrap_or_else(|_| usage()),
            "--trace" => cfg.trace = true,
            "--no-faults" => cfg.faults = false,
            "--retry-forwarded" => cfg.retry_forwarded = true,
            "--dup-device-frames" => cfg.dup_device_frames = true,
            "--no-rollouts" => cfg.rollouts = false,
            "--no-workflows" => cfg.workflows = false,
            "--workflow-groups" => cfg.workflow_groups = true,
            "--shrink" => shrink_runs = Some(2_000),
            "--shrink-runs" => {
                shrink_runs = Some(val().parse().unwrap_or_else(|_| usage()));
            }
            _ => usage(),
        }
    }
    let started = Instant::now();
    let (mut total, mut failed, mut n) = (0u64, 0u64, 0u64);
    let mut settle = 0u64;
    for seed in seeds {
        let r = run(seed, steps, &cfg);
        for line in &r.trace {
            outpost::outln!("{line}");
        }
        total += r.steps;
        settle += r.counts.settle_steps;
        n += 1;
        if r.violations.is_empty() {
            if n == 1 || cfg.trace {
                outpost::outln!("seed {seed}: ok, hash {:016x}, {:?}", r.hash, r.counts);
            }
        } else {
            failed += 1;
            outpost::outln!("seed {seed}: {} violation(s)", r.violations.len());
            for v in &r.violations {
                outpost::outln!("  {v}");
            }
            if let Some(budget) = shrink_runs {
                shrink_seed(seed, steps, &cfg, budget);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    outpost::outln!(
        "{n} seeds, {total} steps (+{settle} settling) in {secs:.1} s: {:.0} steps/s; {failed} seed(s) with violations",
        total as f64 / secs.max(1e-9)
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

fn shrink_seed(seed: u64, steps: u64, cfg: &Config, budget: u64) {
    let (_, tape) = outpost::sim::run_recorded(seed, steps, cfg);
    let full = tape.len();
    match outpost::sim::shrink::shrink(tape, cfg, budget) {
        Some(s) => {
            outpost::outln!(
                "seed {seed}: shrunk from {full} choices to {} in {} runs:\n",
                s.tape.len(),
                s.runs
            );
            outpost::outln!(
                "{}",
                outpost::sim::shrink::as_test(&format!("shrunk_seed_{seed}"), &s, cfg)
            );
        }
        None => outpost::outln!(
            "seed {seed}: its tape does not fail when replayed (a replay settles with the simplest choices, and this failure is in the seeded settling); replay it with --trace instead"
        ),
    }
}

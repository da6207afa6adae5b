//! `cargo bench --bench link`: workload W1 over real QUIC on loopback — 100
//! devices, 100,000 commands of 100 B — at full speed and at a fixed offered
//! load of 5,000/s. Prints figures; asserts nothing.

// The allocator the shipped binary uses (src/main.rs), so the figures are its.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use outpost::bench::{link_bench, LinkBenchOptions};

fn main() {
    // `cargo bench` passes --bench; under `cargo test` this is a smoke run
    // of a few seconds, so the benchmark cannot rot unnoticed.
    let full = std::env::args().any(|a| a == "--bench");
    let commands: usize = std::env::var("OUTPOST_BENCH_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 2_000 });
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let base = std::env::var("OUTPOST_BENCH_DIR")
        .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_string());
    // The signed run beside the unsigned one, so their ratio is of one run.
    for (rate, signed) in [(None, false), (None, true), (Some(5_000), false)] {
        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        let o = LinkBenchOptions {
            devices: if full { 100 } else { 10 },
            commands: if rate.is_some() {
                commands.min(25_000)
            } else {
                commands
            },
            payload: 100,
            producers: 64,
            rate,
            signed,
        };
        let r = rt.block_on(link_bench(dir.path(), &o)).expect("W1 run");
        outpost::outln!("{}", r.table());
    }
}

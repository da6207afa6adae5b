//! `cargo bench --bench queue`: the durable queue alone (no network), with
//! 1, 8 and 64 concurrent producers. Prints figures; asserts nothing.
//! Set OUTPOST_BENCH_COMMANDS to change the size (default 100,000), and
//! OUTPOST_BENCH_RESTART the backlog of the restart run (default 1,000,000;
//! 0 skips it).

// The allocator the shipped binary uses (src/main.rs), so the figures are its.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use outpost::bench::{queue_bench, restart_bench, QueueBenchOptions};

fn main() {
    // `cargo bench` passes --bench; under `cargo test` this is a smoke run
    // of a few seconds, so the benchmark cannot rot unnoticed.
    let full = std::env::args().any(|a| a == "--bench");
    let commands: usize = std::env::var("OUTPOST_BENCH_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 2_000 });
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    // On real storage, not tmpfs: the write figures are the point.
    let base = std::env::var("OUTPOST_BENCH_DIR")
        .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_string());
    for (producers, flow) in [(1, false), (8, false), (64, false), (64, true)] {
        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        let o = QueueBenchOptions {
            commands,
            producers,
            devices: 100,
            payload: 100,
            flow,
        };
        let r = rt.block_on(queue_bench(dir.path(), &o)).expect("bench run");
        outpost::outln!("{}", r.table());
    }
    // W2: restart with a large backlog (OUTPOST_BENCH_RESTART, default 1M).
    let n: usize = std::env::var("OUTPOST_BENCH_RESTART")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1_000_000 } else { 10_000 });
    if n > 0 {
        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        let r = rt
            .block_on(restart_bench(
                std::path::Path::new(env!("CARGO_BIN_EXE_outpost")),
                dir.path(),
                n,
                100,
            ))
            .expect("restart bench");
        outpost::outln!(
            "restart: {} queued commands, open → first delivery {:.3} s, {:.0} B RSS per queued command, data dir {} bytes",
            r.queued, r.open_to_first_delivery_s, r.rss_bytes_per_queued, r.data_dir_bytes
        );
    }
}

//! `cargo bench --bench queue`: the durable queue alone (no network), with
//! 1, 8 and 64 concurrent producers. Prints figures; asserts nothing.
//! Set OUTPOST_BENCH_COMMANDS to change the size (default 100,000).

use outpost::bench::{queue_bench, QueueBenchOptions};

fn main() {
    let commands: usize = std::env::var("OUTPOST_BENCH_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
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
        println!("{}", r.table());
    }
}

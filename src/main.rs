//! The `outpost` binary: a thin shell over the library (see `cli`).

// mimalloc: per-thread heaps make the queue's many small allocations, and
// frees on another thread than the allocating one (decode vs replay, writer
// vs link), cheap; measured in `outpost bench` (issue 8).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    init_tracing();
    std::process::exit(outpost::cli::main());
}

/// Logs to stderr, filtered by `OUTPOST_LOG` (default `info`); without
/// timestamps under journald, which adds its own.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // The demo tells its own story; the box's info logs would drown it.
    let default = match std::env::args().nth(1).as_deref() {
        Some("demo") | Some("bench") => "warn",
        _ => "info",
    };
    let filter = EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.without_time().init();
    } else {
        b.init();
    }
}

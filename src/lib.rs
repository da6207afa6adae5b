//! outpost: an offline-first device relay and durable command queue for edge
//! boxes.
//!
//! The crate is a library with a thin binary (`src/main.rs`); its folders
//! are its layers (ARCHITECTURE.md has the map):
//!
//! - [`engine`]: the sans-IO rules (queue, routing, upstream sync,
//!   workflows, rollouts, trust, alert rules), tested and simulated
//!   without sockets, clocks or disks;
//! - `shell`: the box's IO around them (store, writer, device link, admin
//!   socket, uplinks, dashboard);
//! - `cli`: the `outpost` command, a file per subcommand;
//! - [`device`]: the device library and the reference agent, which build
//!   without the `box` feature;
//! - `sim`: the deterministic simulation over the engine; `bench`: the
//!   benchmarks and the impaired relay the tests use.
//!
//! Beside them, what both ends of the device link share: the wire
//! ([`proto`]), certificates and bundles ([`identity`]), free space and
//! durable writes ([`disk`]), rate-limited refusal logs ([`refusal`]) and
//! stdout ([`stdout`]).

// Every write to stdout goes through `stdout` (a closed pipe ends quietly).
#![warn(clippy::print_stdout)]
// Every public item is documented: the device library is an embedder's
// API, and the box's modules are read by whoever changes them (.ci/run's
// clippy denies the lint, with and without `box`).
#![warn(missing_docs)]

#[cfg(feature = "box")]
pub mod bench;
#[cfg(feature = "box")]
pub mod cli;
pub mod device;
pub mod disk;
pub mod engine;
#[cfg(feature = "box")]
pub mod exit;
#[doc(hidden)]
#[cfg(feature = "box")]
pub mod fuzzing;
pub mod identity;
pub mod proto;
pub mod refusal;
#[cfg(feature = "box")]
pub mod shell;
#[cfg(feature = "box")]
pub mod sim;
pub mod stdout;

pub use engine::command::{
    Command, CommandId, DeviceId, Millis, Outcome, Priority, SendOptions, State,
};

/// Wall-clock milliseconds since the Unix epoch, for the shells. Cores never
/// call this: they are handed the time.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

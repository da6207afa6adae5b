//! outpost: an offline-first device relay and durable command queue for edge
//! boxes.
//!
//! The crate is a library with a thin binary (`src/main.rs`). The logic lives
//! in sans-IO cores (`queue::core`) that take events and the time and return
//! actions; async shells (`queue::service`, `device`, `admin`) do the IO.
//! See ARCHITECTURE.md for the map.

// Every write to stdout goes through `stdout` (a closed pipe ends quietly).
#![warn(clippy::print_stdout)]

pub mod admin;
pub mod alert;
pub mod artifact;
pub mod audit;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod client;
pub mod command;
pub mod config;
pub mod contest;
pub mod device;
pub mod disk;
pub mod duration;
pub mod enroll;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod jobs;
pub mod journal;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod proto;
pub mod queue;
pub mod refusal;
pub mod relay;
pub mod rollout;
pub mod route;
pub mod serve;
pub mod sim;
pub mod stdout;
pub mod store;
pub mod trust;
pub mod upstream;
pub mod workflow;

pub use command::{Command, CommandId, DeviceId, Millis, Outcome, Priority, SendOptions, State};

/// Wall-clock milliseconds since the Unix epoch, for the shells. Cores never
/// call this: they are handed the time.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

//! outpost: an offline-first device relay and durable command queue for edge
//! boxes.
//!
//! The crate is a library with a thin binary (`src/main.rs`). The logic lives
//! in sans-IO cores (`queue::core`) that take events and the time and return
//! actions; async shells (`queue::service`, `device`, `admin`) do the IO.
//! See ARCHITECTURE.md for the map.

// Every write to stdout goes through `stdout` (a closed pipe ends quietly).
#![warn(clippy::print_stdout)]

#[cfg(feature = "box")]
pub mod admin;
#[cfg(feature = "box")]
pub mod alert;
pub mod artifact;
pub mod audit;
#[cfg(feature = "box")]
pub mod backup;
#[cfg(feature = "box")]
pub mod bench;
#[cfg(feature = "box")]
pub mod cli;
pub mod client;
pub mod command;
#[cfg(feature = "box")]
pub mod config;
#[cfg(feature = "box")]
pub mod contest;
#[cfg(feature = "box")]
pub mod device;
pub mod disk;
pub mod duration;
#[cfg(feature = "box")]
pub mod enroll;
#[cfg(feature = "box")]
pub mod exit;
#[doc(hidden)]
#[cfg(feature = "box")]
pub mod fuzzing;
#[cfg(feature = "box")]
pub mod http;
pub mod identity;
#[cfg(feature = "box")]
pub mod jobs;
pub mod journal;
#[cfg(feature = "box")]
pub mod metrics;
#[cfg(feature = "box")]
pub mod monitor;
#[cfg(feature = "box")]
pub mod notify;
pub mod proto;
#[cfg(feature = "box")]
pub mod queue;
pub mod refusal;
#[cfg(feature = "box")]
pub mod relay;
#[cfg(feature = "box")]
pub mod rollout;
#[cfg(feature = "box")]
pub mod route;
#[cfg(feature = "box")]
pub mod serve;
#[cfg(feature = "box")]
pub mod sim;
pub mod stdout;
#[cfg(feature = "box")]
pub mod store;
pub mod trust;
#[cfg(feature = "box")]
pub mod upstream;
#[cfg(feature = "box")]
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

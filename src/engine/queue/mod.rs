//! The durable per-device command queue's rules, sans IO. The writer that
//! drives them and makes them durable is `shell::queue`.
//!
//! - [`core`]: the state machine. It takes requests and the time and
//!   returns journal entries to write, deliveries to make and events to
//!   publish. No sockets, clocks or disks: tested and simulated without any.
//! - [`api`]: the vocabulary both halves speak (requests, views, events,
//!   `QueueError` and its `ErrorClass`).
//! - [`outbox`]: what waits to go upstream.

pub mod api;
pub mod core;
pub mod outbox;

pub use self::core::{default_reserve, Limits, QueueCore, DEFAULT_MIN_FREE_DISK};
pub use api::*;

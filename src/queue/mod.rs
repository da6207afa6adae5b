//! The durable per-device command queue.
//!
//! - [`core`]: the sans-IO state machine. It takes requests and the time and
//!   returns journal entries to write, deliveries to make and events to
//!   publish. No sockets, clocks or disks: tested (and later simulated)
//!   without any.
//! - [`api`]: the vocabulary both halves speak (requests, views, events,
//!   `QueueError` and its `ErrorClass`).
//! - [`service`]: the shell. One writer thread owns the core and the store,
//!   batches every request that arrives while the previous flush runs into
//!   one group commit (one sled batch, one flush), then answers all of the
//!   waiters. Nothing is answered "accepted" before its flush returned.
//! - [`audit`]: the writer's part of the audit log (the chain's tip, the
//!   notes waiting for a round, retention).

pub mod api;
pub mod audit;
pub mod core;
pub mod json;
pub mod outbox;
pub mod progress;
pub mod service;
mod stall;

pub use self::core::{default_reserve, Limits, QueueCore, DEFAULT_MIN_FREE_DISK};
pub use api::*;
pub use service::{open, DeliveredCommand, Delivery, DeviceSession, QueueHandle, ServiceOptions};

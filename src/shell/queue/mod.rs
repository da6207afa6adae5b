//! The durable per-device command queue's shell. Its rules are the engine's
//! (`engine::queue`: the core and the vocabulary both halves speak, which
//! this module re-exports because its handle's API is written in it).
//!
//! - [`service`]: the writer. One writer thread owns the core and the store,
//!   batches every request that arrives while the previous flush runs into
//!   one group commit (one sled batch, one flush), then answers all of the
//!   waiters. Nothing is answered "accepted" before its flush returned.
//! - [`audit`]: the writer's part of the audit log (the chain's tip, the
//!   notes waiting for a round, retention).

pub mod audit;
mod handle;
pub mod json;
pub mod progress;
pub mod service;
mod stall;

pub use crate::engine::queue::api::*;
pub use crate::engine::queue::core::{default_reserve, Limits, QueueCore, DEFAULT_MIN_FREE_DISK};
pub use handle::{shelf_error, AuditVerdict, DeviceSession, QueueHandle};
pub use service::{open, DeliveredCommand, Delivery, ServiceOptions};

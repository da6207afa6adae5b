//! The sans-IO engine: every rule of outpost as plain types that take
//! events and the time and return what to write, send and publish. Nothing
//! here touches a socket, a clock, a file or a runtime
//! (`tests/layers.rs` scans every file of this folder for them), so the
//! unit tests and the seeded simulation (`sim`) run the very code the box
//! runs; the shells (`shell`) do the IO around it.
//!
//! The device library stands on part of it (the records, the trust model,
//! the artifact manifest and wire): those modules build without the
//! crate's `box` feature.

#[cfg(feature = "box")]
pub mod alert;
pub mod artifact;
pub mod audit;
pub mod command;
#[cfg(feature = "box")]
pub mod contest;
#[cfg(feature = "box")]
pub mod cursor;
pub mod duration;
pub mod frames;
pub mod journal;
#[cfg(feature = "box")]
pub mod queue;
#[cfg(feature = "box")]
pub mod rate;
#[cfg(feature = "box")]
pub mod rollout;
#[cfg(feature = "box")]
pub mod route;
pub mod trust;
#[cfg(feature = "box")]
pub mod uplink;
#[cfg(feature = "box")]
pub mod workflow;

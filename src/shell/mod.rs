//! The box's IO shells: the store, the writer that drives the queue's core
//! through it, the device link's QUIC server, the admin socket, the
//! uplinks, the HTTP dashboard, the monitor, and the runners of workflows
//! and rollouts. Each holds the sockets, files, threads and clocks around
//! an engine part (`engine`) and keeps no rule of its own that the
//! simulation would then miss.

pub mod admin;
pub mod artifact;
pub mod backup;
pub mod config;
pub mod enroll;
pub mod http;
pub mod jobs;
pub mod link;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod queue;
pub mod rollout;
pub mod serve;
pub mod store;
pub mod upstream;
pub mod workflow;

//! Trust: who may command. Operator keys sign command envelopes; a trust
//! set on each box (and in each device's bundle) says whose signatures count
//! and for which targets; roles bound what socket and HTTP callers may do.
//! Everything here is sans IO: keys and envelopes are bytes in, verdicts out.

pub mod role;

pub use role::{Denied, Grant, Pattern, Role, Verb};

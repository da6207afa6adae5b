//! Trust: who may command. Operator keys sign command envelopes; a trust
//! set on each box (and in each device's bundle) says whose signatures count
//! and for which targets; roles bound what socket and HTTP callers may do.
//! Everything here is sans IO: keys and envelopes are bytes in, verdicts out.

pub mod role;

pub use role::{Denied, Grant, Pattern, Role, Verb};
pub mod anchors;
pub mod envelope;
pub mod gate;
pub mod key;
pub mod set;

pub use anchors::{AnchorError, DeviceTrust};
pub use envelope::{Claims, Opened};
pub use gate::{Gate, Intake};
pub use key::{KeyId, OperatorKey, OperatorPublic};
pub use set::{EditError, Presented, Refusal, Seat, TrustEdit, TrustSet, TrustedKey, Verified};

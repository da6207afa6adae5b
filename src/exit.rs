//! The process exit codes (DESIGN §8), in one place: the CLI returns them,
//! scripts and systemd read them.

use crate::engine::queue::ErrorClass;

/// Success.
pub const OK: i32 = 0;
/// An error that fits no other code.
pub const ERROR: i32 = 1;
/// A usage error: a bad flag, a bad value, a file that does not parse.
pub const USAGE: i32 = 2;
/// No such command, device or run.
pub const NOT_FOUND: i32 = 3;
/// `--wait` ran out before the command ended.
pub const TIMED_OUT: i32 = 4;
/// Refused by policy: queue full, unauthorised, revoked, a reused key.
pub const REFUSED: i32 = 5;
/// The command (or workflow) ended without success; `audit --verify` found
/// the chain broken.
pub const UNSUCCESSFUL: i32 = 6;
/// EX_TEMPFAIL: the box stopped on a store failure, for systemd's
/// `Restart=on-failure` to bring it back on a reopened database; also the
/// code of a command an edge could not take yet.
pub const TEMPFAIL: i32 = crate::engine::uplink::TEMPFAIL;

/// The exit code of a failure of this class.
pub fn of_class(c: ErrorClass) -> i32 {
    match c {
        ErrorClass::NotFound => NOT_FOUND,
        ErrorClass::Refused => REFUSED,
        ErrorClass::BadRequest | ErrorClass::Unavailable => ERROR,
    }
}

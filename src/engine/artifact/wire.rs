//! The fetch protocol (since 1.3): how a device gets an artifact's
//! manifest and chunks, on QUIC streams of their own beside the control
//! stream, so a file never holds up a command.
//!
//! The device opens a bidirectional stream and sends `FetchRequest`s;
//! the box answers each in order with `FetchReply`s, framed as the control
//! stream is (`u32` BE length + postcard). A `Chunks` request is answered
//! by one `Chunk` per index asked, in the order asked, so a device may
//! keep a few requests in flight on one stream. The box serves only
//! artifacts named by a command it delivered to this device on this
//! connection; anything else is `Refused{Forbidden}`.

use super::manifest::Digest;
use crate::proto::{ErrorCode, Frame};
use serde::{Deserialize, Serialize};

/// Most chunk indices one `Chunks` request may ask for.
pub const MAX_ASK: usize = 64;

/// Device → box on a fetch stream.
///
/// Append new variants only at the end (their tag is their position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchRequest {
    /// The manifest's bytes, exactly as the box holds them (their SHA-256
    /// is `artifact`).
    Manifest { artifact: Digest },
    /// Chunks of `artifact` by their index in its manifest (at most
    /// `MAX_ASK`).
    Chunks { artifact: Digest, chunks: Vec<u32> },
}

impl Frame for FetchRequest {
    const KNOWN_TAGS: u32 = 2;
}

/// Box → device on a fetch stream.
///
/// Append new variants only at the end (their tag is their position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchReply {
    Manifest {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Chunk {
        index: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The request could not be served; the stream stays usable unless
    /// the code is fatal.
    Refused { code: ErrorCode, message: String },
}

impl Frame for FetchReply {
    const KNOWN_TAGS: u32 = 3;
}

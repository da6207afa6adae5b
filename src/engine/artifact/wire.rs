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
use crate::engine::frames::{ErrorCode, Frame};
use serde::{Deserialize, Serialize};

/// Most chunk indices one `Chunks` request may ask for.
pub const MAX_ASK: usize = 64;

/// Largest body of a `Manifest` reply: a manifest at its largest and its
/// framing. A manifest outgrows a chunk for a file of more than about
/// 470 MiB (some 7,000 chunks), so the two limits are apart.
pub const MAX_MANIFEST_REPLY: usize = super::manifest::MAX_MANIFEST + 1024;

/// Largest body of any other reply on a fetch stream: a chunk at its
/// largest and its framing.
pub const MAX_CHUNK_REPLY: usize = super::manifest::MAX_CHUNK as usize + 1024;

/// Device → box on a fetch stream.
///
/// Append new variants only at the end (their tag is their position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchRequest {
    /// The manifest's bytes, exactly as the box holds them (their SHA-256
    /// is `artifact`).
    Manifest {
        /// The artifact digest, as the command's envelope names it.
        artifact: Digest,
    },
    /// Chunks of `artifact` by their index in its manifest (at most
    /// `MAX_ASK`).
    Chunks {
        /// The artifact digest, as the command's envelope names it.
        artifact: Digest,
        /// Indices into the manifest's `chunks`, answered in this order;
        /// the device leaves out those it already has cached.
        chunks: Vec<u32>,
    },
}

impl Frame for FetchRequest {
    const KNOWN_TAGS: u32 = 2;
}

/// Box → device on a fetch stream.
///
/// Append new variants only at the end (their tag is their position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchReply {
    /// Answer to `FetchRequest::Manifest`.
    Manifest {
        /// The manifest exactly as the box stores it: the device checks
        /// that their SHA-256 is the artifact digest before decoding them.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// One chunk asked for in a `FetchRequest::Chunks`.
    Chunk {
        /// Its index in the manifest, as asked.
        index: u32,
        /// Its content (at most `MAX_CHUNK` bytes); the device checks the
        /// SHA-256 and length against the manifest's `ChunkRef` and asks
        /// again for one that does not match.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The request could not be served; the stream stays usable unless
    /// the code is fatal.
    Refused {
        /// `Forbidden` (not named by a command delivered on this
        /// connection), `NotFound` (no such artifact, or chunk index),
        /// `Internal` (a chunk damaged on the box) or `ProtocolViolation`
        /// (over `MAX_ASK` indices). A refused index takes its `Chunk`'s
        /// place; a refused request gets this one reply.
        code: ErrorCode,
        /// For people: the details.
        message: String,
    },
}

impl Frame for FetchReply {
    const KNOWN_TAGS: u32 = 3;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::artifact::manifest::{MAX_CHUNK, MAX_MANIFEST};

    #[test]
    fn a_manifest_at_its_largest_fits_its_reply_and_a_chunk_fits_its_own() {
        let body = |r: &FetchReply| crate::engine::frames::encode(r).len() - 4;
        let manifest = FetchReply::Manifest {
            bytes: vec![7; MAX_MANIFEST],
        };
        assert!(body(&manifest) <= MAX_MANIFEST_REPLY);
        // The bug this guards: manifests were held to the chunk limit, so
        // a file of a few hundred MiB could be added but never fetched.
        assert!(body(&manifest) > MAX_CHUNK_REPLY);
        let chunk = FetchReply::Chunk {
            index: u32::MAX,
            bytes: vec![7; MAX_CHUNK as usize],
        };
        assert!(body(&chunk) <= MAX_CHUNK_REPLY);
    }
}

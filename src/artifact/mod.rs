//! Artifacts (issue 24, DESIGN §11): files a command carries — firmware,
//! config bundles, models — stored once, moved in content-defined chunks,
//! verified chunk by chunk and whole.
//!
//! `manifest`, `chunker`, `budget`, `retention` and `pace` are engine (no IO: they take bytes or a
//! `Read`); `wire` is the fetch protocol's frames; `chunks` (one file per
//! chunk) and `shelf` (manifests and names in sled) are the box's store.
//! A command names its artifact in its envelope (`trust::envelope`:
//! the signed claims, or an unsigned envelope), so no record format
//! changed for it.

#[cfg(feature = "box")]
pub mod budget;
#[cfg(feature = "box")]
pub mod chunker;
#[cfg(feature = "box")]
pub mod chunks;
#[cfg(feature = "box")]
pub mod collect;
pub mod manifest;
#[cfg(feature = "box")]
pub mod pace;
#[cfg(feature = "box")]
pub mod retention;
#[cfg(feature = "box")]
pub mod shelf;
#[cfg(feature = "box")]
pub mod stage;
pub mod wire;

pub use manifest::{ArtifactSpec, ChunkRef, Digest, Manifest, ManifestError};

//! Artifacts (issue 24, DESIGN §11): files a command carries — firmware,
//! config bundles, models — stored once, moved in content-defined chunks,
//! verified chunk by chunk and whole.
//!
//! `manifest`, `chunker`, `budget`, `retention` and `pace` take bytes or a
//! `Read`, never a file; `wire` is the fetch protocol's frames. The box's
//! store of them is a shell (`shell::artifact`: `chunks`, one file per
//! chunk, and `shelf`, manifests and names in sled).
//! A command names its artifact in its envelope (`trust::envelope`:
//! the signed claims, or an unsigned envelope), so no record format
//! changed for it.

#[cfg(feature = "box")]
pub mod budget;
#[cfg(feature = "box")]
pub mod chunker;
pub mod manifest;
#[cfg(feature = "box")]
pub mod pace;
#[cfg(feature = "box")]
pub mod retention;
pub mod wire;

pub use manifest::{ArtifactSpec, ChunkRef, Digest, Manifest, ManifestError};

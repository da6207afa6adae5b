//! The box's store of artifacts: chunks one file each (`chunks`), manifests
//! and names in sled (`shelf`), what a fetch pulls from a hub (`stage`)
//! and what retention removes (`collect`). The formats and rules are the
//! engine's (`engine::artifact`).

pub mod chunks;
pub mod collect;
pub mod shelf;
pub mod stage;

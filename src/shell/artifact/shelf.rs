//! The box's artifacts: manifests and their names in the sled tree
//! `artifacts`, chunks in the chunk store beside sled (DESIGN §11).
//!
//! Tree `artifacts`:
//! - `m` + digest (32 bytes) → a stored [`Record`] (the manifest's bytes
//!   as first encoded, and when it was added);
//! - `n` + name + `\0` + version → digest: how `fw@2.1` is found;
//! - `r` + digest + command id (16 bytes BE) → when it was noted (ms, 8
//!   bytes BE; empty in stores written before retention): a command that
//!   names the artifact. Written before the command is queued, so it is
//!   durable no later than the command (the writer's flush covers it);
//!   removal asks the queue whether each is still live and sweeps the
//!   rest;
//! - `u` + digest → ms: when a retention pass first found no live command
//!   naming it (`retention`).
//!
//! A sender checks, notes and queues under the read side of `intake`; a
//! removal marks the artifact retiring under its write side, so no
//! command can come to name an artifact while its referrers are checked.
//!
//! "Added" means durable: every chunk fsynced (`ChunkStore::sync`) before
//! the manifest is inserted, and sled flushed after, so a manifest never
//! names a chunk a crash could lose.

use super::chunks::{ChunkError, ChunkStore};
use crate::engine::artifact::manifest::{ArtifactSpec, Digest, Manifest, ManifestError};
use crate::engine::command::Millis;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Name of the sled tree.
pub const TREE: &str = "artifacts";

/// A manifest as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The manifest's bytes as the sender first encoded them: their
    /// SHA-256 is the artifact's digest, so they are never re-encoded.
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// When it was committed, ms since the Unix epoch; `name` alone
    /// resolves to the version added last.
    pub added_at: Millis,
}

/// What `list` and `show` print of one artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactView {
    /// The artifact's id: the SHA-256 of its manifest's stored bytes.
    pub digest: Digest,
    /// What the file is (`fw`), from the manifest.
    pub name: String,
    /// Which one (`2.1`), from the manifest.
    pub version: String,
    /// The whole file's length in bytes.
    pub size: u64,
    /// SHA-256 of the whole file (not of the manifest: that is `digest`).
    pub sha256: Digest,
    /// How many chunks the manifest lists, repeats included.
    pub chunks: u32,
    /// When it was committed here, ms since the Unix epoch.
    pub added_at: Millis,
}

/// Why an artifact operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ShelfError {
    /// Nothing here answers to the spec: a digest, `name@version` or
    /// `name`, as it was asked for.
    #[error("no artifact {0} on this box; `outpost artifact list` shows what it holds, `outpost artifact add FILE` adds one")]
    NotFound(String),
    /// `commit` of a manifest naming a chunk the chunk store lacks.
    #[error("the manifest names chunk {index} ({digest:?}), which this box does not hold; send the chunk before committing the manifest")]
    MissingChunk {
        /// The chunk's position in the manifest's list, from 0.
        index: usize,
        /// The chunk's SHA-256.
        digest: Digest,
    },
    /// The manifest bytes did not decode, or broke a manifest rule.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The chunk store failed (IO, a mismatch, its budget).
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The sled tree failed, as sled's message.
    #[error("artifact store: {0}")]
    Store(String),
    /// The shelf was closed (`close`) at shutdown.
    #[error("the box is shutting down; retry once it is back")]
    Closed,
    /// A stored record that does not decode: the data dir is damaged.
    #[error("{name} is stored damaged: {why}; add the file again with `outpost artifact add`")]
    Damaged {
        /// The artifact, as a digest or `name@version`.
        name: String,
        /// What is wrong with its record.
        why: String,
    },
}

fn store_err(e: sled::Error) -> ShelfError {
    ShelfError::Store(e.to_string())
}

/// Manifests and chunks. Cheap to clone; clones share one tree, which
/// `close` lets go of, so the database closes with the writer (a handle
/// kept by a caller must not hold the data dir's lock past shutdown).
#[derive(Clone)]
pub struct Shelf {
    slot: Arc<std::sync::RwLock<Option<sled::Tree>>>,
    chunks: Arc<ChunkStore>,
    /// Held by `commit`, `remove` and `sweep`, which each decide from
    /// what the manifests name: a chunk one removes must not be one
    /// another has just counted on.
    edit: Arc<std::sync::Mutex<()>>,
    /// Artifacts being removed (see the module doc).
    retiring: Arc<std::sync::RwLock<std::collections::HashSet<Digest>>>,
}

/// Held by a sender from "the artifact is here" until its command is
/// queued with the writer.
pub type Intake<'a> = std::sync::RwLockReadGuard<'a, std::collections::HashSet<Digest>>;

fn manifest_key(d: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'm');
    k.extend_from_slice(&d.0);
    k
}

fn name_key(name: &str, version: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + name.len() + version.len());
    k.push(b'n');
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(version.as_bytes());
    k
}

fn unneeded_key(d: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'u');
    k.extend_from_slice(&d.0);
    k
}

fn millis_of(v: &[u8]) -> Option<Millis> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

fn ref_key(d: &Digest, id: crate::engine::command::CommandId) -> Vec<u8> {
    let mut k = Vec::with_capacity(49);
    k.push(b'r');
    k.extend_from_slice(&d.0);
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

impl Shelf {
    /// The shelf over sled tree `artifacts` (`TREE`) and the chunk store
    /// beside it.
    pub fn new(tree: sled::Tree, chunks: Arc<ChunkStore>) -> Shelf {
        Shelf {
            slot: Arc::new(std::sync::RwLock::new(Some(tree))),
            chunks,
            edit: Arc::default(),
            retiring: Arc::default(),
        }
    }

    /// Hold off commits, removals and sweeps (a backup copying the chunk
    /// files the manifests it took name). Never taken on the writer
    /// thread, which none of them waits for, so a backup waiting for the
    /// writer while holding it cannot deadlock.
    pub fn hold_edits(&self) -> std::sync::MutexGuard<'_, ()> {
        self.edit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Let go of the tree: every later call is `Closed`.
    pub fn close(&self) {
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn tree(&self) -> Result<sled::Tree, ShelfError> {
        self.slot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(ShelfError::Closed)
    }

    /// The chunk store the manifests name chunks in.
    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// The chunk store, shared: for what outlives a borrow of the shelf
    /// (the writer, which tells it the queue's size for `--max-disk`).
    pub fn chunks_arc(&self) -> Arc<ChunkStore> {
        self.chunks.clone()
    }

    /// The manifest bytes of `d`, exactly as stored (their SHA-256 is `d`).
    pub fn manifest_bytes(&self, d: &Digest) -> Result<Option<Vec<u8>>, ShelfError> {
        Ok(self.record(d)?.map(|r| r.manifest))
    }

    fn record(&self, d: &Digest) -> Result<Option<Record>, ShelfError> {
        let Some(v) = self.tree()?.get(manifest_key(d)).map_err(store_err)? else {
            return Ok(None);
        };
        let r: Record = postcard::from_bytes(&v).map_err(|e| ShelfError::Damaged {
            name: d.to_string(),
            why: format!("its record does not decode ({e})"),
        })?;
        Ok(Some(r))
    }

    /// The manifest of `d`, decoded.
    pub fn manifest(&self, d: &Digest) -> Result<Option<Manifest>, ShelfError> {
        match self.record(d)? {
            Some(r) => Ok(Some(Manifest::decode(&r.manifest)?)),
            None => Ok(None),
        }
    }

    /// Commit manifest `bytes` (as encoded by the sender, never again):
    /// every chunk it names must be durable here. Returns its digest;
    /// adding the same manifest twice is the same artifact.
    pub fn commit(&self, bytes: Vec<u8>, now: Millis) -> Result<Digest, ShelfError> {
        let m = Manifest::decode(&bytes)?;
        let _edit = self.edit.lock().unwrap_or_else(|e| e.into_inner());
        for (index, c) in m.chunks.iter().enumerate() {
            if !self.chunks.has(&c.sha256) {
                return Err(ShelfError::MissingChunk {
                    index,
                    digest: c.sha256,
                });
            }
        }
        self.chunks.sync()?;
        let d = Digest::of(&bytes);
        let rec = Record {
            manifest: bytes,
            added_at: now,
        };
        let mut b = sled::Batch::default();
        b.insert(
            manifest_key(&d),
            postcard::to_allocvec(&rec).expect("a record encodes"),
        );
        b.insert(name_key(&m.name, &m.version), &d.0[..]);
        self.tree()?.apply_batch(b).map_err(store_err)?;
        self.tree()?.flush().map_err(store_err)?;
        Ok(d)
    }

    /// The digest `spec` names: a digest held here, `name@version`, or
    /// `name` alone for its most recently added version.
    pub fn resolve(&self, spec: &ArtifactSpec) -> Result<Digest, ShelfError> {
        match spec {
            ArtifactSpec::Digest(d) => match self.record(d)? {
                Some(_) => Ok(*d),
                None => Err(ShelfError::NotFound(d.to_string())),
            },
            ArtifactSpec::Name {
                name,
                version: Some(v),
            } => match self.tree()?.get(name_key(name, v)).map_err(store_err)? {
                Some(d) => Ok(Digest(d.as_ref().try_into().map_err(|_| {
                    ShelfError::Damaged {
                        name: format!("{name}@{v}"),
                        why: "its name record is not a digest".into(),
                    }
                })?)),
                None => Err(ShelfError::NotFound(format!("{name}@{v}"))),
            },
            ArtifactSpec::Name {
                name,
                version: None,
            } => self
                .list()?
                .into_iter()
                .filter(|a| &a.name == name)
                .max_by_key(|a| a.added_at)
                .map(|a| a.digest)
                .ok_or_else(|| ShelfError::NotFound(name.clone())),
        }
    }

    /// The read side of the intake lock; `retiring(d)` on it says whether
    /// `d` is being removed.
    pub fn intake(&self) -> Intake<'_> {
        self.retiring.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark `d` retiring and return its referrers, atomically with respect
    /// to senders; `false` in the pair if another removal has it already.
    pub fn retire(
        &self,
        d: &Digest,
    ) -> Result<(bool, Vec<(crate::engine::command::CommandId, Millis)>), ShelfError> {
        let mut r = self.retiring.write().unwrap_or_else(|e| e.into_inner());
        if !r.insert(*d) {
            return Ok((false, Vec::new()));
        }
        match self.referrers(d) {
            Ok(refs) => Ok((true, refs)),
            Err(e) => {
                r.remove(d);
                Err(e)
            }
        }
    }

    /// End a `retire` (the artifact was removed, or is still needed).
    pub fn unretire(&self, d: &Digest) {
        self.retiring
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(d);
    }

    /// Note that command `id` names artifact `d` at `now` (see the module
    /// doc).
    pub fn reference(
        &self,
        d: &Digest,
        id: crate::engine::command::CommandId,
        now: Millis,
    ) -> Result<(), ShelfError> {
        self.tree()?
            .insert(ref_key(d, id), &now.to_be_bytes()[..])
            .map_err(store_err)?;
        Ok(())
    }

    /// The commands noted as naming `d`, live or not, with when.
    pub fn referrers(
        &self,
        d: &Digest,
    ) -> Result<Vec<(crate::engine::command::CommandId, Millis)>, ShelfError> {
        let mut prefix = vec![b'r'];
        prefix.extend_from_slice(&d.0);
        let mut out = Vec::new();
        for kv in self.tree()?.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(store_err)?;
            if let Ok(b) = <[u8; 16]>::try_from(&k[33..]) {
                out.push((
                    crate::engine::command::CommandId(u128::from_be_bytes(b)),
                    millis_of(&v).unwrap_or(0),
                ));
            }
        }
        Ok(out)
    }

    /// When a retention pass first found `d` unneeded, if it has.
    pub fn unneeded_since(&self, d: &Digest) -> Result<Option<Millis>, ShelfError> {
        Ok(self
            .tree()?
            .get(unneeded_key(d))
            .map_err(store_err)?
            .and_then(|v| millis_of(&v)))
    }

    /// Set (`Some`) or clear the "unneeded since" mark of `d`. Written
    /// only when it changes, so an idle box writes nothing.
    pub fn mark_unneeded(&self, d: &Digest, since: Option<Millis>) -> Result<(), ShelfError> {
        let t = self.tree()?;
        match since {
            Some(at) => t.insert(unneeded_key(d), &at.to_be_bytes()[..]),
            None => t.remove(unneeded_key(d)),
        }
        .map_err(store_err)?;
        Ok(())
    }

    /// Forget that `id` names `d` (it ended).
    pub fn unreference(
        &self,
        d: &Digest,
        id: crate::engine::command::CommandId,
    ) -> Result<(), ShelfError> {
        self.tree()?.remove(ref_key(d, id)).map_err(store_err)?;
        Ok(())
    }

    /// Every artifact, oldest first.
    pub fn list(&self) -> Result<Vec<ArtifactView>, ShelfError> {
        let mut out = Vec::new();
        for kv in self.tree()?.scan_prefix(b"m") {
            let (k, _) = kv.map_err(store_err)?;
            let d = Digest(k[1..].try_into().map_err(|_| ShelfError::Damaged {
                name: "an artifact".into(),
                why: "a manifest key of the wrong length".into(),
            })?);
            if let Some(v) = self.view(&d)? {
                out.push(v);
            }
        }
        out.sort_by_key(|v| (v.added_at, v.digest));
        Ok(out)
    }

    /// One artifact as `show` prints it.
    pub fn view(&self, d: &Digest) -> Result<Option<ArtifactView>, ShelfError> {
        let Some(r) = self.record(d)? else {
            return Ok(None);
        };
        let m = Manifest::decode(&r.manifest)?;
        Ok(Some(ArtifactView {
            digest: *d,
            name: m.name,
            version: m.version,
            size: m.size,
            sha256: m.sha256,
            chunks: m.chunks.len() as u32,
            added_at: r.added_at,
        }))
    }

    /// Every chunk some manifest names.
    fn named_chunks(&self) -> Result<std::collections::HashSet<Digest>, ShelfError> {
        let mut named = std::collections::HashSet::new();
        for kv in self.tree()?.scan_prefix(b"m") {
            let (k, _) = kv.map_err(store_err)?;
            let Ok(d) = <[u8; 32]>::try_from(&k[1..]) else {
                continue;
            };
            if let Some(m) = self.manifest(&Digest(d))? {
                named.extend(m.chunks.iter().map(|c| c.sha256));
            }
        }
        Ok(named)
    }

    /// Remove the chunks no manifest names that were last written before
    /// `before`: what an `add` cut short or a crash inside `remove` left.
    /// Younger ones are kept, so an `add` run again sends only what had
    /// not arrived. Returns the chunks and bytes freed.
    pub fn sweep(&self, before: std::time::SystemTime) -> Result<(u64, u64), ShelfError> {
        let _edit = self.edit.lock().unwrap_or_else(|e| e.into_inner());
        let named = self.named_chunks()?;
        let (mut n, mut freed) = (0, 0);
        for (c, at) in self.chunks.list()? {
            if at < before && !named.contains(&c) {
                freed += self.chunks.remove(&c)?;
                n += 1;
            }
        }
        Ok((n, freed))
    }

    /// Remove artifact `d` and the chunks no other artifact shares. The
    /// caller checked that no live command references it. Returns the
    /// bytes freed.
    pub fn remove(&self, d: &Digest) -> Result<u64, ShelfError> {
        let _edit = self.edit.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = self.manifest(d)? else {
            return Err(ShelfError::NotFound(d.to_string()));
        };
        let mut b = sled::Batch::default();
        b.remove(manifest_key(d));
        b.remove(unneeded_key(d));
        // The name points here only if this is still the digest it names.
        if self
            .tree()?
            .get(name_key(&m.name, &m.version))
            .map_err(store_err)?
            .is_some_and(|v| v.as_ref() == d.0)
        {
            b.remove(name_key(&m.name, &m.version));
        }
        self.tree()?.apply_batch(b).map_err(store_err)?;
        self.tree()?.flush().map_err(store_err)?;
        // Chunks after the manifest: a crash between leaves chunks no
        // manifest names (which `sweep` removes), never a manifest without
        // them.
        let mut shared = self.named_chunks()?;
        let mut freed = 0;
        for c in &m.chunks {
            if shared.insert(c.sha256) {
                freed += self.chunks.remove(&c.sha256)?;
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::artifact::chunker::chunk_all;

    fn shelf(dir: &std::path::Path) -> Shelf {
        let db = sled::Config::new().path(dir.join("db")).open().unwrap();
        Shelf::new(
            db.open_tree(TREE).unwrap(),
            Arc::new(ChunkStore::open(dir).unwrap()),
        )
    }

    fn add(s: &Shelf, file: &[u8], name: &str, version: &str, now: Millis) -> Digest {
        let m = chunk_all(file, name, version, |c, b| {
            s.chunks()
                .put(&c.sha256, b)
                .map(|_| ())
                .map_err(std::io::Error::other)
        })
        .unwrap();
        s.commit(m.encode(), now).unwrap()
    }

    #[test]
    fn artifacts_are_found_by_digest_name_and_version_and_removed_with_their_own_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = shelf(dir.path());
        let v1: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut v2 = v1.clone();
        v2[300_000] ^= 1;
        let d1 = add(&s, &v1, "fw", "1", 10);
        let d2 = add(&s, &v2, "fw", "2", 20);
        assert_ne!(d1, d2);
        assert_eq!(
            s.resolve(&ArtifactSpec::parse("fw@1").unwrap()).unwrap(),
            d1
        );
        assert_eq!(s.resolve(&ArtifactSpec::parse("fw").unwrap()).unwrap(), d2);
        assert_eq!(s.resolve(&ArtifactSpec::Digest(d2)).unwrap(), d2);
        assert!(matches!(
            s.resolve(&ArtifactSpec::parse("fw@3").unwrap()),
            Err(ShelfError::NotFound(_))
        ));
        assert_eq!(Digest::of(&s.manifest_bytes(&d1).unwrap().unwrap()), d1);
        let held = s.chunks().bytes();
        assert!(held < 2 * v1.len() as u64, "versions share chunks: {held}");
        let freed = s.remove(&d2).unwrap();
        assert!(freed > 0 && freed < v1.len() as u64 / 2, "{freed}");
        assert_eq!(s.list().unwrap().len(), 1);
        assert_eq!(s.resolve(&ArtifactSpec::parse("fw").unwrap()).unwrap(), d1);
    }

    #[test]
    fn a_manifest_naming_a_chunk_not_held_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = shelf(dir.path());
        let m = chunk_all(&[1u8; 100_000][..], "fw", "1", |_, _| Ok(())).unwrap();
        let e = s.commit(m.encode(), 1).unwrap_err();
        assert!(
            matches!(e, ShelfError::MissingChunk { index: 0, .. }),
            "{e}"
        );
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn the_sweep_takes_old_chunks_no_manifest_names_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let s = shelf(dir.path());
        let kept = add(&s, &[7u8; 50_000], "kept", "1", 1);
        // An add cut short: its chunk is stored, its manifest never came.
        let loose = b"half an add".to_vec();
        s.chunks().put(&Digest::of(&loose), &loose).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        // Younger than the cut-off: kept, so the add can resume.
        assert_eq!(s.sweep(std::time::UNIX_EPOCH).unwrap(), (0, 0));
        assert_eq!(s.sweep(later).unwrap(), (1, loose.len() as u64));
        assert!(!s.chunks().has(&Digest::of(&loose)));
        let m = s.manifest(&kept).unwrap().unwrap();
        assert!(m.chunks.iter().all(|c| s.chunks().has(&c.sha256)));
    }
}

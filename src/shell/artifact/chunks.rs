//! The chunk store: one file per chunk, named by its SHA-256, under
//! `<data-dir>/chunks/ab/abcd…` (256 fan-out folders keep directories
//! small on an SD card's filesystem).
//!
//! A chunk counts only once it is durable: written to a temporary file,
//! fsynced, renamed into place, and its folder fsynced (`sync`, once per
//! batch of chunks, before the manifest that needs them is committed).
//! A crash leaves at worst `*.tmp` files, which `open` removes. Chunks are
//! content-addressed, so writing one twice is harmless and a reader checks
//! what it read against the name.

use crate::engine::artifact::budget::{Budget, OverBudget};
use crate::engine::artifact::manifest::Digest;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Folder name inside the data dir.
pub const DIR: &str = "chunks";

/// Chunks remembered as checked: ~4,096 × 64 KiB, the hot set of a site's
/// rollout, in ~400 KiB.
const CHECKED: usize = 4096;

type Stamp = (u64, Option<std::time::SystemTime>, (u64, i64, i64));

/// Why a chunk could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// Bytes that do not hash to the chunk's name: refused by `put`, or
    /// read back damaged by `get`.
    #[error("chunk {expected:?} does not match its bytes (they hash to {actual:?})")]
    Mismatch {
        /// The digest the chunk was stored or asked for under.
        expected: Digest,
        /// What its bytes hash to.
        actual: Digest,
    },
    /// No file for the chunk.
    #[error("chunk {0:?} is not in the chunk store")]
    Missing(Digest),
    /// A new chunk would take the store past its budget (`--max-disk`,
    /// shared with the queue's database).
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    /// The filesystem failed.
    #[error("chunk store {path}: {source}")]
    Io {
        /// The file or folder it failed on.
        path: PathBuf,
        /// The OS's error.
        #[source]
        source: io::Error,
    },
}

impl ChunkError {
    /// Whether the disk is full (ENOSPC / EDQUOT).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, ChunkError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

/// The store. Cheap to share (`Arc`); all methods take `&self`.
pub struct ChunkStore {
    root: PathBuf,
    bytes: AtomicU64,
    budget: Budget,
    /// The queue's database size, as its writer last measured it (it
    /// shares `--max-disk` with the chunks).
    queue_bytes: AtomicU64,
    /// Fan-out folders written since the last `sync`.
    dirty: Mutex<HashSet<u8>>,
    /// Chunks whose bytes were hashed, with the file's stamp then
    /// (length, modified, inode and change time): see `get`.
    checked: Mutex<lru::LruCache<Digest, Stamp>>,
}

impl ChunkStore {
    /// Open (or create) the store under `data_dir`, removing what a crash
    /// left half-written and counting the bytes held.
    pub fn open(data_dir: &Path) -> Result<ChunkStore, ChunkError> {
        let root = data_dir.join(DIR);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChunkError::Io { path, source }
        };
        fs::create_dir_all(&root).map_err(io(&root))?;
        let mut bytes = 0;
        for fan in fs::read_dir(&root).map_err(io(&root))? {
            let fan = fan.map_err(io(&root))?.path();
            if !fan.is_dir() {
                continue;
            }
            for f in fs::read_dir(&fan).map_err(io(&fan))? {
                let f = f.map_err(io(&fan))?;
                let p = f.path();
                if p.extension().is_some_and(|e| e == "tmp") {
                    let _ = fs::remove_file(&p);
                    continue;
                }
                bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok(ChunkStore {
            root,
            bytes: AtomicU64::new(bytes),
            budget: Budget::default(),
            queue_bytes: AtomicU64::new(0),
            dirty: Mutex::new(HashSet::new()),
            checked: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(CHECKED).expect("non-zero"),
            )),
        })
    }

    /// Bound the store by `budget` (checked at each new chunk).
    pub fn with_budget(mut self, budget: Budget) -> ChunkStore {
        self.budget = budget;
        self
    }

    /// The queue's database size, for the `--max-disk` check.
    pub fn set_queue_bytes(&self, n: u64) {
        self.queue_bytes.store(n, Ordering::Relaxed);
    }

    /// May `need` more bytes of chunks be stored? Asked for a whole file
    /// before its first chunk is sent, so a refused add leaves nothing.
    pub fn admit(&self, need: u64) -> Result<(), OverBudget> {
        self.budget
            .admit(self.bytes(), self.queue_bytes.load(Ordering::Relaxed), need)
    }

    /// Where chunk `d` lives.
    pub fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Bytes of all chunks held.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether chunk `d` has a file here (durable or not yet synced; its
    /// bytes are not checked).
    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).exists()
    }

    /// Store `bytes` as chunk `d` (checked against it). `Ok(false)`: it was
    /// there already. Durable only after the next `sync`.
    pub fn put(&self, d: &Digest, bytes: &[u8]) -> Result<bool, ChunkError> {
        let actual = Digest::of(bytes);
        if actual != *d {
            return Err(ChunkError::Mismatch {
                expected: *d,
                actual,
            });
        }
        let path = self.path(d);
        if path.exists() {
            // Touched, so the orphan sweep (`Shelf::sweep`) does not take a
            // chunk an add in progress counts on.
            let _ = File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(false);
        }
        // Checked chunk by chunk, so two adds at once may pass a budget by
        // a chunk each: a bound on the disk, not an exact quota.
        self.admit(bytes.len() as u64)?;
        let io = |source| ChunkError::Io {
            path: path.clone(),
            source,
        };
        let dir = path.parent().expect("a chunk path has a folder");
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("tmp");
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_data()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.dirty.lock().expect("chunk store lock").insert(d.0[0]);
        Ok(true)
    }

    /// Make every `put` so far durable: fsync the folders their names
    /// were written into (and the root, for new fan-out folders).
    pub fn sync(&self) -> Result<(), ChunkError> {
        let dirty: Vec<u8> = self
            .dirty
            .lock()
            .expect("chunk store lock")
            .drain()
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        let sync_dir = |p: &Path| {
            File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(|source| ChunkError::Io {
                    path: p.to_path_buf(),
                    source,
                })
        };
        for fan in dirty {
            sync_dir(&self.root.join(format!("{fan:02x}")))?;
        }
        sync_dir(&self.root)
    }

    /// Chunk `d`'s bytes, checked against its name: a chunk damaged on
    /// disk is `Mismatch`, never served. A chunk is hashed on its first
    /// read after the store opens, and again whenever its file's length or
    /// times changed; reads in between (the same firmware for every device
    /// of a site) trust that check, and each device checks every chunk
    /// itself. Hashing on every read was a fifth of the box's CPU per GiB
    /// served.
    pub fn get(&self, d: &Digest) -> Result<Vec<u8>, ChunkError> {
        let path = self.path(d);
        let io = |source| ChunkError::Io {
            path: path.clone(),
            source,
        };
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ChunkError::Missing(*d)),
            Err(source) => return Err(io(source)),
        };
        let meta = f.metadata().map_err(io)?;
        let stamp = (meta.len(), meta.modified().ok(), {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), meta.ctime(), meta.ctime_nsec())
        });
        let mut buf = Vec::with_capacity(meta.len() as usize);
        f.read_to_end(&mut buf).map_err(io)?;
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if checked.get(d) == Some(&stamp) {
            return Ok(buf);
        }
        drop(checked);
        let actual = Digest::of(&buf);
        if actual != *d {
            return Err(ChunkError::Mismatch {
                expected: *d,
                actual,
            });
        }
        checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        checked.put(*d, stamp);
        Ok(buf)
    }

    /// Every chunk held, with when its file was last written.
    pub fn list(&self) -> Result<Vec<(Digest, std::time::SystemTime)>, ChunkError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChunkError::Io { path, source }
        };
        let mut out = Vec::new();
        for fan in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let fan = fan.map_err(io(&self.root))?.path();
            if !fan.is_dir() {
                continue;
            }
            for f in fs::read_dir(&fan).map_err(io(&fan))? {
                let f = f.map_err(io(&fan))?;
                let Some(d) = f.file_name().to_str().and_then(Digest::parse) else {
                    continue; // a *.tmp being written, or not ours
                };
                let at = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .map_err(io(&f.path()))?;
                out.push((d, at));
            }
        }
        Ok(out)
    }

    /// Remove chunk `d` (no error if it is not there): its bytes freed.
    pub fn remove(&self, d: &Digest) -> Result<u64, ChunkError> {
        let path = self.path(d);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(ChunkError::Io { path, source }),
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(ChunkError::Io { path, source }),
        }
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_stored_once_checked_on_the_way_in_and_out_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        assert!(s.put(&d, b"hello").unwrap());
        assert!(!s.put(&d, b"hello").unwrap());
        s.sync().unwrap();
        assert_eq!(s.get(&d).unwrap(), b"hello");
        assert_eq!(s.bytes(), 5);
        let e = s.put(&Digest::of(b"x"), b"y").unwrap_err();
        assert!(matches!(e, ChunkError::Mismatch { .. }), "{e}");
        // Damage on disk is found on read, never served: by a store that
        // had read it (the file's stamp changed), and by a new one.
        fs::write(s.path(&d), b"hellO").unwrap();
        std::fs::File::options()
            .append(true)
            .open(s.path(&d))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH)
            .unwrap();
        assert!(matches!(s.get(&d), Err(ChunkError::Mismatch { .. })));
        let fresh = ChunkStore::open(dir.path()).unwrap();
        assert!(matches!(fresh.get(&d), Err(ChunkError::Mismatch { .. })));
        // A reopen counts what is there and sweeps half-written files.
        fs::write(s.path(&d).with_extension("tmp"), b"half").unwrap();
        let s = ChunkStore::open(dir.path()).unwrap();
        assert_eq!(s.bytes(), 5);
        assert!(!s.path(&d).with_extension("tmp").exists());
        assert_eq!(s.remove(&d).unwrap(), 5);
        assert_eq!(s.bytes(), 0);
        assert!(matches!(s.get(&d), Err(ChunkError::Missing(_))));
        assert_eq!(s.remove(&d).unwrap(), 0);
    }

    #[test]
    fn a_chunk_over_a_budget_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path()).unwrap().with_budget(Budget {
            artifacts: Some(8),
            total: Some(20),
        });
        let a = b"12345";
        s.put(&Digest::of(a), a).unwrap();
        let b = b"6789";
        let e = s.put(&Digest::of(b), b).unwrap_err();
        assert!(
            matches!(e, ChunkError::OverBudget(OverBudget::Artifacts { .. })),
            "{e}"
        );
        assert!(!s.has(&Digest::of(b)));
        // A chunk already held costs nothing, so it is never refused.
        assert!(!s.put(&Digest::of(a), a).unwrap());
        // The queue's database counts against --max-disk.
        s.set_queue_bytes(14);
        let c = b"xyz";
        let e = s.put(&Digest::of(c), c).unwrap_err();
        assert!(
            matches!(e, ChunkError::OverBudget(OverBudget::Total { .. })),
            "{e}"
        );
        s.set_queue_bytes(0);
        assert!(s.put(&Digest::of(c), c).unwrap());
        assert_eq!(s.bytes(), 8);
    }
}

//! The embedded store: sled behind an API of our own.
//!
//! Layout (DESIGN §4, with one departure recorded in ARCHITECTURE.md):
//! - tree `journal`: every group commit's records, key = kind byte + group
//!   seq (u64 BE) + chunk (u16 BE). Kind `J` holds the group's
//!   `journal::Entry`s, kind `R` its `journal::ResultRecord`s, each chunk a
//!   postcard `Vec<_>` of at most `CHUNK_BYTES` (one oversized entry gets a
//!   chunk of its own). Chunks keep sled values small (sled moves large
//!   values to blob files, a file and an fsync each) while a round stays as
//!   large as concurrency makes it. Both kinds share one tree so one sled
//!   batch, which is atomic, carries a whole group (batches are per tree).
//! - tree `devices`: device id → `DeviceRecord` (postcard).
//! - tree `meta`: `schema` → u32 BE, `instance` → u64 BE, `uplink-epoch` →
//!   u64 BE (names this database's outbox to a hub; a restore renews it).
//! - key `S` in tree `journal`: the seq of the last group committed, written
//!   in every group's batch.
//! - key `L` in tree `journal`: how many commands were live at a recent
//!   commit (every 64th, and at shutdown). Only a hint that sizes replay's
//!   tables; older binaries ignore it, so the schema did not change.
//!
//! sled recovers a damaged log silently (a torn tail looks like a crash; a
//! wrecked file can come back as an empty database), so the store keeps
//! evidence of its own outside sled: `store-id` (the instance id, created
//! with the database) and `store-seq` (a committed seq, refreshed at most
//! every `WATERMARK_EVERY` while busy and at shutdown, never while idle). A
//! database that comes back empty while `store-id` exists, with another
//! instance id, or ending before `store-seq`, is reported as corrupt instead
//! of being served.
//!
//! No sled type leaves this module: sled 0.34 is no longer developed and the
//! engine must stay swappable.
//!
//! Beside this file: `damage` (the instance marker, the watermark and the
//! leftovers of an interrupted sled), `jobs` (the runners' records),
//! `export` (what a backup reads and a restore writes).

// The records are the engine's vocabulary (journal.rs); the store writes
// them. Re-exported under the store's paths the shells use.
pub use crate::engine::journal::{DeviceRecord, Group, GroupWrite};
use crate::engine::journal::{Entry, ResultRecord};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of the on-disk layout this binary writes. A db with a newer one is
/// refused; older ones are migrated at open.
pub const SCHEMA_VERSION: u32 = 1;

const KIND_JOURNAL: u8 = b'J';
const KIND_RESULTS: u8 = b'R';
/// Upstream outbox records (`UpEntry`s), keyed by the group that wrote them.
const KIND_OUTBOX: u8 = b'O';
/// Hub side of upstream sync: `U` + edge id → the edge's outbox epoch and the
/// highest seq of it applied (u64 BE each; the seq alone before 1.6).
const KIND_CURSOR: u8 = b'U';
/// `X` + command id (16 bytes BE): a cancel sent down, not yet confirmed.
const KIND_CANCEL: u8 = b'X';

fn cursor_key(edge: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + edge.len());
    k.push(KIND_CURSOR);
    k.extend_from_slice(edge.as_bytes());
    k
}

fn cancel_key(id: crate::engine::command::CommandId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = KIND_CANCEL;
    k[1..].copy_from_slice(&id.0.to_be_bytes());
    k
}
const KEY_LAST_SEQ: &[u8] = b"S";
/// The seq the next outbox entry gets: kept apart from the outbox groups,
/// which are all deleted once acknowledged, so seqs never go back.
const KEY_OUTBOX_NEXT: &[u8] = b"N";
/// Live commands at a recent commit: sizes the replay's tables up front
/// (growing a million-entry table step by step cost a quarter of a restart).
const KEY_LIVE_HINT: &[u8] = b"L";
/// Meta key: the fingerprint of the box's CA (`Store::ca_fingerprint`).
const KEY_CA: &str = "ca";
/// The trust set (operator keys), postcard; absent: none trusted.
const KEY_TRUST: &str = "trust";
/// Names this database's outbox to the hub above (`UpFrom`, protocol 1.6).
const KEY_UPLINK_EPOCH: &str = "uplink-epoch";
/// Keys of the audit tree beside the 8-byte seqs.
const AUDIT_ANCHOR: &[u8] = b"anchor";
const AUDIT_HEAD: &[u8] = b"head";
const MARKER_FILE: &str = "store-id";
const WATERMARK_FILE: &str = "store-seq";

/// Whether `dir` holds a box's store (its instance marker is there).
pub fn is_store(dir: &Path) -> bool {
    dir.join(MARKER_FILE).is_file()
}
/// How often a busy store refreshes `store-seq`.
const WATERMARK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest chunk value written (see the module doc).
const CHUNK_BYTES: usize = 32 * 1024;

/// Store failures, each naming the path and the way out.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds sled's lock on the database (past
    /// `LOCK_GRACE`), or a snapshot's flock.
    #[error("the database in {dir} is locked: is another outpost running? (data dir {dir}); stop it, or pass another --data-dir")]
    Locked {
        /// The data dir.
        dir: PathBuf,
    },
    /// The database's schema is past `SCHEMA_VERSION`; refused before
    /// anything is written.
    #[error("the database in {dir} was written by a newer outpost (schema {found}, this binary knows up to {known}); run that newer outpost (or upgrade this one): nothing in the data dir was changed")]
    NewerSchema {
        /// The data dir.
        dir: PathBuf,
        /// The schema in the database's `meta` tree.
        found: u32,
        /// The newest this binary knows, `SCHEMA_VERSION`.
        known: u32,
    },
    /// Only for damage actually found; `detail` names it (the file, the
    /// record or group, the check that failed).
    #[error("the database in {dir} is corrupt: {detail}; run `outpost doctor --data-dir {dir}`, then restore a backup, or move the data dir aside to start empty (what is in it is then lost)")]
    Corrupt {
        /// The data dir.
        dir: PathBuf,
        /// What was found damaged, and where.
        detail: String,
    },
    /// sled failed in a way that is no evidence of damage (a panic, a bug it
    /// reports, an unsupported setting): the data is to be kept as it is.
    #[error("the database engine failed on {dir}: {detail}; this is not known to be damage, so keep the data dir as it is: run `outpost doctor --data-dir {dir}`, and report this message if it persists")]
    Engine {
        /// The data dir.
        dir: PathBuf,
        /// sled's error, or the panic's message.
        detail: String,
    },
    /// A request the store refuses before touching sled: options sled
    /// would panic on (`StoreOptions::check`), a restore into an existing
    /// database, a backup out of order. The text says which.
    #[error("{0}")]
    BadOptions(String),
    /// The filesystem failed on the data dir or a file in it.
    #[error("cannot use data dir {dir}: {source}; check that it exists and that the outpost user may read and write it")]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// The OS's error.
        #[source]
        source: std::io::Error,
    },
    /// A write failed with ENOSPC: sled cannot go on after it, so the box
    /// must restart.
    #[error("the disk holding {dir} is full: free space on it, then restart the box (the database cannot go on after a failed write); keep --min-free-disk high enough that this does not happen")]
    DiskFull {
        /// The data dir.
        dir: PathBuf,
    },
}

/// How long an open waits for sled's lock to be let go before calling the
/// database held by another process.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The database's directory under the data dir.
pub const DB_DIR: &str = "db";

/// Tuning for the embedded engine.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// sled's page cache. Its default (1 GiB) is wrong for an edge box.
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// sled's page cache when none is given.
pub const DEFAULT_CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// The smallest page cache sled opens with: below it `Lru::new` asserts
/// (sled 0.34.7 src/lru.rs, "at least 256 bytes"), a panic at open.
pub const MIN_CACHE_BYTES: u64 = 256;

impl StoreOptions {
    /// Refuse what sled would panic on, naming the allowed range.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.cache_bytes < MIN_CACHE_BYTES {
            return Err(StoreError::BadOptions(format!(
                "a page cache of {} bytes is below sled's minimum of {MIN_CACHE_BYTES} bytes; use at least {MIN_CACHE_BYTES} (default {} MiB)",
                self.cache_bytes,
                DEFAULT_CACHE_BYTES >> 20
            )));
        }
        Ok(())
    }
}

/// What the store keeps after a device record's own postcard bytes. A
/// record written before it existed simply ends there; a binary from
/// before it reads the record and ignores the rest (postcard's `from_bytes`
/// stops at the record's end). New fields go at the end of this struct.
#[derive(Serialize, Deserialize, Default)]
struct DeviceExtra {
    cert: Option<[u8; 32]>,
}

/// A device record as the `devices` tree holds it.
fn encode_device(rec: &DeviceRecord) -> Vec<u8> {
    let mut v = encode(rec);
    v.extend(encode(&DeviceExtra { cert: rec.cert }));
    v
}

fn decode_device(b: &[u8]) -> Result<DeviceRecord, postcard::Error> {
    let (mut rec, rest): (DeviceRecord, _) = postcard::take_from_bytes(b)?;
    if !rest.is_empty() {
        let extra: DeviceExtra = decode(rest)?;
        rec.cert = extra.cert;
    }
    Ok(rec)
}

/// Bytes the files under `dir` occupy (the data dir's disk use).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The open store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    journal: sled::Tree,
    devices: sled::Tree,
    meta: sled::Tree,
    /// The audit log: key = seq (u64 BE) → a stored `audit::Entry`, plus
    /// the anchor and the head under keys of another length.
    audit: sled::Tree,
    /// (last seq committed, when `store-seq` was last written).
    watermark: std::sync::Arc<std::sync::Mutex<(u64, Option<std::time::Instant>)>>,
}

pub use crate::disk::{fs_space, fs_space_of};

fn key(kind: u8, seq: u64, chunk: u16) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[0] = kind;
    k[1..9].copy_from_slice(&seq.to_be_bytes());
    k[9..].copy_from_slice(&chunk.to_be_bytes());
    k
}

fn prefix(kind: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = kind;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Encode `items` as postcard `Vec<T>` chunks of at most `CHUNK_BYTES`.
fn chunks<T: Serialize>(items: &[T]) -> Vec<Vec<u8>> {
    // A postcard sequence is its length as a LEB128 varint, then the items.
    fn seal(body: &mut Vec<u8>, n: &mut usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(body.len() + 5);
        let mut len = *n;
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                v.push(b);
                break;
            }
            v.push(b | 0x80);
        }
        v.append(body);
        *n = 0;
        v
    }
    let mut out = Vec::new();
    let mut body = Vec::new();
    let mut n = 0usize;
    for item in items {
        let e = encode(item);
        if n > 0 && body.len() + e.len() > CHUNK_BYTES {
            out.push(seal(&mut body, &mut n));
        }
        body.extend_from_slice(&e);
        n += 1;
    }
    if n > 0 {
        out.push(seal(&mut body, &mut n));
    }
    out
}

impl Store {
    /// Open (creating if needed) the database under `dir/db`.
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        })?;
        opts.check()?;
        let path = dir.join(DB_DIR);
        remove_leftovers(dir, &path)?;
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(opts.cache_bytes)
            // We flush at every group commit ourselves; sled's background
            // flusher would only add writes to an idle box.
            .flush_every_ms(None);
        // A panic inside sled becomes an error naming the data dir, not a
        // crash loop. It is not called damage: sled panics on settings and on
        // its own bugs as well, and a message that says "corrupt" gets data
        // dirs thrown away.
        // Nothing touches `config` after a panic, so unwind safety holds.
        let open = || {
            let config = config.clone();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()))
                .map_err(|p| StoreError::Engine {
                    dir: dir.to_path_buf(),
                    detail: format!(
                        "sled panicked while opening {}: {}",
                        path.display(),
                        panic_text(&p)
                    ),
                })?
                .map_err(|e| map_open_error(dir, e))
        };
        // sled lets go of its lock from its own threads a moment after the
        // last handle is dropped, so an open right after a close (a restart,
        // doctor or an offline enroll just after the box stopped) can find
        // it still held. Try again for a bounded time before saying that
        // another process holds the database.
        let deadline = std::time::Instant::now() + LOCK_GRACE;
        let db = loop {
            match open() {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => break other?,
            }
        };
        let s = |e| map_err(dir, e);
        let store = Store {
            dir: dir.to_path_buf(),
            journal: db.open_tree("journal").map_err(s)?,
            devices: db.open_tree("devices").map_err(s)?,
            meta: db.open_tree("meta").map_err(s)?,
            audit: db.open_tree("audit").map_err(s)?,
            db,
            watermark: Default::default(),
        };
        store.check_schema()?;
        store.check_evidence()?;
        Ok(store)
    }

    /// The fingerprint (SHA-256 of the DER) of the CA this store's devices
    /// were enrolled under, once the box has recorded it.
    pub fn ca_fingerprint(&self) -> Result<Option<[u8; 32]>, StoreError> {
        match self.meta.get(KEY_CA).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => {
                v.as_ref().try_into().map(Some).map_err(|_| {
                    self.corrupt("the CA fingerprint record has the wrong length".into())
                })
            }
        }
    }

    /// Record the CA this store belongs to, durably.
    pub fn set_ca_fingerprint(&self, fp: &[u8; 32]) -> Result<(), StoreError> {
        self.meta.insert(KEY_CA, fp).map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The artifact index's tree (`artifact::shelf`).
    pub fn artifacts(&self) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(crate::shell::artifact::shelf::TREE)
            .map_err(|e| self.err(e))
    }

    /// The trust set, or an empty one for a store that has none.
    pub fn trust(&self) -> Result<crate::engine::trust::TrustSet, StoreError> {
        match self.meta.get(KEY_TRUST).map_err(|e| self.err(e))? {
            None => Ok(Default::default()),
            Some(v) => postcard::from_bytes(&v)
                .map_err(|e| self.corrupt(format!("the trust set record does not decode ({e})"))),
        }
    }

    /// Replace the trust set, durably (rare: an admin's change).
    pub fn put_trust(&self, set: &crate::engine::trust::TrustSet) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(set)
            .map_err(|e| self.corrupt(format!("the trust set does not encode ({e})")))?;
        self.meta
            .insert(KEY_TRUST, bytes)
            .map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The epoch this box's outbox counts in, for the hub above (`UpFrom`):
    /// minted the first time it is asked for, then kept. A hub whose cursor
    /// for this box names another epoch knows the box's database is new
    /// (wiped, or restored) and applies its outbox from the start.
    pub fn uplink_epoch(&self) -> Result<u64, StoreError> {
        if let Some(v) = self.meta.get(KEY_UPLINK_EPOCH).map_err(|e| self.err(e))? {
            if v.len() != 8 {
                return Err(self.corrupt("the uplink epoch record has the wrong length".into()));
            }
            return Ok(be_u64(&v));
        }
        self.renew_uplink_epoch()
    }

    /// A new uplink epoch, durably (a restore: the hub must not take the
    /// restored outbox for the one it has applied, nor count on the
    /// commands it handed to the dead box after the backup).
    pub fn renew_uplink_epoch(&self) -> Result<u64, StoreError> {
        let epoch: u64 = rand::random::<u64>() | 1;
        self.meta
            .insert(KEY_UPLINK_EPOCH, &epoch.to_be_bytes())
            .map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(epoch)
    }

    /// The seq of the last group committed (0 for a new database).
    pub fn last_seq(&self) -> u64 {
        self.watermark.lock().map(|w| w.0).unwrap_or(0)
    }

    /// The data dir this store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn err(&self, e: sled::Error) -> StoreError {
        map_err(&self.dir, e)
    }

    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            detail,
        }
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        match self.meta.get("schema").map_err(|e| self.err(e))? {
            None => {
                self.meta
                    .insert("schema", &SCHEMA_VERSION.to_be_bytes())
                    .map_err(|e| self.err(e))?;
                self.db.flush().map_err(|e| self.err(e))?;
                Ok(())
            }
            Some(v) => {
                let bytes: [u8; 4] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| self.corrupt("schema record has the wrong length".into()))?;
                let found = u32::from_be_bytes(bytes);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        dir: self.dir.clone(),
                        found,
                        known: SCHEMA_VERSION,
                    });
                }
                // Schema 1 is the first; migrations from older schemas go here.
                Ok(())
            }
        }
    }

    /// Write the schema version as given (tests of the newer-schema refusal).
    #[doc(hidden)]
    pub fn force_schema(&self, v: u32) -> Result<(), StoreError> {
        self.meta
            .insert("schema", &v.to_be_bytes())
            .map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// One atomic batch plus one flush. When this returns Ok, the group is on
    /// disk: the caller may answer its waiters.
    pub fn commit(&self, w: &GroupWrite) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (i, c) in chunks(&w.journal).into_iter().enumerate() {
            batch.insert(&key(KIND_JOURNAL, w.seq, i as u16), c);
        }
        for (i, c) in chunks(&w.results).into_iter().enumerate() {
            batch.insert(&key(KIND_RESULTS, w.seq, i as u16), c);
        }
        for (i, c) in chunks(&w.outbox).into_iter().enumerate() {
            batch.insert(&key(KIND_OUTBOX, w.seq, i as u16), c);
        }
        for (kind, seqs) in [
            (KIND_JOURNAL, &w.drop_journal),
            (KIND_RESULTS, &w.drop_results),
            (KIND_OUTBOX, &w.drop_outbox),
        ] {
            for &seq in seqs {
                for k in self.journal.scan_prefix(prefix(kind, seq)).keys() {
                    batch.remove(k.map_err(|e| self.err(e))?);
                }
            }
        }
        if let Some(n) = w.outbox_next {
            batch.insert(KEY_OUTBOX_NEXT, &n.to_be_bytes());
        }
        for (edge, c) in &w.cursors {
            let mut v = [0u8; 16];
            v[..8].copy_from_slice(&c.epoch.to_be_bytes());
            v[8..].copy_from_slice(&c.seq.to_be_bytes());
            batch.insert(cursor_key(edge), &v);
        }
        for &(id, set) in &w.cancel_marks {
            let k = cancel_key(id);
            if set {
                batch.insert(&k, &[]);
            } else {
                batch.remove(&k);
            }
        }
        if let Some(n) = w.live_hint {
            batch.insert(KEY_LIVE_HINT, &n.to_be_bytes());
        }
        batch.insert(KEY_LAST_SEQ, &w.seq.to_be_bytes());
        self.journal.apply_batch(batch).map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        self.refresh_watermark(w.seq, false)
    }

    /// Apply a round's audit part, without a flush: the round's own commit
    /// (or `flush`) that follows makes it durable. It goes first, so a crash
    /// between the two batches can leave an entry for a round that never
    /// became durable (nobody was answered) but never a durable round
    /// without its entries. The anchor and the head ride in the same batch
    /// as the entries and removals, so the three never disagree.
    pub fn audit_write(&self, w: &crate::engine::audit::Write) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (seq, bytes) in &w.entries {
            batch.insert(&seq.to_be_bytes(), &bytes[..]);
        }
        for seq in &w.remove {
            batch.remove(&seq.to_be_bytes());
        }
        if let Some(a) = w.anchor {
            batch.insert(AUDIT_ANCHOR, a.encode());
        }
        batch.insert(AUDIT_HEAD, &w.head.to_be_bytes());
        self.audit.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// Where the kept chain starts (the default while nothing was pruned).
    pub fn audit_anchor(&self) -> Result<crate::engine::audit::Anchor, StoreError> {
        match self.audit.get(AUDIT_ANCHOR).map_err(|e| self.err(e))? {
            None => Ok(Default::default()),
            Some(v) => crate::engine::audit::Anchor::decode(&v)
                .ok_or_else(|| self.corrupt("the audit log's anchor does not decode".into())),
        }
    }

    /// The next seq the writer recorded (`None`: nothing was ever audited).
    pub fn audit_head(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .audit
            .get(AUDIT_HEAD)
            .map_err(|e| self.err(e))?
            .map(|v| be_u64(&v)))
    }

    /// Stored audit entries from `seq` on, in seq order.
    pub fn audit_from(
        &self,
        seq: u64,
    ) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_ {
        self.audit
            .range(seq.to_be_bytes()..)
            .filter(|r| r.as_ref().map_or(true, |(k, _)| k.len() == 8))
            .map(|r| {
                r.map(|(k, v)| (be_u64(&k), v.to_vec()))
                    .map_err(|e| self.err(e))
            })
    }

    /// The last stored audit entry.
    pub fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut it = self
            .audit
            .range(..[0xffu8; 8])
            .rev()
            .filter(|r| r.as_ref().map_or(true, |(k, _)| k.len() == 8));
        match it.next() {
            None => Ok(None),
            Some(r) => {
                let (k, v) = r.map_err(|e| self.err(e))?;
                Ok(Some((be_u64(&k), v.to_vec())))
            }
        }
    }

    /// Every group on disk, in commit order (journal before results within
    /// one seq). A record that does not decode is reported, never skipped.
    pub fn replay(&self) -> impl Iterator<Item = Result<Group, StoreError>> + '_ {
        let mut j = self
            .scan_groups(KIND_JOURNAL)
            .map(|g| g.map(|(seq, e)| Group::Journal(seq, e)))
            .peekable();
        let mut r = self
            .scan_groups(KIND_RESULTS)
            .map(|g| g.map(|(seq, e)| Group::Results(seq, e)))
            .peekable();
        std::iter::from_fn(move || {
            let seq_of = |x: Option<&Result<Group, StoreError>>| match x {
                Some(Ok(Group::Journal(s, _))) | Some(Ok(Group::Results(s, _))) => Some(*s),
                Some(Err(_)) => Some(0),
                None => None,
            };
            match (seq_of(j.peek()), seq_of(r.peek())) {
                (None, None) => None,
                (Some(_), None) => j.next(),
                (None, Some(_)) => r.next(),
                (Some(a), Some(b)) if a <= b => j.next(),
                _ => r.next(),
            }
        })
    }

    /// Every outbox group on disk, in seq order (to rebuild the outbox's
    /// index at start).
    pub fn outbox_groups(
        &self,
    ) -> impl Iterator<Item = Result<(u64, Vec<crate::engine::journal::UpEntry>), StoreError>> + '_
    {
        self.scan_groups(KIND_OUTBOX)
    }

    /// Live commands at a recent commit (0 when unknown or unreadable: it
    /// is only a hint).
    pub fn live_hint(&self) -> u64 {
        match self.journal.get(KEY_LIVE_HINT) {
            Ok(Some(v)) => v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0),
            _ => 0,
        }
    }

    /// Record the live count without a commit (at shutdown, before the
    /// last flush).
    pub fn set_live_hint(&self, n: u64) -> Result<(), StoreError> {
        self.journal
            .insert(KEY_LIVE_HINT, &n.to_be_bytes())
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The seq the next outbox entry gets (1 when there never was one).
    pub fn outbox_next_seq(&self) -> Result<u64, StoreError> {
        match self.journal.get(KEY_OUTBOX_NEXT).map_err(|e| self.err(e))? {
            None => Ok(1),
            Some(v) => Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                self.corrupt("the outbox seq record has the wrong length".into())
            })?)),
        }
    }

    /// Move the outbox's next seq `by` ahead, durably (a restore: the dead
    /// box may have sent its hub records past the backup's seq, and the
    /// hub drops any seq at or below what it has applied as a duplicate;
    /// it needs no seq to follow the one before).
    pub fn skip_outbox_seqs(&self, by: u64) -> Result<(), StoreError> {
        if self
            .journal
            .get(KEY_OUTBOX_NEXT)
            .map_err(|e| self.err(e))?
            .is_none()
        {
            // Nothing ever went up: no hub holds a seq of this box.
            return Ok(());
        }
        let next = self.outbox_next_seq()?.saturating_add(by);
        self.journal
            .insert(KEY_OUTBOX_NEXT, &next.to_be_bytes())
            .map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Per edge below this hub, the highest outbox seq applied and the
    /// epoch it counts in. A cursor written before protocol 1.6 is the seq
    /// alone (8 bytes): its epoch is not known (0).
    pub fn cursors(
        &self,
    ) -> Result<
        Vec<(
            crate::engine::command::DeviceId,
            crate::engine::journal::Cursor,
        )>,
        StoreError,
    > {
        self.journal
            .scan_prefix([KIND_CURSOR])
            .map(|r| {
                let (k, v) = r.map_err(|e| self.err(e))?;
                let edge = String::from_utf8_lossy(&k[1..]).into_owned();
                let cursor = match v.len() {
                    8 => crate::engine::journal::Cursor {
                        epoch: 0,
                        seq: be_u64(&v),
                    },
                    16 => crate::engine::journal::Cursor {
                        epoch: be_u64(&v[..8]),
                        seq: be_u64(&v[8..]),
                    },
                    _ => {
                        return Err(self
                            .corrupt(format!("the sync cursor of `{edge}` has the wrong length")))
                    }
                };
                Ok((edge, cursor))
            })
            .collect()
    }

    /// Commands whose cancel was sent down to an edge and not confirmed.
    pub fn cancel_marks(&self) -> Result<Vec<crate::engine::command::CommandId>, StoreError> {
        self.journal
            .scan_prefix([KIND_CANCEL])
            .keys()
            .map(|k| {
                let k = k.map_err(|e| self.err(e))?;
                let raw: [u8; 16] = k[1..]
                    .try_into()
                    .map_err(|_| self.corrupt("a cancel mark has the wrong length".into()))?;
                Ok(crate::engine::command::CommandId(u128::from_be_bytes(raw)))
            })
            .collect()
    }

    /// One outbox group (to stream it upstream).
    pub fn read_outbox(
        &self,
        seq: u64,
    ) -> Result<Option<Vec<crate::engine::journal::UpEntry>>, StoreError> {
        self.read_group(KIND_OUTBOX, seq)
    }

    /// The groups of one kind, chunks joined, in seq order.
    fn scan_groups<T: for<'a> Deserialize<'a>>(
        &self,
        kind: u8,
    ) -> impl Iterator<Item = Result<(u64, Vec<T>), StoreError>> + '_ {
        let mut it = self.journal.scan_prefix([kind]).peekable();
        std::iter::from_fn(move || {
            let (k, v) = match it.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(self.err(e))),
            };
            let seq = seq_from_key(&k);
            let mut values = vec![v];
            while let Some(Ok((k2, _))) = it.peek() {
                if seq_from_key(k2) != seq {
                    break;
                }
                match it.next() {
                    Some(Ok((_, v2))) => values.push(v2),
                    Some(Err(e)) => return Some(Err(self.err(e))),
                    None => break,
                }
            }
            Some(self.join(kind, seq, &values).map(|e| (seq, e)))
        })
    }

    fn join<T: for<'a> Deserialize<'a>>(
        &self,
        kind: u8,
        seq: u64,
        values: &[sled::IVec],
    ) -> Result<Vec<T>, StoreError> {
        let what = match kind {
            KIND_JOURNAL => "journal",
            KIND_RESULTS => "result",
            _ => "outbox",
        };
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let part: Vec<T> = decode(v)
                .map_err(|e| self.corrupt(format!("{what} group {seq} chunk {i}: {e}")))?;
            out.extend(part);
        }
        Ok(out)
    }

    fn read_group<T: for<'a> Deserialize<'a>>(
        &self,
        kind: u8,
        seq: u64,
    ) -> Result<Option<Vec<T>>, StoreError> {
        let values = self
            .journal
            .scan_prefix(prefix(kind, seq))
            .values()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        if values.is_empty() {
            return Ok(None);
        }
        self.join(kind, seq, &values).map(Some)
    }

    /// One journal group, for reading payloads at delivery.
    pub fn read_journal(&self, seq: u64) -> Result<Option<Vec<Entry>>, StoreError> {
        self.read_group(KIND_JOURNAL, seq)
    }

    /// One result group.
    pub fn read_results(&self, seq: u64) -> Result<Option<Vec<ResultRecord>>, StoreError> {
        self.read_group(KIND_RESULTS, seq)
    }

    /// Insert or replace a device record, durably.
    pub fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.devices
            .insert(rec.id.as_bytes(), encode_device(rec))
            .map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Record last-seen times without a flush: losing one in a crash costs
    /// only a stale "last seen", and flushing would write flash on every
    /// connect.
    pub fn touch_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.devices
            .insert(rec.id.as_bytes(), encode_device(rec))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every device record in tree `devices`, enrolled and revoked, in id
    /// order; one that does not decode is `Corrupt`.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.devices
            .iter()
            .map(|r| {
                let (k, v) = r.map_err(|e| self.err(e))?;
                decode_device(&v).map_err(|e| {
                    self.corrupt(format!(
                        "device record {}: {e}",
                        String::from_utf8_lossy(&k)
                    ))
                })
            })
            .collect()
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Bytes free (to this user) on the data dir's filesystem.
    pub fn free_space(&self) -> Option<u64> {
        fs_space(&self.dir).ok().map(|(_, free)| free)
    }

    /// The database instance id (`meta` key `instance`): names the store a
    /// backup came from.
    pub fn instance(&self) -> Result<u64, StoreError> {
        match self.meta.get("instance").map_err(|e| self.err(e))? {
            Some(v) => Ok(be_u64(&v)),
            None => Ok(0),
        }
    }

    /// Flush anything written without a flush, and record the last
    /// committed seq (shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.err(e))?;
        self.refresh_watermark(0, true)
    }
}

/// What sled's `Corruption` with no location at open most likely is: sled
/// 0.34 does not say, but its snapshot can be checked the way it reads it.
fn describe_open_corruption(db: &Path) -> String {
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(db)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .map(|n| n.to_string_lossy())
                        .is_some_and(|n| n.starts_with("snap.") && !n.ends_with(".in___motion"))
                })
                .collect()
        })
        .unwrap_or_default();
    snaps.sort();
    if let Some(snap) = snaps.pop() {
        if let Ok(bytes) = std::fs::read(&snap) {
            if bytes.len() <= 12 {
                return format!(
                    "sled's snapshot {} is {} bytes, too short to hold its length and checksum trailer",
                    snap.display(),
                    bytes.len()
                );
            }
            let (body, crc) = bytes.split_at(bytes.len() - 4);
            let body = &body[..body.len() - 8];
            let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            if crc32fast::hash(body) != crc {
                return format!("sled's snapshot {} fails its checksum", snap.display());
            }
        }
    }
    format!(
        "sled found a bad checksum or an unreadable record while recovering {} (its log or its conf file)",
        db.display()
    )
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn be_u64(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() == 8 {
        b.copy_from_slice(k);
    }
    u64::from_be_bytes(b)
}

fn seq_from_key(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() >= 9 {
        b.copy_from_slice(&k[1..9]);
    }
    u64::from_be_bytes(b)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding our own in-memory types cannot fail (no maps with non-string
    // keys, no unsized sequences); a failure would be a programming error.
    postcard::to_stdvec(v).expect("postcard encoding of journal types")
}

fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

fn map_open_error(dir: &Path, e: sled::Error) -> StoreError {
    if let sled::Error::Io(io) = &e {
        // sled takes an exclusive flock on its conf/db file; another process
        // holding it surfaces as WouldBlock ("could not acquire lock").
        if io.kind() == std::io::ErrorKind::WouldBlock
            || io.to_string().contains("could not acquire lock")
            || io.raw_os_error() == Some(libc::EWOULDBLOCK)
        {
            return StoreError::Locked {
                dir: dir.to_path_buf(),
            };
        }
    }
    if let sled::Error::Corruption { at: None, .. } = &e {
        return StoreError::Corrupt {
            dir: dir.to_path_buf(),
            detail: describe_open_corruption(&dir.join("db")),
        };
    }
    map_err(dir, e)
}

fn map_err(dir: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => StoreError::DiskFull {
            dir: dir.to_path_buf(),
        },
        sled::Error::Io(source) => StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        },
        sled::Error::Corruption { at: Some(at), .. } => StoreError::Corrupt {
            dir: dir.to_path_buf(),
            detail: format!(
                "sled found a bad checksum at {at} in {}",
                dir.join("db").display()
            ),
        },
        sled::Error::Corruption { at: None, .. } => StoreError::Corrupt {
            dir: dir.to_path_buf(),
            detail: format!("sled found a bad checksum in {}", dir.join("db").display()),
        },
        // Unsupported settings, sled's own bugs, a missing tree: nothing
        // here is evidence that the data on disk is damaged.
        other => StoreError::Engine {
            dir: dir.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

mod damage;
mod export;
mod jobs;

use damage::remove_leftovers;
pub use export::{Exported, Import};

#[cfg(test)]
mod tests;

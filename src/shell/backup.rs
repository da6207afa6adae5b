//! Backups of a box (issue 27): one consistent snapshot of its state in one
//! file, and the restore of that file onto an empty data dir.
//!
//! File layout (format 1):
//!
//! ```text
//! [0, 4096)          header: "# outpost backup v1\n", one line of JSON
//!                    (`Header`), padded with spaces, ending in "\n"
//! [4096, 4096+N)     body: a record stream, or that stream encrypted (age)
//! [end-32, end)      SHA-256(header bytes ‖ SHA-256(body)): the seal
//! ```
//!
//! The header is fixed-size so the writer can stream the body to disk and
//! fill the header (which names the body's digest and length) last; the seal
//! covers the header and, through the body digest, every byte of the body,
//! so a flipped bit anywhere or a cut file is found in one pass, before a
//! restore writes anything. Encryption wraps only the body: the header stays
//! readable (`outpost backup --json`, `head -2 FILE`), and the digests are of
//! the bytes on disk, so a damaged encrypted file is named as damaged, not
//! as a wrong key.
//!
//! The body is records, each a `u32` big-endian length then a postcard
//! `Record`: every sled tree (`Tree`, then its `Kv`s) as the writer saw it
//! between two group commits, then the files (`File`: the TLS dir, the
//! uplink bundle, the artifact chunks, the config), then `End` with the
//! counts. The records name trees and keys, not sled's files, so a restore
//! writes a fresh database with the engine of the binary that restores.

mod restore;
pub mod schedule;

pub use restore::*;

use crate::shell::store::{Exported, Import, Store, StoreError, StoreOptions};
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The file format this binary writes (and the newest it reads).
pub const FORMAT: u32 = 1;
/// Bytes of the header region.
pub const HEADER_BYTES: usize = 4096;
/// The header's first line.
pub const MAGIC: &str = "# outpost backup v1\n";
/// Bytes of the seal at the end.
const SEAL_BYTES: u64 = 32;
/// Largest record accepted (the largest is an artifact chunk, 256 KiB).
const MAX_RECORD: usize = 16 * 1024 * 1024;
/// A snapshot goes to its reader in pieces of about this size, so memory
/// stays bounded by the pieces in flight, never by the store's size.
pub const PIECE_BYTES: usize = 256 * 1024;
/// scrypt work factor for passphrase backups (2^16: 64 MiB and well under
/// a second here). age's default calibrates for a second of the machine
/// that encrypts, which on a fast one asks 256 MiB or more of the small
/// box that must decrypt it.
const SCRYPT_LOG_N: u8 = 16;
/// How far a restore moves an edge's outbox seqs ahead: beyond any the
/// dead box can have sent its hub since the backup (2^32 records), so a hub
/// older than protocol 1.6 takes the restored box's new records instead of
/// dropping them as seqs it has seen. A 1.6 hub needs no skip: the restore
/// also renews the uplink epoch, and the hub applies a new epoch's outbox
/// from its start and sends again what it had handed to the dead box.
const OUTBOX_SKIP: u64 = 1 << 32;
/// Where a restore puts the config file the backup carried (it never
/// writes outside the data dir).
pub const RESTORED_CONFIG: &str = "outpost.toml.restored";

/// What a backup file says about itself (the header's JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The file format (`FORMAT`).
    pub format: u32,
    /// The store schema of the box that wrote it (`store::SCHEMA_VERSION`).
    pub schema: u32,
    /// The version of outpost that wrote it.
    pub outpost: String,
    /// The box's name (the audience of signed commands).
    pub box_name: String,
    /// The box's store instance id (hex).
    pub box_id: String,
    /// The last group commit the snapshot includes: everything acknowledged
    /// up to it is in the file, nothing after.
    pub last_group: u64,
    /// When the snapshot was taken (ms since the epoch).
    pub created_ms: u64,
    /// `none`, `passphrase` or `recipients` (age).
    pub encryption: Encryption,
    /// Bytes of the body as stored.
    pub body_bytes: u64,
    /// SHA-256 of the body as stored (hex).
    pub body_sha256: String,
    /// What the body holds: the sled trees (`Record::Tree`s), counting the
    /// empty ones.
    pub trees: u64,
    /// The key-value pairs across all trees (`Record::Kv`s).
    pub keys: u64,
    /// The files from the data dir and the config (`Record::File`s).
    pub files: u64,
}

/// How a backup's body is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// Not encrypted: the body is the plain record stream.
    None,
    /// age with a passphrase (scrypt).
    Passphrase,
    /// age to X25519 recipients.
    Recipients,
}

/// One record of the body.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Record {
    /// The `Kv`s that follow belong to this tree.
    Tree(#[serde(with = "serde_bytes")] Vec<u8>),
    /// One key and its value, in the tree of the last `Tree` record.
    Kv(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// A file, its path relative to the data dir and its mode.
    File {
        /// Relative to the data dir, with no `..` (a restore refuses any
        /// other); the config is `RESTORED_CONFIG`.
        path: String,
        /// Unix permission bits (`0o777` at most).
        mode: u32,
        /// The file's whole contents.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The last record, with the counts of the others.
    End {
        /// `Tree` records before it.
        trees: u64,
        /// `Kv` records before it.
        keys: u64,
        /// `File` records before it.
        files: u64,
    },
}

/// What the writer's part of a snapshot saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The store schema (`store::SCHEMA_VERSION`).
    pub schema: u32,
    /// The box's name, as the header carries it.
    pub box_name: String,
    /// The store's instance id, 16 hex digits.
    pub box_id: String,
    /// The last group commit the walk saw: the snapshot is the state just
    /// after it.
    pub last_group: u64,
    /// When the walk began (ms since the Unix epoch).
    pub created_ms: u64,
    /// Trees walked.
    pub trees: u64,
    /// Key-value pairs walked, across all trees.
    pub keys: u64,
    /// Files added after the walk (0 until `produce` adds them).
    pub files: u64,
}

/// Why a backup or a restore failed, each naming what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing a file or dir failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or dir.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file does not start with `MAGIC`, and is not a cut backup.
    #[error("{} is not an outpost backup (it does not start with `# outpost backup v1`); name the file `outpost backup` wrote", path.display())]
    NotABackup {
        /// The file named.
        path: PathBuf,
    },
    /// The file's format is newer than `FORMAT`: a refusal (exit 5).
    #[error("{} is a backup of format {found}, newer than this outpost reads ({known}); restore it with the outpost that wrote it (or a newer one): nothing was written", path.display())]
    NewerFormat {
        /// The backup file.
        path: PathBuf,
        /// The header's format.
        found: u32,
        /// `FORMAT`, the newest this binary reads.
        known: u32,
    },
    /// The backup's store schema is newer than this binary's: a refusal
    /// (exit 5), found before anything is written.
    #[error("{} holds a store of schema {found}, newer than this outpost knows ({known}); restore it with outpost {outpost} or newer: nothing was written", path.display())]
    NewerSchema {
        /// The backup file.
        path: PathBuf,
        /// The header's schema.
        found: u32,
        /// `store::SCHEMA_VERSION` of this binary.
        known: u32,
        /// The outpost version that wrote the backup (the header's).
        outpost: String,
    },
    /// The file's length is not the header's region, body and seal: a cut
    /// copy, or bytes added at the end.
    #[error("{} is truncated or padded: it has {found} bytes where its header says {expected}; copy the backup again from where it was made: nothing was written", path.display())]
    Truncated {
        /// The backup file.
        path: PathBuf,
        /// Bytes the header implies (or the least a backup has).
        expected: u64,
        /// Bytes on disk.
        found: u64,
    },
    /// A digest or the seal does not match, or the header or a record
    /// does not parse.
    #[error("{} is damaged: {detail}; use another copy of the backup: nothing was written", path.display())]
    Damaged {
        /// The backup file.
        path: PathBuf,
        /// What does not hold, as a clause for the message.
        detail: String,
    },
    /// The restore's data dir has entries and `--force` was not given: a
    /// refusal (exit 5).
    #[error("{} is not empty ({entries}); a restore writes only into an empty data dir: pick an empty one, or pass --force to move what is there into {}/replaced-<time>/ first", dir.display(), dir.display())]
    NotEmpty {
        /// The data dir.
        dir: PathBuf,
        /// Up to four of its entries' names, comma-separated, then "and N
        /// more".
        entries: String,
    },
    /// A box answers on the data dir's admin socket: a refusal (exit 5).
    #[error("a box is running on {} (its database is locked or its admin socket answers); stop it before restoring", dir.display())]
    Running {
        /// The data dir.
        dir: PathBuf,
    },
    /// The body is encrypted and no key of the right kind was given: a
    /// refusal (exit 5).
    #[error("{} is encrypted with {how}; pass {flag}", path.display())]
    NeedsKey {
        /// The backup file.
        path: PathBuf,
        /// The encryption, in words ("a passphrase").
        how: &'static str,
        /// The flag that supplies its key.
        flag: &'static str,
    },
    /// The key given does not open the body (or its age stream fails): the
    /// file is intact, since its digests held.
    #[error("{} cannot be decrypted: {detail}; check the passphrase or identity file (the file itself is intact): nothing was written", path.display())]
    Decrypt {
        /// The backup file.
        path: PathBuf,
        /// What age said.
        detail: String,
    },
    /// An encryption setting cannot be used (an empty passphrase, a
    /// recipient that is not `age1…`), or the output path names no file.
    #[error("bad encryption setting: {0}")]
    BadKey(String),
    /// The store failed: reading it for a snapshot, or writing the
    /// restored one.
    #[error("the box's store: {0}")]
    Store(#[from] StoreError),
    /// The snapshot could not go on: its reader went away, its thread
    /// panicked, the queue failed, or a record or header would not encode.
    #[error("the snapshot stopped: {0}")]
    Stopped(String),
    /// The queue is shutting down and takes no snapshot.
    #[error("the box is shutting down; take the backup once it is back")]
    ShuttingDown,
}

impl BackupError {
    /// The CLI exit code: a refusal (a full dir, a running box, a missing
    /// key) is 5, the rest 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            BackupError::NotEmpty { .. }
            | BackupError::Running { .. }
            | BackupError::NeedsKey { .. }
            | BackupError::NewerFormat { .. }
            | BackupError::NewerSchema { .. } => crate::exit::REFUSED,
            _ => crate::exit::ERROR,
        }
    }
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Records gathered into pieces of about `PIECE_BYTES`, each handed to
/// `send` (false: the reader went away, and the snapshot stops).
pub struct Pieces<'a> {
    buf: Vec<u8>,
    send: &'a mut dyn FnMut(Vec<u8>) -> bool,
}

impl<'a> Pieces<'a> {
    /// Pieces handed to `send`.
    pub fn new(send: &'a mut dyn FnMut(Vec<u8>) -> bool) -> Self {
        Pieces {
            buf: Vec::with_capacity(PIECE_BYTES + 1024),
            send,
        }
    }

    /// Add one record.
    pub fn push(&mut self, r: &Record) -> Result<(), BackupError> {
        let body = postcard::to_stdvec(r).map_err(|e| BackupError::Stopped(e.to_string()))?;
        self.buf
            .extend_from_slice(&(body.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(&body);
        if self.buf.len() >= PIECE_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Hand over what is gathered.
    pub fn flush(&mut self) -> Result<(), BackupError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE_BYTES + 1024));
        if (self.send)(piece) {
            Ok(())
        } else {
            Err(BackupError::Stopped(
                "the reader of the backup went away".into(),
            ))
        }
    }
}

/// The writer's part: every tree of the store. Run on the writer thread
/// between two rounds, so it is the state of exactly one committed group.
pub fn snapshot_trees(
    store: &Store,
    box_name: &str,
    out: &mut Pieces<'_>,
) -> Result<SnapshotInfo, BackupError> {
    let mut info = SnapshotInfo {
        schema: crate::shell::store::SCHEMA_VERSION,
        box_name: box_name.to_string(),
        box_id: format!("{:016x}", store.instance()?),
        last_group: store.last_seq(),
        created_ms: crate::now_millis(),
        ..Default::default()
    };
    store.export(|item| match item {
        Exported::Tree(name) => {
            info.trees += 1;
            out.push(&Record::Tree(name.to_vec()))
        }
        Exported::Pair(k, v) => {
            info.keys += 1;
            out.push(&Record::Kv(k.to_vec(), v.to_vec()))
        }
    })?;
    out.flush()?;
    Ok(info)
}

/// The files of a data dir a box cannot be rebuilt without: the TLS dir
/// (CA and server keys), the uplink bundle, the artifact chunks; and the
/// config file, when the box has one. Returns how many.
pub fn snapshot_files(
    data_dir: &Path,
    config: Option<&Path>,
    out: &mut Pieces<'_>,
) -> Result<u64, BackupError> {
    let mut n = 0;
    let mut add = |rel: String, path: &Path, out: &mut Pieces<'_>| -> Result<(), BackupError> {
        use std::os::unix::fs::PermissionsExt;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            // A chunk removed since it was listed: retention removes only
            // chunks no manifest of the snapshot names (it waits for
            // `Shelf::hold_edits`), or an add's leftover.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_at(path)(e)),
        };
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o600);
        n += 1;
        out.push(&Record::File {
            path: rel,
            mode,
            bytes,
        })
    };
    for dir in [
        crate::identity::TLS_DIR,
        crate::shell::artifact::chunks::DIR,
    ] {
        let root = data_dir.join(dir);
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_at(&d)(e)),
            };
            let mut entries: Vec<_> = rd.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let Ok(t) = e.file_type() else { continue };
                if t.is_dir() {
                    stack.push(p);
                } else if t.is_file() && p.extension().is_none_or(|x| x != "tmp") {
                    let rel = p
                        .strip_prefix(data_dir)
                        .map(|r| r.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    add(rel, &p, out)?;
                }
            }
        }
    }
    let bundle = data_dir.join(crate::shell::serve::UPSTREAM_BUNDLE);
    if bundle.is_file() {
        add(crate::shell::serve::UPSTREAM_BUNDLE.into(), &bundle, out)?;
    }
    if let Some(c) = config.filter(|c| c.is_file()) {
        add(RESTORED_CONFIG.into(), c, out)?;
    }
    out.flush()?;
    Ok(n)
}

/// Produce a snapshot's whole record stream into `pieces`: the writer's
/// walk of the store (the queue waits for it), then the files, read while
/// artifact edits wait (`Shelf::hold_edits`), so every chunk a manifest of
/// the snapshot names is in it; then the end record. Blocking: run it off
/// the async runtime, with a reader draining `pieces`.
pub fn produce(
    queue: &crate::shell::queue::QueueHandle,
    data_dir: &Path,
    config: Option<&Path>,
    pieces: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<SnapshotInfo, BackupError> {
    let shelf = queue.shelf().clone();
    let _edits = shelf.hold_edits();
    let mut info = queue
        .snapshot_blocking(pieces.clone())
        .map_err(|e| match e {
            crate::shell::queue::QueueError::ShuttingDown => BackupError::ShuttingDown,
            e => BackupError::Stopped(e.to_string()),
        })?;
    let mut send = |p: Vec<u8>| pieces.blocking_send(p).is_ok();
    let mut out = Pieces::new(&mut send);
    info.files = snapshot_files(data_dir, config, &mut out)?;
    out.push(&Record::End {
        trees: info.trees,
        keys: info.keys,
        files: info.files,
    })?;
    out.flush()?;
    Ok(info)
}

/// Take a backup of the box this process runs into `out` (scheduled
/// backups). Blocking, as `produce`.
pub fn take(
    queue: &crate::shell::queue::QueueHandle,
    data_dir: &Path,
    config: Option<&Path>,
    out: &Path,
    encrypt: Option<&Encrypt>,
) -> Result<Header, BackupError> {
    let mut file = BackupFile::create(out, encrypt)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    std::thread::scope(|s| {
        let producer = s.spawn(move || produce(queue, data_dir, config, tx));
        let mut failed = None;
        while let Some(p) = rx.blocking_recv() {
            if let Err(e) = file.write(&p) {
                failed = Some(e);
                break;
            }
        }
        // Dropping the receiver stops the producer at its next piece.
        drop(rx);
        let info = producer
            .join()
            .map_err(|_| BackupError::Stopped("the snapshot thread panicked".into()))?;
        if let Some(e) = failed {
            return Err(e);
        }
        file.finish(&info?)
    })
}

/// How to encrypt a backup.
pub enum Encrypt {
    /// age with this passphrase.
    Passphrase(String),
    /// age to these X25519 recipients (`age1…`).
    Recipients(Vec<String>),
}

/// A key to decrypt a backup with.
pub enum Decrypt {
    /// The passphrase the backup was encrypted with.
    Passphrase(String),
    /// age identities (`AGE-SECRET-KEY-1…`), as an identity file holds them.
    Identities(String),
}

/// Counts the bytes and hashes them on their way to `inner`.
struct Hashing<W> {
    inner: W,
    hash: ring::digest::Context,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(b)?;
        self.hash.update(&b[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Body<W: Write> {
    Plain(W),
    Age(age::stream::StreamWriter<W>),
}

/// A backup file being written: a temp file beside `out`, mode 0600,
/// renamed over `out` by `finish` once whole and synced.
pub struct BackupFile {
    out: PathBuf,
    tmp: PathBuf,
    body: Option<Body<Hashing<io::BufWriter<std::fs::File>>>>,
    encryption: Encryption,
}

impl BackupFile {
    /// Start writing `out` (nothing appears under that name until `finish`).
    pub fn create(out: &Path, encrypt: Option<&Encrypt>) -> Result<BackupFile, BackupError> {
        use std::os::unix::fs::OpenOptionsExt;
        let name = out
            .file_name()
            .ok_or_else(|| BackupError::BadKey(format!("{} names no file", out.display())))?;
        let tmp = out.with_file_name(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        let fail = |e| {
            let _ = std::fs::remove_file(&tmp);
            io_at(&tmp)(e)
        };
        f.write_all(&[b' '; HEADER_BYTES]).map_err(fail)?;
        let hashing = Hashing {
            inner: io::BufWriter::with_capacity(PIECE_BYTES, f),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            n: 0,
        };
        let (body, encryption) = match encrypt {
            None => (Body::Plain(hashing), Encryption::None),
            Some(e) => {
                let (enc, kind) = encryptor(e)?;
                let w = enc.wrap_output(hashing).map_err(fail)?;
                (Body::Age(w), kind)
            }
        };
        Ok(BackupFile {
            out: out.to_path_buf(),
            tmp,
            body: Some(body),
            encryption,
        })
    }

    /// Append a piece of the record stream.
    pub fn write(&mut self, piece: &[u8]) -> Result<(), BackupError> {
        let r = match self.body.as_mut() {
            Some(Body::Plain(w)) => w.write_all(piece),
            Some(Body::Age(w)) => w.write_all(piece),
            None => Ok(()),
        };
        r.map_err(io_at(&self.tmp))
    }

    /// Seal the file with its header, sync it, rename it over `out` and
    /// sync the directory: `out` is then whole or absent, never half.
    pub fn finish(mut self, info: &SnapshotInfo) -> Result<Header, BackupError> {
        let tmp = self.tmp.clone();
        let hashing = match self.body.take() {
            Some(Body::Plain(w)) => w,
            Some(Body::Age(w)) => w.finish().map_err(io_at(&tmp))?,
            None => unreachable!("finish is called once"),
        };
        let Hashing { inner, hash, n } = hashing;
        let body_digest = hash.finish();
        let header = Header {
            format: FORMAT,
            schema: info.schema,
            outpost: env!("CARGO_PKG_VERSION").into(),
            box_name: info.box_name.clone(),
            box_id: info.box_id.clone(),
            last_group: info.last_group,
            created_ms: info.created_ms,
            encryption: self.encryption,
            body_bytes: n,
            body_sha256: hex::encode(body_digest.as_ref()),
            trees: info.trees,
            keys: info.keys,
            files: info.files,
        };
        let region = header_region(&header)?;
        let mut f = inner
            .into_inner()
            .map_err(|e| io_at(&tmp)(e.into_error()))?;
        f.write_all(&seal(&region, body_digest.as_ref()))
            .map_err(io_at(&tmp))?;
        f.seek(SeekFrom::Start(0)).map_err(io_at(&tmp))?;
        f.write_all(&region).map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &self.out).map_err(io_at(&self.out))?;
        let dir = match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(&dir))?;
        Ok(header)
    }
}

impl Drop for BackupFile {
    fn drop(&mut self) {
        // Unfinished (an error, the box went away): leave no temp file.
        if self.body.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn encryptor(e: &Encrypt) -> Result<(age::Encryptor, Encryption), BackupError> {
    match e {
        Encrypt::Passphrase(p) => {
            if p.is_empty() {
                return Err(BackupError::BadKey(
                    "the passphrase file is empty; write a passphrase in it".into(),
                ));
            }
            let mut r = age::scrypt::Recipient::new(p.clone().into());
            r.set_work_factor(SCRYPT_LOG_N);
            let enc = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
                .map_err(|e| BackupError::BadKey(e.to_string()))?;
            Ok((enc, Encryption::Passphrase))
        }
        Encrypt::Recipients(rs) => {
            let keys = rs
                .iter()
                .map(|r| {
                    r.trim().parse::<age::x25519::Recipient>().map_err(|e| {
                        BackupError::BadKey(format!(
                            "`{r}` is not an age X25519 public key ({e}); it starts with age1 (`age-keygen -y KEYFILE` prints it)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let enc =
                age::Encryptor::with_recipients(keys.iter().map(|k| k as &dyn age::Recipient))
                    .map_err(|e| BackupError::BadKey(e.to_string()))?;
            Ok((enc, Encryption::Recipients))
        }
    }
}

fn header_region(h: &Header) -> Result<Vec<u8>, BackupError> {
    let json = serde_json::to_string(h).map_err(|e| BackupError::Stopped(e.to_string()))?;
    let mut region = Vec::with_capacity(HEADER_BYTES);
    region.extend_from_slice(MAGIC.as_bytes());
    region.extend_from_slice(json.as_bytes());
    region.push(b'\n');
    if region.len() > HEADER_BYTES {
        return Err(BackupError::Stopped(format!(
            "the header is {} bytes, over {HEADER_BYTES} (a box name that long?)",
            region.len()
        )));
    }
    region.resize(HEADER_BYTES - 1, b' ');
    region.push(b'\n');
    Ok(region)
}

fn seal(region: &[u8], body_digest: &[u8]) -> [u8; 32] {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    c.update(region);
    c.update(body_digest);
    c.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Parse a header region (the file's first `HEADER_BYTES`). A format newer
/// than this binary's is refused here only if the rest does not parse as
/// ours; `verify` judges the format once the seal holds.
pub fn parse_header(path: &Path, region: &[u8]) -> Result<Header, BackupError> {
    let not = || BackupError::NotABackup {
        path: path.to_path_buf(),
    };
    let rest = region.strip_prefix(MAGIC.as_bytes()).ok_or_else(not)?;
    let line = rest.split(|&b| b == b'\n').next().ok_or_else(not)?;
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| BackupError::Damaged {
            path: path.to_path_buf(),
            detail: format!("its header does not parse ({e})"),
        })?;
    let format = value.get("format").and_then(|f| f.as_u64()).unwrap_or(0) as u32;
    serde_json::from_value(value).map_err(|e| {
        if format > FORMAT {
            BackupError::NewerFormat {
                path: path.to_path_buf(),
                found: format,
                known: FORMAT,
            }
        } else {
            BackupError::Damaged {
                path: path.to_path_buf(),
                detail: format!("its header does not parse ({e})"),
            }
        }
    })
}

/// Read a backup's header and check the whole file against its seal: its
/// length, the body's digest, the header's; then its format. Writes
/// nothing.
pub fn verify(path: &Path) -> Result<Header, BackupError> {
    let mut f = std::fs::File::open(path).map_err(io_at(path))?;
    let len = f.metadata().map_err(io_at(path))?.len();
    let mut region = vec![0u8; HEADER_BYTES];
    if len < HEADER_BYTES as u64 {
        // Too short for a header: say what it is if the start says so.
        let mut start = Vec::new();
        f.read_to_end(&mut start).map_err(io_at(path))?;
        if start.starts_with(MAGIC.as_bytes()) {
            return Err(BackupError::Truncated {
                path: path.to_path_buf(),
                expected: HEADER_BYTES as u64 + SEAL_BYTES,
                found: len,
            });
        }
        return Err(BackupError::NotABackup {
            path: path.to_path_buf(),
        });
    }
    f.read_exact(&mut region).map_err(io_at(path))?;
    let header = parse_header(path, &region)?;
    // A flipped bit can make any number of the header, the format too:
    // nothing in it is believed before the seal holds.
    let newer = |detail: &str| {
        if header.format > FORMAT {
            format!(
                "{detail} (it claims format {}, newer than this outpost reads ({FORMAT}): if it truly is, restore it with a newer outpost)",
                header.format
            )
        } else {
            detail.to_string()
        }
    };
    let expected = (HEADER_BYTES as u64)
        .saturating_add(header.body_bytes)
        .saturating_add(SEAL_BYTES);
    if len != expected {
        return Err(BackupError::Truncated {
            path: path.to_path_buf(),
            expected,
            found: len,
        });
    }
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut body = (&mut f).take(header.body_bytes);
    let mut buf = vec![0u8; PIECE_BYTES];
    loop {
        let k = body.read(&mut buf).map_err(io_at(path))?;
        if k == 0 {
            break;
        }
        hash.update(&buf[..k]);
    }
    let digest = hash.finish();
    let mut stored = [0u8; 32];
    f.read_exact(&mut stored).map_err(io_at(path))?;
    if hex::encode(digest.as_ref()) != header.body_sha256 {
        return Err(BackupError::Damaged {
            path: path.to_path_buf(),
            detail: newer("the body's SHA-256 is not the one its header names"),
        });
    }
    if seal(&region, digest.as_ref()) != stored {
        return Err(BackupError::Damaged {
            path: path.to_path_buf(),
            detail: newer("its seal does not match its header"),
        });
    }
    if header.format > FORMAT {
        return Err(BackupError::NewerFormat {
            path: path.to_path_buf(),
            found: header.format,
            known: FORMAT,
        });
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SnapshotInfo {
        SnapshotInfo {
            schema: crate::shell::store::SCHEMA_VERSION,
            box_name: "edge-1".into(),
            box_id: "00000000000000ab".into(),
            last_group: 42,
            created_ms: 1_700_000_000_000,
            trees: 1,
            keys: 2,
            files: 0,
        }
    }

    /// A file of one tree with two keys, as `outpost backup` writes it.
    fn write(path: &Path, enc: Option<&Encrypt>) -> Header {
        let mut f = BackupFile::create(path, enc).unwrap();
        let mut pieces = Vec::new();
        let mut send = |p: Vec<u8>| {
            pieces.push(p);
            true
        };
        let mut out = Pieces::new(&mut send);
        out.push(&Record::Tree(b"meta".to_vec())).unwrap();
        out.push(&Record::Kv(b"a".to_vec(), b"1".to_vec())).unwrap();
        out.push(&Record::Kv(b"b".to_vec(), vec![7; 100_000]))
            .unwrap();
        out.push(&Record::End {
            trees: 1,
            keys: 2,
            files: 0,
        })
        .unwrap();
        out.flush().unwrap();
        for p in &pieces {
            f.write(p).unwrap();
        }
        f.finish(&info()).unwrap()
    }

    #[test]
    fn a_written_file_verifies_and_its_header_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.backup");
        let h = write(&p, None);
        assert_eq!(verify(&p).unwrap(), h);
        assert_eq!(h.last_group, 42);
        assert_eq!(h.encryption, Encryption::None);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp file is left beside it.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(len, HEADER_BYTES as u64 + h.body_bytes + 32);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_named_as_damage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.backup");
        write(&p, None);
        let good = std::fs::read(&p).unwrap();
        // In the header's JSON, in the padding, in the body, in the seal.
        for at in [30, HEADER_BYTES - 10, HEADER_BYTES + 50, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x04;
            std::fs::write(&p, &bad).unwrap();
            let e = verify(&p).unwrap_err();
            assert!(
                matches!(e, BackupError::Damaged { .. }),
                "flip at {at}: {e}"
            );
            assert!(e.to_string().contains("nothing was written"), "{e}");
        }
    }

    #[test]
    fn a_cut_or_padded_file_is_named_as_truncated() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.backup");
        write(&p, None);
        let good = std::fs::read(&p).unwrap();
        for len in [good.len() - 1, HEADER_BYTES + 10, 100] {
            std::fs::write(&p, &good[..len]).unwrap();
            let e = verify(&p).unwrap_err();
            assert!(matches!(e, BackupError::Truncated { .. }), "{len}: {e}");
        }
        let mut longer = good.clone();
        longer.push(0);
        std::fs::write(&p, &longer).unwrap();
        assert!(matches!(
            verify(&p).unwrap_err(),
            BackupError::Truncated { .. }
        ));
    }

    #[test]
    fn other_files_and_newer_formats_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(
            verify(&p).unwrap_err(),
            BackupError::NotABackup { .. }
        ));
        let mut region = MAGIC.as_bytes().to_vec();
        region.extend_from_slice(br#"{"format":2,"whatever":true}"#);
        region.push(b'\n');
        let e = parse_header(&p, &region).unwrap_err();
        assert!(
            matches!(e, BackupError::NewerFormat { found: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_restore_refuses_a_newer_schema_and_a_full_dir_before_writing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.backup");
        let mut f = BackupFile::create(&p, None).unwrap();
        f.write(&[]).unwrap();
        f.finish(&SnapshotInfo {
            schema: crate::shell::store::SCHEMA_VERSION + 1,
            ..info()
        })
        .unwrap();
        let target = d.path().join("data");
        let e = restore(&p, &target, false, None, &Default::default()).unwrap_err();
        assert!(matches!(e, BackupError::NewerSchema { .. }), "{e}");
        assert!(!target.exists());

        write(&p, None);
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        let e = restore(&p, &target, false, None, &Default::default()).unwrap_err();
        assert!(matches!(e, BackupError::NotEmpty { .. }), "{e}");
        assert!(e.to_string().contains("keep"), "{e}");
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 1);
    }

    #[test]
    fn record_paths_stay_inside_the_data_dir() {
        assert!(safe_relative("tls/ca.key").is_some());
        assert!(safe_relative("../etc/passwd").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(safe_relative("tls/../../x").is_none());
        assert!(safe_relative("").is_none());
    }

    #[test]
    fn an_encrypted_body_opens_only_with_its_passphrase() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.backup");
        let h = write(&p, Some(&Encrypt::Passphrase("correct horse".into())));
        assert_eq!(h.encryption, Encryption::Passphrase);
        assert_eq!(verify(&p).unwrap(), h);
        let target = d.path().join("data");
        let e = restore(&p, &target, false, None, &Default::default()).unwrap_err();
        assert!(matches!(e, BackupError::NeedsKey { .. }), "{e}");
        let wrong = Decrypt::Passphrase("battery staple".into());
        let e = restore(&p, &target, false, Some(&wrong), &Default::default()).unwrap_err();
        assert!(matches!(e, BackupError::Decrypt { .. }), "{e}");
        assert!(!target.exists());
        let right = Decrypt::Passphrase("correct horse".into());
        let r = restore(&p, &target, false, Some(&right), &Default::default()).unwrap();
        assert_eq!(r.header, h);
    }
}

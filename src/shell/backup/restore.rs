//! A backup restored onto a data dir: checked whole (its seal, its
//! digest) before anything is written, refused on a dir in use unless
//! forced (what was there is moved aside, never deleted), then the store,
//! the keys and the config written back, each file durably.

use super::*;

/// Why a restore may not write into a data dir, if it may not.
pub(super) fn check_target(dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    if std::os::unix::net::UnixStream::connect(dir.join(crate::shell::admin::SOCKET)).is_ok() {
        return Err(BackupError::Running {
            dir: dir.to_path_buf(),
        });
    }
    Ok(entries)
}

/// What a restore did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Restored {
    /// The backup's header.
    pub header: Header,
    /// Commands and results groups found in the restored store at open.
    pub groups: u64,
    /// Where what was in the data dir went (`--force`).
    pub moved_aside: Option<PathBuf>,
    /// The config file the backup carried, written here.
    pub config: Option<PathBuf>,
}

/// Restore the backup `path` into `dir`, which must be empty (or absent)
/// unless `force`, when what is there is first moved into
/// `dir/replaced-<ms>/`. The file is checked whole before anything is
/// written; the store is written into a staging dir inside `dir`, opened
/// and replayed there, and only then moved into place.
pub fn restore(
    path: &Path,
    dir: &Path,
    force: bool,
    key: Option<&Decrypt>,
    opts: &StoreOptions,
) -> Result<Restored, BackupError> {
    let header = verify(path)?;
    if header.schema > crate::shell::store::SCHEMA_VERSION {
        return Err(BackupError::NewerSchema {
            path: path.to_path_buf(),
            found: header.schema,
            known: crate::shell::store::SCHEMA_VERSION,
            outpost: header.outpost.clone(),
        });
    }
    let entries = check_target(dir)?;
    if !entries.is_empty() && !force {
        let mut names: Vec<String> = entries
            .iter()
            .take(4)
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        if entries.len() > 4 {
            names.push(format!("and {} more", entries.len() - 4));
        }
        return Err(BackupError::NotEmpty {
            dir: dir.to_path_buf(),
            entries: names.join(", "),
        });
    }
    // The key is tried on the age header before anything is written.
    let mut f = std::fs::File::open(path).map_err(io_at(path))?;
    f.seek(SeekFrom::Start(HEADER_BYTES as u64))
        .map_err(io_at(path))?;
    let body = BufReader::with_capacity(PIECE_BYTES, f.take(header.body_bytes));
    let mut reader: Box<dyn BufRead> = match header.encryption {
        Encryption::None => Box::new(body),
        enc => Box::new(BufReader::with_capacity(
            PIECE_BYTES,
            decryptor(path, enc, key, body)?,
        )),
    };
    private_dirs(dir)?;
    let moved_aside = if entries.is_empty() {
        None
    } else {
        Some(move_aside(dir, &entries)?)
    };
    let stage = dir.join(format!(".restore-{}", std::process::id()));
    let result = (|| {
        private_dirs(&stage)?;
        write_records(path, &stage, &mut reader, opts)?;
        // Open and replay it where it is: a store that does not open is
        // never moved into place.
        let store = Store::open(&stage, opts)?;
        store.skip_outbox_seqs(OUTBOX_SKIP)?;
        store.renew_uplink_epoch()?;
        let mut groups = 0;
        for g in store.replay() {
            g?;
            groups += 1;
        }
        drop(store);
        Ok::<_, BackupError>(groups)
    })();
    let groups = match result {
        Ok(g) => g,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(e);
        }
    };
    let rd = std::fs::read_dir(&stage).map_err(io_at(&stage))?;
    for e in rd.flatten() {
        let to = dir.join(e.file_name());
        std::fs::rename(e.path(), &to).map_err(io_at(&to))?;
    }
    std::fs::remove_dir(&stage).map_err(io_at(&stage))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))?;
    let config = dir.join(RESTORED_CONFIG);
    Ok(Restored {
        header,
        groups,
        moved_aside,
        config: config.is_file().then_some(config),
    })
}

pub(super) fn decryptor<R: BufRead>(
    path: &Path,
    enc: Encryption,
    key: Option<&Decrypt>,
    body: R,
) -> Result<age::stream::StreamReader<R>, BackupError> {
    let (how, flag) = match enc {
        Encryption::Passphrase => ("a passphrase", "--passphrase-file FILE"),
        _ => (
            "age recipient keys",
            "--identity FILE (the age identity of a recipient)",
        ),
    };
    let needs = || BackupError::NeedsKey {
        path: path.to_path_buf(),
        how,
        flag,
    };
    let bad = |e: &dyn std::fmt::Display| BackupError::Decrypt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let d = age::Decryptor::new_buffered(body).map_err(|e| bad(&e))?;
    match (enc, key) {
        (Encryption::Passphrase, Some(Decrypt::Passphrase(p))) => {
            let mut id = age::scrypt::Identity::new(p.clone().into());
            id.set_max_work_factor(SCRYPT_LOG_N.max(20));
            d.decrypt(std::iter::once(&id as &dyn age::Identity))
                .map_err(|e| bad(&e))
        }
        (Encryption::Recipients, Some(Decrypt::Identities(text))) => {
            let ids = age::IdentityFile::from_buffer(text.as_bytes())
                .and_then(|f| {
                    f.into_identities()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
                })
                .map_err(|e| bad(&format!("the identity file does not parse ({e})")))?;
            d.decrypt(ids.iter().map(|i| i.as_ref() as &dyn age::Identity))
                .map_err(|e| bad(&e))
        }
        _ => Err(needs()),
    }
}

/// Create `dir` and its missing parents, mode 0700: a data dir's contents
/// are the box's alone (the TLS dir must be 0700 for `Identity::load`).
pub(super) fn private_dirs(dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_at(dir))
}

pub(super) fn move_aside(dir: &Path, entries: &[PathBuf]) -> Result<PathBuf, BackupError> {
    let aside = dir.join(format!("replaced-{}", crate::now_millis()));
    std::fs::create_dir(&aside).map_err(io_at(&aside))?;
    for e in entries {
        if let Some(name) = e.file_name() {
            let to = aside.join(name);
            std::fs::rename(e, &to).map_err(io_at(&to))?;
        }
    }
    Ok(aside)
}

/// A relative path with no `..`, no root: a record never writes outside
/// the staging dir.
pub(super) fn safe_relative(p: &str) -> Option<PathBuf> {
    use std::path::Component;
    let path = Path::new(p);
    let ok = !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| path.to_path_buf())
}

pub(super) fn write_records(
    path: &Path,
    stage: &Path,
    r: &mut dyn BufRead,
    opts: &StoreOptions,
) -> Result<(), BackupError> {
    let damaged = |detail: String| BackupError::Damaged {
        path: path.to_path_buf(),
        detail,
    };
    let mut import = Import::create(stage, opts)?;
    let (mut trees, mut keys, mut files) = (0u64, 0u64, 0u64);
    let mut dirs = std::collections::BTreeSet::new();
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if let Err(e) = r.read_exact(&mut len) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                damaged("its record stream ends before its end record".into())
            } else {
                BackupError::Decrypt {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                }
            });
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RECORD {
            return Err(damaged(format!(
                "a record of {len} bytes is over the limit"
            )));
        }
        buf.resize(len, 0);
        r.read_exact(&mut buf)
            .map_err(|e| damaged(format!("a record is cut short ({e})")))?;
        let rec: Record = postcard::from_bytes(&buf)
            .map_err(|e| damaged(format!("a record does not decode ({e})")))?;
        match rec {
            Record::Tree(name) => {
                trees += 1;
                import.tree(&name)?;
            }
            Record::Kv(k, v) => {
                keys += 1;
                import.put(&k, &v)?;
            }
            Record::File {
                path: rel,
                mode,
                bytes,
            } => {
                use std::os::unix::fs::OpenOptionsExt;
                files += 1;
                let rel = safe_relative(&rel)
                    .ok_or_else(|| damaged(format!("a file record names `{rel}`")))?;
                let to = stage.join(&rel);
                if let Some(parent) = to.parent() {
                    private_dirs(parent)?;
                    dirs.insert(parent.to_path_buf());
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode & 0o777)
                    .open(&to)
                    .map_err(io_at(&to))?;
                f.write_all(&bytes).map_err(io_at(&to))?;
                f.sync_all().map_err(io_at(&to))?;
            }
            Record::End {
                trees: t,
                keys: k,
                files: n,
            } => {
                if (t, k, n) != (trees, keys, files) {
                    return Err(damaged(format!(
                        "it holds {trees} trees, {keys} keys and {files} files, its end record says {t}, {k} and {n}"
                    )));
                }
                break;
            }
        }
    }
    import.finish()?;
    for d in dirs {
        std::fs::File::open(&d)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&d))?;
    }
    Ok(())
}

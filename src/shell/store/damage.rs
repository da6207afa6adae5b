//! Telling damage from a crash: the store's instance marker and watermark
//! files (a database replaced, emptied or rolled back is named, never
//! served), and what an interrupted sled leaves in `db/` removed before
//! the open, so a full disk mid-snapshot costs no data.

use super::*;

impl Store {
    pub(super) fn check_evidence(&self) -> Result<(), StoreError> {
        let instance = match self.meta.get("instance").map_err(|e| self.err(e))? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| self.corrupt("instance record has the wrong length".into()))?,
            ),
            None => {
                let id: u64 = rand::random::<u64>() | 1;
                self.meta
                    .insert("instance", &id.to_be_bytes())
                    .map_err(|e| self.err(e))?;
                self.db.flush().map_err(|e| self.err(e))?;
                id
            }
        };
        let marker = self.dir.join(MARKER_FILE);
        match std::fs::read_to_string(&marker) {
            Ok(text) => {
                let expected = u64::from_str_radix(text.trim(), 16).ok();
                if expected != Some(instance) {
                    return Err(self.corrupt(format!(
                        "{} names database instance {} but {}/db is instance {instance:016x}: the database was replaced or came back empty after damage",
                        marker.display(),
                        text.trim(),
                        self.dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_file_durably(&marker, format!("{instance:016x}\n").as_bytes()).map_err(
                    |source| StoreError::Io {
                        dir: self.dir.clone(),
                        source,
                    },
                )?;
            }
            Err(source) => {
                return Err(StoreError::Io {
                    dir: self.dir.clone(),
                    source,
                })
            }
        }
        let last = match self.journal.get(KEY_LAST_SEQ).map_err(|e| self.err(e))? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| self.corrupt("last-seq record has the wrong length".into()))?,
            ),
            None => 0,
        };
        let wm_path = self.dir.join(WATERMARK_FILE);
        if let Ok(text) = std::fs::read_to_string(&wm_path) {
            if let Ok(wm) = text.trim().parse::<u64>() {
                if wm > last {
                    return Err(self.corrupt(format!(
                        "it ends at group {last}, but group {wm} was committed (per {}): committed data is missing",
                        wm_path.display()
                    )));
                }
            }
        }
        // Nobody else holds the store yet, so the lock cannot be poisoned;
        // and a poisoned lock would be no damage on disk anyway.
        *self.watermark.lock().unwrap_or_else(|p| p.into_inner()) = (last, None);
        Ok(())
    }

    /// Record a committed seq in `store-seq` if the last time is old enough
    /// (or `force`, at shutdown).
    pub(super) fn refresh_watermark(&self, seq: u64, force: bool) -> Result<(), StoreError> {
        let Ok(mut w) = self.watermark.lock() else {
            return Ok(());
        };
        w.0 = w.0.max(seq);
        let due = force || w.1.is_none_or(|t| t.elapsed() >= WATERMARK_EVERY);
        if due && w.0 > 0 {
            write_file_durably(
                &self.dir.join(WATERMARK_FILE),
                format!("{}\n", w.0).as_bytes(),
            )
            .map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })?;
            w.1 = Some(std::time::Instant::now());
        }
        Ok(())
    }
}

/// Write a small file so that it is either wholly there or not changed: a
/// temp file, fsync, rename, fsync of the directory.
pub(super) fn write_file_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Remove what an interrupted sled leaves in `db/` and would then refuse to
/// open past: unfinished snapshots.
///
/// sled 0.34.7 writes a snapshot as `snap.<lsn>.generating`, fsyncs it, and
/// only then renames it to `snap.<lsn>`; older snapshots are deleted after
/// that rename (`write_snapshot`, src/pagecache/snapshot.rs). But
/// `read_snapshot` (same file) picks the greatest name among *all* `snap.*`
/// files, `.generating` ones included, and fails the open with
/// `Corruption` when that file is 12 bytes or shorter or fails its CRC. A
/// full disk during the snapshot sled writes at every open that finds the
/// log ahead of its snapshot leaves exactly that: a zero-byte
/// `.generating` file, and every later open fails.
///
/// Removing a `.generating` file loses nothing: it is by definition a
/// snapshot whose rename never happened, so the previous snapshot is still
/// there and the log it would have summarised is untouched; the directory
/// is then as sled would have left it had it stopped just before creating
/// the file, a state it recovers from by design (it replays the log from the
/// older snapshot and writes a new one).
pub(super) fn remove_leftovers(dir: &Path, db: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(db) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                dir: dir.to_path_buf(),
                source,
            })
        }
    };
    let leftovers: Vec<std::fs::DirEntry> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("snap.") && name.ends_with(".generating")
        })
        .collect();
    if leftovers.is_empty() {
        return Ok(());
    }
    // Under sled's own lock (an flock on `db/db`, taken the way sled takes
    // it): a box that holds the database, or is opening it, may be writing
    // that very snapshot.
    let _lock = match std::fs::File::open(db.join("db")) {
        Ok(f) => {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock(2) on a descriptor this function owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Some(f)
        }
        Err(_) => None,
    };
    for e in leftovers {
        let path = e.path();
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&path).map_err(|source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        })?;
        tracing::warn!(
            file = %path.display(),
            bytes = len,
            "removed an unfinished sled snapshot (left by an interrupted write, e.g. a full disk); nothing is lost: sled rebuilds it from its log"
        );
    }
    if let Ok(d) = std::fs::File::open(db) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! A damaged database is named, never served as data. Each test builds a
    //! store, closes it, damages it the way disks and people do, and reopens.
    use super::*;

    fn build(dir: &Path) {
        let s = Store::open(dir, &StoreOptions::default()).unwrap();
        for seq in 1..=200u64 {
            s.put_device(&DeviceRecord {
                id: format!("d{seq}"),
                tags: vec![],
                caps: vec![],
                enrolled_at: seq,
                revoked: false,
                cert: None,
                last_seen: None,
            })
            .unwrap();
            s.commit(&GroupWrite {
                seq,
                results: vec![],
                ..Default::default()
            })
            .unwrap();
        }
        s.flush().unwrap();
    }

    fn damage(dir: &Path, f: impl FnOnce(&mut Vec<u8>)) {
        let path = dir.join("db").join("db");
        let mut bytes = std::fs::read(&path).unwrap();
        f(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
    }

    fn reopen_error(dir: &Path) -> String {
        match Store::open(dir, &StoreOptions::default()) {
            Ok(_) => panic!("a damaged database was opened as if whole"),
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, StoreError::Corrupt { .. }), "{msg}");
                assert!(
                    msg.contains(&dir.display().to_string()),
                    "names the data dir: {msg}"
                );
                assert!(msg.contains("outpost doctor"), "says what to do: {msg}");
                msg
            }
        }
    }

    #[test]
    fn a_clean_reopen_passes_the_checks() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path());
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(s.last_seq(), 200);
        assert_eq!(s.devices().unwrap().len(), 200);
    }

    #[test]
    fn a_truncated_log_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path());
        damage(dir.path(), |b| b.truncate(b.len() / 2));
        let msg = reopen_error(dir.path());
        assert!(
            msg.contains("committed data is missing") || msg.contains("instance"),
            "{msg}"
        );
    }

    #[test]
    fn flipped_bits_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path());
        damage(dir.path(), |b| {
            for i in (0..b.len()).step_by(997) {
                b[i] ^= 0x55;
            }
        });
        reopen_error(dir.path());
    }

    #[test]
    fn an_emptied_database_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path());
        damage(dir.path(), |b| b.clear());
        let msg = reopen_error(dir.path());
        assert!(msg.contains("came back empty"), "{msg}");
    }

    #[test]
    fn a_finished_snapshot_that_is_empty_is_damage_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path());
        // sled writes its snapshot at an open that finds the log ahead.
        drop(Store::open(dir.path(), &StoreOptions::default()).unwrap());
        let db = dir.path().join("db");
        let snap = std::fs::read_dir(&db)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("snap.")
            })
            .max()
            .expect("a reopened store has a snapshot");
        // sled renames a snapshot only after it is written and fsynced, so
        // an empty one under its final name is damage, not a leftover.
        std::fs::write(&snap, b"").unwrap();
        let msg = reopen_error(dir.path());
        assert!(
            msg.contains(&snap.display().to_string()) && msg.contains("0 bytes"),
            "{msg}"
        );
    }

    #[test]
    fn engine_failures_that_are_no_damage_never_advise_discarding_the_data() {
        let dir = Path::new("/var/lib/outpost");
        for e in [
            sled::Error::Unsupported("segment_size should be a power of 2".into()),
            sled::Error::ReportableBug("a bug".into()),
        ] {
            let e = map_err(dir, e);
            assert!(matches!(e, StoreError::Engine { .. }), "{e}");
            let m = e.to_string();
            assert!(!m.contains("aside") && !m.contains("corrupt"), "{m}");
            assert!(m.contains("keep the data dir as it is"), "{m}");
        }
        let m = StoreError::NewerSchema {
            dir: dir.into(),
            found: 9,
            known: 1,
        }
        .to_string();
        assert!(!m.contains("aside"), "{m}");
    }

    #[test]
    fn a_database_from_elsewhere_is_detected() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        build(a.path());
        build(b.path());
        std::fs::remove_dir_all(a.path().join("db")).unwrap();
        let copy = |from: &Path, to: &Path| {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_file() {
                    std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
                }
            }
        };
        copy(&b.path().join("db"), &a.path().join("db"));
        let msg = reopen_error(a.path());
        assert!(msg.contains("replaced"), "{msg}");
    }
}

#[cfg(test)]
mod leftover_tests {
    //! What an interrupted sled leaves behind in `db/` is cleaned up before
    //! the open, so the store comes back whole instead of "corrupt".
    use super::super::tests::cmd;
    use super::*;

    fn snapshots(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("db"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snap."))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_zero_byte_generating_snapshot_is_removed_and_every_command_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            for seq in 1..=50u64 {
                s.commit(&GroupWrite {
                    seq,
                    journal: vec![cmd(seq)],
                    ..Default::default()
                })
                .unwrap();
            }
            s.flush().unwrap();
        }
        // What a full disk leaves when sled's snapshot at open could not be
        // written: the file created, not one byte in it. Its lsn is past
        // every finished snapshot's, as a new snapshot's always is.
        let leftover = dir
            .path()
            .join("db")
            .join(format!("snap.{:016X}.generating", u64::MAX >> 8));
        std::fs::write(&leftover, b"").unwrap();
        let s = Store::open(dir.path(), &StoreOptions::default())
            .unwrap_or_else(|e| panic!("the store's own leftover made it unusable: {e}"));
        let seqs: Vec<u64> = s
            .replay()
            .map(|g| match g.unwrap() {
                Group::Journal(seq, e) => {
                    assert_eq!(e, vec![cmd(seq)]);
                    seq
                }
                Group::Results(seq, _) => panic!("no results were written, got group {seq}"),
            })
            .collect();
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "every command is there");
        assert!(!leftover.exists(), "{:?}", snapshots(dir.path()));
    }

    #[test]
    fn a_leftover_is_not_touched_while_another_store_holds_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let leftover = dir
            .path()
            .join("db")
            .join("snap.0000000000000100.generating");
        std::fs::write(&leftover, b"").unwrap();
        let e = Store::open(dir.path(), &StoreOptions::default())
            .err()
            .expect("refused");
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
        assert!(leftover.exists(), "the holder may be writing it");
        drop(held);
    }
}

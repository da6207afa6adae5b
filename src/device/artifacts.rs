//! The reference agent's artifacts: a command whose envelope names one
//! gets it fetched (on the command's own connection, in the command's own
//! task) into the artifact dir before its handler runs, within the
//! device's disk budget, with progress reported to the box.
//!
//! Layout of the dir: `NAME-VERSION` per verified artifact, `chunks/HEX`
//! per cached chunk (the resume, and what a new version shares with an
//! old one). Both count against the budget; least recently used go first.

use super::evict::{self, Entry};
use super::fetch::{artifact_path, fetch_with, FetchError, FetchOptions};
use super::Sender;
use crate::engine::artifact::{Digest, Manifest};
use crate::engine::command::{CommandId, Outcome};
use crate::proto::{DeviceFrame, ErrorCode};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Default `--max-artifact-disk`.
pub const DEFAULT_BUDGET: u64 = 1 << 30;

/// Progress goes to the box at most this often while a fetch runs.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The artifact dir beside a bundle: `dev-7.bundle` → `dev-7.artifacts/`.
pub fn default_dir(bundle: &Path) -> PathBuf {
    let stem = bundle
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "device".into());
    bundle.with_file_name(format!("{stem}.artifacts"))
}

/// The artifact dir and its budget, shared by every command task.
pub struct Artifacts {
    dir: PathBuf,
    budget: u64,
    /// One fetch at a time: eviction must see a dir nobody else is
    /// writing, and two commands naming the same artifact then fetch it
    /// once (the second finds it verified).
    one_at_a_time: tokio::sync::Mutex<()>,
    /// Verified files a running command uses: never evicted under it.
    in_use: Mutex<HashMap<PathBuf, usize>>,
}

/// A verified artifact held for one command; eviction leaves it alone
/// until this is dropped.
pub struct Lease {
    /// The verified file, `DIR/NAME-VERSION` (`OUTPOST_ARTIFACT`).
    pub path: PathBuf,
    /// Its manifest: name, version, size and chunks.
    pub manifest: Manifest,
    /// The artifact's id as the command's envelope names it (the SHA-256
    /// of its manifest).
    pub digest: Digest,
    /// Chunk bytes this fetch asked of the box.
    pub fetched_bytes: u64,
    /// Bytes found on disk instead: cached chunks, or the whole file when
    /// it was verified already.
    pub reused_bytes: u64,
    store: Arc<Artifacts>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut u = self.store.in_use.lock().expect("in_use lock");
        if let Some(n) = u.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                u.remove(&self.path);
            }
        }
    }
}

impl Lease {
    /// What `--exec` is told about the artifact.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "OUTPOST_ARTIFACT".into(),
                self.path.to_string_lossy().into_owned(),
            ),
            ("OUTPOST_ARTIFACT_NAME".into(), self.manifest.name.clone()),
            (
                "OUTPOST_ARTIFACT_VERSION".into(),
                self.manifest.version.clone(),
            ),
            ("OUTPOST_ARTIFACT_DIGEST".into(), self.digest.to_string()),
        ]
    }
}

fn touch(path: &Path) {
    // LRU is by mtime; a file that cannot be touched is merely older.
    if let Ok(f) = std::fs::File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

impl Artifacts {
    /// The artifact dir `dir` (created at the first fetch), holding at most
    /// `budget` bytes of files and chunk cache.
    pub fn new(dir: PathBuf, budget: u64) -> Arc<Self> {
        Arc::new(Artifacts {
            dir,
            budget,
            one_at_a_time: tokio::sync::Mutex::new(()),
            in_use: Mutex::default(),
        })
    }

    /// The artifact dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Most bytes the dir may hold, files and chunk cache
    /// (`--max-artifact-disk`).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Fetch `digest` (or find it verified already) and hold it.
    pub async fn get(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        digest: Digest,
        progress: Option<&tokio::sync::watch::Sender<(u64, u64)>>,
    ) -> Result<Lease, FetchError> {
        let _one = self.one_at_a_time.lock().await;
        std::fs::create_dir_all(&self.dir)?;
        let make_room = |m: &Manifest, need: u64| self.make_room(m, need);
        let opts = FetchOptions {
            progress,
            make_room: Some(&make_room),
        };
        let f = fetch_with(conn, digest, &self.dir, &opts).await?;
        touch(&f.path);
        let cache = self.dir.join("chunks");
        for c in &f.manifest.chunks {
            touch(&cache.join(c.sha256.hex()));
        }
        *self
            .in_use
            .lock()
            .expect("in_use lock")
            .entry(f.path.clone())
            .or_default() += 1;
        Ok(Lease {
            path: f.path,
            manifest: f.manifest,
            digest,
            fetched_bytes: f.fetched_bytes,
            reused_bytes: f.reused_bytes,
            store: self.clone(),
        })
    }

    /// Evict until `need` more bytes fit the budget. Runs under
    /// `one_at_a_time`, so a `.part` or `.tmp` seen here is a leftover of
    /// a killed run and goes first.
    fn make_room(&self, m: &Manifest, need: u64) -> Result<(), FetchError> {
        let keep_chunks: HashSet<String> = m.chunks.iter().map(|c| c.sha256.hex()).collect();
        let target = artifact_path(&self.dir, m);
        let in_use = self.in_use.lock().expect("in_use lock").clone();
        let mut paths = Vec::new();
        let mut entries = Vec::new();
        let mut list = |dir: &Path, chunks: bool| -> std::io::Result<()> {
            for d in std::fs::read_dir(dir)? {
                let d = d?;
                let meta = d.metadata()?;
                if !meta.is_file() {
                    continue;
                }
                let path = d.path();
                let name = d.file_name().to_string_lossy().into_owned();
                if name.ends_with(".part") || name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let protected = if chunks {
                    keep_chunks.contains(&name)
                } else {
                    path == target || in_use.contains_key(&path)
                };
                entries.push(Entry {
                    size: meta.len(),
                    last_use: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    protected,
                });
                paths.push(path);
            }
            Ok(())
        };
        list(&self.dir, false)?;
        list(&self.dir.join("chunks"), true)?;
        match evict::plan(&entries, need, self.budget) {
            Ok(gone) => {
                for i in gone {
                    tracing::info!(path = %paths[i].display(), bytes = entries[i].size, "evicting a least recently used artifact file to make room");
                    std::fs::remove_file(&paths[i])?;
                }
                Ok(())
            }
            Err(s) => Err(FetchError::OverBudget {
                need,
                room: s.room,
                budget: self.budget,
            }),
        }
    }
}

/// How a fetch that failed ends its command: `None` for a lost link (no
/// ack: the box delivers it again after the reconnect and the fetch
/// resumes from the chunk cache).
pub fn failed(e: &FetchError, digest: Digest, store: &Artifacts) -> Option<Outcome> {
    let dir = store.dir().display();
    match e {
        FetchError::Link(_) => None,
        FetchError::NoSpace { need, have } => Some(Outcome::Rejected {
            reason: format!(
                "no room on the device for artifact {digest}: it needs {need} bytes and {have} are free in {dir}; free space there (or point --artifact-dir at a larger disk) and send it again"
            ),
        }),
        FetchError::OverBudget { need, room, budget } => Some(Outcome::Rejected {
            reason: format!(
                "artifact {digest} needs {need} bytes on the device but at most {room} of its {budget}-byte budget can be made free (files in use stay); raise --max-artifact-disk on the device and send it again"
            ),
        }),
        // The box will not serve it: sending again will not help.
        FetchError::Refused {
            code: code @ (ErrorCode::Forbidden | ErrorCode::NotFound),
            message,
        } => Some(Outcome::Rejected {
            reason: format!("the box refused to serve artifact {digest}: {code}: {message}"),
        }),
        FetchError::Refused { code, message } => Some(Outcome::Failed {
            code: -1,
            message: format!("the box could not serve artifact {digest}: {code}: {message}"),
        }),
        // A retry (a new attempt) may get good bytes; the file was never
        // handed to the handler.
        FetchError::Corrupt(why) => Some(Outcome::Failed {
            code: -1,
            message: format!("artifact {digest} failed verification on the device: {why}; it did not run"),
        }),
        // The disk filled up under the fetch (something else wrote): as
        // above, nothing will change until someone frees space.
        FetchError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => Some(Outcome::Rejected {
            reason: format!(
                "the disk holding {dir} filled up while artifact {digest} was fetched: {io}; free space there (the chunks fetched so far are kept) and send it again"
            ),
        }),
        FetchError::Io(io) => Some(Outcome::Failed {
            code: -1,
            message: format!("cannot store artifact {digest} in {dir}: {io}"),
        }),
    }
}

/// Send the latest progress of a fetch to the box, at most once per
/// [`PROGRESS_EVERY`], and once more when `stop` resolves (its sender is
/// dropped at the end of the fetch). Only runs while a fetch does; never
/// interrupted inside a write, so the control stream stays framed.
pub async fn forward_progress(
    mut rx: tokio::sync::watch::Receiver<(u64, u64)>,
    sender: Sender,
    id: CommandId,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut sent = None;
    loop {
        let stopped = tokio::select! {
            r = rx.changed() => r.is_err(),
            _ = &mut stop => true,
        };
        let (bytes, total) = *rx.borrow_and_update();
        if sent != Some((bytes, total)) && total > 0 {
            if sender
                .send(&DeviceFrame::Progress { id, bytes, total })
                .await
                .is_err()
            {
                return;
            }
            sent = Some((bytes, total));
        }
        if stopped {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
            _ = &mut stop => {
                let last = *rx.borrow();
                if sent != Some(last) && last.1 > 0 {
                    let (bytes, total) = last;
                    let _ = sender.send(&DeviceFrame::Progress { id, bytes, total }).await;
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::artifact::manifest::ChunkRef;

    fn manifest(name: &str, chunks: &[&[u8]]) -> Manifest {
        Manifest {
            format: 1,
            name: name.into(),
            version: "1".into(),
            size: chunks.iter().map(|c| c.len() as u64).sum(),
            sha256: Digest([0; 32]),
            chunks: chunks
                .iter()
                .map(|c| ChunkRef {
                    sha256: Digest::of(c),
                    len: c.len() as u32,
                })
                .collect(),
        }
    }

    fn put(path: &Path, bytes: usize, age_s: u64) {
        std::fs::write(path, vec![1u8; bytes]).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
    }

    #[test]
    fn a_failed_fetch_rejects_what_a_retry_cannot_fix_and_fails_what_it_may() {
        use crate::proto::ErrorCode;
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path().to_path_buf(), 1000);
        let d = Digest([7; 32]);
        let refused = |code| FetchError::Refused {
            code,
            message: "m".into(),
        };
        let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
        // (error, rejected: no retry will help, a phrase the operator reads)
        let cases = [
            (
                FetchError::NoSpace { need: 9, have: 1 },
                true,
                "free space there",
            ),
            (
                FetchError::OverBudget {
                    need: 9,
                    room: 1,
                    budget: 5,
                },
                true,
                "raise --max-artifact-disk",
            ),
            (refused(ErrorCode::Forbidden), true, "refused to serve"),
            (refused(ErrorCode::NotFound), true, "refused to serve"),
            (refused(ErrorCode::Internal), false, "could not serve"),
            (
                FetchError::Corrupt("bad chunk".into()),
                false,
                "it did not run",
            ),
            (FetchError::Io(full), true, "chunks fetched so far are kept"),
            (
                FetchError::Io(std::io::Error::other("EIO")),
                false,
                "cannot store artifact",
            ),
        ];
        for (e, rejected, says) in cases {
            let text = match failed(&e, d, &store) {
                Some(Outcome::Rejected { reason }) if rejected => reason,
                Some(Outcome::Failed { message, .. }) if !rejected => message,
                other => panic!("{e}: {other:?}"),
            };
            assert!(
                text.contains(says) && text.contains(&d.to_string()),
                "{e}: {text}"
            );
        }
        // A lost link ends nothing: the box delivers the command again and
        // the fetch resumes.
        assert_eq!(failed(&FetchError::Link("gone".into()), d, &store), None);
    }

    #[test]
    fn make_room_evicts_the_oldest_spares_leases_and_own_chunks_and_drops_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path().to_path_buf(), 10_000);
        let cache = dir.path().join("chunks");
        std::fs::create_dir_all(&cache).unwrap();
        let own: &[u8] = b"a chunk of the artifact being fetched";
        put(&cache.join(Digest::of(own).hex()), 2_000, 500);
        put(&cache.join("ff".repeat(32)), 2_000, 400);
        put(&dir.path().join("old-1"), 2_000, 300);
        put(&dir.path().join("used-1"), 2_000, 600);
        put(&dir.path().join("new-1"), 1_000, 10);
        put(&dir.path().join("x-1.part"), 500, 1);
        put(&cache.join("ab.tmp"), 500, 1);
        store
            .in_use
            .lock()
            .unwrap()
            .insert(dir.path().join("used-1"), 1);
        // 9,000 kept + 3,000 new in 10,000: 2,000 must go, then the next
        // oldest unprotected (the stranger chunk, 400 s) is enough.
        store.make_room(&manifest("fw", &[own]), 3_000).unwrap();
        let left = |p: &Path| p.exists();
        assert!(
            !left(&cache.join("ff".repeat(32))),
            "the oldest free one went"
        );
        assert!(left(&dir.path().join("old-1")), "only as much as needed");
        assert!(left(&cache.join(Digest::of(own).hex())), "own chunk kept");
        assert!(left(&dir.path().join("used-1")), "leased file kept");
        assert!(!left(&dir.path().join("x-1.part")) && !left(&cache.join("ab.tmp")));
        // More than can ever be freed: refused, with the room there is.
        let e = store.make_room(&manifest("fw", &[own]), 9_000).unwrap_err();
        match e {
            FetchError::OverBudget { need, room, budget } => {
                assert_eq!((need, room, budget), (9_000, 6_000, 10_000))
            }
            other => panic!("{other}"),
        }
    }
}

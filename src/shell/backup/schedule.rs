//! Scheduled backups (`serve --backup-every D --backup-dir DIR
//! --backup-keep N`): a timer in the box that takes a backup into DIR,
//! keeps the newest N, and never fills the disk — a backup is skipped
//! (and says so in `status`) unless the disk holding DIR keeps the
//! free-space reserve after it.
//!
//! Files are `outpost-<ms since the epoch, 13 digits>.backup`, so their
//! names sort by age and rotation needs no header read. The newest one
//! found at start sets the first due time (a restart does not take one
//! at once, nor wait a whole period again).

use super::BackupError;
use crate::shell::queue::QueueHandle;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often, where, how many.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The period between backups (`--backup-every`, at least 1s).
    pub every: Duration,
    /// Where the backups go (`--backup-dir`), created mode 0700 if absent;
    /// best on another disk than the data dir.
    pub dir: PathBuf,
    /// Backups kept (at least 1).
    pub keep: usize,
}

/// The backups kept when `--backup-keep` is not given.
pub const DEFAULT_KEEP: usize = 3;
/// How soon a failed or skipped backup is tried again (or the period, if
/// shorter).
const RETRY: Duration = Duration::from_secs(300);

/// What `status` shows of the scheduled backups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBackup {
    /// Where they go.
    pub dir: String,
    /// The newest backup there: when it was taken (ms since the epoch),
    /// its file, its bytes.
    pub at: Option<u64>,
    /// The newest backup's path; None when `dir` holds none.
    pub file: Option<String>,
    /// The newest backup's file size in bytes (0 when there is none).
    pub bytes: u64,
    /// Why the last attempt failed or was skipped, and when; cleared by
    /// the next that works.
    pub error: Option<String>,
    /// When that attempt ended (ms since the epoch); None with `error`.
    pub error_at: Option<u64>,
}

/// Shared between the timer and `status`.
pub type Board = Arc<Mutex<LastBackup>>;

const PREFIX: &str = "outpost-";
const SUFFIX: &str = ".backup";

/// The backups in `dir`, oldest first, with the time in their name.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ms = name
                .strip_prefix(PREFIX)?
                .strip_suffix(SUFFIX)?
                .parse()
                .ok()?;
            Some((ms, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The board as the backups in `dir` say.
fn board_of(dir: &Path) -> LastBackup {
    let newest = list(dir).pop();
    LastBackup {
        dir: dir.display().to_string(),
        at: newest.as_ref().map(|(ms, _)| *ms),
        bytes: newest
            .as_ref()
            .and_then(|(_, p)| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len()),
        file: newest.map(|(_, p)| p.display().to_string()),
        error: None,
        error_at: None,
    }
}

/// Remove the oldest backups beyond `keep` (never the newest); returns how
/// many went.
pub fn prune(dir: &Path, keep: usize) -> usize {
    let all = list(dir);
    let extra = all.len().saturating_sub(keep.max(1));
    let mut n = 0;
    for (_, p) in all.into_iter().take(extra) {
        match std::fs::remove_file(&p) {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!("removing the old backup {}: {e}", p.display()),
        }
    }
    n
}

/// When the next backup is due, from the newest one's time.
pub fn due_in(newest: Option<u64>, every: Duration, now: u64) -> Duration {
    match newest {
        None => Duration::ZERO,
        Some(at) => {
            let due = at.saturating_add(every.as_millis() as u64);
            Duration::from_millis(due.saturating_sub(now))
        }
    }
}

/// Why a scheduled backup was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SkipError {
    /// The disk holding the dir would keep less than the reserve after the
    /// backup, even with the old backups beyond the newest removed.
    #[error("skipped: {dir} has {free} bytes free, and a backup of about {need} bytes would leave less than the reserve ({reserve} bytes); free space there, lower --backup-keep, or point --backup-dir at a larger disk")]
    NoRoom {
        /// The backup dir.
        dir: String,
        /// Bytes free on its disk.
        free: u64,
        /// The estimate of the backup's bytes: the database and the chunks
        /// (or the last backup's size, if larger), plus 1 MiB.
        need: u64,
        /// Bytes the disk must keep free after it.
        reserve: u64,
    },
    /// The backup was tried and failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
}

/// One scheduled backup: room checked (making room from the oldest if the
/// dir already holds `keep`), taken, the oldest beyond `keep` removed.
pub fn run_once(
    queue: &QueueHandle,
    data_dir: &Path,
    config: Option<&Path>,
    s: &Schedule,
    reserve: u64,
) -> Result<(PathBuf, super::Header), SkipError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&s.dir)
        .map_err(|source| BackupError::Io {
            path: s.dir.clone(),
            source,
        })?;
    // The backup's size is about the live data's: the database (an
    // overestimate, sled keeps slack) and the chunks, plus the last
    // backup's size if that is larger.
    let last = list(&s.dir)
        .last()
        .and_then(|(_, p)| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let need = (crate::shell::store::dir_size(&data_dir.join(crate::shell::store::DB_DIR))
        + crate::shell::store::dir_size(&data_dir.join(crate::shell::artifact::chunks::DIR)))
    .max(last)
        + 1024 * 1024;
    let room = || {
        crate::disk::fs_space(&s.dir)
            .map(|(_, free)| free)
            .unwrap_or(0)
    };
    let mut free = room();
    // Full with old backups: the oldest makes room for the new one, but
    // the newest is never removed before its successor is written.
    while free < need.saturating_add(reserve) && list(&s.dir).len() >= s.keep.max(2) {
        let before = list(&s.dir).len();
        prune(&s.dir, before - 1);
        if list(&s.dir).len() == before {
            break;
        }
        free = room();
    }
    if free < need.saturating_add(reserve) {
        return Err(SkipError::NoRoom {
            dir: s.dir.display().to_string(),
            free,
            need,
            reserve,
        });
    }
    let out = s
        .dir
        .join(format!("{PREFIX}{:013}{SUFFIX}", crate::now_millis()));
    let header = super::take(queue, data_dir, config, &out, None)?;
    prune(&s.dir, s.keep);
    Ok((out, header))
}

/// The timer: a backup whenever one is due, until the queue shuts down.
pub fn start(
    queue: QueueHandle,
    data_dir: PathBuf,
    config: Option<PathBuf>,
    s: Schedule,
    reserve: u64,
) -> (Board, tokio::task::JoinHandle<()>) {
    let board: Board = Arc::new(Mutex::new(board_of(&s.dir)));
    let b = board.clone();
    let task = tokio::spawn(async move {
        let mut wait = due_in(
            b.lock().map(|l| l.at).unwrap_or(None),
            s.every,
            crate::now_millis(),
        );
        loop {
            tokio::time::sleep(wait).await;
            let (q, d, c, sc) = (queue.clone(), data_dir.clone(), config.clone(), s.clone());
            let r =
                tokio::task::spawn_blocking(move || run_once(&q, &d, c.as_deref(), &sc, reserve))
                    .await;
            let now = crate::now_millis();
            let mut l = b.lock().unwrap_or_else(|e| e.into_inner());
            match r {
                Ok(Ok((path, h))) => {
                    tracing::info!(
                        file = %path.display(),
                        last_group = h.last_group,
                        bytes = h.body_bytes,
                        "scheduled backup written"
                    );
                    *l = board_of(&s.dir);
                    wait = s.every;
                }
                Ok(Err(SkipError::Backup(BackupError::ShuttingDown))) => return,
                Ok(Err(e)) => {
                    tracing::warn!("scheduled backup: {e}");
                    l.error = Some(e.to_string());
                    l.error_at = Some(now);
                    wait = s.every.min(RETRY);
                }
                Err(e) => {
                    l.error = Some(format!("the backup task failed: {e}"));
                    l.error_at = Some(now);
                    wait = s.every.min(RETRY);
                }
            }
        }
    });
    (board, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_newest_and_ignores_other_files() {
        let d = tempfile::tempdir().unwrap();
        for ms in [3u64, 1, 2, 5, 4] {
            std::fs::write(d.path().join(format!("outpost-{ms:013}.backup")), b"x").unwrap();
        }
        std::fs::write(d.path().join("notes.txt"), b"keep me").unwrap();
        std::fs::write(d.path().join("outpost-x.backup"), b"not ours").unwrap();
        assert_eq!(prune(d.path(), 2), 3);
        let left: Vec<u64> = list(d.path()).into_iter().map(|(ms, _)| ms).collect();
        assert_eq!(left, vec![4, 5]);
        assert!(d.path().join("notes.txt").exists());
        assert!(d.path().join("outpost-x.backup").exists());
        // Never below one.
        assert_eq!(prune(d.path(), 0), 1);
        assert_eq!(list(d.path()).len(), 1);
    }

    /// A run against a real queue: each writes a backup that reads back,
    /// the dir keeps the newest `keep`; a run without room makes room from
    /// the oldest, never removes the newest, and says what it lacked.
    #[test]
    fn a_run_keeps_the_newest_n_and_a_run_without_room_says_what_it_lacks() {
        let data = tempfile::tempdir().unwrap();
        let store = crate::shell::store::Store::open(
            data.path(),
            &crate::shell::store::StoreOptions::default(),
        )
        .unwrap();
        let q = crate::shell::queue::open(store, crate::shell::queue::ServiceOptions::default())
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut rec = crate::shell::store::DeviceRecord::new("d1");
        rec.tags.push("t".into());
        rt.block_on(q.enroll(rec)).unwrap();
        rt.block_on(q.send(crate::shell::queue::SendRequest {
            target: "d1".into(),
            payload: b"x".to_vec(),
            opts: crate::SendOptions::default(),
            origin: "cli".into(),
            signature: None,
        }))
        .unwrap();
        let s = Schedule {
            every: Duration::from_secs(3600),
            dir: data.path().join("backups"),
            keep: 2,
        };
        let mut written = Vec::new();
        for _ in 0..3 {
            let (path, header) = run_once(&q, data.path(), None, &s, 0).unwrap();
            assert!(header.body_bytes > 0, "{header:?}");
            written.push(path);
            // Names carry the millisecond: one per run.
            std::thread::sleep(Duration::from_millis(3));
        }
        let kept: Vec<PathBuf> = list(&s.dir).into_iter().map(|(_, p)| p).collect();
        assert_eq!(kept, written[1..], "the newest two");
        // The newest holds the queued command's group.
        let checked = super::super::verify(&kept[1]).unwrap();
        assert!(checked.last_group > 0, "{checked:?}");

        let e = run_once(&q, data.path(), None, &s, u64::MAX / 4).unwrap_err();
        let SkipError::NoRoom { dir, need, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(dir, &s.dir.display().to_string());
        assert!(*need > 1024 * 1024, "{need}");
        assert!(e.to_string().contains("--backup-dir"), "{e}");
        let left: Vec<PathBuf> = list(&s.dir).into_iter().map(|(_, p)| p).collect();
        assert_eq!(left, written[2..], "the newest stays, the oldest made room");
        assert_eq!(
            board_of(&s.dir)
                .file
                .as_deref()
                .map(Path::new)
                .and_then(Path::file_name),
            written[2].file_name()
        );
    }

    #[test]
    fn the_first_backup_is_due_a_period_after_the_newest_found() {
        let h = Duration::from_secs(3600);
        assert_eq!(due_in(None, h, 10_000), Duration::ZERO);
        assert_eq!(due_in(Some(10_000), h, 10_000), h);
        assert_eq!(
            due_in(Some(10_000), h, 10_000 + 600_000),
            Duration::from_secs(3000)
        );
        assert_eq!(due_in(Some(0), h, 10_000_000), Duration::ZERO);
    }
}

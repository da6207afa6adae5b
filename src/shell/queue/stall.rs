//! The writer's stall watch: a way out of a flush that never returns.
//!
//! sled 0.34 can wait for ever in `flush` once a write of its log failed
//! for want of space: the failure is recorded, but a flush that began
//! waiting just before is sometimes never woken (seen in CI as a box that
//! neither answered nor exited on a full tmpfs). Every request then waits
//! on the writer, and the box is dead without saying so. Nothing the writer
//! has not flushed was answered "accepted", so ending the process loses
//! nothing acknowledged, and under systemd (`exit_on_store_failure`) a
//! fresh process reopens the database, as after any failed write.
//!
//! The writer marks each commit (two relaxed stores); a thread looks every
//! [`PERIOD`] and acts only when the same commit is still under way at two
//! looks in a row *and* the disk is (nearly) full, so a slow card that is
//! not full is only reported, never killed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// How often the watch looks; a commit stuck across two looks has taken
/// at least this long.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Free space under which a stuck commit is taken for sled's stall.
const NEARLY_FULL: u64 = 8 << 20;

/// What the writer marks: which commit is under way, if any.
#[derive(Default)]
pub struct Mark {
    commits: AtomicU64,
    busy: AtomicBool,
    closed: AtomicBool,
}

impl Mark {
    pub fn begin(&self) {
        self.commits.fetch_add(1, Relaxed);
        self.busy.store(true, Relaxed);
    }

    pub fn end(&self) {
        self.busy.store(false, Relaxed);
    }

    /// The commit under way, if one is.
    fn under_way(&self) -> Option<u64> {
        self.busy.load(Relaxed).then(|| self.commits.load(Relaxed))
    }
}

/// The watch's thread; stopped when dropped (the writer closing).
pub struct Watch {
    mark: Arc<Mark>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Watch the writer's commits on the store in `dir`; on sled's stall,
    /// exit the process with `code`.
    pub fn exit_on_stall(
        mark: Arc<Mark>,
        dir: PathBuf,
        reserve: u64,
        code: i32,
    ) -> std::io::Result<Watch> {
        let shown = dir.display().to_string();
        let free = move || crate::disk::fs_space(&dir).ok().map(|(_, free)| free);
        Watch::start(mark, PERIOD, reserve, free, move |free| {
            tracing::error!(
                dir = %shown, free,
                "a store commit has not returned for over {}s with the disk full: sled stalls so after a failed write; exiting with code {code} to be restarted",
                PERIOD.as_secs()
            );
            eprintln!(
                "outpost: a store commit has not returned for over {}s and the disk holding {shown} has {free} bytes free: the store stalled after a write failed for want of space; exiting with code {code} to be restarted (nothing acknowledged is lost); free space there",
                PERIOD.as_secs(),
            );
            std::process::exit(code);
        })
    }

    /// Look every `period`; call `on_stall` (once) with the free bytes when
    /// one commit is under way at two looks in a row on a full disk.
    fn start(
        mark: Arc<Mark>,
        period: Duration,
        reserve: u64,
        free: impl Fn() -> Option<u64> + Send + 'static,
        on_stall: impl FnOnce(u64) + Send + 'static,
    ) -> std::io::Result<Watch> {
        let m = mark.clone();
        let thread = std::thread::Builder::new()
            .name("outpost-stallwatch".into())
            .spawn(move || {
                let mut seen = None;
                let mut warned = None;
                loop {
                    std::thread::park_timeout(period);
                    if m.closed.load(Relaxed) {
                        return;
                    }
                    let now = m.under_way();
                    if now.is_none() || now != seen {
                        seen = now;
                        continue;
                    }
                    match verdict(free(), reserve) {
                        Verdict::Stalled(free) => return on_stall(free),
                        Verdict::Slow if warned != now => {
                            warned = now;
                            tracing::warn!(
                                "a store commit has taken over {}s; the disk is slow or failing (requests wait for it)",
                                period.as_secs_f32()
                            );
                        }
                        Verdict::Slow => {}
                    }
                }
            })?;
        Ok(Watch {
            mark,
            thread: Some(thread),
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.mark.closed.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Stuck on a full disk: sled's stall.
    Stalled(u64),
    /// Stuck with room to spare: a slow disk, only reported.
    Slow,
}

fn verdict(free: Option<u64>, reserve: u64) -> Verdict {
    match free {
        Some(f) if f < NEARLY_FULL.max(reserve) => Verdict::Stalled(f),
        _ => Verdict::Slow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_commit_stuck_on_a_full_disk_is_a_stall() {
        assert_eq!(verdict(Some(1 << 20), 0), Verdict::Stalled(1 << 20));
        assert_eq!(verdict(Some(1 << 30), 0), Verdict::Slow);
        // Under the box's own reserve counts as full.
        assert_eq!(
            verdict(Some(100 << 20), 200 << 20),
            Verdict::Stalled(100 << 20)
        );
        // Free space unknown: never a reason to stop the box.
        assert_eq!(verdict(None, 0), Verdict::Slow);
    }

    fn watch(free: u64, stuck: bool) -> (Watch, std::sync::mpsc::Receiver<u64>) {
        let mark = Arc::new(Mark::default());
        mark.begin();
        if !stuck {
            mark.end();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let w = Watch::start(
            mark,
            Duration::from_millis(10),
            0,
            move || Some(free),
            move |f| {
                let _ = tx.send(f);
            },
        )
        .unwrap();
        (w, rx)
    }

    #[test]
    fn a_commit_stuck_on_a_full_disk_is_acted_on_and_others_are_not() {
        let (_w, rx) = watch(4096, true);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(4096));
        // Stuck with room to spare (a slow card), or full but not stuck:
        // the box goes on. Bounded: well over two periods.
        for (free, stuck) in [(1 << 30, true), (4096, false)] {
            let (w, rx) = watch(free, stuck);
            assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
            drop(w); // and the thread stops with it
        }
    }

    #[test]
    fn the_mark_names_the_commit_under_way() {
        let m = Mark::default();
        assert_eq!(m.under_way(), None);
        m.begin();
        let first = m.under_way();
        assert!(first.is_some());
        m.end();
        m.begin();
        assert_ne!(m.under_way(), first, "a new commit is another one");
        m.end();
        assert_eq!(m.under_way(), None);
    }
}

//! The bookkeeping the simulation keeps for every job a box's runner holds
//! (a rollout, a workflow run), shared by `sim/rollouts.rs` and
//! `sim/workflows.rs`: the job as the runner holds it and as the store
//! does, what a crash, a flush and a wipe do to it, and which jobs the
//! per-step loops look at.

use super::record::Record;
use crate::engine::command::{CommandId, Millis};
use crate::engine::queue::LifecycleEvent;
use rustc_hash::FxHashMap;
use std::ops::{Index, IndexMut};

/// What the bookkeeping needs to know of a job.
pub(super) trait Kept: Clone {
    /// When it ended, if it has.
    fn finished_at(&self) -> Option<Millis>;
}

impl Kept for crate::engine::rollout::Rollout {
    fn finished_at(&self) -> Option<Millis> {
        self.finished_at
    }
}

impl Kept for crate::engine::workflow::Run {
    fn finished_at(&self) -> Option<Millis> {
        self.finished_at
    }
}

/// One job on one box; `X` is what one kind of job keeps besides.
pub(super) struct Job<T, X = ()> {
    pub(super) node: usize,
    pub(super) live: T,
    /// Its record in the box's store.
    pub(super) record: Record<T>,
    /// Its box crashed: the runner reloads it at the restart.
    pub(super) resume: bool,
    /// Sends the box could not answer, to make again (the runner's
    /// `jobs::Retry`; lost in a crash, as the runner's is).
    pub(super) retry: Vec<String>,
    /// Gone with its box's database (a wipe), or its start was never
    /// durable.
    pub(super) gone: bool,
    /// Ended with nothing outstanding and its record durable: off the
    /// per-step loops until something of it moves again, so a step costs
    /// the same however long the run.
    pub(super) retired: bool,
    pub(super) extra: X,
}

impl<T: Kept, X> Job<T, X> {
    /// A job just started on box `node`, its record not written yet.
    pub(super) fn new(node: usize, live: T, extra: X) -> Self {
        Job {
            node,
            live,
            record: Record::new(),
            resume: false,
            retry: Vec::new(),
            gone: false,
            retired: false,
            extra,
        }
    }
}

/// Every job of one kind, in start order (an index names one for good).
pub(super) struct Jobs<T, X = ()> {
    all: Vec<Job<T, X>>,
    /// The jobs the per-step loops look at (not retired).
    pub(super) active: Vec<usize>,
    /// The commands jobs sent: the job that sent each.
    pub(super) owned: FxHashMap<CommandId, usize>,
    /// Lifecycle events of their commands, for their runner: (box, event).
    pub(super) events: Vec<(usize, LifecycleEvent)>,
}

impl<T, X> Default for Jobs<T, X> {
    fn default() -> Self {
        Jobs {
            all: Vec::new(),
            active: Vec::new(),
            owned: FxHashMap::default(),
            events: Vec::new(),
        }
    }
}

impl<T: Kept, X> Jobs<T, X> {
    /// Start tracking `job`, active: its index.
    pub(super) fn push(&mut self, job: Job<T, X>) -> usize {
        self.all.push(job);
        let i = self.all.len() - 1;
        self.active.push(i);
        i
    }

    pub(super) fn len(&self) -> usize {
        self.all.len()
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, Job<T, X>> {
        self.all.iter()
    }

    /// The active jobs on box `n` that are still there.
    pub(super) fn active_on(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        self.active
            .iter()
            .copied()
            .filter(move |&i| self.all[i].node == n && !self.all[i].gone)
    }

    /// Job `i` moves again: back on the per-step loops if it was retired.
    pub(super) fn wake(&mut self, i: usize) {
        if std::mem::take(&mut self.all[i].retired) {
            self.active.push(i);
        }
    }

    /// Retire every active job that is `done`.
    pub(super) fn retire(&mut self, done: impl Fn(&Job<T, X>) -> bool) {
        let all = &mut self.all;
        self.active.retain(|&i| {
            let j = &mut all[i];
            j.retired = done(j);
            !j.retired
        });
    }

    /// Box `n` flushed: what its runner wrote before is durable.
    pub(super) fn flushed(&mut self, n: usize) {
        for &i in &self.active {
            if self.all[i].node == n {
                self.all[i].record.flushed();
            }
        }
    }

    /// Box `n` crashed: its runner is gone; what comes back is each job's
    /// last durable record (none: its start never returned, and nothing of
    /// it is left), `reloaded` called on each. A retired job whose end is
    /// within the results' retention (`keep`) is reloaded too (the runner
    /// keeps it that long), so a command it cancelled is looked up again.
    pub(super) fn crashed(
        &mut self,
        n: usize,
        now: Millis,
        keep: Millis,
        mut reloaded: impl FnMut(&mut Job<T, X>),
    ) {
        self.events.retain(|(m, _)| *m != n);
        for i in 0..self.all.len() {
            let j = &mut self.all[i];
            if j.node != n || j.gone {
                continue;
            }
            if j.retired {
                if j.live
                    .finished_at()
                    .is_some_and(|t| t.saturating_add(keep) < now)
                {
                    continue;
                }
                j.retired = false;
                self.active.push(i);
            }
            let j = &mut self.all[i];
            match j.record.crashed() {
                Some(d) => {
                    j.live = d;
                    j.resume = true;
                    j.retry.clear();
                    reloaded(j);
                }
                None => j.gone = true,
            }
        }
    }

    /// Box `n`'s database was wiped: its jobs went with it. Each is passed
    /// to `count` first, as the end checks will not see it.
    pub(super) fn wiped(&mut self, n: usize, mut count: impl FnMut(&T)) {
        self.events.retain(|(m, _)| *m != n);
        for j in self.all.iter_mut().filter(|j| j.node == n && !j.gone) {
            count(&j.live);
            j.gone = true;
        }
    }
}

impl<T, X> Index<usize> for Jobs<T, X> {
    type Output = Job<T, X>;
    fn index(&self, i: usize) -> &Job<T, X> {
        &self.all[i]
    }
}

impl<T, X> IndexMut<usize> for Jobs<T, X> {
    fn index_mut(&mut self, i: usize) -> &mut Job<T, X> {
        &mut self.all[i]
    }
}

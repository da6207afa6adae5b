//! A runner's record of one job (a rollout, a workflow run) as its box's
//! store holds it: the runners write it unflushed, so it is durable at the
//! box's next flush (an operator's request flushes it before answering),
//! and a crash brings back the last durable one. Kept for each job in
//! `sim/job.rs`.

#[derive(Debug)]
pub(super) struct Record<T> {
    /// What the store holds for good (`None`: never flushed).
    durable: Option<T>,
    /// Written, not flushed yet.
    pending: Option<T>,
}

impl<T: Clone> Record<T> {
    pub(super) fn new() -> Self {
        Record {
            durable: None,
            pending: None,
        }
    }

    /// Written: durable at the next flush, or now (`flushed`).
    pub(super) fn write(&mut self, v: &T, flushed: bool) {
        if flushed {
            self.durable = Some(v.clone());
            self.pending = None;
        } else {
            self.pending = Some(v.clone());
        }
    }

    /// The box flushed.
    pub(super) fn flushed(&mut self) {
        if let Some(p) = self.pending.take() {
            self.durable = Some(p);
        }
    }

    /// The box crashed: what comes back (`None`: nothing was ever durable).
    pub(super) fn crashed(&mut self) -> Option<T> {
        self.pending = None;
        self.durable.clone()
    }

    /// Nothing written waits for a flush.
    pub(super) fn settled(&self) -> bool {
        self.pending.is_none()
    }

    /// It was durable at some point.
    pub(super) fn ever_durable(&self) -> bool {
        self.durable.is_some()
    }
}

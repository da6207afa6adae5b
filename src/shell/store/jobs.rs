//! The job runners' records (workflow runs, rollouts): each kept whole,
//! as the runner encodes it, under its kind and id in the `meta` tree.

use super::*;

impl Store {
    /// Insert or replace workflow runs' records (their JSON) in one batch;
    /// flushed now if `durable`, else by the queue's next group commit
    /// (sled flushes the whole db).
    pub fn put_workflows(
        &self,
        records: &[(crate::CommandId, Vec<u8>)],
        durable: bool,
    ) -> Result<(), StoreError> {
        self.put_runs(b'W', records, durable)
    }

    /// Delete finished workflow runs' records (retention). Not flushed: a
    /// crash before the next flush only brings back runs to prune again.
    pub fn delete_workflows(&self, ids: &[crate::CommandId]) -> Result<(), StoreError> {
        self.delete_runs(b'W', ids)
    }

    /// Every workflow run's record.
    pub fn workflows(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.runs(b'W')
    }

    /// Rollouts' records, as [`put_workflows`](Self::put_workflows).
    pub fn put_rollouts(
        &self,
        records: &[(crate::CommandId, Vec<u8>)],
        durable: bool,
    ) -> Result<(), StoreError> {
        self.put_runs(b'R', records, durable)
    }

    /// Delete ended rollouts' records (retention), not flushed.
    pub fn delete_rollouts(&self, ids: &[crate::CommandId]) -> Result<(), StoreError> {
        self.delete_runs(b'R', ids)
    }

    /// Every rollout's record.
    pub fn rollouts(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.runs(b'R')
    }

    /// Runs (workflows `W`, rollouts `R`) live in the meta tree under their
    /// kind's byte and their id.
    fn run_key(kind: u8, id: crate::CommandId) -> Vec<u8> {
        let mut k = vec![kind];
        k.extend_from_slice(&id.0.to_be_bytes());
        k
    }

    fn put_runs(
        &self,
        kind: u8,
        records: &[(crate::CommandId, Vec<u8>)],
        durable: bool,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (id, rec) in records {
            batch.insert(Self::run_key(kind, *id), rec.as_slice());
        }
        self.meta.apply_batch(batch).map_err(|e| self.err(e))?;
        if durable {
            self.db.flush().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn delete_runs(&self, kind: u8, ids: &[crate::CommandId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(Self::run_key(kind, *id));
        }
        self.meta.apply_batch(batch).map_err(|e| self.err(e))
    }

    fn runs(&self, kind: u8) -> Result<Vec<Vec<u8>>, StoreError> {
        self.meta
            .scan_prefix([kind])
            .values()
            .map(|v| v.map(|v| v.to_vec()).map_err(|e| self.err(e)))
            .collect()
    }
}

//! The store as a backup reads it (every tree, as of one round) and as a
//! restore writes it back (`Import`, into an empty data dir).

use super::*;

impl Store {
    /// Every tree, key and value, in key order within a tree (backup). The
    /// caller keeps the writer from committing meanwhile: sled's iterators
    /// are no snapshot, so this is consistent only while nothing writes.
    /// `each` sees a tree's start, then each of its pairs; its error stops
    /// the walk and is handed back.
    pub fn export<E: From<StoreError>>(
        &self,
        mut each: impl FnMut(Exported<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut names = self.db.tree_names();
        names.sort();
        for name in names {
            let t = self.db.open_tree(&name).map_err(|e| self.err(e))?;
            each(Exported::Tree(&name))?;
            for r in t.iter() {
                let (k, v) = r.map_err(|e| self.err(e))?;
                each(Exported::Pair(&k, &v))?;
            }
        }
        Ok(())
    }
}

/// What `Store::export` walks.
pub enum Exported<'a> {
    /// The pairs that follow are this tree's.
    Tree(&'a [u8]),
    /// One key and value of the tree named last.
    Pair(&'a [u8], &'a [u8]),
}

/// A new database filled from a backup (`restore`): trees and pairs as
/// `Store::export` walked them, written in small batches (large sled
/// batches cost memory out of all proportion), flushed at `finish`.
pub struct Import {
    dir: PathBuf,
    db: sled::Db,
    tree: Option<sled::Tree>,
    batch: sled::Batch,
    batched: usize,
}

/// Pairs per batch while importing.
const IMPORT_BATCH: usize = 256;

impl Import {
    /// Create the database under `dir/db`; refused if one is there.
    pub fn create(dir: &Path, opts: &StoreOptions) -> Result<Import, StoreError> {
        opts.check()?;
        let path = dir.join(DB_DIR);
        if path.exists() {
            return Err(StoreError::BadOptions(format!(
                "{} exists already: a restore writes only into a new database",
                path.display()
            )));
        }
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(opts.cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|e| map_open_error(dir, e))?;
        Ok(Import {
            dir: dir.to_path_buf(),
            db,
            tree: None,
            batch: Default::default(),
            batched: 0,
        })
    }

    fn apply(&mut self) -> Result<(), StoreError> {
        if let Some(t) = &self.tree {
            t.apply_batch(std::mem::take(&mut self.batch))
                .map_err(|e| map_err(&self.dir, e))?;
        }
        self.batched = 0;
        Ok(())
    }

    /// The pairs that follow belong to this tree.
    pub fn tree(&mut self, name: &[u8]) -> Result<(), StoreError> {
        self.apply()?;
        self.tree = Some(self.db.open_tree(name).map_err(|e| map_err(&self.dir, e))?);
        Ok(())
    }

    /// One pair of the current tree.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if self.tree.is_none() {
            return Err(StoreError::BadOptions(
                "a backup record names a key before any tree".into(),
            ));
        }
        self.batch.insert(key, value);
        self.batched += 1;
        if self.batched >= IMPORT_BATCH {
            self.apply()?;
        }
        Ok(())
    }

    /// Write what is left and flush: the database is then whole on disk.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.apply()?;
        self.db.flush().map_err(|e| map_err(&self.dir, e))?;
        Ok(())
    }
}

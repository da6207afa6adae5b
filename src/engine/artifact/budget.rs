//! How much disk the box's artifacts may take (engine: numbers in,
//! verdict out).
//!
//! Two budgets bound the chunk store: its own (`--max-artifact-disk`),
//! and the box's whole one (`--max-disk`), which the queue's database
//! shares with it. A chunk that would cross either is refused before a
//! byte is written, so an operator adding a large file meets a clear
//! refusal instead of a box that can no longer take commands.

/// The budgets in force (`None`: unbounded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// `--max-artifact-disk`: bytes of chunks.
    pub artifacts: Option<u64>,
    /// `--max-disk`: bytes of chunks plus the queue's database.
    pub total: Option<u64>,
}

/// Which budget a chunk would cross, and by how much.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum OverBudget {
    /// `--max-artifact-disk`: the chunk store's own budget.
    #[error("the artifact store holds {used} bytes of its {limit}-byte budget and {need} more bytes are needed; remove artifacts no command needs (`outpost artifact list`, `outpost artifact rm`) or raise --max-artifact-disk")]
    Artifacts {
        /// Bytes of chunks held now.
        used: u64,
        /// Bytes the refused chunk (or file) would add.
        need: u64,
        /// The budget, in bytes.
        limit: u64,
    },
    /// `--max-disk`: the box's whole budget, chunks and queue together.
    #[error("the box's data holds {used} bytes of its {limit}-byte --max-disk budget (the queue and the artifacts together) and {need} more bytes are needed; remove artifacts no command needs (`outpost artifact rm`) or raise --max-disk")]
    Total {
        /// Bytes of chunks plus the queue's database now.
        used: u64,
        /// Bytes the refused chunk (or file) would add.
        need: u64,
        /// The budget, in bytes.
        limit: u64,
    },
}

impl Budget {
    /// May `need` more bytes of chunks be stored, with `chunks` held and
    /// the queue's database at `queue` bytes?
    pub fn admit(&self, chunks: u64, queue: u64, need: u64) -> Result<(), OverBudget> {
        if let Some(limit) = self.artifacts {
            if chunks.saturating_add(need) > limit {
                return Err(OverBudget::Artifacts {
                    used: chunks,
                    need,
                    limit,
                });
            }
        }
        if let Some(limit) = self.total {
            let used = chunks.saturating_add(queue);
            if used.saturating_add(need) > limit {
                return Err(OverBudget::Total { used, need, limit });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_refused_by_whichever_budget_it_would_cross() {
        let none = Budget::default();
        assert_eq!(none.admit(u64::MAX - 1, u64::MAX - 1, 10), Ok(()));
        let b = Budget {
            artifacts: Some(100),
            total: Some(150),
        };
        assert_eq!(b.admit(90, 0, 10), Ok(()), "exactly at the budget fits");
        assert_eq!(
            b.admit(91, 0, 10),
            Err(OverBudget::Artifacts {
                used: 91,
                need: 10,
                limit: 100
            })
        );
        // The artifacts' own budget has room, the box's does not: the
        // queue's database counts against --max-disk too.
        let e = b.admit(50, 95, 10).unwrap_err();
        assert_eq!(
            e,
            OverBudget::Total {
                used: 145,
                need: 10,
                limit: 150
            }
        );
        assert!(e.to_string().contains("--max-disk"), "{e}");
    }
}

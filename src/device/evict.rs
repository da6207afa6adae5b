//! Which files to delete so a new artifact fits the device's budget
//! (`--max-artifact-disk`): least recently used first, never one in use.
//! A pure function over a listing, so the policy is tested without a disk.

use std::time::SystemTime;

/// One file under the artifact dir: a finished artifact or a cached chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its length, in bytes.
    pub size: u64,
    /// When it was last used (its mtime: touched on each use).
    pub last_use: SystemTime,
    /// In use by a running command, or a chunk of the artifact being
    /// fetched: never evicted.
    pub protected: bool,
}

/// Room could not be made: at most `room` bytes can be free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// The budget less the protected entries' bytes, the most `need` could
    /// have been.
    pub room: u64,
}

/// The indices into `entries` to delete, oldest use first, so that `need`
/// more bytes fit in `budget`; none when they fit already.
pub fn plan(entries: &[Entry], need: u64, budget: u64) -> Result<Vec<usize>, Shortfall> {
    let used: u64 = entries.iter().map(|e| e.size).sum();
    let pinned: u64 = entries.iter().filter(|e| e.protected).map(|e| e.size).sum();
    let room = budget.saturating_sub(pinned);
    if need > room {
        return Err(Shortfall { room });
    }
    let mut over = (used + need).saturating_sub(budget);
    let mut order: Vec<usize> = (0..entries.len())
        .filter(|&i| !entries[i].protected)
        .collect();
    // Ties (same mtime) go by index, so the plan is the same every time.
    order.sort_by_key(|&i| (entries[i].last_use, i));
    let mut out = Vec::new();
    for i in order {
        if over == 0 {
            break;
        }
        over = over.saturating_sub(entries[i].size);
        out.push(i);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn e(size: u64, age_s: u64, protected: bool) -> Entry {
        Entry {
            size,
            last_use: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
            protected,
        }
    }

    #[test]
    fn nothing_is_evicted_while_it_fits() {
        let es = [e(100, 10, false), e(100, 5, false)];
        assert_eq!(plan(&es, 100, 300), Ok(vec![]));
        assert_eq!(plan(&[], 300, 300), Ok(vec![]));
    }

    #[test]
    fn the_least_recently_used_go_first_and_only_as_many_as_needed() {
        // 0: used 30 s ago, 1: 10 s ago, 2: 20 s ago, 3: just now.
        let es = [
            e(100, 30, false),
            e(100, 10, false),
            e(100, 20, false),
            e(100, 0, false),
        ];
        // 400 used + 150 new in 450: 100 over → the oldest one.
        assert_eq!(plan(&es, 50, 400), Ok(vec![0]));
        // 200 over → the two oldest, oldest first.
        assert_eq!(plan(&es, 150, 350), Ok(vec![0, 2]));
        // Everything, when the new one needs the whole budget.
        assert_eq!(plan(&es, 400, 400), Ok(vec![0, 2, 1, 3]));
    }

    #[test]
    fn protected_entries_stay_and_count_against_the_room() {
        let es = [e(100, 30, true), e(100, 20, false), e(100, 10, false)];
        // The oldest is in use: the next oldest goes instead.
        assert_eq!(plan(&es, 100, 300), Ok(vec![1]));
        // 100 is pinned, so at most 200 can be made free of 300.
        assert_eq!(plan(&es, 201, 300), Err(Shortfall { room: 200 }));
        // A budget smaller than what is pinned leaves no room at all.
        assert_eq!(plan(&es, 1, 50), Err(Shortfall { room: 0 }));
    }

    #[test]
    fn an_artifact_larger_than_the_budget_is_refused_without_evicting() {
        let es = [e(10, 5, false)];
        assert_eq!(plan(&es, 2_000, 1_000), Err(Shortfall { room: 1_000 }));
    }
}

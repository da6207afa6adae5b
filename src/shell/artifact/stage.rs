//! An edge box fetching an artifact from the hub above into its own store
//! (issue 25): the fetch stream a device speaks (`device::fetch::
//! FetchStream`), written to the chunk store instead of a device's cache.
//! Only the chunks the edge lacks cross the uplink; each is durable as it
//! arrives, so a drop or a restart of either box resumes where it was; the
//! manifest is committed, as the hub's bytes, only once every chunk is.

use super::shelf::Shelf;
use crate::device::fetch::{FetchError, FetchStream};
use crate::engine::artifact::budget::OverBudget;
use crate::engine::artifact::Digest;

/// How often a chunk that fails its check is asked for again.
const MAX_TRIES: u32 = 3;

/// Why a staging did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The fetch from the hub failed: the link (`is_link`), a refusal, or
    /// chunks that failed their check `MAX_TRIES` times.
    #[error("fetching from the hub: {0}")]
    Fetch(#[from] FetchError),
    /// The missing chunks do not fit this box's budget (`--max-disk`).
    #[error(transparent)]
    Budget(#[from] OverBudget),
    /// The shelf or chunk store failed, as its message.
    #[error("the artifact store: {0}")]
    Store(String),
}

impl StageError {
    /// The uplink went away: nothing is answered, the hub hands the
    /// command again on the next link and the staging resumes.
    pub fn is_link(&self) -> bool {
        matches!(self, StageError::Fetch(FetchError::Link(_)))
    }
}

fn store(e: impl std::fmt::Display) -> StageError {
    StageError::Store(e.to_string())
}

/// `--uplink-rate`: the pace of every staging of this box together (a
/// shell around `pace::Pacer`, which holds the arithmetic).
pub struct UplinkBudget {
    pacer: std::sync::Mutex<crate::engine::artifact::pace::Pacer>,
    start: std::time::Instant,
}

impl UplinkBudget {
    /// A budget of `rate` bytes/s (at least 1), with `Pacer`'s burst.
    pub fn new(rate: u64) -> UplinkBudget {
        UplinkBudget {
            pacer: std::sync::Mutex::new(crate::engine::artifact::pace::Pacer::new(rate)),
            start: std::time::Instant::now(),
        }
    }

    /// `bytes` were read: wait until the budget allows more.
    pub async fn spend(&self, bytes: u64) {
        let wait = self
            .pacer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spend(self.start.elapsed(), bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// What a staging moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staged {
    /// Chunk bytes that crossed the uplink.
    pub fetched_bytes: u64,
    /// Chunk bytes the edge held already (another version, an earlier try).
    pub reused_bytes: u64,
}

/// Fetch `artifact` from the box at the other end of `conn` onto `shelf`.
/// Blocking store calls run on the blocking pool.
pub async fn stage(
    conn: &quinn::Connection,
    artifact: Digest,
    shelf: &Shelf,
    progress: Option<&tokio::sync::watch::Sender<(u64, u64)>>,
    budget: Option<&UplinkBudget>,
) -> Result<Staged, StageError> {
    // Held already (staged before, or added here): nothing crosses.
    if let Some(m) = shelf.manifest(&artifact).map_err(store)? {
        return Ok(Staged {
            fetched_bytes: 0,
            reused_bytes: m.size,
        });
    }
    let (mut stream, bytes, manifest) = FetchStream::open(conn, artifact).await?;
    let mut seen = std::collections::HashSet::new();
    let mut todo = Vec::new();
    let mut reused_bytes = 0;
    for (i, c) in manifest.chunks.iter().enumerate() {
        if !seen.insert(c.sha256) {
            continue;
        }
        if shelf.chunks().has(&c.sha256) {
            reused_bytes += u64::from(c.len);
        } else {
            todo.push(i as u32);
        }
    }
    let need = todo
        .iter()
        .map(|&i| u64::from(manifest.chunks[i as usize].len))
        .sum();
    shelf.chunks().admit(need)?;
    let report = |done: u64| {
        if let Some(p) = progress {
            p.send_replace((done, manifest.size));
        }
    };
    report(reused_bytes);
    let mut fetched_bytes = 0;
    let mut tries = 0;
    while !todo.is_empty() {
        tries += 1;
        let mut again = Vec::new();
        stream.begin(&todo).await?;
        while let Some(next) = stream.next(&manifest).await? {
            let (index, bytes) = match next {
                Ok(c) => c,
                Err(index) => {
                    again.push(index);
                    continue;
                }
            };
            // Durable before the next is read: a drop resumes after the
            // last chunk that arrived.
            let (s, d) = (shelf.clone(), manifest.chunks[index as usize].sha256);
            let n = bytes.len() as u64;
            tokio::task::spawn_blocking(move || s.chunks().put(&d, &bytes))
                .await
                .map_err(store)?
                .map_err(|e| match e {
                    super::chunks::ChunkError::OverBudget(o) => StageError::Budget(o),
                    e => store(e),
                })?;
            fetched_bytes += n;
            report(reused_bytes + fetched_bytes);
            if let Some(b) = budget {
                b.spend(n).await;
            }
        }
        if !again.is_empty() && tries >= MAX_TRIES {
            return Err(StageError::Fetch(FetchError::Corrupt(format!(
                "{} chunks failed verification {MAX_TRIES} times",
                again.len()
            ))));
        }
        todo = again;
    }
    stream.finish();
    let shelf = shelf.clone();
    tokio::task::spawn_blocking(move || shelf.commit(bytes, crate::now_millis()))
        .await
        .map_err(store)?
        .map_err(store)?;
    Ok(Staged {
        fetched_bytes,
        reused_bytes,
    })
}

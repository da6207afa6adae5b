//! Fetching an artifact from the box (protocol 1.3): on a stream of its
//! own, verified chunk by chunk and whole. Chunks already on disk under
//! `dir/chunks/` (an earlier version, an interrupted fetch) are not asked
//! for again: that is the resume.

use crate::engine::artifact::wire::{
    FetchReply, FetchRequest, MAX_ASK, MAX_CHUNK_REPLY, MAX_MANIFEST_REPLY,
};
use crate::engine::artifact::{Digest, Manifest};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAX_TRIES: u32 = 3;

/// A verified file.
#[derive(Debug)]
pub struct Fetched {
    /// Where it is: `DIR/NAME-VERSION` (see `artifact_path`).
    pub path: PathBuf,
    /// The manifest it was verified against (its SHA-256 is the digest
    /// fetched).
    pub manifest: Manifest,
    /// Chunk bytes asked of the box.
    pub fetched_bytes: u64,
    /// Chunk bytes found already on disk.
    pub reused_bytes: u64,
}

/// Why a fetch failed. Chunks that arrived verified stay in the cache, so
/// the next try asks only for the rest.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The filesystem holding the dir has less free space than the fetch
    /// needs.
    #[error("not enough space for the artifact: need {need} bytes, {have} available")]
    NoSpace {
        /// Bytes needed: the chunks still to fetch, plus the whole file
        /// assembled beside the cache.
        need: u64,
        /// Bytes available to this user on that filesystem.
        have: u64,
    },
    /// The device's own budget for artifacts (`--max-artifact-disk`) is
    /// too small even with every unused file and chunk evicted.
    #[error("the artifact needs {need} bytes on the device but only {room} of its {budget}-byte artifact budget can be made free")]
    OverBudget {
        /// Bytes the fetch needs (as in `NoSpace`).
        need: u64,
        /// The most bytes eviction can free within the budget.
        room: u64,
        /// The budget, in bytes.
        budget: u64,
    },
    /// The box will not serve the artifact or a chunk of it: `NotFound`,
    /// `Forbidden` (sending again does not help), or a failure of its own.
    #[error("the box refused: {code:?}: {message}")]
    Refused {
        /// Why, as a code.
        code: crate::proto::ErrorCode,
        /// The box's text.
        message: String,
    },
    /// The bytes did not match: the manifest not its digest, or chunks or
    /// the whole file not the manifest after every try. Nothing was handed
    /// on.
    #[error("verification failed: {0}")]
    Corrupt(String),
    /// The fetch stream or the connection broke, or the box answered out
    /// of protocol. Nothing is wrong with the artifact or the disk: a new
    /// fetch (on a new connection if this one is gone) resumes from the
    /// cache.
    #[error("link: {0}")]
    Link(String),
    /// Reading or writing the dir or its chunk cache failed (a full disk
    /// included).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Called once the manifest is known and before any chunk is written, with
/// the bytes the fetch will add to `dir`: makes room (or says why not).
pub type MakeRoom<'a> = &'a (dyn Fn(&Manifest, u64) -> Result<(), FetchError> + Sync);

/// How a fetch reports and budgets; the default does neither.
#[derive(Default)]
pub struct FetchOptions<'a> {
    /// Told (bytes on disk, total bytes) as chunks arrive; a watch, so a
    /// slow reader sees only the latest and the fetch never waits for it.
    pub progress: Option<&'a tokio::sync::watch::Sender<(u64, u64)>>,
    /// Run before any chunk is written (see `MakeRoom`); `None`: no budget
    /// of its own, only the filesystem's free space is checked.
    pub make_room: Option<MakeRoom<'a>>,
}

fn link(e: impl std::fmt::Display) -> FetchError {
    FetchError::Link(e.to_string())
}

/// `path` with `suffix` added to its file name (not replacing an
/// "extension": `fw-2.1` and `fw-2.2` must not share `fw-2.part`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Run file work (reads, writes, fsyncs) on the blocking pool, off the
/// runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FetchError> + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FetchError::Io(std::io::Error::other(e)))?
}

/// Put a chunk in the cache: written under a tmp name and renamed, not
/// fsynced. The cache is checked on use (every chunk's hash at assembly,
/// a damaged one fetched again), so a chunk is never trusted for being
/// there; the fetch makes the cache durable in batches (`SYNC_EVERY`)
/// instead of two fsyncs per chunk, which were most of a fast link's
/// fetch time.
fn write_chunk(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = with_suffix(path, ".tmp");
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        // A full disk must not leave half a chunk behind.
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Cached chunk bytes between two syncs of the cache: what a power cut
/// can cost a resumed fetch (a kill -9 costs nothing: the kernel has it).
const SYNC_EVERY: u64 = 8 << 20;

async fn ask(send: &mut quinn::SendStream, req: FetchRequest) -> Result<(), FetchError> {
    crate::proto::write_frame(send, &req, MAX_CHUNK_REPLY)
        .await
        .map_err(link)
}

/// One fetch stream (docs/PROTOCOL.md §10): the manifest, then chunks by
/// index, each checked against the manifest before it is handed on. What
/// a chunk is written to is the caller's: a device's cache here, an edge
/// box's chunk store in `artifact::stage`.
pub struct FetchStream {
    send: quinn::SendStream,
    recv: crate::proto::FrameReader<quinn::RecvStream>,
    artifact: Digest,
    /// Batches `begin` planned and not yet read (the front one asked).
    plan: std::collections::VecDeque<Vec<u32>>,
    /// Replies still to read of the batch being read.
    left: usize,
}

impl FetchStream {
    /// Open a stream and read `artifact`'s manifest: its bytes as the box
    /// keeps them (their SHA-256 checked to be `artifact`) and decoded.
    pub async fn open(
        conn: &quinn::Connection,
        artifact: Digest,
    ) -> Result<(FetchStream, Vec<u8>, Manifest), FetchError> {
        let (mut send, recv) = conn.open_bi().await.map_err(link)?;
        let mut recv = crate::proto::frame_reader(recv);
        ask(&mut send, FetchRequest::Manifest { artifact }).await?;
        let bytes =
            match crate::proto::read_frame::<FetchReply, _>(&mut recv, MAX_MANIFEST_REPLY).await {
                Ok(Some(FetchReply::Manifest { bytes })) => bytes,
                Ok(Some(FetchReply::Refused { code, message })) => {
                    return Err(FetchError::Refused { code, message })
                }
                Ok(Some(other)) => return Err(link(format!("unexpected reply {other:?}"))),
                Ok(None) => return Err(link("the box closed the fetch stream")),
                Err(e) => return Err(link(e)),
            };
        if Digest::of(&bytes) != artifact {
            return Err(FetchError::Corrupt(format!(
                "the manifest's SHA-256 is {}, not {artifact}",
                Digest::of(&bytes)
            )));
        }
        let manifest = Manifest::decode(&bytes).map_err(|e| FetchError::Corrupt(e.to_string()))?;
        let stream = FetchStream {
            send,
            recv,
            artifact,
            plan: Default::default(),
            left: 0,
        };
        Ok((stream, bytes, manifest))
    }

    /// Ask for chunks `batch` (at most `MAX_ASK`) of the artifact; their
    /// replies come in that order, read with `next_chunk`.
    pub async fn ask(&mut self, batch: &[u32]) -> Result<(), FetchError> {
        ask(
            &mut self.send,
            FetchRequest::Chunks {
                artifact: self.artifact,
                chunks: batch.to_vec(),
            },
        )
        .await
    }

    /// The next chunk asked for: `Ok(Ok(bytes))` verified against
    /// `manifest`, `Ok(Err(index))` when its bytes did not match (to ask
    /// again).
    pub async fn next_chunk(
        &mut self,
        manifest: &Manifest,
    ) -> Result<Result<(u32, Vec<u8>), u32>, FetchError> {
        match crate::proto::read_frame::<FetchReply, _>(&mut self.recv, MAX_CHUNK_REPLY).await {
            Ok(Some(FetchReply::Chunk { index, bytes })) => {
                let Some(c) = manifest.chunks.get(index as usize) else {
                    return Err(link(format!(
                        "the box sent chunk {index}, not in the manifest"
                    )));
                };
                if Digest::of(&bytes) != c.sha256 || bytes.len() as u64 != u64::from(c.len) {
                    return Ok(Err(index));
                }
                tracing::debug!(index, bytes = bytes.len(), chunk = %c.sha256.hex(), "chunk received");
                Ok(Ok((index, bytes)))
            }
            Ok(Some(FetchReply::Refused { code, message })) => {
                Err(FetchError::Refused { code, message })
            }
            Ok(Some(other)) => Err(link(format!("unexpected reply {other:?}"))),
            Ok(None) => Err(link("the box closed the fetch stream")),
            Err(e) => Err(link(e)),
        }
    }

    /// Start fetching chunks `todo`; read them with `next`. Batches are
    /// asked one ahead of the one being read, so the box never idles a
    /// round trip between batches.
    pub async fn begin(&mut self, todo: &[u32]) -> Result<(), FetchError> {
        self.plan = todo.chunks(MAX_ASK).map(<[u32]>::to_vec).collect();
        self.left = 0;
        if let Some(first) = self.plan.front() {
            let first = first.clone();
            self.ask(&first).await?;
        }
        Ok(())
    }

    /// The next chunk of those `begin` asked for: `None` when all came,
    /// else as `next_chunk`.
    pub async fn next(
        &mut self,
        manifest: &Manifest,
    ) -> Result<Option<Result<(u32, Vec<u8>), u32>>, FetchError> {
        if self.left == 0 {
            // The front batch was asked already; it is the one read now.
            let Some(current) = self.plan.pop_front() else {
                return Ok(None);
            };
            self.left = current.len();
            if let Some(following) = self.plan.front() {
                let following = following.clone();
                self.ask(&following).await?;
            }
        }
        self.left -= 1;
        self.next_chunk(manifest).await.map(Some)
    }

    /// Tell the box this fetch is done.
    pub fn finish(mut self) {
        let _ = self.send.finish();
    }
}

/// The path a verified artifact is kept at in `dir`.
pub fn artifact_path(dir: &Path, m: &Manifest) -> PathBuf {
    dir.join(format!("{}-{}", m.name, m.version))
}

/// Whether `path` holds exactly the file `m` describes.
fn is_verified(path: &Path, m: &Manifest) -> std::io::Result<bool> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() != m.size {
        return Ok(false);
    }
    let mut h = crate::engine::artifact::manifest::Hasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish() == m.sha256)
}

/// Fetch `artifact` into `dir`; returns the verified file's path.
pub async fn fetch(
    conn: &quinn::Connection,
    artifact: Digest,
    dir: &Path,
) -> Result<Fetched, FetchError> {
    fetch_with(conn, artifact, dir, &FetchOptions::default()).await
}

/// [`fetch`] with progress reports and a room check.
pub async fn fetch_with(
    conn: &quinn::Connection,
    artifact: Digest,
    dir: &Path,
    opts: &FetchOptions<'_>,
) -> Result<Fetched, FetchError> {
    let cache = dir.join("chunks");
    std::fs::create_dir_all(&cache)?;
    let (mut stream, _, manifest) = FetchStream::open(conn, artifact).await?;
    let final_path = artifact_path(dir, &manifest);
    let report = |done: u64| {
        if let Some(p) = opts.progress {
            p.send_replace((done, manifest.size));
        }
    };
    // Fetched and verified before: used as it is (a redelivery, or
    // another command naming the same artifact).
    let (m, p) = (manifest.clone(), final_path.clone());
    if blocking(move || Ok(is_verified(&p, &m)?)).await? {
        stream.finish();
        report(manifest.size);
        return Ok(Fetched {
            path: final_path,
            reused_bytes: manifest.size,
            manifest,
            fetched_bytes: 0,
        });
    }
    let have = |d: &Digest| cache.join(d.hex()).exists();
    let missing: Vec<u32> = (0..manifest.chunks.len() as u32)
        .filter(|&i| !have(&manifest.chunks[i as usize].sha256))
        .collect();
    let mut fetched_bytes = 0u64;
    let reused_bytes: u64 = manifest
        .chunks
        .iter()
        .enumerate()
        .filter(|(i, _)| !missing.contains(&(*i as u32)))
        .map(|(_, c)| u64::from(c.len))
        .sum();
    let need_missing: u64 = missing
        .iter()
        .map(|&i| u64::from(manifest.chunks[i as usize].len))
        .sum();
    let need = need_missing + manifest.size;
    if let Some(make_room) = opts.make_room {
        make_room(&manifest, need)?;
    }
    let (_, avail) = crate::disk::fs_space(dir)?;
    if need > avail {
        return Err(FetchError::NoSpace { need, have: avail });
    }
    report(reused_bytes);
    let mut todo = missing;
    let mut tries = 0;
    let mut unsynced = 0u64;
    loop {
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
                let path = cache.join(manifest.chunks[index as usize].sha256.hex());
                let n = bytes.len() as u64;
                unsynced += n;
                let sync = (unsynced >= SYNC_EVERY).then(|| cache.clone());
                if sync.is_some() {
                    unsynced = 0;
                }
                // On the blocking pool: file work (and a sync above all) on
                // the runtime's few workers stalls every connection's
                // packets (20 fetches on 2 workers crawled).
                blocking(move || {
                    write_chunk(&path, &bytes)?;
                    if let Some(dir) = sync {
                        crate::disk::sync_filesystem(&dir)?;
                    }
                    Ok(())
                })
                .await?;
                fetched_bytes += n;
                report(reused_bytes + fetched_bytes);
            }
            if !again.is_empty() && tries >= MAX_TRIES {
                return Err(FetchError::Corrupt(format!(
                    "{} chunks failed verification {MAX_TRIES} times",
                    again.len()
                )));
            }
            todo = again;
        }
        // A cached chunk damaged on the device's disk is dropped and asked
        // for again, within the same bound on tries.
        let (m, c, p) = (manifest.clone(), cache.clone(), final_path.clone());
        match blocking(move || assemble(&m, &c, &p)).await? {
            Assembled::Done => break,
            Assembled::Damaged(bad) if tries < MAX_TRIES => {
                tracing::warn!(
                    artifact = %artifact,
                    chunks = bad.len(),
                    "cached chunks failed verification; fetching them again"
                );
                todo = bad;
            }
            Assembled::Damaged(bad) => {
                return Err(FetchError::Corrupt(format!(
                    "{} cached chunks were damaged after {MAX_TRIES} tries",
                    bad.len()
                )))
            }
        }
    }
    stream.finish();
    report(manifest.size);
    Ok(Fetched {
        path: final_path,
        manifest,
        fetched_bytes,
        reused_bytes,
    })
}

enum Assembled {
    Done,
    /// Indices of cached chunks whose bytes no longer match (removed).
    Damaged(Vec<u32>),
}

/// Assemble the file from the cache, verify it whole, make it durable,
/// then name it. Nothing is left under a `.part` name on any path out.
fn assemble(manifest: &Manifest, cache: &Path, final_path: &Path) -> Result<Assembled, FetchError> {
    let tmp = with_suffix(final_path, ".part");
    let result = (|| -> Result<Assembled, FetchError> {
        let mut f = std::fs::File::create(&tmp)?;
        let mut h = crate::engine::artifact::manifest::Hasher::default();
        let mut damaged = Vec::new();
        for (i, c) in manifest.chunks.iter().enumerate() {
            let path = cache.join(c.sha256.hex());
            let b = match std::fs::read(&path) {
                Ok(b) => b,
                // Evicted, or dropped above as damaged (a chunk may repeat).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    damaged.push(i as u32);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if Digest::of(&b) != c.sha256 {
                let _ = std::fs::remove_file(&path);
                damaged.push(i as u32);
                continue;
            }
            if !damaged.is_empty() {
                continue;
            }
            h.update(&b);
            f.write_all(&b)?;
        }
        if !damaged.is_empty() {
            return Ok(Assembled::Damaged(damaged));
        }
        if h.finish() != manifest.sha256 {
            return Err(FetchError::Corrupt(
                "the whole file's SHA-256 does not match the manifest".into(),
            ));
        }
        f.sync_all()?;
        std::fs::rename(&tmp, final_path)?;
        if let Some(d) = final_path.parent() {
            std::fs::File::open(d)?.sync_all()?;
        }
        Ok(Assembled::Done)
    })();
    if !matches!(result, Ok(Assembled::Done)) {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

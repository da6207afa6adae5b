//! Fetching an artifact from the box (protocol 1.3): on a stream of its
//! own, verified chunk by chunk and whole. Chunks already on disk under
//! `dir/chunks/` (an earlier version, an interrupted fetch) are not asked
//! for again: that is the resume.

use crate::artifact::wire::{FetchReply, FetchRequest, MAX_ASK};
use crate::artifact::{Digest, Manifest};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAX_REPLY: usize = crate::artifact::manifest::MAX_CHUNK as usize + 1024;
const MAX_TRIES: u32 = 3;

/// A verified file.
#[derive(Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// Chunk bytes asked of the box.
    pub fetched_bytes: u64,
    /// Chunk bytes found already on disk.
    pub reused_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("not enough space for the artifact: need {need} bytes, {have} available")]
    NoSpace { need: u64, have: u64 },
    #[error("the box refused: {code:?}: {message}")]
    Refused {
        code: crate::proto::ErrorCode,
        message: String,
    },
    #[error("verification failed: {0}")]
    Corrupt(String),
    #[error("link: {0}")]
    Link(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

fn link(e: impl std::fmt::Display) -> FetchError {
    FetchError::Link(e.to_string())
}

fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

async fn ask(send: &mut quinn::SendStream, req: FetchRequest) -> Result<(), FetchError> {
    crate::proto::write_frame(send, &req, MAX_REPLY)
        .await
        .map_err(link)
}

/// Fetch `artifact` into `dir`; returns the verified file's path.
pub async fn fetch(
    conn: &quinn::Connection,
    artifact: Digest,
    dir: &Path,
) -> Result<Fetched, FetchError> {
    let cache = dir.join("chunks");
    std::fs::create_dir_all(&cache)?;
    let (mut send, recv) = conn.open_bi().await.map_err(link)?;
    let mut recv = crate::proto::frame_reader(recv);
    ask(&mut send, FetchRequest::Manifest { artifact }).await?;
    let bytes = match crate::proto::read_frame::<FetchReply, _>(&mut recv, MAX_REPLY).await {
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
    let final_path = dir.join(format!("{}-{}", manifest.name, manifest.version));
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
    let (_, avail) = crate::disk::fs_space(dir)?;
    if need > avail {
        return Err(FetchError::NoSpace { need, have: avail });
    }
    let mut todo = missing;
    let mut tries = 0;
    while !todo.is_empty() {
        tries += 1;
        let mut again = Vec::new();
        for batch in todo.chunks(MAX_ASK) {
            ask(
                &mut send,
                FetchRequest::Chunks {
                    artifact,
                    chunks: batch.to_vec(),
                },
            )
            .await?;
            for _ in batch {
                match crate::proto::read_frame::<FetchReply, _>(&mut recv, MAX_REPLY).await {
                    Ok(Some(FetchReply::Chunk { index, bytes })) => {
                        let Some(c) = manifest.chunks.get(index as usize) else {
                            return Err(link(format!(
                                "the box sent chunk {index}, not in the manifest"
                            )));
                        };
                        if Digest::of(&bytes) != c.sha256 || bytes.len() as u64 != u64::from(c.len)
                        {
                            again.push(index);
                            continue;
                        }
                        fetched_bytes += bytes.len() as u64;
                        // fsync blocks for milliseconds: on the runtime's
                        // few workers it would stall every connection's
                        // packets (20 fetches on 2 workers crawled).
                        let path = cache.join(c.sha256.hex());
                        tokio::task::spawn_blocking(move || write_durable(&path, &bytes))
                            .await
                            .map_err(|e| FetchError::Io(std::io::Error::other(e)))??;
                    }
                    Ok(Some(FetchReply::Refused { code, message })) => {
                        return Err(FetchError::Refused { code, message })
                    }
                    Ok(Some(other)) => return Err(link(format!("unexpected reply {other:?}"))),
                    Ok(None) => return Err(link("the box closed the fetch stream")),
                    Err(e) => return Err(link(e)),
                }
            }
        }
        if !again.is_empty() && tries >= MAX_TRIES {
            return Err(FetchError::Corrupt(format!(
                "{} chunks failed verification {MAX_TRIES} times",
                again.len()
            )));
        }
        todo = again;
    }
    let _ = send.finish();
    // Assemble, verify whole, make durable, then name it.
    let tmp = final_path.with_extension("part");
    // Reading, hashing and writing the whole file: off the runtime too.
    let assemble = {
        let (tmp, final_path, dir, cache) = (
            tmp.clone(),
            final_path.clone(),
            dir.to_path_buf(),
            cache.clone(),
        );
        let chunks = manifest.chunks.clone();
        let sha256 = manifest.sha256;
        move || -> Result<(), FetchError> {
            let mut f = std::fs::File::create(&tmp)?;
            let mut h = crate::artifact::manifest::Hasher::default();
            for c in &chunks {
                let b = std::fs::read(cache.join(c.sha256.hex()))?;
                if Digest::of(&b) != c.sha256 {
                    let _ = std::fs::remove_file(cache.join(c.sha256.hex()));
                    return Err(FetchError::Corrupt(format!(
                        "cached chunk {} is damaged",
                        c.sha256
                    )));
                }
                h.update(&b);
                f.write_all(&b)?;
            }
            if h.finish() != sha256 {
                return Err(FetchError::Corrupt(
                    "the whole file's SHA-256 does not match the manifest".into(),
                ));
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &final_path)?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(())
        }
    };
    let result = tokio::task::spawn_blocking(assemble)
        .await
        .map_err(|e| FetchError::Io(std::io::Error::other(e)))
        .and_then(|r| r);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Fetched {
        path: final_path,
        manifest,
        fetched_bytes,
        reused_bytes,
    })
}

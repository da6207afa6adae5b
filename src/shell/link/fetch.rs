//! The box's side of artifact fetch streams (protocol 1.3,
//! `artifact::wire`): every bidirectional stream a device opens after its
//! control stream is a fetch stream, answered from the shelf.

use crate::engine::artifact::wire::{
    FetchReply, FetchRequest, MAX_ASK, MAX_CHUNK_REPLY, MAX_MANIFEST_REPLY,
};
use crate::engine::artifact::{Digest, Manifest};
use crate::proto::{self, ErrorCode};
use crate::shell::artifact::chunks::ChunkError;
use crate::shell::artifact::shelf::Shelf;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Most fetch streams served at once per connection; a further one waits
/// (unread) until one ends.
pub const MAX_FETCH_STREAMS: usize = 4;

/// Send priority of fetch streams (the control stream keeps quinn's 0).
pub const FETCH_PRIORITY: i32 = -1;

/// Largest request frame a device may send on a fetch stream.
const MAX_REQUEST: usize = 64 * 1024;

/// The set of artifacts a connection may read.
pub(crate) type Allowed = Arc<Mutex<HashSet<[u8; 32]>>>;

/// Accept fetch streams until the connection ends (or this task is
/// aborted, which ends the streams it serves).
pub(crate) async fn accept(conn: quinn::Connection, shared: Arc<super::Shared>, allowed: Allowed) {
    let permits = Arc::new(Semaphore::new(MAX_FETCH_STREAMS));
    let mut tasks = JoinSet::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            // Reap finished streams so the set stays small.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (shared, allowed) = (shared.clone(), allowed.clone());
        tasks.spawn(async move {
            let shelf = shared.queue.shelf();
            if let Err(e) = serve(send, recv, shelf, &allowed, &shared.stats).await {
                tracing::debug!(error = %e, "fetch stream ended");
            }
            drop(permit);
        });
    }
}

fn refused(code: ErrorCode, message: impl Into<String>) -> FetchReply {
    FetchReply::Refused {
        code,
        message: message.into(),
    }
}

async fn serve(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    shelf: &Shelf,
    allowed: &Allowed,
    stats: &super::LinkStats,
) -> Result<(), proto::FrameError> {
    // Below the control stream (priority 0): quinn sends a higher
    // priority's data first, so a command, an ack or a cancel never waits
    // behind artifact bytes on the same connection.
    let _ = send.set_priority(FETCH_PRIORITY);
    let mut recv = proto::frame_reader(recv);
    // The manifest of the artifact last asked about, kept decoded so a
    // run of Chunks requests does not read it again each time.
    let mut current: Option<(Digest, Manifest)> = None;
    while let Some(req) = proto::read_frame::<FetchRequest, _>(&mut recv, MAX_REQUEST).await? {
        let artifact = match &req {
            FetchRequest::Manifest { artifact } | FetchRequest::Chunks { artifact, .. } => {
                *artifact
            }
        };
        if !allowed.lock().unwrap().contains(&artifact.0) {
            let r = refused(
                ErrorCode::Forbidden,
                format!("{artifact} was not named by a command delivered to this device on this connection"),
            );
            proto::write_frame(&mut send, &r, MAX_CHUNK_REPLY).await?;
            continue;
        }
        match req {
            FetchRequest::Manifest { .. } => {
                let r = match shelf.manifest_bytes(&artifact) {
                    Ok(Some(bytes)) => FetchReply::Manifest { bytes },
                    Ok(None) => refused(
                        ErrorCode::NotFound,
                        format!("{artifact} is not on this box's shelf"),
                    ),
                    Err(e) => refused(ErrorCode::Internal, format!("reading {artifact}: {e}")),
                };
                proto::write_frame(&mut send, &r, MAX_MANIFEST_REPLY).await?;
            }
            FetchRequest::Chunks { chunks, .. } => {
                if chunks.len() > MAX_ASK {
                    let r = refused(
                        ErrorCode::ProtocolViolation,
                        format!(
                            "asked for {} chunks at once; at most {MAX_ASK}",
                            chunks.len()
                        ),
                    );
                    proto::write_frame(&mut send, &r, MAX_CHUNK_REPLY).await?;
                    continue;
                }
                if current.as_ref().map(|(d, _)| *d) != Some(artifact) {
                    match shelf.manifest(&artifact) {
                        Ok(Some(m)) => current = Some((artifact, m)),
                        Ok(None) => {
                            let r = refused(
                                ErrorCode::NotFound,
                                format!("{artifact} is not on this box's shelf"),
                            );
                            proto::write_frame(&mut send, &r, MAX_CHUNK_REPLY).await?;
                            continue;
                        }
                        Err(e) => {
                            let r =
                                refused(ErrorCode::Internal, format!("reading {artifact}: {e}"));
                            proto::write_frame(&mut send, &r, MAX_CHUNK_REPLY).await?;
                            continue;
                        }
                    }
                }
                let m = &current.as_ref().expect("set above").1;
                // One chunk in memory at a time.
                for index in chunks {
                    let r = match m.chunks.get(index as usize) {
                        None => refused(
                            ErrorCode::NotFound,
                            format!(
                                "{artifact} has {} chunks; there is no chunk {index}",
                                m.chunks.len()
                            ),
                        ),
                        Some(c) => {
                            let chunks = shelf.chunks();
                            let d = c.sha256;
                            match chunks.get(&d) {
                                Ok(bytes) => FetchReply::Chunk { index, bytes },
                                Err(e) => {
                                    refused(ErrorCode::Internal, chunk_failure(index, &d, &e))
                                }
                            }
                        }
                    };
                    proto::write_frame(&mut send, &r, MAX_CHUNK_REPLY).await?;
                    if let FetchReply::Chunk { bytes, .. } = &r {
                        stats.chunks_served.fetch_add(1, Ordering::Relaxed);
                        stats
                            .chunk_bytes_served
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    let _ = send.finish();
    Ok(())
}

fn chunk_failure(index: u32, d: &Digest, e: &ChunkError) -> String {
    format!("chunk {index} ({d}) could not be read on the box: {e}")
}

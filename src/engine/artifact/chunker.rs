//! Splitting a file into content-defined chunks (FastCDC 2020).
//!
//! Boundaries follow the content, not offsets, so an insertion near the
//! start of a new firmware shifts only the chunks around it: v2.2 after
//! v2.1 moves what changed. Memory is one chunk buffer (≤ `MAX_CHUNK`)
//! whatever the file's size.

use super::manifest::{
    ChunkRef, Digest, Hasher, Manifest, AVG_CHUNK, FORMAT, MAX_CHUNK, MIN_CHUNK,
};
use fastcdc::v2020::{Error as CdcError, StreamCDC};
use std::io::{self, Read};

/// Chunks of a reader, in order, each with its digest; the whole file's
/// digest and the manifest at the end (`finish`).
pub struct Chunker<R: Read> {
    cdc: StreamCDC<R>,
    whole: Hasher,
    chunks: Vec<ChunkRef>,
    size: u64,
}

impl<R: Read> Chunker<R> {
    /// Chunks of `source` at the manifest's sizes (`MIN_CHUNK`, `AVG_CHUNK`,
    /// `MAX_CHUNK`), so every chunker cuts a file the same way.
    pub fn new(source: R) -> Self {
        Chunker {
            cdc: StreamCDC::new(
                source,
                MIN_CHUNK as usize,
                AVG_CHUNK as usize,
                MAX_CHUNK as usize,
            ),
            whole: Hasher::default(),
            chunks: Vec::new(),
            size: 0,
        }
    }

    /// The next chunk and its bytes; `None` at the end of the file.
    pub fn next_chunk(&mut self) -> Option<io::Result<(ChunkRef, Vec<u8>)>> {
        match self.cdc.next()? {
            Ok(c) => {
                self.whole.update(&c.data);
                let r = ChunkRef {
                    sha256: Digest::of(&c.data),
                    len: c.length as u32,
                };
                self.size += c.length as u64;
                self.chunks.push(r);
                Some(Ok((r, c.data)))
            }
            Err(CdcError::IoError(e)) => Some(Err(e)),
            Err(e) => Some(Err(io::Error::other(e.to_string()))),
        }
    }

    /// Bytes chunked so far.
    pub fn bytes(&self) -> u64 {
        self.size
    }

    /// The manifest of everything read (call after `next_chunk` gave `None`).
    pub fn finish(self, name: &str, version: &str) -> Manifest {
        Manifest {
            format: FORMAT,
            name: name.into(),
            version: version.into(),
            size: self.size,
            sha256: self.whole.finish(),
            chunks: self.chunks,
        }
    }
}

/// Chunk a whole reader, handing each chunk to `each`: the manifest.
pub fn chunk_all<R: Read>(
    source: R,
    name: &str,
    version: &str,
    mut each: impl FnMut(&ChunkRef, &[u8]) -> io::Result<()>,
) -> io::Result<Manifest> {
    let mut c = Chunker::new(source);
    while let Some(next) = c.next_chunk() {
        let (r, bytes) = next?;
        each(&r, &bytes)?;
    }
    Ok(c.finish(name, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use std::collections::HashSet;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    #[test]
    fn chunks_rebuild_the_file_within_the_bounds_and_the_manifest_reads_back() {
        let file = data(3 * 1024 * 1024 + 17, 1);
        let mut back = Vec::new();
        let m = chunk_all(&file[..], "fw", "1", |r, b| {
            assert_eq!(Digest::of(b), r.sha256);
            back.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(back, file);
        assert_eq!(m.size, file.len() as u64);
        assert_eq!(m.sha256, Digest::of(&file));
        let (last, rest) = m.chunks.split_last().unwrap();
        assert!(rest
            .iter()
            .all(|c| (MIN_CHUNK..=MAX_CHUNK).contains(&c.len)));
        assert!(last.len <= MAX_CHUNK);
        // ~64 KiB on average: 3 MiB is some tens of chunks, not 3 or 300.
        assert!((20..=100).contains(&m.chunks.len()), "{}", m.chunks.len());
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn an_edit_in_the_middle_changes_only_the_chunks_around_it() {
        let v1 = data(4 * 1024 * 1024, 2);
        let mut v2 = v1.clone();
        // 1 % of the bytes, in one place, plus an insertion that shifts
        // every offset after it.
        let at = v1.len() / 2;
        v2[at..at + v1.len() / 100].copy_from_slice(&data(v1.len() / 100, 3));
        v2.splice(at..at, [1u8, 2, 3]);
        let m1 = chunk_all(&v1[..], "fw", "1", |_, _| Ok(())).unwrap();
        let m2 = chunk_all(&v2[..], "fw", "2", |_, _| Ok(())).unwrap();
        let old: HashSet<_> = m1.chunks.iter().map(|c| c.sha256).collect();
        let new_bytes: u64 = m2
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.sha256))
            .map(|c| u64::from(c.len))
            .sum();
        // The changed 1 % and at most a few chunks either side of it.
        assert!(
            new_bytes < v2.len() as u64 / 100 + 4 * u64::from(MAX_CHUNK),
            "{new_bytes} of {} bytes are new",
            v2.len()
        );
    }

    #[test]
    fn an_empty_file_is_an_empty_manifest() {
        let m = chunk_all(&b""[..], "empty", "0", |_, _| Ok(())).unwrap();
        assert_eq!(m.size, 0);
        assert!(m.chunks.is_empty());
        assert_eq!(m.sha256, Digest::of(b""));
    }
}

//! The artifact manifest (DESIGN §11): what a file is, chunk by chunk.
//!
//! A manifest is kept and sent as the bytes it was first encoded to; its
//! identity, the *artifact digest*, is the SHA-256 of those bytes, and that
//! is what a signed envelope names (`Claims::artifact`). Nobody decodes a
//! manifest and encodes it again: a re-encoding that differed by a byte
//! would be another artifact.
//!
//! Wire form (postcard, fields in order): `format: u8` (= 1), `name:
//! String`, `version: String`, `size: u64`, `sha256: [u8; 32]` (of the
//! whole file), `chunks: Vec<ChunkRef>`, each `sha256: [u8; 32]`, `len:
//! u32`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The manifest format this build writes and reads.
pub const FORMAT: u8 = 1;

/// Chunk bounds (DESIGN §11): content-defined, ~64 KiB on average.
pub const MIN_CHUNK: u32 = 16 * 1024;
/// The average chunk size the chunker aims at, in bytes.
pub const AVG_CHUNK: u32 = 64 * 1024;
/// The largest chunk, in bytes: the chunker cuts there, and `decode`
/// refuses a manifest listing a longer one. (The smallest only binds the
/// chunker: a file's last chunk may be shorter.)
pub const MAX_CHUNK: u32 = 256 * 1024;

/// Largest manifest read: 40 bytes per chunk, so 4 MiB lists ~100,000
/// chunks, a ~6 GiB file at the average chunk size.
pub const MAX_MANIFEST: usize = 4 * 1024 * 1024;

/// Largest name or version, in bytes.
pub const MAX_LABEL: usize = 128;

/// A SHA-256, shown as `sha256:` and 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        let d = ring::digest::digest(&ring::digest::SHA256, bytes);
        Digest(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// The 64 hex digits, without the `sha256:` prefix (chunk file names).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits: enough to tell artifacts apart in a table.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }

    /// Read `sha256:HEX` or bare `HEX` (64 digits).
    pub fn parse(s: &str) -> Option<Digest> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.short())
    }
}

/// An incremental SHA-256 (the whole file, as it streams by).
pub struct Hasher(ring::digest::Context);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Hasher {
    /// Add the next bytes of the file.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The SHA-256 of every byte given to `update`, in order.
    pub fn finish(self) -> Digest {
        Digest(self.0.finish().as_ref().try_into().expect("32 bytes"))
    }
}

/// One chunk of a file, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// SHA-256 of the chunk's bytes: its name in a chunk store, and what a
    /// fetched chunk is checked against.
    pub sha256: Digest,
    /// Its length in bytes, 1..=`MAX_CHUNK`.
    pub len: u32,
}

/// What a file is: its name and version (labels for people), its size and
/// digest, and its chunks in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The manifest format, `FORMAT`; its first byte on the wire, so a
    /// reader refuses another format before decoding the rest.
    pub format: u8,
    /// What the file is (`fw`), a label for people (`check_label`).
    pub name: String,
    /// Which one (`2.1`), a label for people (`check_label`).
    pub version: String,
    /// The whole file's length in bytes: the sum of its chunks' `len`.
    pub size: u64,
    /// SHA-256 of the whole file, checked on the assembled file before it
    /// is used.
    pub sha256: Digest,
    /// The file's chunks in order; concatenated, they are the file.
    pub chunks: Vec<ChunkRef>,
}

/// Why manifest bytes were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ManifestError {
    /// Over `MAX_MANIFEST`, with its length in bytes; refused unread.
    #[error("the manifest is {0} bytes, over the limit of {MAX_MANIFEST}")]
    TooLarge(usize),
    /// Another format than `FORMAT` (its first byte), from a newer
    /// outpost.
    #[error("the manifest is format {0}; this outpost reads format {FORMAT} (upgrade it)")]
    Format(u8),
    /// Empty, undecodable, trailing bytes, a bad label, a chunk out of
    /// bounds, or chunks that do not add up to the size: the text says
    /// which.
    #[error("the manifest is not well formed ({0})")]
    Bad(String),
}

impl Manifest {
    /// The bytes this manifest is kept and sent as (encode once, at `add`).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a manifest always encodes")
    }

    /// Read manifest bytes, checking what can be checked without the file:
    /// the chunk lengths add up to the size and stay within the bounds a
    /// chunker makes, and the labels are printable.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        match bytes.first() {
            Some(&FORMAT) => {}
            Some(&v) => return Err(ManifestError::Format(v)),
            None => return Err(ManifestError::Bad("empty".into())),
        }
        let (m, rest): (Manifest, _) =
            postcard::take_from_bytes(bytes).map_err(|e| ManifestError::Bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ManifestError::Bad(format!(
                "{} bytes after its end",
                rest.len()
            )));
        }
        for (what, label) in [("name", &m.name), ("version", &m.version)] {
            if let Err(e) = check_label(label) {
                return Err(ManifestError::Bad(format!("its {what} {e}")));
            }
        }
        let mut total = 0u64;
        for (i, c) in m.chunks.iter().enumerate() {
            if c.len == 0 || c.len > MAX_CHUNK {
                return Err(ManifestError::Bad(format!(
                    "chunk {i} is {} bytes (1..={MAX_CHUNK})",
                    c.len
                )));
            }
            total += u64::from(c.len);
        }
        if total != m.size {
            return Err(ManifestError::Bad(format!(
                "its chunks add up to {total} bytes, its size says {}",
                m.size
            )));
        }
        Ok(m)
    }

    /// `name@version`, how people name it.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Byte offset of each chunk, in order.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        self.chunks.iter().scan(0u64, |at, c| {
            let off = *at;
            *at += u64::from(c.len);
            Some((off, c))
        })
    }
}

/// A name or version: 1..=128 bytes of letters, digits and `._+-`; no `@`
/// or `/`, so `name@version` reads back unambiguously and both are safe in
/// a file name.
pub fn check_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_LABEL {
        return Err(format!("must be 1 to {MAX_LABEL} bytes long"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')))
    {
        return Err(format!(
            "{s:?} has {c:?}; use letters, digits and . _ + - only"
        ));
    }
    Ok(())
}

/// How a sender names an artifact: `name@version`, `name` (its newest
/// version), or its digest `sha256:HEX`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactSpec {
    /// `sha256:HEX`: exactly that manifest.
    Digest(Digest),
    /// `name@version` or `name`, resolved on the box's shelf.
    Name {
        /// The manifest's `name`.
        name: String,
        /// The manifest's `version`; `None`: the version of that name
        /// added last.
        version: Option<String>,
    },
}

impl ArtifactSpec {
    /// Read `sha256:HEX`, `name@version` or `name`, checking the labels
    /// (`check_label`); the error says what is wrong, for people.
    pub fn parse(s: &str) -> Result<ArtifactSpec, String> {
        if s.starts_with("sha256:") {
            return Digest::parse(s)
                .map(ArtifactSpec::Digest)
                .ok_or_else(|| format!("{s:?} is not a digest: write sha256: and 64 hex digits"));
        }
        let (name, version) = match s.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (s, None),
        };
        check_label(name).map_err(|e| format!("artifact name {e}"))?;
        if let Some(v) = version {
            check_label(v).map_err(|e| format!("artifact version {e}"))?;
        }
        Ok(ArtifactSpec::Name {
            name: name.into(),
            version: version.map(String::from),
        })
    }
}

impl fmt::Display for ArtifactSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactSpec::Digest(d) => write!(f, "{d}"),
            ArtifactSpec::Name {
                name,
                version: Some(v),
            } => write!(f, "{name}@{v}"),
            ArtifactSpec::Name {
                name,
                version: None,
            } => write!(f, "{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            name: "fw".into(),
            version: "2.1".into(),
            size: 70_000,
            sha256: Digest::of(b"file"),
            chunks: vec![
                ChunkRef {
                    sha256: Digest::of(b"a"),
                    len: 40_000,
                },
                ChunkRef {
                    sha256: Digest::of(b"b"),
                    len: 30_000,
                },
            ],
        }
    }

    #[test]
    fn a_manifest_reads_back_from_its_bytes_and_its_digest_is_theirs() {
        let m = manifest();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(bytes[0], FORMAT);
        let offs: Vec<u64> = m.offsets().map(|(o, _)| o).collect();
        assert_eq!(offs, vec![0, 40_000]);
    }

    #[test]
    fn damaged_or_inconsistent_manifests_are_refused_by_name() {
        let mut m = manifest();
        m.size += 1;
        let e = Manifest::decode(&m.encode()).unwrap_err();
        assert!(e.to_string().contains("add up to 70000"), "{e}");
        let mut m = manifest();
        m.chunks[0].len = MAX_CHUNK + 1;
        m.size = u64::from(MAX_CHUNK) + 1 + 30_000;
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = manifest();
        m.name = "a/b".into();
        let e = Manifest::decode(&m.encode()).unwrap_err();
        assert!(e.to_string().contains("'/'"), "{e}");
        let mut bytes = manifest().encode();
        bytes[0] = 9;
        assert_eq!(
            Manifest::decode(&bytes).unwrap_err(),
            ManifestError::Format(9)
        );
        bytes = manifest().encode();
        bytes.push(0);
        assert!(Manifest::decode(&bytes).is_err());
        assert!(Manifest::decode(&bytes[..10]).is_err());
    }

    #[test]
    fn specs_name_a_digest_a_version_or_the_newest() {
        let d = Digest::of(b"x");
        assert_eq!(
            ArtifactSpec::parse(&d.to_string()).unwrap(),
            ArtifactSpec::Digest(d)
        );
        assert_eq!(Digest::parse(&d.hex()), Some(d));
        assert_eq!(
            ArtifactSpec::parse("fw@2.1").unwrap(),
            ArtifactSpec::Name {
                name: "fw".into(),
                version: Some("2.1".into())
            }
        );
        assert_eq!(ArtifactSpec::parse("fw").unwrap().to_string(), "fw");
        assert!(ArtifactSpec::parse("sha256:12").is_err());
        assert!(ArtifactSpec::parse("fw@").is_err());
        assert!(ArtifactSpec::parse("f w@1").is_err());
    }
}

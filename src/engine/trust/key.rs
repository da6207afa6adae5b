//! Operator keys: OpenSSH ed25519 keys, the format an operator already has
//! (`ssh-keygen -t ed25519` makes one; `outpost key new` makes the same).
//! Text in, text out: the CLI reads and writes the files.

use serde::{Deserialize, Serialize};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};
use std::fmt;

/// The namespace of an outpost signature (SSHSIG's, so that
/// `ssh-keygen -Y sign -n outpost-command` signs the same bytes).
pub const NAMESPACE: &str = "outpost-command";

/// A key's id: the SHA-256 of its public key blob, the fingerprint
/// `ssh-keygen -l` prints (`SHA256:…`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 32]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.0);
        write!(f, "SHA256:{b}")
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        use base64::Engine;
        let b = s.trim().strip_prefix("SHA256:").unwrap_or(s.trim());
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b.trim_end_matches('='))
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| KeyError::BadId(s.to_string()))?;
        Ok(KeyId(bytes))
    }
}

/// Why a key or a key id could not be read, made or used. Each text says
/// what was expected and how to get it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not an OpenSSH public key line; ssh-key's reason.
    #[error("not an OpenSSH public key line (expected `ssh-ed25519 AAAA… NAME`, as in a .pub file): {0}")]
    BadPublic(String),
    /// The text is not an OpenSSH private key file; ssh-key's reason.
    #[error("not an OpenSSH private key (expected a file starting `-----BEGIN OPENSSH PRIVATE KEY-----`): {0}")]
    BadPrivate(String),
    /// The key is of another algorithm, named as OpenSSH names it
    /// (`ssh-rsa`, `ecdsa-sha2-nistp256`, …).
    #[error("the key is {0}; outpost signs with ed25519 keys only (make one with `outpost key new NAME` or `ssh-keygen -t ed25519`)")]
    NotEd25519(String),
    /// The private key is protected by a passphrase; outpost reads
    /// unencrypted keys only.
    #[error("the private key is encrypted with a passphrase; outpost reads unencrypted keys only: keep the key on an encrypted disk or token, or write a copy without a passphrase with `ssh-keygen -p -N '' -f FILE`")]
    Encrypted,
    /// The text given as a key id (kept as given) is not `SHA256:` and 32
    /// bytes of base64.
    #[error("`{0}` is not a key id (expected SHA256:… as `outpost trust list` or `ssh-keygen -l` prints)")]
    BadId(String),
    /// A step of making, writing or using a key failed (`make a key`,
    /// `sign`, `encode the claims`, …): the step and the library's reason.
    #[error("could not {0}: {1}")]
    Crypto(&'static str, String),
}

/// A public operator key, as in a `.pub` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorPublic {
    /// The key's id: the SHA-256 fingerprint of its public key blob.
    pub id: KeyId,
    /// The raw ed25519 key.
    pub raw: [u8; 32],
    /// The `.pub` line's comment (usually `user@host` or the key's name).
    pub comment: String,
}

impl OperatorPublic {
    /// Read a `.pub` line (`ssh-ed25519 AAAA… comment`), spaces around it
    /// ignored; a key other than ed25519 is refused (`NotEd25519`).
    pub fn from_openssh(line: &str) -> Result<Self, KeyError> {
        let pk =
            PublicKey::from_openssh(line.trim()).map_err(|e| KeyError::BadPublic(e.to_string()))?;
        Self::of(&pk)
    }

    fn of(pk: &PublicKey) -> Result<Self, KeyError> {
        let Some(ed) = pk.key_data().ed25519() else {
            return Err(KeyError::NotEd25519(pk.algorithm().to_string()));
        };
        let fp = pk.fingerprint(HashAlg::Sha256);
        let id = <[u8; 32]>::try_from(fp.as_bytes())
            .map_err(|_| KeyError::Crypto("fingerprint the key", "not 32 bytes".into()))?;
        Ok(OperatorPublic {
            id: KeyId(id),
            raw: ed.0,
            comment: pk.comment().to_string(),
        })
    }

    /// The `.pub` line again (`ssh-ed25519 AAAA… comment`).
    pub fn to_openssh(&self) -> String {
        let mut pk = PublicKey::from(ssh_key::public::Ed25519PublicKey(self.raw));
        pk.set_comment(self.comment.clone());
        pk.to_openssh().unwrap_or_default()
    }
}

/// A private operator key: what `send --sign` loads.
pub struct OperatorKey {
    key: PrivateKey,
    /// Its public half, id included.
    pub public: OperatorPublic,
}

impl fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorKey")
            .field("id", &self.public.id)
            .finish_non_exhaustive()
    }
}

impl OperatorKey {
    /// A new ed25519 key, commented `name`.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        let mut key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519)
            .map_err(|e| KeyError::Crypto("make a key", e.to_string()))?;
        key.set_comment(name);
        let public = OperatorPublic::of(key.public_key())?;
        Ok(OperatorKey { key, public })
    }

    /// Read a private key file's text (`-----BEGIN OPENSSH PRIVATE
    /// KEY-----`, as `outpost key new` or `ssh-keygen -t ed25519` writes
    /// it); an encrypted or non-ed25519 key is refused.
    pub fn from_openssh(text: &str) -> Result<Self, KeyError> {
        let key = PrivateKey::from_openssh(text.trim())
            .map_err(|e| KeyError::BadPrivate(e.to_string()))?;
        if key.is_encrypted() {
            return Err(KeyError::Encrypted);
        }
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(KeyError::NotEd25519(key.algorithm().to_string()));
        }
        let public = OperatorPublic::of(key.public_key())?;
        Ok(OperatorKey { key, public })
    }

    /// The private key file's text (OpenSSH format, unencrypted).
    pub fn to_openssh(&self) -> Result<String, KeyError> {
        self.key
            .to_openssh(LineEnding::LF)
            .map(|z| z.to_string())
            .map_err(|e| KeyError::Crypto("write the key", e.to_string()))
    }

    /// The raw 64-byte ed25519 signature of `msg` as an SSH signature in
    /// outpost's namespace (SSHSIG with SHA-512).
    pub fn sign(&self, msg: &[u8]) -> Result<[u8; 64], KeyError> {
        let sig = self
            .key
            .sign(NAMESPACE, HashAlg::Sha512, msg)
            .map_err(|e| KeyError::Crypto("sign", e.to_string()))?;
        <[u8; 64]>::try_from(sig.signature_bytes())
            .map_err(|_| KeyError::Crypto("sign", "the signature is not 64 bytes".into()))
    }
}

/// Whether `sig` is `key`'s signature of `msg` (SSHSIG, outpost's
/// namespace). ring verifies: it is already in the binary for TLS.
pub fn verify(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    let Ok(data) = ssh_key::SshSig::signed_data(NAMESPACE, HashAlg::Sha512, msg) else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(&data, sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_round_trips_and_signs() {
        let k = OperatorKey::generate("alice").unwrap();
        let text = k.to_openssh().unwrap();
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let again = OperatorKey::from_openssh(&text).unwrap();
        assert_eq!(again.public, k.public);
        let line = k.public.to_openssh();
        assert!(
            line.starts_with("ssh-ed25519 ") && line.ends_with(" alice"),
            "{line}"
        );
        let p = OperatorPublic::from_openssh(&line).unwrap();
        assert_eq!(p, k.public);
        assert_eq!(p.id.to_string().parse::<KeyId>().unwrap(), p.id);

        let sig = k.sign(b"hello").unwrap();
        assert!(verify(&p.raw, b"hello", &sig));
        assert!(!verify(&p.raw, b"hellO", &sig));
        let other = OperatorKey::generate("bob").unwrap();
        assert!(!verify(&other.public.raw, b"hello", &sig));
    }

    #[test]
    fn bad_keys_are_named() {
        assert!(matches!(
            OperatorPublic::from_openssh("ssh-rsa AAAA x"),
            Err(KeyError::BadPublic(_))
        ));
        assert!(matches!(
            OperatorKey::from_openssh("hello"),
            Err(KeyError::BadPrivate(_))
        ));
        assert!("SHA256:nope".parse::<KeyId>().is_err());
    }
}

//! The signed envelope: the exact bytes of a canonical record of what the
//! operator authorised (the claims) plus an ed25519 signature over them.
//!
//! Every hop stores and forwards the envelope's bytes as received, decodes
//! the claims out of them to compare, and never encodes them again: a
//! re-encoding that differed by one byte (a newer postcard, a field added)
//! would break every signature in flight.
//!
//! Wire form (postcard): `version: u8`, `claims: bytes`, `signature:
//! bytes(64)`; the claims are postcard of [`Claims`] in field order.

use super::key::{KeyId, OperatorKey};
use crate::engine::command::{CommandId, Millis, Priority};
use serde::{Deserialize, Serialize};

/// The envelope format this build writes and reads.
pub const VERSION: u8 = 1;

/// Largest envelope read: the claims hold a target and an audience, not the
/// payload (only its digest), so a few KiB is plenty; a larger one is
/// refused before any parsing.
pub const MAX_LEN: usize = 4096;

/// What the signer authorised, in the order it is encoded. Append fields
/// only with a new [`VERSION`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The command's id, chosen by the signer: the box queues the command
    /// under it, and a second intake of it is a replay.
    pub id: CommandId,
    /// The target as the signer wrote it, from the first box down
    /// (`edge-1/tag:line-3`).
    pub target: String,
    /// SHA-256 of the payload.
    pub payload_sha256: [u8; 32],
    /// The artifact's manifest digest, when the command carries one.
    pub artifact: Option<[u8; 32]>,
    /// The priority the command must be queued at.
    pub priority: Priority,
    /// Deliver no earlier than this, ms since the Unix epoch (`None`: as
    /// soon as it can be).
    pub not_before: Option<Millis>,
    /// The signature is worth nothing from this instant on.
    pub expires_at: Millis,
    /// The box (site) the command is meant for: its `--name`.
    pub audience: String,
    /// The id of the signing key: which trusted key verifies it.
    pub key_id: KeyId,
}

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    version: u8,
    #[serde(borrow)]
    claims: &'a [u8],
    #[serde(borrow)]
    signature: &'a [u8],
}

/// An envelope taken apart, not yet verified.
#[derive(Clone, Debug)]
pub struct Opened<'a> {
    /// The claims decoded from `signed`, to compare; never encoded again.
    pub claims: Claims,
    /// The claims' bytes as received: what the signature covers.
    pub signed: &'a [u8],
    /// The ed25519 signature over `signed` (SSHSIG, outpost's namespace).
    pub signature: [u8; 64],
}

/// Why an envelope could not be read at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Malformed {
    /// Longer than `MAX_LEN`; its length in bytes. Refused before parsing.
    #[error("the envelope is {0} bytes, over the limit of {MAX_LEN}")]
    TooLarge(usize),
    /// Its first byte is not `VERSION`: a newer outpost's envelope (or an
    /// unsigned one handed to `open`). The byte read.
    #[error(
        "the envelope is version {0}; this box reads version {VERSION} (upgrade outpost here)"
    )]
    Version(u8),
    /// Empty, truncated, not postcard, a signature not 64 bytes long, or
    /// bytes after its end; the text says which.
    #[error("the envelope is not well formed ({0})")]
    Bad(String),
}

/// Sign `claims` with `key`: the envelope's bytes.
pub fn seal(claims: &Claims, key: &OperatorKey) -> Result<Vec<u8>, super::key::KeyError> {
    let body = postcard::to_allocvec(claims)
        .map_err(|e| super::key::KeyError::Crypto("encode the claims", e.to_string()))?;
    let sig = key.sign(&body)?;
    postcard::to_allocvec(&Wire {
        version: VERSION,
        claims: &body,
        signature: &sig,
    })
    .map_err(|e| super::key::KeyError::Crypto("encode the envelope", e.to_string()))
}

/// An envelope of `claims` carrying someone else's `signature`: what a
/// forger sends. For tests of the refusals.
#[doc(hidden)]
pub fn forge(claims: &Claims, signature: &[u8; 64]) -> Vec<u8> {
    let body = postcard::to_allocvec(claims).expect("claims encode");
    postcard::to_allocvec(&Wire {
        version: VERSION,
        claims: &body,
        signature,
    })
    .expect("envelope encodes")
}

/// Take an envelope apart (no verification: see `verify`).
pub fn open(bytes: &[u8]) -> Result<Opened<'_>, Malformed> {
    if bytes.len() > MAX_LEN {
        return Err(Malformed::TooLarge(bytes.len()));
    }
    // The version first, alone: a newer envelope may not decode as ours.
    match bytes.first() {
        Some(&VERSION) => {}
        Some(&v) => return Err(Malformed::Version(v)),
        None => return Err(Malformed::Bad("empty".into())),
    }
    let (wire, rest): (Wire, _) =
        postcard::take_from_bytes(bytes).map_err(|e| Malformed::Bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Malformed::Bad(format!(
            "{} bytes after its end",
            rest.len()
        )));
    }
    let signature = <[u8; 64]>::try_from(wire.signature)
        .map_err(|_| Malformed::Bad(format!("a {}-byte signature", wire.signature.len())))?;
    let (claims, rest): (Claims, _) = postcard::take_from_bytes(wire.claims)
        .map_err(|e| Malformed::Bad(format!("claims: {e}")))?;
    if !rest.is_empty() {
        return Err(Malformed::Bad("bytes after the claims".into()));
    }
    Ok(Opened {
        claims,
        signed: wire.claims,
        signature,
    })
}

/// The first byte of an *unsigned* envelope: what a command carries that
/// nobody signed (today the artifact it references, issue 24). It shares
/// the field a signed envelope travels in, so every hop (journal, results,
/// `Forward`, the outbox, the NATS header) carries it unchanged; it
/// authorises nothing, and wherever signatures are required it counts as
/// no signature at all.
pub const UNSIGNED: u8 = 2;

#[derive(Serialize, Deserialize)]
struct Unsigned {
    version: u8,
    artifact: Option<[u8; 32]>,
}

/// An unsigned envelope naming `artifact`.
pub fn unsigned(artifact: Option<[u8; 32]>) -> Vec<u8> {
    postcard::to_allocvec(&Unsigned {
        version: UNSIGNED,
        artifact,
    })
    .expect("an unsigned envelope encodes")
}

/// The signed envelope in a command's envelope field: `None` when there
/// is none or it is unsigned. Anything else (a signed envelope, or bytes
/// of an unknown version) is returned, to be verified or refused.
pub fn sealed(envelope: Option<&[u8]>) -> Option<&[u8]> {
    envelope.filter(|e| e.first() != Some(&UNSIGNED))
}

/// The artifact (manifest digest) an envelope names, signed or not.
pub fn artifact(envelope: &[u8]) -> Result<Option<[u8; 32]>, Malformed> {
    if envelope.first() == Some(&UNSIGNED) {
        let (u, rest): (Unsigned, _) =
            postcard::take_from_bytes(envelope).map_err(|e| Malformed::Bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Malformed::Bad(format!(
                "{} bytes after its end",
                rest.len()
            )));
        }
        return Ok(u.artifact);
    }
    Ok(open(envelope)?.claims.artifact)
}

/// SHA-256 of a payload, as the claims carry it.
pub fn payload_digest(payload: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(key: &OperatorKey) -> Claims {
        Claims {
            id: CommandId::new(1_700_000_000_000, 7),
            target: "edge-1/tag:line-3".into(),
            payload_sha256: payload_digest(b"reboot"),
            artifact: None,
            priority: Priority::High,
            not_before: None,
            expires_at: 1_700_000_360_000,
            audience: "edge-1".into(),
            key_id: key.public.id,
        }
    }

    #[test]
    fn sealed_envelopes_open_to_the_same_claims_over_the_same_bytes() {
        let k = OperatorKey::generate("alice").unwrap();
        let c = claims(&k);
        let env = seal(&c, &k).unwrap();
        let o = open(&env).unwrap();
        assert_eq!(o.claims, c);
        assert!(super::super::key::verify(
            &k.public.raw,
            o.signed,
            &o.signature
        ));
        // The claims bytes are inside the envelope as they were signed.
        let body = postcard::to_allocvec(&c).unwrap();
        assert_eq!(o.signed, &body[..]);
    }

    #[test]
    fn damaged_envelopes_are_named() {
        let k = OperatorKey::generate("alice").unwrap();
        let env = seal(&claims(&k), &k).unwrap();
        assert_eq!(open(&[]).unwrap_err(), Malformed::Bad("empty".into()));
        let mut v2 = env.clone();
        v2[0] = 2;
        assert_eq!(open(&v2).unwrap_err(), Malformed::Version(2));
        assert!(matches!(
            open(&env[..env.len() - 1]),
            Err(Malformed::Bad(_))
        ));
        let mut long = env.clone();
        long.push(0);
        assert!(matches!(open(&long), Err(Malformed::Bad(_))));
        assert!(matches!(
            open(&vec![1; MAX_LEN + 1]),
            Err(Malformed::TooLarge(_))
        ));
    }

    #[test]
    fn an_unsigned_envelope_names_its_artifact_and_never_passes_for_signed() {
        let k = OperatorKey::generate("alice").unwrap();
        let u = unsigned(Some([7; 32]));
        assert_eq!(artifact(&u).unwrap(), Some([7; 32]));
        assert_eq!(sealed(Some(&u)), None);
        assert!(open(&u).is_err(), "an unsigned envelope is no signed one");
        let mut c = claims(&k);
        c.artifact = Some([9; 32]);
        let env = seal(&c, &k).unwrap();
        assert_eq!(sealed(Some(&env)), Some(&env[..]));
        assert_eq!(artifact(&env).unwrap(), Some([9; 32]));
        assert_eq!(sealed(None), None);
        // Unknown versions are handed on, to be refused by name.
        assert_eq!(sealed(Some(&[3u8][..])), Some(&[3u8][..]));
    }
}

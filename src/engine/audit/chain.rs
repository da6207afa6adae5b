//! The audit chain, sans IO: the entry, how it is stored and hashed, the
//! chain's tip, retention's cut and the verification walk. Bytes in,
//! verdicts out; the store keeps the bytes (`store::Store::audit_*`).
//!
//! A stored entry is `postcard(Entry) ‖ SHA-256(postcard(Entry))`. The
//! trailing digest tells an edited entry apart from a reordered one: an
//! entry whose bytes were changed fails its own digest (named at its seq);
//! one whose digest was recomputed too, or that was moved, fails the next
//! entry's `prev` (named at that seq). A gap in seq is a removal.

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A SHA-256 digest: an entry's own, the link to the one before it, or a
/// request's payload.
pub type Hash = [u8; 32];

/// The hash the first entry of a fresh chain carries as `prev`.
pub const GENESIS: Hash = [0; 32];

/// What happened, before the chain gives it a place (seq, prev).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// When, ms since the epoch.
    pub at: u64,
    /// `uid 1000`, `http token`, `hub`, `device dev-7`, …
    pub who: String,
    /// `socket`, `http 10.0.0.5:51234`, `upstream`, `device link`, …
    pub from: String,
    /// The request's name: `send`, `enroll`, `revoke`, …
    pub what: String,
    /// The target, device or command it acts on ("" when none).
    pub target: String,
    /// The command, workflow run or rollout id the request named or was
    /// answered with, as text; `None` when none.
    pub command: Option<String>,
    /// SHA-256 of what the request carried (a send's payload, a workflow's
    /// text, a rollout's plan, an artifact's manifest); `None` when nothing.
    pub payload_sha256: Option<Hash>,
    /// False when the box refused the request (`why` says why).
    pub allowed: bool,
    /// The refusal's text, for a refused request.
    pub why: Option<String>,
}

/// One link of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its place in the chain: from 1, one more per entry, never reused.
    pub seq: u64,
    /// SHA-256 of the previous entry's stored bytes.
    pub prev: Hash,
    /// What it records.
    pub note: Note,
}

/// Where a kept chain starts: the seq of its first entry and the `prev`
/// that entry must carry (the hash of the last one retention removed, or
/// [`GENESIS`] while nothing was removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The seq of the kept chain's first entry (1 while nothing was
    /// removed).
    pub seq: u64,
    /// The `prev` that entry must carry.
    pub hash: Hash,
}

impl Default for Anchor {
    fn default() -> Self {
        Anchor {
            seq: 1,
            hash: GENESIS,
        }
    }
}

impl Anchor {
    /// The anchor as the store keeps it: the seq big-endian, then the hash
    /// (40 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.seq.to_be_bytes().to_vec();
        v.extend_from_slice(&self.hash);
        v
    }

    /// An anchor back from `encode`'s bytes; `None` unless they are 40
    /// bytes long.
    pub fn decode(b: &[u8]) -> Option<Anchor> {
        if b.len() != 40 {
            return None;
        }
        let seq = u64::from_be_bytes(b[..8].try_into().ok()?);
        Some(Anchor {
            seq,
            hash: b[8..].try_into().ok()?,
        })
    }
}

/// The SHA-256 of `b`.
pub fn sha256(b: &[u8]) -> Hash {
    digest(&SHA256, b)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The bytes an entry is stored as.
pub fn encode(e: &Entry) -> Vec<u8> {
    let mut body = postcard::to_allocvec(e).expect("an audit entry always serialises");
    let h = sha256(&body);
    body.extend_from_slice(&h);
    body
}

/// Why stored bytes are not an entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// The body no longer matches the digest stored after it.
    #[error("edited: its bytes no longer match its own hash")]
    HashMismatch,
    /// Too short to hold its digest, or the body is not an entry; the text
    /// says which (postcard's error for the latter).
    #[error("edited: it does not decode ({0})")]
    Undecodable(String),
}

/// An entry back from its stored bytes, its own digest checked.
pub fn decode(b: &[u8]) -> Result<Entry, Damage> {
    if b.len() < 32 {
        return Err(Damage::Undecodable("shorter than its hash".into()));
    }
    let (body, h) = b.split_at(b.len() - 32);
    if sha256(body) != h {
        return Err(Damage::HashMismatch);
    }
    postcard::from_bytes(body).map_err(|e| Damage::Undecodable(e.to_string()))
}

/// The chain's tip: the next seq and the hash a new entry links to. The
/// writer holds one and seals the round's notes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tip {
    /// The seq the next sealed entry gets.
    pub next: u64,
    /// The SHA-256 of the last entry's stored bytes (the anchor's hash
    /// while the kept chain is empty): the next entry's `prev`.
    pub last: Hash,
}

impl Tip {
    /// The tip after `last` (its seq and stored bytes), or after the anchor
    /// of an empty chain.
    pub fn after(last: Option<(u64, &[u8])>, anchor: Anchor) -> Tip {
        match last {
            Some((seq, bytes)) => Tip {
                next: seq + 1,
                last: sha256(bytes),
            },
            None => Tip {
                next: anchor.seq,
                last: anchor.hash,
            },
        }
    }

    /// Give `note` its place: its seq and stored bytes.
    pub fn seal(&mut self, note: Note) -> (u64, Vec<u8>) {
        let e = Entry {
            seq: self.next,
            prev: self.last,
            note,
        };
        let bytes = encode(&e);
        self.next += 1;
        self.last = sha256(&bytes);
        (e.seq, bytes)
    }
}

/// How much of the log to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Entries kept at most (`audit_keep`; 100,000 by default).
    pub keep: u64,
    /// Entries older than this, by their note's `at`, are removed
    /// (`audit_max_age`, in ms; 90 days by default).
    pub max_age_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep: 100_000,
            max_age_ms: 90 * 24 * 3600 * 1000,
        }
    }
}

/// Entries a round removes at most: pruning a long backlog (a lowered
/// `audit_keep`) is spread over rounds instead of one large batch.
pub const PRUNE_BATCH: usize = 64;

impl Retention {
    /// How many of `oldest` (the first entries: seq, stored bytes, in
    /// order) to remove now, with `count` entries in the log, and the anchor
    /// the kept chain then starts at. `None`: nothing to remove.
    pub fn cut(&self, oldest: &[(u64, Vec<u8>)], count: u64, now: u64) -> Option<(usize, Anchor)> {
        let mut n = 0;
        for (i, (_, bytes)) in oldest.iter().enumerate().take(PRUNE_BATCH) {
            // An entry that does not decode is never removed by retention:
            // it is the evidence `--verify` names.
            let Ok(e) = decode(bytes) else { break };
            let over = count.saturating_sub(i as u64) > self.keep;
            let aged = now.saturating_sub(e.note.at) > self.max_age_ms;
            if !(over || aged) {
                break;
            }
            n = i + 1;
        }
        let (seq, bytes) = oldest.get(n.checked_sub(1)?)?;
        Some((
            n,
            Anchor {
                seq: seq + 1,
                hash: sha256(bytes),
            },
        ))
    }
}

/// The verdict of a walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intact {
    /// How many entries the walk checked.
    pub entries: u64,
    /// The first and last seq (`None` for an empty log).
    pub span: Option<(u64, u64)>,
}

impl fmt::Display for Intact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.span {
            Some((a, b)) => write!(
                f,
                "{} {}, chain intact from seq {a} to {b}",
                self.entries,
                if self.entries == 1 {
                    "entry"
                } else {
                    "entries"
                }
            ),
            None => write!(f, "0 entries, chain intact (empty)"),
        }
    }
}

/// The first thing wrong, at the first bad seq.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {what}")]
pub struct Broken {
    /// The first bad seq (for a gap, the first one missing).
    pub seq: u64,
    /// What is wrong there, as `outpost audit --verify` prints it.
    pub what: String,
}

/// Walk stored entries (key seq, bytes) in key order from `anchor`;
/// `head` is the next seq the writer recorded, so a removed tail is seen
/// too.
pub fn verify<B: AsRef<[u8]>>(
    anchor: Anchor,
    head: Option<u64>,
    stored: impl IntoIterator<Item = (u64, B)>,
) -> Result<Intact, Broken> {
    let mut expect = anchor.seq;
    let mut prev = anchor.hash;
    let mut entries = 0u64;
    let mut first = None;
    for (key, bytes) in stored {
        let bytes = bytes.as_ref();
        let broken = |seq, what: String| Err(Broken { seq, what });
        if key < expect {
            return broken(key, format!("before the chain's start at seq {expect}"));
        }
        if key > expect {
            let what = if key == expect + 1 {
                format!("removed: a gap in seq, {expect} is missing")
            } else {
                format!("removed: a gap in seq, {expect} to {} are missing", key - 1)
            };
            return broken(expect, what);
        }
        let e = match decode(bytes) {
            Ok(e) => e,
            Err(d) => return broken(key, d.to_string()),
        };
        if e.seq != key {
            return broken(
                key,
                format!("reordered: the entry stored here is seq {}", e.seq),
            );
        }
        if e.prev != prev {
            return broken(
                key,
                "reordered or replaced: prev mismatch (it does not link to the entry before it)"
                    .into(),
            );
        }
        prev = sha256(bytes);
        first.get_or_insert(key);
        entries += 1;
        expect = key + 1;
    }
    if let Some(head) = head {
        if head > expect {
            return Err(Broken {
                seq: expect,
                what: format!(
                    "removed: the log ends before seq {expect} but {} were written",
                    head - 1
                ),
            });
        }
    }
    Ok(Intact {
        entries,
        span: first.map(|a| (a, expect - 1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(i: u64) -> Note {
        Note {
            at: 1_000 + i,
            who: "uid 1000".into(),
            from: "socket".into(),
            what: "send".into(),
            target: format!("dev-{i}"),
            command: None,
            payload_sha256: Some(sha256(b"reboot")),
            allowed: i % 3 != 0,
            why: (i % 3 == 0).then(|| "queue full".into()),
        }
    }

    fn chain(n: u64) -> Vec<(u64, Vec<u8>)> {
        let mut tip = Tip::after(None, Anchor::default());
        (1..=n).map(|i| tip.seal(note(i))).collect()
    }

    fn walk(log: &[(u64, Vec<u8>)], anchor: Anchor, head: u64) -> Result<Intact, Broken> {
        verify(anchor, Some(head), log.iter().map(|(k, v)| (*k, &v[..])))
    }

    #[test]
    fn appended_entries_verify_and_read_back() {
        let log = chain(5);
        let v = walk(&log, Anchor::default(), 6).unwrap();
        assert_eq!(v.to_string(), "5 entries, chain intact from seq 1 to 5");
        let e = decode(&log[2].1).unwrap();
        assert_eq!((e.seq, e.note), (3, note(3)));
        assert_eq!(e.prev, sha256(&log[1].1));
        assert_eq!(
            walk(&[], Anchor::default(), 1).unwrap().to_string(),
            "0 entries, chain intact (empty)"
        );
    }

    #[test]
    fn a_tip_resumed_from_the_last_entry_continues_the_chain() {
        let mut log = chain(3);
        let mut tip = Tip::after(Some((3, &log[2].1)), Anchor::default());
        log.push(tip.seal(note(4)));
        walk(&log, Anchor::default(), 5).unwrap();
    }

    #[test]
    fn an_edited_entry_is_named_by_its_seq() {
        let mut log = chain(5);
        let v = &mut log[2].1;
        // "dev-3" → "dev-4": still decodes, no longer its own hash.
        let at = v.windows(5).position(|w| w == b"dev-3").unwrap();
        v[at + 4] = b'4';
        let b = walk(&log, Anchor::default(), 6).unwrap_err();
        assert_eq!(b.seq, 3);
        assert!(b.what.contains("edited"), "{b}");
    }

    #[test]
    fn an_edit_with_its_hash_recomputed_breaks_the_next_link() {
        let mut log = chain(5);
        let mut e = decode(&log[2].1).unwrap();
        e.note.allowed = !e.note.allowed;
        log[2].1 = encode(&e);
        let b = walk(&log, Anchor::default(), 6).unwrap_err();
        assert_eq!(b.seq, 4);
        assert!(b.what.contains("prev mismatch"), "{b}");
    }

    #[test]
    fn a_removed_entry_is_a_gap_and_a_removed_tail_is_seen_by_the_head() {
        let mut log = chain(5);
        log.remove(2);
        let b = walk(&log, Anchor::default(), 6).unwrap_err();
        assert_eq!(b.seq, 3);
        assert!(b.what.contains("gap"), "{b}");
        let mut log = chain(5);
        log.pop();
        let b = walk(&log, Anchor::default(), 6).unwrap_err();
        assert_eq!(b.seq, 5);
        assert!(b.what.contains("removed"), "{b}");
    }

    #[test]
    fn a_reordered_pair_is_named() {
        // Values swapped under their keys.
        let mut log = chain(5);
        let (a, b) = (log[1].1.clone(), log[2].1.clone());
        log[1].1 = b;
        log[2].1 = a;
        let e = walk(&log, Anchor::default(), 6).unwrap_err();
        assert_eq!(e.seq, 2);
        assert!(e.what.contains("reordered"), "{e}");
        // Renumbered to look in place, each with its hash recomputed: the
        // links give it away.
        let mut log = chain(5);
        let mut x = decode(&log[1].1).unwrap();
        let mut y = decode(&log[2].1).unwrap();
        std::mem::swap(&mut x.seq, &mut y.seq);
        log[1].1 = encode(&y);
        log[2].1 = encode(&x);
        let e = walk(&log, Anchor::default(), 6).unwrap_err();
        assert_eq!(e.seq, 2);
        assert!(e.what.contains("prev mismatch"), "{e}");
    }

    #[test]
    fn a_retention_cut_keeps_the_rest_verifiable_and_bounds_its_work() {
        let log = chain(10);
        let r = Retention {
            keep: 7,
            max_age_ms: u64::MAX,
        };
        let (n, anchor) = r.cut(&log, 10, 0).unwrap();
        assert_eq!(n, 3);
        assert_eq!(anchor.seq, 4);
        let kept = &log[n..];
        let v = walk(kept, anchor, 11).unwrap();
        assert_eq!(v.to_string(), "7 entries, chain intact from seq 4 to 10");
        // Without its anchor the kept chain is a gap.
        assert!(walk(kept, Anchor::default(), 11).is_err());
        assert_eq!(Anchor::decode(&anchor.encode()), Some(anchor));
        // By age: entries at 1_001..=1_010, older than 5 ms at 1_010.
        let r = Retention {
            keep: 100,
            max_age_ms: 5,
        };
        assert_eq!(r.cut(&log, 10, 1_010).unwrap().0, 4);
        assert_eq!(r.cut(&log, 10, 1_005), None);
        // Never more than a batch at once.
        let long = chain(200);
        let r = Retention {
            keep: 1,
            max_age_ms: u64::MAX,
        };
        assert_eq!(r.cut(&long, 200, 0).unwrap().0, PRUNE_BATCH);
    }
}

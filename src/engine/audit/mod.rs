//! The audit log (DESIGN §10, issue 23): one append-only hash chain in the
//! store, bounded by a retention, verifiable offline.
//!
//! `chain` is the sans-IO part (the entry, hashing, retention's cut, the
//! verification walk); what each admin request records is the admin shell's
//! (`shell::admin::audit`).
//! The writer (`shell::queue::service`) seals notes into the chain and writes them
//! with its rounds; the store keeps the bytes in a tree of their own.

pub mod chain;

pub use chain::{
    decode, sha256, verify, Anchor, Broken, Entry, Hash, Intact, Note, Retention, Tip,
};

use serde::{Deserialize, Serialize};

/// What one round writes to the audit tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Write {
    /// Sealed entries: seq, stored bytes.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// Seqs retention removes.
    pub remove: Vec<u64>,
    /// The new start of the kept chain, when `remove` is not empty.
    pub anchor: Option<Anchor>,
    /// The next seq after this write, so a removed tail is seen.
    pub head: u64,
}

impl Write {
    /// Whether the round sealed no entry and removed none (then nothing is
    /// written, the head included).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.remove.is_empty()
    }
}

/// An entry as `outpost audit` shows it (`--json`: one of these a line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The entry's place in the chain.
    pub seq: u64,
    /// When it was recorded, ms since the Unix epoch (`Note::at`).
    pub at: u64,
    /// Who asked, as `Note::who` (`uid 1000`, `hub`, …).
    pub who: String,
    /// Over what, as `Note::from` (`socket`, `upstream`, …).
    pub from: String,
    /// The request's name (`send`, `revoke`, …).
    pub what: String,
    /// The target, device or command it acts on ("" when none).
    pub target: String,
    /// The command, workflow run or rollout id it named or was answered
    /// with, as text; `None` when none.
    pub command: Option<String>,
    /// The SHA-256 of what the request carried, in hex; `None` for a
    /// request with no payload.
    pub payload_sha256: Option<String>,
    /// False when the box refused the request.
    pub allowed: bool,
    /// The refusal's text, for a refused request.
    pub why: Option<String>,
}

impl From<Entry> for View {
    fn from(e: Entry) -> View {
        let n = e.note;
        View {
            seq: e.seq,
            at: n.at,
            who: n.who,
            from: n.from,
            what: n.what,
            target: n.target,
            command: n.command,
            payload_sha256: n.payload_sha256.map(hex::encode),
            allowed: n.allowed,
            why: n.why,
        }
    }
}

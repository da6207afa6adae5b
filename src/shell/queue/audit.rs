//! The writer's part of the audit log: the chain's tip, the notes waiting
//! for a round, and retention, over the store's audit tree.
//!
//! When an entry is written: the admin layer records a request once it has
//! its answer, so an entry reaches the writer after the round that decided
//! it. It is written with the writer's next round that writes anything —
//! under load there always is one, so auditing adds no flush to intake —
//! or, on a box with nothing else to write, `LINGER` later in a round of
//! its own. Allowed and refused requests are treated alike: a refusal has
//! no durable answer to wait for, and an allowed request's answer was
//! already durable before its entry existed, so holding either for the
//! next round costs nothing but a crash window of one round (≤ `LINGER`
//! when idle). A reader of the log (`audit`, `--verify` on a running box)
//! first has every waiting note written. An idle box writes nothing.

use super::QueueError;
use crate::engine::audit::{self, Anchor, Note, Retention, Tip};
use crate::engine::queue::core::{CoreReply, CoreRequest};
use crate::shell::store::{Store, StoreError};
use std::time::{Duration, Instant};

/// Longest a note waits for a round when nothing else is written.
pub const LINGER: Duration = Duration::from_millis(200);
/// Notes held at most before a round of their own is due at once.
const MAX_PENDING: usize = 4096;

pub(crate) struct AuditLog {
    tip: Tip,
    /// The first kept seq and its entry's time, for retention.
    first: u64,
    oldest_at: Option<u64>,
    pending: Vec<Note>,
    since: Option<Instant>,
    retention: Retention,
}

impl AuditLog {
    pub(crate) fn load(store: &Store, retention: Retention) -> Result<AuditLog, StoreError> {
        let anchor = store.audit_anchor()?;
        let last = store.audit_last()?;
        let tip = Tip::after(last.as_ref().map(|(s, b)| (*s, &b[..])), anchor);
        let first = store.audit_from(0).next().transpose()?;
        Ok(AuditLog {
            tip,
            first: first.as_ref().map_or(tip.next, |f| f.0),
            oldest_at: first.and_then(|(_, b)| audit::decode(&b).ok().map(|e| e.note.at)),
            pending: Vec::new(),
            since: None,
            retention,
        })
    }

    pub(crate) fn push(&mut self, note: Note) {
        self.since.get_or_insert_with(Instant::now);
        self.pending.push(note);
    }

    /// How long the writer may sleep before these notes are due.
    pub(crate) fn due_in(&self) -> Option<Duration> {
        if self.pending.len() >= MAX_PENDING {
            return Some(Duration::ZERO);
        }
        self.since.map(|t| LINGER.saturating_sub(t.elapsed()))
    }

    /// What this round writes to the audit tree: every waiting note if the
    /// round writes anyway (`riding`), a reader waits (`force`) or they
    /// are due; and then at most a batch of retention's removals.
    pub(crate) fn prepare(
        &self,
        store: &Store,
        riding: bool,
        force: bool,
        now: u64,
    ) -> Result<Option<(audit::Write, Tip)>, StoreError> {
        let due = self.due_in().is_some_and(|d| d.is_zero());
        if self.pending.is_empty() || !(riding || force || due) {
            return Ok(None);
        }
        let mut tip = self.tip;
        let entries: Vec<_> = self.pending.iter().map(|n| tip.seal(n.clone())).collect();
        let mut w = audit::Write {
            entries,
            head: tip.next,
            ..Default::default()
        };
        let count = tip.next - self.first;
        let aged = self
            .oldest_at
            .is_some_and(|at| now.saturating_sub(at) > self.retention.max_age_ms);
        if count > self.retention.keep || aged {
            let oldest: Vec<_> = store
                .audit_from(self.first)
                .take(audit::chain::PRUNE_BATCH)
                .collect::<Result<_, _>>()?;
            if let Some((n, anchor)) = self.retention.cut(&oldest, count, now) {
                w.remove = oldest[..n].iter().map(|(s, _)| *s).collect();
                w.anchor = Some(anchor);
            }
        }
        Ok(Some((w, tip)))
    }

    /// The round's write is durable: move the tip and the retention's start.
    pub(crate) fn committed(&mut self, store: &Store, w: &audit::Write, tip: Tip) {
        self.tip = tip;
        self.pending.clear();
        self.since = None;
        if let Some(Anchor { seq, .. }) = w.anchor {
            self.first = seq;
            self.oldest_at = match store.audit_from(seq).next() {
                Some(Ok((_, b))) => audit::decode(&b).ok().map(|e| e.note.at),
                _ => None,
            };
        } else if self.oldest_at.is_none() {
            self.oldest_at = w
                .entries
                .first()
                .and_then(|(_, b)| audit::decode(b).ok())
                .map(|e| e.note.at);
        }
    }

    /// After a failed round: the tip from what is on disk; the notes stay
    /// waiting for the next round.
    pub(crate) fn reload(&mut self, store: &Store) {
        match AuditLog::load(store, self.retention) {
            Ok(fresh) => {
                let pending = std::mem::take(&mut self.pending);
                let since = self.since;
                *self = AuditLog {
                    pending,
                    since,
                    ..fresh
                };
            }
            Err(e) => tracing::error!("re-reading the audit log's tip: {e}"),
        }
    }
}

/// An intake request that does not come through the admin socket (that
/// one records its own): who sent it, from where, its target and payload
/// digest. A workflow's steps are not entries: the run's start is.
pub(crate) struct Intake {
    who: String,
    from: &'static str,
    target: String,
    payload_sha256: audit::Hash,
}

pub(crate) fn intake_of(req: &CoreRequest) -> Option<Intake> {
    let (who, from, r) = match req {
        CoreRequest::DeviceSend { from, req, .. } => (format!("device {from}"), "device link", req),
        CoreRequest::SendAs { req, .. } if req.origin.starts_with("upstream") => {
            ("hub".into(), "upstream", req)
        }
        CoreRequest::SendAs { req, .. } if req.origin == "nats" => ("nats".into(), "nats", req),
        _ => return None,
    };
    Some(Intake {
        who,
        from,
        target: r.target.clone(),
        payload_sha256: audit::sha256(&r.payload),
    })
}

impl Intake {
    /// Its entry, once the round decided it.
    pub(crate) fn note(self, result: &Result<CoreReply, QueueError>, now: u64) -> Note {
        let (command, why) = match result {
            Ok(CoreReply::Receipt(r)) => (Some(r.id.to_string()), None),
            Ok(_) => (None, None),
            Err(e) => (None, Some(e.to_string())),
        };
        Note {
            at: now,
            who: self.who,
            from: self.from.into(),
            what: "send".into(),
            target: self.target,
            command,
            payload_sha256: Some(self.payload_sha256),
            allowed: why.is_none(),
            why,
        }
    }
}

/// Entries at or after `since` (ms), the newest `limit` of them, oldest
/// first.
pub fn read(
    store: &Store,
    since: Option<u64>,
    limit: Option<u64>,
) -> Result<Vec<audit::View>, StoreError> {
    let mut out = std::collections::VecDeque::new();
    for r in store.audit_from(0) {
        let (seq, bytes) = r?;
        // A damaged entry is shown as what it is, not skipped: `--verify`
        // names the damage.
        let view = match audit::decode(&bytes) {
            Ok(e) => audit::View::from(e),
            Err(d) => audit::View {
                seq,
                at: 0,
                who: String::new(),
                from: String::new(),
                what: format!("(damaged: {d})"),
                target: String::new(),
                command: None,
                payload_sha256: None,
                allowed: false,
                why: None,
            },
        };
        if since.is_some_and(|s| view.at < s) {
            continue;
        }
        out.push_back(view);
        if limit.is_some_and(|l| out.len() as u64 > l) {
            out.pop_front();
        }
    }
    Ok(out.into())
}

/// Walk the whole log in the store.
pub fn verify(store: &Store) -> Result<Result<audit::Intact, audit::Broken>, StoreError> {
    let anchor = store.audit_anchor()?;
    let head = store.audit_head()?;
    let mut failed = None;
    let stored = store.audit_from(0).map_while(|r| match r {
        Ok(x) => Some(x),
        Err(e) => {
            failed = Some(e);
            None
        }
    });
    let verdict = audit::verify(anchor, head, stored);
    match failed {
        Some(e) => Err(e),
        None => Ok(verdict),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(i: u64) -> Note {
        Note {
            at: i,
            who: "uid 1000".into(),
            from: "socket".into(),
            what: "send".into(),
            target: "dev-1".into(),
            command: None,
            payload_sha256: None,
            allowed: true,
            why: None,
        }
    }

    /// One writer round with audit notes in it, as `Writer::round` does.
    fn round(log: &mut AuditLog, store: &Store, notes: impl IntoIterator<Item = Note>, now: u64) {
        for n in notes {
            log.push(n);
        }
        let (w, tip) = log.prepare(store, true, false, now).unwrap().unwrap();
        store.audit_write(&w).unwrap();
        store.flush().unwrap();
        log.committed(store, &w, tip);
    }

    #[test]
    fn retention_prunes_a_batch_a_round_and_the_kept_chain_verifies_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Default::default()).unwrap();
        let r = Retention {
            keep: 10,
            max_age_ms: 1_000_000,
        };
        let mut log = AuditLog::load(&store, r).unwrap();
        // Nothing waits: a round writes no audit part.
        assert!(log.prepare(&store, true, true, 0).unwrap().is_none());
        round(&mut log, &store, (1..=200).map(note), 200);
        // Retention removes only what is already stored, a batch a round.
        assert_eq!(read(&store, None, None).unwrap().len(), 200);
        round(&mut log, &store, [note(201)], 201);
        let left = read(&store, None, None).unwrap();
        assert_eq!(left.len(), 201 - audit::chain::PRUNE_BATCH);
        assert_eq!(
            left[0].seq,
            1 + audit::chain::PRUNE_BATCH as u64,
            "the oldest go first"
        );
        let v = verify(&store).unwrap().unwrap();
        assert_eq!(v.entries, left.len() as u64);
        for i in 202..=210 {
            round(&mut log, &store, [note(i)], i);
        }
        assert_eq!(read(&store, None, None).unwrap().len(), 10);
        drop(log);
        drop(store);
        // A restart resumes the tip; age then prunes what is older.
        let store = Store::open(dir.path(), &Default::default()).unwrap();
        let mut log = AuditLog::load(
            &store,
            Retention {
                keep: 10,
                max_age_ms: 5,
            },
        )
        .unwrap();
        round(&mut log, &store, [note(211)], 211);
        let left = read(&store, None, None).unwrap();
        assert_eq!(
            left.iter().map(|v| v.seq).collect::<Vec<_>>(),
            (206..=211).collect::<Vec<_>>()
        );
        assert_eq!(
            verify(&store).unwrap().unwrap().to_string(),
            "6 entries, chain intact from seq 206 to 211"
        );
        assert_eq!(
            read(&store, Some(209), Some(2))
                .unwrap()
                .iter()
                .map(|v| v.seq)
                .collect::<Vec<_>>(),
            [210, 211]
        );
    }
}

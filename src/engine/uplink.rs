//! What an edge makes of its hub's link, sans IO: the request for a
//! command the hub forwards down (and the end it reports when it cannot
//! take it), and the frames its records go up in (cut to the hub's
//! budget, in the hub's protocol minor). The uplinks (`shell::upstream`,
//! its NATS twin) and the simulation call these, so both speak alike.

use crate::engine::command::{Outcome, SendOptions};
use crate::engine::frames::Forward;
use crate::engine::journal::{UpEntry, UpItem};
use crate::engine::queue::{QueueError, SendRequest};

/// The origin this box gives a command its hub sent down (`upstream/cli`).
pub const FROM_UPSTREAM: &str = "upstream/";

/// The edge's request for a forwarded command.
pub fn request(f: Forward) -> SendRequest {
    SendRequest {
        target: f.target,
        payload: f.payload,
        opts: SendOptions {
            priority: f.priority,
            ttl_ms: f.ttl_ms,
            max_attempts: Some(f.max_attempts),
            key: None,
            after: f.after,
            not_before: f.not_before,
        },
        origin: format!("{FROM_UPSTREAM}{}", f.origin),
        signature: f.signature,
    }
}

/// The failure code of a forwarded command the edge could not take now
/// (EX_TEMPFAIL, as `exit::TEMPFAIL`): the hub retries it after its backoff.
pub const TEMPFAIL: i32 = 75;

/// How a forwarded command the edge could not take ends on the hub: a
/// refusal that will not change is final; a passing one (full, shutting
/// down) is retried by the hub after its backoff.
pub fn refusal(e: QueueError) -> Outcome {
    if e.is_passing() {
        Outcome::Failed {
            code: TEMPFAIL,
            message: format!("the box below could not take it now: {e}"),
        }
    } else {
        Outcome::Rejected {
            reason: format!("the box below refused it: {e}"),
        }
    }
}

/// Records as a hub speaking protocol 1.`minor` reads them: one before
/// `Presence` gets the `Seen` it implies, under the same seq (a record
/// left out would leave its seq unacknowledged for good).
pub fn for_hub(mut entries: Vec<UpEntry>, minor: u16) -> Vec<UpEntry> {
    if minor < crate::engine::frames::MINOR_PRESENCE {
        for e in &mut entries {
            if let UpItem::Presence { device, at, .. } = &e.item {
                e.item = UpItem::Seen {
                    device: device.clone(),
                    at: *at,
                };
            }
        }
    }
    entries
}

/// Split records into frames under `budget` bytes. A record too large for
/// any frame (a huge result or event) is cut down, saying so, rather than
/// block the stream forever.
pub fn frames(entries: Vec<UpEntry>, budget: usize) -> Vec<Vec<UpEntry>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0usize;
    for mut e in entries {
        let mut n = postcard::experimental::serialized_size(&e).unwrap_or(budget);
        if n > budget {
            shrink(&mut e, budget / 2);
            n = postcard::experimental::serialized_size(&e).unwrap_or(budget);
        }
        if size + n > budget && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += n;
        cur.push(e);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Truncate to at most `keep` bytes, on a character boundary.
fn cut(s: &mut String, keep: usize) {
    let mut n = keep.min(s.len());
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s.truncate(n);
}

fn shrink(e: &mut UpEntry, keep: usize) {
    let note = |n: usize| format!(" [cut by the uplink: {n} bytes over the frame limit]");
    match &mut e.item {
        UpItem::Result(r) => {
            match &mut r.outcome {
                Some(Outcome::Ok(b)) if b.len() > keep => {
                    let n = b.len();
                    b.truncate(keep);
                    r.error = Some(note(n).trim().to_string());
                }
                Some(Outcome::Failed { message, .. }) if message.len() > keep => {
                    let n = message.len();
                    cut(message, keep);
                    message.push_str(&note(n));
                }
                Some(Outcome::Rejected { reason }) if reason.len() > keep => {
                    let n = reason.len();
                    cut(reason, keep);
                    reason.push_str(&note(n));
                }
                _ => {}
            }
            if let Some(err) = &mut r.error {
                if err.len() > keep {
                    cut(err, keep);
                }
            }
        }
        UpItem::Event { payload, .. } if payload.len() > keep => payload.truncate(keep),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::command::CommandId;

    #[test]
    fn a_hub_before_presence_gets_seen_under_the_same_seq() {
        let entries = vec![UpEntry {
            seq: 7,
            item: UpItem::Presence {
                device: "d0".into(),
                online: true,
                at: 42,
            },
        }];
        let old = for_hub(entries.clone(), crate::engine::frames::MINOR_PRESENCE - 1);
        assert_eq!(
            old,
            vec![UpEntry {
                seq: 7,
                item: UpItem::Seen {
                    device: "d0".into(),
                    at: 42
                }
            }]
        );
        assert_eq!(
            for_hub(entries.clone(), crate::engine::frames::MINOR_PRESENCE),
            entries
        );
    }

    fn event(seq: u64, n: usize) -> UpEntry {
        UpEntry {
            seq,
            item: UpItem::Event {
                device: "d".into(),
                at: 0,
                payload: vec![7; n],
            },
        }
    }

    #[test]
    fn records_are_framed_under_the_budget_in_order_and_a_giant_is_cut() {
        let entries: Vec<UpEntry> = (1..=100)
            .map(|s| event(s, 100))
            .chain([event(101, 10_000)])
            .collect();
        let fs = frames(entries, 2_000);
        let seqs: Vec<u64> = fs.iter().flatten().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=101).collect::<Vec<_>>());
        for f in &fs {
            let n: usize = f
                .iter()
                .map(|e| postcard::experimental::serialized_size(e).unwrap())
                .sum();
            assert!(n <= 2_000, "frame of {n} bytes");
        }
        let UpItem::Event { payload, .. } = &fs.last().unwrap()[0].item else {
            panic!()
        };
        assert_eq!(payload.len(), 1_000);
    }

    #[test]
    fn a_forward_keeps_its_options_and_refusals_say_whether_to_retry() {
        let f = Forward {
            id: CommandId(9),
            target: "tag:line".into(),
            priority: crate::engine::command::Priority::High,
            payload: b"x".to_vec(),
            ttl_ms: Some(5_000),
            max_attempts: 3,
            after: Some(CommandId(8)),
            not_before: Some(77),
            origin: "cli".into(),
            signature: None,
        };
        let r = request(f);
        assert_eq!(r.target, "tag:line");
        assert_eq!(r.opts.ttl_ms, Some(5_000));
        assert_eq!(r.opts.max_attempts, Some(3));
        assert_eq!(r.opts.after, Some(CommandId(8)));
        assert_eq!(r.origin, "upstream/cli");
        assert!(matches!(
            refusal(QueueError::QueueFull {
                queued: 1,
                limit: 1
            }),
            Outcome::Failed { code: 75, .. }
        ));
        assert!(matches!(
            refusal(QueueError::NoRoute("x".into())),
            Outcome::Rejected { .. }
        ));
    }
}

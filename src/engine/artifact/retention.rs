//! When an artifact no command needs any more is removed (engine).
//!
//! An artifact is kept while a live command names it. Once none does, it
//! stays for the retention (`--artifact-retention`), counted from the
//! latest of: when it was added, when a command last named it, and when
//! the box first saw it unneeded (a command that ran for days still
//! gets the whole retention after it ends). Then it is removed, and with
//! it the chunks no other artifact shares.

use super::manifest::Digest;
use crate::engine::command::Millis;

/// Default `--artifact-retention`: a week, time for an operator to send
/// the same file again without adding it again.
pub const DEFAULT_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// What the box knows of one artifact at a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The artifact's manifest digest: its identity on the shelf.
    pub digest: Digest,
    /// When it was added to the shelf, ms since the Unix epoch.
    pub added_at: Millis,
    /// The newest time a command was noted as naming it.
    pub last_named: Option<Millis>,
    /// When a pass first found no live command naming it.
    pub unneeded_since: Option<Millis>,
    /// Whether a live command names it now.
    pub live: bool,
}

/// What one pass decides for one artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A live command names it (clear any "unneeded since" mark).
    Needed,
    /// Unneeded, and the box had not noticed (or a command named it since
    /// the mark): write the mark at this time.
    Mark(Millis),
    /// Unneeded, within the retention.
    Keep,
    /// Unneeded past the retention.
    Remove,
}

/// The verdict on `h` at `now`.
pub fn verdict(h: &Held, now: Millis, retention_ms: u64) -> Verdict {
    if h.live {
        return Verdict::Needed;
    }
    let Some(since) = h.unneeded_since else {
        return Verdict::Mark(now);
    };
    // The references a pass sweeps are gone by the next one: the mark is
    // what remembers when a command last named it.
    if let Some(named) = h.last_named.filter(|&n| n > since) {
        return Verdict::Mark(named);
    }
    if now.saturating_sub(since.max(h.added_at)) >= retention_ms {
        Verdict::Remove
    } else {
        Verdict::Keep
    }
}

/// How long the box sleeps between passes: often enough that an
/// artifact outlives its retention by at most a quarter of it, and at
/// most hourly, so an idle box wakes rarely.
pub fn pass_interval_ms(retention_ms: u64) -> u64 {
    (retention_ms / 4).clamp(1_000, 3_600_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn held(live: bool, unneeded_since: Option<Millis>) -> Held {
        Held {
            digest: Digest([1; 32]),
            added_at: 0,
            last_named: Some(10 * H),
            unneeded_since,
            live,
        }
    }

    #[test]
    fn an_artifact_is_kept_while_named_then_for_the_retention_after() {
        let r = 24 * H;
        assert_eq!(verdict(&held(true, Some(0)), 100 * H, r), Verdict::Needed);
        // First seen unneeded: marked, not removed, however old it is.
        assert_eq!(
            verdict(&held(false, None), 100 * H, r),
            Verdict::Mark(100 * H)
        );
        assert_eq!(
            verdict(&held(false, Some(50 * H)), 73 * H, r),
            Verdict::Keep
        );
        assert_eq!(
            verdict(&held(false, Some(50 * H)), 74 * H, r),
            Verdict::Remove
        );
        // A command named it after the mark (sent and ended between two
        // passes): the mark moves to then, and the retention counts from it.
        let mut h = held(false, Some(50 * H));
        h.last_named = Some(60 * H);
        assert_eq!(verdict(&h, 74 * H, r), Verdict::Mark(60 * H));
        h.unneeded_since = Some(60 * H);
        h.last_named = None;
        assert_eq!(verdict(&h, 83 * H, r), Verdict::Keep);
        assert_eq!(verdict(&h, 84 * H, r), Verdict::Remove);
        // A fresh add counts from the add, even under an older mark.
        h.added_at = 70 * H;
        assert_eq!(verdict(&h, 84 * H, r), Verdict::Keep);
    }

    #[test]
    fn passes_come_at_most_hourly_and_at_least_a_second_apart() {
        assert_eq!(pass_interval_ms(0), 1_000);
        assert_eq!(pass_interval_ms(8_000), 2_000);
        assert_eq!(pass_interval_ms(7 * 24 * H), H);
    }
}

//! The shrinker: a failing run cut down to a short tape of choices that
//! still fails, printed as a test to paste into `tests/simulation.rs`.
//!
//! A run is its tape (`sim::rng`): the steps last as long as the tape, so
//! a shorter tape is a shorter run, and a smaller draw is a simpler choice
//! (`below(n)` of 0 is the first option). The passes, repeated until
//! nothing improves: the shortest failing prefix of whole steps
//! (bisection), then runs of whole steps deleted (half the steps down to
//! one), then draws made smaller (zero, then halved). Each candidate is one
//! run of the real world, kept only if it still fails; the budget bounds
//! the runs.

use super::{run_tape, Config};

/// What the shrinker did.
#[derive(Debug)]
pub struct Shrunk {
    /// The shortest, simplest failing tape found, for `sim::run_tape`.
    pub tape: Vec<u64>,
    /// Runs made.
    pub runs: u64,
    /// The violations of the shortest failing tape.
    pub violations: Vec<String>,
}

/// How a candidate tape did: `Some` if it still fails, with why and where
/// in it each step began.
pub type Verdict = Option<(Vec<String>, Vec<usize>)>;

/// Shrink `tape` under `cfg` while it keeps failing, within `budget` runs.
/// `None` if the tape does not fail to begin with.
pub fn shrink(tape: Vec<u64>, cfg: &Config, budget: u64) -> Option<Shrunk> {
    shrink_with(tape, budget, |t| {
        let r = run_tape(t, cfg);
        (!r.violations.is_empty()).then_some((r.violations, r.step_starts))
    })
}

/// The same passes over any failure test.
pub fn shrink_with(
    tape: Vec<u64>,
    budget: u64,
    mut fails: impl FnMut(&[u64]) -> Verdict,
) -> Option<Shrunk> {
    let (why, starts) = fails(&tape)?;
    let mut st = State {
        best: tape,
        why,
        starts,
        runs: 1,
        budget,
    };
    loop {
        let before = st.size();
        // The shortest failing prefix of whole steps (failing is not
        // monotone in the length: bisection finds a short one).
        let (mut lo, mut hi) = (0, st.starts.len());
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            let cand = st.best[..st.starts[mid]].to_vec();
            if st.attempt(cand, &mut fails) {
                hi = mid.min(st.starts.len());
            } else {
                lo = mid;
            }
        }
        // Runs of whole steps deleted, the longest first: the draws after
        // a cut keep their meaning, so the rest of the run holds.
        let mut k = st.starts.len() / 2;
        while k >= 1 {
            let mut i = 0;
            while i + k <= st.starts.len() {
                let from = st.starts[i];
                let to = st.starts.get(i + k).copied().unwrap_or(st.best.len());
                let mut cand = st.best.clone();
                cand.drain(from..to);
                if !st.attempt(cand, &mut fails) {
                    i += k;
                }
            }
            k /= 2;
        }
        // Draws made smaller: zero (the first option), else halved.
        for i in 0..st.best.len() {
            if st.best[i] == 0 {
                continue;
            }
            let mut cand = st.best.clone();
            cand[i] = 0;
            if !st.attempt(cand, &mut fails) {
                let mut cand = st.best.clone();
                cand[i] /= 2;
                st.attempt(cand, &mut fails);
            }
        }
        if st.size() >= before || st.runs >= st.budget {
            break;
        }
    }
    Some(Shrunk {
        tape: st.best,
        runs: st.runs,
        violations: st.why,
    })
}

struct State {
    best: Vec<u64>,
    why: Vec<String>,
    starts: Vec<usize>,
    runs: u64,
    budget: u64,
}

impl State {
    /// Shorter first, then smaller draws.
    fn size(&self) -> (usize, u128) {
        (
            self.best.len(),
            self.best.iter().map(|&x| u128::from(x)).sum(),
        )
    }

    /// Keep `cand` if it still fails.
    fn attempt(&mut self, cand: Vec<u64>, fails: &mut impl FnMut(&[u64]) -> Verdict) -> bool {
        if self.runs >= self.budget {
            return false;
        }
        self.runs += 1;
        match fails(&cand) {
            Some((why, starts)) => {
                self.best = cand;
                self.why = why;
                self.starts = starts;
                true
            }
            None => false,
        }
    }
}

/// The shrunk run as a test for `tests/simulation.rs`: it fails until the
/// bug is fixed, then guards against its return.
pub fn as_test(name: &str, s: &Shrunk, cfg: &Config) -> String {
    let mut flags = String::new();
    for (on, field) in [
        (!cfg.faults, "faults: false"),
        (cfg.retry_forwarded, "retry_forwarded: true"),
        (cfg.dup_device_frames, "dup_device_frames: true"),
        (!cfg.rollouts, "rollouts: false"),
        (!cfg.workflows, "workflows: false"),
    ] {
        if on {
            flags.push_str(&format!("        {field},\n"));
        }
    }
    let mut tape = String::new();
    for (i, x) in s.tape.iter().enumerate() {
        tape.push_str(if i % 4 == 0 { "\n        " } else { " " });
        tape.push_str(&format!("{x:#x},"));
    }
    let why: String = s.violations.iter().map(|v| format!("/// {v}\n")).collect();
    let cfg = if flags.is_empty() {
        "outpost::sim::Config::default()".to_string()
    } else {
        format!("outpost::sim::Config {{\n{flags}        ..outpost::sim::Config::default()\n    }}")
    };
    format!(
        "/// Shrunk by `simulate --shrink` ({} choices); it failed with:\n{why}#[test]\nfn {name}() {{\n    let cfg = {cfg};\n    let tape: &[u64] = &[{tape}\n    ];\n    let r = outpost::sim::run_tape(tape, &cfg);\n    assert!(r.violations.is_empty(), \"{{}}\", r.violations.join(\"\\n\"));\n}}\n",
        s.tape.len()
    )
}

#[cfg(test)]
mod tests {
    use super::super::{run_recorded, run_tape, Config};
    use super::*;

    /// A stand-in for a bug: "fails" once the world has acknowledged at
    /// least three sends. The shrinker must cut a 2,000-step run down to a
    /// tape of a few steps that still does.
    #[test]
    fn a_failing_run_shrinks_to_a_short_tape_that_still_fails() {
        let cfg = Config::default();
        let (r, tape) = run_recorded(3, 2_000, &cfg);
        assert!(r.counts.sends_acked >= 3, "{:?}", r.counts);
        let three = |t: &[u64]| {
            let r = run_tape(t, &cfg);
            (r.counts.sends_acked >= 3).then(|| {
                (
                    vec![format!("{} sends", r.counts.sends_acked)],
                    r.step_starts,
                )
            })
        };
        let full = tape.len();
        let s = shrink_with(tape, 3_000, three).expect("the full tape fails");
        assert!(three(&s.tape).is_some(), "the shrunk tape still fails");
        assert!(
            s.tape.len() * 20 < full,
            "{} choices of {full}",
            s.tape.len()
        );
        let test = as_test("shrunk", &s, &cfg);
        assert!(test.contains("run_tape(tape, &cfg)") && test.contains("fn shrunk()"));
    }

    #[test]
    fn a_recorded_tape_replays_the_run_it_came_from() {
        let cfg = Config::default();
        let (a, tape) = run_recorded(5, 1_500, &cfg);
        let b = run_tape(&tape, &cfg);
        assert_eq!(a.counts, b.counts);
        assert_eq!(a.hash, b.hash);
    }

    #[test]
    fn a_tape_that_does_not_fail_is_not_shrunk() {
        assert!(shrink_with(vec![1, 2, 3], 10, |_| None).is_none());
    }
}

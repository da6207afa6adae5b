//! The one source of every choice the world makes. Seeded, it is
//! splitmix64; it can also record every draw (a *tape*) and replay one, so
//! a failing run can be shrunk by editing its choices (`sim::shrink`), in
//! the style of Hypothesis's choice sequences.

/// splitmix64: tiny, fast, and the same on every platform and run.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    mode: Mode,
}

#[derive(Clone, Debug)]
enum Mode {
    Seeded,
    Recording(Vec<u64>),
    /// Draws from the tape; past its end every draw is 0 (the simplest
    /// choice) and the run is told to stop.
    Replaying {
        tape: Vec<u64>,
        at: usize,
    },
}

impl Rng {
    /// Seeded, recording nothing: the same seed gives the same draws on
    /// every run.
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed,
            mode: Mode::Seeded,
        }
    }

    /// Seeded, keeping every draw for [`Rng::into_tape`].
    pub fn recording(seed: u64) -> Self {
        Rng {
            state: seed,
            mode: Mode::Recording(Vec::new()),
        }
    }

    /// Draws from `tape` in order, then 0 for every draw past its end.
    pub fn replaying(tape: Vec<u64>) -> Self {
        Rng {
            state: 0,
            mode: Mode::Replaying { tape, at: 0 },
        }
    }

    /// The draws so far (recording), or the tape (replaying).
    pub fn into_tape(self) -> Vec<u64> {
        match self.mode {
            Mode::Seeded => Vec::new(),
            Mode::Recording(t) | Mode::Replaying { tape: t, .. } => t,
        }
    }

    /// Draws made so far from a replayed tape.
    pub fn position(&self) -> Option<usize> {
        match &self.mode {
            Mode::Replaying { at, .. } => Some(*at),
            _ => None,
        }
    }

    /// A replayed tape has run out.
    pub fn exhausted(&self) -> bool {
        matches!(&self.mode, Mode::Replaying { tape, at } if *at >= tape.len())
    }

    /// The next draw, which every other choice is made from: the tape's
    /// next value when replaying, else splitmix64's (kept when recording).
    pub fn next_u64(&mut self) -> u64 {
        match &mut self.mode {
            Mode::Replaying { tape, at } => {
                let x = tape.get(*at).copied().unwrap_or(0);
                *at += 1;
                x
            }
            Mode::Seeded => splitmix(&mut self.state),
            Mode::Recording(t) => {
                let x = splitmix(&mut self.state);
                t.push(x);
                x
            }
        }
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    pub(super) fn pick<T: Copy>(&mut self, xs: &[T]) -> Option<T> {
        (!xs.is_empty()).then(|| xs[self.below(xs.len() as u64) as usize])
    }

    /// One of the last `k`: an operator acts on what they sent lately, and
    /// a pick over a long run's whole history is nearly always long ended.
    pub(super) fn pick_recent<T: Copy>(&mut self, xs: &[T], k: usize) -> Option<T> {
        self.pick(&xs[xs.len().saturating_sub(k)..])
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_tape_replays_the_same_draws_then_zeros() {
        let mut r = Rng::recording(9);
        let drawn: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
        let mut seeded = Rng::new(9);
        let want: Vec<u64> = (0..5).map(|_| seeded.next_u64()).collect();
        assert_eq!(drawn, want, "recording draws what the seed would");
        let mut p = Rng::replaying(r.into_tape());
        let again: Vec<u64> = (0..5).map(|_| p.next_u64()).collect();
        assert_eq!(again, drawn);
        assert!(p.exhausted());
        assert_eq!(p.next_u64(), 0);
    }
}

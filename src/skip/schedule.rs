//! The per-token skip budget `k_t`, as the authors' `calc_skip_pattern` (`llama/utils.py`)
//! builds it: warm-up tokens at 0, then a repeating pattern of budgets (e.g.
//! `[12, 12, 11, 12, 12]` ≈ 25% of 40 layers) with `interleave` full tokens after each
//! pattern (every 6th token runs in full).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Generated tokens run in full before skipping may start (paper §3: attention sinks;
    /// the code uses `max_seq_len // 64`, 8 for its 512-token sequences).
    pub warmup: usize,
    /// Mean FFN blocks a skipping token may skip. Fractional means alternate between ⌊k⌋ and
    /// ⌈k⌉ so the mean is exact, as the authors' hand-written patterns do.
    pub k: f64,
    /// After warm-up, every `full_every`-th token runs in full (0 = never; the authors' code:
    /// 6, a pattern of 5 followed by one full token).
    pub full_every: usize,
}

impl Schedule {
    /// The budget that makes skipping tokens plus periodic full tokens average `ratio` of
    /// `n_layer` FFN blocks per token.
    pub fn for_ratio(ratio: f64, n_layer: usize, warmup: usize, full_every: usize) -> Self {
        let mut k = ratio * n_layer as f64;
        if full_every > 1 {
            k *= full_every as f64 / (full_every - 1) as f64;
        }
        // Rounded to 1e-9 so that e.g. 0.2 × 30 is exactly 6 blocks, not 6 + 1 ulp.
        let k = (k * 1e9).round() / 1e9;
        Schedule {
            warmup,
            k: k.min(n_layer as f64),
            full_every,
        }
    }

    /// Budget of the token generated `t` tokens after the prompt (0-based).
    pub fn budget(&self, t: usize) -> usize {
        if t < self.warmup {
            return 0;
        }
        let u = t - self.warmup;
        if self.full_every > 0 && (u + 1).is_multiple_of(self.full_every) {
            return 0;
        }
        // Skipping tokens before this one.
        let i = (u - u.checked_div(self.full_every).unwrap_or(0)) as f64;
        (((i + 1.0) * self.k).floor() - (i * self.k).floor()).max(0.0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_full_tokens_and_exact_mean() {
        let s = Schedule {
            warmup: 3,
            k: 2.5,
            full_every: 3,
        };
        let b: Vec<usize> = (0..12).map(|t| s.budget(t)).collect();
        // warm-up 0,0,0; then pattern (skip, skip, full) with budgets alternating 2,3.
        assert_eq!(b, [0, 0, 0, 2, 3, 0, 2, 3, 0, 2, 3, 0]);
        let r = Schedule::for_ratio(0.25, 40, 0, 6);
        let total: usize = (0..600).map(|t| r.budget(t)).sum();
        assert_eq!(total, 6000); // 600 tokens × 40 layers × 25%
    }
}

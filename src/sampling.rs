//! Token sampling, in llama.cpp's default order: repetition penalty → top-k → top-p →
//! min-p → temperature → draw. Temperature ≤ 0 is greedy. Seeded and reproducible.

/// Sampling settings (llama.cpp's defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// SplitMix64: small, fast, and the same sequence on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub config: SamplerConfig,
    rng: Rng,
    recent: std::collections::VecDeque<u32>,
    candidates: Vec<(u32, f32)>,
    /// Tokens never drawn (`--ignore-eos` bans the end-of-generation tokens, as llama.cpp's
    /// logit bias of −∞ does).
    banned: Vec<u32>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        Sampler {
            rng: Rng::new(config.seed),
            recent: Default::default(),
            candidates: Vec::new(),
            banned: Vec::new(),
            config,
        }
    }

    /// Records a token of the context (prompt or generated) for the repetition penalty.
    pub fn accept(&mut self, token: u32) {
        if self.config.repeat_last_n == 0 {
            return;
        }
        if self.recent.len() == self.config.repeat_last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    pub fn reset(&mut self) {
        self.recent.clear();
    }

    /// Never draws `ids` from now on.
    pub fn ban(&mut self, ids: impl IntoIterator<Item = u32>) {
        self.banned.extend(ids);
        self.banned.sort_unstable();
        self.banned.dedup();
    }

    fn penalized(&self, id: usize, logit: f32) -> f32 {
        if !self.banned.is_empty() && self.banned.binary_search(&(id as u32)).is_ok() {
            return f32::NEG_INFINITY;
        }
        let p = self.config.repeat_penalty;
        if p == 1.0 || !self.recent.contains(&(id as u32)) {
            return logit;
        }
        if logit > 0.0 {
            logit / p
        } else {
            logit * p
        }
    }

    /// Picks the next token from `logits` (`[n_vocab]`).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let c = self.config.clone();
        if c.is_greedy() {
            let mut best = (0usize, f32::NEG_INFINITY);
            for (i, &l) in logits.iter().enumerate() {
                let v = if c.repeat_penalty == 1.0 && self.banned.is_empty() {
                    l
                } else {
                    self.penalized(i, l)
                };
                if v > best.1 {
                    best = (i, v);
                }
            }
            return best.0 as u32;
        }
        let mut cand = std::mem::take(&mut self.candidates);
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, self.penalized(i, l))),
        );
        // top-k (partial selection, then sort the survivors by logit, descending)
        let k = if c.top_k == 0 {
            cand.len()
        } else {
            c.top_k.min(cand.len())
        };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        // softmax over the survivors (at temperature 1, as llama.cpp's top-p/min-p see them)
        let probs = |cand: &[(u32, f32)], t: f32| -> Vec<f64> {
            let max = cand[0].1;
            let e: Vec<f64> = cand
                .iter()
                .map(|x| (f64::from(x.1 - max) / f64::from(t)).exp())
                .collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        };
        if c.top_p < 1.0 {
            let p = probs(&cand, 1.0);
            let mut cum = 0.0;
            let mut keep = cand.len();
            for (i, pi) in p.iter().enumerate() {
                cum += pi;
                if cum >= f64::from(c.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if c.min_p > 0.0 {
            let max = cand[0].1;
            let floor = max + (c.min_p).ln();
            let keep = cand.iter().take_while(|x| x.1 >= floor).count().max(1);
            cand.truncate(keep);
        }
        let p = probs(&cand, c.temperature);
        let r = self.rng.next_f64();
        let mut cum = 0.0;
        let mut pick = cand[cand.len() - 1].0;
        for (x, pi) in cand.iter().zip(&p) {
            cum += pi;
            if r < cum {
                pick = x.0;
                break;
            }
        }
        self.candidates = cand;
        pick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_tokens_are_never_drawn() {
        let logits = [0.1, 5.0, 4.9, -1.0];
        let mut g = Sampler::new(SamplerConfig::greedy());
        assert_eq!(g.sample(&logits), 1);
        g.ban([1]);
        assert_eq!(g.sample(&logits), 2);
        let mut s = Sampler::new(SamplerConfig {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.0,
            ..Default::default()
        });
        s.ban([1, 2]);
        assert!((0..200).all(|_| ![1, 2].contains(&s.sample(&logits))));
    }

    #[test]
    fn greedy_is_argmax_and_penalty_applies() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 1.5,
            ..SamplerConfig::greedy()
        });
        s.accept(1);
        assert_eq!(s.sample(&logits), 2, "2.0/1.5 < 1.9");
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 5,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        };
        let draw = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(&cfg);
        assert_eq!(a, draw(&cfg));
        let mut top5: Vec<usize> = (0..100).collect();
        top5.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        assert!(a.iter().all(|t| top5[..5].contains(&(*t as usize))));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
        let b = draw(&SamplerConfig { seed: 43, ..cfg });
        assert_ne!(a, b);
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let logits = [5.0, 4.9, 0.0, -3.0];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: 1,
            ..Default::default()
        });
        for _ in 0..100 {
            assert!(s.sample(&logits) < 2);
        }
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            seed: 1,
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 0);
        }
    }
}

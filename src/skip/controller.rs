//! One controller for every policy: per-row state for the rows of a forward call, decisions
//! per (row, layer), and the run statistics. Decisions depend only on a row's own position and
//! hidden states, so a batch decides exactly as token-by-token decoding does.

use super::stats::{self, SkipStats};
use super::{cosine, Controller, Policy, SkipParams, TokenRng};

/// Weight bytes per layer, for the bytes-not-read statistic.
#[derive(Clone, Debug, Default)]
pub struct LayerBytes {
    /// `ffn_gate + ffn_up + ffn_down`.
    pub ffn: Vec<u64>,
    /// `attn_q + attn_k + attn_v + attn_output`.
    pub attn: Vec<u64>,
    /// `attn_q + attn_output` (what an exited token does not read; it still reads K and V).
    pub attn_qo: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Row {
    /// Generated-token index since the prompt; `None` for prompt rows.
    t: Option<usize>,
    /// FFN blocks this token may skip.
    budget: usize,
    /// Adaptive: blocks left in the current skip run.
    run_left: usize,
    /// Adaptive: the one greedy run of this token has started.
    used: bool,
    /// Adaptive: cos(h, h + ffn) of the previous layer (−1 before layer 0).
    last_cos: f32,
    /// Counted in the statistics.
    counted: bool,
}

pub struct SkipController {
    params: SkipParams,
    bytes: LayerBytes,
    prompt: bool,
    /// Position of the first generated token of the current turn.
    gen_start: usize,
    /// The first token allowed to skip has been seen (the authors' `start_counter`).
    started: bool,
    rows: Vec<Row>,
    /// Decisions `[rows, n_layer]` (`stats::RAN`, `SKIPPED`, `REMOVED`, `EXITED`); random and
    /// static plans are written here in `begin`.
    trace: Vec<u8>,
    removed: Vec<bool>,
    scratch: Vec<usize>,
    record: bool,
    pub stats: SkipStats,
}

impl SkipController {
    pub fn new(params: SkipParams, bytes: LayerBytes) -> Self {
        let n = params.n_layer;
        let mut removed = vec![false; n];
        for &l in &params.removed {
            if l < n {
                removed[l] = true;
            }
        }
        SkipController {
            params,
            bytes,
            prompt: false,
            gen_start: 0,
            started: false,
            rows: Vec::new(),
            trace: Vec::new(),
            removed,
            scratch: (0..n).collect(),
            record: false,
            stats: SkipStats::new(n),
        }
    }

    pub fn params(&self) -> &SkipParams {
        &self.params
    }

    /// Keep each counted token's per-layer decisions in [`SkipStats::decisions`].
    pub fn record_decisions(&mut self, on: bool) {
        self.record = on;
    }

    /// Starts a new run of statistics (the next generated token counts from scratch).
    pub fn reset_stats(&mut self) {
        self.stats.clear();
        self.started = false;
    }

    fn n_layer(&self) -> usize {
        self.params.n_layer
    }

    /// Layers in the non-cold region, `cold_start .. n_layer - cold_end`.
    fn warm_region(&self) -> (usize, usize) {
        let p = &self.params;
        (p.cold_start, p.n_layer - p.cold_end)
    }

    /// Writes the random / static / early-exit plan of row `i` into the trace.
    fn plan(&mut self, i: usize, position: usize) {
        let n = self.n_layer();
        let k = self.rows[i].budget;
        let trace = &mut self.trace[i * n..(i + 1) * n];
        let mut rng = TokenRng::new(self.params.seed, position);
        match self.params.policy {
            Policy::Random => {
                // k distinct layers anywhere: a partial Fisher–Yates shuffle.
                let k = k.min(n);
                let order = &mut self.scratch;
                for (j, o) in order.iter_mut().enumerate() {
                    *o = j;
                }
                for j in 0..k {
                    let pick = j + rng.below(n - j);
                    order.swap(j, pick);
                    trace[order[j]] = stats::SKIPPED;
                }
            }
            Policy::Static => {
                let (lo, hi) = (self.params.cold_start, n - self.params.cold_end);
                let k = k.min(hi - lo);
                if k > 0 {
                    let start = lo + rng.below(hi - lo - k + 1);
                    trace[start..start + k].fill(stats::SKIPPED);
                }
            }
            Policy::EarlyExit => {
                // Exit after layer n − k; at least the first layer always runs.
                let exit = n.saturating_sub(k).max(1).min(n);
                trace[exit..].fill(stats::EXITED);
            }
            _ => {}
        }
    }
}

impl Controller for SkipController {
    fn begin(&mut self, positions: &[usize], prompt: bool) {
        let n = self.n_layer();
        self.prompt = prompt;
        if positions.first() == Some(&0) {
            self.gen_start = 0;
        }
        if prompt {
            if let Some(&last) = positions.last() {
                self.gen_start = last + 1;
            }
        }
        self.rows.clear();
        self.trace.clear();
        self.trace.resize(positions.len() * n, stats::RAN);
        let policy = self.params.policy;
        for (i, &p) in positions.iter().enumerate() {
            let t = (!prompt).then(|| p.saturating_sub(self.gen_start));
            let budget = match (t, policy) {
                (None, _) | (_, Policy::None) => 0,
                (Some(_), Policy::Shortgpt) => self.params.removed.len(),
                (Some(t), _) => self.params.schedule.budget(t),
            };
            if t.is_some() && budget > 0 {
                self.started = true;
            }
            self.rows.push(Row {
                t,
                budget,
                run_left: 0,
                used: false,
                last_cos: -1.0,
                counted: t.is_some() && self.started,
            });
            if policy == Policy::Shortgpt {
                for (l, d) in self.trace[i * n..(i + 1) * n].iter_mut().enumerate() {
                    if self.removed[l] {
                        *d = stats::REMOVED;
                    }
                }
            } else if budget > 0 {
                self.plan(i, p);
            }
        }
    }

    #[inline]
    fn layer_runs(&mut self, layer: usize) -> bool {
        !self.removed[layer]
    }

    #[inline]
    fn exited(&mut self, layer: usize, row: usize) -> bool {
        self.params.policy == Policy::EarlyExit
            && self.trace[row * self.params.n_layer + layer] == stats::EXITED
    }

    fn run_ffn(&mut self, layer: usize, row: usize, _ffn_inp: &[f32]) -> bool {
        let n = self.params.n_layer;
        match self.params.policy {
            Policy::None | Policy::Shortgpt | Policy::EarlyExit => true,
            Policy::Random | Policy::Static => self.trace[row * n + layer] != stats::SKIPPED,
            Policy::Adaptive => {
                let (lo, hi) = self.warm_region();
                let threshold = self.params.threshold;
                let r = &mut self.rows[row];
                if r.budget == 0 || layer < lo || layer >= hi {
                    return true;
                }
                if r.run_left > 0 {
                    r.run_left -= 1;
                } else if !r.used && r.last_cos >= threshold {
                    // Greedy: skip this and the next budget − 1 blocks, up to the cold end
                    // (`forward_with_skip`: the whole remaining budget in one run).
                    r.used = true;
                    r.run_left = r.budget.min(hi - layer) - 1;
                } else {
                    return true;
                }
                self.trace[row * n + layer] = stats::SKIPPED;
                false
            }
        }
    }

    #[inline]
    fn observes_ffn(&self) -> bool {
        self.params.policy == Policy::Adaptive && !self.prompt
    }

    fn after_ffn(&mut self, _layer: usize, row: usize, before: &[f32], after: &[f32]) {
        let r = &mut self.rows[row];
        if r.budget > 0 && !r.used {
            r.last_cos = cosine(before, after);
        }
    }

    fn end(&mut self) {
        let n = self.params.n_layer;
        for (i, r) in self.rows.iter().enumerate() {
            if r.t.is_none() {
                continue;
            }
            self.stats.decoded_tokens += 1;
            if !r.counted {
                continue;
            }
            let st = &mut self.stats;
            st.counted_tokens += 1;
            st.eligible_ffn += n as u64;
            let trace = &self.trace[i * n..(i + 1) * n];
            for (l, &d) in trace.iter().enumerate() {
                let extra = match d {
                    stats::RAN => continue,
                    stats::SKIPPED => 0,
                    stats::REMOVED => self.bytes.attn.get(l).copied().unwrap_or(0),
                    _ => self.bytes.attn_qo.get(l).copied().unwrap_or(0),
                };
                st.skipped_ffn += 1;
                st.per_layer[l] += 1;
                st.bytes_skipped += self.bytes.ffn.get(l).copied().unwrap_or(0) + extra;
            }
            if self.record {
                st.decisions
                    .push(String::from_utf8_lossy(trace).into_owned());
            }
        }
    }
}

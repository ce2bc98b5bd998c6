//! One controller for every policy: per-row state for the rows of a forward call, decisions
//! per (row, layer), and the run statistics. Decisions depend only on a row's own position and
//! hidden states, so a batch decides exactly as token-by-token decoding does.

use super::stats::{Decision, SkipStats, TokenDecisions};
use super::{Controller, Policy, SkipParams, TokenRng};

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
    /// Decisions `[rows, n_layer]`; random, static, early-exit and ShortGPT plans are written
    /// here in `begin`, adaptive skips as they happen.
    trace: Vec<Decision>,
    removed: Vec<bool>,
    scratch: Vec<usize>,
    /// `[rank]` scratch of the low-rank compensation.
    z: Vec<f32>,
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
            z: Vec::new(),
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
                    trace[order[j]] = Decision::Skipped;
                }
            }
            Policy::Static => {
                let (lo, hi) = (self.params.cold_start, n - self.params.cold_end);
                let k = k.min(hi - lo);
                if k > 0 {
                    let start = lo + rng.below(hi - lo - k + 1);
                    trace[start..start + k].fill(Decision::Skipped);
                }
            }
            Policy::Placed => {
                let hi = n - self.params.cold_end;
                if let Some(&start) = self.params.ranked.get(k) {
                    trace[start..(start + k).min(hi)].fill(Decision::Skipped);
                }
            }
            Policy::EarlyExit => {
                // Exit after layer n − k; at least the first layer always runs.
                let exit = n.saturating_sub(k).max(1).min(n);
                trace[exit..].fill(Decision::Exited);
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
        self.trace.resize(positions.len() * n, Decision::Ran);
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
                        *d = Decision::Removed;
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
            && self.trace[row * self.params.n_layer + layer] == Decision::Exited
    }

    fn compensates(&self) -> bool {
        !self.params.ffn_estimate.is_empty()
    }

    fn compensate(&mut self, layer: usize, _row: usize, h: &mut [f32]) {
        if let Some(m) = self.params.ffn_estimate.get(layer) {
            m.add_to(h, &mut self.z);
        }
    }

    fn run_ffn(&mut self, layer: usize, row: usize) -> bool {
        let n = self.params.n_layer;
        match self.params.policy {
            Policy::None | Policy::Shortgpt | Policy::EarlyExit | Policy::Auto => true,
            Policy::Random | Policy::Static | Policy::Placed => {
                self.trace[row * n + layer] != Decision::Skipped
            }
            Policy::Adaptive | Policy::AdaptiveLayer => {
                let (lo, hi) = self.warm_region();
                // The previous layer's cosine against its own threshold (adaptive-layer) or
                // the global one.
                let threshold = match layer.checked_sub(1) {
                    Some(p) => *self
                        .params
                        .layer_threshold
                        .get(p)
                        .unwrap_or(&self.params.threshold),
                    None => self.params.threshold,
                };
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
                self.trace[row * n + layer] = Decision::Skipped;
                false
            }
        }
    }

    #[inline]
    fn observes_ffn(&self) -> bool {
        self.params.policy.is_adaptive() && !self.prompt
    }

    fn after_ffn(&mut self, _layer: usize, row: usize, cos: f32) {
        let r = &mut self.rows[row];
        if r.budget > 0 && !r.used {
            r.last_cos = cos;
        }
    }

    fn prompt_is_full(&self) -> bool {
        // ShortGPT removes its layers from prompt rows too; no other policy touches them.
        !self.removed.contains(&true)
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
                    Decision::Ran => continue,
                    Decision::Skipped => 0,
                    Decision::Removed => self.bytes.attn.get(l).copied().unwrap_or(0),
                    Decision::Exited => self.bytes.attn_qo.get(l).copied().unwrap_or(0),
                };
                st.skipped_ffn += 1;
                st.per_layer[l] += 1;
                st.bytes_skipped += self.bytes.ffn.get(l).copied().unwrap_or(0) + extra;
            }
            if self.record {
                st.decisions.push(TokenDecisions(trace.to_vec()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The controller driven without a model: synthetic positions and cosines, controller methods called
    //! in the order `model::forward` calls them, exact decisions asserted per policy.

    use super::*;
    use crate::skip::{cosine, Schedule};

    const N: usize = 10;

    /// `policy` on a 10-layer model: cold 2 + 2, k = 3 per token, no warm-up, threshold 0.96.
    fn params(policy: Policy) -> SkipParams {
        SkipParams {
            policy,
            n_layer: N,
            ratio: 0.3,
            threshold: 0.96,
            cold_start: 2,
            cold_end: 2,
            schedule: Schedule {
                warmup: 0,
                k: 3.0,
                full_every: 0,
            },
            removed: Vec::new(),
            seed: 7,
            source: "test".into(),
            ffn_estimate: Vec::new(),
            compensation: crate::skip::compensation::Compensation::None,
            ranked: Vec::new(),
            layer_threshold: Vec::new(),
        }
    }

    /// Distinct byte counts per layer so sums identify the layers: FFN 1000 + l, attention
    /// 100 + l, Q and output projections 10 + l.
    fn bytes() -> LayerBytes {
        LayerBytes {
            ffn: (0..N as u64).map(|l| 1000 + l).collect(),
            attn: (0..N as u64).map(|l| 100 + l).collect(),
            attn_qo: (0..N as u64).map(|l| 10 + l).collect(),
        }
    }

    fn controller(p: SkipParams) -> SkipController {
        let mut c = SkipController::new(p, bytes());
        c.record_decisions(true);
        c
    }

    /// `(h, h + ffn)` with exactly the cosine `c`, for c in {1, 0.96, 0, −1}: integer
    /// vectors of norm 5, so the f64 sums in `cosine` are exact.
    fn pair(c: f32) -> ([f32; 2], [f32; 2]) {
        let after = match c {
            1.0 => [3.0, 4.0],
            0.96 => [4.0, 3.0],
            0.0 => [4.0, -3.0],
            -1.0 => [-3.0, -4.0],
            _ => panic!("no exact pair for cosine {c}"),
        };
        ([3.0, 4.0], after)
    }

    /// One forward call over `positions`, calling the controller methods in the documented order (the
    /// order of `model::forward`). An FFN that runs at (position, layer) yields the cosine
    /// `cos(position, layer)`. Returns, per row, what the model was told at each layer
    /// (`x` layer removed, `e` exited, `s` FFN skipped, `F` ran).
    fn forward(
        c: &mut SkipController,
        positions: &[usize],
        prompt: bool,
        cos: &dyn Fn(usize, usize) -> f32,
    ) -> Vec<String> {
        let n = c.params().n_layer;
        let x = [1.0f32, 2.0];
        let mut seen = vec![String::new(); positions.len()];
        c.begin(positions, prompt);
        for l in 0..n {
            if !c.layer_runs(l) {
                seen.iter_mut().for_each(|s| s.push('x'));
                continue;
            }
            if c.observes_layers() {
                for i in 0..positions.len() {
                    c.layer_input(l, i, &x);
                }
            }
            let mut active = Vec::new();
            for (i, s) in seen.iter_mut().enumerate() {
                if c.exited(l, i) {
                    s.push('e');
                } else {
                    assert!(!s.ends_with('e'), "row {i} came back after exiting: {s}");
                    active.push(i);
                }
            }
            let mut ran = Vec::new();
            for i in active {
                let run = c.run_ffn(l, i);
                seen[i].push(if run { 'F' } else { 's' });
                if run {
                    ran.push(i);
                }
            }
            if c.observes_ffn() {
                for i in ran {
                    let (before, after) = pair(cos(positions[i], l));
                    c.after_ffn(l, i, cosine(&before, &after));
                }
            }
        }
        c.end();
        seen
    }

    /// Decodes positions `from..to` one token per forward call.
    fn decode(
        c: &mut SkipController,
        from: usize,
        to: usize,
        cos: &dyn Fn(usize, usize) -> f32,
    ) -> Vec<String> {
        (from..to)
            .flat_map(|p| forward(c, &[p], false, cos))
            .collect()
    }

    fn prefill(c: &mut SkipController, from: usize, to: usize) -> Vec<String> {
        let positions: Vec<usize> = (from..to).collect();
        forward(c, &positions, true, &|_, _| 0.0)
    }

    fn recorded(c: &SkipController) -> Vec<String> {
        c.stats.decisions.iter().map(|d| d.to_string()).collect()
    }

    const FULL: &str = "FFFFFFFFFF";

    #[test]
    fn exact_cosine_pairs() {
        for c in [1.0, 0.96, 0.0, -1.0] {
            let (a, b) = pair(c);
            assert_eq!(cosine(&a, &b), c);
        }
    }

    #[test]
    fn none_runs_every_ffn_and_counts_nothing() {
        let mut c = controller(SkipParams::none(N));
        assert_eq!(prefill(&mut c, 0, 4), vec![FULL; 4]);
        assert!(!c.observes_ffn());
        assert_eq!(decode(&mut c, 4, 9, &|_, _| 1.0), vec![FULL; 5]);
        let st = &c.stats;
        assert_eq!(
            (
                st.decoded_tokens,
                st.counted_tokens,
                st.eligible_ffn,
                st.skipped_ffn
            ),
            (5, 0, 0, 0)
        );
        assert_eq!(st.ratio(), 0.0);
        assert!(st.decisions.is_empty());
    }

    #[test]
    fn adaptive_skips_one_greedy_run_after_the_threshold_is_reached() {
        let mut p = params(Policy::Adaptive);
        p.schedule.k = 2.0;
        let mut c = controller(p);
        prefill(&mut c, 0, 3);
        assert!(!c.observes_ffn(), "prompt rows are not observed");
        // Layers 3 and 6 reach the threshold: the run starts after layer 3 (layers 4, 5);
        // layer 6 reaching it again starts no second run.
        let cos = |_: usize, l: usize| if l == 3 || l == 6 { 0.96 } else { 0.0 };
        assert_eq!(decode(&mut c, 3, 5, &cos), ["FFFFssFFFF"; 2]);
        assert!(c.observes_ffn());
        // Every layer reaches it: the run starts at the first warm layer.
        assert_eq!(decode(&mut c, 5, 6, &|_, _| 1.0), ["FFssFFFFFF"]);
        // No layer does: nothing is skipped, the token still counts.
        assert_eq!(decode(&mut c, 6, 7, &|_, _| 0.0), [FULL]);
        let st = &c.stats;
        assert_eq!(st.counted_tokens, 4);
        assert_eq!(st.eligible_ffn, 4 * N as u64);
        assert_eq!(st.skipped_ffn, 6);
        assert_eq!(st.per_layer, [0, 0, 1, 1, 2, 2, 0, 0, 0, 0]);
        assert_eq!(st.bytes_skipped, 2 * (1004 + 1005) + 1002 + 1003);
        assert_eq!(
            recorded(&c),
            ["FFFFssFFFF", "FFFFssFFFF", "FFssFFFFFF", FULL]
        );
    }

    #[test]
    fn adaptive_layer_reads_each_layers_own_threshold() {
        // Global 0.96 is reached at layers 3 and 6; layer 3's own threshold is above 0.96 and
        // layer 5's is 0, which its cosine 0 reaches: the run starts after layer 5.
        let mut p = params(Policy::AdaptiveLayer);
        p.schedule.k = 2.0;
        p.layer_threshold = vec![0.96, 0.96, 0.96, 0.97, 0.96, 0.0, 0.96, 0.96, 0.96, 0.96];
        let cos = |_: usize, l: usize| if l == 3 || l == 6 { 0.96 } else { 0.0 };
        let mut c = controller(p.clone());
        assert_eq!(decode(&mut c, 0, 1, &cos), ["FFFFFFssFF"]);
        // Without per-layer thresholds it is the paper's rule.
        p.layer_threshold.clear();
        let mut c = controller(p);
        assert_eq!(decode(&mut c, 0, 1, &cos), ["FFFFssFFFF"]);
    }

    #[test]
    fn adaptive_threshold_is_reached_at_equality() {
        let at = |threshold: f32, cold_start: usize, cos: f32| {
            let mut p = params(Policy::Adaptive);
            p.threshold = threshold;
            p.cold_start = cold_start;
            let mut c = controller(p);
            decode(&mut c, 0, 1, &|_, _| cos).remove(0)
        };
        let above = |t: f32| f32::from_bits(t.to_bits() + 1);
        assert_eq!(at(0.96, 2, 0.96), "FFsssFFFFF");
        assert_eq!(at(above(0.96), 2, 0.96), FULL);
        assert_eq!(at(1.0, 2, 1.0), "FFsssFFFFF");
        // Before layer 0 the previous cosine is −1: threshold −1 skips from layer 0 ...
        assert_eq!(at(-1.0, 0, -1.0), "sssFFFFFFF");
        // ... and anything above it waits for a layer to reach it.
        assert_eq!(at(-0.99, 0, 0.0), "FsssFFFFFF");
        assert_eq!(at(0.5, 0, 0.0), FULL);
    }

    #[test]
    fn cold_regions_are_never_skipped() {
        let mut p = params(Policy::Adaptive);
        p.threshold = -1.0;
        p.cold_end = 3;
        p.schedule.k = 10.0;
        let mut c = controller(p.clone());
        // The run is cut at the cold end (layers 2..7).
        assert_eq!(decode(&mut c, 0, 1, &|_, _| 0.0), ["FFsssssFFF"]);
        // Only the last warm layer reaches the threshold: the next layer is cold.
        p.threshold = 0.96;
        let mut c = controller(p);
        let cos = |_: usize, l: usize| if l == 6 { 0.96 } else { 0.0 };
        assert_eq!(decode(&mut c, 0, 1, &cos), [FULL]);
        assert_eq!(c.stats.counted_tokens, 1);
    }

    #[test]
    fn budgets_alternate_floor_and_ceil_with_periodic_full_tokens() {
        let mut p = params(Policy::Adaptive);
        p.threshold = -1.0;
        p.cold_start = 0;
        p.cold_end = 0;
        p.schedule.k = 2.5;
        let mut c = controller(p.clone());
        assert_eq!(
            decode(&mut c, 0, 4, &|_, _| 0.0),
            ["ssFFFFFFFF", "sssFFFFFFF", "ssFFFFFFFF", "sssFFFFFFF"]
        );
        assert_eq!(c.stats.skipped_ffn, 10);
        // Every 3rd token in full; the budgets continue where they left off.
        p.schedule.full_every = 3;
        let mut c = controller(p);
        let got = decode(&mut c, 0, 6, &|_, _| 0.0);
        assert_eq!(
            got,
            [
                "ssFFFFFFFF",
                "sssFFFFFFF",
                FULL,
                "ssFFFFFFFF",
                "sssFFFFFFF",
                FULL
            ]
        );
        assert_eq!((c.stats.counted_tokens, c.stats.skipped_ffn), (6, 10));
    }

    #[test]
    fn prompt_rows_never_skip_and_warmup_restarts_after_each_prompt() {
        let mut p = params(Policy::Adaptive);
        p.threshold = -1.0;
        p.schedule.warmup = 2;
        let mut c = controller(p);
        let skip = "FFsssFFFFF";
        assert_eq!(prefill(&mut c, 0, 6), vec![FULL; 6]);
        assert!(!c.observes_ffn());
        assert_eq!(decode(&mut c, 6, 10, &|_, _| 0.0), [FULL, FULL, skip, skip]);
        // A second turn: its prompt runs in full, warm-up counts from its end.
        assert_eq!(prefill(&mut c, 10, 13), vec![FULL; 3]);
        assert_eq!(decode(&mut c, 13, 16, &|_, _| 0.0), [FULL, FULL, skip]);
        // A new sequence from position 0 (decoded without a prompt) starts over as well.
        assert_eq!(decode(&mut c, 0, 3, &|_, _| 0.0), [FULL, FULL, skip]);
        let st = &c.stats;
        assert_eq!(st.decoded_tokens, 10);
        // Counted from the first token allowed to skip (position 8) on.
        assert_eq!(st.counted_tokens, 8);
        assert_eq!(st.skipped_ffn, 4 * 3);
        assert_eq!(
            recorded(&c),
            [skip, skip, FULL, FULL, skip, FULL, FULL, skip]
        );
    }

    #[test]
    fn ratio_counts_tokens_from_the_first_one_allowed_to_skip() {
        let mut p = params(Policy::Adaptive);
        p.threshold = -1.0;
        p.schedule.warmup = 2;
        p.schedule.full_every = 2;
        let mut c = controller(p.clone());
        let got = decode(&mut c, 0, 6, &|_, _| 0.0);
        let skip = "FFsssFFFFF";
        assert_eq!(got, [FULL, FULL, skip, FULL, skip, FULL]);
        let st = &c.stats;
        // 2 warm-up tokens not counted; the full tokens after the first skipping one are.
        assert_eq!((st.decoded_tokens, st.counted_tokens), (6, 4));
        assert_eq!((st.skipped_ffn, st.eligible_ffn), (6, 4 * N as u64));
        assert_eq!(st.ratio(), 6.0 / 40.0);
        assert_eq!(st.per_layer, [0, 0, 2, 2, 2, 0, 0, 0, 0, 0]);
        assert_eq!(st.bytes_skipped, 2 * (1002 + 1003 + 1004));
        assert_eq!(st.bytes_skipped_per_token(), 2.0 * 3009.0 / 4.0);
        // A new count starts with the next token allowed to skip: the full token before it
        // is not counted.
        c.reset_stats();
        assert_eq!(decode(&mut c, 6, 9, &|_, _| 0.0), [skip, FULL, skip]);
        let st = &c.stats;
        assert_eq!(
            (st.decoded_tokens, st.counted_tokens, st.skipped_ffn),
            (3, 3, 6)
        );
        c.reset_stats();
        assert_eq!(decode(&mut c, 9, 11, &|_, _| 0.0), [FULL, skip]);
        assert_eq!((c.stats.decoded_tokens, c.stats.counted_tokens), (2, 1));
        assert_eq!(recorded(&c), [skip]);
        // A threshold nothing reaches: every counted token is eligible, none skipped.
        p.threshold = 2.0;
        let mut c = controller(p);
        decode(&mut c, 0, 6, &|_, _| 1.0);
        let st = &c.stats;
        assert_eq!(
            (st.counted_tokens, st.eligible_ffn, st.skipped_ffn),
            (4, 40, 0)
        );
        assert_eq!(st.ratio(), 0.0);
    }

    #[test]
    fn decisions_are_recorded_only_when_asked_for() {
        let mut c = SkipController::new(params(Policy::Random), bytes());
        decode(&mut c, 0, 3, &|_, _| 0.0);
        assert_eq!(c.stats.skipped_ffn, 9);
        assert!(c.stats.decisions.is_empty());
    }

    #[test]
    fn shortgpt_removes_its_layers_for_every_row_including_the_prompt() {
        let mut p = params(Policy::Shortgpt);
        p.removed = vec![3, 5];
        p.schedule.warmup = 4;
        let mut c = controller(p);
        let plan = "FFFxFxFFFF";
        assert_eq!(prefill(&mut c, 0, 3), vec![plan; 3]);
        assert_eq!(decode(&mut c, 3, 6, &|_, _| 0.0), vec![plan; 3]);
        assert_eq!(recorded(&c), vec![plan; 3]);
        let st = &c.stats;
        // The removal is the model's: no warm-up, every generated token counts.
        assert_eq!((st.decoded_tokens, st.counted_tokens), (3, 3));
        assert_eq!((st.skipped_ffn, st.eligible_ffn), (6, 30));
        assert_eq!(st.per_layer, [0, 0, 0, 3, 0, 3, 0, 0, 0, 0]);
        assert_eq!(st.bytes_skipped, 3 * (1003 + 103 + 1005 + 105));
    }

    #[test]
    fn early_exit_leaves_after_layer_n_minus_k() {
        let mut p = params(Policy::EarlyExit);
        p.schedule.warmup = 1;
        p.schedule.k = 2.5;
        let mut c = controller(p.clone());
        assert_eq!(prefill(&mut c, 0, 2), vec![FULL; 2]);
        let got = decode(&mut c, 2, 5, &|_, _| 0.0);
        assert_eq!(got, [FULL, "FFFFFFFFee", "FFFFFFFeee"]);
        let st = &c.stats;
        assert_eq!((st.counted_tokens, st.skipped_ffn), (2, 5));
        assert_eq!(st.per_layer, [0, 0, 0, 0, 0, 0, 0, 1, 2, 2]);
        // Exited layers do not read FFN, Q or output weights.
        assert_eq!(st.bytes_skipped, 2 * (1008 + 18 + 1009 + 19) + 1007 + 17);
        // A budget of every layer still runs layer 0.
        p.schedule.k = N as f64;
        let mut c = controller(p);
        assert_eq!(decode(&mut c, 0, 2, &|_, _| 0.0), [FULL, "Feeeeeeeee"]);
    }

    /// Skipped layers of each token at positions `from..to`, decoded one at a time.
    fn plans(p: &SkipParams, from: usize, to: usize) -> Vec<String> {
        decode(&mut controller(p.clone()), from, to, &|_, _| 0.0)
    }

    #[test]
    fn random_draws_k_layers_anywhere_reproducibly_per_seed_and_position() {
        let p = params(Policy::Random);
        let all = plans(&p, 0, 64);
        // Golden: SplitMix64 seeded from (7, position); a change here changes every
        // benchmark's random baseline.
        assert_eq!(all[..3], ["FFFssFFFsF", "FFsFFsFsFF", "FFFFFssFsF"]);
        let mut union = [false; N];
        for d in &all {
            assert_eq!(d.matches('s').count(), 3, "{d}");
            for (l, ch) in d.chars().enumerate() {
                union[l] |= ch == 's';
            }
        }
        assert_eq!(union, [true; N], "cold layers are drawn too");
        // The same position draws the same layers, whatever came before it.
        assert_eq!(plans(&p, 40, 64), all[40..]);
        let mut other = p.clone();
        other.seed = 8;
        assert_ne!(plans(&other, 0, 64), all);
    }

    #[test]
    fn static_skips_one_block_inside_the_warm_region_reproducibly() {
        let p = params(Policy::Static);
        let all = plans(&p, 0, 64);
        assert_eq!(all[..3], ["FFFsssFFFF", "FFsssFFFFF", "FFFFFsssFF"]);
        let mut starts = Vec::new();
        for d in &all {
            let start = d
                .find('s')
                .unwrap_or_else(|| panic!("nothing skipped: {d}"));
            assert_eq!(&d[start..start + 3], "sss", "{d}");
            assert_eq!(d.matches('s').count(), 3, "{d}");
            assert!((2..=5).contains(&start), "block outside layers 2..8: {d}");
            starts.push(start);
        }
        starts.sort_unstable();
        starts.dedup();
        assert_eq!(starts, [2, 3, 4, 5]);
        assert_eq!(plans(&p, 40, 64), all[40..]);
        let mut other = p.clone();
        other.seed = 8;
        assert_ne!(plans(&other, 0, 64), all);
        // A budget larger than the warm region skips all of it.
        let mut wide = p;
        wide.schedule.k = 9.0;
        assert_eq!(plans(&wide, 0, 1), ["FFssssssFF"]);
    }

    #[test]
    fn a_batch_decides_exactly_as_token_by_token_decoding() {
        for policy in Policy::ALL {
            let mut p = params(policy);
            p.schedule.warmup = 2;
            p.schedule.k = 2.5;
            p.schedule.full_every = 3;
            match policy {
                Policy::Shortgpt => p.removed = vec![4, 8],
                // Runs of k layers start at 3 (k ≤ 3), else at 2.
                Policy::Placed => p.ranked = vec![2, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2],
                // `auto` resolves to adaptive before it reaches a controller.
                Policy::Auto => continue,
                _ => {}
            }
            // Which layers reach the threshold differs per position.
            let cos = |pos: usize, l: usize| {
                if (pos + l).is_multiple_of(4) {
                    0.96
                } else {
                    0.0
                }
            };
            let mut seq = controller(p.clone());
            let mut bat = controller(p);
            prefill(&mut seq, 0, 5);
            prefill(&mut bat, 0, 5);
            let a = decode(&mut seq, 5, 17, &cos);
            let positions: Vec<usize> = (5..17).collect();
            let mut b = forward(&mut bat, &positions[..5], false, &cos);
            b.extend(forward(&mut bat, &positions[5..], false, &cos));
            assert_eq!(a, b, "{policy:?}");
            let (s, t) = (&seq.stats, &bat.stats);
            assert_eq!(recorded(&seq), recorded(&bat), "{policy:?}");
            assert_eq!(
                (
                    s.decoded_tokens,
                    s.counted_tokens,
                    s.skipped_ffn,
                    s.eligible_ffn
                ),
                (
                    t.decoded_tokens,
                    t.counted_tokens,
                    t.skipped_ffn,
                    t.eligible_ffn
                ),
                "{policy:?}"
            );
            assert_eq!(
                (&s.per_layer, s.bytes_skipped),
                (&t.per_layer, t.bytes_skipped),
                "{policy:?}"
            );
            if policy != Policy::None {
                assert!(s.skipped_ffn > 0, "{policy:?} skipped nothing");
            }
        }
    }
}

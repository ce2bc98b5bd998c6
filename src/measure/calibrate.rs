//! Calibration (paper §3, Fig. 2): run the full model over calibration text, record per token
//! and layer cos(h, h + ffn) and cos(layer input, layer output), summarise them per layer,
//! find the cold regions and choose (threshold, k) per target ratio by simulating the adaptive
//! policy on the recorded similarities.

use crate::model::Llama;
use crate::session::{Session, SessionConfig};
use crate::skip::compensation::{Compensation, FfnMap};
use crate::skip::{
    cosine, Controller, KldPoint, LayerStat, Policy, Profile, Schedule, SkipController,
    SkipOptions, SkipParams, Suggestion, PROFILE_VERSION,
};

use super::{lowrank, metrics};

/// Target ratios the profile carries suggestions for (the 10/20/25/30/35%).
pub const TARGET_RATIOS: [f64; 5] = [0.10, 0.20, 0.25, 0.30, 0.35];
/// Target ratios of the KL divergence curve (`--max-kld`).
pub const KLD_RATIOS: [f64; 7] = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35];
/// Calibration tokens teacher-forced for each point of the KL divergence curve. When the
/// text has at least twice as many, the compensations are fitted on the tokens after them,
/// so the curve measures them out of sample.
pub const KLD_TOKENS: usize = 512;
/// Calibration tokens teacher-forced per layer to measure its damage (`Profile::ffn_damage`).
pub const DAMAGE_TOKENS: usize = 256;
/// The (policy, compensation) series of the KL divergence curve: the paper's rule and the two
/// `auto` chooses between.
pub const KLD_SERIES: [(Policy, Compensation); 3] = [
    (Policy::Adaptive, Compensation::None),
    (Policy::Adaptive, Compensation::Lowrank),
    (Policy::Placed, Compensation::Lowrank),
];

/// Records both cosines for every row of every forward call (full model).
pub struct Recorder {
    n_layer: usize,
    /// Rows recorded before the current call.
    base: usize,
    /// `[tokens, n_layer]` cos(h, h + ffn).
    pub ffn: Vec<f32>,
    /// `[tokens, n_layer]` cos(layer input, layer output).
    pub layer: Vec<f32>,
    /// Layer inputs of the current call's rows, `[rows, n_embd]`.
    inputs: Vec<f32>,
    /// First token whose FFN input and output are kept for the compensation fits.
    pub fit_from: usize,
    /// Per layer `[fit tokens, n_embd]`: scale-free FFN inputs `h / rms(h)`.
    pub fit_x: Vec<Vec<f32>>,
    /// Per layer `[fit tokens, n_embd]`: FFN outputs (l_out − ffn_inp).
    pub fit_y: Vec<Vec<f32>>,
}

impl Recorder {
    pub fn new(n_layer: usize) -> Self {
        Recorder {
            n_layer,
            base: 0,
            ffn: Vec::new(),
            layer: Vec::new(),
            inputs: Vec::new(),
            fit_from: 1,
            fit_x: vec![Vec::new(); n_layer],
            fit_y: vec![Vec::new(); n_layer],
        }
    }

    pub fn tokens(&self) -> usize {
        self.ffn.len() / self.n_layer
    }
}

impl Controller for Recorder {
    fn begin(&mut self, positions: &[usize], _prompt: bool) {
        self.base = self.tokens();
        let n = (self.base + positions.len()) * self.n_layer;
        self.ffn.resize(n, f32::NAN);
        self.layer.resize(n, f32::NAN);
    }

    fn observes_ffn_vectors(&self) -> bool {
        true
    }

    fn observes_layers(&self) -> bool {
        true
    }

    fn layer_input(&mut self, _layer: usize, row: usize, x: &[f32]) {
        let d = x.len();
        if self.inputs.len() < (row + 1) * d {
            self.inputs.resize((row + 1) * d, 0.0);
        }
        self.inputs[row * d..(row + 1) * d].copy_from_slice(x);
    }

    fn ffn_vectors(&mut self, layer: usize, row: usize, before: &[f32], after: &[f32]) {
        let d = after.len();
        let i = (self.base + row) * self.n_layer + layer;
        self.ffn[i] = cosine(before, after);
        self.layer[i] = cosine(&self.inputs[row * d..(row + 1) * d], after);
        if self.base + row >= self.fit_from {
            let x = &mut self.fit_x[layer];
            let at = x.len();
            x.resize(at + d, 0.0);
            lowrank::scale_free(before, &mut x[at..]);
            self.fit_y[layer].extend(after.iter().zip(before).map(|(a, b)| a - b));
        }
    }
}

/// Per-layer statistics of a `[tokens, n_layer]` matrix.
pub fn layer_stats(m: &[f32], n_layer: usize) -> Vec<LayerStat> {
    let tokens = m.len() / n_layer;
    (0..n_layer)
        .map(|l| {
            let mut v: Vec<f32> = (0..tokens).map(|t| m[t * n_layer + l]).collect();
            v.sort_by(f32::total_cmp);
            let q = |p: f64| -> f32 {
                if v.is_empty() {
                    return f32::NAN;
                }
                v[((v.len() - 1) as f64 * p).round() as usize]
            };
            let n = v.len().max(1) as f64;
            LayerStat {
                mean: (v.iter().map(|&x| f64::from(x)).sum::<f64>() / n) as f32,
                p10: q(0.10),
                p50: q(0.50),
                p90: q(0.90),
                frac_ge_095: (v.iter().filter(|&&x| x >= 0.95).count() as f64 / n) as f32,
            }
        })
        .collect()
}

/// Cold regions from the mean FFN cosine per layer: the leading and trailing runs of layers
/// that sit clearly below the profile's plateau (median − max(0.02, 4 × MAD)), i.e. where the
/// similarity is still rising at the start or falls at the end (paper Fig. 2).
pub fn cold_regions(mean: &[f32]) -> (usize, usize) {
    let n = mean.len();
    let mut s: Vec<f32> = mean.to_vec();
    s.sort_by(f32::total_cmp);
    let med = s[n / 2];
    let mut dev: Vec<f32> = mean.iter().map(|&x| (x - med).abs()).collect();
    dev.sort_by(f32::total_cmp);
    let mad = dev[n / 2];
    let floor = med - (4.0 * mad).max(0.02);
    let start = mean.iter().take_while(|&&x| x < floor).count();
    let end = mean[start..]
        .iter()
        .rev()
        .take_while(|&&x| x < floor)
        .count();
    (start, end)
}

/// Simulates FFN-SkipLLM on recorded full-model similarities `ffn` (`[tokens, n_layer]`):
/// returns (realized ratio, mean Σ(1 − cos) over skipped blocks per token). Later layers'
/// similarities would change after a skip; the simulation uses the full model's, which is
/// what makes it a calibration estimate rather than a measurement.
pub fn simulate(
    ffn: &[f32],
    n_layer: usize,
    cold: (usize, usize),
    threshold: f32,
    schedule: &Schedule,
) -> (f64, f64) {
    let tokens = ffn.len() / n_layer;
    let (lo, hi) = (cold.0, n_layer - cold.1);
    let (mut skipped, mut damage) = (0usize, 0f64);
    for t in 0..tokens {
        let row = &ffn[t * n_layer..(t + 1) * n_layer];
        let budget = schedule.budget(t);
        if budget == 0 {
            continue;
        }
        for l in lo..hi {
            let prev = if l == 0 { -1.0 } else { row[l - 1] };
            if prev >= threshold {
                let end = (l + budget).min(hi);
                skipped += end - l;
                damage += row[l..end].iter().map(|&c| 1.0 - f64::from(c)).sum::<f64>();
                break;
            }
        }
    }
    let t = tokens.max(1) as f64;
    (skipped as f64 / (t * n_layer as f64), damage / t)
}

/// Threshold and budget for `ratio`: over a grid of thresholds, the smallest budget whose
/// simulated ratio reaches the target, keeping the (threshold, k) with the least simulated
/// damage (ties: the higher threshold).
pub fn suggest(
    ffn: &[f32],
    n_layer: usize,
    cold: (usize, usize),
    ratio: f64,
    full_every: usize,
) -> Suggestion {
    let region = n_layer - cold.0 - cold.1;
    let mut best: Option<Suggestion> = None;
    let thresholds = (80..=99).map(|t| t as f32 / 100.0).chain([-1.0]);
    for thr in thresholds {
        let sched = |k: f64| Schedule {
            warmup: 0,
            k,
            full_every,
        };
        let base = Schedule::for_ratio(ratio, n_layer, 0, full_every).k;
        let (mut lo, mut hi) = (base, region as f64);
        let target = ratio - 1e-9;
        if simulate(ffn, n_layer, cold, thr, &sched(hi)).0 < target {
            // Even the whole region does not reach the ratio at this threshold.
            let (r, d) = simulate(ffn, n_layer, cold, thr, &sched(hi));
            let s = Suggestion {
                ratio,
                threshold: thr,
                k: hi,
                simulated_ratio: r,
                simulated_damage: d,
            };
            if best
                .as_ref()
                .is_none_or(|b| b.simulated_ratio < target && r > b.simulated_ratio)
            {
                best = Some(s);
            }
            continue;
        }
        if simulate(ffn, n_layer, cold, thr, &sched(lo)).0 < target {
            for _ in 0..20 {
                let mid = (lo + hi) / 2.0;
                if simulate(ffn, n_layer, cold, thr, &sched(mid)).0 >= target {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            lo = hi;
        }
        let k = (lo * 100.0).ceil() / 100.0;
        let (r, d) = simulate(ffn, n_layer, cold, thr, &sched(k));
        let better = match &best {
            None => true,
            Some(b) if b.simulated_ratio < target => true,
            Some(b) => d < b.simulated_damage - 1e-12,
        };
        if better {
            best = Some(Suggestion {
                ratio,
                threshold: thr,
                k,
                simulated_ratio: r,
                simulated_damage: d,
            });
        }
    }
    best.expect("the threshold grid is not empty")
}

/// Calibration over `tokens` (first token excluded from the statistics: position 0 is the
/// attention sink and is never generated).
pub fn calibrate(
    model: &Llama,
    tokens: &[u32],
    threads: usize,
    source: &str,
    full_every: usize,
) -> anyhow::Result<(Profile, Recorder)> {
    let n_layer = model.config.n_layer;
    anyhow::ensure!(
        tokens.len() >= 2,
        "calibration needs at least 2 tokens, the text gave {}",
        tokens.len()
    );
    // Exact batches: the statistics set thresholds that decoding applies.
    let config = SessionConfig {
        exact_batches: true,
        ..SessionConfig::new(tokens.len(), threads)
    };
    let mut rec = Recorder::new(n_layer);
    if tokens.len() >= 2 * KLD_TOKENS {
        rec.fit_from = KLD_TOKENS;
    }
    let mut session = Session::with_controller(model, config, rec)?;
    session.prefill(tokens)?;
    let mut rec = session.controller;
    let ffn = &rec.ffn[n_layer..];
    let layer = &rec.layer[n_layer..];
    let ffn_cos = layer_stats(ffn, n_layer);
    let layer_cos = layer_stats(layer, n_layer);
    let block_influence = layer_cos.iter().map(|s| 1.0 - s.mean).collect();
    let mean: Vec<f32> = ffn_cos.iter().map(|s| s.mean).collect();
    let cold = cold_regions(&mean);
    let suggestions = TARGET_RATIOS
        .iter()
        .map(|&r| suggest(ffn, n_layer, cold, r, full_every))
        .collect();
    // Compensations: the mean and the rank-r least-squares map per layer (rank from the
    // layer's FFN bytes), fitted on the tokens from `fit_from`.
    let d = model.config.n_embd;
    let bytes = model.layer_bytes();
    let mut ffn_mean = Vec::with_capacity(n_layer);
    let mut ffn_lowrank = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let (x, y) = (
            std::mem::take(&mut rec.fit_x[l]),
            std::mem::take(&mut rec.fit_y[l]),
        );
        let m = lowrank::fit(&x, &y, d, lowrank::rank_for(bytes.ffn[l], d));
        ffn_mean.push(lowrank::fit(&[], &y, d, 0).offset);
        ffn_lowrank.push(m);
    }
    let profile = Profile {
        version: PROFILE_VERSION,
        n_layer,
        tokens: tokens.len() - 1,
        source: source.to_string(),
        ffn_cos,
        layer_cos,
        block_influence,
        cold_start: cold.0,
        cold_end: cold.1,
        full_every,
        suggestions,
        kld_curve: Vec::new(),
        ffn_mean,
        ffn_lowrank,
        ffn_damage: Vec::new(),
    };
    let mut profile = profile;
    let t = &tokens[..tokens.len().min(KLD_TOKENS)];
    let reference = Reference::new(model, t, threads)?;
    profile.ffn_damage = reference.damage(model, threads, &profile)?;
    profile.kld_curve = reference.curve(model, threads, &profile)?;
    profile.validate()?;
    Ok((profile, rec))
}

/// The full model's distributions over calibration tokens, teacher-forced (first token as
/// the prompt), against which policies are scored.
pub struct Reference<'t> {
    tokens: &'t [u32],
    top: Vec<metrics::TopK>,
}

impl<'t> Reference<'t> {
    pub fn new(model: &Llama, tokens: &'t [u32], threads: usize) -> anyhow::Result<Self> {
        let mut top = Vec::with_capacity(tokens.len());
        if tokens.len() >= 3 {
            teacher_forced(
                model,
                tokens,
                threads,
                SkipParams::none(model.config.n_layer),
                &mut |row| top.push(metrics::top_k(row, metrics::KLD_TOP_K)),
            )?;
        }
        Ok(Reference { tokens, top })
    }

    /// (mean KL(full ‖ params) per token in nats, realized FFN skip ratio) over the first
    /// `n` tokens.
    pub fn kld(
        &self,
        model: &Llama,
        threads: usize,
        params: SkipParams,
        n: usize,
    ) -> anyhow::Result<(f64, f64)> {
        let t = &self.tokens[..self.tokens.len().min(n)];
        if t.len() < 3 {
            return Ok((0.0, 0.0));
        }
        let (mut sum, mut count, mut i) = (0.0f64, 0usize, 0usize);
        let ratio = teacher_forced(model, t, threads, params, &mut |row| {
            if let Some((kl, _)) = self.top.get(i).and_then(|p| metrics::kld_top_k(p, row)) {
                sum += kl;
                count += 1;
            }
            i += 1;
        })?;
        Ok((if count == 0 { 0.0 } else { sum / count as f64 }, ratio))
    }

    /// Per layer: KL divergence when only that layer's FFN is skipped, for every token after
    /// the first, with the profile's low-rank compensation (else the mean, else none), over
    /// [`DAMAGE_TOKENS`].
    pub fn damage(&self, model: &Llama, threads: usize, p: &Profile) -> anyhow::Result<Vec<f32>> {
        let n_layer = model.config.n_layer;
        let compensation = [Compensation::Lowrank, Compensation::Mean]
            .into_iter()
            .find(|&c| p.has(c))
            .unwrap_or(Compensation::None);
        let estimate: Vec<FfnMap> = match compensation {
            Compensation::Lowrank => p.ffn_lowrank.clone(),
            Compensation::Mean => p.ffn_mean.iter().cloned().map(FfnMap::mean).collect(),
            Compensation::None => Vec::new(),
        };
        (0..n_layer)
            .map(|l| {
                let params = SkipParams {
                    policy: Policy::Placed,
                    ratio: 1.0 / n_layer as f64,
                    schedule: Schedule {
                        warmup: 0,
                        k: 1.0,
                        full_every: 0,
                    },
                    // A budget of 1 runs from layer l (`ranked` is indexed by budget).
                    ranked: vec![l, l],
                    ffn_estimate: estimate.clone(),
                    compensation,
                    source: format!("calibration: layer {l} alone"),
                    ..SkipParams::none(n_layer)
                };
                Ok(self.kld(model, threads, params, DAMAGE_TOKENS)?.0 as f32)
            })
            .collect()
    }

    /// [`KLD_SERIES`] at each of [`KLD_RATIOS`] over [`KLD_TOKENS`].
    pub fn curve(
        &self,
        model: &Llama,
        threads: usize,
        p: &Profile,
    ) -> anyhow::Result<Vec<KldPoint>> {
        let mut curve = Vec::new();
        if self.top.is_empty() {
            return Ok(curve);
        }
        for (policy, compensation) in KLD_SERIES {
            if !p.has(compensation) || (policy == Policy::Placed && p.ffn_damage.is_empty()) {
                continue;
            }
            for &ratio in &KLD_RATIOS {
                let opts = SkipOptions {
                    ratio: Some(ratio),
                    compensate: compensation,
                    warmup: Some(0),
                    ..SkipOptions::new(policy)
                };
                let params =
                    SkipParams::resolve(&opts, model.config.n_layer, Some((p, "calibration")))
                        .map_err(|e| anyhow::anyhow!("KLD curve at ratio {ratio}: {e}"))?;
                let (kld_mean, ffn_skip) = self.kld(model, threads, params, KLD_TOKENS)?;
                curve.push(KldPoint {
                    policy,
                    ratio,
                    compensation,
                    compensate: false,
                    ffn_skip,
                    kld_mean,
                });
            }
        }
        Ok(curve)
    }
}

/// Runs `tokens` teacher-forced under `params` (exact batches, the first token as the
/// prompt) and hands `f` each predicting row's logits; returns the realized FFN skip ratio.
fn teacher_forced(
    model: &Llama,
    tokens: &[u32],
    threads: usize,
    params: SkipParams,
    f: &mut dyn FnMut(&[f32]),
) -> anyhow::Result<f64> {
    let config = SessionConfig {
        exact_batches: true,
        ..SessionConfig::new(tokens.len(), threads)
    };
    let c = SkipController::new(params, model.layer_bytes());
    let mut s = Session::with_controller(model, config, c)?;
    f(s.prefill(&tokens[..1])?);
    let nv = model.config.n_vocab;
    for chunk in tokens[1..tokens.len() - 1].chunks(128) {
        for row in s.eval_all(chunk, false)?.chunks_exact(nv) {
            f(row);
        }
    }
    Ok(s.controller.stats.ratio())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_regions_find_the_low_ends() {
        let mut m = vec![0.97f32; 30];
        m[0] = 0.05;
        m[1] = 0.6;
        m[29] = 0.78;
        m[20] = 0.955; // an interior dip is not a cold region
        assert_eq!(cold_regions(&m), (2, 1));
    }

    #[test]
    fn simulation_counts_the_greedy_run() {
        // 2 tokens × 6 layers, cold 1 + 1: region is layers 1..5.
        let ffn = [
            0.1, 0.99, 0.5, 0.99, 0.99, 0.2, // fires at layer 2 (prev = layer 1): skips 2,3
            0.1, 0.5, 0.5, 0.5, 0.5, 0.2, // never fires at 0.9
        ];
        let s = Schedule {
            warmup: 0,
            k: 2.0,
            full_every: 0,
        };
        let (r, d) = simulate(&ffn, 6, (1, 1), 0.9, &s);
        assert!((r - 2.0 / 12.0).abs() < 1e-12);
        assert!((d - (0.5 + 0.01) / 2.0).abs() < 1e-6);
    }
}

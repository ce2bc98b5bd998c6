//! A model's calibration profile: per-layer cosine statistics measured on calibration text
//! (paper Fig. 2), the detected cold regions and suggested (threshold, k) per target ratio.
//! Files (JSON, `ffnskip.*` GGUF metadata) are `skip_setup::profile_file`'s business.

use serde::{Deserialize, Serialize};

pub const PROFILE_VERSION: u32 = 1;

/// Distribution of one cosine over the calibration tokens at one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStat {
    pub mean: f32,
    pub p10: f32,
    pub p50: f32,
    pub p90: f32,
    /// Share of tokens with cosine ≥ 0.95 (the authors' threshold).
    pub frac_ge_095: f32,
}

/// Operating point for one target ratio, chosen by simulating the adaptive policy on the
/// calibration tokens (see `measure::calibrate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    /// Target share of FFN blocks skipped per generated token.
    pub ratio: f64,
    pub threshold: f32,
    /// Mean per-token budget (`Schedule::k`) that realizes `ratio` on the calibration tokens.
    pub k: f64,
    /// Realized ratio in the simulation.
    pub simulated_ratio: f64,
    /// Mean Σ(1 − cos) over the skipped FFN blocks per token: the simulated damage.
    pub simulated_damage: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    pub n_layer: usize,
    /// Calibration tokens measured.
    pub tokens: usize,
    /// Where the calibration text came from.
    pub source: String,
    /// cos(h, h + ffn) per layer: residual stream before vs after the FFN.
    pub ffn_cos: Vec<LayerStat>,
    /// cos(layer input, layer output) per layer.
    pub layer_cos: Vec<LayerStat>,
    /// ShortGPT's Block Influence per layer: mean of 1 − cos(layer input, layer output).
    pub block_influence: Vec<f32>,
    /// Leading layers whose FFN always runs.
    pub cold_start: usize,
    /// Trailing layers whose FFN always runs.
    pub cold_end: usize,
    /// `Schedule::full_every` the suggestions were simulated with.
    pub full_every: usize,
    pub suggestions: Vec<Suggestion>,
    /// Mean FFN output per layer `[n_layer][n_embd]` over the calibration tokens: the estimate
    /// added in place of a skipped FFN (`+mean` policies). Empty in profiles written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ffn_mean: Vec<Vec<f32>>,
    /// KL divergence to the full model against target ratio, measured on the calibration text
    /// (`--max-kld` picks from it). Empty in profiles written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kld_curve: Vec<KldPoint>,
}

/// One point of [`Profile::kld_curve`]: `adaptive` at a target ratio, with or without the
/// mean-FFN compensation, teacher-forced over the calibration tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KldPoint {
    pub ratio: f64,
    pub compensate: bool,
    /// Realized share of FFN blocks skipped.
    pub ffn_skip: f64,
    /// Mean KL(full ‖ policy) per token, nats.
    pub kld_mean: f64,
}

impl Profile {
    /// Structural checks; every error names the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.version == PROFILE_VERSION,
            "version {} (expected {PROFILE_VERSION})",
            self.version
        );
        let n = self.n_layer;
        anyhow::ensure!(n > 0, "n_layer is 0");
        for (name, len) in [
            ("ffn_cos", self.ffn_cos.len()),
            ("layer_cos", self.layer_cos.len()),
            ("block_influence", self.block_influence.len()),
        ] {
            anyhow::ensure!(len == n, "{name} has {len} layers, expected n_layer = {n}");
        }
        if let Some(first) = self.ffn_mean.first() {
            anyhow::ensure!(
                self.ffn_mean.len() == n && self.ffn_mean.iter().all(|v| v.len() == first.len()),
                "ffn_mean has {} layers of unequal or wrong length, expected n_layer = {n} rows of n_embd",
                self.ffn_mean.len()
            );
            anyhow::ensure!(
                self.ffn_mean.iter().flatten().all(|x| x.is_finite()),
                "ffn_mean holds a non-finite value"
            );
        }
        anyhow::ensure!(
            self.cold_start + self.cold_end <= n,
            "cold_start {} + cold_end {} exceed n_layer {n}",
            self.cold_start,
            self.cold_end
        );
        for k in &self.kld_curve {
            anyhow::ensure!(
                (0.0..=1.0).contains(&k.ratio)
                    && (0.0..=1.0).contains(&k.ffn_skip)
                    && k.kld_mean.is_finite()
                    && k.kld_mean >= 0.0,
                "kld_curve point at ratio {} has ffn_skip {} and kld_mean {}",
                k.ratio,
                k.ffn_skip,
                k.kld_mean
            );
        }
        for s in &self.suggestions {
            anyhow::ensure!(
                (0.0..=1.0).contains(&s.ratio) && s.k >= 0.0 && s.k <= n as f64,
                "suggestion for ratio {} has k = {} (expected 0..={n})",
                s.ratio,
                s.k
            );
        }
        Ok(())
    }

    /// Mean per-layer FFN cosine.
    pub fn ffn_cos_mean(&self) -> Vec<f32> {
        self.ffn_cos.iter().map(|s| s.mean).collect()
    }

    /// The suggestion whose ratio is nearest `ratio`.
    pub fn nearest(&self, ratio: f64) -> Option<&Suggestion> {
        self.suggestions
            .iter()
            .min_by(|a, b| (a.ratio - ratio).abs().total_cmp(&(b.ratio - ratio).abs()))
    }
}

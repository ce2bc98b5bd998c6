//! A model's calibration profile: per-layer cosine statistics measured on calibration text
//! (paper Fig. 2), the detected cold regions and suggested (threshold, k) per target ratio.
//! Files (JSON, `ffnskip.*` GGUF metadata) are `skip_setup::profile_file`'s business.

use serde::{Deserialize, Serialize};

use super::compensation::{Compensation, FfnMap};
use super::Policy;

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
    /// Per layer: the low-rank least-squares estimate of the FFN output from its input
    /// (`+lowrank`, `measure::lowrank`), fitted on calibration tokens
    /// outside the ones the KLD curve is measured on. Empty in profiles written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ffn_lowrank: Vec<FfnMap>,
    /// Per layer: mean KL(full ‖ this layer's FFN skipped for every token, `+lowrank` when
    /// fitted), nats per token: the damage `placed` ranks layers by. Empty before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ffn_damage: Vec<f32>,
}

/// One point of [`Profile::kld_curve`]: a policy at a target ratio with a compensation,
/// teacher-forced over the calibration tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KldPoint {
    #[serde(default = "adaptive")]
    pub policy: Policy,
    pub ratio: f64,
    #[serde(default)]
    pub compensation: Compensation,
    /// Profiles written before `compensation`: `true` meant `+mean` (read, never written).
    #[serde(default, skip_serializing)]
    pub compensate: bool,
    /// Realized share of FFN blocks skipped.
    pub ffn_skip: f64,
    /// Mean KL(full ‖ policy) per token, nats.
    pub kld_mean: f64,
}

fn adaptive() -> Policy {
    Policy::Adaptive
}

impl Profile {
    /// Upgrades fields written by earlier versions (`KldPoint::compensate`).
    pub fn upgrade(&mut self) {
        for k in &mut self.kld_curve {
            if std::mem::take(&mut k.compensate) {
                k.compensation = Compensation::Mean;
            }
        }
    }

    /// Whether the profile carries what `compensation` adds.
    pub fn has(&self, compensation: Compensation) -> bool {
        match compensation {
            Compensation::None => true,
            Compensation::Mean => !self.ffn_mean.is_empty(),
            Compensation::Lowrank => !self.ffn_lowrank.is_empty(),
        }
    }

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
        if !self.ffn_lowrank.is_empty() {
            anyhow::ensure!(
                self.ffn_lowrank.len() == n,
                "ffn_lowrank has {} layers, expected n_layer = {n}",
                self.ffn_lowrank.len()
            );
            let d = self.ffn_lowrank[0].offset.len();
            for (l, m) in self.ffn_lowrank.iter().enumerate() {
                m.validate(d)
                    .map_err(|e| anyhow::anyhow!("ffn_lowrank layer {l}: {e}"))?;
            }
        }
        anyhow::ensure!(
            self.ffn_damage.is_empty()
                || (self.ffn_damage.len() == n
                    && self.ffn_damage.iter().all(|x| x.is_finite() && *x >= 0.0)),
            "ffn_damage has {} values, expected n_layer = {n} finite values ≥ 0",
            self.ffn_damage.len()
        );
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

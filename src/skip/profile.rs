//! A model's calibration profile: per-layer cosine statistics measured on calibration text
//! (paper Fig. 2), the detected cold regions and suggested (threshold, k) per target ratio.
//! Stored as JSON (`--skip-profile`) or as `ffnskip.*` keys inside a GGUF, which `generate`
//! picks up by itself.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufFile, GgufWriter, Value, ValueType};

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
}

const STAT_FIELDS: [&str; 5] = ["mean", "p10", "p50", "p90", "frac_ge_095"];

fn stat_field(s: &LayerStat, i: usize) -> f32 {
    [s.mean, s.p10, s.p50, s.p90, s.frac_ge_095][i]
}

fn f32_array(v: impl IntoIterator<Item = f32>) -> Value {
    Value::Array(ValueType::F32, v.into_iter().map(Value::F32).collect())
}

fn f64_array(v: impl IntoIterator<Item = f64>) -> Value {
    Value::Array(ValueType::F64, v.into_iter().map(Value::F64).collect())
}

impl Profile {
    pub fn load_json(path: &Path) -> anyhow::Result<Profile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read skip profile {}", path.display()))?;
        let p: Profile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a ffnskip profile", path.display()))?;
        p.validate()
            .with_context(|| format!("{}: invalid profile", path.display()))?;
        Ok(p)
    }

    pub fn save_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
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
        anyhow::ensure!(
            self.cold_start + self.cold_end <= n,
            "cold_start {} + cold_end {} exceed n_layer {n}",
            self.cold_start,
            self.cold_end
        );
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

    /// Writes the profile as `ffnskip.*` keys.
    pub fn to_gguf(&self, w: &mut GgufWriter) {
        w.set("ffnskip.profile.version", Value::U32(self.version));
        w.set("ffnskip.profile.n_layer", Value::U32(self.n_layer as u32));
        w.set("ffnskip.profile.tokens", Value::U64(self.tokens as u64));
        w.set("ffnskip.profile.source", Value::String(self.source.clone()));
        for (prefix, stats) in [("ffn_cos", &self.ffn_cos), ("layer_cos", &self.layer_cos)] {
            for (i, field) in STAT_FIELDS.iter().enumerate() {
                w.set(
                    &format!("ffnskip.profile.{prefix}.{field}"),
                    f32_array(stats.iter().map(|s| stat_field(s, i))),
                );
            }
        }
        w.set(
            "ffnskip.profile.block_influence",
            f32_array(self.block_influence.iter().copied()),
        );
        w.set("ffnskip.cold_start", Value::U32(self.cold_start as u32));
        w.set("ffnskip.cold_end", Value::U32(self.cold_end as u32));
        w.set("ffnskip.full_every", Value::U32(self.full_every as u32));
        let s = &self.suggestions;
        w.set(
            "ffnskip.suggest.ratio",
            f64_array(s.iter().map(|s| s.ratio)),
        );
        w.set(
            "ffnskip.suggest.threshold",
            f32_array(s.iter().map(|s| s.threshold)),
        );
        w.set("ffnskip.suggest.k", f64_array(s.iter().map(|s| s.k)));
        w.set(
            "ffnskip.suggest.simulated_ratio",
            f64_array(s.iter().map(|s| s.simulated_ratio)),
        );
        w.set(
            "ffnskip.suggest.simulated_damage",
            f64_array(s.iter().map(|s| s.simulated_damage)),
        );
    }

    /// Reads a profile embedded by [`Profile::to_gguf`]; `None` when the file has none.
    pub fn from_gguf(f: &GgufFile) -> anyhow::Result<Option<Profile>> {
        let Some(version) = f.opt_u64("ffnskip.profile.version")? else {
            return Ok(None);
        };
        let n = f.usize_in("ffnskip.profile.n_layer", 1..=65536)?;
        let arr = |key: &str| -> anyhow::Result<Vec<f32>> {
            let v = f
                .opt_f32_array(key)?
                .with_context(|| format!("{}: key '{key}' is missing", f.path().display()))?;
            anyhow::ensure!(
                v.len() == n,
                "{}: key '{key}' has {} values, expected {n}",
                f.path().display(),
                v.len()
            );
            Ok(v)
        };
        let f64s = |key: &str| -> anyhow::Result<Vec<f64>> {
            match f.get(key) {
                Some(Value::Array(ValueType::F64, items)) => items
                    .iter()
                    .map(|v| match v {
                        Value::F64(x) => Ok(*x),
                        _ => {
                            anyhow::bail!("{}: key '{key}' is not an f64 array", f.path().display())
                        }
                    })
                    .collect(),
                Some(v) => anyhow::bail!(
                    "{}: key '{key}' must be an array of f64, found {}",
                    f.path().display(),
                    v.type_desc()
                ),
                None => anyhow::bail!("{}: key '{key}' is missing", f.path().display()),
            }
        };
        let stats = |prefix: &str| -> anyhow::Result<Vec<LayerStat>> {
            let cols: Vec<Vec<f32>> = STAT_FIELDS
                .iter()
                .map(|field| arr(&format!("ffnskip.profile.{prefix}.{field}")))
                .collect::<anyhow::Result<_>>()?;
            Ok((0..n)
                .map(|l| LayerStat {
                    mean: cols[0][l],
                    p10: cols[1][l],
                    p50: cols[2][l],
                    p90: cols[3][l],
                    frac_ge_095: cols[4][l],
                })
                .collect())
        };
        let ratio = f64s("ffnskip.suggest.ratio")?;
        let threshold = f
            .opt_f32_array("ffnskip.suggest.threshold")?
            .unwrap_or_default();
        let k = f64s("ffnskip.suggest.k")?;
        let sim = f64s("ffnskip.suggest.simulated_ratio")?;
        let damage = f64s("ffnskip.suggest.simulated_damage")?;
        anyhow::ensure!(
            [threshold.len(), k.len(), sim.len(), damage.len()]
                .iter()
                .all(|&l| l == ratio.len()),
            "{}: the ffnskip.suggest.* arrays differ in length",
            f.path().display()
        );
        let p = Profile {
            version: version as u32,
            n_layer: n,
            tokens: f.usize_in("ffnskip.profile.tokens", 0..=u64::MAX)?,
            source: f.str("ffnskip.profile.source")?.to_string(),
            ffn_cos: stats("ffn_cos")?,
            layer_cos: stats("layer_cos")?,
            block_influence: arr("ffnskip.profile.block_influence")?,
            cold_start: f.usize_in("ffnskip.cold_start", 0..=n as u64)?,
            cold_end: f.usize_in("ffnskip.cold_end", 0..=n as u64)?,
            full_every: f.usize_in("ffnskip.full_every", 0..=u64::from(u32::MAX))?,
            suggestions: (0..ratio.len())
                .map(|i| Suggestion {
                    ratio: ratio[i],
                    threshold: threshold[i],
                    k: k[i],
                    simulated_ratio: sim[i],
                    simulated_damage: damage[i],
                })
                .collect(),
        };
        p.validate()
            .with_context(|| format!("{}: invalid embedded ffnskip profile", f.path().display()))?;
        Ok(Some(p))
    }

    /// Writes a copy of `src` with this profile embedded (replacing any earlier one).
    pub fn embed(&self, src: &GgufFile, out: &Path) -> anyhow::Result<()> {
        let mut w = GgufWriter::new();
        for (k, v) in src.metadata() {
            if !k.starts_with("ffnskip.") {
                w.set(k, v.clone());
            }
        }
        self.to_gguf(&mut w);
        for t in src.tensors() {
            w.add_tensor(&t.name, t.ty, &t.shape, src.tensor_data(t))
                .with_context(|| format!("copying tensor '{}'", t.name))?;
        }
        w.write_file(out)
            .with_context(|| format!("cannot write {}", out.display()))
    }
}

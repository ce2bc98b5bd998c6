//! Measurement that drives sessions: calibration (and, above it, bench and eval).

pub mod bench;
pub mod calibrate;
pub mod code;
pub mod data;
pub mod eval;
pub mod frontier;
pub mod lowrank;
pub mod metrics;
pub mod plot;

use std::path::PathBuf;

/// The evaluation data directory: `$FFNSKIP_DATA`, else `../shared/data` from the current
/// directory, else `../shared/data` beside the source tree this binary was built from.
pub fn data_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FFNSKIP_DATA") {
        return Some(PathBuf::from(d));
    }
    [
        PathBuf::from("../shared/data"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    ]
    .into_iter()
    .find(|p| p.is_dir())
}

/// wikitext-2 test split inside [`data_dir`].
pub fn wikitext_test() -> Option<PathBuf> {
    data_dir()
        .map(|d| d.join("wikitext-2/wikitext-2-raw/wiki.test.raw"))
        .filter(|p| p.is_file())
}

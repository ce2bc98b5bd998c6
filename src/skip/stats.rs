//! Skip statistics, counted as the authors' code counts them (`llama/generation.py`): skipped
//! FFN blocks over (decoded tokens × layers), from the first token allowed to skip. (The code
//! divides by `total_layers + 1`; the +1 only guards against 0 and is left out here.)

use serde::Serialize;

/// One token's decisions per layer, as a string of `n_layer` characters.
pub const RAN: u8 = b'F';
/// FFN skipped, attention ran.
pub const SKIPPED: u8 = b's';
/// Whole layer removed (ShortGPT): no attention, no FFN, no K/V.
pub const REMOVED: u8 = b'x';
/// Token exited before this layer: only K/V computed from the frozen state.
pub const EXITED: u8 = b'e';

#[derive(Clone, Debug, Default, Serialize)]
pub struct SkipStats {
    /// Generated (non-prompt) tokens seen.
    pub decoded_tokens: u64,
    /// Of those, tokens from the first one allowed to skip on.
    pub counted_tokens: u64,
    /// FFN blocks not run in counted tokens (skipped, removed or after an exit).
    pub skipped_ffn: u64,
    /// `counted_tokens × n_layer`.
    pub eligible_ffn: u64,
    /// Skipped FFN blocks per layer.
    pub per_layer: Vec<u64>,
    /// Weight bytes not read in counted tokens (FFN matrices, plus attention matrices that a
    /// removed layer or an exited token does not read).
    pub bytes_skipped: u64,
    /// Per counted token, its decisions per layer (`F` ran, `s` FFN skipped, `x` layer
    /// removed, `e` exited), when recording was asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<String>,
}

impl SkipStats {
    pub fn new(n_layer: usize) -> Self {
        SkipStats {
            per_layer: vec![0; n_layer],
            ..Default::default()
        }
    }

    /// Realized FFN skip ratio (0 when nothing was eligible).
    pub fn ratio(&self) -> f64 {
        if self.eligible_ffn == 0 {
            0.0
        } else {
            self.skipped_ffn as f64 / self.eligible_ffn as f64
        }
    }

    /// Mean weight bytes not read per counted token.
    pub fn bytes_skipped_per_token(&self) -> f64 {
        if self.counted_tokens == 0 {
            0.0
        } else {
            self.bytes_skipped as f64 / self.counted_tokens as f64
        }
    }

    /// Forgets everything counted so far (same layer count).
    pub fn clear(&mut self) {
        let n = self.per_layer.len();
        *self = SkipStats::new(n);
    }
}

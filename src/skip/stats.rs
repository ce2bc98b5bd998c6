//! Skip statistics, counted as the authors' code counts them (`llama/generation.py`): skipped
//! FFN blocks over (decoded tokens × layers), from the first token allowed to skip. (The code
//! divides by `total_layers + 1`; the +1 only guards against 0 and is left out here.)

use std::fmt;

use serde::{Serialize, Serializer};

/// What one layer did for one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Attention and FFN ran.
    Ran,
    /// FFN skipped, attention ran.
    Skipped,
    /// Whole layer removed (ShortGPT): no attention, no FFN, no K/V.
    Removed,
    /// Token exited before this layer: only K/V computed from the frozen state.
    Exited,
}

impl Decision {
    /// Its character in a printed trace: `F`, `s`, `x`, `e`.
    pub const fn code(self) -> char {
        match self {
            Decision::Ran => 'F',
            Decision::Skipped => 's',
            Decision::Removed => 'x',
            Decision::Exited => 'e',
        }
    }
}

/// One token's decisions, `[n_layer]`; displayed and serialized as a string of
/// [`Decision::code`]s (`"FFsss…F"`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenDecisions(pub Vec<Decision>);

impl TokenDecisions {
    /// Layers whose decision is `d`.
    pub fn count(&self, d: Decision) -> usize {
        self.0.iter().filter(|&&x| x == d).count()
    }
}

impl fmt::Display for TokenDecisions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0
            .iter()
            .try_for_each(|d| fmt::Write::write_char(f, d.code()))
    }
}

impl Serialize for TokenDecisions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

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
    /// Per counted token, its decisions per layer, when recording was asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<TokenDecisions>,
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

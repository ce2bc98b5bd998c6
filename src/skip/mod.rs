//! FFN skipping: the typed controller interface the forward pass calls between attention and
//! FFN (llama.cpp's `ffn_inp`), FFN-SkipLLM's adaptive policy, the paper's baselines, the
//! calibration profile and the statistics. The model calls a [`Controller`]; a controller
//! never calls the model.
//!
//! Source: Jaiswal et al. 2024, "FFN-SkipLLM" (arXiv 2404.03865), Algorithm 1, and the
//! authors' code (`Ajay1994/layer-skip`, `llama/model_ffn_cosine.py`, `llama/utils.py`,
//! `llama/model_ffn_baseline.py`). DESIGN §2 summarises both.

pub mod compensation;
mod controller;
pub mod params;
mod profile;
mod schedule;
mod sequences;
mod stats;

pub use controller::{LayerBytes, SkipController};
pub use params::{ParamsError, Policy, SkipOptions, SkipParams};
pub use profile::{KldPoint, LayerStat, Profile, Suggestion, PROFILE_VERSION};
pub use schedule::Schedule;
pub use sequences::PerSequence;
pub use stats::{Decision, SkipStats, TokenDecisions};

/// Per-(token, layer) decisions and observations. Every method has a do-nothing default, and
/// the forward pass is generic over the controller, so [`NoSkip`] compiles to the plain model.
///
/// Call order per forward call: `begin`; then per layer `l`: `layer_runs(l)` once; per row
/// `layer_input` (if [`Controller::observes_layers`]) and `exited(l, row)`; per row that has
/// not exited `run_ffn(l, row)` (then `compensate` if it said no); per row whose FFN ran
/// `ffn_vectors` (if [`Controller::observes_ffn_vectors`]) at once, and `after_ffn` with the
/// cosine (if [`Controller::observes_ffn`]) before the next `run_ffn` or `end` — after the
/// next layer's attention has been queued, so a GPU hides the wait for the cosine behind it;
/// finally `end`.
pub trait Controller: Send {
    /// Start of a forward call over rows at `positions` (ascending within a sequence; a
    /// batch of several sequences goes through [`PerSequence`]); `prompt` is true for prompt
    /// (prefill) rows, which FFN-SkipLLM always runs in full.
    fn begin(&mut self, _positions: &[usize], _prompt: bool) {}

    /// Whether layer `layer` runs at all in this call. `false` removes it for every row:
    /// attention, FFN and its K/V (ShortGPT's layer removal).
    #[inline]
    fn layer_runs(&mut self, _layer: usize) -> bool {
        true
    }

    /// Whether `row` has exited before `layer` (early exit). An exited row's hidden state is
    /// frozen; the layer only computes its K/V from that state (`attn_norm`, `W_k`, `W_v`,
    /// RoPE) so later tokens still find a complete cache. Once true, it must stay true for
    /// the row's later layers.
    #[inline]
    fn exited(&mut self, _layer: usize, _row: usize) -> bool {
        false
    }

    /// At `ffn_inp` (`h = x + attn`) of `layer` for batch row `row`: whether the FFN block
    /// runs. When it does not, the layer output is `h`.
    #[inline]
    fn run_ffn(&mut self, _layer: usize, _row: usize) -> bool {
        true
    }

    /// When [`Controller::run_ffn`] said no for `row`: adds an estimate of layer `layer`'s FFN
    /// output to the row's `h` (`[n_embd]`, `ffn_inp` → `l_out`). The default adds nothing (the paper).
    #[inline]
    fn compensate(&mut self, _layer: usize, _row: usize, _h: &mut [f32]) {}

    /// Whether [`Controller::compensate`] may change anything in this call (a GPU backend
    /// then copies the residual stream to the host and back).
    #[inline]
    fn compensates(&self) -> bool {
        false
    }

    /// Whether [`Controller::after_ffn`] is wanted in this call (the FFN block computes the
    /// cosine only then).
    #[inline]
    fn observes_ffn(&self) -> bool {
        false
    }

    /// Whether [`Controller::ffn_vectors`] is wanted in this call (calibration; a GPU
    /// backend then copies the residual stream to the host twice per layer).
    #[inline]
    fn observes_ffn_vectors(&self) -> bool {
        false
    }

    /// Whether [`Controller::layer_input`] is wanted in this call.
    #[inline]
    fn observes_layers(&self) -> bool {
        false
    }

    /// The residual stream entering `layer` for `row` (`[n_embd]`).
    fn layer_input(&mut self, _layer: usize, _row: usize, _x: &[f32]) {}

    /// After the FFN ran for `row`: [`cosine`]`(h, h + ffn)` between the residual stream
    /// before and after it (FFN-SkipLLM's criterion).
    fn after_ffn(&mut self, _layer: usize, _row: usize, _cos: f32) {}

    /// After the FFN ran for `row`: the residual stream before (`h`) and after (`h + ffn`,
    /// which is also the layer's output), `[n_embd]` each.
    fn ffn_vectors(&mut self, _layer: usize, _row: usize, _before: &[f32], _after: &[f32]) {}

    /// End of the forward call (after the last layer, before the head).
    fn end(&mut self) {}

    /// Whether prompt rows compute exactly what the full model computes and nothing is
    /// observed of them but [`Controller::begin`] and [`Controller::end`], so a prompt's
    /// cached keys, values and logits can stand in for running it. `false` by default.
    fn prompt_is_full(&self) -> bool {
        false
    }
}

/// The full model: every FFN runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSkip;

impl Controller for NoSkip {
    fn prompt_is_full(&self) -> bool {
        true
    }
}

/// Cosine similarity over the embedding dimension (FFN-SkipLLM's criterion, paper §3), summed
/// in f64. 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    (ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0) as f32
}

/// SplitMix64: the per-token random stream of the `random` and `static` baselines, seeded from
/// (seed, position) so a token's draw does not depend on how tokens were batched.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokenRng(u64);

impl TokenRng {
    pub(crate) fn new(seed: u64, position: usize) -> Self {
        TokenRng(
            seed ^ (position as u64)
                .wrapping_add(1)
                .wrapping_mul(0xD1B5_4A32_D192_ED03),
        )
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

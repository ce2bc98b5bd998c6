//! The typed hook between attention and FFN (llama.cpp's `ffn_inp`), where FFN skipping is
//! decided. The model calls it; it never calls the model.

/// Per-(token, layer) decisions and observations at the FFN. The forward pass is generic
/// over the hook, so [`NoSkip`] compiles to the plain model at no cost.
pub trait FfnHook: Send {
    /// Start of a forward call over rows at `positions`; `prompt` is true for prompt
    /// (prefill) rows, which FFN-SkipLLM always runs in full.
    fn begin(&mut self, _positions: &[usize], _prompt: bool) {}

    /// At `ffn_inp` (`h = x + attn`, `[n_embd]`) of `layer` for batch row `row`: whether the
    /// FFN block runs. When it does not, the layer output is `h`.
    #[inline]
    fn run_ffn(&mut self, _layer: usize, _row: usize, _ffn_inp: &[f32]) -> bool {
        true
    }

    /// Whether [`FfnHook::after_ffn`] is wanted (the forward pass keeps `ffn_inp` only then).
    fn observes(&self) -> bool {
        false
    }

    /// After the FFN ran for `row`: the residual stream before (`h`) and after (`h + ffn`).
    fn after_ffn(&mut self, _layer: usize, _row: usize, _before: &[f32], _after: &[f32]) {}
}

/// The full model: every FFN runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSkip;

impl FfnHook for NoSkip {}

/// Cosine similarity over the embedding dimension (FFN-SkipLLM's criterion, paper §3).
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
    (ab / (aa.sqrt() * bb.sqrt())) as f32
}

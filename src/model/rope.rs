//! Rotary position embedding, "normal" mode (adjacent pairs), computed as ggml's
//! `ggml_rope_cache_init` does: θ starts at the position and is multiplied by
//! `base^(-2/rope_dim)` per pair, in f32, so our angles match llama.cpp's bit for bit.

use super::config::{LlamaConfig, RopeScaling};

pub struct Rope {
    rope_dim: usize,
    theta_scale: f32,
    freq_scale: f32,
    freq_factors: Option<Vec<f32>>,
}

impl Rope {
    pub fn new(c: &LlamaConfig, freq_factors: Option<Vec<f32>>) -> Self {
        Rope {
            rope_dim: c.rope_dim,
            theta_scale: c.rope_base.powf(-2.0 / c.rope_dim as f32),
            freq_scale: match c.rope_scaling {
                RopeScaling::None => 1.0,
                RopeScaling::Linear { factor } => 1.0 / factor,
            },
            freq_factors,
        }
    }

    /// Fills `cs` (`[rope_dim / 2][2]` = cos, sin) for position `pos`.
    pub fn angles(&self, pos: usize, cs: &mut [f32]) {
        let mut theta = pos as f32;
        for i in 0..self.rope_dim / 2 {
            let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
            let t = self.freq_scale * (theta / ff);
            cs[2 * i] = t.cos();
            cs[2 * i + 1] = t.sin();
            theta *= self.theta_scale;
        }
    }

    /// Rotates each head of `x` (`[n_heads * head_dim]`) in place with angles `cs`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cs: &[f32]) {
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..self.rope_dim / 2 {
                let (c, s) = (cs[2 * i], cs[2 * i + 1]);
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                (head[2 * i], head[2 * i + 1]) = rotate(x0, x1, c, s);
            }
        }
    }
}

/// `(x0·cos − x1·sin, x0·sin + x1·cos)` rounded as ggml's `rotate_pairs` is when GCC contracts
/// it (the default `-ffp-contract=fast` with FMA available): x0's product fused, x1's rounded.
#[cfg(target_feature = "fma")]
#[inline(always)]
fn rotate(x0: f32, x1: f32, c: f32, s: f32) -> (f32, f32) {
    (x0.mul_add(c, -(x1 * s)), x0.mul_add(s, x1 * c))
}

/// Without FMA ggml's build cannot contract either, so both products are rounded.
#[cfg(not(target_feature = "fma"))]
#[inline(always)]
fn rotate(x0: f32, x1: f32, c: f32, s: f32) -> (f32, f32) {
    (x0 * c - x1 * s, x0 * s + x1 * c)
}

//! Rotary position embedding, in "normal" mode (adjacent pairs, LLaMA) or NEOX mode (pairs
//! half the rotated width apart, Qwen2). Angles are computed as
//! `ops.cpp: ggml_rope_cache_init` does: θ starts at the position and is multiplied by
//! `base^(-2/rope_dim)` per pair, in f32, so our angles match llama.cpp's bit for bit; each pair
//! is rotated by `ggml::order::rope_rotate` (`ops.cpp: rotate_pairs`).

use super::config::{LlamaConfig, RopeMode, RopeScaling};
use crate::ggml::order::rope_rotate;

pub struct Rope {
    mode: RopeMode,
    rope_dim: usize,
    theta_scale: f32,
    freq_scale: f32,
    freq_factors: Option<Vec<f32>>,
}

impl Rope {
    pub fn new(c: &LlamaConfig, freq_factors: Option<Vec<f32>>) -> Self {
        Rope {
            mode: c.arch.rope_mode(),
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

    /// Rotates each head of `x` (`[n_heads * head_dim]`) in place with angles `cs`; pair `i`
    /// is elements `(2i, 2i + 1)` (normal) or `(i, i + rope_dim / 2)` (NEOX), as
    /// `ops.cpp: ggml_compute_forward_rope_flt` passes them to `rotate_pairs`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cs: &[f32]) {
        let half = self.rope_dim / 2;
        let (stride, offset) = match self.mode {
            RopeMode::Normal => (2, 1),
            RopeMode::Neox => (1, half),
        };
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (c, s) = (cs[2 * i], cs[2 * i + 1]);
                let (a, b) = (stride * i, stride * i + offset);
                (head[a], head[b]) = rope_rotate(head[a], head[b], c, s);
            }
        }
    }
}

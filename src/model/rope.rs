//! Rotary position embedding, "normal" mode (adjacent pairs). Angles are computed as
//! `ops.cpp: ggml_rope_cache_init` does: θ starts at the position and is multiplied by
//! `base^(-2/rope_dim)` per pair, in f32, so our angles match llama.cpp's bit for bit; each pair
//! is rotated by `ggml::order::rope_rotate` (`ops.cpp: rotate_pairs`).

use super::config::{LlamaConfig, RopeScaling};
use crate::ggml::order::rope_rotate;

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
                (head[2 * i], head[2 * i + 1]) = rope_rotate(x0, x1, c, s);
            }
        }
    }
}

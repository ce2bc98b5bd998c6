//! LLaMA hyperparameters from `general.architecture` and `llama.*` metadata keys
//! (names as in llama.cpp's `llama-arch.cpp` / `LLM_KV_*`).

use crate::gguf::{ErrorKind, GgufFile, Result};

/// RoPE frequency scaling (`llama.rope.scaling.type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions are multiplied by `1 / factor` (llama.cpp `freq_scale`).
    Linear {
        factor: f32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    /// Width of the residual stream (`llama.embedding_length`).
    pub n_embd: usize,
    /// Hidden width of the FFN (`llama.feed_forward_length`).
    pub n_ff: usize,
    pub n_head: usize,
    /// Key/value heads (GQA); `n_head % n_head_kv == 0`.
    pub n_head_kv: usize,
    /// `n_embd / n_head`.
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (`llama.rope.dimension_count`, default `head_dim`).
    pub rope_dim: usize,
    pub rope_base: f32,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    /// Training context (`llama.context_length`).
    pub n_ctx_train: usize,
    pub n_vocab: usize,
}

impl LlamaConfig {
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Reads and checks the hyperparameters. `n_vocab` comes from `llama.vocab_size` or the
    /// embedding matrix.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.str("general.architecture")?;
        if arch != "llama" {
            return Err(f.error(ErrorKind::Unsupported(format!(
                "general.architecture = '{arch}' is not supported: ffnskip runs 'llama' models"
            ))));
        }
        if let Some(n) = f.opt_u64("llama.expert_count")? {
            if n > 0 {
                return Err(f.error(ErrorKind::Unsupported(format!(
                    "llama.expert_count = {n}: mixture-of-experts LLaMA models are not supported"
                ))));
            }
        }
        const DIM: std::ops::RangeInclusive<u64> = 1..=1 << 20;
        let n_layer = f.usize_in("llama.block_count", 1..=4096)?;
        let n_embd = f.usize_in("llama.embedding_length", DIM)?;
        let n_ff = f.usize_in("llama.feed_forward_length", DIM)?;
        let n_head = f.usize_in("llama.attention.head_count", 1..=n_embd as u64)?;
        let n_head_kv = f
            .opt_usize_in("llama.attention.head_count_kv", 1..=n_head as u64)?
            .unwrap_or(n_head);
        if n_embd % n_head != 0 {
            return Err(f.error(ErrorKind::BadValue {
                key: "llama.attention.head_count".into(),
                expected: format!("a divisor of llama.embedding_length = {n_embd}"),
                found: n_head.to_string(),
            }));
        }
        if n_head % n_head_kv != 0 {
            return Err(f.error(ErrorKind::BadValue {
                key: "llama.attention.head_count_kv".into(),
                expected: format!("a divisor of llama.attention.head_count = {n_head}"),
                found: n_head_kv.to_string(),
            }));
        }
        let head_dim = n_embd / n_head;
        for key in ["llama.attention.key_length", "llama.attention.value_length"] {
            if let Some(v) = f.opt_u64(key)? {
                if v != head_dim as u64 {
                    return Err(f.error(ErrorKind::BadValue {
                        key: key.into(),
                        expected: format!("embedding_length / head_count = {head_dim}"),
                        found: v.to_string(),
                    }));
                }
            }
        }
        let rope_dim = f
            .opt_usize_in("llama.rope.dimension_count", 2..=head_dim as u64)?
            .unwrap_or(head_dim);
        if rope_dim % 2 != 0 {
            return Err(f.error(ErrorKind::BadValue {
                key: "llama.rope.dimension_count".into(),
                expected: "an even number".into(),
                found: rope_dim.to_string(),
            }));
        }
        let rope_base = f.opt_f32("llama.rope.freq_base")?.unwrap_or(10000.0);
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(f.error(ErrorKind::BadValue {
                key: "llama.rope.freq_base".into(),
                expected: "a finite number > 1".into(),
                found: rope_base.to_string(),
            }));
        }
        let rope_scaling = Self::rope_scaling(f)?;
        let rms_eps = f.f32("llama.attention.layer_norm_rms_epsilon")?;
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(f.error(ErrorKind::BadValue {
                key: "llama.attention.layer_norm_rms_epsilon".into(),
                expected: "a number in (0, 1)".into(),
                found: rms_eps.to_string(),
            }));
        }
        let n_ctx_train = f.usize_in("llama.context_length", 1..=1 << 24)?;
        let n_vocab = match f.opt_usize_in("llama.vocab_size", 1..=1 << 24)? {
            Some(v) => v,
            None => match f.tensor_info("token_embd.weight") {
                Some(t) if t.shape.len() == 2 => t.shape[1] as usize,
                _ => {
                    return Err(f.error(ErrorKind::MissingTensor {
                        tensor: "token_embd.weight".into(),
                    }))
                }
            },
        };
        Ok(LlamaConfig {
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rope_base,
            rope_scaling,
            rms_eps,
            n_ctx_train,
            n_vocab,
        })
    }

    fn rope_scaling(f: &GgufFile) -> Result<RopeScaling> {
        let factor_key = "llama.rope.scaling.factor";
        let kind = f.opt_str("llama.rope.scaling.type")?;
        let factor = f.opt_f32(factor_key)?;
        // Older converters wrote only `llama.rope.scale_linear`.
        let legacy = f.opt_f32("llama.rope.scale_linear")?;
        let linear = |factor: f32, key: &str| {
            if factor.is_finite() && factor > 0.0 {
                Ok(if factor == 1.0 {
                    RopeScaling::None
                } else {
                    RopeScaling::Linear { factor }
                })
            } else {
                Err(f.error(ErrorKind::BadValue {
                    key: key.into(),
                    expected: "a finite number > 0".into(),
                    found: factor.to_string(),
                }))
            }
        };
        match kind {
            None | Some("none") => match legacy {
                Some(x) => linear(x, "llama.rope.scale_linear"),
                None => Ok(RopeScaling::None),
            },
            Some("linear") => linear(factor.or(legacy).unwrap_or(1.0), factor_key),
            Some(other) => Err(f.error(ErrorKind::Unsupported(format!(
                "llama.rope.scaling.type = '{other}' is not supported (supported: none, linear)"
            )))),
        }
    }
}

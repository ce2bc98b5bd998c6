//! Hyperparameters from `general.architecture` and the `{arch}.*` metadata keys (names as in
//! llama.cpp's `llama-arch.cpp` / `LLM_KV_*`).

use crate::gguf::{ErrorKind, GgufFile, Result};

/// RoPE frequency scaling (`{arch}.rope.scaling.type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions are multiplied by `1 / factor` (llama.cpp `freq_scale`).
    Linear {
        factor: f32,
    },
}

/// The architectures ffnskip runs: one model struct, configured from `{arch}.*` keys, with
/// optional parts (llama.cpp `llm_arch`; `src/llama-model.cpp` for what each one has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA 1–3, Mistral, SmolLM, TinyLlama: RoPE on adjacent pairs.
    Llama,
    /// Qwen2 / Qwen2.5: the LLaMA block with Q/K/V biases; RoPE on pairs half a head apart
    /// (NEOX).
    Qwen2,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Llama, Arch::Qwen2];

    /// `general.architecture` and the metadata key prefix.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    pub fn parse(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == s)
    }

    /// Which elements RoPE rotates together (llama.cpp `llama_model_rope_type`).
    pub fn rope_mode(self) -> RopeMode {
        match self {
            Arch::Llama => RopeMode::Normal,
            Arch::Qwen2 => RopeMode::Neox,
        }
    }
}

/// RoPE pairing (ggml `GGML_ROPE_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Elements `2i` and `2i + 1`.
    Normal,
    /// Elements `i` and `i + rope_dim / 2`.
    Neox,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub n_layer: usize,
    /// Width of the residual stream (`{arch}.embedding_length`).
    pub n_embd: usize,
    /// Hidden width of the FFN (`{arch}.feed_forward_length`).
    pub n_ff: usize,
    pub n_head: usize,
    /// Key/value heads (GQA); `n_head % n_head_kv == 0`.
    pub n_head_kv: usize,
    /// `n_embd / n_head`.
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (`{arch}.rope.dimension_count`, default `head_dim`).
    pub rope_dim: usize,
    pub rope_base: f32,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    /// Training context (`{arch}.context_length`).
    pub n_ctx_train: usize,
    pub n_vocab: usize,
}

impl LlamaConfig {
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Reads and checks the hyperparameters. `n_vocab` comes from `{arch}.vocab_size` or the
    /// embedding matrix.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let name = f.str("general.architecture")?;
        let arch = Arch::parse(name).ok_or_else(|| {
            f.error(ErrorKind::Unsupported(format!(
                "general.architecture = '{name}' is not supported: ffnskip runs {} models",
                Arch::ALL.map(|a| format!("'{}'", a.name())).join(" and ")
            )))
        })?;
        // Every hyperparameter key is read under the architecture's prefix (`qwen2.block_count`).
        let k = |key: &str| format!("{}.{key}", arch.name());
        if let Some(n) = f.opt_u64(&k("expert_count"))? {
            if n > 0 {
                return Err(f.error(ErrorKind::Unsupported(format!(
                    "{} = {n}: mixture-of-experts models are not supported",
                    k("expert_count")
                ))));
            }
        }
        const DIM: std::ops::RangeInclusive<u64> = 1..=1 << 20;
        let n_layer = f.usize_in(&k("block_count"), 1..=4096)?;
        let n_embd = f.usize_in(&k("embedding_length"), DIM)?;
        let n_ff = f.usize_in(&k("feed_forward_length"), DIM)?;
        let n_head = f.usize_in(&k("attention.head_count"), 1..=n_embd as u64)?;
        let n_head_kv = f
            .opt_usize_in(&k("attention.head_count_kv"), 1..=n_head as u64)?
            .unwrap_or(n_head);
        if n_embd % n_head != 0 {
            return Err(f.error(ErrorKind::BadValue {
                key: k("attention.head_count"),
                expected: format!("a divisor of {} = {n_embd}", k("embedding_length")),
                found: n_head.to_string(),
            }));
        }
        if n_head % n_head_kv != 0 {
            return Err(f.error(ErrorKind::BadValue {
                key: k("attention.head_count_kv"),
                expected: format!("a divisor of {} = {n_head}", k("attention.head_count")),
                found: n_head_kv.to_string(),
            }));
        }
        let head_dim = n_embd / n_head;
        for key in [k("attention.key_length"), k("attention.value_length")] {
            if let Some(v) = f.opt_u64(&key)? {
                if v != head_dim as u64 {
                    return Err(f.error(ErrorKind::BadValue {
                        key,
                        expected: format!("embedding_length / head_count = {head_dim}"),
                        found: v.to_string(),
                    }));
                }
            }
        }
        let rope_dim = f
            .opt_usize_in(&k("rope.dimension_count"), 2..=head_dim as u64)?
            .unwrap_or(head_dim);
        if rope_dim % 2 != 0 {
            return Err(f.error(ErrorKind::BadValue {
                key: k("rope.dimension_count"),
                expected: "an even number".into(),
                found: rope_dim.to_string(),
            }));
        }
        let rope_base = f.opt_f32(&k("rope.freq_base"))?.unwrap_or(10000.0);
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(f.error(ErrorKind::BadValue {
                key: k("rope.freq_base"),
                expected: "a finite number > 1".into(),
                found: rope_base.to_string(),
            }));
        }
        let rope_scaling = Self::rope_scaling(f, &k)?;
        let rms_eps = f.f32(&k("attention.layer_norm_rms_epsilon"))?;
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(f.error(ErrorKind::BadValue {
                key: k("attention.layer_norm_rms_epsilon"),
                expected: "a number in (0, 1)".into(),
                found: rms_eps.to_string(),
            }));
        }
        let n_ctx_train = f.usize_in(&k("context_length"), 1..=1 << 24)?;
        let n_vocab = match f.opt_usize_in(&k("vocab_size"), 1..=1 << 24)? {
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
            arch,
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

    fn rope_scaling(f: &GgufFile, k: &dyn Fn(&str) -> String) -> Result<RopeScaling> {
        let factor_key = &k("rope.scaling.factor");
        let kind = f.opt_str(&k("rope.scaling.type"))?;
        let factor = f.opt_f32(factor_key)?;
        // Older converters wrote only `llama.rope.scale_linear`.
        let legacy = f.opt_f32(&k("rope.scale_linear"))?;
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
                Some(x) => linear(x, &k("rope.scale_linear")),
                None => Ok(RopeScaling::None),
            },
            Some("linear") => linear(factor.or(legacy).unwrap_or(1.0), factor_key),
            Some(other) => Err(f.error(ErrorKind::Unsupported(format!(
                "{} = '{other}' is not supported (supported: none, linear)",
                k("rope.scaling.type")
            )))),
        }
    }
}

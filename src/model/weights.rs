//! Named weight views, GGUF names end to end: `blk.{l}.ffn_gate.weight` → `ffn_gate`.

use crate::ggml;
use crate::gguf::{ErrorKind, GgufFile, Result};
use crate::tensor::Matrix;

use super::config::{Arch, LlamaConfig};

pub struct LayerWeights<'a> {
    /// `[n_embd]`
    pub attn_norm: Vec<f32>,
    /// `[n_embd, n_embd]` (ne order), rows are output features.
    pub attn_q: Matrix<'a>,
    /// `[n_embd, kv_dim]`
    pub attn_k: Matrix<'a>,
    /// `[n_embd, kv_dim]`
    pub attn_v: Matrix<'a>,
    /// `[n_embd, n_embd]`
    pub attn_output: Matrix<'a>,
    /// Q/K/V biases `[n_embd]`, `[kv_dim]`, `[kv_dim]` (Qwen2), added to the projections.
    pub attn_qkv_bias: Option<[Vec<f32>; 3]>,
    /// `[n_embd]`
    pub ffn_norm: Vec<f32>,
    /// `[n_embd, n_ff]`
    pub ffn_gate: Matrix<'a>,
    /// `[n_embd, n_ff]`
    pub ffn_up: Matrix<'a>,
    /// `[n_ff, n_embd]`
    pub ffn_down: Matrix<'a>,
}

impl LayerWeights<'_> {
    pub fn attn_bytes(&self) -> usize {
        [&self.attn_q, &self.attn_k, &self.attn_v, &self.attn_output]
            .iter()
            .map(|m| m.n_bytes())
            .sum()
    }
    pub fn ffn_bytes(&self) -> usize {
        [&self.ffn_gate, &self.ffn_up, &self.ffn_down]
            .iter()
            .map(|m| m.n_bytes())
            .sum()
    }
}

pub struct Weights<'a> {
    /// `[n_embd, n_vocab]`
    pub token_embd: Matrix<'a>,
    /// `[n_embd]`
    pub output_norm: Vec<f32>,
    /// `[n_embd, n_vocab]`; the embedding itself when the model ties them.
    pub output: Matrix<'a>,
    pub tied_output: bool,
    /// `rope_freqs.weight`, `[rope_dim / 2]`: per-frequency divisors (LLaMA-3.1-style).
    pub rope_freqs: Option<Vec<f32>>,
    pub layers: Vec<LayerWeights<'a>>,
}

/// A 1-D tensor of `n` floats (F32, or any type ggml dequantizes), copied out.
fn vector(f: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>> {
    let info = f.tensor_info(name).ok_or_else(|| {
        f.error(ErrorKind::MissingTensor {
            tensor: name.to_string(),
        })
    })?;
    if info.shape != [n as u64] {
        return Err(f.error(ErrorKind::WrongShape {
            tensor: name.to_string(),
            expected: vec![n as u64],
            found: info.shape.clone(),
        }));
    }
    let mut out = vec![0f32; n];
    ggml::dequantize(info.ty, f.tensor_data(info), &mut out).map_err(|_| {
        f.error(ErrorKind::WrongTensorType {
            tensor: name.to_string(),
            expected: "f32 or a type ggml can dequantize".into(),
            found: info.ty,
        })
    })?;
    Ok(out)
}

impl<'a> Weights<'a> {
    /// Every matrix products run on (all but the embedding, which is read by rows; a tied
    /// output head shares it and stays as it is too, as in llama.cpp).
    fn product_matrices(&mut self) -> Vec<&mut Matrix<'a>> {
        let mut v: Vec<&mut Matrix<'a>> = Vec::new();
        if !self.tied_output {
            v.push(&mut self.output);
        }
        for l in &mut self.layers {
            v.extend([
                &mut l.attn_q,
                &mut l.attn_k,
                &mut l.attn_v,
                &mut l.attn_output,
                &mut l.ffn_gate,
                &mut l.ffn_up,
                &mut l.ffn_down,
            ]);
        }
        v
    }

    /// Repacks, with ggml, every product matrix whose type ggml repacks on this CPU (as
    /// llama.cpp's loader does; see [`crate::ggml::repack`]), in parallel, and releases the
    /// mapped pages of those matrices from the resident set. Returns the bytes repacked.
    pub fn repack(&mut self, f: &GgufFile) -> usize {
        use rayon::prelude::*;
        self.product_matrices()
            .into_par_iter()
            .map(|m| {
                if m.pack() {
                    f.release(m.data());
                    m.n_bytes()
                } else {
                    0
                }
            })
            .sum()
    }

    pub fn from_gguf(f: &'a GgufFile, c: &LlamaConfig) -> Result<Self> {
        let token_embd = Matrix::from_gguf(f, "token_embd.weight", c.n_embd, c.n_vocab)?;
        if !ggml::can_dequantize(token_embd.ty) {
            return Err(f.error(ErrorKind::WrongTensorType {
                tensor: "token_embd.weight".into(),
                expected: "a type ggml can dequantize".into(),
                found: token_embd.ty,
            }));
        }
        let (output, tied_output) = match f.tensor_info("output.weight") {
            Some(_) => (
                Matrix::from_gguf(f, "output.weight", c.n_embd, c.n_vocab)?,
                false,
            ),
            None => (token_embd.clone(), true),
        };
        let rope_freqs = match f.tensor_info("rope_freqs.weight") {
            Some(_) => Some(vector(f, "rope_freqs.weight", c.rope_dim / 2)?),
            None => None,
        };
        let kv = c.kv_dim();
        let layers = (0..c.n_layer)
            .map(|l| {
                let m = |n: &str, n_in, n_out| Matrix::from_gguf(f, &format!("blk.{l}.{n}.weight"), n_in, n_out);
                let ffn = [m("ffn_gate", c.n_embd, c.n_ff)?, m("ffn_up", c.n_embd, c.n_ff)?];
                if ffn[0].vec_dot_type() != ffn[1].vec_dot_type() {
                    return Err(f.error(ErrorKind::Unsupported(format!(
                        "blk.{l}.ffn_gate.weight ({}) and blk.{l}.ffn_up.weight ({}) need different activation types",
                        ffn[0].ty, ffn[1].ty
                    ))));
                }
                let bias = |n: &str, len| vector(f, &format!("blk.{l}.{n}.bias"), len);
                let attn_qkv_bias = match c.arch {
                    Arch::Qwen2 => Some([
                        bias("attn_q", c.n_embd)?,
                        bias("attn_k", kv)?,
                        bias("attn_v", kv)?,
                    ]),
                    Arch::Llama => None,
                };
                let [ffn_gate, ffn_up] = ffn;
                Ok(LayerWeights {
                    attn_norm: vector(f, &format!("blk.{l}.attn_norm.weight"), c.n_embd)?,
                    attn_q: m("attn_q", c.n_embd, c.n_embd)?,
                    attn_k: m("attn_k", c.n_embd, kv)?,
                    attn_v: m("attn_v", c.n_embd, kv)?,
                    attn_output: m("attn_output", c.n_embd, c.n_embd)?,
                    attn_qkv_bias,
                    ffn_norm: vector(f, &format!("blk.{l}.ffn_norm.weight"), c.n_embd)?,
                    ffn_gate,
                    ffn_up,
                    ffn_down: m("ffn_down", c.n_ff, c.n_embd)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights {
            token_embd,
            output_norm: vector(f, "output_norm.weight", c.n_embd)?,
            output,
            tied_output,
            rope_freqs,
            layers,
        })
    }
}

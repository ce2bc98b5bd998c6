//! The forward pass: one function for batched prefill and single-token decode.
//!
//! Per layer l (llama.cpp's names for the points in between), unless the controller removes
//! the layer (`layer_runs`):
//!   attn_norm → q/k/v (one parallel region) → RoPE → KV cache → attention → attn_output
//!   `ffn_inp` h = x + attn          ← the [`Controller`] decides per row whether the FFN runs
//!   ffn_norm → gate/up (one region) → SwiGLU → ffn_down; x' = h + ffn (rows that ran)
//! Rows the controller reports as exited (`exited`) only write K/V from their frozen state.
//! Numerics follow llama.cpp's CPU graph bit for bit: activations quantized to the weight's
//! `vec_dot_type`, RMS norm summed in f64 over f32 squares, RoPE rotations with the FMAs GCC
//! forms in ggml's build, f16 KV cache, flash attention as ggml's CPU kernel computes it
//! (`attention.rs`), and ggml's own SwiGLU.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::attention::AttnScratch;
use super::{KvCache, Llama};
use crate::ggml::order::rms_norm;
use crate::ggml::{self, Kernels};
use crate::skip::Controller;
use crate::tensor::{self, act_row_bytes, matmul_group, Matrix, MAX_SPLITS};

/// Which logits a forward call produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last row's (generation).
    Last,
    /// Every row's, `[batch, n_vocab]` (teacher forcing, tests).
    All,
    /// None (prompt chunks before the last).
    None,
}

/// Wall time spent per stage, summed over calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimes {
    /// Norm, q/k/v, RoPE, attention, output projection.
    pub attention: Duration,
    /// Norm, gate/up, SwiGLU, down projection (only rows whose FFN ran).
    pub ffn: Duration,
    /// Final norm and output head.
    pub head: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ForwardError {
    #[error("context full: {need} positions needed, the context holds {n_ctx} (raise --ctx)")]
    ContextFull { need: usize, n_ctx: usize },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: u32, n_vocab: usize },
    #[error("batch of {found} rows exceeds the scratch size of {max}")]
    BatchTooLarge { found: usize, max: usize },
    #[error("empty batch")]
    Empty,
}

/// One forward call's input.
pub struct Batch<'t> {
    pub tokens: &'t [u32],
    /// Prompt rows (prefill or teacher forcing) rather than generated tokens.
    pub prompt: bool,
    pub logits: Logits,
}

/// Preallocated buffers for batches of up to `max_batch` rows (llama2.c's `RunState`).
/// Nothing is allocated per token once a session runs, except when `Logits::All` is first
/// asked for a larger batch.
pub struct Scratch {
    max_batch: usize,
    positions: Vec<usize>,
    /// Residual stream `[B, n_embd]`.
    x: Vec<f32>,
    /// Normed input `[B, n_embd]`, reused for the FFN hidden `[B, n_ff]`.
    xn: Vec<f32>,
    /// Quantized activations, one buffer per distinct `vec_dot_type` in a group.
    acts: [Vec<u8>; 3],
    /// Matmul output `[rows, B]`.
    mm: Vec<f32>,
    /// FFN gate and up, row-major `[2][B, n_ff]`, for SwiGLU one token row at a time.
    gate_up: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output `[B, n_embd]`.
    att: Vec<f32>,
    /// Attention output head-major `[n_head, B, head_dim]`, as the workers write it.
    att_hm: Vec<f32>,
    /// `ffn_inp` copies of rows whose FFN ran, for observing hooks `[B, n_embd]`.
    saved: Vec<f32>,
    ffn_rows: Vec<usize>,
    /// Rows that have not exited, and their positions.
    active: Vec<usize>,
    act_pos: Vec<usize>,
    rope_cs: Vec<f32>,
    attn: Vec<AttnScratch>,
    logits: Vec<f32>,
    logits_t: Vec<f32>,
    pub times: StageTimes,
}

impl Scratch {
    pub fn new(model: &Llama, max_batch: usize, n_ctx: usize) -> Self {
        let c = &model.config;
        let b = max_batch.max(1);
        let wide = c.n_embd.max(c.n_ff);
        let mm_rows = (c.n_embd + 2 * c.kv_dim()).max(2 * c.n_ff);
        // Widest activation row: f32 (4 bytes per element) bounds every vec_dot_type.
        let act = vec![0u8; b * wide * 4];
        Scratch {
            max_batch: b,
            positions: Vec::with_capacity(b),
            x: vec![0.0; b * c.n_embd],
            xn: vec![0.0; b * wide],
            acts: [act.clone(), act.clone(), act],
            mm: vec![0.0; b * mm_rows],
            gate_up: vec![0.0; 2 * b * c.n_ff],
            q: vec![0.0; b * c.n_embd],
            k: vec![0.0; b * c.kv_dim()],
            v: vec![0.0; b * c.kv_dim()],
            att: vec![0.0; b * c.n_embd],
            att_hm: vec![0.0; b * c.n_embd],
            saved: vec![0.0; b * c.n_embd],
            ffn_rows: Vec::with_capacity(b),
            active: Vec::with_capacity(b),
            act_pos: Vec::with_capacity(b),
            rope_cs: vec![0.0; b * c.rope_dim],
            attn: (0..MAX_SPLITS.min(rayon::current_num_threads().max(1) * 2))
                .map(|_| AttnScratch::new(c.head_dim, n_ctx))
                .collect(),
            logits: vec![0.0; c.n_vocab],
            logits_t: Vec::new(),
            times: StageTimes::default(),
        }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Logits of the last row of the latest `Logits::Last` call.
    pub fn last_logits(&self) -> &[f32] {
        &self.logits
    }
}

/// Quantizes `batch` rows of `x` (`[batch, n]`) once per distinct `vec_dot_type` among
/// `mats`; returns for each matrix the index of its activation buffer.
fn quantize_for(
    mats: &[&Matrix],
    x: &[f32],
    n: usize,
    batch: usize,
    acts: &mut [Vec<u8>; 3],
) -> [usize; 3] {
    let mut slots = [0usize; 3];
    let mut done: [Option<Kernels>; 3] = [None; 3];
    for (i, m) in mats.iter().enumerate() {
        let vdt = m.vec_dot_type();
        let slot = match done
            .iter()
            .position(|d| d.is_some_and(|k| k.vec_dot_type == vdt))
        {
            Some(s) => s,
            None => {
                let s = done.iter().position(|d| d.is_none()).unwrap_or(2);
                let k = *m.kernels();
                let arb = act_row_bytes(vdt, n);
                let buf = &mut acts[s][..arb * batch];
                if batch > 4 {
                    buf.par_chunks_exact_mut(arb)
                        .zip(x.par_chunks_exact(n))
                        .for_each(|(o, r)| k.quantize_activation(r, o));
                } else {
                    tensor::quantize_rows(&k, &x[..n * batch], n, buf);
                }
                done[s] = Some(k);
                s
            }
        };
        slots[i] = slot;
    }
    slots
}

impl Llama<'_> {
    /// Runs `batch.tokens` at positions `cache.len ..` through the model, appending their
    /// keys and values to `cache`. Returns the requested logits (`[n_vocab]` for `Last`,
    /// `[batch, n_vocab]` for `All`, empty for `None`).
    pub fn forward<'s, H: Controller>(
        &self,
        cache: &mut KvCache,
        s: &'s mut Scratch,
        batch: &Batch,
        hook: &mut H,
    ) -> Result<&'s [f32], ForwardError> {
        let c = &self.config;
        let d = c.n_embd;
        let tokens = batch.tokens;
        let b = tokens.len();
        if b == 0 {
            return Err(ForwardError::Empty);
        }
        if b > s.max_batch {
            return Err(ForwardError::BatchTooLarge {
                found: b,
                max: s.max_batch,
            });
        }
        let pos0 = cache.len;
        if pos0 + b > cache.n_ctx {
            return Err(ForwardError::ContextFull {
                need: pos0 + b,
                n_ctx: cache.n_ctx,
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(ForwardError::BadToken {
                id,
                n_vocab: c.n_vocab,
            });
        }
        s.positions.clear();
        s.positions.extend(pos0..pos0 + b);
        hook.begin(&s.positions, batch.prompt);

        for (row, &t) in s.x.chunks_exact_mut(d).zip(tokens) {
            self.weights
                .token_embd
                .kernels()
                .dequantize_row(self.weights.token_embd.row(t as usize), row);
        }
        for (i, &p) in s.positions.iter().enumerate() {
            self.rope
                .angles(p, &mut s.rope_cs[i * c.rope_dim..(i + 1) * c.rope_dim]);
        }

        for l in 0..c.n_layer {
            if !hook.layer_runs(l) {
                continue;
            }
            if hook.observes_layers() {
                for (i, xr) in s.x[..b * d].chunks_exact(d).enumerate() {
                    hook.layer_input(l, i, xr);
                }
            }
            // Rows that have not exited (early exit); all rows in the plain model.
            s.active.clear();
            s.act_pos.clear();
            for i in 0..b {
                if !hook.exited(l, i) {
                    s.active.push(i);
                    s.act_pos.push(s.positions[i]);
                }
            }
            let t0 = Instant::now();
            self.attention_block(l, cache, s);
            let t1 = Instant::now();
            s.times.attention += t1 - t0;
            if s.active.is_empty() {
                continue;
            }

            // ---- ffn_inp: the controller decides per row ----
            s.ffn_rows.clear();
            for &i in &s.active {
                if hook.run_ffn(l, i, &s.x[i * d..(i + 1) * d]) {
                    s.ffn_rows.push(i);
                }
            }
            if s.ffn_rows.is_empty() {
                continue;
            }
            self.ffn_block(l, s, hook);
            s.times.ffn += t1.elapsed();
        }
        hook.end();
        cache.len = pos0 + b;

        // ---- head ----
        let t0 = Instant::now();
        let (first, n) = match batch.logits {
            Logits::None => return Ok(&[]),
            Logits::Last => (b - 1, 1),
            Logits::All => (0, b),
        };
        for j in 0..n {
            let i = first + j;
            rms_norm(
                &s.x[i * d..(i + 1) * d],
                &self.weights.output_norm,
                c.rms_eps,
                &mut s.xn[j * d..(j + 1) * d],
            );
        }
        let out = &self.weights.output;
        let slots = quantize_for(&[out], &s.xn[..n * d], d, n, &mut s.acts);
        let nv = c.n_vocab;
        let logits: &[f32] = if n == 1 {
            matmul_group(&[(out, &s.acts[slots[0]][..])], 1, &mut s.logits);
            &s.logits
        } else {
            s.logits_t.resize(nv * n, 0.0);
            let mut all = std::mem::take(&mut s.logits_t);
            matmul_group(&[(out, &s.acts[slots[0]][..])], n, &mut all);
            // Reuse `logits_t` for the transposed result; keep the product in a second buffer.
            let mut dst = vec![0.0; nv * n];
            tensor::transpose(&all, nv, n, &mut dst);
            s.logits_t = dst;
            &s.logits_t
        };
        s.times.head += t0.elapsed();
        Ok(logits)
    }

    /// Attention half of layer `l` for the rows of `s.positions`: `attn_norm`, q/k/v in one
    /// parallel region, RoPE, K/V into the cache for every row, then attention, `attn_output`
    /// and the residual add for the rows in `s.active` only (exited rows keep their state).
    fn attention_block(&self, l: usize, cache: &mut KvCache, s: &mut Scratch) {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, kv, hd) = (c.n_embd, c.kv_dim(), c.head_dim);
        let b = s.positions.len();
        let na = s.active.len();
        for (xr, nr) in s.x[..b * d].chunks_exact(d).zip(s.xn.chunks_exact_mut(d)) {
            rms_norm(xr, &lw.attn_norm, c.rms_eps, nr);
        }
        if na > 0 {
            let qkv = [&lw.attn_q, &lw.attn_k, &lw.attn_v];
            let slots = quantize_for(&qkv, &s.xn[..b * d], d, b, &mut s.acts);
            let group = [
                (qkv[0], &s.acts[slots[0]][..]),
                (qkv[1], &s.acts[slots[1]][..]),
                (qkv[2], &s.acts[slots[2]][..]),
            ];
            let mm = &mut s.mm[..(d + 2 * kv) * b];
            matmul_group(&group, b, mm);
            tensor::transpose(&mm[..d * b], d, b, &mut s.q[..b * d]);
            tensor::transpose(&mm[d * b..(d + kv) * b], kv, b, &mut s.k[..b * kv]);
            tensor::transpose(&mm[(d + kv) * b..], kv, b, &mut s.v[..b * kv]);
        } else {
            // Every row has exited: only the K/V of their frozen states.
            let kvw = [&lw.attn_k, &lw.attn_v];
            let slots = quantize_for(&kvw, &s.xn[..b * d], d, b, &mut s.acts);
            let group = [
                (kvw[0], &s.acts[slots[0]][..]),
                (kvw[1], &s.acts[slots[1]][..]),
            ];
            let mm = &mut s.mm[..2 * kv * b];
            matmul_group(&group, b, mm);
            tensor::transpose(&mm[..kv * b], kv, b, &mut s.k[..b * kv]);
            tensor::transpose(&mm[kv * b..], kv, b, &mut s.v[..b * kv]);
        }
        let pos0 = s.positions[0];
        for i in 0..b {
            let cs = &s.rope_cs[i * c.rope_dim..(i + 1) * c.rope_dim];
            self.rope.apply(&mut s.k[i * kv..(i + 1) * kv], hd, cs);
            cache.store(
                l,
                pos0 + i,
                &s.k[i * kv..(i + 1) * kv],
                &s.v[i * kv..(i + 1) * kv],
            );
        }
        if na == 0 {
            return;
        }
        // Active rows' q, RoPE'd and packed to the front: `[na, n_embd]`.
        for (j, &i) in s.active.iter().enumerate() {
            let cs = &s.rope_cs[i * c.rope_dim..(i + 1) * c.rope_dim];
            self.rope.apply(&mut s.q[i * d..(i + 1) * d], hd, cs);
            if i != j {
                s.q.copy_within(i * d..(i + 1) * d, j * d);
            }
        }
        self.attention(
            l,
            cache,
            &s.act_pos,
            &s.q[..na * d],
            &mut s.att_hm[..na * d],
            &mut s.attn,
        );
        // [n_head, na, head_dim] → [na, n_head * head_dim]
        for (h, block) in s.att_hm[..na * d].chunks_exact(na * hd).enumerate() {
            for (j, src) in block.chunks_exact(hd).enumerate() {
                s.att[j * d + h * hd..j * d + (h + 1) * hd].copy_from_slice(src);
            }
        }
        let slots = quantize_for(&[&lw.attn_output], &s.att[..na * d], d, na, &mut s.acts);
        let mm = &mut s.mm[..d * na];
        matmul_group(&[(&lw.attn_output, &s.acts[slots[0]][..])], na, mm);
        tensor::add_transposed(mm, d, &s.active, &mut s.x);
    }

    /// FFN half of layer `l` for the rows in `s.ffn_rows`: `ffn_norm`, gate/up in one
    /// parallel region, SwiGLU, `ffn_down`, residual add; the controller observes
    /// cos(h, h + ffn) per row if it asks to.
    fn ffn_block<H: Controller>(&self, l: usize, s: &mut Scratch, hook: &mut H) {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, ff) = (c.n_embd, c.n_ff);
        let r = s.ffn_rows.len();
        let observe = hook.observes_ffn();
        for (j, &i) in s.ffn_rows.iter().enumerate() {
            let xr = &s.x[i * d..(i + 1) * d];
            rms_norm(xr, &lw.ffn_norm, c.rms_eps, &mut s.xn[j * d..(j + 1) * d]);
            if observe {
                s.saved[j * d..(j + 1) * d].copy_from_slice(xr);
            }
        }
        let slots = quantize_for(
            &[&lw.ffn_gate, &lw.ffn_up],
            &s.xn[..r * d],
            d,
            r,
            &mut s.acts,
        );
        let mm = &mut s.mm[..2 * ff * r];
        matmul_group(
            &[
                (&lw.ffn_gate, &s.acts[slots[0]][..]),
                (&lw.ffn_up, &s.acts[slots[1]][..]),
            ],
            r,
            mm,
        );
        // SwiGLU, one token row of n_ff at a time as ggml does: [n_ff, r] → [r, n_ff].
        let (gate, up) = mm.split_at(ff * r);
        if r == 1 {
            ggml::swiglu(gate, up, &mut s.xn[..ff]);
        } else {
            let (gate_t, up_t) = s.gate_up[..2 * r * ff].split_at_mut(r * ff);
            tensor::transpose(gate, ff, r, gate_t);
            tensor::transpose(up, ff, r, up_t);
            s.xn[..r * ff]
                .par_chunks_mut(ff)
                .zip(gate_t.par_chunks(ff).zip(up_t.par_chunks(ff)))
                .with_min_len(4)
                .for_each(|(y, (g, u))| ggml::swiglu(g, u, y));
        }
        let slots = quantize_for(&[&lw.ffn_down], &s.xn[..r * ff], ff, r, &mut s.acts);
        let mm = &mut s.mm[..d * r];
        matmul_group(&[(&lw.ffn_down, &s.acts[slots[0]][..])], r, mm);
        tensor::add_transposed(mm, d, &s.ffn_rows, &mut s.x);
        if observe {
            for (j, &i) in s.ffn_rows.iter().enumerate() {
                hook.after_ffn(l, i, &s.saved[j * d..(j + 1) * d], &s.x[i * d..(i + 1) * d]);
            }
        }
    }
}

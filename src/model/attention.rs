//! Causal self-attention over the KV cache, computed as ggml's CPU flash-attention kernel
//! (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`, llama.cpp's default attention on CPU)
//! computes it, bit for bit. For a query row at position p and one head:
//!
//!   q16  = f16(q)
//!   s_j  = ggml_vec_dot_f16(k_j, q16) · 1/√head_dim            for j = 0 ..= p, in order
//!   online softmax: on a new maximum M, A ← f16(A · e^(M_old − M)); otherwise w_j = e^(s_j − M)
//!   A    ← f16(A + v_j · w_j)   (the value accumulator A is f16, one FMA and rounding per step)
//!   S    ← S · e^(M_old − M) + w_j   (one FMA)
//!   out  = f32(A) · (1/S)
//!
//! with libm's `expf`. The summation orders (q·k over blocks of keys, the online softmax, the
//! f16 accumulator steps) are in `ggml::order`; this file splits the work and feeds them.
//! A row's result depends only on its q and the cache, never on the other
//! rows of its batch, so batched prefill gives the same bits as token-by-token decode.
//!
//! llama.cpp takes other routes for some shapes: a tiled kernel for ubatches of ≥ 64 rows, and
//! for single-token batches over ≥ 512 cached positions the KV range split across threads
//! (with one thread that split reduces to the kernel above). Those sum in other orders and
//! differ from this one, and from each other, in the last bits.

use half::f16;

use super::{KvCache, Llama};
use crate::ggml::order::{self, dot_order, score_block, DotOrder, MAX_ROWS, QK_BLOCK};
use crate::ggml::{self, F16Dot};
use crate::tensor::{par_split, MAX_SPLITS};

/// One attention worker's buffers.
pub struct AttnScratch {
    /// q of one head rounded to f16 `[head_dim]`, and the same widened back to f32.
    q16: Vec<f16>,
    q: Vec<f32>,
    /// Keys of the KV head last used, widened to f32 and transposed: `[head_dim, stride]`,
    /// `stride` = positions rounded up to `QK_BLOCK` (scores past a row's position are unused).
    keys_t: Vec<f32>,
    /// The KV head whose keys `keys_t` holds.
    loaded: Option<usize>,
    /// Raw q·k of up to `MAX_ROWS` (head, row) items `[MAX_ROWS, n_ctx rounded up to QK_BLOCK]`.
    scores: Vec<f32>,
    /// Their f16 value accumulators `[MAX_ROWS, head_dim]`.
    acc: Vec<f16>,
}

impl AttnScratch {
    pub fn new(head_dim: usize, n_ctx: usize) -> Self {
        let padded = n_ctx.next_multiple_of(QK_BLOCK);
        AttnScratch {
            q16: vec![f16::ZERO; head_dim],
            q: vec![0.0; head_dim],
            keys_t: vec![0.0; padded * head_dim],
            loaded: None,
            scores: vec![0.0; MAX_ROWS * padded],
            acc: vec![f16::ZERO; MAX_ROWS * head_dim],
        }
    }
}

impl Llama<'_> {
    /// Causal attention of `q` (`[B, n_embd]`, rows at ascending `positions`, already in the
    /// cache) over layer `l`'s cache, into `out` (`[n_head, B, head_dim]`). Work items are
    /// (head, row) pairs split across threads in contiguous ranges of equal cost (∝ attended
    /// positions).
    pub(super) fn attention(
        &self,
        l: usize,
        cache: &KvCache,
        positions: &[usize],
        q: &[f32],
        out: &mut [f32],
        scratch: &mut [AttnScratch],
    ) {
        let c = &self.config;
        let (nh, hd, d) = (c.n_head, c.head_dim, c.n_embd);
        let b = positions.len();
        let group = c.n_head / c.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        // Transposing a KV head's keys costs about as much as 8 per-key calls of ggml's dot;
        // it pays off once enough (head, row) items share the head (prefill, not decode).
        let order = if b * group >= 16 {
            dot_order()
        } else {
            DotOrder::Call
        };
        let f16dot = F16Dot::get();
        let items = nh * b;
        let cost = |i: usize| positions[i % b] + 1 + hd;
        let total: usize = (0..items).map(cost).sum();
        // Below about 10 µs of work a parallel region costs more than it saves.
        const MIN_PARALLEL_COST: usize = 4096;
        let splits = scratch
            .len()
            .min(crate::team::current_threads().max(1))
            .min(items)
            .min(total / MIN_PARALLEL_COST + 1)
            .max(1);
        let mut bounds = [0usize; MAX_SPLITS + 1];
        let (mut acc, mut t) = (0usize, 1usize);
        for i in 0..items {
            if t < splits && acc >= total * t / splits {
                bounds[t] = i;
                t += 1;
            }
            acc += cost(i);
        }
        while t <= splits {
            bounds[t] = items;
            t += 1;
        }
        let n_total = positions[b - 1] + 1;
        let stride = n_total.next_multiple_of(QK_BLOCK);
        let padded = scratch[0].scores.len() / MAX_ROWS;
        let run = |lo: usize, hi: usize, chunk: &mut [f32], sc: &mut AttnScratch| {
            sc.loaded = None;
            // Consecutive items of one head (rows in order) in groups of up to MAX_ROWS: their
            // scores one by one, then their softmax chains interleaved.
            let mut g0 = lo;
            while g0 < hi {
                let h = g0 / b;
                let g1 = hi.min((h + 1) * b).min(g0 + MAX_ROWS);
                let kvh = h / group;
                let keys = cache.keys(l, kvh, n_total);
                if order != DotOrder::Call && sc.loaded != Some(kvh) {
                    for (p, kp) in keys.chunks_exact(hd).enumerate() {
                        for (dd, &k) in kp.iter().enumerate() {
                            sc.keys_t[dd * stride + p] = k.to_f32();
                        }
                    }
                    sc.loaded = Some(kvh);
                }
                for (j, item) in (g0..g1).enumerate() {
                    let row = item % b;
                    let n = positions[row] + 1;
                    ggml::f32_to_f16(&q[row * d + h * hd..row * d + (h + 1) * hd], &mut sc.q16);
                    ggml::f16_to_f32(&sc.q16, &mut sc.q);
                    let scores = &mut sc.scores[j * padded..(j + 1) * padded];
                    let nb = n.next_multiple_of(QK_BLOCK);
                    // nb is a multiple of QK_BLOCK, so there is no remainder.
                    let (blocks, _) = scores[..nb].as_chunks_mut::<QK_BLOCK>();
                    let blocks = blocks.iter_mut().enumerate();
                    match order {
                        DotOrder::Lanes16 => blocks.for_each(|(jb, s)| {
                            score_block::<16>(&sc.q, &sc.keys_t[jb * QK_BLOCK..], stride, s)
                        }),
                        DotOrder::Lanes8 => blocks.for_each(|(jb, s)| {
                            score_block::<8>(&sc.q, &sc.keys_t[jb * QK_BLOCK..], stride, s)
                        }),
                        DotOrder::Call => {
                            for (s, k) in scores[..n].iter_mut().zip(keys.chunks_exact(hd)) {
                                *s = f16dot.dot(k, &sc.q16);
                            }
                        }
                    }
                }
                let rows = g1 - g0;
                let mut lens = [0usize; MAX_ROWS];
                for (j, item) in (g0..g1).enumerate() {
                    lens[j] = positions[item % b] + 1;
                }
                let n_max = lens[..rows].iter().copied().max().unwrap_or(0);
                let mut s: [&[f32]; MAX_ROWS] = [&[]; MAX_ROWS];
                for (j, (sj, len)) in s.iter_mut().zip(lens).take(rows).enumerate() {
                    *sj = &sc.scores[j * padded..j * padded + len];
                }
                order::softmax_values_rows(
                    &s[..rows],
                    scale,
                    cache.values(l, kvh, n_max),
                    &mut sc.acc[..rows * hd],
                    &mut chunk[(g0 - lo) * hd..(g1 - lo) * hd],
                );
                g0 = g1;
            }
        };
        par_split(out, &mut scratch[..splits], &bounds[..=splits], hd, &run);
    }
}

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
//! with libm's `expf`. A row's result depends only on its q and the cache, never on the other
//! rows of its batch, so batched prefill gives the same bits as token-by-token decode.
//!
//! llama.cpp takes other routes for some shapes: a tiled kernel for ubatches of ≥ 64 rows, and
//! for single-token batches over ≥ 512 cached positions the KV range split across threads
//! (with one thread that split reduces to the kernel above). Those sum in other orders and
//! differ from this one, and from each other, in the last bits.

use std::sync::OnceLock;

use half::f16;

use super::{KvCache, Llama};
use crate::ggml::{self, F16Dot};
use crate::tensor::{par_split, MAX_SPLITS};

/// Keys scored at once (across keys the sums vectorise with no horizontal adds).
const QK_BLOCK: usize = 64;

/// Summation order of the linked ggml's `ggml_vec_dot_f16`, found by comparing against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotOrder {
    /// AVX-512: four accumulators of 16 lanes (64 elements per step), lanes summed as GCC's
    /// `_mm512_reduce_add_ps` does (halves, then halves of those).
    Lanes16,
    /// AVX/AVX2: four accumulators of 8 lanes (32 per step), lanes summed by two `hadd`s.
    Lanes8,
    /// Call ggml's kernel once per key: the fallback when neither order matches, and the
    /// faster route when few rows share a KV head (decode).
    Call,
}

/// The order that reproduces the linked ggml's f16 dot bit for bit (decided once).
pub fn dot_order() -> DotOrder {
    static ORDER: OnceLock<DotOrder> = OnceLock::new();
    *ORDER.get_or_init(|| {
        let f16dot = F16Dot::get();
        [DotOrder::Lanes16, DotOrder::Lanes8]
            .into_iter()
            .find(|&o| mirrors_ggml(o, &f16dot))
            .unwrap_or(DotOrder::Call)
    })
}

/// Whether `order` gives ggml's bits on pseudo-random keys and queries of several head sizes
/// (multiples of both step widths and lengths with a scalar tail).
fn mirrors_ggml(order: DotOrder, f16dot: &F16Dot) -> bool {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        f16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0)
    };
    for hd in [64, 128, 80, 8] {
        let q16: Vec<f16> = (0..hd).map(|_| rand()).collect();
        let keys: Vec<f16> = (0..hd * QK_BLOCK).map(|_| rand()).collect();
        let q: Vec<f32> = q16.iter().map(|x| x.to_f32()).collect();
        let mut kt = vec![0f32; hd * QK_BLOCK];
        for (j, k) in keys.chunks_exact(hd).enumerate() {
            for (d, x) in k.iter().enumerate() {
                kt[d * QK_BLOCK + j] = x.to_f32();
            }
        }
        let mut ours = [0f32; QK_BLOCK];
        match order {
            DotOrder::Lanes16 => score_block::<16>(&q, &kt, QK_BLOCK, &mut ours),
            DotOrder::Lanes8 => score_block::<8>(&q, &kt, QK_BLOCK, &mut ours),
            DotOrder::Call => return true,
        }
        for (j, k) in keys.chunks_exact(hd).enumerate() {
            if f16dot.dot(k, &q16).to_bits() != ours[j].to_bits() {
                return false;
            }
        }
    }
    true
}

/// `out[j] = Σ_d q[d]·k_j[d]` for the `QK_BLOCK` keys whose values sit transposed in `kt`
/// (`kt[d * stride + j]`), summed in the order of ggml_vec_dot_f16 with `EPR`-lane vectors:
/// per lane, four FMA chains over steps of `4·EPR` elements, combined (0+2)+(1+3), the lanes
/// reduced pairwise, and the tail past the last whole step added in f64.
fn score_block<const EPR: usize>(q: &[f32], kt: &[f32], stride: usize, out: &mut [f32; QK_BLOCK]) {
    let hd = q.len();
    let step = 4 * EPR;
    let np = hd - hd % step;
    let mut lanes = [[0f32; QK_BLOCK]; EPR];
    for (j, lane) in lanes.iter_mut().enumerate() {
        let mut acc = [[0f32; QK_BLOCK]; 4];
        for t in (0..np).step_by(step) {
            for (c, a) in acc.iter_mut().enumerate() {
                let d = t + c * EPR + j;
                let qd = q[d];
                for (x, &k) in a.iter_mut().zip(&kt[d * stride..d * stride + QK_BLOCK]) {
                    *x = k.mul_add(qd, *x);
                }
            }
        }
        for (i, l) in lane.iter_mut().enumerate() {
            *l = (acc[0][i] + acc[2][i]) + (acc[1][i] + acc[3][i]);
        }
    }
    match EPR {
        16 => {
            // _mm512_reduce_add_ps: upper 256 + lower 256, upper 128 + lower 128, then
            // lanes (0+2) + (1+3).
            let mut t = [[0f32; QK_BLOCK]; 8];
            for (k, tk) in t.iter_mut().enumerate() {
                for (i, x) in tk.iter_mut().enumerate() {
                    *x = lanes[8 + k][i] + lanes[k][i];
                }
            }
            for (i, o) in out.iter_mut().enumerate() {
                let u = [
                    t[4][i] + t[0][i],
                    t[5][i] + t[1][i],
                    t[6][i] + t[2][i],
                    t[7][i] + t[3][i],
                ];
                *o = (u[0] + u[2]) + (u[1] + u[3]);
            }
        }
        8 => {
            // lower 128 + upper 128, then two _mm_hadd_ps: (0+1) + (2+3).
            for (i, o) in out.iter_mut().enumerate() {
                let u = [
                    lanes[0][i] + lanes[4][i],
                    lanes[1][i] + lanes[5][i],
                    lanes[2][i] + lanes[6][i],
                    lanes[3][i] + lanes[7][i],
                ];
                *o = (u[0] + u[1]) + (u[2] + u[3]);
            }
        }
        _ => unreachable!("ggml's f16 vectors have 8 or 16 lanes"),
    }
    if np < hd {
        for (i, o) in out.iter_mut().enumerate() {
            let mut s = f64::from(*o);
            for (d, &qd) in q.iter().enumerate().skip(np) {
                s += f64::from(qd * kt[d * stride + i]);
            }
            *o = s as f32;
        }
    }
}

/// Online softmax over `scores` (raw q·k, in position order) and the weighted sum of `values`
/// (`[n, head_dim]` f16) into `out` (`[head_dim]`), with the f16 accumulator `acc`.
fn softmax_values(scores: &[f32], scale: f32, values: &[f16], acc: &mut [f16], out: &mut [f32]) {
    let hd = acc.len();
    acc.fill(f16::ZERO);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for (&raw, v) in scores.iter().zip(values.chunks_exact(hd)) {
        // The mask adds +0.0 at every visible position.
        let s = raw * scale + 0.0;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let old = m;
            m = s;
            ms = (old - m).exp();
            ggml::vec_scale_f16(acc, ms);
        } else {
            vs = (s - m).exp();
        }
        ggml::vec_mad_f16(acc, v, vs);
        sum = update_sum(sum, ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a.to_f32() * inv;
    }
}

/// `S·ms + w` as ggml's build rounds it: GCC contracts it into one FMA when FMA is available.
#[cfg(target_feature = "fma")]
#[inline(always)]
fn update_sum(s: f32, ms: f32, w: f32) -> f32 {
    s.mul_add(ms, w)
}

#[cfg(not(target_feature = "fma"))]
#[inline(always)]
fn update_sum(s: f32, ms: f32, w: f32) -> f32 {
    s * ms + w
}

/// One attention worker's buffers.
pub struct AttnScratch {
    /// q of one head rounded to f16 `[head_dim]`, and the same widened back to f32.
    q16: Vec<f16>,
    q: Vec<f32>,
    /// Keys of the KV head last used, widened to f32 and transposed: `[head_dim, stride]`,
    /// `stride` = positions rounded up to `QK_BLOCK` (scores past a row's position are unused).
    keys_t: Vec<f32>,
    loaded: Option<usize>,
    scores: Vec<f32>,
    /// The f16 value accumulator `[head_dim]`.
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
            scores: vec![0.0; padded],
            acc: vec![f16::ZERO; head_dim],
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
        let splits = scratch
            .len()
            .min(rayon::current_num_threads().max(1))
            .min(items)
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
        let run = |lo: usize, hi: usize, chunk: &mut [f32], sc: &mut AttnScratch| {
            sc.loaded = None;
            for (item, o) in (lo..hi).zip(chunk.chunks_exact_mut(hd)) {
                let (h, row) = (item / b, item % b);
                let n = positions[row] + 1;
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
                ggml::f32_to_f16(&q[row * d + h * hd..row * d + (h + 1) * hd], &mut sc.q16);
                ggml::f16_to_f32(&sc.q16, &mut sc.q);
                let nb = n.next_multiple_of(QK_BLOCK);
                // nb is a multiple of QK_BLOCK, so there is no remainder.
                let (blocks, _) = sc.scores[..nb].as_chunks_mut::<QK_BLOCK>();
                let blocks = blocks.iter_mut().enumerate();
                match order {
                    DotOrder::Lanes16 => blocks.for_each(|(jb, s)| {
                        score_block::<16>(&sc.q, &sc.keys_t[jb * QK_BLOCK..], stride, s)
                    }),
                    DotOrder::Lanes8 => blocks.for_each(|(jb, s)| {
                        score_block::<8>(&sc.q, &sc.keys_t[jb * QK_BLOCK..], stride, s)
                    }),
                    DotOrder::Call => {
                        for (s, k) in sc.scores[..n].iter_mut().zip(keys.chunks_exact(hd)) {
                            *s = f16dot.dot(k, &sc.q16);
                        }
                    }
                }
                softmax_values(
                    &sc.scores[..n],
                    scale,
                    cache.values(l, kvh, n),
                    &mut sc.acc,
                    o,
                );
            }
        };
        par_split(out, &mut scratch[..splits], &bounds[..=splits], hd, &run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_scores_reproduce_ggml_f16_dot() {
        crate::ggml::init();
        let order = dot_order();
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        assert_eq!(order, DotOrder::Lanes16, "AVX-512 build of ggml");
        assert!(mirrors_ggml(order, &F16Dot::get()));
    }
}

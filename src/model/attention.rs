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
//! rows of its batch, so exact batched prefill gives the same bits as token-by-token decode.
//!
//! That is the exact path: decoding, and batches with `exact` (`SessionConfig::exact_batches`).
//! Other batches take a fast path, as llama.cpp's batched prompts do (its tiled kernel): q·k
//! in f32 for eight rows of a head at once, softmax and value sum in f32
//! ([`softmax_values_f32`]); results differ from the exact path in the last places.
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
    /// q of one head rounded to f16 `[head_dim]`, and up to `FAST_ROWS` of them widened back
    /// to f32 `[FAST_ROWS, head_dim]`.
    q16: Vec<f16>,
    q: Vec<f32>,
    /// Keys of the KV head last used, widened to f32 and transposed: `[head_dim, stride]`,
    /// `stride` = positions rounded up to `QK_BLOCK` (scores past a row's position are unused).
    keys_t: Vec<f32>,
    /// The (sequence, KV head) whose keys `keys_t` holds.
    loaded: Option<(usize, usize)>,
    /// Raw q·k of up to `FAST_ROWS` (head, row) items `[FAST_ROWS, n_ctx rounded up to
    /// QK_BLOCK]` (softmax weights in place on the fast path).
    scores: Vec<f32>,
    /// The exact path's f16 value accumulators `[MAX_ROWS, head_dim]`.
    acc: Vec<f16>,
    /// Values of the KV head last used, widened to f32 `[positions, head_dim]` (fast path).
    values_f32: Vec<f32>,
    /// The (sequence, KV head) whose values `values_f32` holds.
    values_loaded: Option<(usize, usize)>,
}

impl AttnScratch {
    pub fn new(head_dim: usize, n_ctx: usize) -> Self {
        let padded = n_ctx.next_multiple_of(QK_BLOCK);
        AttnScratch {
            q16: vec![f16::ZERO; head_dim],
            q: vec![0.0; FAST_ROWS * head_dim],
            keys_t: vec![0.0; padded * head_dim],
            loaded: None,
            scores: vec![0.0; FAST_ROWS * padded],
            acc: vec![f16::ZERO; MAX_ROWS * head_dim],
            values_f32: vec![0.0; padded * head_dim],
            values_loaded: None,
        }
    }
}

/// Query rows per group on the fast path.
const FAST_ROWS: usize = 8;

/// Softmax and weighted value sum in f32 for rows of one head whose batch need not match
/// decoding, as llama.cpp's tiled kernel for batched prompts computes them (f32 accumulators;
/// its bits and ours differ from one-token decoding, and from each other, in the last places).
/// Row `j` holds raw q·k for its first `lens[j]` positions in `w[j·stride..]` (overwritten
/// with its weights); `values` is `[≥ max len, hd]` in f32, `out` `[rows, hd]`.
fn softmax_values_f32(
    w: &mut [f32],
    stride: usize,
    lens: &[usize],
    scale: f32,
    values: &[f32],
    hd: usize,
    out: &mut [f32],
) {
    let rows = lens.len();
    let n_max = lens.iter().copied().max().unwrap_or(0);
    let mut inv = [0f32; FAST_ROWS];
    for ((wj, &len), inv) in w.chunks_exact_mut(stride).zip(lens).zip(&mut inv) {
        let sum = softmax_weights(&mut wj[..len], scale);
        wj[len..n_max].fill(0.0);
        *inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    }
    let (w, out) = (&w[..rows * stride], &mut out[..rows * hd]);
    let mut r0 = 0;
    while r0 < rows {
        let (w, o) = (&w[r0 * stride..], &mut out[r0 * hd..]);
        r0 += match rows - r0 {
            1 => weighted_values::<1>(w, stride, n_max, values, hd, o),
            2 => weighted_values::<2>(w, stride, n_max, values, hd, o),
            3 => weighted_values::<3>(w, stride, n_max, values, hd, o),
            _ => weighted_values::<4>(w, stride, n_max, values, hd, o),
        };
    }
    for (o, &inv) in out.chunks_exact_mut(hd).zip(&inv) {
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// `w[p] ← e^(w[p]·scale − max)` over the row, 16 lanes at a time (as ggml's SIMD softmax);
/// returns Σ w.
fn softmax_weights(w: &mut [f32], scale: f32) -> f32 {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let (blocks, tail) = w.as_chunks::<L>();
    for blk in blocks {
        for (m, &x) in lanes.iter_mut().zip(blk) {
            *m = m.max(x * scale);
        }
    }
    let m = tail.iter().fold(
        lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        |m, &x| m.max(x * scale),
    );
    let mut sums = [0f32; L];
    let (blocks, tail) = w.as_chunks_mut::<L>();
    for blk in blocks {
        for (s, x) in sums.iter_mut().zip(blk) {
            *x = exp_nonpositive(*x * scale - m);
            *s += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in tail {
        *x = exp_nonpositive(*x * scale - m);
        sum += *x;
    }
    sum
}

/// e^x for x ≤ 0 (0 below −87), as ggml's `ggml_v_expf` (ggml-cpu/vec.h) computes it
/// (about 1.5 ulp): x = n·ln2 + b, 2^n from the exponent bits, e^b by a degree-5 polynomial.
/// Branch-free, so loops over it vectorize.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = fma(x, c(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = fma(-n, c(0x35bf_be8e), fma(-n, c(0x3f31_7200), x)); // ln2, low and high parts
    let k = c((z.to_bits() << 23).wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = fma(
        fma(
            fma(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            fma(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        c(0x3f7f_fff6) * b,
    );
    let e = fma(j, k, k);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// `out[r·hd + c] = Σ_p w[r·stride + p] · values[p·hd + c]` for `R` rows and `p < n`, in
/// blocks of `R` × 16 accumulators that stay in registers while the positions stream by.
/// Returns `R`.
fn weighted_values<const R: usize>(
    w: &[f32],
    stride: usize,
    n: usize,
    values: &[f32],
    hd: usize,
    out: &mut [f32],
) -> usize {
    const C: usize = 16;
    let ws: [&[f32]; R] = std::array::from_fn(|r| &w[r * stride..r * stride + n]);
    let values = &values[..n * hd];
    let mut c0 = 0;
    while c0 + C <= hd {
        let mut acc = [[0f32; C]; R];
        for (p, v) in values.chunks_exact(hd).enumerate() {
            let v: &[f32; C] = v[c0..c0 + C].try_into().expect("16 values");
            for (a, wr) in acc.iter_mut().zip(&ws) {
                let wp = wr[p];
                for (x, &vv) in a.iter_mut().zip(v) {
                    *x = fma(vv, wp, *x);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            out[r * hd + c0..r * hd + c0 + C].copy_from_slice(a);
        }
        c0 += C;
    }
    // Head sizes that are not a multiple of 16: the last columns one by one.
    for c in c0..hd {
        for (r, wr) in ws.iter().enumerate() {
            out[r * hd + c] = wr
                .iter()
                .zip(values.chunks_exact(hd))
                .fold(0.0, |x, (&wp, v)| fma(v[c], wp, x));
        }
    }
    R
}

/// Raw q·k in f32 for up to `FAST_ROWS` query rows at once (`qs`: `[rows, hd]`) over the
/// first `n` keys of `kt` (transposed, `kt[d·stride + p]`, `stride` a multiple of 16): `w[j·w_stride + p]`. Each key is
/// read once for all rows (the fast path's order, not ggml's one-token dot order).
fn scores_f32(
    qs: &[f32],
    hd: usize,
    kt: &[f32],
    stride: usize,
    n: usize,
    w: &mut [f32],
    w_stride: usize,
) {
    const LANES: usize = 16;
    let rows = qs.len() / hd;
    for p0 in (0..n).step_by(LANES) {
        let mut acc = [[0f32; LANES]; FAST_ROWS];
        for d in 0..hd {
            let k: &[f32; LANES] = kt[d * stride + p0..][..LANES].try_into().expect("16 keys");
            for (a, q) in acc.iter_mut().zip(qs.chunks_exact(hd)) {
                let qd = q[d];
                for (x, &kv) in a.iter_mut().zip(k) {
                    *x = fma(kv, qd, *x);
                }
            }
        }
        let m = LANES.min(n - p0);
        for (r, a) in acc.iter().enumerate().take(rows) {
            w[r * w_stride + p0..][..m].copy_from_slice(&a[..m]);
        }
    }
}

/// `a·b + c`, fused where the CPU has FMA.
#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// A batch's query rows for [`Llama::attention`].
pub(super) struct Queries<'a> {
    /// `[B, n_embd]`, after RoPE.
    pub q: &'a [f32],
    /// Each row's position; its key and value are already in its sequence's cache.
    pub positions: &'a [usize],
    /// Each row's sequence (index of its cache); a sequence's rows are consecutive, ascending.
    pub seqs: &'a [usize],
    /// Each row's sequence's cached length (its last row's position + 1).
    pub ends: &'a [usize],
    /// How many rows of this call belong to each row's sequence.
    pub rows_in_seq: &'a [usize],
    /// Take ggml's one-token path even for a batch (see the module comment).
    pub exact: bool,
}

impl Llama<'_> {
    /// Causal attention of the query rows over layer `l` of their sequences' caches, into
    /// `out` (`[n_head, B, head_dim]`). Work items are (head, row) pairs split across threads
    /// in contiguous ranges of equal cost (∝ attended positions).
    pub(super) fn attention(
        &self,
        l: usize,
        caches: &[KvCache],
        rows: Queries,
        out: &mut [f32],
        scratch: &mut [AttnScratch],
    ) {
        let Queries {
            q,
            positions,
            seqs,
            ends,
            rows_in_seq,
            exact,
        } = rows;
        let c = &self.config;
        // A single row (decode) always takes ggml's one-token path.
        let exact = exact || positions.len() == 1;
        let per_group = if exact { MAX_ROWS } else { FAST_ROWS };
        let (nh, hd, d) = (c.n_head, c.head_dim, c.n_embd);
        let b = positions.len();
        let group = c.n_head / c.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        // Transposing a KV head's keys costs about as much as 8 per-key calls of ggml's dot;
        // it pays off once enough (head, row) items share the head and sequence (prefill, not
        // decode, nor one decode row of each of several sequences). Both orders give ggml's
        // bits.
        let transposed = dot_order();
        let order_for = |seq_rows: usize| {
            if seq_rows * group >= 16 {
                transposed
            } else {
                DotOrder::Call
            }
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
        let n_max_all = ends.iter().copied().max().unwrap_or(0);
        let stride = n_max_all.next_multiple_of(QK_BLOCK);
        let padded = scratch[0].scores.len() / FAST_ROWS;
        let run = |lo: usize, hi: usize, chunk: &mut [f32], sc: &mut AttnScratch| {
            sc.loaded = None;
            sc.values_loaded = None;
            // Consecutive items of one head and sequence (rows in order) in groups: their
            // scores one by one, then their softmax chains interleaved (exact) or one f32
            // softmax pass (fast).
            let mut g0 = lo;
            while g0 < hi {
                let h = g0 / b;
                let seq = seqs[g0 % b];
                let mut g1 = hi.min((h + 1) * b).min(g0 + per_group);
                if let Some(n) = (g0 + 1..g1).position(|i| seqs[i % b] != seq) {
                    g1 = g0 + 1 + n;
                }
                let kvh = h / group;
                let order = order_for(rows_in_seq[g0 % b]);
                let cache = &caches[seq];
                let n_total = ends[g0 % b];
                let keys = cache.keys(l, kvh, n_total);
                if order != DotOrder::Call && sc.loaded != Some((seq, kvh)) {
                    for (p, kp) in keys.chunks_exact(hd).enumerate() {
                        for (dd, &k) in kp.iter().enumerate() {
                            sc.keys_t[dd * stride + p] = k.to_f32();
                        }
                    }
                    sc.loaded = Some((seq, kvh));
                }
                let fast_scores = !exact && order != DotOrder::Call;
                for (j, item) in (g0..g1).enumerate() {
                    let row = item % b;
                    let n = positions[row] + 1;
                    let qj = &mut sc.q[j * hd..(j + 1) * hd];
                    ggml::f32_to_f16(&q[row * d + h * hd..row * d + (h + 1) * hd], &mut sc.q16);
                    ggml::f16_to_f32(&sc.q16, qj);
                    if fast_scores {
                        continue;
                    }
                    let qj = &sc.q[j * hd..(j + 1) * hd];
                    let scores = &mut sc.scores[j * padded..(j + 1) * padded];
                    let nb = n.next_multiple_of(QK_BLOCK);
                    // nb is a multiple of QK_BLOCK, so there is no remainder.
                    let (blocks, _) = scores[..nb].as_chunks_mut::<QK_BLOCK>();
                    let blocks = blocks.iter_mut().enumerate();
                    match order {
                        DotOrder::Lanes16 => blocks.for_each(|(jb, s)| {
                            score_block::<16>(qj, &sc.keys_t[jb * QK_BLOCK..], stride, s)
                        }),
                        DotOrder::Lanes8 => blocks.for_each(|(jb, s)| {
                            score_block::<8>(qj, &sc.keys_t[jb * QK_BLOCK..], stride, s)
                        }),
                        DotOrder::Call => {
                            for (s, k) in scores[..n].iter_mut().zip(keys.chunks_exact(hd)) {
                                *s = f16dot.dot(k, &sc.q16);
                            }
                        }
                    }
                }
                let rows = g1 - g0;
                let mut lens = [0usize; FAST_ROWS];
                for (j, item) in (g0..g1).enumerate() {
                    lens[j] = positions[item % b] + 1;
                }
                let n_max = lens[..rows].iter().copied().max().unwrap_or(0);
                if fast_scores {
                    let (qs, w) = (&sc.q[..rows * hd], &mut sc.scores[..rows * padded]);
                    scores_f32(qs, hd, &sc.keys_t, stride, n_max, w, padded);
                }
                let values = cache.values(l, kvh, n_max);
                let o = &mut chunk[(g0 - lo) * hd..(g1 - lo) * hd];
                if !exact {
                    if sc.values_loaded != Some((seq, kvh)) {
                        use half::slice::HalfFloatSliceExt;
                        let all = cache.values(l, kvh, n_total);
                        all.convert_to_f32_slice(&mut sc.values_f32[..all.len()]);
                        sc.values_loaded = Some((seq, kvh));
                    }
                    let w = &mut sc.scores[..rows * padded];
                    let v = &sc.values_f32[..n_max * hd];
                    softmax_values_f32(w, padded, &lens[..rows], scale, v, hd, o);
                    g0 = g1;
                    continue;
                }
                let mut s: [&[f32]; MAX_ROWS] = [&[]; MAX_ROWS];
                for (j, (sj, len)) in s.iter_mut().zip(lens).take(rows).enumerate() {
                    *sj = &sc.scores[j * padded..j * padded + len];
                }
                order::softmax_values_rows(&s[..rows], scale, values, &mut sc.acc[..rows * hd], o);
                g0 = g1;
            }
        };
        par_split(out, &mut scratch[..splits], &bounds[..=splits], hd, &run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorizable e^x against libm's over the range softmax feeds it.
    #[test]
    fn exp_nonpositive_is_within_two_ulp_of_libm() {
        let mut worst = 0u32;
        for i in 0..=2_000_000u32 {
            let x = -87.0 * i as f32 / 2_000_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    /// The fast path (f32 q·k for 8 rows at once, f32 softmax and value sum) against the
    /// definition in f64, for causal rows of unequal length.
    #[test]
    fn fast_path_matches_softmax_attention_in_f64() {
        let (hd, n, rows) = (64usize, 100usize, 5usize);
        let stride = n.next_multiple_of(QK_BLOCK);
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let keys: Vec<f32> = (0..n * hd).map(|_| next()).collect();
        let values: Vec<f16> = (0..n * hd).map(|_| f16::from_f32(next())).collect();
        let qs: Vec<f32> = (0..rows * hd).map(|_| 3.0 * next()).collect();
        let mut kt = vec![0f32; stride * hd];
        for p in 0..n {
            for d in 0..hd {
                kt[d * stride + p] = keys[p * hd + d];
            }
        }
        let lens: Vec<usize> = (0..rows).map(|r| n - rows + 1 + r).collect();
        let mut w = vec![f32::NAN; FAST_ROWS * stride];
        scores_f32(&qs, hd, &kt, stride, n, &mut w, stride);
        let mut out = vec![0f32; rows * hd];
        let scale = 0.125;
        let values32: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
        softmax_values_f32(
            &mut w[..rows * stride],
            stride,
            &lens,
            scale,
            &values32,
            hd,
            &mut out,
        );
        for (r, &len) in lens.iter().enumerate() {
            let q = &qs[r * hd..(r + 1) * hd];
            let s: Vec<f64> = (0..len)
                .map(|p| {
                    let k = &keys[p * hd..(p + 1) * hd];
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..len)
                    .map(|p| e[p] * values[p * hd + d].to_f64())
                    .sum::<f64>()
                    / sum;
                let got = out[r * hd + d] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {r}, dim {d}: {got} vs {want}"
                );
            }
        }
    }
}

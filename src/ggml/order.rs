//! ggml's summation and rounding orders, copied into Rust: the float steps of llama.cpp's CPU
//! graph that ffnskip computes itself rather than by calling ggml, each in exactly the order
//! (and with exactly the fused multiply-adds) of the ggml function it mirrors, so the forward
//! pass reproduces llama.cpp's logits bit for bit. Changing any of them changes the bits; the
//! parity tests (`tests/llama_parity.rs`, `tests/stories260k.rs`) and the kernel tests catch it.
//!
//! Sources cited as `file: function` are in the ggml that `llama-cpp-sys-2` 0.1.160 vendors,
//! `llama.cpp/ggml/src/ggml-cpu/`. Where ggml's C relies on GCC contracting `a*b + c` into an
//! FMA (`-ffp-contract=fast`, the default, whenever FMA is enabled), the copy uses `mul_add`
//! under `cfg(target_feature = "fma")`.

use std::sync::OnceLock;

use half::f16;

use super::F16Dot;

/// `out = x / sqrt(mean(x²) + eps) * w` (every slice `[n_embd]`): f32 squares summed in f64
/// (`ggml_float`), mean and scale in f32, then `x·scale`, then `·w` (the separate `GGML_OP_MUL`
/// with the norm weight that llama.cpp's graph applies after `ggml_rms_norm`).
///
/// Mirrors `ops.cpp: ggml_compute_forward_rms_norm_f32` and `vec.h: ggml_vec_scale_f32`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = (xv * scale) * wv;
    }
}

/// One RoPE rotation of the pair `(x0, x1)` by the angle with cosine `c` and sine `s`:
/// `(x0·c − x1·s, x0·s + x1·c)`, x0's product fused, x1's rounded, as GCC contracts
/// `ops.cpp: rotate_pairs` with FMA available.
#[cfg(target_feature = "fma")]
#[inline(always)]
pub fn rope_rotate(x0: f32, x1: f32, c: f32, s: f32) -> (f32, f32) {
    (x0.mul_add(c, -(x1 * s)), x0.mul_add(s, x1 * c))
}

/// Without FMA ggml's build cannot contract either, so both products are rounded.
#[cfg(not(target_feature = "fma"))]
#[inline(always)]
pub fn rope_rotate(x0: f32, x1: f32, c: f32, s: f32) -> (f32, f32) {
    (x0 * c - x1 * s, x0 * s + x1 * c)
}

/// Keys scored at once by [`score_block`] (across keys the sums vectorise with no horizontal
/// adds).
pub const QK_BLOCK: usize = 64;

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
/// (`kt[d * stride + j]`, f16 values widened to f32; `q` `[head_dim]`, f16 widened), summed in
/// the order of ggml's f16 dot with `EPR`-lane vectors: per lane, four FMA chains over steps of
/// `4·EPR` elements, combined (0+2)+(1+3), the lanes reduced pairwise, and the tail past the
/// last whole step added in f64.
///
/// Mirrors `vec.cpp: ggml_vec_dot_f16` (the `GGML_SIMD` branch) with the reductions of
/// `simd-mappings.h: GGML_F32x16_REDUCE` (AVX-512, `EPR` = 16) and `GGML_F32x8_REDUCE`
/// (AVX, `EPR` = 8), via `GGML_F16_VEC_REDUCE`.
pub fn score_block<const EPR: usize>(
    q: &[f32],
    kt: &[f32],
    stride: usize,
    out: &mut [f32; QK_BLOCK],
) {
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

/// Online softmax over `scores` (raw q·k, in position order, all visible) and the weighted sum
/// of `values` (`[n, head_dim]` f16) into `out` (`[head_dim]` f32), with the f16 value
/// accumulator `acc` (`[head_dim]`):
///
///   s = raw·scale + 0 (mask); on a new maximum M: ms = e^(M_old − M), A ← f16(A·ms);
///   otherwise vs = e^(s − M); A ← f16(A + v·vs); S ← S·ms + vs; out = f32(A)·(1/S)
///
/// with libm's `expf`. Mirrors the F16-value branch of
/// `ops.cpp: ggml_compute_forward_flash_attn_ext_f16_one_chunk`.
pub fn softmax_values(
    scores: &[f32],
    scale: f32,
    values: &[f16],
    acc: &mut [f16],
    out: &mut [f32],
) {
    softmax_values_in(native_f16(), scores, scale, values, acc, out)
}

/// [`softmax_values`] with ggml's f16 vector ops in native f16 (`native`) or through f32.
fn softmax_values_in(
    native: bool,
    scores: &[f32],
    scale: f32,
    values: &[f16],
    acc: &mut [f16],
    out: &mut [f32],
) {
    softmax_values_rows_in(native, &[scores], scale, values, acc, out)
}

/// Most rows [`softmax_values_rows`] interleaves.
pub const MAX_ROWS: usize = 4;

/// [`softmax_values`] for up to [`MAX_ROWS`] query rows of one head at once: row `j` attends
/// to the first `scores[j].len()` of `values`, with accumulator `acc[j·hd..]` and result
/// `out[j·hd..]` (`hd` = `out.len() / rows`). The rows' chains of accumulator steps are
/// independent, so stepping them position by position lets them overlap in the CPU; each row
/// gets the bits [`softmax_values`] gives it alone.
pub fn softmax_values_rows(
    scores: &[&[f32]],
    scale: f32,
    values: &[f16],
    acc: &mut [f16],
    out: &mut [f32],
) {
    softmax_values_rows_in(native_f16(), scores, scale, values, acc, out)
}

fn softmax_values_rows_in(
    native: bool,
    scores: &[&[f32]],
    scale: f32,
    values: &[f16],
    acc: &mut [f16],
    out: &mut [f32],
) {
    let r = scores.len();
    assert!((1..=MAX_ROWS).contains(&r), "{r} rows");
    let hd = out.len() / r;
    assert_eq!(acc.len(), r * hd, "accumulators");
    let n_max = scores.iter().map(|s| s.len()).max().unwrap_or(0);
    assert!(values.len() >= n_max * hd, "values for {n_max} positions");
    acc.fill(f16::ZERO);
    let (mut m, mut sum) = ([f32::NEG_INFINITY; MAX_ROWS], [0f32; MAX_ROWS]);
    for (p, v) in values.chunks_exact(hd).take(n_max).enumerate() {
        for (j, a) in acc.chunks_exact_mut(hd).enumerate() {
            let Some(&raw) = scores[j].get(p) else {
                continue;
            };
            // The mask adds +0.0 at every visible position.
            let s = raw * scale + 0.0;
            let (mut ms, mut vs) = (1f32, 1f32);
            if s > m[j] {
                let old = m[j];
                m[j] = s;
                ms = (old - s).exp();
                vec_scale_f16_in(native, a, ms);
            } else {
                vs = (s - m[j]).exp();
            }
            vec_mad_f16_in(native, a, v, vs);
            sum[j] = softmax_sum(sum[j], ms, vs);
        }
    }
    for ((o, a), &sj) in out.chunks_exact_mut(hd).zip(acc.chunks_exact(hd)).zip(&sum) {
        let inv = if sj == 0.0 { 0.0 } else { 1.0 / sj };
        for (o, a) in o.iter_mut().zip(a) {
            *o = a.to_f32() * inv;
        }
    }
}

/// `x` rounded to f16 once (to nearest, ties to even): through f32 rounded to odd, which keeps
/// enough bits (24 > 11 + 1) for the second rounding to be exact; a plain f64 → f32 → f16
/// conversion would round twice.
fn f16_rounded_once(x: f64) -> f16 {
    let t = x as f32;
    if f64::from(t) == x || !t.is_finite() {
        return f16::from_f32(t);
    }
    // Toward zero, then the sticky bit in the last place.
    let mut bits = t.to_bits();
    if f64::from(t).abs() > x.abs() {
        bits -= 1;
    }
    f16::from_f32(f32::from_bits(bits | 1))
}

/// `y = f16(y + x·v)` with one rounding, as AVX512-FP16's `_mm512_fmadd_ph`: the f16·f16
/// product is exact in f32; the f32 sum and its exact error (TwoSum) give the sum rounded to
/// odd, from which the conversion to f16 rounds correctly (24 bits ≥ 2·11 + 2).
fn native_mad_f16(y: &mut [f16], x: &[f16], v: f16) {
    assert_eq!(y.len(), x.len());
    let n = y.len();
    let mut i = 0;
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "f16c",
        target_feature = "avx2"
    ))]
    {
        use std::arch::x86_64::*;
        // SAFETY: the features these need are enabled at compile time (the cfg above); every
        // load and store below covers y[i..i + 8] or x[i..i + 8] with i + 8 ≤ n.
        unsafe {
            let vv = _mm256_set1_ps(v.to_f32());
            let zero = _mm256_setzero_ps();
            let one = _mm256_set1_epi32(1);
            let sign = _mm256_set1_epi32(i32::MIN);
            while i + 8 <= n {
                let py = y.as_mut_ptr().add(i).cast::<__m128i>();
                let px = x.as_ptr().add(i).cast::<__m128i>();
                let ay = _mm256_cvtph_ps(_mm_loadu_si128(py));
                let p = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(px)), vv);
                let s = _mm256_add_ps(p, ay);
                // TwoSum: err = (p + ay) − s exactly.
                let bb = _mm256_sub_ps(s, p);
                let err = _mm256_add_ps(
                    _mm256_sub_ps(p, _mm256_sub_ps(s, bb)),
                    _mm256_sub_ps(ay, bb),
                );
                let (sb, eb) = (_mm256_castps_si256(s), _mm256_castps_si256(err));
                // Inexact and even: step one ulp toward the exact sum (odd), or to the
                // smallest subnormal of err's sign from zero.
                let inexact = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_NEQ_OQ>(err, zero));
                let even = _mm256_cmpeq_epi32(_mm256_and_si256(sb, one), _mm256_setzero_si256());
                let adjust = _mm256_and_si256(inexact, even);
                let step = _mm256_or_si256(_mm256_srai_epi32::<31>(_mm256_xor_si256(sb, eb)), one);
                let stepped = _mm256_add_epi32(sb, step);
                let from_zero = _mm256_or_si256(_mm256_and_si256(eb, sign), one);
                let is_zero = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(s, zero));
                let odd = _mm256_blendv_epi8(stepped, from_zero, is_zero);
                let r = _mm256_castsi256_ps(_mm256_blendv_epi8(sb, odd, adjust));
                _mm_storeu_si128(py, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r));
                i += 8;
            }
        }
    }
    let v = f64::from(v);
    for (a, &b) in y[i..].iter_mut().zip(&x[i..]) {
        // The f16·f16 product is exact in f64 and the sum rounds once more only below f16's
        // precision.
        *a = f16_rounded_once(f64::from(b).mul_add(v, f64::from(*a)));
    }
}

/// Elements per step of ggml's native-f16 loops (`GGML_F16_STEP` under `__AVX512FP16__`).
const NATIVE_F16_STEP: usize = 128;

/// Whether the linked ggml computes its f16 vector ops (`ggml_vec_mad_f16`,
/// `ggml_vec_scale_f16`, inline in vec.h and so not callable) in native f16, as a build with
/// AVX512-FP16 does (`GGML_NATIVE` on CPUs that have it). Decided once by running ggml's own
/// flash attention ([`super::flash_attn_one`]) on pseudo-random 128-wide heads and keeping the
/// variant of [`softmax_values`] that reproduces it.
pub fn native_f16() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        let f16dot = F16Dot::get();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let hd = NATIVE_F16_STEP;
        let (mut f32_ok, mut native_ok) = (true, true);
        for n_kv in [2, 3, 5, 8, 13] {
            let q: Vec<f32> = (0..hd).map(|_| rand()).collect();
            let k: Vec<f16> = (0..hd * n_kv).map(|_| f16::from_f32(rand())).collect();
            let v: Vec<f16> = (0..hd * n_kv)
                .map(|_| f16::from_f32(rand() * 4.0))
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let Some(theirs) = super::flash_attn_one(&q, &k, &v, scale) else {
                return false;
            };
            let mut q16 = vec![f16::ZERO; hd];
            super::f32_to_f16(&q, &mut q16);
            let scores: Vec<f32> = k.chunks_exact(hd).map(|kk| f16dot.dot(kk, &q16)).collect();
            let (mut acc, mut ours) = (vec![f16::ZERO; hd], vec![0f32; hd]);
            for (native, ok) in [(false, &mut f32_ok), (true, &mut native_ok)] {
                softmax_values_in(native, &scores, scale, &v, &mut acc, &mut ours);
                *ok &= ours
                    .iter()
                    .zip(&theirs)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            }
        }
        native_ok && !f32_ok
    })
}

/// `S·ms + vs`, the running softmax sum of `ggml_compute_forward_flash_attn_ext_f16_one_chunk`,
/// as GCC contracts it into one FMA when FMA is available.
#[cfg(target_feature = "fma")]
#[inline(always)]
fn softmax_sum(s: f32, ms: f32, vs: f32) -> f32 {
    s.mul_add(ms, vs)
}

#[cfg(not(target_feature = "fma"))]
#[inline(always)]
fn softmax_sum(s: f32, ms: f32, vs: f32) -> f32 {
    s * ms + vs
}

/// `y = f16(y + x·v)` element-wise, fused multiply-add in f32 and one rounding to f16 per element,
/// as flash attention accumulates softmax-weighted values. Mirrors `vec.h: ggml_vec_mad_f16`
/// (inline in the header, so not exported). ggml's SIMD and its scalar tail (which GCC contracts
/// into an FMA) round identically, so the vector width here does not change the bits: 8 F16C
/// lanes (16-lane AVX-512 measured no faster for head-sized rows), then scalar.
///
/// A ggml built with AVX512-FP16 (`simd-mappings.h`: `GGML_F16_VEC` = `__m512h`) computes the
/// first `n & !127` elements in native f16 instead: `v` rounded to f16, then one f16 FMA per
/// element ([`native_f16`]); the tail as above.
pub fn vec_mad_f16(y: &mut [f16], x: &[f16], v: f32) {
    vec_mad_f16_in(native_f16(), y, x, v)
}

fn vec_mad_f16_in(native: bool, y: &mut [f16], x: &[f16], v: f32) {
    assert_eq!(y.len(), x.len());
    let n = y.len();
    let mut i = 0;
    if native {
        let np = n & !(NATIVE_F16_STEP - 1);
        native_mad_f16(&mut y[..np], &x[..np], f16::from_f32(v));
        i = np;
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "f16c",
        target_feature = "fma"
    ))]
    {
        use std::arch::x86_64::*;
        // SAFETY: the feature this needs is enabled at compile time (the cfg above).
        let vv = unsafe { _mm256_set1_ps(v) };
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n, so each 16-byte load/store stays inside the slices; f16c and
            // fma are enabled at compile time.
            unsafe {
                let py = y.as_mut_ptr().add(i).cast::<__m128i>();
                let px = x.as_ptr().add(i).cast::<__m128i>();
                let ay = _mm256_cvtph_ps(_mm_loadu_si128(py));
                let ax = _mm256_cvtph_ps(_mm_loadu_si128(px));
                let r = _mm256_fmadd_ps(ax, vv, ay);
                _mm_storeu_si128(py, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r));
            }
            i += 8;
        }
    }
    for (a, &b) in y[i..].iter_mut().zip(&x[i..]) {
        *a = f16::from_f32(b.to_f32().mul_add(v, a.to_f32()));
    }
}

/// `y = f16(y·v)` element-wise. Mirrors `vec.h: ggml_vec_scale_f16` (inline in the header).
///
/// With AVX512-FP16 ([`native_f16`]), the first `n & !127` elements are multiplied in f16:
/// `v` rounded to f16, the exact product rounded once.
pub fn vec_scale_f16(y: &mut [f16], v: f32) {
    vec_scale_f16_in(native_f16(), y, v)
}

fn vec_scale_f16_in(native: bool, y: &mut [f16], v: f32) {
    let n = y.len();
    let mut i = 0;
    if native {
        let np = n & !(NATIVE_F16_STEP - 1);
        let v16 = f16::from_f32(v).to_f32();
        let mut j = 0;
        #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
        {
            use std::arch::x86_64::*;
            // SAFETY: the feature this needs is enabled at compile time (the cfg above).
            let vv = unsafe { _mm256_set1_ps(v16) };
            while j + 8 <= np {
                // SAFETY: j + 8 ≤ np ≤ y.len(): the 16-byte load/store stays inside `y`.
                unsafe {
                    let py = y.as_mut_ptr().add(j).cast::<__m128i>();
                    // f16·f16 is exact in f32, so the conversion is the only rounding.
                    let r = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(py)), vv);
                    _mm_storeu_si128(py, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r));
                }
                j += 8;
            }
        }
        for a in &mut y[j..np] {
            *a = f16::from_f32(a.to_f32() * v16);
        }
        i = np;
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
    {
        use std::arch::x86_64::*;
        // SAFETY: the feature this needs is enabled at compile time (the cfg above).
        let vv = unsafe { _mm256_set1_ps(v) };
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n, so the 16-byte load/store stays inside `y`.
            unsafe {
                let py = y.as_mut_ptr().add(i).cast::<__m128i>();
                let r = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(py)), vv);
                _mm_storeu_si128(py, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r));
            }
            i += 8;
        }
    }
    for a in &mut y[i..] {
        *a = f16::from_f32(a.to_f32() * v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our flash-attention row against ggml's `ggml_flash_attn_ext` (one query, one head), for
    /// head sizes with and without a native-f16 part and values down to f16 subnormals.
    #[test]
    fn interleaved_rows_give_each_row_its_own_bits() {
        let hd = 128;
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let n = 300;
        let values: Vec<f16> = (0..n * hd).map(|_| f16::from_f32(next())).collect();
        let scores: Vec<Vec<f32>> = [297, 298, 299, 300]
            .iter()
            .map(|&len| (0..len).map(|_| next() * 8.0).collect())
            .collect();
        for native in [false, true] {
            for rows in 1..=MAX_ROWS {
                let s: Vec<&[f32]> = scores[..rows].iter().map(|v| &v[..]).collect();
                let mut acc = vec![f16::ZERO; rows * hd];
                let mut out = vec![0f32; rows * hd];
                softmax_values_rows_in(native, &s, 0.125, &values, &mut acc, &mut out);
                for (j, sj) in s.iter().enumerate() {
                    let mut acc1 = vec![f16::ZERO; hd];
                    let mut one = vec![0f32; hd];
                    softmax_values_in(native, sj, 0.125, &values, &mut acc1, &mut one);
                    let same = one.iter().zip(&out[j * hd..(j + 1) * hd]);
                    assert!(
                        same.clone().all(|(a, b)| a.to_bits() == b.to_bits()),
                        "native {native}, {rows} rows: row {j} differs"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_values_reproduce_ggml_flash_attention() {
        let f16dot = F16Dot::get();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut cases = 0;
        for hd in [64, 128, 80, 256] {
            for (qs, ks, vs) in [(1.0, 1.0, 1.0), (30.0, 30.0, 300.0), (3.0, 3.0, 0.01)] {
                for n_kv in [1, 2, 3, 14, 33, 77] {
                    let q: Vec<f32> = (0..hd).map(|_| rand() * qs).collect();
                    let k: Vec<f16> = (0..hd * n_kv).map(|_| f16::from_f32(rand() * ks)).collect();
                    let v: Vec<f16> = (0..hd * n_kv).map(|_| f16::from_f32(rand() * vs)).collect();
                    let scale = 1.0 / (hd as f32).sqrt();
                    let theirs = crate::ggml::flash_attn_one(&q, &k, &v, scale).expect("ggml");
                    let mut q16 = vec![f16::ZERO; hd];
                    crate::ggml::f32_to_f16(&q, &mut q16);
                    let scores: Vec<f32> =
                        k.chunks_exact(hd).map(|kk| f16dot.dot(kk, &q16)).collect();
                    let (mut acc, mut ours) = (vec![f16::ZERO; hd], vec![0f32; hd]);
                    softmax_values(&scores, scale, &v, &mut acc, &mut ours);
                    let same = ours
                        .iter()
                        .zip(&theirs)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "head {hd}, {n_kv} keys, scales {qs}/{ks}/{vs} (native f16: {})",
                        native_f16()
                    );
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 72);
    }

    #[test]
    fn blocked_scores_reproduce_ggml_f16_dot() {
        super::super::init();
        let order = dot_order();
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        assert_eq!(order, DotOrder::Lanes16, "AVX-512 build of ggml");
        assert!(mirrors_ggml(order, &F16Dot::get()));
    }
}

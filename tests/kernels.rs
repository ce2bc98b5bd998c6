//! Kernel-vs-scalar-reference tests (DESIGN.md §4 "Tests in tiers"), in the spirit of
//! ggml's `tests/test-quantize-fns.cpp`: for each weight type ggml's CPU backend can dot,
//! quantize a random matrix with `ggml::quantize`, multiply with `tensor::matmul_group` on
//! activations quantized with `tensor::quantize_rows`, and compare with an f64 dot of the
//! dequantized weights and the original f32 activations.
//!
//! Since the reference uses the *dequantized* weights, weight quantization error cancels:
//! what remains is the activations' quantization to the weight's `vec_dot_type` plus f32
//! rounding in the kernel. For one output, with w the dequantized weights, x the f32
//! activations and x̂ their quantized form, |kernel − ref| ≤ Σ_i |w_i|·|x̂_i − x_i| + accumulation.
//! Per vec_dot_type (see `bound` below):
//! * Q8_0 / Q8_1 / Q8_K (blocks of 32 / 32 / 256): d = amax_b/127 and q = round(x/d), so
//!   |x̂_i − x_i| ≤ d/2 = amax_b/254; Q8_0 and Q8_1 store d as f16 (relative 2^-11 on
//!   |q·d| ≤ amax_b), and Q8_1 also stores s = d·Σq as f16, multiplied by the weight block's
//!   min m (|m| ≤ max_b|w|) in Q4_1/Q5_1 — we allow 2^-10 for each f16 rounding.
//! * F16: x rounded to f16, relative 2^-11; BF16: relative 2^-9 (we allow 2^-8).
//! * F32: none.
//!
//! Accumulation in f32: at most n products/blocks summed, n·2^-24 relative to Σ|w·x|;
//! we allow 2^-14·Σ|w·x| for n = 512.
//! This bound is a worst case (all rounding errors aligned); we assert measured ≤ bound and
//! print the measured maximum as a fraction of the bound and of Σ|w·x|.

mod common;

use ffnskip::ggml;
use ffnskip::gguf::GgmlType;
use ffnskip::tensor::{matmul_group, quantize_rows, Acts, Matrix};

use common::Lcg;

/// Weight types the brief requires, all of which must have CPU kernels and a quantizer.
/// IQ2_XXS, IQ2_XS and IQ1_S are absent: ggml's quantizer needs an importance matrix for
/// them (`ggml_quantize_requires_imatrix`), which ffnskip does not compute; they are checked
/// to be refused cleanly in `imatrix_types_are_refused`.
const REQUIRED: [GgmlType; 19] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
    GgmlType::IQ2_S,
    GgmlType::IQ1_M,
];

/// Other types in `GgmlType::ALL` tested when this ggml build can quantize and dot them.
const EXTRA: [GgmlType; 5] = [
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
    GgmlType::MXFP4,
    GgmlType::Q1_0,
    GgmlType::Q2_0,
];

/// Random weights `[n_out, n_in]`: roughly normal, row scales varying over 100×, and an
/// occasional outlier (as in real weight matrices).
fn weights(rng: &mut Lcg, n_in: usize, n_out: usize) -> Vec<f32> {
    let mut w = Vec::with_capacity(n_in * n_out);
    for r in 0..n_out {
        let scale = 0.01 * (1.0 + 99.0 * (r % 7) as f32 / 6.0);
        for _ in 0..n_in {
            let outlier = if rng.next().is_multiple_of(97) {
                6.0
            } else {
                1.0
            };
            w.push(rng.normal() * scale * outlier);
        }
    }
    w
}

/// Random activations `[batch, n]`: uniform with a few large outliers per row, as after
/// RMS norm in an LLM (a few channels carry most of the magnitude).
fn activations(rng: &mut Lcg, n: usize, batch: usize) -> Vec<f32> {
    (0..n * batch)
        .map(|_| {
            let x = rng.uniform();
            if rng.next().is_multiple_of(61) {
                x * 20.0
            } else {
                x
            }
        })
        .collect()
}

/// Worst-case |kernel − reference| for one output (see the file comment), and Σ|w·x|.
fn bound(vdt: GgmlType, w: &[f32], x: &[f32]) -> (f64, f64) {
    let abs_wx: f64 = w
        .iter()
        .zip(x)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum();
    let accumulation = abs_wx * 2f64.powi(-14);
    let relative = |r: f64| r * abs_wx + accumulation;
    match vdt {
        GgmlType::F32 => (accumulation, abs_wx),
        GgmlType::F16 => (relative(2f64.powi(-11)), abs_wx),
        GgmlType::BF16 => (relative(2f64.powi(-8)), abs_wx),
        GgmlType::Q8_0 | GgmlType::Q8_1 | GgmlType::Q8_K => {
            let qk = vdt.block_size() as usize;
            let mut e = accumulation;
            for (wb, xb) in w.chunks(qk).zip(x.chunks(qk)) {
                let amax = xb.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                let wabs: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                let wmax = wb.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                let xabs: f64 = xb.iter().map(|v| v.abs() as f64).sum();
                // rounding to the int8 grid + f16 d; f16 s (Q8_1) times the weight min.
                e += wabs * amax * (1.0 / 254.0 + 2f64.powi(-10)) + wmax * xabs * 2f64.powi(-10);
            }
            (e, abs_wx)
        }
        other => panic!("no error model for vec_dot_type {other}"),
    }
}

/// Weights quantized to `ty`, their dequantized values, or why not.
fn quantized(ty: GgmlType, w: &[f32], n_in: usize) -> Result<(Vec<u8>, Vec<f32>), String> {
    let q = ggml::quantize(ty, w, n_in)?;
    let mut deq = vec![0f32; w.len()];
    ggml::dequantize(ty, &q, &mut deq)?;
    Ok((q, deq))
}

/// `matmul_group` of one matrix over `x` (`[batch, n_in]`), on a team of `threads`: `[batch, n_out]`.
fn product(m: &Matrix, x: &[f32], batch: usize, threads: usize) -> Vec<f32> {
    let mut act = vec![0u8; batch * m.act_row_bytes()];
    quantize_rows(m.kernels(), x, m.n_in, &mut act);
    let mut out = vec![f32::NAN; m.n_out * batch];
    let pool = ffnskip::team::Team::new(threads).unwrap();
    pool.install(|| matmul_group(&[(m, Acts::rows(&act))], batch, &mut out));
    out
}

struct Report {
    /// max |Δ| / bound
    of_bound: f64,
    /// max |Δ| / Σ|w·x|
    relative: f64,
}

/// Checks `ty` on an `[n_out, n_in]` matrix: batch 1 and 7, 1, 2 and 5 threads.
fn check_type(ty: GgmlType, n_in: usize, n_out: usize, seed: u64) -> Result<Report, String> {
    let mut rng = Lcg(seed);
    let w = weights(&mut rng, n_in, n_out);
    let (q, deq) = quantized(ty, &w, n_in)?;
    let m = Matrix::from_raw(ty, n_in, n_out, &q).ok_or("Matrix::from_raw refused the data")?;
    let vdt = m.vec_dot_type();
    let batch = 7;
    let x = activations(&mut rng, n_in, batch);

    let mut rep = Report {
        of_bound: 0.0,
        relative: 0.0,
    };
    let out7 = product(&m, &x, batch, 2);
    for b in 0..batch {
        let xb = &x[b * n_in..(b + 1) * n_in];
        for o in 0..n_out {
            let wr = &deq[o * n_in..(o + 1) * n_in];
            let reference: f64 = wr.iter().zip(xb).map(|(a, c)| *a as f64 * *c as f64).sum();
            let got = out7[b * n_out + o] as f64;
            let (bnd, abs_wx) = bound(vdt, wr, xb);
            let err = (got - reference).abs();
            assert!(
                err <= bnd,
                "{ty} (activations as {vdt}), n_in {n_in}, row {o}, batch row {b}: kernel {got}, reference {reference}, |Δ| {err:.3e} > bound {bnd:.3e}"
            );
            rep.of_bound = rep.of_bound.max(err / bnd);
            rep.relative = rep.relative.max(err / abs_wx);
        }
        // Batch-k results equal k batch-1 results exactly (same vec_dot per pair).
        for threads in [1, 2] {
            let out1 = product(&m, xb, 1, threads);
            let col = &out7[b * n_out..(b + 1) * n_out];
            assert!(
                out1.iter()
                    .zip(col)
                    .all(|(a, c)| a.to_bits() == c.to_bits()),
                "{ty}: batch-7 row {b} differs from a batch-1 product ({threads} threads)"
            );
        }
    }
    // The split across threads never changes a result.
    for threads in [1, 5] {
        let other = product(&m, &x, batch, threads);
        assert!(
            other
                .iter()
                .zip(&out7)
                .all(|(a, c)| a.to_bits() == c.to_bits()),
            "{ty}: {threads} threads differ from 2"
        );
    }
    Ok(rep)
}

#[test]
fn every_required_type_matches_the_scalar_reference() {
    ggml::init();
    let mut lines = Vec::new();
    for (i, &ty) in REQUIRED.iter().enumerate() {
        let k = ggml::kernels(ty).unwrap_or_else(|| panic!("ggml has no CPU kernels for {ty}"));
        let rep = check_type(ty, 512, 37, 100 + i as u64).unwrap_or_else(|e| panic!("{ty}: {e}"));
        // Small rows: one or three blocks of 32 (types whose blocks allow it).
        let mut small = String::new();
        for n_in in [32, 96] {
            if (n_in as u64).is_multiple_of(ty.block_size())
                && (n_in as u64).is_multiple_of(k.vec_dot_type.block_size())
            {
                let r =
                    check_type(ty, n_in, 5, 200 + i as u64).unwrap_or_else(|e| panic!("{ty}: {e}"));
                small += &format!("  n_in {n_in}: {:.3} of bound", r.of_bound);
            }
        }
        lines.push(format!(
            "{:>8} × {:<5}: max |Δ| = {:.3} of bound, {:.2e} of Σ|w·x|{small}",
            ty.name(),
            k.vec_dot_type.name(),
            rep.of_bound,
            rep.relative
        ));
        // A figure per activation type, ~3× the largest measured here (these inputs are
        // fixed by the seeds): F32 5.7e-8, F16 1.4e-4, BF16 6.7e-4, Q8_0/Q8_1 7.5e-3 (32-wide
        // blocks), Q8_K 1.6e-2 (256-wide blocks hold more outliers, so a coarser grid).
        let ceiling = match k.vec_dot_type {
            GgmlType::F32 => 2e-7,
            GgmlType::F16 => 5e-4,
            GgmlType::BF16 => 2e-3,
            GgmlType::Q8_0 | GgmlType::Q8_1 => 2.5e-2,
            _ => 5e-2,
        };
        assert!(
            rep.relative <= ceiling,
            "{ty}: max |Δ|/Σ|w·x| = {:.3e} > {ceiling:e}",
            rep.relative
        );
    }
    eprintln!(
        "kernel errors vs f64 reference (weight × activation type):\n{}",
        lines.join("\n")
    );
}

#[test]
fn extra_types_when_available() {
    ggml::init();
    for (i, &ty) in EXTRA.iter().enumerate() {
        if ggml::kernels(ty).is_none() {
            eprintln!("{ty}: no CPU vec_dot in this ggml build, skipped");
            continue;
        }
        match check_type(ty, 512, 37, 300 + i as u64) {
            Ok(r) => eprintln!(
                "{ty}: max |Δ| = {:.3} of bound, {:.2e} of Σ|w·x|",
                r.of_bound, r.relative
            ),
            Err(e) => eprintln!("{ty}: skipped: {e}"),
        }
    }
}

#[test]
fn imatrix_types_are_refused() {
    let w = vec![0.5f32; 256 * 2];
    for ty in [GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ1_S] {
        assert!(ggml::quantize_requires_imatrix(ty));
        assert_eq!(
            ggml::quantize(ty, &w, 256).unwrap_err(),
            format!("{ty} needs an importance matrix, which ffnskip does not compute")
        );
    }
    assert_eq!(
        ggml::quantize(GgmlType::Q4_0, &w[..100], 50).unwrap_err(),
        "row length 50 is not a multiple of the q4_0 block size 32"
    );
}

#[test]
fn grouped_matrices_equal_separate_products() {
    ggml::init();
    let n_in = 512;
    let mut rng = Lcg(42);
    let x = activations(&mut rng, n_in, 7);
    // Two pairs: same activation type (shared buffer), and different ones.
    for (ta, tb) in [
        (GgmlType::Q4_K, GgmlType::Q6_K),
        (GgmlType::Q4_1, GgmlType::Q8_0),
        (GgmlType::F16, GgmlType::Q5_0),
    ] {
        let (na, nb) = (37, 20);
        let (qa, _) = quantized(ta, &weights(&mut rng, n_in, na), n_in).unwrap();
        let (qb, _) = quantized(tb, &weights(&mut rng, n_in, nb), n_in).unwrap();
        let ma = Matrix::from_raw(ta, n_in, na, &qa).unwrap();
        let mb = Matrix::from_raw(tb, n_in, nb, &qb).unwrap();
        for batch in [1, 7] {
            let xs = &x[..batch * n_in];
            let quant = |m: &Matrix| {
                let mut a = vec![0u8; batch * m.act_row_bytes()];
                quantize_rows(m.kernels(), xs, n_in, &mut a);
                a
            };
            let (aa, ab) = (quant(&ma), quant(&mb));
            for threads in [1, 2, 3] {
                let pool = ffnskip::team::Team::new(threads).unwrap();
                let mut both = vec![f32::NAN; (na + nb) * batch];
                pool.install(|| {
                    matmul_group(
                        &[(&ma, Acts::rows(&aa)), (&mb, Acts::rows(&ab))],
                        batch,
                        &mut both,
                    )
                });
                let sa = product(&ma, xs, batch, threads);
                let sb = product(&mb, xs, batch, threads);
                let separate: Vec<f32> = sa.into_iter().chain(sb).collect();
                assert!(
                    both.iter()
                        .zip(&separate)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ta}+{tb}, batch {batch}, {threads} threads: grouped ≠ separate"
                );
            }
        }
    }
}

#[test]
fn from_raw_checks_geometry() {
    let data = vec![0u8; 144 * 2];
    assert!(Matrix::from_raw(GgmlType::Q4_0, 32, 2, &data[..36]).is_some());
    assert!(
        Matrix::from_raw(GgmlType::Q4_0, 32, 3, &data[..36]).is_none(),
        "wrong byte count"
    );
    assert!(
        Matrix::from_raw(GgmlType::Q4_0, 33, 2, &data[..36]).is_none(),
        "not whole blocks"
    );
    // Q4_K rows are whole 256-element blocks of 144 bytes.
    assert!(Matrix::from_raw(GgmlType::Q4_K, 256, 2, &data).is_some());
    assert!(Matrix::from_raw(GgmlType::Q4_K, 128, 4, &data).is_none());
    // Types without a CPU dot product (activation-only Q8_K) are refused.
    assert!(Matrix::from_raw(GgmlType::Q8_K, 256, 1, &vec![0u8; 292]).is_none());
}

/// Flash attention's f16 accumulator steps (`ggml_vec_mad_f16`, `ggml_vec_scale_f16`): the
/// SIMD bodies and the scalar tails must give exactly f16(fma(x, v, y)) and f16(y·v), at every
/// length (head sizes that are and are not multiples of the vector width). Where the linked
/// ggml computes in native f16 (AVX512-FP16 builds, `order::native_f16`), its first
/// `n & !127` elements are f16(fma(x, f16(v), y)) and f16(y·f16(v)) instead, each rounded once.
#[test]
fn f16_accumulator_steps_round_once_per_element() {
    use half::f16;
    /// The f16 nearest to `r` (ties to even), searched among `f16::from_f64(r)` and its
    /// neighbours so that no intermediate rounding can decide it.
    fn nearest_f16(r: f64) -> f16 {
        // At and above 65520 (halfway between f16::MAX and the next power of two) the
        // nearest-even rounding overflows.
        if r.abs() >= 65520.0 {
            return if r > 0.0 {
                f16::INFINITY
            } else {
                f16::NEG_INFINITY
            };
        }
        let c = f16::from_f64(r);
        let bits = c.to_bits();
        [bits.wrapping_sub(1), bits, bits.wrapping_add(1)]
            .into_iter()
            .map(f16::from_bits)
            .filter(|h| h.is_finite())
            .min_by(|a, b| {
                let (da, db) = ((f64::from(*a) - r).abs(), (f64::from(*b) - r).abs());
                da.total_cmp(&db)
                    .then((a.to_bits() & 1).cmp(&(b.to_bits() & 1)))
            })
            .unwrap_or(c)
    }
    let native = ffnskip::ggml::order::native_f16();
    // Every magnitude f16 holds, subnormals included, against the one-rounding oracle.
    if native {
        let mut rng = Lcg(11);
        for round in 0..2000 {
            let n = 128;
            let e = |rng: &mut Lcg| 2f32.powi(rng.below(40) as i32 - 24);
            let y0: Vec<f16> = (0..n)
                .map(|_| f16::from_f32((rng.uniform() * 2.0 - 1.0) * e(&mut rng)))
                .collect();
            let x: Vec<f16> = (0..n)
                .map(|_| f16::from_f32((rng.uniform() * 2.0 - 1.0) * e(&mut rng)))
                .collect();
            let v = (rng.uniform() * 2.0 - 1.0) * e(&mut rng).min(4.0);
            let v16 = f64::from(f16::from_f32(v));
            let mut y = y0.clone();
            ffnskip::ggml::order::vec_mad_f16(&mut y, &x, v);
            for i in 0..n {
                let want = nearest_f16(f64::from(x[i]) * v16 + f64::from(y0[i]));
                if want.is_finite() {
                    assert_eq!(
                        y[i].to_bits(),
                        want.to_bits(),
                        "native mad, round {round}, element {i}"
                    );
                }
            }
        }
    }
    eprintln!("native f16 accumulation in the linked ggml: {native}");
    let mut rng = Lcg(7);
    let mut val = |scale: f32| f16::from_f32((rng.below(20001) as f32 / 10000.0 - 1.0) * scale);
    for n in [1, 7, 8, 15, 16, 17, 40, 64, 80, 128, 131, 256, 300] {
        let np = if native { n & !127 } else { 0 };
        let y0: Vec<f16> = (0..n).map(|_| val(4.0)).collect();
        let x: Vec<f16> = (0..n).map(|_| val(1e-3)).collect();
        let v = 0.737_f32;
        let v16 = f64::from(f16::from_f32(v));
        let mut y = y0.clone();
        ffnskip::ggml::order::vec_mad_f16(&mut y, &x, v);
        for i in 0..n {
            let want = if i < np {
                nearest_f16(f64::from(x[i]) * v16 + f64::from(y0[i]))
            } else {
                f16::from_f32(x[i].to_f32().mul_add(v, y0[i].to_f32()))
            };
            assert_eq!(y[i].to_bits(), want.to_bits(), "mad, n = {n}, element {i}");
        }
        let mut y = y0.clone();
        ffnskip::ggml::order::vec_scale_f16(&mut y, v);
        for i in 0..n {
            let want = if i < np {
                nearest_f16(f64::from(y0[i]) * v16)
            } else {
                f16::from_f32(y0[i].to_f32() * v)
            };
            assert_eq!(
                y[i].to_bits(),
                want.to_bits(),
                "scale, n = {n}, element {i}"
            );
        }
    }
}

/// ggml's repacked GEMM (four activations at a time, as llama.cpp runs a batch) against its
/// GEMV (one at a time, as in decode) on the same packed weights: the 4-row packer quantizes
/// each row as the 1-row quantizer does (same Q8_K scales), Q4_0's GEMM gives the GEMV's bits
/// (so it serves exact batches too), and Q4_K's stays within float-summation distance of it.
#[test]
fn repacked_gemm_against_gemv() {
    use ffnskip::ggml::repack::{quantize4, Packed};
    let (n_in, n_out, batch) = (512, 64, 8);
    let mut rng = Lcg(11);
    let w = weights(&mut rng, n_in, n_out);
    let x = activations(&mut rng, n_in, batch);
    for ty in [GgmlType::Q4_K, GgmlType::Q4_0] {
        let q = ggml::quantize(ty, &w, n_in).unwrap();
        let Some(p) = Packed::new(ty, n_in, n_out, &q) else {
            eprintln!("{ty}: not repacked on this CPU");
            continue;
        };
        let m = Matrix::from_raw(ty, n_in, n_out, &q).unwrap();
        let arb = m.act_row_bytes();
        let mut plain = vec![0u8; arb * batch];
        quantize_rows(m.kernels(), &x, n_in, &mut plain);
        let mut packed = vec![0u8; arb * batch];
        for (xs, out) in x.chunks(4 * n_in).zip(packed.chunks_mut(4 * arb)) {
            assert!(quantize4(ty, xs, n_in, out));
        }
        if ty == GgmlType::Q4_K {
            // block_q8_K is {f32 d; i8 qs[256]; i16 bsums[16]} (292 bytes); block_q8_Kx4 starts
            // with the four rows' d.
            for b in 0..batch {
                for i in 0..n_in / 256 {
                    let one = &plain[b * arb + i * 292..][..4];
                    let four = &packed[(b / 4) * 4 * arb + i * 4 * 292 + (b % 4) * 4..][..4];
                    assert_eq!(one, four, "row {b} block {i}: scale");
                }
            }
        }
        let mut gemm = vec![0f32; batch * n_out];
        p.gemm(0..n_out, &packed, batch, &mut gemm, n_out);
        let (mut same, mut worst) = (0, 0f64);
        for b in 0..batch {
            let mut gemv = vec![0f32; n_out];
            p.gemv(0..n_out, &plain[b * arb..(b + 1) * arb], &mut gemv);
            for (o, v) in gemv.iter().enumerate() {
                let g = gemm[b * n_out + o];
                same += usize::from(g.to_bits() == v.to_bits());
                let (_, abs_wx) = bound(
                    m.vec_dot_type(),
                    &w[o * n_in..(o + 1) * n_in],
                    &x[b * n_in..(b + 1) * n_in],
                );
                worst = worst.max((g - v).abs() as f64 / abs_wx);
            }
        }
        eprintln!(
            "{ty}: GEMM = GEMV in {same} of {} outputs; worst |Δ|/Σ|w·x| {worst:e}",
            batch * n_out
        );
        assert_eq!(p.gemm_matches_gemv(), same == batch * n_out, "{ty}");
        assert!(worst < 1e-6, "{ty}: GEMM and GEMV {worst:e} apart");
    }
}

/// A product over a batch of 7 in the GEMM layout (4 rows through the GEMM, 3 through the
/// GEMV) lands every output where the row-by-row product puts it; exact for Q4_0.
#[test]
fn gemm_layout_products_match_row_by_row() {
    let (n_in, n_out, batch) = (256, 136, 7);
    let mut rng = Lcg(5);
    let w = weights(&mut rng, n_in, n_out);
    let x = activations(&mut rng, n_in, batch);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_K] {
        let q = ggml::quantize(ty, &w, n_in).unwrap();
        let mut m = Matrix::from_raw(ty, n_in, n_out, &q).unwrap();
        if !m.pack() {
            continue;
        }
        assert!(m.uses_gemm(batch, false) && !m.uses_gemm(3, false));
        assert_eq!(m.uses_gemm(batch, true), ty == GgmlType::Q4_0);
        let arb = m.act_row_bytes();
        let run = |fours: bool| {
            let mut a = vec![0u8; arb * batch];
            m.quantize_acts(&x, batch, fours, &mut a);
            let mut out = vec![f32::NAN; n_out * batch];
            let team = ffnskip::team::Team::new(2).unwrap();
            team.install(|| {
                matmul_group(
                    &[(
                        &m,
                        Acts {
                            data: &a,
                            fours,
                            exact: true,
                        },
                    )],
                    batch,
                    &mut out,
                )
            });
            out
        };
        let (gemm, rows) = (run(true), run(false));
        for (i, (g, r)) in gemm.iter().zip(&rows).enumerate() {
            let (o, b) = (i % n_out, i / n_out);
            if ty == GgmlType::Q4_0 || b >= 4 {
                assert_eq!(g.to_bits(), r.to_bits(), "{ty}: row {o}, activation {b}");
            } else {
                assert!(
                    (g - r).abs() <= 1e-4 * r.abs().max(1.0),
                    "{ty}: row {o}, activation {b}: {g} vs {r}"
                );
            }
        }
    }
}

/// llamafile's tinyBLAS (llama.cpp's kernel for a batch of Q8_0/Q4_0/Q5_0 products) gives,
/// for every activation row, the bits of ggml's `vec_dot` on that row alone: batches through
/// it equal the same rows decoded one at a time. IQ4_NL (where it does not) is declined.
#[test]
fn tinyblas_equals_vec_dot_row_by_row() {
    use ffnskip::ggml::sgemm;
    let (n_in, n_out, batch) = (512, 40, 9);
    let mut rng = Lcg(3);
    let w = weights(&mut rng, n_in, n_out);
    let x = activations(&mut rng, n_in, batch);
    assert!(!sgemm::supports(GgmlType::IQ4_NL));
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0] {
        let q = ggml::quantize(ty, &w, n_in).unwrap();
        let m = Matrix::from_raw(ty, n_in, n_out, &q).unwrap();
        let mut act = vec![0u8; batch * m.act_row_bytes()];
        quantize_rows(m.kernels(), &x, n_in, &mut act);
        let mut tiny = vec![f32::NAN; batch * n_out];
        let taken = sgemm::sgemm(ty, n_in, &q, &act, batch, &mut tiny, n_out);
        assert_eq!(taken, cfg!(target_arch = "x86_64"), "{ty}: tinyBLAS taken");
        if !taken {
            continue;
        }
        let one = product(&m, &x, batch, 1);
        for (i, v) in one.iter().enumerate() {
            let (o, b) = (i % n_out, i / n_out);
            assert_eq!(
                v.to_bits(),
                tiny[i].to_bits(),
                "{ty}: row {o}, activation {b}"
            );
        }
    }
}

/// ggml running one `ggml_mul_mat` itself on this thread (its tiled K-quant GEMM for a batch
/// of ≥ 8 rows, as llama.cpp does for Q6_K/Q5_K/…): close to `vec_dot` row by row, not equal.
#[test]
fn ggml_mul_mat_op_matches_vec_dot_within_summation_noise() {
    use ffnskip::ggml::mul_mat_op;
    let (n_in, n_out, batch) = (512, 48, 9);
    let mut rng = Lcg(21);
    let w = weights(&mut rng, n_in, n_out);
    let x = activations(&mut rng, n_in, batch);
    for ty in [GgmlType::Q6_K, GgmlType::Q5_K, GgmlType::Q4_K] {
        assert!(mul_mat_op::takes(ty, 8) || !cfg!(target_arch = "x86_64"));
        assert!(!mul_mat_op::takes(ty, 7) && !mul_mat_op::takes(GgmlType::Q8_0, 8));
        let q = ggml::quantize(ty, &w, n_in).unwrap();
        let m = Matrix::from_raw(ty, n_in, n_out, &q).unwrap();
        let mut act = vec![0u8; batch * m.act_row_bytes()];
        quantize_rows(m.kernels(), &x, n_in, &mut act);
        let mut op = vec![f32::NAN; batch * n_out];
        assert!(
            mul_mat_op::mul_mat(ty, n_in, &q, &act, batch, &mut op),
            "{ty}"
        );
        let one = product(&m, &x, batch, 1);
        let mut worst = 0f64;
        for (i, v) in one.iter().enumerate() {
            let (o, b) = (i % n_out, i / n_out);
            let (_, abs_wx) = bound(
                m.vec_dot_type(),
                &w[o * n_in..(o + 1) * n_in],
                &x[b * n_in..(b + 1) * n_in],
            );
            worst = worst.max((op[i] - v).abs() as f64 / abs_wx);
        }
        eprintln!("{ty}: ggml's op vs vec_dot, worst |Δ|/Σ|w·x| {worst:e}");
        assert!(worst < 1e-6, "{ty}: {worst:e}");
    }
}

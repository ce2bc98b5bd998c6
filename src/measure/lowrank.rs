//! Low-rank least-squares compensation (the frontier issue, item 4): fit a rank-r linear map
//! from a layer's scale-free FFN input `ĥ = h / rms(h)` to its FFN output on calibration
//! activations, to add in place of the block when it is skipped.
//!
//! Reduced-rank ridge regression (Izenman 1975; Hastie, Tibshirani & Friedman §3.7): with
//! centred rows X, Y `[n, d]`, the ridge solution `W = (XᵀX + λI)⁻¹ XᵀY` `[d, d]`, and V the
//! top-r eigenvectors of the fitted values' covariance `(XW)ᵀ(XW)`, the rank-r map is
//! `W V Vᵀ`. λ is [`RIDGE`] × mean eigenvalue of XᵀX.

use rayon::prelude::*;

use crate::skip::compensation::{FfnMap, RMS_EPS};

/// Ridge strength relative to the mean eigenvalue of XᵀX (trace / d).
pub const RIDGE: f64 = 0.05;
/// Share of a layer's FFN weight bytes the estimate may read (the 2%).
pub const BYTE_BUDGET: f64 = 0.02;
/// Subspace-iteration steps for the top eigenvectors.
const ITERS: usize = 40;

/// The largest rank whose f32 parameters (offset, down, up) stay within [`BYTE_BUDGET`] of
/// `ffn_bytes`.
pub fn rank_for(ffn_bytes: u64, d: usize) -> usize {
    let budget = (BYTE_BUDGET * ffn_bytes as f64) as u64;
    let per = 8 * d as u64;
    (budget.saturating_sub(4 * d as u64) / per.max(1)) as usize
}

/// `ĥ = h / rms(h)`, as [`FfnMap::add_to`] computes it.
pub fn scale_free(h: &[f32], out: &mut [f32]) {
    let ss: f64 = h.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let inv = 1.0 / ((ss / h.len() as f64) as f32 + RMS_EPS).sqrt();
    for (o, &x) in out.iter_mut().zip(h) {
        *o = x * inv;
    }
}

/// Σ a·b in f32 with 16 independent lanes (vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `[p, q]` = A Bᵀ for row-major A `[p, n]` and B `[q, n]`, in f64.
fn a_bt(a: &[f32], b: &[f32], n: usize) -> Vec<f64> {
    let q = b.len() / n;
    let mut out = vec![0f64; a.len() / n * q];
    out.par_chunks_mut(q)
        .zip(a.par_chunks(n))
        .for_each(|(o, ar)| {
            for (v, br) in o.iter_mut().zip(b.chunks_exact(n)) {
                *v = f64::from(dot(ar, br));
            }
        });
    out
}

/// `[cols, rows]` transpose of a row-major `[rows, cols]` matrix.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// In-place Cholesky `A = L Lᵀ` of a symmetric positive-definite `[d, d]` matrix (lower
/// triangle written); `None` when it is not positive definite.
fn cholesky(a: &mut [f64], d: usize) -> Option<()> {
    for j in 0..d {
        let (done, rest) = a.split_at_mut(j * d);
        let row_j = &mut rest[..d];
        for k in 0..j {
            let row_k = &done[k * d..k * d + d];
            let s: f64 = row_j[..k].iter().zip(&row_k[..k]).map(|(x, y)| x * y).sum();
            row_j[k] = (row_j[k] - s) / row_k[k];
        }
        let s: f64 = row_j[..j].iter().map(|x| x * x).sum();
        let diag = row_j[j] - s;
        if diag.is_nan() || diag <= 0.0 {
            return None;
        }
        row_j[j] = diag.sqrt();
    }
    Some(())
}

/// Solves `L Lᵀ W = C` for `C` `[d, m]` in place (L from [`cholesky`]).
fn cholesky_solve(l: &[f64], d: usize, c: &mut [f64], m: usize) {
    // Forward: L Z = C, row by row.
    for i in 0..d {
        let (done, rest) = c.split_at_mut(i * m);
        let row = &mut rest[..m];
        for k in 0..i {
            let f = l[i * d + k];
            if f != 0.0 {
                for (x, &z) in row.iter_mut().zip(&done[k * m..k * m + m]) {
                    *x -= f * z;
                }
            }
        }
        let inv = 1.0 / l[i * d + i];
        row.iter_mut().for_each(|x| *x *= inv);
    }
    // Backward: Lᵀ W = Z.
    for i in (0..d).rev() {
        let (head, tail) = c.split_at_mut((i + 1) * m);
        let row = &mut head[i * m..];
        for k in i + 1..d {
            let f = l[k * d + i];
            if f != 0.0 {
                for (x, &w) in row.iter_mut().zip(&tail[(k - i - 1) * m..(k - i) * m]) {
                    *x -= f * w;
                }
            }
        }
        let inv = 1.0 / l[i * d + i];
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Top-`r` eigenvectors of a symmetric PSD `[d, d]` matrix by subspace iteration, as the
/// columns of a `[d, r]` row-major matrix.
fn top_eigenvectors(m: &[f64], d: usize, r: usize) -> Vec<f64> {
    // Deterministic start: a fixed pseudo-random matrix (SplitMix64).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut q: Vec<f64> = (0..d * r)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect();
    orthonormalize(&mut q, d, r);
    let mut next = vec![0f64; d * r];
    for _ in 0..ITERS {
        next.par_chunks_mut(r).enumerate().for_each(|(i, out)| {
            out.fill(0.0);
            for (k, &a) in m[i * d..i * d + d].iter().enumerate() {
                for (o, &x) in out.iter_mut().zip(&q[k * r..k * r + r]) {
                    *o += a * x;
                }
            }
        });
        std::mem::swap(&mut q, &mut next);
        orthonormalize(&mut q, d, r);
    }
    q
}

/// Modified Gram–Schmidt on the columns of a `[d, r]` row-major matrix.
fn orthonormalize(q: &mut [f64], d: usize, r: usize) {
    for j in 0..r {
        for k in 0..j {
            let dotkj: f64 = (0..d).map(|i| q[i * r + k] * q[i * r + j]).sum();
            for i in 0..d {
                q[i * r + j] -= dotkj * q[i * r + k];
            }
        }
        let norm = (0..d)
            .map(|i| q[i * r + j] * q[i * r + j])
            .sum::<f64>()
            .sqrt();
        let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        for i in 0..d {
            q[i * r + j] *= inv;
        }
    }
}

/// Fits one layer's map from `n` rows of scale-free inputs `x` and FFN outputs `y` (both
/// `[n, d]`) at `rank`. Rank 0, or too few rows, gives the mean.
pub fn fit(x: &[f32], y: &[f32], d: usize, rank: usize) -> FfnMap {
    let n = y.len() / d.max(1);
    let mean = |m: &[f32]| -> Vec<f32> {
        let mut s = vec![0f64; d];
        for row in m.chunks_exact(d) {
            for (a, &v) in s.iter_mut().zip(row) {
                *a += f64::from(v);
            }
        }
        s.iter().map(|&v| (v / n.max(1) as f64) as f32).collect()
    };
    let (mx, my) = (mean(x), mean(y));
    let rank = rank.min(d);
    if rank == 0 || n < 2 || x.len() != y.len() {
        return FfnMap::mean(my);
    }
    let centred = |m: &[f32], mu: &[f32]| -> Vec<f32> {
        let mut c = m.to_vec();
        for row in c.chunks_exact_mut(d) {
            for (v, &u) in row.iter_mut().zip(mu) {
                *v -= u;
            }
        }
        transpose(&c, n, d)
    };
    let (xt, yt) = (centred(x, &mx), centred(y, &my)); // [d, n]
    let mut g = a_bt(&xt, &xt, n); // XᵀX [d, d]
    let mut w = a_bt(&xt, &yt, n); // XᵀY [d_in, d_out]
    let lambda = RIDGE * (0..d).map(|i| g[i * d + i]).sum::<f64>() / d as f64;
    let lambda = lambda.max(1e-12);
    for i in 0..d {
        g[i * d + i] += lambda;
    }
    let xty = w.clone();
    if cholesky(&mut g, d).is_none() {
        return FfnMap::mean(my);
    }
    cholesky_solve(&g, d, &mut w, d);
    // (XW)ᵀ(XW) = Wᵀ (XᵀX) W = Wᵀ (XᵀY − λW), since (XᵀX + λI) W = XᵀY. [d_out, d_out]
    let gw: Vec<f64> = xty.iter().zip(&w).map(|(c, w)| c - lambda * w).collect();
    let wt: Vec<f64> = (0..d * d).map(|i| w[(i % d) * d + i / d]).collect();
    let cov = matmul(&wt, &gw, d, d, d);
    let v = top_eigenvectors(&cov, d, rank); // [d_out, r]
    let wv = matmul(&w, &v, d, d, rank); // [d_in, r]
    let mut down = vec![0f32; rank * d];
    let mut up = vec![0f32; rank * d];
    for i in 0..d {
        for j in 0..rank {
            down[j * d + i] = wv[i * rank + j] as f32;
            up[j * d + i] = v[i * rank + j] as f32;
        }
    }
    // offset = ȳ − upᵀ (down x̄).
    let mut offset = my;
    for j in 0..rank {
        let z = dot(&down[j * d..(j + 1) * d], &mx);
        for (o, &u) in offset.iter_mut().zip(&up[j * d..(j + 1) * d]) {
            *o -= z * u;
        }
    }
    FfnMap { offset, down, up }
}

/// `[p, m]` = A `[p, k]` · B `[k, m]`, row-major f64.
fn matmul(a: &[f64], b: &[f64], p: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0f64; p * m];
    out.par_chunks_mut(m).enumerate().for_each(|(i, o)| {
        for (kk, &av) in a[i * k..(i + 1) * k].iter().enumerate() {
            if av != 0.0 {
                for (x, &bv) in o.iter_mut().zip(&b[kk * m..(kk + 1) * m]) {
                    *x += av * bv;
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// y = M x̂ + c with M of rank 2: the rank-2 fit recovers it (up to the ridge shrinkage).
    #[test]
    fn recovers_a_rank_two_map() {
        let (d, n) = (8, 400);
        let mut state = 1u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        let u: Vec<f32> = (0..2 * d).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..2 * d).map(|_| rnd()).collect();
        let c: Vec<f32> = (0..d).map(|_| rnd()).collect();
        let truth = |xh: &[f32]| -> Vec<f32> {
            let z: Vec<f32> = (0..2).map(|j| dot(&v[j * d..(j + 1) * d], xh)).collect();
            (0..d)
                .map(|i| c[i] + z[0] * u[i] + z[1] * u[d + i])
                .collect()
        };
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let h: Vec<f32> = (0..d).map(|_| rnd() * 4.0).collect();
            let mut xh = vec![0f32; d];
            scale_free(&h, &mut xh);
            ys.extend(truth(&xh));
            xs.extend(xh);
        }
        let m = fit(&xs, &ys, d, 2);
        assert_eq!(m.rank(), 2);
        let h: Vec<f32> = (0..d).map(|i| i as f32 - 3.5).collect();
        let mut xh = vec![0f32; d];
        scale_free(&h, &mut xh);
        let want = truth(&xh);
        let mut got = h.clone();
        m.add_to(&mut got, &mut Vec::new());
        let err: f32 = got
            .iter()
            .zip(&h)
            .zip(&want)
            .map(|((g, h), w)| (g - h - w).abs())
            .sum();
        let scale: f32 = want.iter().map(|w| w.abs()).sum();
        assert!(
            err / scale < 0.1,
            "relative error {} ({got:?} vs {want:?})",
            err / scale
        );
        // Rank 0 (or no inputs) is the mean of the outputs.
        let mean = fit(&[], &ys, d, 0);
        assert_eq!(mean.rank(), 0);
        let want: f32 = ys.iter().step_by(d).sum::<f32>() / n as f32;
        assert!(
            (mean.offset[0] - want).abs() < 1e-5,
            "{} vs {want}",
            mean.offset[0]
        );
    }

    #[test]
    fn rank_follows_the_byte_budget() {
        // 1.66 MB of FFN at n_embd 576: 2% = 33,177 bytes → (33,177 − 2,304) / 4,608 = 6.
        assert_eq!(rank_for(1_658_880, 576), 6);
        assert_eq!(rank_for(1000, 576), 0);
    }
}

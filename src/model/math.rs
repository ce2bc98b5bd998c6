//! Element-wise math written so LLVM vectorises it (no libm calls in hot loops).

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a high part exact in f32 and a low correction (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// e^x with ≤ 2 ulp-ish relative error (≈1e-7) on [-87, 88]; inputs below saturate to
/// ~1e-38 rather than 0, which is harmless for softmax and SiLU.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    // Taylor polynomial of e^r for |r| ≤ ln2/2, Horner form; truncation error r^8/8! < 2e-9.
    let mut p: f32 = 1.0 / 5040.0;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `gate[i] = silu(gate[i]) * up[i]` (SwiGLU).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let (a, b) = (super::exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "max relative error {worst}");
        assert_eq!(super::exp(0.0), 1.0);
    }
}

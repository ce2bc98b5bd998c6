//! What the forward pass adds in place of a skipped FFN block: nothing (the paper), the
//! layer's mean FFN output, or a low-rank linear map of the block's input fitted by least
//! squares on calibration activations. All are training-free and come from `calibrate`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compensation {
    /// Nothing is added (the paper's rule).
    #[default]
    None,
    /// The layer's mean FFN output over the calibration tokens.
    Mean,
    /// `offset + up · (down · ĥ)` with `ĥ = h / rms(h)`: a rank-r least-squares fit.
    Lowrank,
}

impl Compensation {
    pub const ALL: [Compensation; 3] = [
        Compensation::None,
        Compensation::Mean,
        Compensation::Lowrank,
    ];

    /// The policy-label suffix: `""`, `"+mean"`, `"+lowrank"`.
    pub fn suffix(self) -> &'static str {
        match self {
            Compensation::None => "",
            Compensation::Mean => "+mean",
            Compensation::Lowrank => "+lowrank",
        }
    }

    /// The flag value: `none`, `mean`, `lowrank`.
    pub fn name(self) -> &'static str {
        match self {
            Compensation::None => "none",
            Compensation::Mean => "mean",
            Compensation::Lowrank => "lowrank",
        }
    }

    pub fn parse(s: &str) -> Option<Compensation> {
        Compensation::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// `ĥ = h / rms(h)`: the scale-free FFN input the low-rank map reads (ffn_norm without its
/// per-channel weight, which the fitted map absorbs).
pub const RMS_EPS: f32 = 1e-6;

/// One layer's estimate of its FFN output `[n_embd]` from the block input `h` (`ffn_inp`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FfnMap {
    /// `[n_embd]`: added as is (the mean output, or the centred fit's intercept).
    pub offset: Vec<f32>,
    /// `[rank, n_embd]`, row j is the j-th input direction (empty for the mean).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<f32>,
    /// `[rank, n_embd]`, row j is the j-th output direction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub up: Vec<f32>,
}

impl FfnMap {
    pub fn mean(offset: Vec<f32>) -> Self {
        FfnMap {
            offset,
            down: Vec::new(),
            up: Vec::new(),
        }
    }

    pub fn rank(&self) -> usize {
        self.down.len().checked_div(self.offset.len()).unwrap_or(0)
    }

    /// Bytes of f32 parameters the estimate reads per skipped block.
    pub fn bytes(&self) -> u64 {
        4 * (self.offset.len() + self.down.len() + self.up.len()) as u64
    }

    /// `h += offset + upᵀ (down ĥ)`; `z` is scratch of at least `rank` values.
    pub fn add_to(&self, h: &mut [f32], z: &mut Vec<f32>) {
        let d = self.offset.len();
        let r = self.rank();
        if r > 0 {
            let ss: f64 = h.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let inv = 1.0 / ((ss / d as f64) as f32 + RMS_EPS).sqrt();
            z.clear();
            z.extend(
                self.down
                    .chunks_exact(d)
                    .map(|row| inv * row.iter().zip(h.iter()).map(|(a, b)| a * b).sum::<f32>()),
            );
        }
        for (x, &o) in h.iter_mut().zip(&self.offset) {
            *x += o;
        }
        for (row, &zj) in self.up.chunks_exact(d).zip(z.iter()).take(r) {
            for (x, &u) in h.iter_mut().zip(row) {
                *x += zj * u;
            }
        }
    }

    /// Structural check against `n_embd`; the message names what is wrong.
    pub fn validate(&self, n_embd: usize) -> Result<(), String> {
        if self.offset.len() != n_embd {
            return Err(format!(
                "offset has {} values, expected n_embd = {n_embd}",
                self.offset.len()
            ));
        }
        if self.down.len() != self.up.len() || !self.down.len().is_multiple_of(n_embd.max(1)) {
            return Err(format!(
                "down has {} and up {} values, expected equal multiples of n_embd = {n_embd}",
                self.down.len(),
                self.up.len()
            ));
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !(finite(&self.offset) && finite(&self.down) && finite(&self.up)) {
            return Err("holds a non-finite value".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_two_map_by_hand() {
        // n_embd 2, h = (3, 4): rms = sqrt(12.5), ĥ = h / 3.5355.
        let m = FfnMap {
            offset: vec![1.0, -1.0],
            down: vec![1.0, 0.0, 0.0, 1.0],
            up: vec![2.0, 0.0, 0.0, 0.5],
        };
        assert_eq!(m.rank(), 2);
        let mut h = [3.0f32, 4.0];
        m.add_to(&mut h, &mut Vec::new());
        let s = 1.0 / (12.5f32 + RMS_EPS).sqrt();
        assert!((h[0] - (3.0 + 1.0 + 2.0 * 3.0 * s)).abs() < 1e-5, "{h:?}");
        assert!((h[1] - (4.0 - 1.0 + 0.5 * 4.0 * s)).abs() < 1e-5, "{h:?}");
        let mean = FfnMap::mean(vec![0.5, 0.25]);
        let mut h = [3.0f32, 4.0];
        mean.add_to(&mut h, &mut Vec::new());
        assert_eq!(h, [3.5, 4.25]);
        assert_eq!(m.validate(2), Ok(()));
        assert!(m
            .validate(3)
            .unwrap_err()
            .starts_with("offset has 2 values"));
    }
}

//! Policies and their parameters: what the user asked for ([`SkipOptions`]) resolved against
//! the model and its calibration profile into what the controller runs ([`SkipParams`]).

use serde::{Deserialize, Serialize};

use super::compensation::{Compensation, FfnMap};
use super::{KldPoint, Profile, Schedule};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Every FFN runs (the full model).
    None,
    /// FFN-SkipLLM: after a layer whose cos(h, h+ffn) reaches the threshold, skip the next k
    /// FFN blocks (non-cold region, after warm-up).
    Adaptive,
    /// k FFN blocks per token chosen uniformly at random among all layers.
    Random,
    /// The paper's non-adaptive baseline: a random contiguous block of k FFN blocks inside
    /// the non-cold region.
    Static,
    /// ShortGPT: the layers with the lowest Block Influence removed entirely.
    Shortgpt,
    /// SkipDecode/CALM-style early exit after layer n_layer − k, later layers' K/V from the
    /// exited state.
    EarlyExit,
    /// Damage-aware placement: each skipping token skips the FFN of the contiguous run of k
    /// non-cold layers whose summed calibrated single-layer KL divergence
    /// (`Profile::ffn_damage`) is lowest.
    Placed,
    /// FFN-SkipLLM's greedy run with a per-layer threshold: a layer's calibrated median
    /// cos(h, h+ffn) instead of one global threshold.
    AdaptiveLayer,
    /// The recommended rule (`best` is the same): the low-rank compensation with FFN-SkipLLM's
    /// adaptive rule or `placed`, whichever the profile's KLD curve measured lower at the
    /// ratio; with `--max-kld` the largest ratio of either within budget (docs/RESULTS.md).
    #[value(alias = "best")]
    Auto,
}

impl Policy {
    /// Every policy, the reference (`none`) first.
    pub const ALL: [Policy; 9] = [
        Policy::None,
        Policy::Adaptive,
        Policy::Random,
        Policy::Static,
        Policy::Shortgpt,
        Policy::EarlyExit,
        Policy::Placed,
        Policy::AdaptiveLayer,
        Policy::Auto,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Adaptive => "adaptive",
            Policy::Random => "random",
            Policy::Static => "static",
            Policy::Shortgpt => "shortgpt",
            Policy::EarlyExit => "early-exit",
            Policy::Placed => "placed",
            Policy::AdaptiveLayer => "adaptive-layer",
            Policy::Auto => "auto",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        if s == "best" {
            return Some(Policy::Auto);
        }
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Policies that skip FFN blocks only (what a compensation can stand in for).
    pub fn skips_ffn_only(self) -> bool {
        matches!(
            self,
            Policy::Adaptive
                | Policy::Random
                | Policy::Static
                | Policy::Placed
                | Policy::AdaptiveLayer
                | Policy::Auto
        )
    }

    /// The greedy cosine-triggered run (FFN-SkipLLM and its per-layer variant).
    pub fn is_adaptive(self) -> bool {
        matches!(self, Policy::Adaptive | Policy::AdaptiveLayer)
    }
}

/// What the user asked for; `None` fields are filled from the profile or the defaults.
#[derive(Clone, Debug)]
pub struct SkipOptions {
    pub policy: Policy,
    /// Target share of FFN blocks skipped per generated token.
    pub ratio: Option<f64>,
    pub threshold: Option<f32>,
    pub warmup: Option<usize>,
    pub cold_start: Option<usize>,
    pub cold_end: Option<usize>,
    pub full_every: Option<usize>,
    pub seed: u64,
    /// What is added in place of a skipped FFN (`auto`: low-rank when the profile has it).
    pub compensate: Compensation,
    /// Quality budget: the ratio (and compensation) come from the profile's KLD curve for the
    /// policy — the largest calibrated ratio whose mean KLD stays within this many nats.
    pub max_kld: Option<f64>,
}

impl SkipOptions {
    pub fn none() -> Self {
        SkipOptions::new(Policy::None)
    }

    pub fn new(policy: Policy) -> Self {
        SkipOptions {
            policy,
            ratio: None,
            threshold: None,
            warmup: None,
            cold_start: None,
            cold_end: None,
            full_every: None,
            seed: 0,
            compensate: Compensation::None,
            max_kld: None,
        }
    }
}

/// Why [`SkipOptions`] cannot run on a model. Messages name the option fields; the layer that
/// knows where an option came from (a flag, a request field) phrases it for the user.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ParamsError {
    #[error("ratio {0} is out of range (expected 0..1)")]
    RatioOutOfRange(f64),
    #[error("threshold is NaN")]
    ThresholdNan,
    #[error("cold_start {cold_start} + cold_end {cold_end} exceed the model's {n_layer} layers")]
    ColdRegionsTooLarge {
        cold_start: usize,
        cold_end: usize,
        n_layer: usize,
    },
    /// `full_every = 1` would run every token in full.
    #[error("full_every 1 would run every token in full (use 0 for never, or ≥ 2)")]
    FullEveryOne,
    #[error("the skip profile from {from} is for {profile} layers but the model has {model}")]
    ProfileLayers {
        from: String,
        profile: usize,
        model: usize,
    },
    /// ShortGPT ranks layers by Block Influence, which only a calibration profile has.
    #[error("policy {} ranks layers by Block Influence and needs a calibration profile", .0.name())]
    NeedsProfile(Policy),
    /// Compensation adds what calibration fitted, which older profiles lack.
    #[error("compensation {} needs a calibration profile with {}", .0.name(), compensation_field(*.0))]
    NeedsCompensation(Compensation),
    /// A quality budget needs the profile's KLD curve for the policy.
    #[error("max_kld needs a calibration profile whose kld_curve measures policy {}", .0.name())]
    NeedsKldCurve(Policy),
    /// Compensation stands in for a skipped FFN block; these policies skip whole layers.
    #[error("compensation applies to policies that skip FFN blocks only, not {}", .0.name())]
    CompensationPolicy(Policy),
    #[error("max_kld {0} is not a number ≥ 0")]
    MaxKldInvalid(f64),
}

/// The profile field a compensation reads.
pub fn compensation_field(c: Compensation) -> &'static str {
    match c {
        Compensation::None => "nothing",
        Compensation::Mean => "ffn_mean",
        Compensation::Lowrank => "ffn_lowrank",
    }
}

/// For each run length k in `0..=n_layer`: the start of the run of k layers inside
/// `lo..hi` with the least summed `damage` (ties: the earlier run). Runs longer than the
/// region start at `lo` and are cut at `hi`.
pub fn least_damage_runs(damage: &[f32], lo: usize, hi: usize) -> Vec<usize> {
    let n = damage.len();
    let mut prefix = vec![0f64; n + 1];
    for (i, &d) in damage.iter().enumerate() {
        prefix[i + 1] = prefix[i] + f64::from(d);
    }
    (0..=n)
        .map(|k| {
            if k == 0 || lo + k > hi {
                return lo;
            }
            (lo..=hi - k)
                .min_by(|&a, &b| {
                    (prefix[a + k] - prefix[a])
                        .total_cmp(&(prefix[b + k] - prefix[b]))
                        .then(a.cmp(&b))
                })
                .unwrap_or(lo)
        })
        .collect()
}

/// Default target ratio when no ratio is given.
pub const DEFAULT_RATIO: f64 = 0.25;
/// The authors' cosine threshold (`model_ffn_cosine.py`).
pub const DEFAULT_THRESHOLD: f32 = 0.95;
/// Generated tokens run in full: the authors' `max_seq_len // 64` at their 512-token length.
pub const DEFAULT_WARMUP: usize = 8;

/// What the controller runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SkipParams {
    pub policy: Policy,
    pub n_layer: usize,
    /// Target ratio (0 for `none`).
    pub ratio: f64,
    pub threshold: f32,
    pub cold_start: usize,
    pub cold_end: usize,
    pub schedule: Schedule,
    /// ShortGPT's removed layers, ascending.
    pub removed: Vec<usize>,
    pub seed: u64,
    /// Where the parameters came from, for the user.
    pub source: String,
    /// Per layer: added to a row whose FFN is skipped (empty: nothing added).
    pub ffn_estimate: Vec<FfnMap>,
    pub compensation: Compensation,
    /// `placed`, indexed by a token's budget k: the first layer of the contiguous run of k
    /// layers inside the non-cold region whose summed calibrated damage is least.
    pub ranked: Vec<usize>,
    /// `adaptive-layer`: per-layer threshold on the previous layer's cosine (empty: global).
    pub layer_threshold: Vec<f32>,
}

impl SkipParams {
    /// The full model.
    pub fn none(n_layer: usize) -> Self {
        SkipParams {
            policy: Policy::None,
            n_layer,
            ratio: 0.0,
            threshold: f32::INFINITY,
            cold_start: 0,
            cold_end: 0,
            schedule: Schedule {
                warmup: 0,
                k: 0.0,
                full_every: 0,
            },
            removed: Vec::new(),
            seed: 0,
            source: "full model".into(),
            ffn_estimate: Vec::new(),
            compensation: Compensation::None,
            ranked: Vec::new(),
            layer_threshold: Vec::new(),
        }
    }

    /// Resolves `opts` for a model of `n_layer` layers with an optional calibration profile
    /// (`profile_from` names where it came from). Explicit options win over the profile,
    /// which wins over the paper's defaults.
    pub fn resolve(
        opts: &SkipOptions,
        n_layer: usize,
        profile: Option<(&Profile, &str)>,
    ) -> Result<SkipParams, ParamsError> {
        if opts.policy == Policy::None {
            return Ok(SkipParams::none(n_layer));
        }
        // `auto`: the recommended rule, the low-rank compensation with whichever of `adaptive`
        // and `placed` the profile's KLD curve measured lower (adaptive without a curve).
        let auto = opts.policy == Policy::Auto;
        let (mut policy, mut compensate) = match opts.policy {
            Policy::Auto => {
                if !profile.is_some_and(|(p, _)| p.has(Compensation::Lowrank)) {
                    return Err(ParamsError::NeedsProfile(Policy::Auto));
                }
                let c = match opts.compensate {
                    Compensation::None => Compensation::Lowrank,
                    c => c,
                };
                (Policy::Adaptive, c)
            }
            p => (p, opts.compensate),
        };
        // The curve points a choice may read: for `auto`, the low-rank series of both rules.
        let asked = policy;
        let eligible = |k: &KldPoint, p: &Profile| {
            p.has(k.compensation)
                && if auto {
                    k.compensation == Compensation::Lowrank
                        && (k.policy == Policy::Adaptive
                            || (k.policy == Policy::Placed && !p.ffn_damage.is_empty()))
                } else {
                    k.policy == asked
                }
        };
        let mut budget_note = None;
        let mut ratio = opts.ratio.unwrap_or(DEFAULT_RATIO);
        if let (true, None, Some((p, _))) = (auto, opts.max_kld, profile) {
            let nearest = p
                .kld_curve
                .iter()
                .filter(|k| eligible(k, p))
                .map(|k| (k.ratio - ratio).abs())
                .min_by(f64::total_cmp);
            let best = nearest.and_then(|d| {
                p.kld_curve
                    .iter()
                    .filter(|k| eligible(k, p) && (k.ratio - ratio).abs() == d)
                    .min_by(|a, b| a.kld_mean.total_cmp(&b.kld_mean))
            });
            if let Some(k) = best {
                policy = k.policy;
                budget_note = Some(format!(
                    "; auto: {}+lowrank, the rule with the lower calibrated KLD at {}% ({:.4})",
                    k.policy.name(),
                    k.ratio * 100.0,
                    k.kld_mean
                ));
            }
        }
        // A quality budget picks the ratio and compensation from the profile's KLD curve.
        if let Some(x) = opts.max_kld {
            if !(x.is_finite() && x >= 0.0) {
                return Err(ParamsError::MaxKldInvalid(x));
            }
            let p = match profile {
                Some((p, _)) if p.kld_curve.iter().any(|k| eligible(k, p)) => p,
                _ => return Err(ParamsError::NeedsKldCurve(opts.policy)),
            };
            // The largest ratio within budget; at equal ratio the lower KLD.
            let best = p
                .kld_curve
                .iter()
                .filter(|k| eligible(k, p) && k.kld_mean <= x)
                .max_by(|a, b| {
                    a.ratio
                        .total_cmp(&b.ratio)
                        .then(b.kld_mean.total_cmp(&a.kld_mean))
                });
            match best {
                Some(k) => {
                    ratio = k.ratio;
                    compensate = k.compensation;
                    policy = k.policy;
                    budget_note = Some(format!(
                        "; --max-kld {x}: {}{} at ratio {} (calibrated KLD {:.4})",
                        k.policy.name(),
                        k.compensation.suffix(),
                        k.ratio,
                        k.kld_mean
                    ));
                }
                None => {
                    return Ok(SkipParams {
                        source: format!(
                            "--max-kld {x}: no calibrated ratio stays within it, nothing is skipped"
                        ),
                        ..SkipParams::none(n_layer)
                    });
                }
            }
        }
        if !(ratio.is_finite() && (0.0..=1.0).contains(&ratio)) {
            return Err(ParamsError::RatioOutOfRange(ratio));
        }
        if let Some((p, from)) = profile {
            if p.n_layer != n_layer {
                return Err(ParamsError::ProfileLayers {
                    from: from.to_string(),
                    profile: p.n_layer,
                    model: n_layer,
                });
            }
        }
        if opts.threshold.is_some_and(f32::is_nan) {
            return Err(ParamsError::ThresholdNan);
        }
        // Cold regions: the authors keep 5 + 5 of 32/40 layers; scaled to this depth.
        let paper_cold = ((5.0 * n_layer as f64 / 32.0).round() as usize).max(1);
        let (mut cold_start, mut cold_end) = match profile {
            Some((p, _)) => (p.cold_start, p.cold_end),
            None => (paper_cold.min(n_layer / 2), paper_cold.min(n_layer / 2)),
        };
        cold_start = opts.cold_start.unwrap_or(cold_start);
        cold_end = opts.cold_end.unwrap_or(cold_end);
        if cold_start + cold_end > n_layer {
            return Err(ParamsError::ColdRegionsTooLarge {
                cold_start,
                cold_end,
                n_layer,
            });
        }
        let warmup = opts.warmup.unwrap_or(DEFAULT_WARMUP);
        let full_every = opts
            .full_every
            .or(profile.map(|(p, _)| p.full_every))
            .unwrap_or(0);
        if full_every == 1 {
            return Err(ParamsError::FullEveryOne);
        }
        let mut schedule = Schedule::for_ratio(ratio, n_layer, warmup, full_every);
        let mut threshold = DEFAULT_THRESHOLD;
        let mut removed = Vec::new();
        let mut ranked = Vec::new();
        let mut layer_threshold = Vec::new();
        let mut source;
        match (policy, profile) {
            (Policy::Adaptive | Policy::AdaptiveLayer, Some((p, from))) => match p.nearest(ratio) {
                Some(s) if s.ratio > 0.0 => {
                    threshold = s.threshold;
                    // The suggestion's budget realizes its ratio; scale to the target.
                    schedule.k = (s.k * ratio / s.ratio).min(n_layer as f64);
                    source = format!(
                        "calibration profile from {from} ({} tokens; nearest suggestion at {:.0}%)",
                        p.tokens,
                        s.ratio * 100.0
                    );
                }
                _ => {
                    source = format!(
                        "calibration profile from {from} (cold regions only; threshold and k from the paper's defaults)"
                    )
                }
            },
            (Policy::Shortgpt, Some((p, from))) => {
                let n = (ratio * n_layer as f64).round() as usize;
                let mut order: Vec<usize> = (0..n_layer).collect();
                order.sort_by(|&a, &b| {
                    p.block_influence[a]
                        .total_cmp(&p.block_influence[b])
                        .then(a.cmp(&b))
                });
                removed = order[..n.min(n_layer)].to_vec();
                removed.sort_unstable();
                source = format!(
                    "Block Influence from the calibration profile in {from} ({} tokens)",
                    p.tokens
                );
            }
            (Policy::Placed, Some((p, from))) if !p.ffn_damage.is_empty() => {
                ranked = least_damage_runs(&p.ffn_damage, cold_start, n_layer - cold_end);
                source = format!(
                    "per-layer damage from the calibration profile in {from} ({} tokens)",
                    p.tokens
                );
            }
            (Policy::Shortgpt | Policy::Placed | Policy::AdaptiveLayer, _) => {
                return Err(ParamsError::NeedsProfile(policy))
            }
            (_, Some((p, from))) => {
                source = format!("cold regions from the calibration profile in {from} ({} tokens)", p.tokens)
            }
            (_, None) => {
                source = format!(
                    "paper defaults: cold regions {cold_start}+{cold_end} (5+5 of 32 layers scaled to {n_layer}), threshold {DEFAULT_THRESHOLD}, k from the ratio"
                )
            }
        }
        if let (Policy::AdaptiveLayer, Some((p, _))) = (policy, profile) {
            layer_threshold = p.ffn_cos.iter().map(|s| s.p50).collect();
            source.push_str("; per-layer thresholds: each layer's median cosine");
        }
        if let Some(t) = opts.threshold {
            threshold = t;
        }
        if let Some(n) = budget_note {
            source.push_str(&n);
        }
        if compensate != Compensation::None && !policy.skips_ffn_only() {
            return Err(ParamsError::CompensationPolicy(policy));
        }
        let ffn_estimate = match (compensate, profile) {
            (Compensation::None, _) => Vec::new(),
            (Compensation::Mean, Some((p, _))) if p.has(compensate) => {
                p.ffn_mean.iter().cloned().map(FfnMap::mean).collect()
            }
            (Compensation::Lowrank, Some((p, _))) if p.has(compensate) => p.ffn_lowrank.clone(),
            (c, _) => return Err(ParamsError::NeedsCompensation(c)),
        };
        Ok(SkipParams {
            policy,
            n_layer,
            ratio,
            threshold,
            cold_start,
            cold_end,
            schedule,
            removed,
            seed: opts.seed,
            source,
            ffn_estimate,
            compensation: compensate,
            ranked,
            layer_threshold,
        })
    }

    /// One line for the user: the policy and its parameters.
    pub fn describe(&self) -> String {
        let s = &self.schedule;
        let base = format!(
            "skip: {}{} at target {:.0}%",
            self.policy.name(),
            self.compensation.suffix(),
            self.ratio * 100.0
        );
        match self.policy {
            Policy::None => "skip: none (full model)".into(),
            Policy::Shortgpt => format!(
                "{base}: layers {:?} removed — {}",
                self.removed, self.source
            ),
            Policy::Placed => format!(
                "{base}: k {:.2}/token, the run starting at layer {} (least calibrated damage), cold {}+{}, warm-up {} — {}",
                s.k,
                self.ranked.get(s.k.ceil() as usize).copied().unwrap_or(0),
                self.cold_start,
                self.cold_end,
                s.warmup,
                self.source
            ),
            Policy::Adaptive | Policy::AdaptiveLayer => format!(
                "{base}: threshold {}, k {:.2}/token, cold {}+{}, warm-up {}, full every {} — {}",
                self.threshold,
                s.k,
                self.cold_start,
                self.cold_end,
                s.warmup,
                s.full_every,
                self.source
            ),
            _ => format!(
                "{base}: k {:.2}/token, cold {}+{}, warm-up {}, seed {} — {}",
                s.k, self.cold_start, self.cold_end, s.warmup, self.seed, self.source
            ),
        }
    }
}

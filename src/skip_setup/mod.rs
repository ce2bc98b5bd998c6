//! Building a skip controller: the one place where the options a user asked for
//! ([`SkipOptions`]), a calibration profile (a JSON file or the one embedded in the GGUF) and
//! the model (layer count, weight bytes) meet. `generate`/`chat`, `bench` and `eval` all build
//! their controllers here. It sits above `skip` (policies, no files) and `model`.

pub mod profile_file;

use std::path::Path;

use crate::gguf::GgufFile;
use crate::model::Llama;
use crate::skip::{ParamsError, Policy, Profile, SkipController, SkipOptions, SkipParams};

/// A calibration profile with where it came from (for messages).
#[derive(Clone, Debug)]
pub struct SourcedProfile {
    pub profile: Profile,
    /// The JSON file's path, or `MODEL.gguf (embedded)`.
    pub from: String,
}

/// A controller ready to run and the one line that tells the user what it runs.
pub struct SkipSetup {
    pub controller: SkipController,
    /// [`SkipParams::describe`]: policy, parameters and where they came from.
    pub description: String,
}

/// The profile from the JSON file at `json`, else the one embedded in `file` (`None` when
/// `json` is `None` and the file carries none).
pub fn load_profile(
    json: Option<&Path>,
    file: &GgufFile,
) -> anyhow::Result<Option<SourcedProfile>> {
    Ok(match json {
        Some(p) => Some(SourcedProfile {
            profile: profile_file::load_json(p)?,
            from: p.display().to_string(),
        }),
        None => profile_file::from_gguf(file)?.map(|profile| SourcedProfile {
            profile,
            from: format!("{} (embedded)", file.path().display()),
        }),
    })
}

/// Resolves `opts` against `model` and an already loaded profile (callers that build many
/// controllers from one profile load it once with [`load_profile`]).
pub fn build(
    opts: &SkipOptions,
    profile: Option<&SourcedProfile>,
    model: &Llama<'_>,
) -> anyhow::Result<SkipSetup> {
    let params = SkipParams::resolve(
        opts,
        model.config.n_layer,
        profile.map(|p| (&p.profile, p.from.as_str())),
    )
    .map_err(|e| anyhow::anyhow!(flag_message(&e)))?;
    let description = params.describe();
    Ok(SkipSetup {
        controller: SkipController::new(params, model.layer_bytes()),
        description,
    })
}

/// [`build`] with the profile from `json`, else the one embedded in `file`; policy `none`
/// reads no profile.
pub fn controller(
    opts: &SkipOptions,
    json: Option<&Path>,
    model: &Llama<'_>,
    file: &GgufFile,
) -> anyhow::Result<SkipSetup> {
    let profile = match opts.policy {
        Policy::None => None,
        _ => load_profile(json, file)?,
    };
    build(opts, profile.as_ref(), model)
}

/// `e` phrased with the command-line flags that set each option (`generate`, `chat`, `bench`
/// and `eval` share them).
pub fn flag_message(e: &ParamsError) -> String {
    match e {
        ParamsError::RatioOutOfRange(r) => format!("--skip-ratio {r} is out of range (expected 0..1)"),
        ParamsError::ThresholdNan => "--threshold is NaN".into(),
        ParamsError::ColdRegionsTooLarge {
            cold_start,
            cold_end,
            n_layer,
        } => format!(
            "--cold-start {cold_start} + --cold-end {cold_end} exceed the model's {n_layer} layers"
        ),
        ParamsError::FullEveryOne => {
            "--full-every 1 would run every token in full (use 0 for never, or ≥ 2)".into()
        }
        ParamsError::NeedsProfile(p) => format!(
            "--skip {} {} and needs a calibration profile: \
             run `ffnskip calibrate -m MODEL` and pass --skip-profile PROFILE.json (or embed it with --embed)",
            p.name(),
            match p {
                Policy::Shortgpt => "ranks layers by Block Influence",
                Policy::AdaptiveLayer => "reads each layer's median cosine",
                Policy::Auto => "adds the calibrated low-rank FFN estimate (ffn_lowrank, from this version)",
                _ => "ranks layers by their calibrated damage (ffn_damage, from this version)",
            }
        ),
        ParamsError::ProfileLayers { .. } => e.to_string(),
        ParamsError::NeedsKldCurve(p) => format!(
            "--max-kld picks the ratio from the KL divergence curve of a calibration profile, \
             which has none for --skip {}: use --skip auto (or adaptive, placed) with a profile \
             from this version's `ffnskip calibrate -m MODEL` (--skip-profile PROFILE.json, or \
             embedded with --embed)",
            p.name()
        ),
        ParamsError::MaxKldInvalid(x) => format!("--max-kld {x}: expected a number of nats ≥ 0"),
        ParamsError::NeedsCompensation(c) => format!(
            "--compensate {} (or --skip …{}) adds what calibration fitted ({}), which this \
             profile lacks: rerun `ffnskip calibrate -m MODEL` and pass --skip-profile \
             PROFILE.json (or embed it with --embed)",
            c.name(),
            c.suffix(),
            crate::skip::params::compensation_field(*c)
        ),
        ParamsError::CompensationPolicy(p) => format!(
            "--compensate applies to policies that skip FFN blocks only (adaptive, \
             adaptive-layer, placed, auto, random, static), not {}",
            p.name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(policy: Policy, ratio: f64) -> SkipOptions {
        SkipOptions {
            ratio: Some(ratio),
            ..SkipOptions::new(policy)
        }
    }

    fn message(o: &SkipOptions) -> String {
        flag_message(&SkipParams::resolve(o, 30, None).unwrap_err())
    }

    #[test]
    fn option_errors_are_phrased_with_their_flags() {
        assert_eq!(
            message(&opts(Policy::Adaptive, 1.5)),
            "--skip-ratio 1.5 is out of range (expected 0..1)"
        );
        let o = SkipOptions {
            cold_start: Some(20),
            cold_end: Some(20),
            ..opts(Policy::Adaptive, 0.2)
        };
        assert_eq!(
            message(&o),
            "--cold-start 20 + --cold-end 20 exceed the model's 30 layers"
        );
        let o = SkipOptions {
            threshold: Some(f32::NAN),
            ..opts(Policy::Static, 0.2)
        };
        assert_eq!(message(&o), "--threshold is NaN");
        let o = SkipOptions {
            full_every: Some(1),
            ..opts(Policy::Random, 0.2)
        };
        assert_eq!(
            message(&o),
            "--full-every 1 would run every token in full (use 0 for never, or ≥ 2)"
        );
        assert!(message(&opts(Policy::Shortgpt, 0.25)).starts_with(
            "--skip shortgpt ranks layers by Block Influence and needs a calibration profile: \
             run `ffnskip calibrate -m MODEL` and pass --skip-profile PROFILE.json"
        ));
    }
}

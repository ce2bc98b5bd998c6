//! `ffnskip calibrate`: measure a model's per-layer similarity profile on calibration text,
//! write it as JSON and as SVG/PNG plots, and optionally embed it in a copy of the GGUF.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::{model_path, open_gguf, ModelArgs};
use crate::measure::calibrate::calibrate;
use crate::measure::plot::{draw_svg_png, outputs, ProfileChart};
use crate::model::Llama;
use crate::outfile::ensure_not_input;
use crate::skip_setup::profile_file;
use crate::tokenizer::Tokenizer;

/// The default calibration text: one wikitext-2 article (CC BY-SA 3.0; provenance in
/// vendor/calibration/PROVENANCE.md).
const DEFAULT_TEXT: &str = include_str!("../../vendor/calibration/wikitext-2-test-the-hustler.txt");
const DEFAULT_TEXT_NAME: &str = "wikitext-2 test, \"The Hustler ( film )\" (built in)";

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text file (default: a wikitext-2 article carried in the binary, see
    /// vendor/calibration/PROVENANCE.md).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens of the text to run.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Profile JSON to write (default: MODEL-STEM.ffnskip-profile.json in the current
    /// directory); the plots go beside it as .svg and .png.
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Also write a copy of the model with the profile embedded as `ffnskip.*` keys.
    #[arg(long)]
    pub embed: Option<PathBuf>,
    /// Every N-th token runs in full in the simulated schedule (0 = never).
    #[arg(long = "full-every", default_value_t = 0)]
    pub full_every: usize,
    /// Print the profile JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: CalibrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.tokens >= 2,
        "--tokens {} is too few (expected ≥ 2)",
        a.tokens
    );
    anyhow::ensure!(
        a.full_every != 1,
        "--full-every 1 would never skip (use 0 or ≥ 2)"
    );
    let path = model_path(&a.model.model)?;
    let stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{stem}.ffnskip-profile.json")));
    let plots = outputs(&out.with_extension(""));
    // Every output is checked against every input before the long measurement.
    let mut inputs: Vec<(&str, &Path)> = vec![("-m/--model", &path)];
    if let Some(t) = &a.text {
        inputs.push(("--text", t));
    }
    for (what, o) in [("-o/--out", &out), ("plot", &plots.0), ("plot", &plots.1)] {
        ensure_not_input(what, o, &inputs)?;
    }
    if let Some(dst) = &a.embed {
        inputs.push(("-o/--out", &out));
        ensure_not_input("--embed", dst, &inputs)?;
    }
    let (text, text_name) = match &a.text {
        Some(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read calibration text --text {}", p.display()))?,
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
        ),
        None => (DEFAULT_TEXT.to_string(), DEFAULT_TEXT_NAME.to_string()),
    };
    let (file, _) = open_gguf(&path)?;
    let model = Llama::load_with(&file, a.model.load.options())?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    // Tokenize a prefix generous enough for `tokens` (≈ 4 characters per token).
    let mut end = text.len().min(a.tokens.saturating_mul(8).max(4096));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut ids = tokenizer.encode(&text[..end], true, false);
    ids.truncate(a.tokens.min(model.config.n_ctx_train));
    anyhow::ensure!(
        ids.len() >= 2,
        "{text_name}: the calibration text gave {} tokens (need ≥ 2)",
        ids.len()
    );
    let source = format!("{text_name} (first {} tokens)", ids.len());
    let threads = a.model.threads();
    eprintln!(
        "calibrating {} on {source} with {threads} threads: similarities, compensation fits, \
         each layer's damage (over {} tokens), then the KL divergence curve (adaptive, \
         adaptive+lowrank and placed+lowrank at {} ratios, over the first {} tokens)…",
        path.display(),
        crate::measure::calibrate::DAMAGE_TOKENS.min(ids.len()),
        crate::measure::calibrate::KLD_RATIOS.len(),
        crate::measure::calibrate::KLD_TOKENS.min(ids.len())
    );
    let t0 = std::time::Instant::now();
    let (profile, _) = calibrate(&model, &ids, threads, &source, a.full_every)?;
    eprintln!("measured in {:.1} s", t0.elapsed().as_secs_f64());

    profile_file::save_json(&profile, &out)?;
    let title = format!("{stem}: FFN similarity profile ({} tokens)", profile.tokens);
    let (svg, png) = draw_svg_png(
        &ProfileChart {
            profile: &profile,
            title,
        },
        &out.with_extension(""),
        (900, 700),
    )?;
    if a.json {
        super::outln(&serde_json::to_string_pretty(&profile)?)?;
    } else {
        super::out(&table(&profile))?;
    }
    eprintln!(
        "wrote {}, {}, {}",
        out.display(),
        svg.display(),
        png.display()
    );
    if let Some(dst) = &a.embed {
        profile_file::embed(&profile, &file, dst)?;
        eprintln!(
            "wrote {} (the model with its profile; `generate --skip adaptive` uses it)",
            dst.display()
        );
    }
    Ok(())
}

/// The profile as a human-readable table.
pub fn table(p: &crate::skip::Profile) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "layer  cos(h,h+ffn) mean   p10    p50    p90  ≥0.95   block influence   damage (nats)  rank"
    );
    for l in 0..p.n_layer {
        let f = &p.ffn_cos[l];
        let cold = if l < p.cold_start || l >= p.n_layer - p.cold_end {
            "  cold"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "{l:>5}  {:>17.4} {:>6.3} {:>6.3} {:>6.3} {:>5.0}%   {:>8.4}        {:>10}  {:>4}{cold}",
            f.mean,
            f.p10,
            f.p50,
            f.p90,
            f.frac_ge_095 * 100.0,
            p.block_influence[l],
            p.ffn_damage
                .get(l)
                .map_or("-".to_string(), |d| format!("{d:.4}")),
            p.ffn_lowrank
                .get(l)
                .map_or("-".to_string(), |m| m.rank().to_string()),
        );
    }
    let _ = writeln!(
        s,
        "cold regions: first {} and last {} layers",
        p.cold_start, p.cold_end
    );
    let _ = writeln!(s, "suggestions (adaptive):");
    for g in &p.suggestions {
        let _ = writeln!(
            s,
            "  target {:>3.0}%: threshold {:.2}, k {:.2}/token → simulated {:.1}%, damage Σ(1−cos) {:.3}/token",
            g.ratio * 100.0,
            g.threshold,
            g.k,
            g.simulated_ratio * 100.0,
            g.simulated_damage
        );
    }
    if !p.kld_curve.is_empty() {
        let _ = writeln!(
            s,
            "KL divergence to the full model (teacher-forced, warm-up 0; --max-kld picks from it;\n\
             --skip auto runs the lower of the +lowrank rules at each ratio):"
        );
        for k in &p.kld_curve {
            let _ = writeln!(
                s,
                "  {:<18} target {:>3.0}%: realized {:.1}%, mean KLD {:.4} nats",
                format!("{}{}", k.policy.name(), k.compensation.suffix()),
                k.ratio * 100.0,
                k.ffn_skip * 100.0,
                k.kld_mean
            );
        }
    }
    s
}

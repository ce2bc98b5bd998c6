//! `ffnskip bench`: decode and prefill speed per model × skip policy, against llama.cpp on
//! the same file in the same invocation; markdown, `--json` or `--csv`, and an SVG/PNG plot.

use std::path::PathBuf;

use clap::Args;

use crate::measure::bench::{bench_model, busy_warnings, csv, markdown, BenchConfig, PolicySpec};
use crate::measure::plot::{draw_svg_png, BenchChart};
use crate::skip::SkipOptions;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// GGUF models to measure, as paths or catalogue names (repeatable; default: the
    /// default model).
    #[arg(short = 'm', long = "model", value_name = "PATH|NAME")]
    pub models: Vec<PathBuf>,
    /// Policies as NAME[:RATIO], comma-separated or repeated (e.g. none,adaptive:0.25).
    #[arg(
        long = "skip",
        value_delimiter = ',',
        default_value = "none,adaptive:0.25"
    )]
    pub skip: Vec<String>,
    /// Worker threads, the same for llama.cpp (default: all cores).
    #[arg(short = 't', long = "threads", value_parser = super::parse_threads)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub load: super::LoadArgs,
    /// Prefill length in tokens.
    #[arg(long = "prompt-tokens", default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Decoded tokens per repetition.
    #[arg(long = "gen-tokens", default_value_t = 128)]
    pub gen_tokens: usize,
    /// Measured repetitions (after one warm-up repetition).
    #[arg(long = "reps", default_value_t = 5)]
    pub reps: usize,
    /// Calibration profile for adaptive/shortgpt (default: the one embedded in each model).
    #[arg(long = "skip-profile")]
    pub profile: Option<PathBuf>,
    /// Generated tokens run in full before skipping starts (default 8).
    #[arg(long = "warmup")]
    pub warmup: Option<usize>,
    /// Seed of the random and static baselines.
    #[arg(long = "seed", default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a markdown table.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV instead of a markdown table.
    #[arg(long)]
    pub csv: bool,
    /// Write the decode-speed-vs-skip-ratio plot to PATH.svg and PATH.png.
    #[arg(long = "plot")]
    pub plot: Option<PathBuf>,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(a.gen_tokens >= 1, "--gen-tokens must be at least 1");
    anyhow::ensure!(
        a.prompt_tokens >= 16,
        "--prompt-tokens {} is too short (expected ≥ 16)",
        a.prompt_tokens
    );
    let specs = a
        .skip
        .iter()
        .map(|s| PolicySpec::parse(s.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let models = if a.models.is_empty() {
        vec![crate::fetch::default_model()?]
    } else {
        a.models
            .iter()
            .map(|m| super::models::resolve("-m/--model", m))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    if let Some(base) = &a.plot {
        let mut inputs: Vec<(&str, &std::path::Path)> =
            models.iter().map(|m| ("-m/--model", m.as_path())).collect();
        if let Some(p) = &a.profile {
            inputs.push(("--skip-profile", p));
        }
        let (svg, png) = crate::measure::plot::outputs(base);
        crate::outfile::ensure_not_input("--plot", &svg, &inputs)?;
        crate::outfile::ensure_not_input("--plot", &png, &inputs)?;
    }
    let threads = super::threads(a.threads);
    let cfg = BenchConfig {
        threads,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        reps: a.reps,
        base: SkipOptions {
            warmup: a.warmup,
            seed: a.seed,
            ..SkipOptions::none()
        },
        profile: a.profile.clone(),
        load: a.load.options(),
    };
    let mut rows = Vec::new();
    for m in &models {
        eprintln!("== {} ==", m.display());
        rows.extend(bench_model(m, &specs, &cfg, &mut |line| {
            eprintln!("  {line}")
        })?);
    }
    let warnings = busy_warnings(&rows, cfg.threads);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if a.json {
        super::outln(&serde_json::to_string_pretty(&rows)?)?;
    } else if a.csv {
        super::out(&csv(&rows))?;
    } else {
        super::out(&markdown(&rows, &cfg))?;
        for w in &warnings {
            super::outln(&format!("\n**Warning:** {w}"))?;
        }
    }
    if let Some(base) = &a.plot {
        let (svg, png) = draw_svg_png(
            &BenchChart {
                rows: &rows,
                title: format!("Decode speed vs FFN skip ratio ({threads} threads)"),
            },
            base,
            (900, 600),
        )?;
        eprintln!("wrote {} and {}", svg.display(), png.display());
    }
    Ok(())
}

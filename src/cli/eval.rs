//! `ffnskip eval`: quality of each skip policy against the full model on FreebaseQA,
//! wikitext-2 perplexity, MT-Bench agreement and CNN/DM summaries.

use std::path::PathBuf;

use clap::Args;

use super::{model_path, open_gguf};
use crate::measure::bench::PolicySpec;
use crate::measure::eval::{markdown, EvalConfig, Evaluator, Task};
use crate::model::Llama;
use crate::skip::SkipOptions;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// GGUF model (default: the default model).
    #[arg(short = 'm', long = "model")]
    pub model: Option<PathBuf>,
    /// Task, or `all`.
    #[arg(long = "task", default_value = "all")]
    pub task: String,
    /// Policies as NAME[:RATIO], comma-separated or repeated; `none` (the reference) always
    /// runs first.
    #[arg(
        long = "skip",
        value_delimiter = ',',
        default_value = "none,adaptive:0.25"
    )]
    pub skip: Vec<String>,
    /// Data file or directory (default: ../shared/data).
    #[arg(long = "data")]
    pub data: Option<PathBuf>,
    /// Items per task (FreebaseQA 200, perplexity windows of 512 tokens 8, MT-Bench 20,
    /// CNN/DM stories 6 — a third per length bucket).
    #[arg(long = "limit")]
    pub limit: Option<usize>,
    /// Most tokens generated per answer for agreement and summarize.
    #[arg(long = "gen-tokens", default_value_t = 96)]
    pub gen_tokens: usize,
    #[arg(short = 't', long = "threads", default_value_t = 2)]
    pub threads: usize,
    /// Calibration profile for adaptive/shortgpt (default: the one embedded in the model).
    #[arg(long = "skip-profile")]
    pub profile: Option<PathBuf>,
    /// Generated tokens run in full before skipping starts (default 8).
    #[arg(long = "warmup")]
    pub warmup: Option<usize>,
    /// Adaptive threshold override.
    #[arg(long = "threshold", allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// Seed of the random and static baselines.
    #[arg(long = "seed", default_value_t = 0)]
    pub seed: u64,
    /// Directory for per-item results; a rerun with the same directory resumes.
    #[arg(long = "out", default_value = "ffnskip-eval")]
    pub out: PathBuf,
    /// Print JSON (one object per task) instead of markdown tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let tasks: Vec<Task> = if a.task == "all" {
        Task::ALL.to_vec()
    } else {
        vec![
            <Task as clap::ValueEnum>::from_str(&a.task, true).map_err(|_| {
                anyhow::anyhow!(
                    "--task {}: expected freebaseqa, perplexity, agreement, summarize or all",
                    a.task
                )
            })?,
        ]
    };
    anyhow::ensure!(a.threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(a.limit != Some(0), "--limit must be at least 1");
    let specs = a
        .skip
        .iter()
        .map(|s| PolicySpec::parse(s.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let path = model_path(&a.model)?;
    let (file, _) = open_gguf(&path)?;
    let model = Llama::load(&file)?;
    let stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let warmup_tag = a.warmup.map_or(String::new(), |w| format!("-w{w}"));
    let cfg = EvalConfig {
        specs,
        data: a.data.clone(),
        limit: a.limit,
        threads: a.threads,
        base: SkipOptions {
            warmup: a.warmup,
            threshold: a.threshold,
            seed: a.seed,
            ..SkipOptions::none()
        },
        profile: a.profile.clone(),
        // Results depend on the model, generation length and warm-up: keep them apart.
        out_dir: a.out.join(format!("{stem}-g{}{warmup_tag}", a.gen_tokens)),
        gen_tokens: a.gen_tokens,
    };
    let ev = Evaluator::new(&path, &file, &model, cfg)?;
    for task in tasks {
        let report = ev.run(task, &mut |line| eprintln!("{line}"))?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{}", markdown(&report));
        }
    }
    eprintln!("per-item results in {}", ev.cfg.out_dir.display());
    Ok(())
}

//! `ffnskip eval`: quality of each skip policy against the full model on FreebaseQA,
//! wikitext-2 perplexity and KL divergence to the full model, MT-Bench agreement and CNN/DM summaries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;

use super::{model_path, open_gguf};
use crate::measure::bench::PolicySpec;
use crate::measure::code::CodeFormat;
use crate::measure::eval::{markdown, summary_markdown, EvalConfig, Evaluator, Task};
use crate::model::Llama;
use crate::skip::SkipOptions;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// GGUF model file or catalogue name (default: the default model).
    #[arg(short = 'm', long = "model", value_name = "PATH|NAME")]
    pub model: Option<PathBuf>,
    /// Tasks (freebaseqa, perplexity, agreement, summarize, code), comma-separated, or `all`.
    #[arg(long = "task", value_delimiter = ',', default_value = "all")]
    pub task: Vec<String>,
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
    /// Items per task: N for every task, or TASK=N, comma-separated (defaults: FreebaseQA 200,
    /// perplexity windows of 512 tokens 8, MT-Bench 20, CNN/DM stories 6 — a third per length
    /// bucket, code problems 50).
    #[arg(long = "limit", value_delimiter = ',')]
    pub limit: Vec<String>,
    /// Most tokens generated per answer for agreement and summarize.
    #[arg(long = "gen-tokens", default_value_t = 96)]
    pub gen_tokens: usize,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads", value_parser = super::parse_threads)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub load: super::LoadArgs,
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
    /// Layout of the code task's problems: MBPP's JSON array (the default, sanitized MBPP from
    /// the data directory) or HumanEval's JSONL (pass the file with --data).
    #[arg(long = "code-format", value_enum, default_value = "mbpp")]
    pub code_format: CodeFormat,
    /// Perplexity: score KL divergence against another model's full distributions, stored in
    /// its eval's `perplexity/none.jsonl` (e.g. the distributed file, when this is a
    /// requantization of it), instead of this model's own.
    #[arg(long = "kld-reference", value_name = "NONE.JSONL")]
    pub kld_reference: Option<PathBuf>,
}

fn parse_task(s: &str) -> anyhow::Result<Task> {
    <Task as clap::ValueEnum>::from_str(s.trim(), true).map_err(|_| {
        anyhow::anyhow!(
            "--task {s}: expected freebaseqa, perplexity, agreement, summarize, code or all"
        )
    })
}

/// `--limit` entries: `N` for every task or `TASK=N`.
fn parse_limits(v: &[String]) -> anyhow::Result<(Option<usize>, BTreeMap<String, usize>)> {
    let mut all = None;
    let mut per = BTreeMap::new();
    for e in v {
        let (task, n) = match e.split_once('=') {
            Some((t, n)) => (
                Some(parse_task(t).map_err(|_| {
                    anyhow::anyhow!(
                        "--limit {e}: unknown task {t}; expected freebaseqa, perplexity, \
                         agreement, summarize or code"
                    )
                })?),
                n,
            ),
            None => (None, e.as_str()),
        };
        let n: usize =
            n.trim().parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
                anyhow::anyhow!("--limit {e}: expected a count ≥ 1, as N or TASK=N")
            })?;
        match task {
            Some(t) => {
                per.insert(t.name().to_string(), n);
            }
            None => all = Some(n),
        }
    }
    Ok((all, per))
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let mut tasks: Vec<Task> = Vec::new();
    for t in &a.task {
        let add = if t.trim() == "all" {
            Task::ALL.to_vec()
        } else {
            vec![parse_task(t)?]
        };
        for t in add {
            if !tasks.contains(&t) {
                tasks.push(t);
            }
        }
    }
    let (limit, task_limits) = parse_limits(&a.limit)?;
    let specs = a
        .skip
        .iter()
        .map(|s| PolicySpec::parse(s.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let path = model_path(&a.model)?;
    let (file, _) = open_gguf(&path)?;
    let model = Llama::load_with(&file, a.load.options())?;
    let stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let mut warmup_tag = a.warmup.map_or(String::new(), |w| format!("-w{w}"));
    if let Some(r) = &a.kld_reference {
        // Scored against another file's distributions: kept apart from self-scored results.
        let of = r
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .map_or_else(|| "other".into(), |s| s.to_string_lossy().into_owned());
        warmup_tag.push_str(&format!("-kld-vs-{of}"));
    }
    let cfg = EvalConfig {
        specs,
        data: a.data.clone(),
        limit,
        task_limits,
        threads: super::threads(a.threads),
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
        code_format: a.code_format,
        kld_reference: a.kld_reference.clone(),
    };
    let ev = Evaluator::new(&path, &file, &model, cfg)?;
    let mut reports = Vec::new();
    for task in tasks {
        let report = ev.run(task, &mut |line| eprintln!("{line}"))?;
        if a.json {
            super::outln(&serde_json::to_string(&report)?)?;
        } else {
            super::outln(&markdown(&report))?;
        }
        reports.push(report);
    }
    if !a.json && reports.len() > 1 {
        super::outln(&format!("### Summary\n\n{}", summary_markdown(&reports)))?;
    }
    eprintln!("per-item results in {}", ev.cfg.out_dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_for_all_tasks_and_per_task() {
        let v = |s: &str| s.split(',').map(String::from).collect::<Vec<_>>();
        let (all, per) = parse_limits(&v("5,freebaseqa=100,Perplexity=4")).unwrap();
        assert_eq!(all, Some(5));
        assert_eq!(per.get("freebaseqa"), Some(&100));
        assert_eq!(per.get("perplexity"), Some(&4));
        let e = parse_limits(&v("qa=3")).unwrap_err().to_string();
        assert_eq!(
            e,
            "--limit qa=3: unknown task qa; expected freebaseqa, perplexity, agreement, summarize or code"
        );
        let e = parse_limits(&v("agreement=0")).unwrap_err().to_string();
        assert_eq!(
            e,
            "--limit agreement=0: expected a count ≥ 1, as N or TASK=N"
        );
    }
}

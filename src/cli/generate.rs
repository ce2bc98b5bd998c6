//! `ffnskip generate`: raw-prompt completion, streamed, or one JSON object with `--json`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{model_path, open_gguf, read_prompt, skip_json, ModelArgs, SamplingArgs, SkipArgs};
use crate::model::Llama;
use crate::sampling::Sampler;
use crate::session::{generate, Session, SessionConfig};
use crate::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text.
    #[arg(short = 'p', long = "prompt")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub skip: SkipArgs,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let prompt = read_prompt(&a.prompt, &a.file)?;
    let sampler_config = a.sampling.config()?;
    let path = model_path(&a.model.model)?;
    let (file, start) = open_gguf(&path)?;
    let model = Llama::load(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let config = SessionConfig::new(a.model.ctx(model.config.n_ctx_train), a.model.threads());
    let controller = a.skip.controller(&model, &file, a.sampling.seed)?;
    let mut session = Session::with_hook(&model, config, controller)?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    // As llama.cpp tokenizes a raw prompt: BOS only if the metadata asks, specials parsed.
    let ids = tokenizer.encode(&prompt, true, true);
    if ids.is_empty() {
        anyhow::bail!("the prompt is empty after tokenization");
    }
    let mut sampler = Sampler::new(sampler_config);
    let stdout = std::io::stdout();
    let json = a.json;
    let mut emit = |piece: &str| {
        if !json {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let g = generate(
        &mut session,
        &tokenizer,
        &mut sampler,
        &ids,
        a.max_tokens,
        &mut emit,
    )?;
    if json {
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
            "skip": skip_json(&session.hook),
        });
        println!("{obj}");
    } else {
        println!();
        let st = &session.hook.stats;
        let skip = if session.hook.params().policy == crate::skip::Policy::None {
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
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s{skip}, stop: {:?}, load {:.0} ms]",
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

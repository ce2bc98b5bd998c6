//! `ffnskip chat`: interactive, streaming, with the model's chat template; the KV cache is
//! kept across turns (only the new part of the conversation is evaluated).

use std::io::{BufRead, Write};

use clap::Args;

use super::{model_path, open_gguf, ModelArgs, SamplingArgs, SkipArgs};
use crate::chat::{ChatTemplate, Message};
use crate::model::Llama;
use crate::sampling::Sampler;
use crate::session::{generate, Session, SessionConfig, StopReason};
use crate::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub skip: SkipArgs,
    /// System prompt (default: the template's own, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 512)]
    pub max_tokens: usize,
}

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    let path = model_path(&a.model.model)?;
    let (file, _) = open_gguf(&path)?;
    let model = Llama::load(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let source = file
        .opt_str("tokenizer.chat_template")?
        .ok_or_else(|| crate::chat::ChatError::NoTemplate(path.display().to_string()))?;
    let bos = tokenizer
        .bos()
        .map_or("", |t| tokenizer.token_text(t))
        .to_string();
    let eos = tokenizer
        .eos()
        .map_or("", |t| tokenizer.token_text(t))
        .to_string();
    let template = ChatTemplate::new(&path.display().to_string(), source, &bos, &eos)?;
    let config = SessionConfig::new(a.model.ctx(model.config.n_ctx_train), a.model.threads());
    let controller = a.skip.controller(&model, &file, a.sampling.seed)?;
    let mut session = Session::with_hook(&model, config, controller)?;
    let mut sampler = Sampler::new(a.sampling.config()?);
    let mut messages: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let base = messages.clone();
    eprintln!(
        "ffnskip chat — {} ({} ctx). Type /reset to start over, /exit to quit.",
        path.display(),
        session.n_ctx()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = line?;
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = base.clone();
                session.reset();
                sampler.reset();
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", input));
        let text = template.render(&messages, true)?;
        let ids = tokenizer.encode(&text, true, true);
        // Reuse the cached prefix; evaluate only what is new.
        let common = session
            .history()
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        let common = common.min(ids.len().saturating_sub(1));
        session.truncate(common);
        session.timings = Default::default();
        session.hook.reset_stats();
        let stdout = std::io::stdout();
        let mut emit = |piece: &str| {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        };
        let g = match generate(
            &mut session,
            &tokenizer,
            &mut sampler,
            &ids[common..],
            a.max_tokens,
            &mut emit,
        ) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("\nerror: {e:#} — use /reset to start a new conversation");
                messages.pop();
                continue;
            }
        };
        println!();
        let note = match g.stop_reason {
            StopReason::Eos => "",
            StopReason::MaxTokens => ", cut at --max-tokens",
            StopReason::ContextFull => ", context full: /reset to continue",
        };
        let skip = if session.hook.params().policy == crate::skip::Policy::None {
            String::new()
        } else {
            format!(", FFN skip {:.1}%", session.hook.stats.ratio() * 100.0)
        };
        eprintln!(
            "[{} tokens, {:.1} tok/s{skip}, prompt {} new tokens at {:.1} tok/s{note}]",
            g.tokens.len(),
            g.decode_tokens_per_s(),
            g.prompt_tokens,
            g.prefill_tokens_per_s()
        );
        messages.push(Message::new("assistant", &g.text));
    }
    Ok(())
}

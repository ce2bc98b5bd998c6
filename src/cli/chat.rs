//! `ffnskip chat`: interactive, streaming, with the model's chat template; the KV cache is
//! kept across turns and the oldest turns make room when the context is full
//! ([`crate::conversation`]). Ctrl-C stops the answer; a second Ctrl-C or Ctrl-D exits.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use clap::Args;

use super::{
    model_path, open_gguf, out, ModelArgs, PromptProgress, SamplingArgs, SkipArgs, StopArgs,
};
use crate::conversation::{template_of, Conversation, Reply};
use crate::interrupt::Answer;
use crate::model::Llama;
use crate::sampling::Sampler;
use crate::session::{GenerateSink, Session, SessionConfig, StopReason};
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
    #[command(flatten)]
    pub stop: StopArgs,
}

const HELP: &str = "commands: /help this list · /reset start a new conversation (the system \
prompt stays) · /exit or Ctrl-D quit · Ctrl-C stops an answer";

/// Streams an answer to stdout; stops on Ctrl-C or a closed stdout.
struct ChatSink<'a> {
    answer: &'a Answer,
    progress: PromptProgress,
    closed: bool,
}

impl GenerateSink for ChatSink<'_> {
    fn text(&mut self, piece: &str) -> ControlFlow<()> {
        if !piece.is_empty() && out(piece).is_err() {
            self.closed = true;
        }
        if self.closed || self.answer.cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn prefill_progress(&mut self, done: usize, total: usize) {
        self.progress.update(done, total);
    }
}

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    let path = model_path(&a.model.model)?;
    let (file, _) = open_gguf(&path)?;
    let model = Llama::load_with(&file, a.model.load.options())?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let template = template_of(&file, &tokenizer)?;
    let config = SessionConfig::new(a.model.ctx(model.config.n_ctx_train), a.model.threads());
    let controller = a.skip.controller(&model, &file, a.sampling.seed)?;
    let mut session = Session::with_controller(&model, config, controller)?;
    let mut sampler = Sampler::new(a.sampling.config()?);
    a.stop.apply(&mut sampler, &tokenizer);
    let opts = a.stop.options(a.max_tokens);
    let mut chat = Conversation::new(&template, &tokenizer, a.system.as_deref());
    eprintln!(
        "ffnskip chat — {} ({} ctx). /help lists the commands.",
        path.display(),
        session.n_ctx()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else {
            eprintln!();
            break;
        };
        let line = line?;
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        if let Some(cmd) = input.strip_prefix('/') {
            match cmd {
                "exit" | "quit" => break,
                "help" => eprintln!("{HELP}"),
                "reset" => {
                    chat.reset();
                    session.reset();
                    sampler.reset();
                    eprintln!("(conversation reset)");
                }
                _ => eprintln!("unknown command /{cmd}: not sent to the model. {HELP}"),
            }
            continue;
        }
        session.timings = Default::default();
        session.controller.reset_stats();
        let answer = Answer::start();
        let mut sink = ChatSink {
            answer: &answer,
            progress: PromptProgress::new(),
            closed: false,
        };
        let reply = chat.reply(&mut session, &mut sampler, input, &opts, &mut sink);
        sink.progress.finish();
        let closed = sink.closed;
        drop(answer);
        if closed {
            return Err(super::StdoutClosed.into());
        }
        match reply {
            Ok(r) => {
                out("\n")?;
                let skip = (session.controller.params().policy != crate::skip::Policy::None)
                    .then(|| session.controller.stats.ratio());
                eprintln!("{}", summary(&r, skip));
            }
            Err(e) => eprintln!("\nerror: {e:#}"),
        }
    }
    Ok(())
}

/// `[12 tokens, 80.1 tok/s, FFN skip 24.8%, prompt 30 new tokens at 300.0 tok/s, stop: eos]`,
/// with a line before it when old turns were dropped.
fn summary(r: &Reply, skip_ratio: Option<f64>) -> String {
    let g = &r.generation;
    let mut s = String::new();
    if r.dropped_messages > 0 {
        s.push_str(&format!(
            "(context full: dropped the {} oldest messages, kept the system prompt, re-processed {} tokens)\n",
            r.dropped_messages, r.evaluated_tokens
        ));
    }
    let skip = skip_ratio.map_or(String::new(), |r| format!(", FFN skip {:.1}%", r * 100.0));
    let note = match g.stop_reason {
        StopReason::ContextFull => " — the next message drops the oldest turns",
        StopReason::Cancelled => " — interrupted, the conversation goes on",
        _ => "",
    };
    s.push_str(&format!(
        "[{} tokens, {:.1} tok/s{skip}, prompt {} new tokens at {:.1} tok/s, stop: {}{note}]",
        g.tokens.len(),
        g.decode_tokens_per_s(),
        g.prompt_tokens,
        g.prefill_tokens_per_s(),
        g.stop_reason
    ));
    s
}

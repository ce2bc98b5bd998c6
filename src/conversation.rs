//! A multi-turn chat over a [`Session`]: the model's chat template, the KV cache reused across
//! turns (only the new part of the conversation is evaluated), and a context that never
//! fills up for good — when a turn does not fit, the oldest turns are dropped (the system
//! prompt stays) and what remains is evaluated again.

use crate::chat::{ChatError, ChatTemplate, Message};
use crate::gguf::GgufFile;
use crate::sampling::Sampler;
use crate::session::{generate, GenerateOptions, GenerateSink, Generation, Session};
use crate::skip::Controller;
use crate::tokenizer::Tokenizer;

/// The chat template of `file` (`tokenizer.chat_template`) with its BOS/EOS texts.
pub fn template_of(file: &GgufFile, tokenizer: &Tokenizer) -> anyhow::Result<ChatTemplate> {
    let name = file.path().display().to_string();
    let source = file
        .opt_str("tokenizer.chat_template")?
        .ok_or_else(|| ChatError::NoTemplate(name.clone()))?;
    let text = |t: Option<u32>| t.map_or("", |t| tokenizer.token_text(t)).to_string();
    Ok(ChatTemplate::new(
        &name,
        source,
        &text(tokenizer.bos()),
        &text(tokenizer.eos()),
    )?)
}

/// One user message (with an optional system prompt) rendered as a prompt that ends where
/// the assistant's answer begins.
pub fn single_turn_prompt(
    template: &ChatTemplate,
    system: Option<&str>,
    user: &str,
) -> anyhow::Result<String> {
    let mut messages: Vec<Message> = system
        .map(|s| Message::new("system", s))
        .into_iter()
        .collect();
    messages.push(Message::new("user", user));
    Ok(template.render(&messages, true)?)
}

/// The answer to one turn.
#[derive(Debug)]
pub struct Reply {
    pub generation: Generation,
    /// Earlier messages (user and assistant) dropped to make room for this turn.
    pub dropped_messages: usize,
    /// Prompt tokens evaluated for this turn (the rest came from the cache).
    pub evaluated_tokens: usize,
}

pub struct Conversation<'t> {
    template: &'t ChatTemplate,
    tokenizer: &'t Tokenizer,
    system: Option<Message>,
    /// User and assistant messages, oldest first.
    turns: Vec<Message>,
}

impl<'t> Conversation<'t> {
    pub fn new(template: &'t ChatTemplate, tokenizer: &'t Tokenizer, system: Option<&str>) -> Self {
        Conversation {
            template,
            tokenizer,
            system: system.map(|s| Message::new("system", s)),
            turns: Vec::new(),
        }
    }

    /// User and assistant messages kept, oldest first.
    pub fn turns(&self) -> &[Message] {
        &self.turns
    }

    /// Forgets every turn (the system prompt stays).
    pub fn reset(&mut self) {
        self.turns.clear();
    }

    fn prompt_ids(&self, turns: &[Message]) -> anyhow::Result<Vec<u32>> {
        let messages: Vec<Message> = self.system.iter().chain(turns).cloned().collect();
        let text = self.template.render(&messages, true)?;
        Ok(self.tokenizer.encode(&text, true, true))
    }

    /// Answers `user`. The prompt must leave room for `room` generated tokens (at most half
    /// the context): if it does not, the oldest messages are dropped until it does.
    pub fn reply<H: Controller>(
        &mut self,
        session: &mut Session<'_, H>,
        sampler: &mut Sampler,
        user: &str,
        opts: &GenerateOptions,
        sink: &mut dyn GenerateSink,
    ) -> anyhow::Result<Reply> {
        let n_ctx = session.n_ctx();
        let room = opts.max_tokens.clamp(1, (n_ctx / 2).max(1));
        self.turns.push(Message::new("user", user));
        let mut dropped = 0;
        let ids = loop {
            let ids = self.prompt_ids(&self.turns[dropped..])?;
            if ids.len() + room <= n_ctx || dropped + 1 >= self.turns.len() {
                break ids;
            }
            // Drop the oldest user message and the answer to it.
            dropped += 2.min(self.turns.len() - 1 - dropped);
        };
        if ids.len() >= n_ctx {
            self.turns.pop();
            anyhow::bail!(
                "this message needs {} tokens with the system prompt, more than the context of \
                 {n_ctx} (raise -c/--ctx or send a shorter message)",
                ids.len()
            );
        }
        self.turns.drain(..dropped);
        // Reuse the cached prefix; evaluate only what is new (at least one token, for logits).
        let common = session
            .history()
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        session.truncate(common);
        sampler.reset();
        for &t in &ids[..common] {
            sampler.accept(t);
        }
        let generation = generate(session, self.tokenizer, sampler, &ids[common..], opts, sink)
            .inspect_err(|_| {
                self.turns.pop();
            })?;
        self.turns.push(Message::new("assistant", &generation.text));
        Ok(Reply {
            generation,
            dropped_messages: dropped,
            evaluated_tokens: ids.len() - common,
        })
    }
}

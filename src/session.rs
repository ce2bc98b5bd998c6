//! A running conversation with a model: KV cache, scratch, thread pool and FFN hook;
//! prefill in batches, decode one token at a time, stream text, keep the cache across turns.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::{Batch, ForwardError, KvCache, Llama, Logits, Scratch};
use crate::sampling::Sampler;
use crate::skip::{Controller, NoSkip};
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Clone, Copy, Debug)]
pub struct SessionConfig {
    /// KV cache positions (`--ctx`).
    pub n_ctx: usize,
    /// Worker threads for matrix products and attention (`--threads`).
    pub threads: usize,
    /// Prompt rows per forward call.
    pub batch: usize,
}

impl SessionConfig {
    pub fn new(n_ctx: usize, threads: usize) -> Self {
        SessionConfig {
            n_ctx,
            threads,
            batch: 512,
        }
    }
}

/// Time and tokens spent in prefill and decode since the last reset of the counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub prefill: Duration,
    pub prefill_tokens: usize,
    pub decode: Duration,
    pub decode_tokens: usize,
}

impl Timings {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill)
    }
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

pub struct Session<'m, H: Controller = NoSkip> {
    pub model: &'m Llama<'m>,
    pool: rayon::ThreadPool,
    cache: KvCache,
    scratch: Scratch,
    pub hook: H,
    /// Tokens whose keys and values are in the cache, in order.
    history: Vec<u32>,
    pub timings: Timings,
}

impl<'m> Session<'m, NoSkip> {
    pub fn new(model: &'m Llama<'m>, config: SessionConfig) -> anyhow::Result<Self> {
        Self::with_hook(model, config, NoSkip)
    }
}

impl<'m, H: Controller> Session<'m, H> {
    pub fn with_hook(model: &'m Llama<'m>, config: SessionConfig, hook: H) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.max(1))
            .thread_name(|i| format!("ffnskip-{i}"))
            .build()?;
        let n_ctx = config.n_ctx.max(1);
        let scratch = pool.install(|| Scratch::new(model, config.batch, n_ctx));
        Ok(Session {
            model,
            pool,
            cache: model.new_cache(n_ctx),
            scratch,
            hook,
            history: Vec::new(),
            timings: Timings::default(),
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.cache.n_ctx
    }

    /// Tokens currently in the KV cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// The KV cache (read-only).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn kv_cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Stage times of the forward pass (attention, FFN, head).
    pub fn stage_times(&self) -> crate::model::StageTimes {
        self.scratch.times
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.history.clear();
    }

    /// Keeps only the first `n` cached positions.
    pub fn truncate(&mut self, n: usize) {
        self.cache.truncate(n);
        self.history.truncate(n);
    }

    fn run(&mut self, tokens: &[u32], prompt: bool, logits: Logits) -> Result<(), ForwardError> {
        let (model, cache, scratch, hook) = (
            self.model,
            &mut self.cache,
            &mut self.scratch,
            &mut self.hook,
        );
        self.pool.install(|| {
            model
                .forward(
                    cache,
                    scratch,
                    &Batch {
                        tokens,
                        prompt,
                        logits,
                    },
                    hook,
                )
                .map(|_| ())
        })?;
        self.history.extend_from_slice(tokens);
        Ok(())
    }

    /// Feeds prompt tokens in batches; returns the last row's logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], ForwardError> {
        if tokens.is_empty() {
            return Err(ForwardError::Empty);
        }
        let start = Instant::now();
        let n = self.scratch.max_batch();
        let chunks = tokens.len().div_ceil(n);
        for (i, chunk) in tokens.chunks(n).enumerate() {
            let want = if i + 1 == chunks {
                Logits::Last
            } else {
                Logits::None
            };
            self.run(chunk, true, want)?;
        }
        self.timings.prefill += start.elapsed();
        self.timings.prefill_tokens += tokens.len();
        Ok(self.scratch_logits())
    }

    /// Feeds one generated token; returns its logits.
    pub fn decode(&mut self, token: u32) -> Result<&[f32], ForwardError> {
        let start = Instant::now();
        self.run(&[token], false, Logits::Last)?;
        self.timings.decode += start.elapsed();
        self.timings.decode_tokens += 1;
        Ok(self.scratch_logits())
    }

    /// Teacher-forced logits of every token (`[n, n_vocab]`), in batches of at most the
    /// scratch size, with `prompt` telling the hook how to treat the rows.
    pub fn eval_all(&mut self, tokens: &[u32], prompt: bool) -> Result<Vec<f32>, ForwardError> {
        let mut out = Vec::with_capacity(tokens.len() * self.model.config.n_vocab);
        for chunk in tokens.chunks(self.scratch.max_batch()) {
            let (model, cache, scratch, hook) = (
                self.model,
                &mut self.cache,
                &mut self.scratch,
                &mut self.hook,
            );
            let logits = self.pool.install(|| {
                model
                    .forward(
                        cache,
                        scratch,
                        &Batch {
                            tokens: chunk,
                            prompt,
                            logits: Logits::All,
                        },
                        hook,
                    )
                    .map(|l| l.to_vec())
            })?;
            out.extend_from_slice(&logits);
            self.history.extend_from_slice(chunk);
        }
        Ok(out)
    }

    fn scratch_logits(&self) -> &[f32] {
        self.scratch.last_logits()
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token (EOS/EOT).
    Eos,
    /// `--max-tokens` were generated.
    MaxTokens,
    /// The KV cache is full.
    ContextFull,
}

pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub prefill: Duration,
    pub decode: Duration,
}

impl Generation {
    pub fn decode_tokens_per_s(&self) -> f64 {
        // The first token comes from the prefill logits; each later one costs a decode step.
        rate(self.tokens.len().saturating_sub(1), self.decode)
    }
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill)
    }
}

/// Generates after `new_tokens` (appended to what the session holds), streaming text
/// pieces to `on_text` as soon as they form whole UTF-8 characters.
pub fn generate<H: Controller>(
    session: &mut Session<'_, H>,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    new_tokens: &[u32],
    max_tokens: usize,
    on_text: &mut dyn FnMut(&str),
) -> anyhow::Result<Generation> {
    for &t in new_tokens {
        sampler.accept(t);
    }
    let free = session.n_ctx().saturating_sub(session.history().len());
    if new_tokens.len() > free {
        anyhow::bail!(
            "the prompt needs {} positions but only {free} of the context's {} are free (raise --ctx)",
            new_tokens.len(),
            session.n_ctx()
        );
    }
    let t0 = Instant::now();
    let mut next = sampler.sample(session.prefill(new_tokens)?);
    let prefill = t0.elapsed();
    let mut stream = StreamDecoder::new(tokenizer);
    let mut tokens = Vec::new();
    let mut text = String::new();
    let t1 = Instant::now();
    let stop_reason = loop {
        if tokenizer.is_eog(next) {
            break StopReason::Eos;
        }
        tokens.push(next);
        sampler.accept(next);
        let piece = stream.push(next);
        if !piece.is_empty() {
            on_text(&piece);
            text.push_str(&piece);
        }
        if tokens.len() >= max_tokens {
            break StopReason::MaxTokens;
        }
        if session.history().len() >= session.n_ctx() {
            break StopReason::ContextFull;
        }
        next = sampler.sample(session.decode(next)?);
    };
    let rest = stream.flush();
    if !rest.is_empty() {
        on_text(&rest);
        text.push_str(&rest);
    }
    Ok(Generation {
        prompt_tokens: new_tokens.len(),
        tokens,
        text,
        stop_reason,
        prefill,
        decode: t1.elapsed(),
    })
}

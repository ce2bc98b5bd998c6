//! A running conversation with a model: KV cache, scratch, thread team and skip controller;
//! prefill in batches, decode one token at a time, stream text, keep the cache across turns.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::{Batch, ForwardError, KvCache, Llama, Logits, Scratch};
use crate::prompt_cache::{PromptCache, PromptEntry};
use crate::sampling::Sampler;
use crate::skip::{Controller, NoSkip};
use crate::team::Team;
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Clone, Copy, Debug)]
pub struct SessionConfig {
    /// KV cache positions (`--ctx`).
    pub n_ctx: usize,
    /// Worker threads for matrix products and attention (`--threads`).
    pub threads: usize,
    /// Prompt rows per forward call.
    pub batch: usize,
    /// Make every batch give the bits of its rows decoded one at a time (perplexity and KLD
    /// under skipping compare with decoding). Off, a batch runs ggml's GEMM where llama.cpp
    /// does (which sums Q4_K products in another order) and attention in f32, as llama.cpp's
    /// batched prompts do; logits then differ from decoding in the last places.
    pub exact_batches: bool,
}

impl SessionConfig {
    pub fn new(n_ctx: usize, threads: usize) -> Self {
        SessionConfig {
            n_ctx,
            threads,
            batch: 512,
            exact_batches: false,
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
    team: Team,
    cache: KvCache,
    scratch: Scratch,
    pub controller: H,
    /// Tokens whose keys and values are in the cache, in order.
    history: Vec<u32>,
    pub timings: Timings,
    /// Whole prompts fed to an empty cache, when the controller leaves prompts in full.
    prompt_cache: Option<PromptCache>,
}

impl<'m> Session<'m, NoSkip> {
    pub fn new(model: &'m Llama<'m>, config: SessionConfig) -> anyhow::Result<Self> {
        Self::with_controller(model, config, NoSkip)
    }
}

impl<'m, H: Controller> Session<'m, H> {
    pub fn with_controller(
        model: &'m Llama<'m>,
        config: SessionConfig,
        controller: H,
    ) -> anyhow::Result<Self> {
        check_memory(model, &config)?;
        let team = Team::new(config.threads.max(1))?;
        let n_ctx = config.n_ctx.max(1);
        let mut scratch = team.install(|| Scratch::new(model, config.batch, n_ctx));
        scratch.batch_exact = config.exact_batches;
        Ok(Session {
            model,
            team,
            cache: model.new_cache(n_ctx),
            scratch,
            controller,
            history: Vec::new(),
            timings: Timings::default(),
            prompt_cache: None,
        })
    }

    /// Serve prompts fed to an empty cache from `cache` when it holds them, and keep new
    /// ones there (see [`crate::prompt_cache`]). Unused when the controller's prompt rows are
    /// not the full model's.
    pub fn with_prompt_cache(mut self, mut cache: PromptCache) -> Self {
        if self.model.device.is_some() {
            // Offloaded layers keep their keys and values on the device, not in `KvCache`.
            return self;
        }
        // Batches of another size or exactness give other bits.
        cache.bind((self.scratch.max_batch(), self.scratch.batch_exact));
        self.prompt_cache = Some(cache);
        self
    }

    /// Hands the prompt cache back (for the next session of the same model and config).
    pub fn take_prompt_cache(&mut self) -> Option<PromptCache> {
        self.prompt_cache.take()
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
        let (model, cache, scratch, controller) = (
            self.model,
            &mut self.cache,
            &mut self.scratch,
            &mut self.controller,
        );
        self.team.install(|| {
            model
                .forward(
                    cache,
                    scratch,
                    &Batch {
                        tokens,
                        prompt,
                        logits,
                    },
                    controller,
                )
                .map(|_| ())
        })?;
        self.history.extend_from_slice(tokens);
        Ok(())
    }

    /// Feeds prompt tokens in batches; returns the last row's logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32], ForwardError> {
        self.prefill_with_progress(tokens, &mut |_, _| {})
    }

    /// [`Session::prefill`], reporting (positions done, total) after each batch.
    pub fn prefill_with_progress(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<&[f32], ForwardError> {
        if tokens.is_empty() {
            return Err(ForwardError::Empty);
        }
        let cacheable = self.history.is_empty() && self.controller.prompt_is_full();
        if cacheable && self.restore_prompt(tokens) {
            progress(tokens.len(), tokens.len());
            return Ok(self.scratch_logits());
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
            progress((i * n + chunk.len()).min(tokens.len()), tokens.len());
        }
        self.timings.prefill += start.elapsed();
        self.timings.prefill_tokens += tokens.len();
        if cacheable {
            if let Some(c) = &mut self.prompt_cache {
                let entry = PromptEntry {
                    kv: self.cache.prefix(tokens.len()),
                    logits: self.scratch.last_logits().to_vec(),
                };
                c.insert(tokens, entry);
            }
        }
        Ok(self.scratch_logits())
    }

    /// Restores `tokens` from the prompt cache into the (empty) KV cache, telling the
    /// controller about the prompt rows as a prefill would; false when it is not there.
    fn restore_prompt(&mut self, tokens: &[u32]) -> bool {
        let Some(c) = &mut self.prompt_cache else {
            return false;
        };
        let Some(e) = c.get(tokens) else {
            return false;
        };
        if self.cache.restore(&e.kv).is_none() || e.logits.len() != self.model.config.n_vocab {
            return false;
        }
        self.scratch.set_last_logits(&e.logits);
        c.reused_tokens += tokens.len();
        let positions: Vec<usize> = (0..tokens.len()).collect();
        self.controller.begin(&positions, true);
        self.controller.end();
        self.history.extend_from_slice(tokens);
        true
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
    /// scratch size, with `prompt` telling the controller how to treat the rows.
    pub fn eval_all(&mut self, tokens: &[u32], prompt: bool) -> Result<Vec<f32>, ForwardError> {
        let mut out = Vec::with_capacity(tokens.len() * self.model.config.n_vocab);
        for chunk in tokens.chunks(self.scratch.max_batch()) {
            let (model, cache, scratch, controller) = (
                self.model,
                &mut self.cache,
                &mut self.scratch,
                &mut self.controller,
            );
            let logits = self.team.install(|| {
                model
                    .forward(
                        cache,
                        scratch,
                        &Batch {
                            tokens: chunk,
                            prompt,
                            logits: Logits::All,
                        },
                        controller,
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

/// Bytes a session of `config` allocates for its context: the f16 KV cache
/// (`2 × [n_layer, n_head_kv, n_ctx, head_dim]`) and the attention workers' f32 key and score
/// buffers (`[n_ctx, head_dim + 1]` each, two workers per thread). `None` on overflow.
pub fn context_bytes(model: &Llama, config: &SessionConfig) -> Option<u64> {
    let c = &model.config;
    let n_ctx = config.n_ctx as u64;
    let kv = 2
        * 2
        * (c.n_layer as u64)
            .checked_mul(c.n_head_kv as u64)?
            .checked_mul(c.head_dim as u64)?
            .checked_mul(n_ctx)?;
    let workers = 2 * config.threads.max(1) as u64;
    let attn = workers.checked_mul(n_ctx.checked_mul(4 * (c.head_dim as u64 + 1))?)?;
    kv.checked_add(attn)
}

/// `MemAvailable` of `/proc/meminfo` in bytes, where there is one.
pub(crate) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Refuses a context that cannot fit in memory, before anything is allocated.
fn check_memory(model: &Llama, config: &SessionConfig) -> anyhow::Result<()> {
    let gb = |b: u64| b as f64 / 1e9;
    match (context_bytes(model, config), available_memory()) {
        (None, _) => anyhow::bail!(
            "--ctx {}: the KV cache size overflows; lower -c/--ctx",
            config.n_ctx
        ),
        (Some(need), Some(avail)) if need > avail => anyhow::bail!(
            "--ctx {} needs {need} bytes ({:.2} GB) for the KV cache and attention buffers, \
             but only {avail} bytes ({:.2} GB) of memory are available; lower -c/--ctx",
            config.n_ctx,
            gb(need),
            gb(avail)
        ),
        _ => Ok(()),
    }
}

/// Why generation stopped, spelled the same on stderr and in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token (EOS/EOT).
    Eos,
    /// `--max-tokens` were generated.
    MaxTokens,
    /// The generated text contains one of the stop strings (`--stop`).
    StopSequence,
    /// The KV cache is full.
    ContextFull,
    /// The caller asked to stop (Ctrl-C in chat, a closed stdout or connection).
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max_tokens",
            StopReason::StopSequence => "stop_sequence",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What ends a generation besides end-of-generation tokens and a full context.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// Tokens to generate at most (0: evaluate the prompt only).
    pub max_tokens: usize,
    /// Stop as soon as the generated text contains one of these; the text returned and
    /// streamed ends before it.
    pub stop: Vec<String>,
}

/// Where a generation reports to.
pub trait GenerateSink {
    /// Text released after a generated token (possibly empty: an incomplete UTF-8 character
    /// or a possible start of a stop string is held back). `Break` stops with
    /// [`StopReason::Cancelled`].
    fn text(&mut self, piece: &str) -> ControlFlow<()>;
    /// Prompt positions evaluated so far, of `total`, after each prefill chunk.
    fn prefill_progress(&mut self, _done: usize, _total: usize) {}
}

impl<F: FnMut(&str) -> ControlFlow<()>> GenerateSink for F {
    fn text(&mut self, piece: &str) -> ControlFlow<()> {
        self(piece)
    }
}

#[derive(Debug)]
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

/// Holds back generated text that could be the start of a stop string.
pub(crate) struct StopMatcher {
    stop: Vec<String>,
    /// Everything generated so far.
    pub(crate) text: String,
    /// Bytes of `text` already released.
    released: usize,
}

impl StopMatcher {
    pub(crate) fn new(stop: &[String]) -> Self {
        StopMatcher {
            stop: stop.to_vec(),
            text: String::new(),
            released: 0,
        }
    }

    /// Appends `piece`; returns the text that can be released and whether a stop string
    /// was found (the text then ends before it).
    pub(crate) fn push(&mut self, piece: &str) -> (&str, bool) {
        let from = self.released;
        self.text.push_str(piece);
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        // A match must end in the new piece; it may start up to `longest` bytes earlier.
        let mut window = from.saturating_sub(longest);
        while !self.text.is_char_boundary(window) {
            window -= 1;
        }
        let found = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[window..].find(s.as_str()).map(|i| window + i))
            .min();
        if let Some(end) = found {
            let end = end.max(from);
            self.text.truncate(end);
            self.released = end;
            return (&self.text[from..end], true);
        }
        // Hold back the longest suffix that is a prefix of a stop string.
        let held = self
            .stop
            .iter()
            .flat_map(|s| (1..s.len()).rev().map(move |n| &s.as_bytes()[..n]))
            .filter(|p| self.text.as_bytes().ends_with(p))
            .map(<[u8]>::len)
            .max()
            .unwrap_or(0);
        let end = (self.text.len() - held).max(from);
        self.released = end;
        (&self.text[from..end], false)
    }

    /// Releases what is held back (generation ended for another reason).
    pub(crate) fn finish(&mut self) -> &str {
        let from = self.released;
        self.released = self.text.len();
        &self.text[from..]
    }
}

/// Generates after `new_tokens` (appended to what the session holds), streaming text to
/// `sink` as soon as it forms whole UTF-8 characters that cannot start a stop string.
pub fn generate<H: Controller>(
    session: &mut Session<'_, H>,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    new_tokens: &[u32],
    opts: &GenerateOptions,
    sink: &mut dyn GenerateSink,
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
    let logits = session.prefill_with_progress(new_tokens, &mut |done, total| {
        sink.prefill_progress(done, total)
    })?;
    let mut next = if opts.max_tokens > 0 {
        Some(sampler.sample(logits))
    } else {
        None
    };
    let prefill = t0.elapsed();
    let mut stream = StreamDecoder::new(tokenizer);
    let mut matcher = StopMatcher::new(&opts.stop);
    let mut tokens = Vec::new();
    let t1 = Instant::now();
    let stop_reason = loop {
        let Some(token) = next else {
            break StopReason::MaxTokens;
        };
        if tokenizer.is_eog(token) {
            break StopReason::Eos;
        }
        tokens.push(token);
        sampler.accept(token);
        let piece = stream.push(token);
        let (release, stopped) = matcher.push(&piece);
        let flow = sink.text(release);
        if stopped {
            break StopReason::StopSequence;
        }
        if flow.is_break() {
            break StopReason::Cancelled;
        }
        if tokens.len() >= opts.max_tokens {
            break StopReason::MaxTokens;
        }
        if session.history().len() >= session.n_ctx() {
            break StopReason::ContextFull;
        }
        next = Some(sampler.sample(session.decode(token)?));
    };
    if stop_reason != StopReason::StopSequence {
        let rest = stream.flush();
        let (release, stopped) = matcher.push(&rest);
        let mut tail = release.to_string();
        if !stopped {
            tail.push_str(matcher.finish());
        }
        if !tail.is_empty() {
            // The run is over: a request to stop changes nothing now.
            let _ = sink.text(&tail);
        }
    }
    Ok(Generation {
        prompt_tokens: new_tokens.len(),
        tokens,
        text: matcher.text,
        stop_reason,
        prefill,
        decode: t1.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stop: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stop);
        let mut out = Vec::new();
        for p in pieces {
            let (r, hit) = m.push(p);
            out.push(r.to_string());
            if hit {
                return (out, true, m.text);
            }
        }
        out.push(m.finish().to_string());
        (out, false, m.text)
    }

    #[test]
    fn stop_strings_end_the_text_before_them_and_hold_back_prefixes() {
        assert_eq!(
            run(&["\nUser:"], &["Hi", " there\n", "Us", "er: more"]),
            (
                vec!["Hi".into(), " there".into(), "".into(), "".into()],
                true,
                "Hi there".into()
            )
        );
        // A held-back prefix that does not complete is released.
        assert_eq!(
            run(&["END"], &["a E", "N", "x"]),
            (
                vec!["a ".into(), "".into(), "ENx".into(), "".into()],
                false,
                "a ENx".into()
            )
        );
        // The earliest of several stop strings wins; multi-byte text stays whole.
        assert_eq!(
            run(&["é!", "b"], &["aé", "!b"]),
            (vec!["a".into(), "".into()], true, "a".into())
        );
        assert_eq!(
            run(&[], &["x", "y"]),
            (vec!["x".into(), "y".into(), "".into()], false, "xy".into())
        );
    }
}

//! The engine thread's loop (see [`super::engine`]): intake and checking of requests,
//! cancellations, deadlines and the shutdown bound, admission into slots, one prefill chunk
//! and one decode step of every generating sequence per iteration.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::engine::{
    EngineConfig, Event, Finish, FinishReason, Job, ModelInfo, Prompt, Request, RequestError,
    Shared, SubmitError, LOADING, READY, STOPPING,
};
use super::metrics::Metrics;
use crate::chat::ChatTemplate;
use crate::gguf::GgufFile;
use crate::model::{Batch, KvCache, Llama, Logits, Scratch};
use crate::sampling::Sampler;
use crate::session::{available_memory, context_bytes, SessionConfig, StopMatcher};
use crate::skip::{ParamsError, PerSequence, Policy, SkipController, SkipOptions, SkipParams};
use crate::skip_setup::{self, SourcedProfile};
use crate::team::Team;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// One request in a slot.
struct Seq<'t> {
    job: Job,
    label: String,
    ids: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The token to feed at the next decode step.
    next: Option<u32>,
    generated: Vec<u32>,
    max_tokens: usize,
    sampler: Sampler,
    text: StreamDecoder<'t>,
    stop: StopMatcher,
    deadline: Option<Instant>,
    /// ShortGPT's removed layers: sequences that remove different layers decode apart.
    removed: Vec<usize>,
    first_token: bool,
    /// A stop string ended the text (nothing held back is released).
    hit_stop: bool,
}

/// A request read and checked, waiting for a slot.
struct Ready {
    job: Job,
    ids: Vec<u32>,
    controller: SkipController,
    label: String,
}

fn label_of(o: &SkipOptions) -> String {
    match (o.policy, o.max_kld) {
        (Policy::None, _) => "none".into(),
        (p, Some(k)) => format!("{}:max-kld={k}", p.name()),
        (p, None) => format!(
            "{}{}:{}",
            p.name(),
            o.compensate.suffix(),
            o.ratio.unwrap_or(0.25)
        ),
    }
}

pub(super) fn run(
    config: &EngineConfig,
    jobs: mpsc::Receiver<Job>,
    shared: &Shared,
) -> anyhow::Result<()> {
    let path = &config.model;
    let file = GgufFile::open(path)?;
    let model = Llama::load_with(&file, config.load)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let template = crate::conversation::template_of(&file, &tokenizer).ok();
    let profile = skip_setup::load_profile(config.skip_profile.as_deref(), &file)?;
    let n_ctx = config.n_ctx.max(1);
    let session = SessionConfig::new(n_ctx, config.threads);
    let per_slot = context_bytes(&model, &session)
        .ok_or_else(|| anyhow::anyhow!("-c {n_ctx}: the KV cache size overflows"))?;
    let need = per_slot.saturating_mul(config.parallel as u64);
    if let Some(avail) = available_memory() {
        anyhow::ensure!(
            need <= avail,
            "--parallel {} × -c {n_ctx} needs {need} bytes ({:.2} GB) of KV cache, but only \
             {avail} bytes are available; lower --parallel or -c/--ctx",
            config.parallel,
            need as f64 / 1e9
        );
    }
    let default = skip_setup::build(&config.skip, profile.as_ref(), &model)?;
    let team = Team::new(config.threads.max(1))?;
    let rows = config.prefill_chunk.max(config.parallel);
    let scratch = team.install(|| Scratch::new(&model, rows, n_ctx));
    let mut caches: Vec<KvCache> = (0..config.parallel)
        .map(|_| model.new_cache(n_ctx))
        .collect();
    let mut controllers: PerSequence<SkipController> = PerSequence::new(config.parallel);
    let id = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let _ = shared.info.set(ModelInfo {
        id,
        path: path.clone(),
        parallel: config.parallel,
        n_ctx,
        has_chat_template: template.is_some(),
        skip: default.description,
    });
    let metrics = &shared.metrics;
    metrics.set_slots(config.parallel);
    let _ = shared
        .state
        .compare_exchange(LOADING, READY, Ordering::SeqCst, Ordering::SeqCst);

    let mut step = Step {
        model: &model,
        team,
        scratch,
    };
    let ctx = Context {
        model: &model,
        tokenizer: &tokenizer,
        template: template.as_ref(),
        profile: profile.as_ref(),
        default: &config.skip,
        n_ctx,
    };
    let mut slots: Vec<Option<Seq>> = (0..config.parallel).map(|_| None).collect();
    let mut waiting: VecDeque<Ready> = VecDeque::new();
    let mut rows_tok: Vec<u32> = Vec::new();
    let mut rows_seq: Vec<usize> = Vec::new();
    let mut disconnected = false;
    loop {
        let stopping = shared.state.load(Ordering::SeqCst) == STOPPING;
        let idle = slots.iter().all(Option::is_none) && waiting.is_empty();
        if stopping && idle {
            break;
        }
        // ---- intake: read new requests (blocking briefly when there is nothing to do) ----
        let mut intake = |job: Job| {
            if stopping {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                let _ = job.events.send(Event::Refused(SubmitError::ShuttingDown));
                return;
            }
            match ctx.check(&job.request) {
                Ok((ids, controller, label)) => {
                    let _ = job.events.send(Event::Accepted {
                        prompt_tokens: ids.len(),
                    });
                    waiting.push_back(Ready {
                        job,
                        ids,
                        controller,
                        label,
                    });
                }
                Err(e) => {
                    shared.queued.fetch_sub(1, Ordering::SeqCst);
                    metrics.request_rejected();
                    let _ = job.events.send(Event::Error(e));
                }
            }
        };
        if idle && !disconnected {
            match jobs.recv_timeout(Duration::from_millis(50)) {
                Ok(job) => intake(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => disconnected = true,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => intake(job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if disconnected && slots.iter().all(Option::is_none) && waiting.is_empty() {
            break;
        }

        // ---- cancellations, deadlines and the shutdown bound ----
        waiting.retain(|r| {
            let open = !r.job.events.is_closed();
            if !open {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                metrics.cancelled();
            }
            open
        });
        let cut = stopping
            && shared
                .shutdown_by
                .lock()
                .ok()
                .and_then(|b| *b)
                .is_some_and(|by| Instant::now() >= by);
        if cut {
            for r in waiting.drain(..) {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                let _ = r.job.events.send(Event::Refused(SubmitError::ShuttingDown));
            }
        }
        for q in 0..slots.len() {
            let Some(seq) = &slots[q] else { continue };
            let end = if seq.job.events.is_closed() {
                metrics.cancelled();
                Some(None)
            } else if cut {
                Some(Some(FinishReason::Shutdown))
            } else if seq.deadline.is_some_and(|d| Instant::now() >= d) {
                Some(Some(FinishReason::Deadline))
            } else {
                None
            };
            if let Some(reason) = end {
                end_seq(&mut slots, &mut controllers, q, reason, metrics);
            }
        }

        // ---- admissions: waiting requests into free slots ----
        for q in 0..slots.len() {
            if slots[q].is_some() {
                continue;
            }
            let Some(r) = waiting.pop_front() else { break };
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            caches[q].clear();
            let mut sampler = Sampler::new(r.job.request.sampling.clone());
            for &t in &r.ids {
                sampler.accept(t);
            }
            let room = n_ctx - r.ids.len();
            let max_tokens = r.job.request.max_tokens.map_or(room, |m| m.min(room));
            let deadline = r.job.request.deadline.map(|d| r.job.submitted + d);
            let removed = r.controller.params().removed.clone();
            let stop = StopMatcher::new(&r.job.request.stop);
            controllers.set(q, Some(r.controller));
            metrics.prompt_tokens(r.ids.len());
            metrics.slot_taken();
            slots[q] = Some(Seq {
                job: r.job,
                label: r.label,
                ids: r.ids,
                prefilled: 0,
                next: None,
                generated: Vec::new(),
                max_tokens,
                sampler,
                text: StreamDecoder::new(&tokenizer),
                stop,
                deadline,
                removed,
                first_token: true,
                hit_stop: false,
            });
        }
        metrics.set_queue_depth(shared.queued.load(Ordering::SeqCst));

        // ---- one prefill chunk: the prompt that started first ----
        let prefilling = slots
            .iter()
            .enumerate()
            .filter_map(|(q, s)| s.as_ref().map(|s| (q, s)))
            .filter(|(_, s)| s.prefilled < s.ids.len())
            .min_by_key(|(_, s)| s.job.submitted)
            .map(|(q, _)| q);
        if let Some(q) = prefilling {
            let seq = slots[q].as_mut().expect("found above");
            let from = seq.prefilled;
            let to = seq.ids.len().min(from + config.prefill_chunk);
            let last = to == seq.ids.len();
            rows_seq.clear();
            rows_seq.resize(to - from, q);
            let batch = Batch {
                tokens: &seq.ids[from..to],
                prompt: true,
                logits: if last { Logits::Last } else { Logits::None },
            };
            // Prompt chunks take the fast batched path (they depend on the prompt only).
            let out = step.run(&mut caches, &mut controllers, &rows_seq, &batch, false);
            match out {
                Ok(logits) => {
                    seq.prefilled = to;
                    if last {
                        let t = seq.sampler.sample(&logits);
                        if let Some(reason) = seq.emit(t, &tokenizer, n_ctx, &caches[q], metrics) {
                            end_seq(&mut slots, &mut controllers, q, Some(reason), metrics);
                        }
                    }
                }
                Err(e) => fail(&mut slots, &mut controllers, q, &e.to_string(), metrics),
            }
        }

        // ---- one decode step: every generating sequence, one row each ----
        let mut groups: Vec<&[usize]> = Vec::new();
        for s in slots.iter().flatten() {
            if s.next.is_some() && !groups.contains(&&s.removed[..]) {
                groups.push(&s.removed);
            }
        }
        let groups: Vec<Vec<usize>> = groups.into_iter().map(<[usize]>::to_vec).collect();
        for removed in groups {
            rows_tok.clear();
            rows_seq.clear();
            for (q, s) in slots.iter().enumerate() {
                if let Some(s) = s {
                    if let (Some(t), true) = (s.next, s.removed == removed) {
                        rows_tok.push(t);
                        rows_seq.push(q);
                    }
                }
            }
            let batch = Batch {
                tokens: &rows_tok,
                prompt: false,
                logits: Logits::All,
            };
            let t0 = Instant::now();
            // Decode rows are exact: each the bits of its sequence decoded alone.
            let out = step.run(&mut caches, &mut controllers, &rows_seq, &batch, true);
            let logits = match out {
                Ok(l) => l,
                Err(e) => {
                    for &q in &rows_seq {
                        fail(&mut slots, &mut controllers, q, &e.to_string(), metrics);
                    }
                    continue;
                }
            };
            metrics.decode_step(rows_seq.len(), t0.elapsed());
            let nv = model.config.n_vocab;
            for (row, &q) in rows_seq.iter().enumerate() {
                let seq = slots[q].as_mut().expect("a row's slot is busy");
                let t = seq.sampler.sample(&logits[row * nv..(row + 1) * nv]);
                if let Some(reason) = seq.emit(t, &tokenizer, n_ctx, &caches[q], metrics) {
                    end_seq(&mut slots, &mut controllers, q, Some(reason), metrics);
                }
            }
        }
        metrics.set_queue_depth(shared.queued.load(Ordering::SeqCst));
    }
    Ok(())
}

/// Frees slot `q` and its controller; reports the finish (`None`: the client went away).
fn end_seq(
    slots: &mut [Option<Seq>],
    controllers: &mut PerSequence<SkipController>,
    q: usize,
    reason: Option<FinishReason>,
    m: &Metrics,
) {
    let stats = controllers
        .get(q)
        .map_or((0, 0), |c| (c.stats.skipped_ffn, c.stats.eligible_ffn));
    controllers.set(q, None);
    match (slots[q].take(), reason) {
        (Some(seq), Some(reason)) => finish(seq, reason, stats, m),
        (Some(_), None) => m.slot_freed(),
        (None, _) => {}
    }
}

fn fail(
    slots: &mut [Option<Seq>],
    controllers: &mut PerSequence<SkipController>,
    q: usize,
    message: &str,
    m: &Metrics,
) {
    if let Some(seq) = slots[q].take() {
        m.slot_freed();
        let _ = seq.job.events.send(Event::Error(RequestError {
            param: None,
            message: message.into(),
        }));
    }
    controllers.set(q, None);
}

fn finish(mut seq: Seq, reason: FinishReason, (skipped, eligible): (u64, u64), m: &Metrics) {
    if !seq.hit_stop {
        // Text held back for a stop string that never completed, and incomplete UTF-8.
        let rest = seq.text.flush();
        let (release, _) = seq.stop.push(&rest);
        let mut tail = release.to_string();
        tail.push_str(seq.stop.finish());
        if !tail.is_empty() && seq.job.request.stream_text {
            let _ = seq.job.events.send(Event::Text(tail));
        }
    }
    m.slot_freed();
    m.finished(reason.as_str(), &seq.label, skipped, eligible);
    let ratio = if eligible == 0 {
        0.0
    } else {
        skipped as f64 / eligible as f64
    };
    let _ = seq.job.events.send(Event::Done(Finish {
        reason,
        text: std::mem::take(&mut seq.stop.text),
        prompt_tokens: seq.ids.len(),
        completion_tokens: seq.generated.len(),
        tokens: std::mem::take(&mut seq.generated),
        ffn_skip_ratio: ratio,
        policy: seq.label,
    }));
}

impl Seq<'_> {
    /// Takes sampled token `t`: ends the sequence (returns why) or sends its text and queues
    /// it for the next decode step.
    fn emit(
        &mut self,
        t: u32,
        tokenizer: &Tokenizer,
        n_ctx: usize,
        cache: &KvCache,
        m: &Metrics,
    ) -> Option<FinishReason> {
        self.next = None;
        if self.first_token {
            self.first_token = false;
            m.first_token(self.job.submitted.elapsed());
        }
        if tokenizer.is_eog(t) {
            return Some(FinishReason::Stop);
        }
        self.generated.push(t);
        m.generated_tokens(1);
        self.sampler.accept(t);
        let piece = self.text.push(t);
        let (release, stopped) = self.stop.push(&piece);
        if !release.is_empty() && self.job.request.stream_text {
            let _ = self.job.events.send(Event::Text(release.to_string()));
        }
        if stopped {
            self.hit_stop = true;
            return Some(FinishReason::Stop);
        }
        if self.generated.len() >= self.max_tokens {
            return Some(FinishReason::Length);
        }
        if cache.len >= n_ctx {
            return Some(FinishReason::ContextFull);
        }
        self.next = Some(t);
        None
    }
}

/// What checking a request needs.
struct Context<'a> {
    model: &'a Llama<'a>,
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    profile: Option<&'a SourcedProfile>,
    default: &'a SkipOptions,
    n_ctx: usize,
}

impl Context<'_> {
    /// The prompt's ids, its controller and the policy label, or why the request cannot run.
    fn check(&self, r: &Request) -> Result<(Vec<u32>, SkipController, String), RequestError> {
        let (ids, field) = match &r.prompt {
            Prompt::Text(t) => (self.tokenizer.encode(t, true, true), "prompt"),
            Prompt::Chat(messages) => {
                let Some(template) = self.template else {
                    return Err(RequestError::new(
                        "messages",
                        "this model has no chat template (tokenizer.chat_template): use /v1/completions with a prompt",
                    ));
                };
                let text = template.render(messages, true).map_err(|e| {
                    RequestError::new("messages", format!("the chat template failed: {e:#}"))
                })?;
                (self.tokenizer.encode(&text, true, true), "messages")
            }
        };
        if ids.is_empty() {
            return Err(RequestError::new(
                field,
                format!("`{field}` is empty after tokenization"),
            ));
        }
        if ids.len() >= self.n_ctx {
            return Err(RequestError::new(
                field,
                format!(
                    "the prompt has {} tokens but a slot's context holds {} (prompt and answer together); send a shorter prompt or start the server with a larger -c/--ctx",
                    ids.len(),
                    self.n_ctx
                ),
            ));
        }
        let opts = r.skip.clone().unwrap_or_else(|| self.default.clone());
        let params = SkipParams::resolve(
            &opts,
            self.model.config.n_layer,
            self.profile.map(|p| (&p.profile, p.from.as_str())),
        )
        .map_err(|e| RequestError::new("ffnskip", format!("ffnskip: {}", request_phrase(&e))))?;
        let controller = SkipController::new(params, self.model.layer_bytes());
        Ok((ids, controller, label_of(&opts)))
    }
}

/// `e` in the words of the request's `ffnskip` fields.
fn request_phrase(e: &ParamsError) -> String {
    match e {
        ParamsError::RatioOutOfRange(r) => format!("skip_ratio {r} is out of range (expected 0..1)"),
        ParamsError::NeedsProfile(_) | ParamsError::NeedsCompensation(_) | ParamsError::NeedsKldCurve(_) => format!(
            "{e}; this server has none that fits: start it with --skip-profile PROFILE.json (from `ffnskip calibrate`) or a model with an embedded profile"
        ),
        _ => e.to_string(),
    }
}

/// One forward call of the engine's rows: the model, its thread team and scratch.
struct Step<'a> {
    model: &'a Llama<'a>,
    team: Team,
    scratch: Scratch,
}

impl Step<'_> {
    /// `batch` over the sequences `seqs` (one per row); the requested logits, copied.
    fn run(
        &mut self,
        caches: &mut [KvCache],
        controllers: &mut PerSequence<SkipController>,
        seqs: &[usize],
        batch: &Batch,
        exact: bool,
    ) -> Result<Vec<f32>, crate::model::ForwardError> {
        controllers.route(seqs);
        self.scratch.batch_exact = exact;
        let (model, scratch) = (self.model, &mut self.scratch);
        self.team.install(|| {
            model
                .forward_seqs(caches, seqs, scratch, batch, controllers)
                .map(|l| l.to_vec())
        })
    }
}

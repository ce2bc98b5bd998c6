//! The batching engine (DESIGN §1, "Serving"): one thread owns the model, a KV cache per
//! sequence slot and every sequence's sampler and skip controller. Each step it takes new
//! requests off a bounded queue, drops cancelled ones, starts waiting requests in free slots,
//! prefills one chunk of one prompt, and decodes one token for every generating sequence as
//! the rows of one forward call. Each request reads its events from its own channel;
//! dropping the [`Stream`] cancels it before the next token.
//!
//! With greedy sampling a sequence gets the same tokens whatever else is in the batch: decode
//! rows run exact (each row the bits of decoding it alone), and a prompt's chunks depend only
//! on the prompt. The library API ([`Engine`]) needs no HTTP; `examples/engine.rs` shows it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tmpsc;

use super::metrics::Metrics;
use crate::chat::{ChatTemplate, Message};
use crate::gguf::GgufFile;
use crate::model::{Batch, KvCache, Llama, LoadOptions, Logits, Scratch};
use crate::sampling::{Sampler, SamplerConfig};
use crate::session::{available_memory, context_bytes, SessionConfig, StopMatcher};
use crate::skip::{ParamsError, PerSequence, Policy, SkipController, SkipOptions, SkipParams};
use crate::skip_setup::{self, SourcedProfile};
use crate::team::Team;
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub model: PathBuf,
    pub load: LoadOptions,
    /// Sequence slots decoded together (`--parallel`).
    pub parallel: usize,
    /// Positions per slot (prompt + generated).
    pub n_ctx: usize,
    pub threads: usize,
    /// Requests waiting for a slot, at most; more are refused ([`SubmitError::QueueFull`]).
    pub queue: usize,
    /// Prompt rows per forward call: a long prompt is prefilled in chunks between decode
    /// steps, so it does not stall the other streams.
    pub prefill_chunk: usize,
    /// The policy of requests that name none (`--skip …`).
    pub skip: SkipOptions,
    /// `--skip-profile`; else the profile embedded in the model, if any.
    pub skip_profile: Option<PathBuf>,
}

impl EngineConfig {
    pub fn new(model: PathBuf) -> Self {
        EngineConfig {
            model,
            load: LoadOptions::default(),
            parallel: 4,
            n_ctx: 2048,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            queue: 64,
            prefill_chunk: 128,
            skip: SkipOptions::none(),
            skip_profile: None,
        }
    }
}

/// What to complete.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Raw text, tokenized as llama.cpp does (BOS if the model asks, special tokens parsed).
    Text(String),
    /// Messages rendered through the model's chat template, ending where the answer begins.
    Chat(Vec<Message>),
}

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Prompt,
    /// Tokens to generate at most; `None`: until end of generation or a full context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplerConfig,
    /// Generation ends before the first of these in the text.
    pub stop: Vec<String>,
    /// This request's policy; `None`: the engine's default.
    pub skip: Option<SkipOptions>,
    /// Wall time from submission after which generation ends (`finish_reason` `length`).
    pub deadline: Option<Duration>,
    /// Send the text as it forms ([`Event::Text`]); off, only [`Finish::text`] carries it
    /// (no wake-up of the reader per token).
    pub stream_text: bool,
}

impl Request {
    pub fn new(prompt: Prompt) -> Self {
        Request {
            prompt,
            max_tokens: None,
            sampling: SamplerConfig::greedy(),
            stop: Vec::new(),
            skip: None,
            deadline: None,
            stream_text: true,
        }
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The slot's context is full.
    ContextFull,
    /// The request's deadline passed.
    Deadline,
    /// The server is shutting down and its grace period ended.
    Shutdown,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            _ => "length",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Deadline => "deadline",
            FinishReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    /// The whole generated text (what the `Text` events carried, together).
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The token ids generated (without an end-of-generation token).
    pub tokens: Vec<u32>,
    /// Skipped FFN blocks / eligible ones over this sequence's counted tokens.
    pub ffn_skip_ratio: f64,
    /// The policy as `NAME[+COMP]:RATIO` (`none` for the full model).
    pub policy: String,
}

/// A request the engine refused after reading it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// The request field at fault (`messages`, `prompt`, `ffnskip`, …), if one is.
    pub param: Option<String>,
    pub message: String,
}

impl RequestError {
    fn new(param: &str, message: impl Into<String>) -> Self {
        RequestError {
            param: Some(param.into()),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Read, valid, and waiting for (or given) a slot.
    Accepted {
        prompt_tokens: usize,
    },
    /// Generated text, released as soon as it is whole UTF-8 and cannot start a stop string.
    Text(String),
    Done(Finish),
    Error(RequestError),
}

/// A request's events, in order: `Accepted`, then `Text`s and `Done`, or one `Error`.
/// Dropping it cancels the request; its slot is freed before the next decode step.
pub struct Stream {
    rx: tmpsc::UnboundedReceiver<Event>,
}

impl Stream {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// [`Stream::next`] for callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {queued} requests are waiting for a slot (the queue holds {capacity}); retry later")]
    QueueFull { queued: usize, capacity: usize },
    #[error("the model is still loading")]
    Loading,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the engine stopped: {0}")]
    Failed(String),
}

/// Facts about the loaded model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The file's stem: the `model` field clients send.
    pub id: String,
    pub path: PathBuf,
    pub parallel: usize,
    pub n_ctx: usize,
    pub has_chat_template: bool,
    /// The default policy, as the startup line describes it.
    pub skip: String,
}

const LOADING: usize = 0;
const READY: usize = 1;
const STOPPING: usize = 2;
const STOPPED: usize = 3;

struct Shared {
    state: AtomicUsize,
    info: OnceLock<ModelInfo>,
    error: OnceLock<String>,
    /// Submitted and not yet in a slot (nor refused or cancelled): the queue's depth.
    queued: AtomicUsize,
    /// When a shutdown must have cancelled what is still running.
    shutdown_by: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

struct Job {
    request: Request,
    events: tmpsc::UnboundedSender<Event>,
    submitted: Instant,
}

pub struct Engine {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    capacity: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread, which loads the model; [`Engine::wait_ready`] waits for it.
    pub fn start(config: EngineConfig, metrics: Arc<Metrics>) -> anyhow::Result<Engine> {
        anyhow::ensure!(config.parallel >= 1, "--parallel must be at least 1");
        anyhow::ensure!(
            config.prefill_chunk >= 1,
            "the prefill chunk must be at least 1"
        );
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            state: AtomicUsize::new(LOADING),
            info: OnceLock::new(),
            error: OnceLock::new(),
            queued: AtomicUsize::new(0),
            shutdown_by: Mutex::new(None),
            metrics,
        });
        let capacity = config.queue;
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ffnskip-engine".into())
            .spawn(move || {
                if let Err(e) = run(&config, rx, &sh) {
                    let _ = sh.error.set(format!("{e:#}"));
                }
                sh.state.store(STOPPED, Ordering::SeqCst);
            })?;
        Ok(Engine {
            jobs: tx,
            shared,
            capacity,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The model, once loaded.
    pub fn info(&self) -> Option<&ModelInfo> {
        self.shared.info.get()
    }

    pub fn is_ready(&self) -> bool {
        self.shared.state.load(Ordering::SeqCst) == READY
    }

    /// Shutting down: no new requests, running ones finishing.
    pub fn is_stopping(&self) -> bool {
        self.shared.state.load(Ordering::SeqCst) == STOPPING
    }

    /// Why the engine stopped, if it failed (the model did not load, …).
    pub fn error(&self) -> Option<&str> {
        self.shared.error.get().map(String::as_str)
    }

    /// Blocks until the model is loaded; the load error if it failed.
    pub fn wait_ready(&self) -> anyhow::Result<&ModelInfo> {
        loop {
            match self.shared.state.load(Ordering::SeqCst) {
                LOADING => std::thread::sleep(Duration::from_millis(10)),
                READY => return self.info().ok_or_else(|| anyhow::anyhow!("no model info")),
                _ => anyhow::bail!(
                    "{}",
                    self.error()
                        .unwrap_or("the engine stopped before it was ready")
                ),
            }
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Queues `request`; its events arrive on the returned stream.
    pub fn submit(&self, request: Request) -> Result<Stream, SubmitError> {
        match self.shared.state.load(Ordering::SeqCst) {
            READY => {}
            LOADING => return Err(SubmitError::Loading),
            STOPPING => return Err(SubmitError::ShuttingDown),
            _ => {
                return Err(SubmitError::Failed(
                    self.error().unwrap_or("stopped").to_string(),
                ))
            }
        }
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.capacity {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull {
                queued,
                capacity: self.capacity,
            });
        }
        self.shared.metrics.set_queue_depth(queued + 1);
        let (tx, rx) = tmpsc::unbounded_channel();
        let job = Job {
            request,
            events: tx,
            submitted: Instant::now(),
        };
        if self.jobs.send(job).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Failed("the engine thread has exited".into()));
        }
        Ok(Stream { rx })
    }

    /// Stops taking requests; what runs may finish within `grace`, then it is ended with
    /// [`FinishReason::Shutdown`]. Returns once the engine thread has exited.
    pub fn shutdown(&self, grace: Duration) {
        if let Ok(mut by) = self.shared.shutdown_by.lock() {
            by.get_or_insert(Instant::now() + grace);
        }
        let _ =
            self.shared
                .state
                .compare_exchange(READY, STOPPING, Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.shared.state.compare_exchange(
            LOADING,
            STOPPING,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

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

fn run(config: &EngineConfig, jobs: mpsc::Receiver<Job>, shared: &Shared) -> anyhow::Result<()> {
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
    let mut scratch = team.install(|| Scratch::new(&model, rows, n_ctx));
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
                let _ = job.events.send(Event::Error(RequestError {
                    param: None,
                    message: "the server is shutting down".into(),
                }));
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
                let _ = r.job.events.send(Event::Error(RequestError {
                    param: None,
                    message: "the server shut down before this request started".into(),
                }));
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
            controllers.route(&rows_seq);
            scratch.batch_exact = false;
            let batch = Batch {
                tokens: &seq.ids[from..to],
                prompt: true,
                logits: if last { Logits::Last } else { Logits::None },
            };
            let out = team.install(|| {
                model
                    .forward_seqs(
                        &mut caches,
                        &rows_seq,
                        &mut scratch,
                        &batch,
                        &mut controllers,
                    )
                    .map(|l| l.to_vec())
            });
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
            controllers.route(&rows_seq);
            scratch.batch_exact = true;
            let batch = Batch {
                tokens: &rows_tok,
                prompt: false,
                logits: Logits::All,
            };
            let t0 = Instant::now();
            let out = team.install(|| {
                model
                    .forward_seqs(
                        &mut caches,
                        &rows_seq,
                        &mut scratch,
                        &batch,
                        &mut controllers,
                    )
                    .map(|l| l.to_vec())
            });
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

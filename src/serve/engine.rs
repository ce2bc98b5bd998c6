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
//! This file is the API; the thread's loop is in `scheduler.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tmpsc;

use super::metrics::Metrics;
use crate::chat::Message;
use crate::model::LoadOptions;
use crate::sampling::SamplerConfig;
use crate::skip::SkipOptions;

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
    pub(super) fn new(param: &str, message: impl Into<String>) -> Self {
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
    /// Refused for the engine's state, not the request's content: the server began shutting
    /// down after the request was queued. Answered as [`Engine::submit`]'s error would be.
    Refused(SubmitError),
}

/// A request's events, in order: `Accepted`, then `Text`s and `Done`, or one `Error` or
/// `Refused` (before or after `Accepted`).
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

pub(super) const LOADING: usize = 0;
pub(super) const READY: usize = 1;
pub(super) const STOPPING: usize = 2;
pub(super) const STOPPED: usize = 3;

/// What the engine thread and the [`Engine`] handle share.
pub(super) struct Shared {
    pub(super) state: AtomicUsize,
    pub(super) info: OnceLock<ModelInfo>,
    pub(super) error: OnceLock<String>,
    /// Submitted and not yet in a slot (nor refused or cancelled): the queue's depth.
    pub(super) queued: AtomicUsize,
    /// When a shutdown must have cancelled what is still running.
    pub(super) shutdown_by: Mutex<Option<Instant>>,
    pub(super) metrics: Arc<Metrics>,
}

/// A submitted request and where its events go.
pub(super) struct Job {
    pub(super) request: Request,
    pub(super) events: tmpsc::UnboundedSender<Event>,
    pub(super) submitted: Instant,
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
                if let Err(e) = super::scheduler::run(&config, rx, &sh) {
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

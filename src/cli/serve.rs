//! `ffnskip serve`: the OpenAI-compatible server (llama-server's flags where they exist).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{model_path, threads, LoadArgs, SkipArgs};
use crate::serve::http::{router, AppState};
use crate::serve::{Engine, EngineConfig, Metrics};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// GGUF model file, or a catalogue name fetched on first use (default: smollm2-135m).
    #[arg(short = 'm', long = "model", value_name = "PATH|NAME")]
    pub model: Option<std::path::PathBuf>,
    /// Address to bind. Loopback by default; anything else exposes the server to the network
    /// and is your explicit choice (use --api-key then).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one; the line `listening on http://HOST:PORT` on stdout says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together, each in its own KV cache slot.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: u16,
    /// Context per slot in tokens, prompt and answer together (default: min(2048, the
    /// model's training context)). Unlike llama-server's -c this is not divided among slots.
    #[arg(short = 'c', long = "ctx", value_parser = clap::value_parser!(u32).range(16..))]
    pub ctx: Option<u32>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Require `Authorization: Bearer KEY` on /v1/* (/health and /metrics stay open).
    #[arg(long = "api-key", env = "FFNSKIP_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests waiting for a slot, at most; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Seconds a request may run (queue, prompt and generation) before it ends with
    /// finish_reason "length".
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Largest request body in bytes (413 above).
    #[arg(long = "max-body", default_value_t = 2 << 20)]
    pub max_body: usize,
    /// Prompt tokens per forward call; prompts are prefilled in such chunks between decode
    /// steps so they do not stall the other streams.
    #[arg(long = "prefill-chunk", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub prefill_chunk: u32,
    /// Seconds the running requests may go on after SIGTERM or Ctrl-C before they are ended.
    #[arg(long = "shutdown-grace", default_value_t = 10)]
    pub shutdown_grace: u64,
    #[command(flatten)]
    pub load: LoadArgs,
    /// The policy of requests without an `ffnskip` field.
    #[command(flatten)]
    pub skip: SkipArgs,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let path = model_path(&a.model)?;
    let ctx = match a.ctx {
        Some(c) => c as usize,
        None => {
            let file = crate::gguf::GgufFile::open(&path)?;
            let train = crate::model::LlamaConfig::from_gguf(&file)?.n_ctx_train;
            2048.min(train).max(16)
        }
    };
    let config = EngineConfig {
        model: path,
        load: a.load.options(),
        parallel: a.parallel as usize,
        n_ctx: ctx,
        threads: threads(a.threads.map(usize::from)),
        queue: a.queue,
        prefill_chunk: a.prefill_chunk as usize,
        skip: a.skip.options(None),
        skip_profile: a.skip.profile.clone(),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ffnskip-http")
        .enable_all()
        .build()?;
    let grace = Duration::from_secs(a.shutdown_grace);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host, a.port))
            .await
            .map_err(|e| anyhow::anyhow!("--host {} --port {}: {e}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        if !a.host.is_loopback() {
            tracing::warn!("bound to {addr}: reachable from the network");
        }
        let engine = Arc::new(Engine::start(config, Arc::new(Metrics::new()))?);
        let state = Arc::new(AppState::new(
            engine.clone(),
            a.api_key.clone(),
            Duration::from_secs(a.timeout),
        ));
        let app = router(state, a.max_body);
        super::outln(&format!("listening on http://{addr}"))?;
        tracing::info!("loading the model; /health answers 503 until it is ready");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The model loads (or fails to) while the server already answers /health.
        let watch = {
            let engine = engine.clone();
            let stop_tx = stop_tx.clone();
            tokio::task::spawn_blocking(move || match engine.wait_ready() {
                Ok(info) => {
                    tracing::info!(
                        "ready: {} ({} slots × {} positions); default policy: {}",
                        info.id,
                        info.parallel,
                        info.n_ctx,
                        info.skip
                    );
                    Ok(())
                }
                Err(e) => {
                    let _ = stop_tx.send(true);
                    Err(e)
                }
            })
        };
        let signal = {
            let engine = engine.clone();
            let (stop_tx, mut stop_rx) = (stop_tx.clone(), stop_rx.clone());
            async move {
                tokio::select! {
                    s = shutdown_signal() => tracing::info!("{s}: finishing what runs (at most {} s)", grace.as_secs()),
                    _ = stop_rx.wait_for(|&stop| stop) => {}
                }
                let _ = stop_tx.send(true);
                // New requests get 503 while running ones finish (within the grace); the
                // listener closes once the engine has stopped.
                let e = engine.clone();
                let _ = tokio::task::spawn_blocking(move || e.shutdown(grace)).await;
            }
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(signal);
        let bound = {
            let mut stop_rx = stop_rx.clone();
            async move {
                // Once stopping, open connections get the grace and a moment to flush.
                let _ = stop_rx.wait_for(|&stop| stop).await;
                tokio::time::sleep(grace + Duration::from_secs(5)).await;
            }
        };
        tokio::select! {
            r = server => r?,
            _ = bound => tracing::warn!("connections still open after the shutdown bound; exiting"),
        }
        let _ = stop_tx.send(true);
        match watch.await {
            Ok(Err(e)) => return Err(e),
            Err(e) => anyhow::bail!("{e}"),
            Ok(Ok(())) => {}
        }
        let e = engine.clone();
        tokio::task::spawn_blocking(move || e.shutdown(Duration::ZERO)).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// SIGTERM, or Ctrl-C (a second Ctrl-C exits at once, as everywhere in ffnskip).
async fn shutdown_signal() -> &'static str {
    let _answer = crate::interrupt::Answer::start();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        let tick = tokio::time::sleep(Duration::from_millis(100));
        tokio::select! {
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => return "SIGTERM",
            _ = tick => {
                if _answer.cancelled() {
                    return "Ctrl-C";
                }
            }
        }
    }
}

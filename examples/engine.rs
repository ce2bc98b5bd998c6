//! Embedding the batching engine without HTTP (an edge application): three prompts decoded
//! together, one of them with FFN skipping, each streamed from its own channel.
//!
//!     cargo run --release --example engine [MODEL.gguf]
//!
//! Without an argument it uses the default model (fetched on first use).

use std::sync::Arc;

use ffnskip::serve::{Engine, EngineConfig, Event, Metrics, Prompt, Request};
use ffnskip::skip::{Policy, SkipOptions};

fn main() -> anyhow::Result<()> {
    let model = match std::env::args_os().nth(1) {
        Some(p) => p.into(),
        None => ffnskip::fetch::default_model()?,
    };
    let engine = Engine::start(
        EngineConfig {
            parallel: 3,
            threads: 2,
            ..EngineConfig::new(model)
        },
        Arc::new(Metrics::new()),
    )?;
    let info = engine.wait_ready()?;
    eprintln!(
        "{}: {} slots × {} positions",
        info.id, info.parallel, info.n_ctx
    );

    let ask = |prompt: &str, skip: Option<SkipOptions>| Request {
        max_tokens: Some(48),
        skip,
        ..Request::new(Prompt::Text(prompt.into()))
    };
    let adaptive = SkipOptions {
        ratio: Some(0.25),
        ..SkipOptions::new(Policy::Adaptive)
    };
    // All three are in the engine before the first is read: they decode as one batch.
    let streams = vec![
        (
            "full",
            engine.submit(ask("The three primary colors are", None))?,
        ),
        ("full", engine.submit(ask("def is_prime(n):", None))?),
        (
            "adaptive:0.25",
            engine.submit(ask("Once upon a time", Some(adaptive)))?,
        ),
    ];
    for (label, mut s) in streams {
        let mut text = String::new();
        while let Some(ev) = s.blocking_next() {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done(f) => {
                    println!(
                        "[{label}] {} tokens, finish {}, FFN skip {:.0}%:\n{text}\n",
                        f.completion_tokens,
                        f.reason.openai(),
                        100.0 * f.ffn_skip_ratio
                    );
                }
                Event::Error(e) => anyhow::bail!("{label}: {e}"),
                Event::Refused(e) => anyhow::bail!("{label}: {e}"),
                Event::Accepted { .. } => {}
            }
        }
    }
    Ok(())
}

//! Decode and prefill speed of ffnskip vs llama.cpp (llama-cpp-2) on the same GGUF, same
//! thread count, runs alternating, medians and ratios printed.
//!
//! `cargo bench --bench decode` (default model, 2 threads); environment:
//! `FFNSKIP_BENCH_MODEL=path.gguf`, `FFNSKIP_BENCH_THREADS=N`, `FFNSKIP_BENCH_REPS=N`,
//! `FFNSKIP_BENCH_GEN=N` (decoded tokens per rep), `FFNSKIP_BENCH_PROMPT=N` (prefill tokens),
//! `FFNSKIP_BENCH_DEPTH=N` (context already in the cache when decoding starts, default 16).

use std::time::Instant;

use ffnskip::gguf::GgufFile;
use ffnskip::model::{Batch, Llama, Logits, Scratch};
use ffnskip::peer::{argmax, LlamaCpp, PeerMode};
use ffnskip::skip::NoSkip;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let path = match std::env::var_os("FFNSKIP_BENCH_MODEL") {
        Some(p) => p.into(),
        None => ffnskip::fetch::default_model()?,
    };
    let threads = env("FFNSKIP_BENCH_THREADS", 2);
    let reps = env("FFNSKIP_BENCH_REPS", 7);
    let n_gen = env("FFNSKIP_BENCH_GEN", 128);
    let n_prompt = env("FFNSKIP_BENCH_PROMPT", 512);
    let depth = env("FFNSKIP_BENCH_DEPTH", 16).max(1);
    let n_ctx = (n_prompt.max(depth) + n_gen + 16).max(1024);
    let pool = ffnskip::team::Team::new(threads)?;

    let file = GgufFile::open(&path)?;
    let model = Llama::load(&file)?;
    let peer = LlamaCpp::load(&path)?;
    let mut peer_ctx = peer.context(n_ctx as u32, threads, PeerMode::Default)?;
    let mut cache = model.new_cache(n_ctx);
    let mut scratch = pool.install(|| Scratch::new(&model, 512, n_ctx));
    // Prompt: wikitext-like filler of the requested length (token ids from llama.cpp).
    let text = "The history of the city begins in the early middle ages, when a small settlement grew around the river crossing. ".repeat(n_prompt.max(depth) / 8 + 8);
    let mut tokens = peer.tokenize(&text, false, false);
    tokens.truncate(n_prompt.max(depth));
    let (prompt, context) = (&tokens[..n_prompt], &tokens[..depth]);
    let bytes_per_token = model.bytes_per_token() as f64;

    let (mut ours_tg, mut peer_tg, mut ours_pp, mut peer_pp) = (vec![], vec![], vec![], vec![]);
    println!(
        "model {} | threads {threads} | reps {reps} | decode {n_gen} tokens after a {depth}-token prompt | prefill {n_prompt} tokens",
        path.display()
    );
    for rep in 0..reps + 1 {
        // --- decode: ffnskip ---
        cache.clear();
        let tg = pool.install(|| -> anyhow::Result<f64> {
            let mut t = 0;
            for chunk in context.chunks(512) {
                let logits = model.forward(
                    &mut cache,
                    &mut scratch,
                    &Batch {
                        tokens: chunk,
                        prompt: true,
                        logits: Logits::Last,
                    },
                    &mut NoSkip,
                )?;
                t = argmax(logits);
            }
            let start = Instant::now();
            for _ in 0..n_gen {
                let logits = model.forward(
                    &mut cache,
                    &mut scratch,
                    &Batch {
                        tokens: &[t],
                        prompt: false,
                        logits: Logits::Last,
                    },
                    &mut NoSkip,
                )?;
                t = argmax(logits);
            }
            Ok(n_gen as f64 / start.elapsed().as_secs_f64())
        })?;
        // --- decode: llama.cpp ---
        peer_ctx.clear();
        for chunk in context.chunks(512) {
            peer_ctx.eval(chunk, false)?;
        }
        let mut t = peer_ctx.argmax_last();
        let start = Instant::now();
        for _ in 0..n_gen {
            peer_ctx.step(t)?;
            t = peer_ctx.argmax_last();
        }
        let ptg = n_gen as f64 / start.elapsed().as_secs_f64();
        // --- prefill ---
        cache.clear();
        let start = Instant::now();
        pool.install(|| -> anyhow::Result<()> {
            for (i, chunk) in prompt.chunks(512).enumerate() {
                let last = (i + 1) * 512 >= prompt.len();
                model.forward(
                    &mut cache,
                    &mut scratch,
                    &Batch {
                        tokens: chunk,
                        prompt: true,
                        logits: if last { Logits::Last } else { Logits::None },
                    },
                    &mut NoSkip,
                )?;
            }
            Ok(())
        })?;
        let pp = prompt.len() as f64 / start.elapsed().as_secs_f64();
        peer_ctx.clear();
        let start = Instant::now();
        for chunk in prompt.chunks(512) {
            peer_ctx.eval(chunk, false)?;
        }
        let ppp = prompt.len() as f64 / start.elapsed().as_secs_f64();
        if rep == 0 {
            continue; // warm-up
        }
        println!("rep {rep}: decode ours {tg:.1} tok/s, llama.cpp {ptg:.1} tok/s | prefill ours {pp:.1} tok/s, llama.cpp {ppp:.1} tok/s");
        ours_tg.push(tg);
        peer_tg.push(ptg);
        ours_pp.push(pp);
        peer_pp.push(ppp);
    }
    let (otg, ptg, opp, ppp) = (
        median(&mut ours_tg),
        median(&mut peer_tg),
        median(&mut ours_pp),
        median(&mut peer_pp),
    );
    println!("\n| {threads} threads | ffnskip | llama.cpp | ratio |\n|---|---|---|---|");
    println!(
        "| decode tok/s at depth {depth} (median of {reps}) | {otg:.1} | {ptg:.1} | {:.3}× |",
        otg / ptg
    );
    println!(
        "| prefill {n_prompt} tok/s | {opp:.1} | {ppp:.1} | {:.3}× |",
        opp / ppp
    );
    println!(
        "weights read per decoded token: {:.1} MB → ffnskip {:.2} GB/s, llama.cpp {:.2} GB/s",
        bytes_per_token / 1e6,
        bytes_per_token * otg / 1e9,
        bytes_per_token * ptg / 1e9
    );
    let t = &scratch.times;
    println!(
        "ffnskip stage times (all runs): attention {:.2?}, ffn {:.2?}, head {:.2?}",
        t.attention, t.ffn, t.head
    );
    Ok(())
}

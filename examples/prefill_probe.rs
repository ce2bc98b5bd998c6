//! ffnskip's 512-token prefill on the default model (or the GGUF path given as the first
//! argument) with 2 threads, 10 times, with the stage times (attention, FFN, head), min and
//! median; `peer_prefill_probe` is the llama.cpp side.
use ffnskip::gguf::GgufFile;
use ffnskip::model::{Batch, Llama, Logits, Scratch};
use ffnskip::skip::NoSkip;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let path = match std::env::args_os().nth(1) {
        Some(p) => p.into(),
        None => ffnskip::fetch::default_model()?,
    };
    let pool = ffnskip::team::Team::new(2)?;
    let f = GgufFile::open(&path)?;
    let m = Llama::load(&f)?;
    let mut cache = m.new_cache(1024);
    let mut s = pool.install(|| Scratch::new(&m, 512, 1024));
    // As a session's prompt (SessionConfig::exact_batches off).
    s.batch_exact = false;
    let toks: Vec<u32> = (0..512).map(|i| (i * 37 % 40000 + 100) as u32).collect();
    let mut all = Vec::new();
    for _ in 0..10 {
        cache.clear();
        s.times = Default::default();
        let t = Instant::now();
        pool.install(|| {
            m.forward(
                &mut cache,
                &mut s,
                &Batch {
                    tokens: &toks,
                    prompt: true,
                    logits: Logits::Last,
                },
                &mut NoSkip,
            )
            .map(|_| ())
        })?;
        all.push(t.elapsed().as_secs_f64());
        println!(
            "prefill 512: {:.3}s  attn {:.3?} ffn {:.3?} head {:.3?}",
            t.elapsed().as_secs_f64(),
            s.times.attention,
            s.times.ffn,
            s.times.head
        );
    }
    all.sort_by(f64::total_cmp);
    println!("min {:.3}s median {:.3}s", all[0], all[all.len() / 2]);
    Ok(())
}

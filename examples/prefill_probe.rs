use ffnskip::gguf::GgufFile;
use ffnskip::model::{Batch, Llama, Logits, Scratch};
use ffnskip::skip::NoSkip;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let path = ffnskip::fetch::default_model()?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    let f = GgufFile::open(&path)?;
    let m = Llama::load(&f)?;
    let mut cache = m.new_cache(1024);
    let mut s = pool.install(|| Scratch::new(&m, 512, 1024));
    let toks: Vec<u32> = (0..512).map(|i| (i * 37 % 40000 + 100) as u32).collect();
    for _ in 0..4 {
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
        println!(
            "prefill 512: {:.3}s  attn {:.3?} ffn {:.3?} head {:.3?}",
            t.elapsed().as_secs_f64(),
            s.times.attention,
            s.times.ffn,
            s.times.head
        );
    }
    Ok(())
}

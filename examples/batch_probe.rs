//! Decode-step time of B sequences in one forward call (`forward_seqs`, as `ffnskip serve`
//! decodes), exact rows and fast rows, for B = 1, 2, 4, 8 after a 32-token context each,
//! with the stage times per step. For profiling continuous batching:
//!
//!     cargo run --release --example batch_probe [MODEL.gguf]
use ffnskip::gguf::GgufFile;
use ffnskip::model::{Batch, Llama, Logits, Scratch};
use ffnskip::skip::NoSkip;
use ffnskip::team::Team;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = match std::env::args_os().nth(1) {
        Some(p) => p.into(),
        None => ffnskip::fetch::default_model()?,
    };
    let file = GgufFile::open(&path)?;
    let model = Llama::load(&file)?;
    let team = Team::new(2)?;
    for &exact in &[true, false] {
        for &b in &[1usize, 2, 4, 8] {
            let mut scratch = team.install(|| Scratch::new(&model, 128, 512));
            scratch.batch_exact = exact;
            let mut caches: Vec<_> = (0..b).map(|_| model.new_cache(512)).collect();
            let seqs: Vec<usize> = (0..b).collect();
            // a 32-token context per sequence
            for q in 0..b {
                let toks: Vec<u32> = (0..32).map(|i| (i * 7 + q as u32) % 1000 + 100).collect();
                let s1 = vec![q; 32];
                team.install(|| {
                    model
                        .forward_seqs(
                            &mut caches,
                            &s1,
                            &mut scratch,
                            &Batch {
                                tokens: &toks,
                                prompt: true,
                                logits: Logits::None,
                            },
                            &mut NoSkip,
                        )
                        .map(|_| ())
                })?;
            }
            let toks: Vec<u32> = (0..b as u32).map(|i| 200 + i).collect();
            let steps = 64;
            scratch.times = Default::default();
            let t0 = Instant::now();
            for _ in 0..steps {
                team.install(|| {
                    model
                        .forward_seqs(
                            &mut caches,
                            &seqs,
                            &mut scratch,
                            &Batch {
                                tokens: &toks,
                                prompt: false,
                                logits: Logits::All,
                            },
                            &mut NoSkip,
                        )
                        .map(|_| ())
                })?;
            }
            let dt = t0.elapsed().as_secs_f64() / steps as f64;
            let st = scratch.times;
            println!("exact {exact} B={b}: {:.2} ms/step, {:.0} tok/s; attn {:.2} ffn {:.2} head {:.2} ms/step", dt*1e3, b as f64/dt,
          st.attention.as_secs_f64()*1e3/(steps as f64), st.ffn.as_secs_f64()*1e3/(steps as f64), st.head.as_secs_f64()*1e3/(steps as f64));
        }
    }
    Ok(())
}

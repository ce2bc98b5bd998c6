//! llama.cpp's 512-token prefill on the default model (or the GGUF path given as the first
//! argument), 10 times (min and median), for profiling against `prefill_probe` (e.g. under
//! `perf record`). `REFERENCE=1` runs llama.cpp in the
//! bit-exact oracle configuration (32-row ubatches) instead of its defaults.
use ffnskip::peer::{LlamaCpp, PeerMode};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let path = match std::env::args_os().nth(1) {
        Some(p) => p.into(),
        None => ffnskip::fetch::default_model()?,
    };
    let peer = LlamaCpp::load(&path)?;
    let mode = if std::env::var_os("REFERENCE").is_some() {
        PeerMode::Reference { ubatch: 32 }
    } else {
        PeerMode::Default
    };
    let mut ctx = peer.context(1024, 2, mode)?;
    let toks: Vec<u32> = (0..512).map(|i| (i * 37 % 40000 + 100) as u32).collect();
    let mut all = Vec::new();
    for _ in 0..10 {
        ctx.clear();
        let t = Instant::now();
        ctx.eval(&toks, false)?;
        all.push(t.elapsed().as_secs_f64());
        println!("llama.cpp prefill 512: {:.3}s", t.elapsed().as_secs_f64());
    }
    all.sort_by(f64::total_cmp);
    println!("min {:.3}s median {:.3}s", all[0], all[all.len() / 2]);
    Ok(())
}

//! Weights stay in the mapping: resident memory after loading and running the default model
//! stays within file size + KV cache + 64 MB.

mod common;

use ffnskip::gguf::GgufFile;
use ffnskip::model::Llama;
use ffnskip::session::{Session, SessionConfig};
use ffnskip::tokenizer::Tokenizer;

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[test]
fn rss_after_load_is_file_plus_kv_plus_64mb() {
    let Some(before) = rss_bytes() else {
        eprintln!("SKIPPED: no /proc/self/status on this platform");
        return;
    };
    let path = common::default_model();
    let file = GgufFile::open(&path).expect("open");
    let model = Llama::load(&file).expect("load");
    let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
    let mut s = Session::new(&model, SessionConfig::new(4096, 2)).expect("session");
    let ids = tok.encode("The capital of France is", true, true);
    let mut t = ffnskip::peer::argmax(s.prefill(&ids).expect("prefill"));
    for _ in 0..16 {
        t = ffnskip::peer::argmax(s.decode(t).expect("decode"));
    }
    let after = rss_bytes().expect("rss");
    let budget = file.file_size() + s.kv_cache_bytes() as u64 + (64 << 20);
    eprintln!(
        "RSS {:.1} MB (process start {:.1} MB); budget file {:.1} + KV {:.1} + 64 MB = {:.1} MB",
        after as f64 / 1e6,
        before as f64 / 1e6,
        file.file_size() as f64 / 1e6,
        s.kv_cache_bytes() as f64 / 1e6,
        budget as f64 / 1e6
    );
    assert!(
        after <= budget + before,
        "RSS {after} exceeds {budget} (+{before} at start)"
    );
}

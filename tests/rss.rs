//! Weights stay in the mapping (or replace it, when repacked): resident memory after loading
//! and running a model stays within file size + KV cache + 64 MB, for the default model and the
//! Q4_K_M Qwen2.5-Coder-1.5B file.

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

/// Loads `path` as the CLI does (Q4_K repacked, its mapped pages released), prefills and
/// decodes 16 tokens, and checks the growth of the resident set against file + KV + 64 MB.
fn check(path: &std::path::Path) {
    let Some(before) = rss_bytes() else {
        eprintln!("SKIPPED: no /proc/self/status on this platform");
        return;
    };
    let file = GgufFile::open(path).expect("open");
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
        "{}: RSS {:.1} MB (before loading {:.1} MB); budget file {:.1} + KV {:.1} + 64 MB = {:.1} MB",
        path.display(),
        after as f64 / 1e6,
        before as f64 / 1e6,
        file.file_size() as f64 / 1e6,
        s.kv_cache_bytes() as f64 / 1e6,
        budget as f64 / 1e6
    );
    assert!(
        after <= budget + before,
        "{}: RSS {after} exceeds {budget} (+{before} before loading)",
        path.display()
    );
}

/// One test, models one after another: the resident set is the whole process's.
#[test]
fn rss_after_load_is_file_plus_kv_plus_64mb() {
    check(&common::default_model());
    // Q4_K_M: 68% of the bytes are repacked copies, whose mapped originals must not stay resident.
    check(&common::catalogue_model("qwen2.5-coder-1.5b"));
}

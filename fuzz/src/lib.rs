//! Fuzz harnesses for ffnskip's untrusted inputs, one function per AFL++ target
//! (`fuzz_targets/*.rs` wrap them in `afl::fuzz!`). Every function must return normally for
//! any input: a panic, an abort, an allocation over [`MAX_ALLOC`] or a hang is a finding.
//!
//! - [`gguf`]: bytes → `GgufFile` → tokenizer and `Llama::load` → one decode step.
//! - [`tokenizer`]: text → `encode` → `decode` and streaming detokenization, on real vocabularies.
//! - [`llama2c`]: bytes → the llama2.c converter → (when it succeeds) the GGUF reader and loader.
//! - [`chat_template`]: template source + messages → `ChatTemplate::new` + `render`.
//!
//! Reproduce a finding without AFL: `fuzz/target/release/TARGET < crash-file` (the
//! instrumented binaries read one input from stdin when not run under afl-fuzz).

pub mod chat_input;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};

use ffnskip::chat::ChatTemplate;
use ffnskip::convert::llama2c::llama2c_to_gguf;
use ffnskip::gguf::GgufFile;
use ffnskip::model::Llama;
use ffnskip::session::{Session, SessionConfig};
use ffnskip::tokenizer::{StreamDecoder, Tokenizer};

/// Largest single allocation a harness may make. AFL feeds at most 1 MB per input, so a
/// request this large means a size was taken from the input without being checked against
/// its length (an OOM waiting to happen on a real machine): abort, AFL records a crash.
/// Legitimate peaks stay below it: a 100 MB string (minijinja's limit for `'x' * n`) and
/// the 64 MiB chat prompt cap.
pub const MAX_ALLOC: usize = 256 << 20;

/// The system allocator, aborting on any request over [`MAX_ALLOC`] bytes.
pub struct LimitAlloc;

// SAFETY: forwards to `System` unchanged; only refuses (aborts on) oversized layouts.
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn check(size: usize) {
    if size > MAX_ALLOC {
        // No allocation here: write the message straight to stderr and abort.
        let msg = b"ffnskip-fuzz: allocation over MAX_ALLOC (256 MiB) requested\n";
        // SAFETY: plain write(2) of a static buffer to fd 2.
        unsafe {
            libc_write(2, msg.as_ptr(), msg.len());
        }
        std::process::abort();
    }
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, count: usize) -> isize;
}

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

/// KV positions of the session built for each loaded model: one decode step needs one.
const FUZZ_N_CTX: usize = 8;

/// With `FFNSKIP_FUZZ_TRACE` set, the harnesses say how far an input got (to check that the
/// seeds reach the deep stages: replay them with `fuzz/target/release/TARGET < FILE`).
fn trace(stage: &str) {
    static START: std::sync::OnceLock<Option<std::time::Instant>> = std::sync::OnceLock::new();
    let start = START
        .get_or_init(|| std::env::var_os("FFNSKIP_FUZZ_TRACE").map(|_| std::time::Instant::now()));
    if let Some(start) = start {
        let ms = start.elapsed().as_secs_f64() * 1e3;
        eprintln!("ffnskip-fuzz: {ms:8.3} ms {stage}");
    }
}

/// GGUF reader → tokenizer → model loader → one forward step of token 0 (always a valid id:
/// the loader requires `n_vocab ≥ 1`).
pub fn gguf(data: &[u8]) {
    trace("start");
    let file = match GgufFile::from_bytes("fuzz.gguf", data.to_vec()) {
        Ok(f) => f,
        Err(e) => return trace(&e.to_string()),
    };
    trace("parsed");
    // Every accessor the loaders use must cope with whatever the header holds.
    for t in file.tensors() {
        assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
    }
    if let Ok(tok) = Tokenizer::from_gguf(&file) {
        trace("tokenizer loaded");
        let ids = tok.encode("Hello world, <s> 123 é 😀", true, true);
        assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
        let _ = tok.decode(&ids);
    }
    let model = match Llama::load(&file) {
        Ok(m) => m,
        Err(e) => return trace(&e.to_string()),
    };
    trace("model loaded");
    let config = SessionConfig {
        n_ctx: FUZZ_N_CTX,
        threads: 1,
        batch: 1,
    };
    let Ok(mut session) = Session::new(&model, config) else {
        return;
    };
    match session.decode(0) {
        Ok(logits) => {
            assert_eq!(logits.len(), model.config.n_vocab);
            trace("decoded one token");
        }
        Err(e) => trace(&e.to_string()),
    }
}

/// The vocabularies the tokenizer target runs on: the llama2.c stories260K vocabulary
/// (SentencePiece-style, `fuzz/models/tok512.gguf`), and the default model's (byte-level BPE)
/// when it is cached under `$FFNSKIP_HOME` (or `~/.cache/ffnskip`).
pub fn tokenizer_models() -> Vec<PathBuf> {
    let mut paths = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tok512.gguf")];
    let home = std::env::var_os("FFNSKIP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/ffnskip")));
    if let Some(home) = home {
        let default = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if default.exists() {
            paths.push(default);
        }
    }
    paths
}

/// Loads every tokenizer of [`tokenizer_models`]; panics if one cannot be read (a setup error).
pub fn load_tokenizers() -> Vec<Tokenizer> {
    tokenizer_models()
        .iter()
        .map(|p| {
            let f = GgufFile::open(p).unwrap_or_else(|e| panic!("{e}"));
            Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// First byte: bit 0 add_special, bit 1 parse_special, bits 2.. choose the tokenizer; the
/// rest is the text (lossy UTF-8). Checks: ids are in the vocabulary, decoding works, and
/// streaming detokenization gives exactly the lossy UTF-8 of the concatenated token bytes.
pub fn tokenizer(toks: &[Tokenizer], data: &[u8]) {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    if toks.is_empty() {
        return;
    }
    let tok = &toks[(flags >> 2) as usize % toks.len()];
    let text = String::from_utf8_lossy(text);
    let ids = tok.encode(&text, flags & 1 != 0, flags & 2 != 0);
    assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
    let _ = tok.decode(&ids);

    let mut stream = StreamDecoder::new(tok);
    let mut streamed = String::new();
    let mut bytes = Vec::new();
    for &id in &ids {
        streamed.push_str(&stream.push(id));
        bytes.extend_from_slice(&tok.token_bytes(id));
    }
    streamed.push_str(&stream.flush());
    assert_eq!(streamed, String::from_utf8_lossy(&bytes));
}

/// Input: u32 LE checkpoint length `n`, then `n` checkpoint bytes, then the `tokenizer.bin`
/// bytes (a short input is all checkpoint). A conversion that succeeds must give a GGUF the
/// reader accepts; loading it runs the model-level checks.
pub fn llama2c(data: &[u8]) {
    let (ckpt, tok) = match data.split_first_chunk::<4>() {
        Some((n, rest)) => rest.split_at((u32::from_le_bytes(*n) as usize).min(rest.len())),
        None => (data, &[][..]),
    };
    let Ok(w) = llama2c_to_gguf(Path::new("fuzz.bin"), ckpt, Path::new("tok.bin"), tok) else {
        return;
    };
    let bytes = w
        .try_to_bytes()
        .unwrap_or_else(|e| panic!("writer refused: {e}"));
    let file = GgufFile::from_bytes("converted.gguf", bytes).unwrap_or_else(|e| panic!("{e}"));
    let _ = Tokenizer::from_gguf(&file);
    let _ = Llama::load(&file);
}

/// Renders a template and messages read by [`chat_input::parse`].
pub fn chat_template(data: &[u8]) {
    let Some(input) = chat_input::parse(data) else {
        return;
    };
    let Ok(t) = ChatTemplate::new("fuzz.gguf", &input.source, "<s>", "</s>") else {
        return;
    };
    let _ = t.render(&input.messages, input.add_generation_prompt);
}

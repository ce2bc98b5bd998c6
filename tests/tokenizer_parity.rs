//! ffnskip's tokenizer against llama.cpp's (`llama_tokenize` / `llama_detokenize` through
//! llama-cpp-2): token ids on every non-empty line of wikitext-2 test and on handwritten edge
//! cases, for the default model (gpt2 BPE, `smollm` pre-tokenizer), for other gpt2
//! pre-tokenizers on the same vocabulary, and for the LLaMA-2 32k SentencePiece vocabulary
//! (vocab-only GGUF written from llama2.c's `tokenizer.bin`).

mod common;

use std::path::{Path, PathBuf};

use ffnskip::gguf::{GgufFile, GgufWriter, Value, ValueType};
use ffnskip::peer::LlamaCpp;
use ffnskip::tokenizer::{StreamDecoder, Tokenizer};

/// Texts that exercise the pre-tokenizers, byte fallback and special-token matching.
const EDGE_CASES: &[&str] = &[
    "Hello world",
    " Hello world",
    "Hello world ",
    "  leading and trailing  ",
    "\n\nnewlines\n\n\n",
    "\t\ttabs\tand  spaces   mixed \t \n ",
    "a  b   c    d     e",
    "                                                  ",
    "I'm sure you'll see they've done it, we'd said, it's John's and I'M SHOUTING 'QUOTED' 'tis",
    "don't won't can't shouldn't ain't y'all",
    "3.14159 1,000,000 12345678901234567890 0x1F -42 +7 1e-10 ½ ² ٣ ४",
    "Numbers: 1 22 333 4444 55555 666666",
    "Ünïcödé àçcénts: naïve café résumé Straße Ærøskøbing",
    "Ελληνικά, русский язык, עברית, العربية, हिन्दी, ภาษาไทย",
    "中文字符测试，日本語のテキスト、한국어 텍스트。",
    "Emoji: 😀 🎉 👍🏽 🇺🇸 ❤️ 🤖",
    "Family: 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 👩🏾‍💻 (ZWJ sequences)",
    "fn main() {\n\tprintln!(\"Hello, {}!\", name);\n\tlet x = vec![1, 2, 3];\n}\n",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n    pass\n",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "http://example.com/path?query=1&b=2#frag user@example.org",
    "Mixed\r\nline\rendings\n",
    "\u{00a0}non-breaking\u{00a0}space\u{2003}em space\u{3000}ideographic",
    "zero\u{200b}width\u{200d}joiner\u{feff}bom",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    "<|endoftext|>text after eot<|endoftext|>",
    "<s>[INST] Hi [/INST]</s>",
    "</s><s> <unk> <s>",
    "text<s>more</s>end",
    "<0x41><0xFF> byte-looking text",
    "<|im_start|><|im_start|>",
    "a<|im_end|>b<repo_name>c<file_sep>d",
    "...!!!???,,,;;;:::---___===+++***///\\\\\\|||",
    "'s 's 'S 'll 'LL ' s",
    "A",
    " ",
    "  ",
    "\n",
    "x\u{0301}\u{0302} combining marks ẛ̣",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛",
    "\u{e000}\u{f8ff} private use \u{10ffff}",
    "Ⅻ Ⅷ numerals, ① ② circled",
];

fn model_path() -> PathBuf {
    common::default_model()
}

struct Stats {
    name: String,
    texts: usize,
    calls: usize,
    tokens: usize,
    mismatches: Vec<String>,
}

impl Stats {
    fn new(name: &str) -> Self {
        Stats {
            name: name.into(),
            texts: 0,
            calls: 0,
            tokens: 0,
            mismatches: Vec::new(),
        }
    }

    fn report(&self) {
        println!(
            "[{}] {} texts, {} encode calls, {} tokens compared, {} mismatches",
            self.name,
            self.texts,
            self.calls,
            self.tokens,
            self.mismatches.len()
        );
        for m in self.mismatches.iter().take(10) {
            println!("  {m}");
        }
        assert!(
            self.mismatches.is_empty(),
            "[{}] token ids differ from llama.cpp",
            self.name
        );
    }
}

fn compare(
    ours: &Tokenizer,
    peer: &LlamaCpp,
    texts: &[&str],
    modes: &[(bool, bool)],
    stats: &mut Stats,
) {
    for text in texts {
        stats.texts += 1;
        for &(add_special, parse_special) in modes {
            let a = ours.encode(text, add_special, parse_special);
            let b = peer.tokenize(text, add_special, parse_special);
            stats.calls += 1;
            stats.tokens += b.len();
            if a != b {
                let first = a
                    .iter()
                    .zip(&b)
                    .position(|(x, y)| x != y)
                    .unwrap_or(a.len().min(b.len()));
                stats.mismatches.push(format!(
                    "add_special={add_special} parse_special={parse_special} text={text:?}: first difference at {first}: ours {:?} llama.cpp {:?}",
                    &a[first..(first + 6).min(a.len())],
                    &b[first..(first + 6).min(b.len())]
                ));
            }
        }
    }
}

fn wikitext_lines(shared: &Path) -> Vec<String> {
    let raw = std::fs::read_to_string(shared.join("data/wikitext-2/wikitext-2-raw/wiki.test.raw"))
        .expect("wikitext-2 test");
    let lines: Vec<String> = raw
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    assert!(lines.len() >= 2000, "only {} non-empty lines", lines.len());
    lines
}

fn temp_path(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("ffnskip-tok-{}-{n}-{name}", std::process::id()))
}

/// Deletes the file when dropped.
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A vocab-only GGUF with the LLaMA-2 32k vocabulary of llama2.c's tokenizer.bin.
fn llama2_vocab(shared: &Path) -> TempFile {
    let out = TempFile(temp_path("llama2-vocab.gguf"));
    ffnskip::convert::vocab_only_gguf(&shared.join("models/tinyllamas/tokenizer.bin"), &out.0)
        .expect("vocab-only GGUF");
    out
}

/// The default model's tokenizer keys with `tokenizer.ggml.pre` replaced, vocab only.
fn with_pre(model: &Path, pre: &str) -> TempFile {
    let f = GgufFile::open(model).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        if k.starts_with("tokenizer.ggml.") || k == "general.architecture" {
            w.set(k, v.clone());
        }
    }
    w.set("tokenizer.ggml.pre", Value::String(pre.into()));
    let out = TempFile(temp_path(&format!("pre-{pre}.gguf")));
    w.write_file(&out.0).unwrap();
    out
}

const ALL_MODES: &[(bool, bool)] = &[(false, false), (true, false), (false, true), (true, true)];

#[test]
fn default_model_matches_llama_cpp() {
    let path = model_path();
    let file = GgufFile::open(&path).unwrap();
    let ours = Tokenizer::from_gguf(&file).unwrap();
    let peer = LlamaCpp::load_vocab(&path).unwrap();
    assert_eq!(ours.n_vocab(), peer.n_vocab());
    let mut stats = Stats::new("smollm edge cases");
    compare(&ours, &peer, EDGE_CASES, ALL_MODES, &mut stats);
    stats.report();

    let Some(shared) = common::shared("default_model_matches_llama_cpp (wikitext part)") else {
        return;
    };
    let lines = wikitext_lines(&shared);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut stats = Stats::new("smollm wikitext-2 test");
    compare(
        &ours,
        &peer,
        &refs,
        &[(false, false), (true, false)],
        &mut stats,
    );
    // Whole-document tokenization as well (long text, many newlines).
    let doc: String = lines[..400].join("\n");
    compare(&ours, &peer, &[doc.as_str()], &[(false, false)], &mut stats);
    stats.report();
}

#[test]
fn llama2_vocab_matches_llama_cpp() {
    let Some(shared) = common::shared("llama2_vocab_matches_llama_cpp") else {
        return;
    };
    let gguf = llama2_vocab(&shared);
    let file = GgufFile::open(&gguf.0).unwrap();
    let ours = Tokenizer::from_gguf(&file).unwrap();
    let peer = LlamaCpp::load_vocab(&gguf.0).unwrap();
    assert_eq!(ours.n_vocab(), 32000);
    assert_eq!(ours.n_vocab(), peer.n_vocab());
    assert_eq!(
        (ours.bos(), ours.eos(), ours.add_bos()),
        (Some(1), Some(2), true)
    );
    let mut stats = Stats::new("llama2-32k edge cases");
    compare(&ours, &peer, EDGE_CASES, ALL_MODES, &mut stats);
    stats.report();
    let lines = wikitext_lines(&shared);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut stats = Stats::new("llama2-32k wikitext-2 test");
    compare(
        &ours,
        &peer,
        &refs,
        &[(false, false), (true, false)],
        &mut stats,
    );
    stats.report();
    for id in 0..ours.n_vocab() as u32 {
        assert_eq!(ours.is_eog(id), peer.is_eog(id), "is_eog({id})");
    }
}

/// Code from MBPP (problem text, solution, tests) and whitespace runs, for code vocabularies.
fn code_samples(shared: &Path) -> Vec<String> {
    let raw = std::fs::read_to_string(shared.join("data/mbpp/sanitized-mbpp.json")).expect("mbpp");
    let items: Vec<serde_json::Value> = serde_json::from_str(&raw).expect("mbpp json");
    let mut out = Vec::new();
    for it in &items {
        for key in ["prompt", "code"] {
            out.push(it[key].as_str().expect("mbpp text field").to_string());
        }
        let tests: Vec<&str> = it["test_list"]
            .as_array()
            .expect("mbpp test_list")
            .iter()
            .filter_map(|t| t.as_str())
            .collect();
        out.push(tests.join("\n"));
    }
    for n in [1, 2, 3, 4, 7, 8, 15, 16, 33] {
        out.push(format!("def f():\n{}return 1\n", " ".repeat(n)));
        out.push(format!(
            "x{}y\n{}\n\t{}z",
            " ".repeat(n),
            "\t".repeat(n),
            "\n".repeat(n)
        ));
    }
    out
}

/// The Qwen2.5 vocabulary (151,936 tokens, `qwen2` pre-tokenizer) in both catalogue Qwen
/// files: 2,000+ lines of wikitext-2 test, MBPP code, whitespace runs, CJK and emoji.
#[test]
fn qwen_vocab_matches_llama_cpp() {
    let Some(shared) = common::shared("qwen_vocab_matches_llama_cpp") else {
        return;
    };
    let lines = wikitext_lines(&shared);
    let code = code_samples(&shared);
    for name in ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"] {
        let path = common::catalogue_model(name);
        let file = GgufFile::open(&path).unwrap();
        let ours = Tokenizer::from_gguf(&file).unwrap();
        let peer = LlamaCpp::load_vocab(&path).unwrap();
        assert_eq!(ours.n_vocab(), 151936);
        assert_eq!(ours.n_vocab(), peer.n_vocab());
        let mut stats = Stats::new(&format!("{name} edge cases"));
        compare(&ours, &peer, EDGE_CASES, ALL_MODES, &mut stats);
        stats.report();
        let mut stats = Stats::new(&format!("{name} wikitext-2 test + MBPP code"));
        let texts: Vec<&str> = lines.iter().chain(&code).map(String::as_str).collect();
        compare(
            &ours,
            &peer,
            &texts,
            &[(false, false), (true, true)],
            &mut stats,
        );
        let doc: String = lines[..400].join("\n");
        compare(&ours, &peer, &[doc.as_str()], &[(false, false)], &mut stats);
        for t in texts.iter().take(500) {
            let ids = peer.tokenize(t, false, false);
            if ours.decode_bytes(&ids) != peer.detokenize(&ids) {
                stats
                    .mismatches
                    .push(format!("detokenize differs on {t:?}"));
            }
        }
        stats.report();
        for id in 0..ours.n_vocab() as u32 {
            assert_eq!(ours.is_eog(id), peer.is_eog(id), "{name}: is_eog({id})");
        }
    }
}

/// The gpt2 pre-tokenizer table, checked on the SmolLM vocabulary with other `pre` values.
#[test]
fn gpt2_pre_tokenizers_match_llama_cpp() {
    let path = model_path();
    let shared = common::shared("gpt2_pre_tokenizers_match_llama_cpp (wikitext part)");
    let lines = shared.as_deref().map(wikitext_lines).unwrap_or_default();
    let mut texts: Vec<&str> = EDGE_CASES.to_vec();
    texts.extend(lines.iter().take(600).map(String::as_str));
    for pre in [
        "default",
        "gpt-2",
        "llama-bpe",
        "qwen2",
        "qwen35",
        "starcoder",
        "falcon",
        "dbrx",
        "stablelm2",
        "poro-chat",
        "viking",
        "command-r",
    ] {
        let gguf = with_pre(&path, pre);
        let file = GgufFile::open(&gguf.0).unwrap();
        let ours = Tokenizer::from_gguf(&file).unwrap();
        let peer = LlamaCpp::load_vocab(&gguf.0).unwrap();
        let mut stats = Stats::new(&format!("pre={pre}"));
        compare(
            &ours,
            &peer,
            &texts,
            &[(false, false), (true, true)],
            &mut stats,
        );
        // Detokenization follows the pre-tokenizer's clean_spaces flag.
        for t in &texts {
            let ids = peer.tokenize(t, false, false);
            if ours.decode_bytes(&ids) != peer.detokenize(&ids) {
                stats
                    .mismatches
                    .push(format!("detokenize differs on {t:?}"));
            }
        }
        stats.report();
    }
}

#[test]
fn detokenize_round_trip_and_stream() {
    let path = model_path();
    let file = GgufFile::open(&path).unwrap();
    let smol = (
        Tokenizer::from_gguf(&file).unwrap(),
        LlamaCpp::load_vocab(&path).unwrap(),
    );
    let shared = common::shared("detokenize_round_trip_and_stream (llama2 vocab part)");
    let llama2_file = shared.as_deref().map(llama2_vocab);
    let llama2 = llama2_file.as_ref().map(|g| {
        let f = GgufFile::open(&g.0).unwrap();
        (
            Tokenizer::from_gguf(&f).unwrap(),
            LlamaCpp::load_vocab(&g.0).unwrap(),
        )
    });
    let lines = shared.as_deref().map(wikitext_lines).unwrap_or_default();
    let mut texts: Vec<&str> = EDGE_CASES.to_vec();
    texts.extend(lines.iter().map(String::as_str));

    for (name, (ours, peer)) in [("smollm", Some(&smol)), ("llama2-32k", llama2.as_ref())]
        .into_iter()
        .filter_map(|(n, p)| p.map(|p| (n, p)))
    {
        let (mut round_trips, mut peer_round_trips, mut detok, mut streamed) = (0, 0, 0, 0);
        for text in &texts {
            for add_special in [false, true] {
                let ids = peer.tokenize(text, add_special, false);
                let want = peer.detokenize(&ids);
                assert_eq!(
                    ours.decode_bytes(&ids),
                    want,
                    "[{name}] detokenize of {text:?}"
                );
                detok += 1;
                if want == text.as_bytes() {
                    peer_round_trips += 1;
                    assert_eq!(
                        ours.decode(&ours.encode(text, add_special, false)),
                        *text,
                        "[{name}] round trip"
                    );
                    round_trips += 1;
                }
                // Streaming: every chunk is whole characters; together they are the pieces.
                let mut stream = StreamDecoder::new(ours);
                let mut joined = String::new();
                for &id in &ids {
                    joined.push_str(&stream.push(id));
                }
                assert!(stream.pending().is_empty() || !text.is_empty());
                joined.push_str(&stream.flush());
                let pieces: Vec<u8> = ids.iter().flat_map(|&id| ours.token_bytes(id)).collect();
                assert_eq!(
                    joined,
                    String::from_utf8_lossy(&pieces),
                    "[{name}] stream of {text:?}"
                );
                streamed += 1;
            }
        }
        println!(
            "[{name}] detokenize identical to llama.cpp on {detok} token sequences; decode(encode(x)) == x on {round_trips} (llama.cpp round-trips {peer_round_trips}); {streamed} streams"
        );
        assert_eq!(round_trips, peer_round_trips);
    }

    // Emoji are split over several byte tokens: the stream must hold bytes back and never
    // yield half a character.
    for (name, ours) in [
        ("smollm", Some(&smol.0)),
        ("llama2-32k", llama2.as_ref().map(|p| &p.0)),
    ]
    .into_iter()
    .filter_map(|(n, p)| p.map(|p| (n, p)))
    {
        let text = "A 👨‍👩‍👧‍👦 family, 🇺🇸 flag, 👍🏽, 中文 and é.";
        let ids = ours.encode(text, false, false);
        let mut stream = StreamDecoder::new(ours);
        let mut chunks = Vec::new();
        let mut held_back = 0;
        for &id in &ids {
            let chunk = stream.push(id);
            if !stream.pending().is_empty() {
                held_back += 1;
            }
            assert!(
                !chunk.contains('\u{fffd}'),
                "[{name}] replacement char in {chunk:?}"
            );
            chunks.push(chunk);
        }
        assert!(stream.flush().is_empty());
        assert!(
            held_back > 0,
            "[{name}] no token ended inside a character: the test text is too easy"
        );
        let joined: String = chunks.concat();
        assert_eq!(joined.trim_start(), text, "[{name}]");
        println!(
            "[{name}] emoji stream: {} tokens, {held_back} held back partial characters",
            ids.len()
        );
    }
}

#[test]
fn special_tokens_and_eog() {
    let path = model_path();
    let file = GgufFile::open(&path).unwrap();
    let ours = Tokenizer::from_gguf(&file).unwrap();
    let peer = LlamaCpp::load_vocab(&path).unwrap();
    for id in 0..ours.n_vocab() as u32 {
        assert_eq!(
            ours.is_eog(id),
            peer.is_eog(id),
            "is_eog({id} = {:?})",
            ours.token_text(id)
        );
    }
    let im_end = ours.token_id("<|im_end|>").unwrap();
    assert!(ours.is_eog(im_end));
    assert!(
        ours.token_bytes(im_end).is_empty(),
        "control tokens render as nothing"
    );
    assert_eq!(
        ours.encode("<|im_start|>user", false, true)[0],
        ours.token_id("<|im_start|>").unwrap()
    );
    assert!(ours.encode("<|im_start|>user", false, false).len() > 2);
    assert!(!ours.add_bos());
    assert_eq!(
        ours.encode("hi", true, false),
        ours.encode("hi", false, false)
    );
}

fn tiny_vocab(edit: impl FnOnce(&mut GgufWriter)) -> Result<Tokenizer, String> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", Value::String("gpt-2".into()));
    let toks = ["a", "b", "ab"].map(|s| Value::String(s.into())).to_vec();
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(ValueType::String, toks),
    );
    w.set(
        "tokenizer.ggml.merges",
        Value::Array(ValueType::String, vec![Value::String("a b".into())]),
    );
    edit(&mut w);
    let f = GgufFile::from_bytes("tiny.gguf", w.to_bytes()).map_err(|e| e.to_string())?;
    Tokenizer::from_gguf(&f).map_err(|e| e.to_string())
}

#[test]
fn bad_vocabularies_are_clear_errors() {
    let ok = tiny_vocab(|_| {}).unwrap();
    assert_eq!(ok.encode("ab", false, false), vec![2]);
    let e = tiny_vocab(|w| w.remove("tokenizer.ggml.tokens")).unwrap_err();
    assert_eq!(
        e,
        "tiny.gguf: required metadata key 'tokenizer.ggml.tokens' is missing"
    );
    let e =
        tiny_vocab(|w| w.set("tokenizer.ggml.model", Value::String("bert".into()))).unwrap_err();
    assert!(
        e.starts_with("tiny.gguf: tokenizer.ggml.model = 'bert' is not supported"),
        "{e}"
    );
    let e =
        tiny_vocab(|w| w.set("tokenizer.ggml.pre", Value::String("nonesuch".into()))).unwrap_err();
    assert!(
        e.contains("'tokenizer.ggml.pre' = 'nonesuch' is out of range"),
        "{e}"
    );
    assert!(
        e.contains("smollm") && e.contains("llama-bpe") && e.contains("qwen2"),
        "{e}"
    );
    let e = tiny_vocab(|w| w.remove("tokenizer.ggml.merges")).unwrap_err();
    assert_eq!(
        e,
        "tiny.gguf: required metadata key 'tokenizer.ggml.merges' is missing"
    );
    let e = tiny_vocab(|w| w.set("tokenizer.ggml.eos_token_id", Value::U32(7))).unwrap_err();
    assert!(
        e.contains("'tokenizer.ggml.eos_token_id' = 7 is out of range"),
        "{e}"
    );
    let e = tiny_vocab(|w| {
        w.set(
            "tokenizer.ggml.token_type",
            Value::Array(ValueType::I32, vec![Value::I32(1)]),
        )
    })
    .unwrap_err();
    assert!(e.contains("'tokenizer.ggml.token_type' = 1 entries"), "{e}");
    let e = tiny_vocab(|w| w.set("tokenizer.ggml.tokens", Value::U32(3))).unwrap_err();
    assert!(
        e.contains("'tokenizer.ggml.tokens' has type u32, expected array[string]"),
        "{e}"
    );
}

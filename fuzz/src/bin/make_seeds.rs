//! Writes the seed corpora `fuzz/seeds/{gguf,tokenizer,llama2c,chat_template}/` and the
//! stories260K vocabulary `fuzz/models/tok512.gguf` the tokenizer target runs on.
//!
//! Usage: `make_seeds TINYLLAMAS_DIR` (the directory holding llama2.c's `tok512.bin`, e.g.
//! `../shared/models/tinyllamas`). Seeds are small on purpose (AFL mutates faster on small
//! files): tiny LLaMA models (1 layer, n_embd 32) in F16/Q8_0/Q4_0/Q4_1 with a
//! SentencePiece-style or a byte-level BPE vocabulary, a vocabulary-only file, tiny llama2.c
//! checkpoints, sample texts and real chat templates.

use std::path::{Path, PathBuf};

use ffnskip::convert::llama2c::vocab_only_gguf;
use ffnskip::convert::quantize::{quantize_file, Target};
use ffnskip::gguf::{GgmlType, GgufWriter, Value, ValueType};

// The smallest LLaMA the quantized types allow (n_embd = one Q8_0/Q4_0 block): AFL runs
// more inputs per second on small files. Two heads sharing one KV head (GQA).
const N_EMBD: u64 = 32;
const N_FF: u64 = 32;
const N_HEAD: u64 = 2;
const N_HEAD_KV: u64 = 1;
const N_LAYER: u64 = 1;

/// Deterministic small weights in [-0.05, 0.05).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    }
}

fn strings(v: impl IntoIterator<Item = String>) -> Value {
    Value::Array(
        ValueType::String,
        v.into_iter().map(Value::String).collect(),
    )
}

/// A SentencePiece-style ("llama") vocabulary: <unk>, <s>, </s>, two byte tokens, a few words.
fn spm_vocab(w: &mut GgufWriter<'_>) -> u64 {
    let tokens: Vec<String> = [
        "<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "▁", "▁the", "e", "t", "he", "▁t", "▁Hello",
    ]
    .map(String::from)
    .to_vec();
    let n = tokens.len();
    let types = (0..n).map(|i| {
        Value::I32(match i {
            0 => 2,
            1 | 2 => 3,
            3 | 4 => 6,
            _ => 1,
        })
    });
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set("tokenizer.ggml.tokens", strings(tokens));
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(
            ValueType::F32,
            (0..n).map(|i| Value::F32(-(i as f32))).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types.collect()),
    );
    w.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    n as u64
}

/// A byte-level BPE ("gpt2", SmolLM's pre-tokenizer) vocabulary: a few byte characters
/// (GPT-2's `bytes_to_unicode`: `Ġ` is the space, `Ċ` the newline), merges, two special tokens.
fn bpe_vocab(w: &mut GgufWriter<'_>) -> u64 {
    let mut tokens: Vec<String> = ["Ġ", "Ċ", "t", "h", "e", "a", "i", "n", "Ã", "©"]
        .map(String::from)
        .to_vec();
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ã ©"];
    tokens.extend(["Ġt", "he", "Ġthe", "in", "Ġa", "Ã©"].map(String::from));
    tokens.extend(["<|im_start|>", "<|im_end|>"].map(String::from));
    let n_tok = tokens.len();
    let types = (0..n_tok).map(|i| Value::I32(if i >= n_tok - 2 { 3 } else { 1 }));
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", Value::String("smollm".into()));
    w.set("tokenizer.ggml.tokens", strings(tokens));
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types.collect()),
    );
    w.set("tokenizer.ggml.merges", strings(merges.map(String::from)));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(n_tok as u32 - 2));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(n_tok as u32 - 1));
    w.set(
        "tokenizer.chat_template",
        Value::String(CHAT_TEMPLATES[0].1.into()),
    );
    n_tok as u64
}

/// A tiny LLaMA with F32 weights; `bpe` picks the vocabulary.
fn tiny_llama(bpe: bool) -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.name", Value::String("tiny".into()));
    w.set("llama.block_count", Value::U32(N_LAYER as u32));
    w.set("llama.context_length", Value::U32(64));
    w.set("llama.embedding_length", Value::U32(N_EMBD as u32));
    w.set("llama.feed_forward_length", Value::U32(N_FF as u32));
    w.set("llama.attention.head_count", Value::U32(N_HEAD as u32));
    w.set(
        "llama.attention.head_count_kv",
        Value::U32(N_HEAD_KV as u32),
    );
    w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    w.set("llama.rope.freq_base", Value::F32(10000.0));
    w.set(
        "llama.rope.dimension_count",
        Value::U32((N_EMBD / N_HEAD) as u32),
    );
    let n_vocab = if bpe {
        bpe_vocab(&mut w)
    } else {
        spm_vocab(&mut w)
    };
    let kv = N_EMBD / N_HEAD * N_HEAD_KV;
    let mut shapes: Vec<(String, Vec<u64>)> = vec![
        ("token_embd.weight".into(), vec![N_EMBD, n_vocab]),
        ("output_norm.weight".into(), vec![N_EMBD]),
    ];
    if bpe {
        // Separate output matrix and LLaMA-3.1-style RoPE frequency factors.
        shapes.push(("output.weight".into(), vec![N_EMBD, n_vocab]));
        shapes.push(("rope_freqs.weight".into(), vec![N_EMBD / N_HEAD / 2]));
    }
    for l in 0..N_LAYER {
        for (n, s) in [
            ("attn_norm", vec![N_EMBD]),
            ("attn_q", vec![N_EMBD, N_EMBD]),
            ("attn_k", vec![N_EMBD, kv]),
            ("attn_v", vec![N_EMBD, kv]),
            ("attn_output", vec![N_EMBD, N_EMBD]),
            ("ffn_norm", vec![N_EMBD]),
            ("ffn_gate", vec![N_EMBD, N_FF]),
            ("ffn_up", vec![N_EMBD, N_FF]),
            ("ffn_down", vec![N_FF, N_EMBD]),
        ] {
            shapes.push((format!("blk.{l}.{n}.weight"), s));
        }
    }
    let mut rng = Lcg(7);
    for (name, shape) in shapes {
        let n: u64 = shape.iter().product();
        let ones = shape.len() == 1;
        let data: Vec<u8> = (0..n)
            .flat_map(|_| if ones { 1.0f32 } else { rng.next() }.to_le_bytes())
            .collect();
        w.add_tensor(&name, GgmlType::F32, &shape, data)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    w
}

/// A llama2.c checkpoint (`run.c` legacy format) with dim 4, 1 layer, `vocab` tokens, random
/// weights; negative `vocab` means a separate classifier.
fn llama2c_checkpoint(vocab: i32) -> Vec<u8> {
    let (dim, hidden, layers, heads, kv_heads, seq) = (4i32, 8i32, 1i32, 2i32, 1i32, 2i32);
    let mut b: Vec<u8> = [dim, hidden, layers, heads, kv_heads, vocab, seq]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let (d, h, l, v) = (
        dim as usize,
        hidden as usize,
        layers as usize,
        vocab.unsigned_abs() as usize,
    );
    let kv = d / heads as usize * kv_heads as usize;
    let head = d / heads as usize;
    let mut n = v * d + l * (2 * d + 2 * d * d + 2 * kv * d + 3 * d * h) + d + seq as usize * head;
    if vocab < 0 {
        n += v * d;
    }
    let mut rng = Lcg(3);
    b.extend((0..n).flat_map(|_| rng.next().to_le_bytes()));
    b
}

/// A llama2.c `tokenizer.bin` of `n` tokens.
fn llama2c_tokenizer(n: usize) -> Vec<u8> {
    let mut b = 8i32.to_le_bytes().to_vec();
    for i in 0..n {
        let text = match i {
            0 => "<unk>".to_string(),
            1 => "\n<s>\n".into(),
            2 => "\n</s>\n".into(),
            i if i < 5 => format!("<0x{:02X}>", i + 7),
            i => format!(" t{i}"),
        };
        b.extend((-(i as f32)).to_le_bytes());
        b.extend((text.len() as i32).to_le_bytes());
        b.extend(text.as_bytes());
    }
    b
}

/// The llama2c target's input: u32 LE checkpoint length, checkpoint, tokenizer.
fn llama2c_input(ckpt: &[u8], tok: &[u8]) -> Vec<u8> {
    let mut b = (ckpt.len() as u32).to_le_bytes().to_vec();
    b.extend_from_slice(ckpt);
    b.extend_from_slice(tok);
    b
}

/// Real chat templates (as stored in the models' GGUF `tokenizer.chat_template`).
const CHAT_TEMPLATES: &[(&str, &str)] = &[
    (
        "smollm2",
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ),
    (
        "llama2",
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    ),
    (
        "llama3",
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    (
        "qwen2",
        "{%- for message in messages %}\n    {%- if loop.first and message.role != 'system' %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n",
    ),
    (
        "zephyr",
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    ),
    (
        "macros",
        "{% macro m(x) %}[{{ x|upper }}]{% endmacro %}{% for i in range(3) %}{{ m(messages[0].content ~ i) }}{% if loop.last %}{{ messages|length }}{% endif %}{% endfor %}{{ messages|map(attribute='role')|join(',') }}{{ messages[0].content.split(' ')|first }}{{ '%d'|format(2) }}",
    ),
];

fn write(path: PathBuf, bytes: &[u8]) {
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn main() {
    let tinyllamas = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "../shared/models/tinyllamas".into()),
    );
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = |name: &str| {
        let d = fuzz.join(name);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        d
    };
    let models = dir("models");
    let gguf = dir("seeds/gguf");
    let tokenizer = dir("seeds/tokenizer");
    let llama2c = dir("seeds/llama2c");
    let chat = dir("seeds/chat_template");

    // The stories260K vocabulary: the tokenizer target's SentencePiece-style model and a
    // vocabulary-only GGUF seed.
    let tok512 = models.join("tok512.gguf");
    vocab_only_gguf(&tinyllamas.join("tok512.bin"), &tok512).unwrap_or_else(|e| panic!("{e:#}"));
    std::fs::copy(&tok512, gguf.join("vocab_only_tok512.gguf")).unwrap_or_else(|e| panic!("{e}"));

    // Tiny models: F32 as built, then requantized with the project's quantizer.
    let tmp = std::env::temp_dir().join(format!("ffnskip-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("{e}"));
    for (bpe, vocab) in [(false, "spm"), (true, "bpe")] {
        let f32_path = tmp.join(format!("tiny_{vocab}_f32.gguf"));
        tiny_llama(bpe)
            .write_file(&f32_path)
            .unwrap_or_else(|e| panic!("{e}"));
        let targets: &[&str] = if bpe {
            &["q8_0", "q4_1"]
        } else {
            &["f16", "q8_0", "q4_0"]
        };
        for t in targets {
            let target = Target::parse(t).unwrap_or_else(|e| panic!("{e:#}"));
            let out = gguf.join(format!("tiny_{vocab}_{t}.gguf"));
            quantize_file(&f32_path, &out, target).unwrap_or_else(|e| panic!("{t}: {e:#}"));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);

    // Tokenizer texts: flags byte (bit 0 add_special, bit 1 parse_special, bits 2.. model).
    let texts: &[(u8, &str)] = &[
        (
            0b011,
            "Once upon a time, there was a little girl named Lily.",
        ),
        (
            0b111,
            "<|im_start|>user\nHello, world! 123 4567<|im_end|>\n",
        ),
        (0b000, "  leading spaces\tand\ttabs\n\nnewlines  "),
        (0b110, "héllo wörld — ½ 😀 日本語 \u{0}\u{7f}"),
        (0b011, "<s>[INST] What's up? [/INST]</s>"),
        (0b100, "I'm won't they'll 3.14 1,000,000 can't"),
    ];
    for (i, (flags, text)) in texts.iter().enumerate() {
        let mut b = vec![*flags];
        b.extend_from_slice(text.as_bytes());
        write(tokenizer.join(format!("text{i}")), &b);
    }

    // llama2.c: shared and separate classifiers, and a real 512-token tokenizer.
    let tok8 = llama2c_tokenizer(8);
    write(
        llama2c.join("tiny_shared"),
        &llama2c_input(&llama2c_checkpoint(8), &tok8),
    );
    write(
        llama2c.join("tiny_separate"),
        &llama2c_input(&llama2c_checkpoint(-8), &tok8),
    );
    let real_tok = std::fs::read(tinyllamas.join("tok512.bin")).unwrap_or_else(|e| panic!("{e}"));
    write(
        llama2c.join("tok512"),
        &llama2c_input(&llama2c_checkpoint(512), &real_tok),
    );

    // Chat templates with a conversation: flags (bit 0 add_generation_prompt), NUL-separated.
    for (i, (name, src)) in CHAT_TEMPLATES.iter().enumerate() {
        let mut b = vec![(i % 2) as u8];
        b.extend_from_slice(src.as_bytes());
        for part in [
            "system",
            "Be brief.",
            "user",
            " Hi! ",
            "assistant",
            "Hello.",
            "user",
            "Why?",
        ] {
            b.push(0);
            b.extend_from_slice(part.as_bytes());
        }
        write(chat.join(name), &b);
    }
    println!("seeds written under {}", fuzz.join("seeds").display());
}

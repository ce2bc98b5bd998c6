//! A tiny LLaMA GGUF built in memory, for model-level tests of the reader and writer.

use ffnskip::gguf::{GgmlType, GgufWriter, Value, ValueType};

use super::Lcg;

pub const N_EMBD: u64 = 64;
pub const N_LAYER: u64 = 2;
pub const N_HEAD: u64 = 4;
/// Grouped-query attention: two query heads per KV head.
pub const N_HEAD_KV: u64 = 2;
pub const KV_DIM: u64 = N_EMBD / N_HEAD * N_HEAD_KV;
pub const N_FF: u64 = 128;
pub const N_VOCAB: u64 = 32;

/// A tiny LLaMA (F32 weights, small random values) with a 32-token SentencePiece-style
/// vocabulary. `shape_of(name, default_shape)` may change a tensor's shape, or drop it
/// with `None`. Shapes are ggml `ne` order, `[n_in, n_out]`.
pub type ShapeOf<'f> = &'f dyn Fn(&str, Vec<u64>) -> Option<Vec<u64>>;

pub fn tiny_llama(shape_of: ShapeOf) -> GgufWriter<'static> {
    tiny_model("llama", shape_of)
}

/// [`tiny_llama`] under another architecture's keys (`{arch}.block_count`, …); `qwen2` also
/// gets Q/K/V biases (`blk.{l}.attn_{q,k,v}.bias`, small random values).
pub fn tiny_model(arch: &str, shape_of: ShapeOf) -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.name", Value::String("tiny".into()));
    for (key, value) in [
        ("block_count", Value::U32(N_LAYER as u32)),
        ("context_length", Value::U32(128)),
        ("embedding_length", Value::U32(N_EMBD as u32)),
        ("feed_forward_length", Value::U32(N_FF as u32)),
        ("attention.head_count", Value::U32(N_HEAD as u32)),
        ("attention.head_count_kv", Value::U32(N_HEAD_KV as u32)),
        ("attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("rope.freq_base", Value::F32(10000.0)),
        ("rope.dimension_count", Value::U32((N_EMBD / N_HEAD) as u32)),
    ] {
        w.set(&format!("{arch}.{key}"), value);
    }
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    let mut tokens = vec![
        "<unk>".to_string(),
        "<s>".into(),
        "</s>".into(),
        "<0x0A>".into(),
    ];
    tokens.extend((tokens.len()..N_VOCAB as usize).map(|i| format!("▁t{i}")));
    let types: Vec<Value> = (0..N_VOCAB)
        .map(|i| {
            Value::I32(match i {
                0 => 2,
                1 | 2 => 3,
                3 => 6,
                _ => 1,
            })
        })
        .collect();
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(
            ValueType::String,
            tokens.into_iter().map(Value::String).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(
            ValueType::F32,
            (0..N_VOCAB).map(|i| Value::F32(-(i as f32))).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types),
    );
    w.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(0));

    let mut shapes: Vec<(String, Vec<u64>)> = vec![
        ("token_embd.weight".into(), vec![N_EMBD, N_VOCAB]),
        ("output_norm.weight".into(), vec![N_EMBD]),
        ("output.weight".into(), vec![N_EMBD, N_VOCAB]),
    ];
    for l in 0..N_LAYER {
        for (n, s) in [
            ("attn_norm", vec![N_EMBD]),
            ("attn_q", vec![N_EMBD, N_EMBD]),
            ("attn_k", vec![N_EMBD, KV_DIM]),
            ("attn_v", vec![N_EMBD, KV_DIM]),
            ("attn_output", vec![N_EMBD, N_EMBD]),
            ("attn_q.bias", vec![N_EMBD]),
            ("attn_k.bias", vec![KV_DIM]),
            ("attn_v.bias", vec![KV_DIM]),
            ("ffn_norm", vec![N_EMBD]),
            ("ffn_gate", vec![N_EMBD, N_FF]),
            ("ffn_up", vec![N_EMBD, N_FF]),
            ("ffn_down", vec![N_FF, N_EMBD]),
        ] {
            if n.ends_with(".bias") {
                if arch == "qwen2" {
                    shapes.push((format!("blk.{l}.{n}"), s));
                }
            } else {
                shapes.push((format!("blk.{l}.{n}.weight"), s));
            }
        }
    }
    let mut rng = Lcg(7);
    for (name, shape) in shapes {
        let Some(shape) = shape_of(&name, shape) else {
            continue;
        };
        let n: u64 = shape.iter().product();
        let norm = shape.len() == 1 && !name.ends_with(".bias");
        let data: Vec<u8> = (0..n)
            .flat_map(|_| if norm { 1.0f32 } else { rng.uniform() * 0.1 }.to_le_bytes())
            .collect();
        w.add_tensor(&name, GgmlType::F32, &shape, data).unwrap();
    }
    w
}

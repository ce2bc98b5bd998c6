//! Architectures and optional parts on tiny models written with the project's GGUF writer,
//! against llama.cpp loading the same file: `qwen2` (Q/K/V biases, NEOX RoPE, `qwen2.*` keys)
//! and LLaMA-3.1-style `rope_freqs`. Logits are identical to the bit at every position
//! (F32 weights: llama.cpp one token per ubatch, where it runs the same kernels).

mod common;

use common::tiny::{tiny_llama, tiny_model, N_EMBD, N_HEAD, N_VOCAB};
use ffnskip::gguf::{GgmlType, GgufFile, GgufWriter};
use ffnskip::model::{Arch, Batch, Llama, Logits, RopeMode, Scratch};
use ffnskip::peer::{LlamaCpp, PeerMode};
use ffnskip::skip::NoSkip;

const IDS: [u32; 12] = [1, 5, 9, 17, 4, 30, 22, 8, 8, 13, 27, 6];

/// Writes `w`, then compares ffnskip's logits with llama.cpp's at every position of `IDS`,
/// fed as one batch (ours) and token by token (llama.cpp). Returns the model's config and
/// the logits `[IDS.len(), n_vocab]`.
fn same_logits_as_llama_cpp(tag: &str, w: &GgufWriter) -> (ffnskip::model::LlamaConfig, Vec<f32>) {
    let path = common::temp_path(tag, "tiny.gguf");
    w.write_file(&path).expect("write");
    let _cleanup = common::TempFile(path.clone());
    let file = GgufFile::open(&path).expect("open");
    let model = Llama::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let n = model.config.n_vocab;
    let mut cache = model.new_cache(32);
    let mut scratch = Scratch::new(&model, IDS.len(), 32);
    let batch = Batch {
        tokens: &IDS,
        prompt: true,
        logits: Logits::All,
    };
    let ours = model
        .forward(&mut cache, &mut scratch, &batch, &mut NoSkip)
        .expect("forward")
        .to_vec();
    let peer = LlamaCpp::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
    let mut ctx = peer
        .context(32, 1, PeerMode::Reference { ubatch: 1 })
        .unwrap_or_else(|e| panic!("{e:#}"));
    let theirs = ctx.eval(&IDS, true).expect("llama.cpp eval");
    assert_eq!(theirs.len(), IDS.len());
    for (i, t) in theirs.iter().enumerate() {
        let o = &ours[i * n..(i + 1) * n];
        assert_eq!(
            common::max_abs_diff(o, t),
            0.0,
            "{tag}: logits differ at position {i}"
        );
    }
    (model.config.clone(), ours)
}

#[test]
fn qwen2_matches_llama_cpp_bit_for_bit() {
    let (c, _) = same_logits_as_llama_cpp("qwen2", &tiny_model("qwen2", &|_, s| Some(s)));
    assert_eq!(c.arch, Arch::Qwen2);
    assert_eq!(c.arch.rope_mode(), RopeMode::Neox);
    assert_eq!(c.n_vocab, N_VOCAB as usize);
}

#[test]
fn qwen2_needs_its_biases() {
    let w = tiny_model("qwen2", &|n, s| (n != "blk.1.attn_k.bias").then_some(s));
    let path = common::temp_path("qwen2-nobias", "tiny.gguf");
    w.write_file(&path).expect("write");
    let _cleanup = common::TempFile(path.clone());
    let file = GgufFile::open(&path).expect("open");
    let err = Llama::load(&file).err().expect("missing bias");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: required tensor 'blk.1.attn_k.bias' is missing",
            path.display()
        )
    );
}

#[test]
fn llama_with_rope_freqs_matches_llama_cpp_bit_for_bit() {
    let mut w = tiny_llama(&|_, s| Some(s));
    // LLaMA-3.1-style per-frequency divisors, [rope_dim / 2].
    let half = (N_EMBD / N_HEAD / 2) as usize;
    let factors: Vec<u8> = (0..half)
        .flat_map(|i| (1.0f32 + 0.75 * i as f32).to_le_bytes())
        .collect();
    w.add_tensor("rope_freqs.weight", GgmlType::F32, &[half as u64], factors)
        .expect("rope_freqs");
    let (with, with_logits) = same_logits_as_llama_cpp("rope-freqs", &w);
    assert_eq!(with.arch.rope_mode(), RopeMode::Normal);
    // The factors matter: the same model without them gives other logits.
    let (_, plain_logits) = same_logits_as_llama_cpp("rope-plain", &tiny_llama(&|_, s| Some(s)));
    assert!(common::max_abs_diff(&with_logits, &plain_logits) > 1e-3);
}

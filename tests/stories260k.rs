//! llama2.c's stories260K (karpathy/tinyllamas) converted to GGUF by `convert_llama2c`:
//! logits against llama.cpp on the same GGUF and against a direct port of llama2.c's `run.c`
//! on the original checkpoint (which checks the conversion itself: tensor layout, RoPE
//! pairing), a golden greedy story, greedy continuations against llama.cpp, and the errors
//! for malformed checkpoints.

mod common;

use std::path::{Path, PathBuf};

use common::{temp_path, TempFile};
use ffnskip::convert::convert_llama2c;
use ffnskip::gguf::GgufFile;
use ffnskip::model::{Batch, Llama, Logits, Scratch};
use ffnskip::peer::{argmax, LlamaCpp, PeerMode};
use ffnskip::skip::NoSkip;
use ffnskip::tokenizer::Tokenizer;

const N_CTX: usize = 512;

/// The first 40 greedy tokens after BOS, as llama.cpp generates them on the converted model.
const GOLDEN_STORY: &str =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, r";

fn tiny(shared: &Path) -> (PathBuf, PathBuf) {
    let dir = shared.join("models/tinyllamas");
    (dir.join("stories260K.bin"), dir.join("tok512.bin"))
}

fn converted(shared: &Path) -> TempFile {
    let (ckpt, tok) = tiny(shared);
    let out = TempFile(temp_path("s260k", "stories260K.gguf"));
    convert_llama2c(&ckpt, &tok, &out.0).expect("convert stories260K");
    out
}

/// ffnskip: all logits of `tokens` from an empty cache, `[n, n_vocab]`.
fn ours_logits(model: &Llama, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(N_CTX);
    let mut scratch = Scratch::new(model, N_CTX, N_CTX);
    let batch = Batch {
        tokens,
        prompt: true,
        logits: Logits::All,
    };
    model
        .forward(&mut cache, &mut scratch, &batch, &mut NoSkip)
        .expect("forward")
        .to_vec()
}

/// ffnskip greedy: prompt, then `n` tokens one at a time.
fn ours_greedy(model: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache(N_CTX);
    let mut scratch = Scratch::new(model, N_CTX, N_CTX);
    let batch = Batch {
        tokens: prompt,
        prompt: true,
        logits: Logits::Last,
    };
    let mut t = argmax(
        model
            .forward(&mut cache, &mut scratch, &batch, &mut NoSkip)
            .expect("forward"),
    );
    let mut out = vec![t];
    while out.len() < n {
        let batch = Batch {
            tokens: &[t],
            prompt: false,
            logits: Logits::Last,
        };
        t = argmax(
            model
                .forward(&mut cache, &mut scratch, &batch, &mut NoSkip)
                .expect("forward"),
        );
        out.push(t);
    }
    out
}

/// A direct port of llama2.c's `run.c` forward pass (f32 throughout), on the original
/// checkpoint: the reference that the conversion preserved the model.
struct RunC {
    dim: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    w: Vec<f32>,
    // offsets into w
    emb: usize,
    rms_att: usize,
    wq: usize,
    wk: usize,
    wv: usize,
    wo: usize,
    rms_ffn: usize,
    w1: usize,
    w2: usize,
    w3: usize,
    rms_final: usize,
    wcls: usize,
}

impl RunC {
    fn load(path: &Path) -> RunC {
        let bytes = std::fs::read(path).unwrap();
        let h: Vec<i32> = (0..7)
            .map(|i| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()))
            .collect();
        let w: Vec<f32> = bytes[28..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (dim, hidden, layers, heads, kv_heads) = (
            h[0] as usize,
            h[1] as usize,
            h[2] as usize,
            h[3] as usize,
            h[4] as usize,
        );
        let (vocab, seq_len) = (h[5].unsigned_abs() as usize, h[6] as usize);
        let kv_dim = dim / heads * kv_heads;
        let mut off = 0;
        let mut take = |n: usize| {
            let o = off;
            off += n;
            o
        };
        let emb = take(vocab * dim);
        let rms_att = take(layers * dim);
        let wq = take(layers * dim * dim);
        let wk = take(layers * dim * kv_dim);
        let wv = take(layers * dim * kv_dim);
        let wo = take(layers * dim * dim);
        let rms_ffn = take(layers * dim);
        let w1 = take(layers * dim * hidden);
        let w2 = take(layers * dim * hidden);
        let w3 = take(layers * dim * hidden);
        let rms_final = take(dim);
        take(seq_len * dim / heads); // freq_cis_real + freq_cis_imag
        let wcls = if h[5] > 0 { emb } else { take(vocab * dim) };
        RunC {
            dim,
            hidden,
            layers,
            heads,
            kv_heads,
            vocab,
            w,
            emb,
            rms_att,
            wq,
            wk,
            wv,
            wo,
            rms_ffn,
            w1,
            w2,
            w3,
            rms_final,
            wcls,
        }
    }

    fn rmsnorm(o: &mut [f32], x: &[f32], w: &[f32]) {
        let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + 1e-5;
        let s = 1.0 / ss.sqrt();
        for i in 0..x.len() {
            o[i] = w[i] * (s * x[i]);
        }
    }

    /// `xout[d] = W[d, n] @ x[n]`, W at `w[off..]`.
    fn matmul(&self, out: &mut [f32], x: &[f32], off: usize, n: usize, d: usize) {
        for (i, o) in out.iter_mut().enumerate().take(d) {
            let row = &self.w[off + i * n..off + (i + 1) * n];
            *o = row.iter().zip(x).map(|(a, b)| a * b).sum();
        }
    }

    /// Logits after each token of `tokens`, `[n, vocab]`.
    fn logits(&self, tokens: &[u32]) -> Vec<f32> {
        let (d, hd, hs) = (self.dim, self.hidden, self.dim / self.heads);
        let kv_dim = hs * self.kv_heads;
        let kv_mul = self.heads / self.kv_heads;
        let n = tokens.len();
        let mut kc = vec![0f32; self.layers * n * kv_dim];
        let mut vc = vec![0f32; self.layers * n * kv_dim];
        let mut out = Vec::with_capacity(n * self.vocab);
        for (pos, &tok) in tokens.iter().enumerate() {
            let mut x =
                self.w[self.emb + tok as usize * d..self.emb + (tok as usize + 1) * d].to_vec();
            let (mut xb, mut xb2) = (vec![0f32; d], vec![0f32; d]);
            let (mut hb, mut hb2) = (vec![0f32; hd], vec![0f32; hd]);
            let mut q = vec![0f32; d];
            let (mut k, mut v) = (vec![0f32; kv_dim], vec![0f32; kv_dim]);
            for l in 0..self.layers {
                Self::rmsnorm(
                    &mut xb,
                    &x,
                    &self.w[self.rms_att + l * d..self.rms_att + (l + 1) * d],
                );
                self.matmul(&mut q, &xb, self.wq + l * d * d, d, d);
                self.matmul(&mut k, &xb, self.wk + l * d * kv_dim, d, kv_dim);
                self.matmul(&mut v, &xb, self.wv + l * d * kv_dim, d, kv_dim);
                // RoPE on adjacent pairs (run.c).
                for i in (0..d).step_by(2) {
                    let head_dim = i % hs;
                    let freq = 1.0 / 10000f32.powf(head_dim as f32 / hs as f32);
                    let val = pos as f32 * freq;
                    let (fci, fcr) = val.sin_cos();
                    let rotn = if i < kv_dim { 2 } else { 1 };
                    for which in 0..rotn {
                        let vec = if which == 0 { &mut q } else { &mut k };
                        let (v0, v1) = (vec[i], vec[i + 1]);
                        vec[i] = v0 * fcr - v1 * fci;
                        vec[i + 1] = v0 * fci + v1 * fcr;
                    }
                }
                let base = l * n * kv_dim + pos * kv_dim;
                kc[base..base + kv_dim].copy_from_slice(&k);
                vc[base..base + kv_dim].copy_from_slice(&v);
                for h in 0..self.heads {
                    let qh = &q[h * hs..(h + 1) * hs];
                    let kvo = (h / kv_mul) * hs;
                    let mut att: Vec<f32> = (0..=pos)
                        .map(|t| {
                            let kt = &kc[l * n * kv_dim + t * kv_dim + kvo..][..hs];
                            qh.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>() / (hs as f32).sqrt()
                        })
                        .collect();
                    let max = att.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for a in att.iter_mut() {
                        *a = (*a - max).exp();
                        sum += *a;
                    }
                    let o = &mut xb[h * hs..(h + 1) * hs];
                    o.fill(0.0);
                    for (t, a) in att.iter().enumerate() {
                        let vt = &vc[l * n * kv_dim + t * kv_dim + kvo..][..hs];
                        for i in 0..hs {
                            o[i] += a / sum * vt[i];
                        }
                    }
                }
                self.matmul(&mut xb2, &xb, self.wo + l * d * d, d, d);
                for i in 0..d {
                    x[i] += xb2[i];
                }
                Self::rmsnorm(
                    &mut xb,
                    &x,
                    &self.w[self.rms_ffn + l * d..self.rms_ffn + (l + 1) * d],
                );
                self.matmul(&mut hb, &xb, self.w1 + l * d * hd, d, hd);
                self.matmul(&mut hb2, &xb, self.w3 + l * d * hd, d, hd);
                for i in 0..hd {
                    hb[i] = hb[i] / (1.0 + (-hb[i]).exp()) * hb2[i];
                }
                self.matmul(&mut xb, &hb, self.w2 + l * d * hd, hd, d);
                for i in 0..d {
                    x[i] += xb[i];
                }
            }
            let xf = x.clone();
            Self::rmsnorm(&mut x, &xf, &self.w[self.rms_final..self.rms_final + d]);
            let mut logits = vec![0f32; self.vocab];
            self.matmul(&mut logits, &x, self.wcls, d, self.vocab);
            out.extend(logits);
        }
        out
    }
}

const PROMPTS: &[&str] = &[
    "Once upon a time, there was a little girl named Lily.",
    "Tom and his dog went to the park. They saw a big tree and",
    "The sun was shining. Sam wanted to play with his ball, but his mom said",
];

#[test]
fn logits_match_llama_cpp_and_run_c() {
    let Some(shared) = common::shared("stories260k logits") else {
        return;
    };
    let gguf = converted(&shared);
    let file = GgufFile::open(&gguf.0).unwrap();
    let model = Llama::load(&file).expect("ffnskip loads the converted model");
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let peer = LlamaCpp::load(&gguf.0).expect("llama.cpp loads the converted model");
    let reference = RunC::load(&tiny(&shared).0);
    let n_vocab = model.config.n_vocab;
    assert_eq!((n_vocab, peer.n_vocab()), (512, 512));
    let (mut worst_peer, mut worst_ref, mut worst_peer_ref, mut positions) = (0f32, 0f32, 0f32, 0);
    for prompt in PROMPTS {
        let ids = tok.encode(prompt, true, false);
        assert_eq!(ids, peer.tokenize(prompt, true, false));
        let mut pc = peer
            .context(N_CTX as u32, 1, PeerMode::Reference { ubatch: 1 })
            .unwrap();
        let theirs = pc.eval(&ids, true).unwrap();
        let ours = ours_logits(&model, &ids);
        let reference = reference.logits(&ids);
        for (i, t) in theirs.iter().enumerate() {
            let o = &ours[i * n_vocab..(i + 1) * n_vocab];
            let r = &reference[i * n_vocab..(i + 1) * n_vocab];
            assert_eq!(
                argmax(o),
                argmax(t),
                "top-1 ffnskip vs llama.cpp at {i} of {prompt:?}"
            );
            assert_eq!(
                argmax(r),
                argmax(t),
                "top-1 run.c vs llama.cpp at {i} of {prompt:?}"
            );
            worst_peer = worst_peer.max(common::max_abs_diff(o, t));
            worst_ref = worst_ref.max(common::max_abs_diff(o, r));
            worst_peer_ref = worst_peer_ref.max(common::max_abs_diff(t, r));
        }
        positions += ids.len();
    }
    println!(
        "stories260K: {positions} positions, top-1 identical everywhere; max |Δlogit| ffnskip–llama.cpp {worst_peer:.2e}, ffnskip–run.c {worst_ref:.2e}, llama.cpp–run.c {worst_peer_ref:.2e}"
    );
    // llama.cpp one token per ubatch (F32 weights take tinyBLAS in larger ones): the same
    // kernels as ffnskip, so the same bits. run.c is f32 throughout (no f16 K/V).
    assert_eq!(worst_peer, 0.0, "ffnskip vs llama.cpp");
    assert!(
        worst_ref < 5e-2 && worst_peer_ref < 5e-2,
        "vs run.c: {worst_ref}, {worst_peer_ref}"
    );
}

#[test]
fn greedy_story_matches_golden_and_llama_cpp() {
    let Some(shared) = common::shared("stories260k greedy") else {
        return;
    };
    let gguf = converted(&shared);
    let file = GgufFile::open(&gguf.0).unwrap();
    let model = Llama::load(&file).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let peer = LlamaCpp::load(&gguf.0).unwrap();
    let bos = [tok.bos().unwrap()];

    // Golden story opening from BOS.
    let mut pc = peer
        .context(N_CTX as u32, 1, PeerMode::Reference { ubatch: 1 })
        .unwrap();
    let theirs = pc.greedy(&bos, 40, |_| false).unwrap();
    let ours = ours_greedy(&model, &bos, 40);
    let text = tok.decode(&ours);
    println!("golden story ({} tokens): {text:?}", ours.len());
    assert_eq!(ours, theirs, "greedy tokens from BOS");
    assert_eq!(String::from_utf8_lossy(&peer.detokenize(&theirs)), text);
    assert_eq!(text, GOLDEN_STORY);

    // Continuations of prompts, 100 tokens each.
    for prompt in PROMPTS {
        let ids = tok.encode(prompt, true, false);
        pc.clear();
        let theirs = pc.greedy(&ids, 100, |_| false).unwrap();
        let ours = ours_greedy(&model, &ids, 100);
        assert_eq!(
            ours,
            theirs,
            "greedy continuation of {prompt:?}: ours {:?} llama.cpp {:?}",
            tok.decode(&ours),
            tok.decode(&theirs)
        );
    }
}

/// Writes `bytes` to a temp file and converts it with tok512.bin; returns the error text.
fn convert_error(shared: &Path, name: &str, bytes: &[u8], tokenizer: Option<&Path>) -> String {
    let ckpt = TempFile(temp_path("s260k", name));
    std::fs::write(&ckpt.0, bytes).unwrap();
    let out = TempFile(temp_path("s260k", "out.gguf"));
    let default_tok = tiny(shared).1;
    let err = convert_llama2c(&ckpt.0, tokenizer.unwrap_or(&default_tok), &out.0)
        .expect_err("conversion must fail");
    assert!(!out.0.exists(), "no output on failure");
    format!("{err:#}")
}

#[test]
fn malformed_checkpoints_are_clear_errors() {
    let Some(shared) = common::shared("stories260k malformed") else {
        return;
    };
    let (ckpt, tok) = tiny(&shared);
    let good = std::fs::read(&ckpt).unwrap();

    let e = convert_error(&shared, "short.bin", &good[..20], None);
    assert!(
        e.ends_with(
            "short.bin: truncated llama2.c checkpoint: the header needs 28 bytes, the file has 20"
        ),
        "{e}"
    );

    let e = convert_error(&shared, "truncated.bin", &good[..good.len() - 100], None);
    assert!(
        e.ends_with(
            "truncated.bin: llama2.c checkpoint with dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512 (shared classifier), seq_len=512 needs 1056540 bytes (28-byte header + 264128 f32 weights), the file has 1056440 (truncated?)"
        ),
        "{e}"
    );

    let mut wrong = good.clone();
    wrong[8..12].copy_from_slice(&6i32.to_le_bytes()); // n_layers 5 → 6
    let e = convert_error(&shared, "wrong-layers.bin", &wrong, None);
    assert!(
        e.contains("n_layers=6") && e.contains("the file has 1056540 (truncated?)"),
        "{e}"
    );

    let mut wrong = good.clone();
    wrong[20..24].copy_from_slice(&(-512i32).to_le_bytes()); // claims a separate classifier
    let e = convert_error(&shared, "unshared.bin", &wrong, None);
    assert!(
        e.contains("vocab_size=512 (separate classifier)")
            && e.contains("the file has 1056540 (truncated?)"),
        "{e}"
    );

    let mut extra = good.clone();
    extra.extend_from_slice(&[0; 8]);
    let e = convert_error(&shared, "extra.bin", &extra, None);
    assert!(
        e.ends_with("the file has 1056548 (trailing data or wrong header)"),
        "{e}"
    );

    let mut wrong = good.clone();
    wrong[12..16].copy_from_slice(&7i32.to_le_bytes()); // n_heads 8 → 7
    let e = convert_error(&shared, "heads.bin", &wrong, None);
    assert!(
        e.ends_with("heads.bin: llama2.c header: dim = 64 is not a multiple of n_heads = 7"),
        "{e}"
    );

    let mut wrong = good.clone();
    wrong[0..4].copy_from_slice(&(-64i32).to_le_bytes());
    let e = convert_error(&shared, "negative.bin", &wrong, None);
    assert!(e.ends_with("negative.bin: not a llama2.c checkpoint: header field dim = -64 (expected a positive number)"), "{e}");

    let mut v1 = 0x616b_3432u32.to_le_bytes().to_vec();
    v1.extend(1i32.to_le_bytes());
    v1.extend(&good[8..200]);
    let e = convert_error(&shared, "v1.bin", &v1, None);
    assert!(
        e.contains("v1.bin: llama2.c export version 1 (magic \"ak42\") is not supported"),
        "{e}"
    );

    // Tokenizer that does not fit the checkpoint.
    let big_tok = shared.join("models/tinyllamas/tokenizer.bin");
    let e = convert_error(&shared, "ok.bin", &good, Some(&big_tok));
    assert!(e.contains("tokenizer.bin: llama2.c tokenizer has more than the checkpoint's vocab_size = 512 tokens"), "{e}");
    let tok_bytes = std::fs::read(&tok).unwrap();
    let cut = TempFile(temp_path("s260k", "tok-cut.bin"));
    std::fs::write(&cut.0, &tok_bytes[..tok_bytes.len() - 2]).unwrap();
    let e = convert_error(&shared, "ok2.bin", &good, Some(&cut.0));
    assert!(
        e.contains(
            "tok-cut.bin: truncated llama2.c tokenizer: token 511 has length 3, 1 bytes remain"
        ),
        "{e}"
    );
    let missing = temp_path("s260k", "does-not-exist.bin");
    let e = convert_error(&shared, "ok3.bin", &good, Some(&missing));
    assert!(
        e.contains("does-not-exist.bin: cannot read llama2.c tokenizer"),
        "{e}"
    );
}

#[test]
fn vocab_only_gguf_loads_in_llama_cpp() {
    let Some(shared) = common::shared("stories260k vocab only") else {
        return;
    };
    let out = TempFile(temp_path("s260k", "tok512-vocab.gguf"));
    ffnskip::convert::vocab_only_gguf(&tiny(&shared).1, &out.0).unwrap();
    let peer = LlamaCpp::load_vocab(&out.0).expect("llama.cpp loads the vocab-only GGUF");
    let file = GgufFile::open(&out.0).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(peer.n_vocab(), 512);
    let text = "Once upon a time, Lily found a shiny red ball. \"Wow!\" she said.";
    assert_eq!(
        tok.encode(text, true, false),
        peer.tokenize(text, true, false)
    );
    assert!(
        Llama::load(&file).is_err(),
        "a vocabulary-only file is not a model"
    );
}

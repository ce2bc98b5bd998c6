//! llama.cpp, through the `llama-cpp-2` crate: the oracle in tests (tokens, logits, greedy
//! text) and the peer in benchmarks. Never on ffnskip's own hot path.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        // init() fails only if called twice; OnceLock calls it once per process.
        let mut b = LlamaBackend::init().expect("llama.cpp backend initialises once");
        if std::env::var_os("FFNSKIP_LLAMA_LOG").is_none() {
            b.void_logs();
        }
        b
    })
}

pub struct LlamaCpp {
    model: LlamaModel,
    /// Every layer on the GPU ([`LlamaCpp::load_gpu`]); otherwise nothing leaves the CPU,
    /// even in a `--features cuda` build.
    gpu: bool,
}

/// How the peer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerMode {
    /// llama.cpp's defaults: flash attention (its CPU default), 512-row ubatches, every thread
    /// for prompts and decode. Benchmarks compare against this.
    Default,
    /// A configuration in which llama.cpp computes exactly ffnskip's numerics, for the oracle in
    /// tests: flash attention, prompts in ubatches of at most `ubatch` rows, decode on one
    /// thread. With ≥ 64-row ubatches ggml takes a tiled attention kernel, and with more than
    /// one thread single-token decode over ≥ 512 cached positions splits the KV range; both
    /// sum in other orders. For weights whose batched matmul goes through llamafile's tinyBLAS
    /// (F32, F16, BF16, Q8_0, Q4_0, Q5_0, IQ4_NL) only `ubatch: 1` is sure to keep ggml's
    /// row-by-row dot; for Q4_1 small batches give the same bits. Types llama.cpp repacks at
    /// load (see [`LlamaCpp::load`]) run kernels of their own and match only within rounding.
    Reference { ubatch: u32 },
}

/// Largest ubatch for [`PeerMode::Reference`] (ggml's tiled flash attention starts at 64).
pub const REFERENCE_MAX_UBATCH: u32 = 32;

impl LlamaCpp {
    /// Loads as llama.cpp does by default: Q4_0, Q4_K, IQ4_NL and a few other types are
    /// repacked into interleaved layouts for its GEMM kernels (llama-cpp-2 does not expose
    /// `use_extra_bufts` to turn that off).
    /// On the CPU: no layer on a GPU (llama.cpp's default offloads them all when it has one)
    /// and, in [`LlamaCpp::context`], no op offloaded either.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Self::load_with(path, false, 0)
    }

    /// Every layer on the first GPU (llama.cpp's CUDA backend in a `--features cuda` build).
    pub fn load_gpu(path: &Path) -> anyhow::Result<Self> {
        Self::load_offloaded(path, 999)
    }

    /// The last `layers` layers on the first GPU (llama.cpp's `-ngl`); 0 is [`LlamaCpp::load`].
    pub fn load_offloaded(path: &Path, layers: u32) -> anyhow::Result<Self> {
        Self::load_with(path, false, layers)
    }

    /// Loads only the vocabulary (for tokenizer comparisons).
    pub fn load_vocab(path: &Path) -> anyhow::Result<Self> {
        Self::load_with(path, true, 0)
    }

    fn load_with(path: &Path, vocab_only: bool, gpu_layers: u32) -> anyhow::Result<Self> {
        let params = LlamaModelParams::default()
            .with_vocab_only(vocab_only)
            .with_n_gpu_layers(gpu_layers);
        let model = LlamaModel::load_from_file(backend(), path, &params)
            .map_err(|e| anyhow::anyhow!("llama.cpp could not load {}: {e}", path.display()))?;
        Ok(LlamaCpp {
            model,
            gpu: gpu_layers > 0,
        })
    }

    /// llama.cpp's tokenization: `add_special` adds BOS/EOS as the metadata asks,
    /// `parse_special` turns special-token text into those tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    pub fn detokenize(&self, tokens: &[u32]) -> Vec<u8> {
        let t: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken(t as i32)).collect();
        self.model.vocab().detokenize(&t, false, false)
    }

    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab() as usize
    }

    pub fn is_eog(&self, token: u32) -> bool {
        self.model.vocab().is_eog(LlamaToken(token as i32))
    }

    pub fn context(
        &self,
        n_ctx: u32,
        threads: usize,
        mode: PeerMode,
    ) -> anyhow::Result<PeerContext<'_>> {
        let batch = n_ctx.min(512);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(batch)
            .with_n_threads_batch(threads as i32)
            .with_op_offload(self.gpu)
            .with_offload_kqv(self.gpu);
        let params = match mode {
            PeerMode::Default => params.with_n_ubatch(batch).with_n_threads(threads as i32),
            PeerMode::Reference { ubatch } => params
                .with_n_ubatch(batch.min(ubatch.clamp(1, REFERENCE_MAX_UBATCH)))
                .with_n_threads(1)
                .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED),
        };
        let ctx = self
            .model
            .new_context(backend(), params)
            .map_err(|e| anyhow::anyhow!("llama.cpp context: {e}"))?;
        Ok(PeerContext {
            ctx,
            batch: LlamaBatch::new(batch as usize, 1),
            pos: 0,
            n_vocab: self.n_vocab(),
        })
    }
}

pub struct PeerContext<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    pos: i32,
    n_vocab: usize,
}

impl PeerContext<'_> {
    pub fn clear(&mut self) {
        self.ctx.clear_kv_cache();
        self.pos = 0;
    }

    /// Evaluates `tokens` (≤ 512) after what the context holds; returns the logits of every
    /// row (`all`) or of the last one, each `[n_vocab]`.
    pub fn eval(&mut self, tokens: &[u32], all: bool) -> anyhow::Result<Vec<Vec<f32>>> {
        self.batch.clear();
        for (i, &t) in tokens.iter().enumerate() {
            let want = all || i + 1 == tokens.len();
            self.batch
                .add(LlamaToken(t as i32), self.pos + i as i32, &[0], want)?;
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| anyhow::anyhow!("llama.cpp decode: {e}"))?;
        let out = if all {
            (0..tokens.len())
                .map(|i| self.ctx.get_logits_ith(i as i32)[..self.n_vocab].to_vec())
                .collect()
        } else {
            vec![self.ctx.get_logits_ith(tokens.len() as i32 - 1)[..self.n_vocab].to_vec()]
        };
        self.pos += tokens.len() as i32;
        Ok(out)
    }

    /// Decodes one token without copying logits (benchmarks).
    pub fn step(&mut self, token: u32) -> anyhow::Result<()> {
        self.batch.clear();
        self.batch
            .add(LlamaToken(token as i32), self.pos, &[0], true)?;
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| anyhow::anyhow!("llama.cpp decode: {e}"))?;
        self.pos += 1;
        Ok(())
    }

    /// Argmax of the last logits.
    pub fn argmax_last(&self) -> u32 {
        argmax(&self.ctx.get_logits_ith(self.batch.n_tokens() - 1)[..self.n_vocab])
    }

    /// Prompt in chunks of 512, then `n` greedy tokens (stops early on `stop`).
    pub fn greedy(
        &mut self,
        prompt: &[u32],
        n: usize,
        stop: impl Fn(u32) -> bool,
    ) -> anyhow::Result<Vec<u32>> {
        for chunk in prompt.chunks(512) {
            self.eval(chunk, false)?;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = self.argmax_last();
            out.push(t);
            if stop(t) {
                break;
            }
            self.step(t)?;
        }
        Ok(out)
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

//! The LLaMA model: configuration, weights borrowed from the GGUF mapping, KV cache and the
//! one forward function used for both batched prefill and single-token decode.

mod attention;
mod blocks;
mod config;
mod device;
mod forward;
mod kv_cache;
mod rope;
mod weights;

pub use config::{Arch, LlamaConfig, RopeMode, RopeScaling};
pub use device::{DeviceModel, DeviceSummary, Offload, OffloadDevice};
pub use forward::{Batch, ForwardError, Logits, Scratch, StageTimes};
pub use kv_cache::{KvCache, KvPrefix};
pub use weights::{LayerWeights, Weights};

use crate::gguf::{GgufFile, Result};
use rope::Rope;

/// How [`Llama::load_with`] prepares the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Repack the types ggml repacks on this CPU (Q4_K, Q4_0 on x86 with AVX2) into its
    /// interleaved layout and run its GEMV/GEMM kernels on them, as llama.cpp does by default (its
    /// `--no-repack` turns that off). The copy replaces the mapped pages in memory.
    pub repack: bool,
    /// Layers to run on a device (`-ngl N`); `None` (or 0 layers): all on the CPU.
    pub offload: Option<Offload>,
    /// Threads of ggml's CPU backend when that is the offload device.
    pub device_threads: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            repack: true,
            offload: None,
            device_threads: 1,
        }
    }
}

pub struct Llama<'a> {
    pub file: &'a GgufFile,
    pub config: LlamaConfig,
    pub weights: Weights<'a>,
    rope: Rope,
    /// The offloaded layers' weights on the device (`LoadOptions::offload`).
    pub device: Option<DeviceModel>,
}

impl<'a> Llama<'a> {
    /// [`Llama::load_with`] with the default options (weights repacked as llama.cpp does).
    pub fn load(file: &'a GgufFile) -> Result<Self> {
        Self::load_with(file, LoadOptions::default())
    }

    /// Reads the configuration and views every weight; nothing is copied but the norms and,
    /// with `repack`, the matrices ggml repacks for its GEMV/GEMM kernels on this CPU.
    pub fn load_with(file: &'a GgufFile, options: LoadOptions) -> Result<Self> {
        crate::ggml::init();
        let config = LlamaConfig::from_gguf(file)?;
        let mut weights = Weights::from_gguf(file, &config)?;
        // Every layer on a device: the CPU never multiplies by these weights.
        let all_offloaded = options.offload.is_some_and(|o| o.layers >= config.n_layer);
        if options.repack && !all_offloaded {
            weights.repack(file);
        }
        let rope = Rope::new(&config, weights.rope_freqs.clone());
        let mut model = Llama {
            file,
            config,
            weights,
            rope,
            device: None,
        };
        if let Some(o) = options.offload.filter(|o| o.layers > 0) {
            let d = DeviceModel::load(file, &model.config, &model, o, options.device_threads)
                .map_err(|e| file.error(crate::gguf::ErrorKind::Device(e)))?;
            model.device = Some(d);
        }
        Ok(model)
    }

    /// A KV cache for `n_ctx` positions.
    pub fn new_cache(&self, n_ctx: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(c.n_layer, c.n_head_kv, c.head_dim, n_ctx)
    }

    /// Weight bytes per layer, for the skip statistics.
    pub fn layer_bytes(&self) -> crate::skip::LayerBytes {
        let ls = &self.weights.layers;
        crate::skip::LayerBytes {
            ffn: ls.iter().map(|l| l.ffn_bytes() as u64).collect(),
            attn: ls.iter().map(|l| l.attn_bytes() as u64).collect(),
            attn_qo: ls
                .iter()
                .map(|l| (l.attn_q.n_bytes() + l.attn_output.n_bytes()) as u64)
                .collect(),
        }
    }

    /// Weight bytes read to decode one token with every block running
    /// (embedding row excluded: one row is negligible).
    pub fn bytes_per_token(&self) -> usize {
        let w = &self.weights;
        w.layers
            .iter()
            .map(|l| l.attn_bytes() + l.ffn_bytes())
            .sum::<usize>()
            + w.output.n_bytes()
    }
}

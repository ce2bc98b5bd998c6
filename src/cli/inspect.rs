//! `ffnskip inspect FILE`: what a GGUF holds and how ffnskip will run it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use super::{model_path, open_gguf};
use crate::gguf::{GgmlType, GgufFile};
use crate::model::LlamaConfig;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// GGUF file, or a catalogue name fetched on first use (`ffnskip models`; default: the
    /// default model).
    pub file: Option<PathBuf>,
    /// Also list every metadata key.
    #[arg(long)]
    pub metadata: bool,
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let path = model_path(&a.file)?;
    let (file, _) = open_gguf(&path)?;
    super::out(&report(&file, a.metadata))?;
    Ok(())
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// ggml's devices (GPUs first, then the CPU), with memory for GPUs, and whether `-ngl`
/// can use one.
fn devices() -> String {
    use crate::ggml::graph::{Device, DeviceKind};
    let all: Vec<String> = Device::all()
        .iter()
        .map(|d| {
            let i = d.info();
            match i.kind {
                DeviceKind::Cpu => format!("{} (CPU)", i.name),
                k => format!(
                    "{} ({}, {}, {:.1} of {:.1} GiB free)",
                    i.name,
                    k.as_str(),
                    i.description,
                    i.memory_free as f64 / (1u64 << 30) as f64,
                    i.memory_total as f64 / (1u64 << 30) as f64
                ),
            }
        })
        .collect();
    let gpu = Device::first(DeviceKind::Gpu).is_some();
    let note = match (cfg!(feature = "cuda"), gpu) {
        (_, true) => "; -ngl N offloads to the first GPU",
        (true, false) => "; built with CUDA, but no GPU is visible (-ngl needs one)",
        (false, false) => "; CPU-only build (-ngl needs --features cuda: docs/CUDA.md)",
    };
    format!("{}{note}", all.join(", "))
}

/// The whole report as text.
pub fn report(f: &GgufFile, all_metadata: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "file         {} ({})",
        f.path().display(),
        mb(f.file_size())
    );
    let _ = writeln!(
        s,
        "gguf         v{}, alignment {}, {} metadata keys, {} tensors",
        f.version,
        f.alignment,
        f.metadata().len(),
        f.tensors().len()
    );
    let arch = f
        .opt_str("general.architecture")
        .ok()
        .flatten()
        .unwrap_or("(none)");
    let name = f.opt_str("general.name").ok().flatten().unwrap_or("");
    let _ = writeln!(s, "architecture {arch}  {name}");
    match LlamaConfig::from_gguf(f) {
        Ok(c) => {
            let _ = writeln!(s, "layers       {}", c.n_layer);
            let _ = writeln!(s, "embedding    {}  ffn {}", c.n_embd, c.n_ff);
            let _ = writeln!(
                s,
                "heads        {} (kv {}, GQA {}×), head dim {}",
                c.n_head,
                c.n_head_kv,
                c.n_head / c.n_head_kv,
                c.head_dim
            );
            let _ = writeln!(
                s,
                "rope         base {}, dims {}, scaling {:?}",
                c.rope_base, c.rope_dim, c.rope_scaling
            );
            let _ = writeln!(s, "rms eps      {:e}", c.rms_eps);
            let _ = writeln!(s, "context      {} (training)", c.n_ctx_train);
            let _ = writeln!(s, "vocabulary   {}", c.n_vocab);
            let tied = f.tensor_info("output.weight").is_none();
            let _ = writeln!(
                s,
                "output head  {}",
                if tied {
                    "tied to token_embd.weight"
                } else {
                    "output.weight"
                }
            );
        }
        Err(e) => {
            let _ = writeln!(s, "not runnable by ffnskip: {e}");
        }
    }
    let tok_model = f.opt_str("tokenizer.ggml.model").ok().flatten();
    let pre = f.opt_str("tokenizer.ggml.pre").ok().flatten();
    let n_tok = f
        .opt_str_array("tokenizer.ggml.tokens")
        .ok()
        .flatten()
        .map_or(0, |t| t.len());
    let kind = match tok_model {
        Some("gpt2") => "byte-level BPE (gpt2)",
        Some("llama") => "SentencePiece-style BPE with byte fallback (llama)",
        Some(_) => "unsupported by ffnskip",
        None => "none",
    };
    let _ = writeln!(
        s,
        "tokenizer    {} {}{}, {n_tok} tokens",
        tok_model.unwrap_or("-"),
        kind,
        pre.map(|p| format!(", pre-tokenizer '{p}'"))
            .unwrap_or_default()
    );
    let template = f.opt_str("tokenizer.chat_template").ok().flatten();
    let _ = writeln!(
        s,
        "chat         {}",
        match template {
            Some(t) => format!("template present ({} chars)", t.len()),
            None => "no chat template".into(),
        }
    );
    let _ = writeln!(
        s,
        "kernels      ggml CPU: {}",
        crate::ggml::cpu_features().join(" ")
    );
    let _ = writeln!(s, "build        {}", rust_target_features());
    let _ = writeln!(s, "devices      {}", devices());
    // What `Weights::repack` repacks: product matrices (not the embedding) of types ggml
    // repacks on this CPU.
    let (mut n_packed, mut packed_bytes) = (0usize, 0u64);
    for t in f.tensors() {
        let product = t.name == "output.weight"
            || (t.name.starts_with("blk.") && t.name.ends_with(".weight") && t.shape.len() == 2);
        let rows = t.shape.get(1).copied().unwrap_or(0) as usize;
        if product && crate::ggml::repack::repacks(t.ty, rows) {
            n_packed += 1;
            packed_bytes += t.n_bytes;
        }
    }
    if n_packed > 0 {
        let _ = writeln!(
            s,
            "repack       {n_packed} tensors ({}) repacked at load for ggml's GEMV/GEMM kernels, as llama.cpp does (--no-repack: off)",
            mb(packed_bytes)
        );
    }

    let mut by_type: BTreeMap<GgmlType, (usize, u64)> = BTreeMap::new();
    for t in f.tensors() {
        let e = by_type.entry(t.ty).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    let total: u64 = by_type.values().map(|v| v.1).sum();
    let _ = writeln!(s, "\nquantization mix ({} of tensor data):", mb(total));
    for (ty, (n, bytes)) in &by_type {
        let _ = writeln!(
            s,
            "  {:<8} {:>4} tensors {:>12} {:>5.1}%",
            ty.name(),
            n,
            mb(*bytes),
            100.0 * *bytes as f64 / total.max(1) as f64
        );
    }
    if all_metadata {
        let _ = writeln!(s, "\nmetadata:");
        for (k, v) in f.metadata() {
            let _ = writeln!(s, "  {k:<40} {}", v.summary(80));
        }
    }
    let _ = writeln!(
        s,
        "\n{:<32} {:<8} {:<20} {:>12}",
        "tensor", "type", "shape (ne)", "offset"
    );
    for t in f.tensors() {
        let shape = t
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(" × ");
        let _ = writeln!(
            s,
            "{:<32} {:<8} {:<20} {:>12}",
            t.name,
            t.ty.name(),
            shape,
            f.data_offset + t.offset
        );
    }
    s
}

/// The x86/ARM SIMD features this binary's own code was compiled for.
fn rust_target_features() -> String {
    let mut v: Vec<&str> = Vec::new();
    macro_rules! feat {
        ($($f:literal),*) => { $( if cfg!(target_feature = $f) { v.push($f); } )* };
    }
    feat!(
        "sse4.2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vnni",
        "avx512bf16",
        "neon"
    );
    format!(
        "{} ({})",
        std::env::consts::ARCH,
        if v.is_empty() {
            "baseline".into()
        } else {
            v.join(" ")
        }
    )
}

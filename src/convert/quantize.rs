//! `ffnskip quantize`: (re)quantize a LLaMA GGUF into another llama.cpp file type with ggml's
//! reference quantizers, choosing every tensor's type exactly as llama.cpp's
//! `llama_model_quantize` does (`src/llama-quant.cpp` of the llama.cpp that `llama-cpp-sys-2`
//! 0.1.160 builds: `tensor_allows_quantization`, `llama_tensor_get_type_impl`,
//! `tensor_type_fallback`) with default parameters (no imatrix, no overrides, not `--pure`).
//!
//! Targets and the `LLAMA_FTYPE_MOSTLY_*` they mirror: Q8_0, Q6_K, Q5_K_M, Q5_0, Q4_K_M, Q4_1,
//! Q4_0 and F16 (`q4_k` / `q5_k` mean the `_M` mixes, llama-quantize's recommended ones).
//!
//! The rules, for a `llama` model without experts:
//! - Only tensors whose name ends in `weight`, with at least 2 dimensions (ggml's `n_dims`,
//!   trailing 1s ignored), that are not norms (`_norm.weight`) nor one of llama.cpp's excluded
//!   names are converted; every other tensor keeps its type and bytes (norms stay F32).
//! - F16: every such tensor becomes F16; no other rule applies (F16 is not a quantized type).
//! - The output head (`output.weight`, or `token_embd.weight` when the model ties it and has no
//!   `output.weight`) becomes Q8_0 when its row length is not a multiple of the target's block
//!   size, else Q6_K unless the target is Q8_0 (then Q8_0).
//! - Q4_K_M and Q5_K_M: `attn_v` and `ffn_down` of the layers where llama.cpp's
//!   `use_more_bits(i, n)` holds (the first and last eighth, and every third layer between)
//!   become Q6_K; on a 70B model (80 layers, grouped-query attention) a Q4_K `attn_v` becomes
//!   Q5_K.
//! - Fallback: a tensor whose row length (`ne[0]`) is not a multiple of the chosen type's block
//!   size gets Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0 (Q2_K/Q3_K→Q4_0, IQ*→IQ4_NL), and F16 when even
//!   that does not divide it (or when a 32-block type does not).
//! - A tensor that already has its target type is copied byte for byte (as llama.cpp does);
//!   any other is dequantized to f32 (ggml's `to_float`) and quantized with
//!   `ggml_quantize_chunk`, row-parallel, which gives the same bytes as one call.
//!
//! Metadata: every key is kept in order except the split keys (`split.*`, removed), then
//! `general.quantization_version` = 2 and `general.file_type` = the ftype are moved to the end,
//! as `gguf_set_val_u32` does; tensors are written in llama.cpp's order (layer number, then
//! name). With the same input llama.cpp's own quantizer writes the same file byte for byte.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use crate::ggml;
use crate::gguf::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value};

/// `GGML_QNT_VERSION`, written as `general.quantization_version`.
pub const QUANTIZATION_VERSION: u32 = 2;

/// Elements dequantized and quantized per parallel task (whole rows, at least one).
const CHUNK_ELEMENTS: usize = 1 << 16;

/// A target file type of `ffnskip quantize` (a llama.cpp `LLAMA_FTYPE_MOSTLY_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum Target {
    Q8_0,
    Q6_K,
    Q5_K_M,
    Q5_0,
    Q4_K_M,
    Q4_1,
    Q4_0,
    F16,
}

impl Target {
    pub const ALL: [Target; 8] = [
        Target::Q8_0,
        Target::Q6_K,
        Target::Q5_K_M,
        Target::Q5_0,
        Target::Q4_K_M,
        Target::Q4_1,
        Target::Q4_0,
        Target::F16,
    ];

    /// The `--type` spelling (lower case, as llama-quantize's names).
    pub fn name(self) -> &'static str {
        match self {
            Target::Q8_0 => "q8_0",
            Target::Q6_K => "q6_k",
            Target::Q5_K_M => "q5_k_m",
            Target::Q5_0 => "q5_0",
            Target::Q4_K_M => "q4_k_m",
            Target::Q4_1 => "q4_1",
            Target::Q4_0 => "q4_0",
            Target::F16 => "f16",
        }
    }

    /// `llama_ftype` (`include/llama.h`), written as `general.file_type`.
    pub fn ftype(self) -> u32 {
        match self {
            Target::F16 => 1,
            Target::Q4_0 => 2,
            Target::Q4_1 => 3,
            Target::Q8_0 => 7,
            Target::Q5_0 => 8,
            Target::Q4_K_M => 15,
            Target::Q5_K_M => 17,
            Target::Q6_K => 18,
        }
    }

    /// llama.cpp's `llama_ftype_get_default_type`: the type of most weight matrices.
    pub fn default_type(self) -> GgmlType {
        match self {
            Target::Q8_0 => GgmlType::Q8_0,
            Target::Q6_K => GgmlType::Q6_K,
            Target::Q5_K_M => GgmlType::Q5_K,
            Target::Q5_0 => GgmlType::Q5_0,
            Target::Q4_K_M => GgmlType::Q4_K,
            Target::Q4_1 => GgmlType::Q4_1,
            Target::Q4_0 => GgmlType::Q4_0,
            Target::F16 => GgmlType::F16,
        }
    }

    /// The accepted `--type` values, for messages.
    pub fn supported_list() -> String {
        "q8_0, q6_k, q5_k (= q5_k_m), q5_0, q4_k (= q4_k_m), q4_1, q4_0, f16".to_string()
    }

    /// Parses a `--type` value, case-insensitively; `q4_k`/`q5_k` mean the `_M` mixes.
    pub fn parse(s: &str) -> Result<Target> {
        let lower = s.trim().to_ascii_lowercase();
        let alias = match lower.as_str() {
            "q4_k" => "q4_k_m",
            "q5_k" => "q5_k_m",
            other => other,
        };
        if let Some(t) = Target::ALL.iter().copied().find(|t| t.name() == alias) {
            return Ok(t);
        }
        if let Some(ty) = GgmlType::from_name(&lower) {
            if ggml::quantize_requires_imatrix(ty) {
                bail!(
                    "--type {s}: {ty} needs an importance matrix (imatrix), which ffnskip quantize \
                     does not compute; supported types: {}",
                    Target::supported_list()
                );
            }
        }
        bail!(
            "unsupported --type '{s}'; supported types: {}",
            Target::supported_list()
        )
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    /// ggml `ne`: `shape[0]` is the row length.
    pub shape: Vec<u64>,
    pub from: GgmlType,
    pub to: GgmlType,
    /// The type the rules chose before the block-size fallback replaced it with `to`.
    pub fell_back_from: Option<GgmlType>,
}

impl TensorPlan {
    pub fn n_per_row(&self) -> u64 {
        self.shape[0]
    }
    pub fn n_rows(&self) -> u64 {
        self.shape[1..].iter().product()
    }
    /// Whether the data is converted (else copied byte for byte).
    pub fn converts(&self) -> bool {
        self.from != self.to
    }
}

/// Every tensor's type in the output, in llama.cpp's write order.
#[derive(Clone, Debug)]
pub struct Plan {
    pub target: Target,
    pub tensors: Vec<TensorPlan>,
}

/// llama.cpp's `tensor_category` (broad roles, matched on name substrings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    AttnQ,
    AttnV,
    AttnK,
    AttnQkv,
    AttnKvB,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Output,
    Other,
}

/// `tensor_get_category`.
fn category(name: &str) -> Category {
    if name == "output.weight" {
        return Category::Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return Category::TokenEmbd;
    }
    const BY_SUBSTRING: [(&str, Category); 9] = [
        ("attn_qkv.weight", Category::AttnQkv),
        ("attn_kv_b.weight", Category::AttnKvB),
        ("attn_v.weight", Category::AttnV),
        ("attn_k.weight", Category::AttnK),
        ("attn_q.weight", Category::AttnQ),
        ("attn_output.weight", Category::AttnOutput),
        ("ffn_up", Category::FfnUp),
        ("ffn_gate", Category::FfnGate),
        ("ffn_down", Category::FfnDown),
    ];
    BY_SUBSTRING
        .iter()
        .find(|(s, _)| name.contains(s))
        .map_or(Category::Other, |&(_, c)| c)
}

/// `category_is_attn_v`.
fn is_attn_v_like(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// ggml's `ggml_n_dims`: dimensions with trailing 1s dropped (at least 1).
fn n_dims(shape: &[u64]) -> usize {
    let mut n = shape.len();
    while n > 1 && shape[n - 1] == 1 {
        n -= 1;
    }
    n
}

/// `tensor_allows_quantization` with default parameters (arch-specific names of other
/// architectures left out: this only runs on `llama`).
fn allows_quantization(name: &str, shape: &[u64]) -> bool {
    if n_dims(shape) < 2 {
        return false;
    }
    // llama.cpp tests `name.rfind("weight") == name.size() - 6` on size_t, which is also true
    // for a 5-byte name (npos == 5 - 6 after wrap-around).
    if !(name.ends_with("weight") || name.len() == 5) {
        return false;
    }
    const EXCLUDED: [&str; 35] = [
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    // LLM_TN(arch)(LLM_TENSOR_POS_EMBD / LLM_TENSOR_TOKEN_TYPES, "weight"): exact names.
    name != "position_embd.weight"
        && name != "token_types.weight"
        && !EXCLUDED.iter().any(|s| name.contains(s))
}

/// `use_more_bits` of `llama_tensor_get_type_impl` (C++ `int` arithmetic).
fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

/// `tensor_type_fallback`: a type whose block size divides `ncols`, or an error for a 256-block
/// type without a defined fallback.
fn fallback(ncols: u64, ty: GgmlType) -> Result<GgmlType, String> {
    use GgmlType::*;
    if ncols.is_multiple_of(ty.block_size()) {
        return Ok(ty);
    }
    let to = match ty {
        IQ1_S | IQ1_M | IQ2_XXS | IQ2_XS | IQ2_S | IQ3_XXS | IQ3_S | IQ4_XS => IQ4_NL,
        Q2_0 | Q2_K | Q3_K | TQ1_0 | TQ2_0 => Q4_0,
        Q4_K => Q5_0,
        Q5_K => Q5_1,
        Q6_K => Q8_0,
        _ if ty.block_size() <= 32 => ty,
        _ => {
            return Err(format!(
                "llama.cpp defines no tensor type fallback for {ty}"
            ))
        }
    };
    Ok(if ncols.is_multiple_of(to.block_size()) {
        to
    } else {
        F16
    })
}

/// The sort key of llama.cpp's `weights_map` (`weight_name_comparer`): the layer number that
/// `sscanf(name, "blk.%d.", &layer)` reads (-1 if none), then the name.
fn layer_of(name: &str) -> i64 {
    let Some(rest) = name.strip_prefix("blk.") else {
        return -1;
    };
    let rest = rest.trim_start();
    let (sign, digits) = match rest.as_bytes().first() {
        Some(b'-') => (-1, &rest[1..]),
        Some(b'+') => (1, &rest[1..]),
        _ => (1, rest),
    };
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    match digits[..end].parse::<i32>() {
        Ok(v) => sign * i64::from(v),
        Err(_) => -1,
    }
}

/// Mutable state of `quantize_state_impl` that matters for these targets.
struct Rules {
    target: Target,
    n_attention_wv: i64,
    i_attention_wv: i64,
    n_ffn_down: i64,
    i_ffn_down: i64,
    has_tied_embeddings: bool,
    /// `LLM_TYPE_70B`: a llama model with 80 layers and fewer KV heads than heads.
    is_70b: bool,
}

impl Rules {
    /// `llama_tensor_get_type_impl` for `self.target` (a quantized default type).
    fn choose(&mut self, name: &str, shape: &[u64], new_type: GgmlType) -> GgmlType {
        use GgmlType::*;
        let cat = category(name);
        let k_m = matches!(self.target, Target::Q4_K_M | Target::Q5_K_M);
        if cat == Category::Output || (self.has_tied_embeddings && cat == Category::TokenEmbd) {
            if !shape[0].is_multiple_of(new_type.block_size()) {
                Q8_0
            } else if new_type != Q8_0 {
                Q6_K
            } else {
                new_type
            }
        } else if cat == Category::TokenEmbd {
            new_type
        } else if is_attn_v_like(cat) {
            let mut t = new_type;
            if k_m && use_more_bits(self.i_attention_wv, self.n_attention_wv) {
                t = Q6_K;
            }
            if self.is_70b && matches!(t, Q3_K | Q4_K) {
                t = Q5_K;
            }
            self.i_attention_wv += 1;
            t
        } else if cat == Category::FfnDown {
            let t = if k_m && use_more_bits(self.i_ffn_down, self.n_ffn_down) {
                Q6_K
            } else {
                new_type
            };
            self.i_ffn_down += 1;
            t
        } else {
            // attn_k, attn_q, attn_output, ffn_gate, ffn_up: no rule for these targets on a
            // llama model without experts.
            new_type
        }
    }
}

fn is_quantized(t: GgmlType) -> bool {
    t.block_size() > 1
}

impl Plan {
    /// Chooses every tensor's output type as llama.cpp would for `target`. Refuses
    /// non-`llama` architectures and mixture-of-experts models (llama.cpp's rules differ
    /// there), and tensors ggml cannot convert.
    pub fn new(file: &GgufFile, target: Target) -> Result<Plan> {
        let path = file.path().display();
        let arch = file.str("general.architecture")?;
        // llama.cpp's type rules have no special case for either architecture (qwen2's
        // Q/K/V biases are 1-D and never quantized).
        if arch != "llama" && arch != "qwen2" {
            bail!(
                "{path}: general.architecture is '{arch}'; ffnskip quantize mirrors llama.cpp's \
                 type rules for 'llama' and 'qwen2' models only"
            );
        }
        if let Some(n) = file.opt_u64(&format!("{arch}.expert_count"))? {
            if n > 1 {
                bail!(
                    "{path}: {arch}.expert_count = {n}: mixture-of-experts models are not \
                     supported by ffnskip quantize"
                );
            }
        }
        let n_layer = file.usize_in(&format!("{arch}.block_count"), 1..=4096)? as i64;
        let is_70b = n_layer == 80 && {
            let n_head = file.u64(&format!("{arch}.attention.head_count"))?;
            let n_head_kv = file.opt_u64(&format!("{arch}.attention.head_count_kv"))?;
            n_head_kv.unwrap_or(n_head) != n_head
        };

        let mut order: Vec<&TensorInfo> = file.tensors().iter().collect();
        order.sort_by(|a, b| {
            (layer_of(&a.name), a.name.as_str()).cmp(&(layer_of(&b.name), b.name.as_str()))
        });
        let mut rules = Rules {
            target,
            n_attention_wv: order
                .iter()
                .filter(|t| is_attn_v_like(category(&t.name)))
                .count() as i64,
            i_attention_wv: 0,
            n_ffn_down: n_layer,
            i_ffn_down: 0,
            has_tied_embeddings: !order.iter().any(|t| category(&t.name) == Category::Output),
            is_70b,
        };
        let default = target.default_type();
        let mut tensors = Vec::with_capacity(order.len());
        for t in order {
            let (to, fell_back_from) = if !allows_quantization(&t.name, &t.shape) {
                (t.ty, None)
            } else if !is_quantized(default) {
                (default, None)
            } else {
                let chosen = rules.choose(&t.name, &t.shape, default);
                let to = fallback(t.shape[0], chosen)
                    .map_err(|e| anyhow!("{path}: tensor '{}': {e}", t.name))?;
                (to, (to != chosen).then_some(chosen))
            };
            if to != t.ty && !ggml::can_dequantize(t.ty) {
                bail!(
                    "{path}: tensor '{}' is {}, which ggml cannot convert to f32, so it cannot \
                     become {to}",
                    t.name,
                    t.ty
                );
            }
            tensors.push(TensorPlan {
                name: t.name.clone(),
                shape: t.shape.clone(),
                from: t.ty,
                to,
                fell_back_from,
            });
        }
        Ok(Plan { target, tensors })
    }

    /// Tensors whose row length forced a fallback type.
    pub fn n_fallback(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.fell_back_from.is_some())
            .count()
    }

    /// Fallbacks grouped as (chosen type, fallback type, row length) → count.
    pub fn fallbacks(&self) -> BTreeMap<(GgmlType, GgmlType, u64), usize> {
        let mut m = BTreeMap::new();
        for t in &self.tensors {
            if let Some(chosen) = t.fell_back_from {
                *m.entry((chosen, t.to, t.shape[0])).or_insert(0) += 1;
            }
        }
        m
    }

    /// Quantized input types of the tensors that will be requantized, with counts.
    pub fn requantized(&self) -> BTreeMap<GgmlType, usize> {
        let mut m = BTreeMap::new();
        for t in self.tensors.iter().filter(|t| t.converts()) {
            if is_quantized(t.from) {
                *m.entry(t.from).or_insert(0) += 1;
            }
        }
        m
    }

    /// Output tensors per type.
    pub fn types(&self) -> BTreeMap<GgmlType, usize> {
        let mut m = BTreeMap::new();
        for t in &self.tensors {
            *m.entry(t.to).or_insert(0) += 1;
        }
        m
    }
}

/// The output metadata: the input's keys in order without `split.*`, then
/// `general.quantization_version` and `general.file_type` (moved to the end as llama.cpp's
/// `gguf_set_val_u32` does).
pub fn output_metadata(file: &GgufFile, target: Target) -> Vec<(String, Value)> {
    const DROPPED: [&str; 5] = [
        "split.no",
        "split.count",
        "split.tensors.count",
        "general.quantization_version",
        "general.file_type",
    ];
    let mut md: Vec<(String, Value)> = file
        .metadata()
        .iter()
        .filter(|(k, _)| !DROPPED.contains(&k.as_str()))
        .cloned()
        .collect();
    md.push((
        "general.quantization_version".into(),
        Value::U32(QUANTIZATION_VERSION),
    ));
    md.push(("general.file_type".into(), Value::U32(target.ftype())));
    md
}

/// Sizes of a finished quantization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub in_file_bytes: u64,
    pub out_file_bytes: u64,
    pub in_tensor_bytes: u64,
    pub out_tensor_bytes: u64,
}

/// Converts one tensor's data `from` → `to` (`n_rows` rows of `n` elements), row chunks in
/// parallel on the current rayon pool. Errors name nothing; the caller adds the tensor.
pub fn convert_tensor(
    from: GgmlType,
    to: GgmlType,
    data: &[u8],
    n: usize,
    n_rows: usize,
) -> Result<Vec<u8>, String> {
    let row_len = |t: GgmlType| {
        t.row_bytes(n as u64).map(|b| b as usize).ok_or_else(|| {
            format!(
                "row length {n} is not a multiple of the {t} block size {}",
                t.block_size()
            )
        })
    };
    let (src_row, dst_row) = (row_len(from)?, row_len(to)?);
    if n == 0 || Some(data.len()) != src_row.checked_mul(n_rows) {
        return Err(format!(
            "{} bytes of data, expected {n_rows} rows of {src_row} bytes",
            data.len()
        ));
    }
    let rows_per_chunk = (CHUNK_ELEMENTS / n).max(1);
    let out_len = dst_row
        .checked_mul(n_rows)
        .ok_or_else(|| format!("{n_rows} rows of {dst_row} bytes overflow"))?;
    let mut out = vec![0u8; out_len];
    out.par_chunks_mut(dst_row * rows_per_chunk)
        .zip(data.par_chunks(src_row * rows_per_chunk))
        .enumerate()
        .try_for_each(|(c, (dst, src))| {
            let rows = src.len() / src_row;
            let mut f = vec![0f32; rows * n];
            ggml::dequantize(from, src, &mut f)?;
            if let Some(i) = f.iter().position(|x| !x.is_finite()) {
                return Err(format!(
                    "row {} holds {} at column {}; expected finite weights",
                    c * rows_per_chunk + i / n,
                    f[i],
                    i % n
                ));
            }
            let q = ggml::quantize(to, &f, n)?;
            if q.len() != dst.len() {
                return Err(format!(
                    "ggml produced {} bytes for {rows} rows, expected {}",
                    q.len(),
                    dst.len()
                ));
            }
            dst.copy_from_slice(&q);
            Ok(())
        })?;
    Ok(out)
}

/// Writes the quantized model to `out` (atomically: a temporary sibling, then a rename). `progress` is
/// called after each tensor with its plan and its input and output byte counts.
pub fn write_quantized(
    file: &GgufFile,
    plan: &Plan,
    out: &Path,
    mut progress: impl FnMut(&TensorPlan, u64, u64),
) -> Result<Report> {
    let path = file.path().display();
    let mut w = GgufWriter::new();
    for (k, v) in output_metadata(file, plan.target) {
        w.set(&k, v);
    }
    let (mut in_bytes, mut out_bytes) = (0u64, 0u64);
    for t in &plan.tensors {
        let info = file
            .tensor_info(&t.name)
            .ok_or_else(|| anyhow!("{path}: tensor '{}' of the plan is not in the file", t.name))?;
        let data = file.tensor_data(info);
        let new: Cow<'_, [u8]> = if t.converts() {
            let n = usize::try_from(t.n_per_row()).context("row length")?;
            let rows = usize::try_from(t.n_rows()).context("row count")?;
            Cow::Owned(convert_tensor(t.from, t.to, data, n, rows).map_err(|e| {
                anyhow!(
                    "{path}: tensor '{}' ({} {:?} → {}): {e}",
                    t.name,
                    t.from,
                    t.shape,
                    t.to
                )
            })?)
        } else {
            Cow::Borrowed(data)
        };
        in_bytes += data.len() as u64;
        out_bytes += new.len() as u64;
        progress(t, data.len() as u64, new.len() as u64);
        w.add_tensor(&t.name, t.to, &t.shape, new)
            .with_context(|| format!("{}: building the output", out.display()))?;
    }
    w.write_file(out)
        .with_context(|| format!("writing {}", out.display()))?;
    let out_file_bytes = std::fs::metadata(out)
        .with_context(|| format!("reading back {}", out.display()))?
        .len();
    Ok(Report {
        in_file_bytes: file.file_size(),
        out_file_bytes,
        in_tensor_bytes: in_bytes,
        out_tensor_bytes: out_bytes,
    })
}

/// Refuses a missing input, and an output that is the input (the rule of
/// [`crate::outfile::ensure_not_input`]).
pub fn check_paths(input: &Path, output: &Path) -> Result<()> {
    if !input.exists() {
        bail!("input file {} does not exist", input.display());
    }
    crate::outfile::ensure_not_input("OUT", output, &[("IN", input)])?;
    Ok(())
}

/// `input` → `output` for `target`, without printing: checks the paths, plans and writes.
pub fn quantize_file(input: &Path, output: &Path, target: Target) -> Result<(Plan, Report)> {
    check_paths(input, output)?;
    let file = GgufFile::open(input)?;
    let plan = Plan::new(&file, target)?;
    let report = write_quantized(&file, &plan, output, |_, _, _| {})?;
    Ok((plan, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_on_30_layers() {
        let more: Vec<i64> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }

    #[test]
    fn fallback_table() {
        use GgmlType::*;
        assert_eq!(fallback(576, Q4_K), Ok(Q5_0));
        assert_eq!(fallback(576, Q5_K), Ok(Q5_1));
        assert_eq!(fallback(576, Q6_K), Ok(Q8_0));
        assert_eq!(fallback(1536, Q6_K), Ok(Q6_K));
        assert_eq!(fallback(172, Q8_0), Ok(F16));
        assert_eq!(fallback(172, Q4_K), Ok(F16));
        assert_eq!(fallback(576, IQ2_XS), Ok(IQ4_NL));
        assert!(fallback(100, NVFP4).is_err());
    }

    #[test]
    fn layer_order_is_numeric() {
        assert_eq!(layer_of("blk.10.attn_v.weight"), 10);
        assert_eq!(layer_of("token_embd.weight"), -1);
        assert_eq!(layer_of("blk.x"), -1);
        let mut names = ["blk.10.a", "blk.2.b", "output.weight", "blk.2.a"];
        names.sort_by(|a, b| (layer_of(a), *a).cmp(&(layer_of(b), *b)));
        assert_eq!(names, ["output.weight", "blk.2.a", "blk.2.b", "blk.10.a"]);
    }

    #[test]
    fn which_tensors_are_quantized() {
        assert!(allows_quantization("blk.0.attn_q.weight", &[576, 576]));
        assert!(!allows_quantization("blk.0.attn_norm.weight", &[576]));
        assert!(!allows_quantization("output_norm.weight", &[576, 1]));
        assert!(!allows_quantization("blk.0.ffn_gate_inp.weight", &[576, 8]));
        assert!(!allows_quantization("blk.0.attn_q.bias", &[576, 2]));
        assert!(!allows_quantization("position_embd.weight", &[576, 512]));
    }

    #[test]
    fn target_names() {
        assert_eq!(Target::parse("Q4_K").ok(), Some(Target::Q4_K_M));
        assert_eq!(Target::parse("q5_k_m").ok(), Some(Target::Q5_K_M));
        assert_eq!(Target::parse("F16").ok(), Some(Target::F16));
        for t in Target::ALL {
            assert_eq!(Target::parse(t.name()).ok(), Some(t));
        }
    }
}

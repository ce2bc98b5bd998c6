//! llama2.c checkpoints (karpathy/llama2.c, legacy "version 0" export read by `run.c`) and
//! their `tokenizer.bin` → GGUF with F32 tensors, loadable by ffnskip and llama.cpp.
//!
//! Checkpoint layout (`run.c`: `Config`, `memory_map_weights`): 7 × i32 header `dim,
//! hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len` (negative `vocab_size`:
//! the classifier is not shared with the embedding), then f32 arrays in this order:
//! `token_embedding_table [vocab, dim]`, `rms_att_weight [layers, dim]`,
//! `wq [layers, dim, dim]`, `wk [layers, kv_dim, dim]`, `wv [layers, kv_dim, dim]`,
//! `wo [layers, dim, dim]`, `rms_ffn_weight [layers, dim]`, `w1 [layers, hidden, dim]`,
//! `w2 [layers, dim, hidden]`, `w3 [layers, hidden, dim]`, `rms_final [dim]`,
//! `freq_cis_real [seq_len, head_size/2]`, `freq_cis_imag [same]` (unused), and
//! `wcls [vocab, dim]` when unshared. Matrices are row-major `[out, in]`, i.e. ggml
//! `ne = [in, out]`, exactly GGUF's layout.
//!
//! RoPE: `run.c` rotates adjacent pairs `(x[i], x[i+1])` of each head, which is llama.cpp's
//! "normal" (non-NeoX) rope on GGUF LLaMA weights, so `wq`/`wk` are written unpermuted, as
//! llama.cpp's own `examples/convert-llama2c-to-ggml` does.
//!
//! `tokenizer.bin` layout (`run.c`: `build_tokenizer`): i32 `max_token_length`, then per token
//! f32 score, i32 byte length, bytes. Token text gets llama.cpp's converter treatment: ids 0,
//! 1, 2 become `<unk>` (unknown), `<s>`, `</s>` (control), `<0xXX>` are byte tokens, spaces
//! become `▁`.

use std::borrow::Cow;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::gguf::{GgmlType, GgufWriter, Value, ValueType};

const HEADER_BYTES: u64 = 7 * 4;
/// llama2.c `export.py` versions 1 and 2 start with this u32 ("ak42").
const EXPORT_MAGIC: u32 = 0x616b_3432;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_BYTE: i32 = 6;

/// The checkpoint's hyperparameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Llama2cHeader {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
    /// The output classifier is the token embedding (`vocab_size > 0` in the file).
    pub shared_classifier: bool,
}

impl Llama2cHeader {
    pub fn head_size(&self) -> usize {
        self.dim / self.n_heads
    }

    pub fn kv_dim(&self) -> usize {
        self.head_size() * self.n_kv_heads
    }

    /// Number of f32 values after the header, or `None` on overflow.
    fn n_floats(&self) -> Option<u64> {
        let (d, h, l, v, s) = (
            self.dim as u64,
            self.hidden_dim as u64,
            self.n_layers as u64,
            self.vocab_size as u64,
            self.seq_len as u64,
        );
        let kv = self.kv_dim() as u64;
        let per_layer = d // rms_att
            .checked_add(d.checked_mul(d)?.checked_mul(2)?)? // wq, wo
            .checked_add(d.checked_mul(kv)?.checked_mul(2)?)? // wk, wv
            .checked_add(d)? // rms_ffn
            .checked_add(d.checked_mul(h)?.checked_mul(3)?)?; // w1, w2, w3
        let embed = v.checked_mul(d)?;
        let freq = s.checked_mul(self.head_size() as u64)?; // real + imag, head_size/2 each
        let mut n = embed
            .checked_add(l.checked_mul(per_layer)?)?
            .checked_add(d)?
            .checked_add(freq)?;
        if !self.shared_classifier {
            n = n.checked_add(embed)?;
        }
        Some(n)
    }

    fn describe(&self) -> String {
        format!(
            "dim={}, hidden_dim={}, n_layers={}, n_heads={}, n_kv_heads={}, vocab_size={} ({} classifier), seq_len={}",
            self.dim,
            self.hidden_dim,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            self.vocab_size,
            if self.shared_classifier { "shared" } else { "separate" },
            self.seq_len
        )
    }
}

fn i32_at(bytes: &[u8], i: usize) -> i32 {
    i32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
}

/// Reads and checks the header against the size of the whole checkpoint `bytes`.
pub fn read_checkpoint_header(path: &Path, bytes: &[u8]) -> Result<Llama2cHeader> {
    let p = path.display();
    let len = bytes.len() as u64;
    if len < HEADER_BYTES {
        bail!("{p}: truncated llama2.c checkpoint: the header needs {HEADER_BYTES} bytes, the file has {len}");
    }
    if i32_at(bytes, 0) as u32 == EXPORT_MAGIC {
        let version = i32_at(bytes, 4);
        bail!(
            "{p}: llama2.c export version {version} (magic \"ak42\") is not supported: only the legacy checkpoint format read by run.c (export.py --version 0) is"
        );
    }
    let names = [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
    ];
    let raw: Vec<i32> = (0..7).map(|i| i32_at(bytes, 4 * i)).collect();
    for (i, (&v, name)) in raw.iter().zip(names).enumerate() {
        let ok = if i == 5 {
            v != 0 && v != i32::MIN
        } else {
            v > 0
        };
        if !ok {
            bail!("{p}: not a llama2.c checkpoint: header field {name} = {v} (expected a positive number)");
        }
    }
    let h = Llama2cHeader {
        dim: raw[0] as usize,
        hidden_dim: raw[1] as usize,
        n_layers: raw[2] as usize,
        n_heads: raw[3] as usize,
        n_kv_heads: raw[4] as usize,
        vocab_size: raw[5].unsigned_abs() as usize,
        seq_len: raw[6] as usize,
        shared_classifier: raw[5] > 0,
    };
    if !h.dim.is_multiple_of(h.n_heads) {
        bail!(
            "{p}: llama2.c header: dim = {} is not a multiple of n_heads = {}",
            h.dim,
            h.n_heads
        );
    }
    if h.n_kv_heads > h.n_heads || !h.n_heads.is_multiple_of(h.n_kv_heads) {
        bail!(
            "{p}: llama2.c header: n_kv_heads = {} must divide n_heads = {}",
            h.n_kv_heads,
            h.n_heads
        );
    }
    if !h.head_size().is_multiple_of(2) {
        bail!(
            "{p}: llama2.c header: head size dim / n_heads = {} must be even for RoPE",
            h.head_size()
        );
    }
    let expected = h
        .n_floats()
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add(HEADER_BYTES));
    match expected {
        Some(e) if e == len => Ok(h),
        Some(e) => bail!(
            "{p}: llama2.c checkpoint with {} needs {e} bytes ({HEADER_BYTES}-byte header + {} f32 weights), the file has {len}{}",
            h.describe(),
            (e - HEADER_BYTES) / 4,
            if len < e { " (truncated?)" } else { " (trailing data or wrong header)" }
        ),
        None => bail!("{p}: llama2.c header {} gives a size that overflows", h.describe()),
    }
}

/// One `tokenizer.bin` entry as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama2cToken {
    pub score: f32,
    pub bytes: Vec<u8>,
}

/// Reads `tokenizer.bin`: exactly `expected` tokens when given (the checkpoint's vocabulary
/// size), otherwise every token up to the end of the file.
pub fn read_llama2c_tokenizer(path: &Path, expected: Option<usize>) -> Result<Vec<Llama2cToken>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: cannot read llama2.c tokenizer", path.display()))?;
    parse_tokenizer(path, &bytes, expected)
}

fn parse_tokenizer(
    path: &Path,
    bytes: &[u8],
    expected: Option<usize>,
) -> Result<Vec<Llama2cToken>> {
    let p = path.display();
    if bytes.len() < 4 {
        bail!(
            "{p}: truncated llama2.c tokenizer: max_token_length needs 4 bytes, the file has {}",
            bytes.len()
        );
    }
    let max_len = i32_at(bytes, 0);
    if max_len <= 0 {
        bail!("{p}: not a llama2.c tokenizer: max_token_length = {max_len}");
    }
    let mut tokens = Vec::with_capacity(expected.unwrap_or(bytes.len() / 12));
    let mut off = 4usize;
    while off < bytes.len() && expected.is_none_or(|n| tokens.len() < n) {
        let i = tokens.len();
        if bytes.len() - off < 8 {
            bail!(
                "{p}: truncated llama2.c tokenizer: token {i} at offset {off} needs 8 bytes for score and length, {} remain",
                bytes.len() - off
            );
        }
        let score =
            f32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]]);
        let n = i32_at(bytes, off + 4);
        off += 8;
        if n < 0 || n as usize > bytes.len() - off {
            bail!(
                "{p}: truncated llama2.c tokenizer: token {i} has length {n}, {} bytes remain",
                bytes.len() - off
            );
        }
        tokens.push(Llama2cToken {
            score,
            bytes: bytes[off..off + n as usize].to_vec(),
        });
        off += n as usize;
    }
    if let Some(n) = expected {
        if tokens.len() < n {
            bail!(
                "{p}: llama2.c tokenizer has {} tokens, the checkpoint's vocab_size is {n}",
                tokens.len()
            );
        }
        if off != bytes.len() {
            bail!(
                "{p}: llama2.c tokenizer has more than the checkpoint's vocab_size = {n} tokens ({} bytes left after token {})",
                bytes.len() - off,
                n - 1
            );
        }
    }
    if tokens.len() < 3 {
        bail!(
            "{p}: llama2.c tokenizer has {} tokens, expected at least <unk>, <s>, </s>",
            tokens.len()
        );
    }
    Ok(tokens)
}

fn is_byte_token(s: &str) -> bool {
    s.len() == 6
        && s.starts_with("<0x")
        && s.ends_with('>')
        && s[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Adds the `tokenizer.ggml.*` keys of a llama2.c vocabulary (SentencePiece-style, "llama").
fn set_tokenizer(w: &mut GgufWriter<'_>, path: &Path, tokens: &[Llama2cToken]) -> Result<()> {
    let mut texts = Vec::with_capacity(tokens.len());
    let mut types = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let (text, ty) = match i {
            0 => ("<unk>".to_string(), TYPE_UNKNOWN),
            1 => ("<s>".to_string(), TYPE_CONTROL),
            2 => ("</s>".to_string(), TYPE_CONTROL),
            _ => {
                let s = std::str::from_utf8(&t.bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: llama2.c tokenizer token {i} ({:?}) is not valid UTF-8: {e}",
                        path.display(),
                        String::from_utf8_lossy(&t.bytes)
                    )
                })?;
                let ty = if s.is_empty() {
                    TYPE_CONTROL
                } else if is_byte_token(s) {
                    TYPE_BYTE
                } else {
                    TYPE_NORMAL
                };
                (s.replace(' ', "\u{2581}"), ty)
            }
        };
        texts.push(Value::String(text));
        types.push(Value::I32(ty));
    }
    let scores = tokens.iter().map(|t| Value::F32(t.score)).collect();
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(ValueType::String, texts),
    );
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(ValueType::F32, scores),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types),
    );
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    // run.c's encode() prepends BOS and a dummy-prefix space, as llama.cpp's SPM defaults do.
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.set("tokenizer.ggml.add_eos_token", Value::Bool(false));
    w.set("tokenizer.ggml.add_space_prefix", Value::Bool(true));
    Ok(())
}

fn set_general(w: &mut GgufWriter<'_>, name_from: &Path) {
    let name = name_from
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "llama2.c".into());
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.name", Value::String(name));
}

fn write(w: &GgufWriter<'_>, out: &Path) -> Result<()> {
    w.write_file(out)
        .with_context(|| format!("{}: cannot write GGUF", out.display()))
}

/// Converts a llama2.c checkpoint and its `tokenizer.bin` into an F32 GGUF at `out`.
pub fn convert_llama2c(checkpoint: &Path, tokenizer: &Path, out: &Path) -> Result<()> {
    let bytes = std::fs::read(checkpoint)
        .with_context(|| format!("{}: cannot read llama2.c checkpoint", checkpoint.display()))?;
    // The header first, so a bad checkpoint is reported before a missing tokenizer.
    read_checkpoint_header(checkpoint, &bytes)?;
    let tok_bytes = std::fs::read(tokenizer)
        .with_context(|| format!("{}: cannot read llama2.c tokenizer", tokenizer.display()))?;
    let w = llama2c_to_gguf(checkpoint, &bytes, tokenizer, &tok_bytes)?;
    write(&w, out)
}

/// The GGUF of a llama2.c checkpoint (`bytes`, the whole file) and its `tokenizer.bin`
/// (`tok_bytes`), ready to write; tensor data is borrowed from `bytes`. The paths only name
/// the inputs in errors.
pub fn llama2c_to_gguf<'b>(
    checkpoint: &Path,
    bytes: &'b [u8],
    tokenizer: &Path,
    tok_bytes: &[u8],
) -> Result<GgufWriter<'b>> {
    let h = read_checkpoint_header(checkpoint, bytes)?;
    let tokens = parse_tokenizer(tokenizer, tok_bytes, Some(h.vocab_size))?;

    let mut w = GgufWriter::new();
    set_general(&mut w, checkpoint);
    w.set("general.file_type", Value::U32(0)); // all F32
    let u32v = |v: usize| Value::U32(v as u32);
    w.set("llama.context_length", u32v(h.seq_len));
    w.set("llama.embedding_length", u32v(h.dim));
    w.set("llama.feed_forward_length", u32v(h.hidden_dim));
    w.set("llama.block_count", u32v(h.n_layers));
    w.set("llama.attention.head_count", u32v(h.n_heads));
    w.set("llama.attention.head_count_kv", u32v(h.n_kv_heads));
    w.set("llama.rope.dimension_count", u32v(h.head_size()));
    w.set("llama.rope.freq_base", Value::F32(10000.0));
    w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    w.set("llama.vocab_size", u32v(h.vocab_size));
    set_tokenizer(&mut w, tokenizer, &tokens)?;

    // Walk the f32 arrays in file order; every slice is in bounds because the header check
    // matched the file size exactly.
    let (d, hd, l, v, kv) = (h.dim, h.hidden_dim, h.n_layers, h.vocab_size, h.kv_dim());
    let mut off = HEADER_BYTES as usize;
    let mut take = |n_floats: usize| -> &'b [u8] {
        let s = &bytes[off..off + 4 * n_floats];
        off += 4 * n_floats;
        s
    };
    let embed = take(v * d);
    let rms_att = take(l * d);
    let wq = take(l * d * d);
    let wk = take(l * kv * d);
    let wv = take(l * kv * d);
    let wo = take(l * d * d);
    let rms_ffn = take(l * d);
    let w1 = take(l * hd * d);
    let w2 = take(l * d * hd);
    let w3 = take(l * hd * d);
    let rms_final = take(d);
    let _freq_cis = take(h.seq_len * h.head_size());
    let wcls = (!h.shared_classifier).then(|| take(v * d));

    let mut add = |name: String, shape: &[usize], data: &'b [u8]| -> Result<()> {
        let shape: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
        w.add_tensor(&name, GgmlType::F32, &shape, Cow::Borrowed(data))
            .with_context(|| format!("{}: tensor {name}", checkpoint.display()))
    };
    // ggml ne order: [row length, rows].
    add("token_embd.weight".into(), &[d, v], embed)?;
    add("output_norm.weight".into(), &[d], rms_final)?;
    if let Some(wcls) = wcls {
        add("output.weight".into(), &[d, v], wcls)?;
    }
    // Layer `i` of an array of `l` matrices of `n` floats each.
    let layer = |x: &'b [u8], i: usize, n: usize| -> &'b [u8] { &x[4 * i * n..4 * (i + 1) * n] };
    for i in 0..l {
        let name = |t: &str| format!("blk.{i}.{t}.weight");
        add(name("attn_norm"), &[d], layer(rms_att, i, d))?;
        add(name("attn_q"), &[d, d], layer(wq, i, d * d))?;
        add(name("attn_k"), &[d, kv], layer(wk, i, kv * d))?;
        add(name("attn_v"), &[d, kv], layer(wv, i, kv * d))?;
        add(name("attn_output"), &[d, d], layer(wo, i, d * d))?;
        add(name("ffn_norm"), &[d], layer(rms_ffn, i, d))?;
        add(name("ffn_gate"), &[d, hd], layer(w1, i, hd * d))?;
        add(name("ffn_down"), &[hd, d], layer(w2, i, d * hd))?;
        add(name("ffn_up"), &[d, hd], layer(w3, i, hd * d))?;
    }
    Ok(w)
}

/// Writes a vocabulary-only GGUF from a llama2.c `tokenizer.bin` (all its tokens):
/// `general.architecture = llama`, `general.name` and the `tokenizer.ggml.*` keys. llama.cpp
/// loads it with `vocab_only = true` (its loader reads no `llama.*` key in that mode).
pub fn vocab_only_gguf(tokenizer: &Path, out: &Path) -> Result<()> {
    let tokens = read_llama2c_tokenizer(tokenizer, None)?;
    let mut w = GgufWriter::new();
    set_general(&mut w, tokenizer);
    set_tokenizer(&mut w, tokenizer, &tokens)?;
    write(&w, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: [i32; 7]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn header_errors_name_the_problem() {
        let p = Path::new("x.bin");
        let e = read_checkpoint_header(p, &[0; 10]).unwrap_err().to_string();
        assert!(
            e.contains(
                "x.bin: truncated llama2.c checkpoint: the header needs 28 bytes, the file has 10"
            ),
            "{e}"
        );
        let e = read_checkpoint_header(p, &header([64, 172, 5, 8, 3, 512, 512]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_kv_heads = 3 must divide n_heads = 8"), "{e}");
        let e = read_checkpoint_header(p, &header([64, 172, 0, 8, 4, 512, 512]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_layers = 0"), "{e}");
        let e = read_checkpoint_header(
            p,
            &header([0x7fff_fffc, i32::MAX, i32::MAX, 2, 2, i32::MAX, i32::MAX]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("gives a size that overflows"), "{e}");
    }

    #[test]
    fn tokenizer_errors() {
        let p = Path::new("t.bin");
        let mut b = 7i32.to_le_bytes().to_vec();
        b.extend(0f32.to_le_bytes());
        b.extend(100i32.to_le_bytes());
        b.extend(b"abc");
        let e = parse_tokenizer(p, &b, None).unwrap_err().to_string();
        assert!(e.contains("token 0 has length 100, 3 bytes remain"), "{e}");
    }
}

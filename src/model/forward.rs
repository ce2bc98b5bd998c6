//! The forward pass: one function for batched prefill and single-token decode, in the steps of
//! llama.cpp's graph (`src/models/llama.cpp: llm_build_llama`), with its tensor names:
//!
//!   embed   inpL = token_embd[tokens]                                   `[B, n_embd]`
//!   layer l (unless the controller removes it, `layer_runs`), rows that have not exited:
//!           attn_norm → Qcur/Kcur/Vcur (one parallel region) → RoPE → KV cache
//!           → flash attention → attn_output = `attn_out`
//!           `ffn_inp` = attn_out + inpL     ← the [`Controller`] decides per row: FFN or skip
//!           ffn_norm → ffn_gate/ffn_up (one region) → SwiGLU → ffn_down = `ffn_out`
//!           `l_out`   = ffn_out + ffn_inp   (= ffn_inp for rows that skip; the next inpL)
//!   head    result_norm = output_norm(l_out) → result_output = output · result_norm
//!
//! Rows the controller reports as exited (`exited`) only write K/V from their frozen state.
//! Numerics follow llama.cpp's CPU graph bit for bit: activations quantized to the weight's
//! `vec_dot_type`, f16 KV cache, ggml's own SwiGLU, and ggml's summation orders for RMS norm,
//! RoPE and flash attention (`ggml::order`, driven from `attention.rs` and `rope.rs`).

use std::time::{Duration, Instant};

use super::attention::{AttnScratch, Queries};
use super::blocks::{flush, Blocks, CpuBlocks};
use super::device::{DeviceBlocks, DeviceState};
use super::{KvCache, Llama};
use crate::ggml;
use crate::ggml::order::rms_norm;
use crate::gguf::GgmlType;
use crate::skip::{cosine, Controller};
use crate::tensor::{self, matmul_group_in, Acts, Matrix, MAX_SPLITS};

/// Which logits a forward call produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last row's (generation).
    Last,
    /// Every row's, `[batch, n_vocab]` (teacher forcing, tests).
    All,
    /// None (prompt chunks before the last).
    None,
}

/// Wall time spent per stage, summed over calls. For blocks on a device these are the host's
/// times to queue the work; the device's compute shows where the host waits for it
/// (`decision_wait`, and the head, which reads the logits back).
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimes {
    /// Norm, q/k/v, RoPE, attention, output projection.
    pub attention: Duration,
    /// Norm, gate/up, SwiGLU, down projection (only rows whose FFN ran).
    pub ffn: Duration,
    /// Final norm and output head.
    pub head: Duration,
    /// Waiting for the FFN cosines the controller decides on (a device's copy to the host,
    /// after the next attention block was queued; nothing on the CPU).
    pub decision_wait: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ForwardError {
    #[error("context full: {need} positions needed, the context holds {n_ctx} (raise --ctx)")]
    ContextFull { need: usize, n_ctx: usize },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: u32, n_vocab: usize },
    #[error("batch of {found} rows exceeds the scratch size of {max}")]
    BatchTooLarge { found: usize, max: usize },
    #[error("empty batch")]
    Empty,
    #[error("a batch of {rows} rows came with {seqs} sequence ids")]
    SeqRows { rows: usize, seqs: usize },
    #[error("sequence {seq} does not exist ({n_seq} caches)")]
    NoSequence { seq: usize, n_seq: usize },
    #[error("the rows of sequence {seq} are not consecutive in the batch")]
    SeqNotContiguous { seq: usize },
    #[error("device: {0}")]
    Device(String),
}

/// One forward call's input.
pub struct Batch<'t> {
    pub tokens: &'t [u32],
    /// Prompt rows (prefill or teacher forcing) rather than generated tokens.
    pub prompt: bool,
    pub logits: Logits,
}

/// Preallocated buffers for batches of up to `B = max_batch` rows (llama2.c's `RunState`).
/// Nothing is allocated per call once a session runs; the `Logits::All` buffer grows once,
/// the first time a batch that large asks for every row's logits, and are reused after.
/// Shapes are row-major; `kv_dim = n_head_kv · head_dim`.
pub struct Scratch {
    pub(super) max_batch: usize,
    /// Absolute position of each row of the batch `[B]`.
    pub(super) positions: Vec<usize>,
    /// Each row's sequence (its KV cache) `[B]`.
    pub(super) seqs: Vec<usize>,
    /// Positions each row attends over (its sequence's cached length after this call) `[B]`.
    pub(super) ends: Vec<usize>,
    /// Rows of each row's sequence in this call `[B]`.
    rows_in_seq: Vec<usize>,
    /// Residual stream `[B, n_embd]`: inpL, then ffn_inp, then l_out (the next layer's inpL).
    pub(super) x: Vec<f32>,
    /// Normed rows `[B, n_embd]` (attn_norm, ffn_norm, result_norm), reused for the SwiGLU
    /// output `[B, n_ff]`; sized `[B, max(n_embd, n_ff)]`.
    xn: Vec<f32>,
    /// Quantized activations, one buffer per distinct `vec_dot_type` in a group of matrices,
    /// each `[B, row bytes]` bytes (sized for f32 rows of `max(n_embd, n_ff)`, the widest).
    acts: [Vec<u8>; 3],
    /// Matmul outputs, one `[B, n_out]` block per matrix of a group; Σ n_out ≤
    /// max(n_embd + 2·kv_dim, 2·n_ff).
    mm: Vec<f32>,
    /// Products as each thread's chunk of weight rows writes them, before they are copied
    /// into `mm` (`tensor::matmul_group_in`; grown on first use, the head's `Logits::All`
    /// included).
    pieces: Vec<f32>,
    /// Qcur `[B, n_embd]`; RoPE'd in place and the active rows packed to the front.
    q: Vec<f32>,
    /// Kcur `[B, kv_dim]`, RoPE'd in place before it is stored.
    k: Vec<f32>,
    /// Vcur `[B, kv_dim]`.
    v: Vec<f32>,
    /// Attention output, heads merged `[B, n_embd]`: the input of attn_output.
    att: Vec<f32>,
    /// Attention output head-major `[n_head, B, head_dim]`, as the workers write it.
    att_hm: Vec<f32>,
    /// Copies of the ffn_inp rows whose FFN runs `[B, n_embd]`, for controllers that observe.
    pub(super) ffn_inp: Vec<f32>,
    /// cos(ffn_inp, l_out) of the rows in `cos_rows` `[≤ B]`, for [`Controller::after_ffn`].
    pub(super) cos: Vec<f32>,
    pub(super) cos_rows: Vec<usize>,
    /// The device backend's state (KV caches and residual stream on the device), made on
    /// the first forward call of a model with offloaded layers.
    pub(super) device: Option<super::device::DeviceState>,
    /// Rows whose FFN runs this layer `[≤ B]`.
    pub(super) ffn_rows: Vec<usize>,
    /// Rows that have not exited `[≤ B]`, and their positions `[≤ B]`.
    pub(super) active: Vec<usize>,
    act_pos: Vec<usize>,
    /// The active rows' sequences and attended lengths `[≤ B]`.
    act_seq: Vec<usize>,
    act_end: Vec<usize>,
    act_rows: Vec<usize>,
    /// RoPE (cos, sin) pairs per row `[B, rope_dim / 2, 2]`.
    rope_cs: Vec<f32>,
    /// One per attention worker (≤ `MAX_SPLITS`), each sized for `n_ctx` positions.
    attn: Vec<AttnScratch>,
    /// The last row's logits `[n_vocab]` (`Logits::Last`).
    pub(super) logits: Vec<f32>,
    /// Every row's logits `[n, n_vocab]` (`Logits::All`; grown once).
    pub(super) logits_all: Vec<f32>,
    pub times: StageTimes,
    /// Batches give the bits of the same rows decoded one at a time: products whose GEMM
    /// would differ run row by row, attention takes the one-token path (on by default here;
    /// a `Session` sets it from `SessionConfig::exact_batches`).
    pub batch_exact: bool,
}

impl Scratch {
    pub fn new(model: &Llama, max_batch: usize, n_ctx: usize) -> Self {
        let c = &model.config;
        let b = max_batch.max(1);
        let wide = c.n_embd.max(c.n_ff);
        let mm_rows = (c.n_embd + 2 * c.kv_dim()).max(2 * c.n_ff);
        // Widest activation row: f32 (4 bytes per element) bounds every vec_dot_type.
        let act = vec![0u8; b * wide * 4];
        Scratch {
            max_batch: b,
            positions: Vec::with_capacity(b),
            seqs: Vec::with_capacity(b),
            ends: Vec::with_capacity(b),
            rows_in_seq: Vec::with_capacity(b),
            x: vec![0.0; b * c.n_embd],
            xn: vec![0.0; b * wide],
            acts: [act.clone(), act.clone(), act],
            mm: vec![0.0; b * mm_rows],
            pieces: Vec::new(),
            q: vec![0.0; b * c.n_embd],
            k: vec![0.0; b * c.kv_dim()],
            v: vec![0.0; b * c.kv_dim()],
            att: vec![0.0; b * c.n_embd],
            att_hm: vec![0.0; b * c.n_embd],
            ffn_inp: vec![0.0; b * c.n_embd],
            cos: Vec::with_capacity(b),
            cos_rows: Vec::with_capacity(b),
            device: None,
            ffn_rows: Vec::with_capacity(b),
            active: Vec::with_capacity(b),
            act_pos: Vec::with_capacity(b),
            act_seq: Vec::with_capacity(b),
            act_end: Vec::with_capacity(b),
            act_rows: Vec::with_capacity(b),
            rope_cs: vec![0.0; b * c.rope_dim],
            attn: (0..MAX_SPLITS.min(crate::team::current_threads().max(1) * 2))
                .map(|_| AttnScratch::new(c.head_dim, n_ctx))
                .collect(),
            logits: vec![0.0; c.n_vocab],
            logits_all: Vec::new(),
            times: StageTimes::default(),
            batch_exact: true,
        }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Logits of the last row of the latest `Logits::Last` call.
    pub fn last_logits(&self) -> &[f32] {
        &self.logits
    }

    /// Sets the last row's logits, as a restored prompt left them (`[n_vocab]`).
    pub fn set_last_logits(&mut self, logits: &[f32]) {
        self.logits.clear();
        self.logits.extend_from_slice(logits);
    }
}

/// Fewest token rows per parallel task in the per-row steps (norms, RoPE).
const ROWS_PER_TASK: usize = 16;

/// `buf[..n]`, growing `buf` first if it is shorter (allocates only the first time a size is
/// reached; never shrinks).
fn grown(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// Rows `rows` of `x` (`[·, d]`) packed into `out` (`[rows.len(), d]`).
fn copy_rows(x: &[f32], rows: &[usize], d: usize, out: &mut [f32]) {
    for (j, &i) in rows.iter().enumerate() {
        out[j * d..(j + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
    }
}

/// Quantizes `batch` rows of `x` (`[batch, n]`) once per distinct activation layout among
/// `mats` (vec_dot_type, and whether ggml's GEMM takes them four at a time; with `exact` only
/// where that gives the bits of one-row products); returns for each matrix its buffer index
/// and layout.
fn quantize_for(
    mats: &[&Matrix],
    x: &[f32],
    batch: usize,
    exact: bool,
    acts: &mut [Vec<u8>; 3],
) -> [(usize, bool); 3] {
    let mut slots = [(0usize, false); 3];
    let mut done: [Option<(GgmlType, bool)>; 3] = [None; 3];
    for (i, m) in mats.iter().enumerate() {
        let key = (m.vec_dot_type(), m.uses_gemm(batch, exact));
        let slot = match done.iter().position(|d| *d == Some(key)) {
            Some(s) => s,
            None => {
                let s = done.iter().position(|d| d.is_none()).unwrap_or(2);
                m.quantize_acts(x, batch, key.1, &mut acts[s]);
                done[s] = Some(key);
                s
            }
        };
        slots[i] = (slot, key.1);
    }
    slots
}

/// The activations `quantize_for` put in `slot`; with `exact` off, ggml may run the product
/// itself.
fn acts_in(acts: &[Vec<u8>; 3], (slot, fours): (usize, bool), exact: bool) -> Acts<'_> {
    Acts {
        data: &acts[slot],
        fours,
        exact,
    }
}

impl Llama<'_> {
    /// Runs `batch.tokens` at positions `cache.len ..` through the model, appending their
    /// keys and values to `cache`. Returns the requested logits (`[n_vocab]` for `Last`,
    /// `[batch, n_vocab]` for `All`, empty for `None`).
    pub fn forward<'s, C: Controller>(
        &self,
        cache: &mut KvCache,
        s: &'s mut Scratch,
        batch: &Batch,
        controller: &mut C,
    ) -> Result<&'s [f32], ForwardError> {
        self.forward_seqs(std::slice::from_mut(cache), &[], s, batch, controller)
    }

    /// [`Llama::forward`] over several sequences, each with its own cache: row `i` belongs to
    /// sequence `seqs[i]` (empty: every row to sequence 0), whose rows are consecutive and
    /// continue at `caches[seq].len ..`. A row sees only its own sequence's keys and values,
    /// so with exact batches each row gets the bits it would get alone (continuous batching).
    pub fn forward_seqs<'s, C: Controller>(
        &self,
        caches: &mut [KvCache],
        seqs: &[usize],
        s: &'s mut Scratch,
        batch: &Batch,
        controller: &mut C,
    ) -> Result<&'s [f32], ForwardError> {
        let b = batch.tokens.len();
        s.seqs.clear();
        if seqs.is_empty() {
            s.seqs.resize(b, 0);
        } else if seqs.len() == b {
            s.seqs.extend_from_slice(seqs);
        } else {
            return Err(ForwardError::SeqRows {
                rows: b,
                seqs: seqs.len(),
            });
        }
        self.check(caches, s, batch.tokens)?;
        s.positions.clear();
        for i in 0..b {
            let q = s.seqs[i];
            let pos = match i.checked_sub(1) {
                Some(j) if s.seqs[j] == q => s.positions[j] + 1,
                _ => caches[q].len,
            };
            s.positions.push(pos);
        }
        s.ends.clear();
        for i in (0..b).rev() {
            let end = match s.ends.last() {
                Some(&e) if s.seqs[i + 1] == s.seqs[i] => e,
                _ => s.positions[i] + 1,
            };
            s.ends.push(end);
        }
        s.ends.reverse();
        // A sequence's rows are consecutive: its count is end − first position.
        s.rows_in_seq.clear();
        for i in 0..b {
            let first = match i.checked_sub(1) {
                Some(j) if s.seqs[j] == s.seqs[i] => s.rows_in_seq[j],
                _ => s.positions[i],
            };
            s.rows_in_seq.push(first);
        }
        for (r, &end) in s.rows_in_seq.iter_mut().zip(&s.ends) {
            *r = end - *r;
        }
        controller.begin(&s.positions, batch.prompt);

        // ---- inpL: token embeddings and the rows' RoPE angles (on the host) ----
        self.embed(batch.tokens, s);

        // ---- layers on the CPU, then those offloaded to the device; the head where the
        // last layer ran ----
        let mut device = match &self.device {
            Some(m) => Some(match s.device.take() {
                Some(state) => state,
                None => m.new_state(&self.config, s.max_batch)?,
            }),
            None => None,
        };
        let run = self.layers(caches, s, controller, device.as_mut());
        controller.end();
        for (&q, &end) in s.seqs.iter().zip(&s.ends) {
            caches[q].len = end;
        }
        let run = run.and_then(|()| match (&self.device, device.as_mut()) {
            (Some(m), Some(state)) => {
                DeviceBlocks::new(m, state, caches, &self.config).head(s, batch.logits)
            }
            _ => {
                self.head(s, batch.logits);
                Ok(())
            }
        });
        if device.is_some() {
            s.device = device;
        }
        run?;
        // Where `head` left them: one row's in `logits`, more in `logits_all`.
        Ok(match batch.logits {
            Logits::None => &[],
            Logits::Last => &s.logits,
            Logits::All if b == 1 => &s.logits,
            Logits::All => &s.logits_all[..b * self.config.n_vocab],
        })
    }

    /// Every layer in order: those below the device's first on the CPU, the rest on the
    /// device (the residual stream moves there once, before the first of them).
    fn layers<C: Controller>(
        &self,
        caches: &mut [KvCache],
        s: &mut Scratch,
        controller: &mut C,
        device: Option<&mut DeviceState>,
    ) -> Result<(), ForwardError> {
        let n = self.config.n_layer;
        let first_device = self.device.as_ref().map_or(n, |m| m.first_layer());
        let mut dev = match (&self.device, device) {
            (Some(m), Some(state)) => Some(DeviceBlocks::new(m, state, caches, &self.config)),
            _ => None,
        };
        let mut cpu = CpuBlocks::new(self, caches);
        let mut pending = None;
        for l in 0..n {
            let blocks: &mut dyn Blocks = match dev.as_mut() {
                Some(d) if l >= first_device => {
                    if l == first_device {
                        flush(&mut pending, &mut cpu, s, controller)?;
                        d.push(s)?;
                    }
                    d
                }
                _ => &mut cpu,
            };
            self.layer(l, blocks, s, controller, &mut pending)?;
        }
        let last: &mut dyn Blocks = match dev.as_mut() {
            Some(d) if first_device < n => d,
            _ => &mut cpu,
        };
        flush(&mut pending, last, s, controller)
    }

    /// The errors a batch can have before anything is computed.
    /// `s.seqs` holds the rows' sequences.
    fn check(&self, caches: &[KvCache], s: &Scratch, tokens: &[u32]) -> Result<(), ForwardError> {
        let b = tokens.len();
        if b == 0 {
            return Err(ForwardError::Empty);
        }
        if b > s.max_batch {
            return Err(ForwardError::BatchTooLarge {
                found: b,
                max: s.max_batch,
            });
        }
        for (i, &q) in s.seqs.iter().enumerate() {
            let Some(cache) = caches.get(q) else {
                return Err(ForwardError::NoSequence {
                    seq: q,
                    n_seq: caches.len(),
                });
            };
            if i > 0 && s.seqs[i - 1] != q && s.seqs[..i - 1].contains(&q) {
                return Err(ForwardError::SeqNotContiguous { seq: q });
            }
            let rows = s.seqs.iter().filter(|&&r| r == q).count();
            if cache.len + rows > cache.n_ctx {
                return Err(ForwardError::ContextFull {
                    need: cache.len + rows,
                    n_ctx: cache.n_ctx,
                });
            }
        }
        let n_vocab = self.config.n_vocab;
        match tokens.iter().find(|&&t| t as usize >= n_vocab) {
            Some(&id) => Err(ForwardError::BadToken { id, n_vocab }),
            None => Ok(()),
        }
    }

    /// `inpL`: the embedding row of each token into `s.x` (`[B, n_embd]`), and the RoPE angles
    /// of each row's position into `s.rope_cs` (`[B, rope_dim]`).
    fn embed(&self, tokens: &[u32], s: &mut Scratch) {
        let (d, rd) = (self.config.n_embd, self.config.rope_dim);
        let table = &self.weights.token_embd;
        for (row, &t) in s.x.chunks_exact_mut(d).zip(tokens) {
            table.kernels().dequantize_row(table.row(t as usize), row);
        }
        for (i, &p) in s.positions.iter().enumerate() {
            self.rope.angles(p, &mut s.rope_cs[i * rd..(i + 1) * rd]);
        }
    }

    /// Layer `l` for every row of the batch, `s.x` from inpL to l_out, on `blocks`. The
    /// controller may remove the whole layer, freeze rows that exited, and skip the FFN per
    /// row. The previous layer's cosines (`pending`) reach the controller once this layer's
    /// attention is queued, before its first decision.
    fn layer<C: Controller>(
        &self,
        l: usize,
        blocks: &mut dyn Blocks,
        s: &mut Scratch,
        controller: &mut C,
        pending: &mut Option<usize>,
    ) -> Result<(), ForwardError> {
        let d = self.config.n_embd;
        let b = s.positions.len();
        if !controller.layer_runs(l) {
            return Ok(());
        }
        if controller.observes_layers() {
            flush(pending, blocks, s, controller)?;
            blocks.pull(s)?;
            for (i, inp_l) in s.x[..b * d].chunks_exact(d).enumerate() {
                controller.layer_input(l, i, inp_l);
            }
        }
        // Rows that have not exited (early exit); all rows in the plain model.
        s.active.clear();
        s.act_pos.clear();
        s.act_seq.clear();
        s.act_end.clear();
        s.act_rows.clear();
        for i in 0..b {
            if !controller.exited(l, i) {
                s.active.push(i);
                s.act_pos.push(s.positions[i]);
                s.act_seq.push(s.seqs[i]);
                s.act_end.push(s.ends[i]);
                s.act_rows.push(s.rows_in_seq[i]);
            }
        }

        // ---- attn_norm → Qcur/Kcur/Vcur → RoPE → KV cache → attn_out; ffn_inp ----
        let t0 = Instant::now();
        blocks.attention(l, s)?;
        let t1 = Instant::now();
        s.times.attention += t1 - t0;
        flush(pending, blocks, s, controller)?;
        if s.active.is_empty() {
            return Ok(());
        }

        // ---- ffn_inp: the controller decides per row whether the FFN runs ----
        s.ffn_rows.clear();
        let mut compensated = false;
        for j in 0..s.active.len() {
            let i = s.active[j];
            if controller.run_ffn(l, i) {
                s.ffn_rows.push(i);
            } else if controller.compensates() {
                // l_out = ffn_inp + the controller's estimate of the skipped FFN's output.
                if !compensated {
                    blocks.pull(s)?;
                    compensated = true;
                }
                controller.compensate(l, i, &mut s.x[i * d..(i + 1) * d]);
            }
        }
        if compensated {
            blocks.push(s)?;
        }
        if s.ffn_rows.is_empty() {
            return Ok(());
        }

        // ---- ffn_norm → ffn_gate/ffn_up → SwiGLU → ffn_down = ffn_out; l_out ----
        let vectors = controller.observes_ffn_vectors();
        if vectors {
            blocks.pull(s)?;
            copy_rows(&s.x, &s.ffn_rows, d, &mut s.ffn_inp);
        }
        let cos = controller.observes_ffn();
        blocks.ffn(l, s, cos)?;
        if vectors {
            blocks.pull(s)?;
            for (j, &i) in s.ffn_rows.iter().enumerate() {
                let before = &s.ffn_inp[j * d..(j + 1) * d];
                controller.ffn_vectors(l, i, before, &s.x[i * d..(i + 1) * d]);
            }
        }
        if cos {
            s.cos_rows.clear();
            s.cos_rows.extend_from_slice(&s.ffn_rows);
            *pending = Some(l);
            if vectors || controller.observes_layers() {
                flush(pending, blocks, s, controller)?;
            }
        }
        s.times.ffn += t1.elapsed();
        Ok(())
    }

    /// Attention half of layer `l` for the rows of `s.positions`: attn_norm, Qcur/Kcur/Vcur in
    /// one parallel region, RoPE, K/V into the cache for every row; then attention,
    /// attn_output (`attn_out`) and `ffn_inp = attn_out + inpL` for the rows in `s.active` only
    /// (exited rows keep their state).
    pub(super) fn attention_block(&self, l: usize, caches: &mut [KvCache], s: &mut Scratch) {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, kv, hd, rd) = (c.n_embd, c.kv_dim(), c.head_dim, c.rope_dim);
        let b = s.positions.len();
        let na = s.active.len();

        // attn_norm: [B, n_embd]
        let x = &s.x[..b * d];
        tensor::par_rows(&mut s.xn[..b * d], d, ROWS_PER_TASK, &|i, nr| {
            rms_norm(&x[i * d..(i + 1) * d], &lw.attn_norm, c.rms_eps, nr)
        });

        // Qcur [B, n_embd], Kcur and Vcur [B, kv_dim] as one product; no Qcur when every row
        // has exited (their K/V are still written).
        let qkv = [&lw.attn_q, &lw.attn_k, &lw.attn_v];
        let (mats, q_rows) = if na > 0 {
            (&qkv[..], d)
        } else {
            (&qkv[1..], 0)
        };
        let slots = quantize_for(mats, &s.xn[..b * d], b, s.batch_exact, &mut s.acts);
        let mut group = [(qkv[0], Acts::rows(&[])); 3];
        for ((g, &m), &slot) in group.iter_mut().zip(mats).zip(&slots) {
            *g = (m, acts_in(&s.acts, slot, s.batch_exact));
        }
        let mm = &mut s.mm[..(q_rows + 2 * kv) * b];
        matmul_group_in(&group[..mats.len()], b, &mut s.pieces, mm);
        let (q, kv_mm) = mm.split_at(q_rows * b);
        let (k, v) = kv_mm.split_at(kv * b);
        s.k[..b * kv].copy_from_slice(k);
        s.v[..b * kv].copy_from_slice(v);
        if na > 0 {
            s.q[..b * d].copy_from_slice(q);
        }
        // Qwen2: Qcur += bq, Kcur += bk, Vcur += bv (one f32 add each, as ggml_add).
        if let Some([bq, bk, bv]) = &lw.attn_qkv_bias {
            let add = |x: &mut [f32], bias: &[f32]| {
                for row in x.chunks_exact_mut(bias.len()) {
                    for (a, &bb) in row.iter_mut().zip(bias) {
                        *a += bb;
                    }
                }
            };
            add(&mut s.k[..b * kv], bk);
            add(&mut s.v[..b * kv], bv);
            if na > 0 {
                add(&mut s.q[..b * d], bq);
            }
        }

        // RoPE on Kcur, then K/V into the cache at each row's position.
        let cs = &s.rope_cs[..b * rd];
        tensor::par_rows(&mut s.k[..b * kv], kv, ROWS_PER_TASK, &|i, k| {
            self.rope.apply(k, hd, &cs[i * rd..(i + 1) * rd])
        });
        for (i, (&pos, &q)) in s.positions.iter().zip(&s.seqs).enumerate() {
            caches[q].store(
                l,
                pos,
                &s.k[i * kv..(i + 1) * kv],
                &s.v[i * kv..(i + 1) * kv],
            );
        }
        if na == 0 {
            return;
        }

        // RoPE on the active rows' Qcur, packed to the front: [na, n_embd].
        if na == b {
            tensor::par_rows(&mut s.q[..b * d], d, ROWS_PER_TASK, &|i, q| {
                self.rope.apply(q, hd, &cs[i * rd..(i + 1) * rd])
            });
        } else {
            for (j, &i) in s.active.iter().enumerate() {
                self.rope
                    .apply(&mut s.q[i * d..(i + 1) * d], hd, &cs[i * rd..(i + 1) * rd]);
                if i != j {
                    s.q.copy_within(i * d..(i + 1) * d, j * d);
                }
            }
        }

        // Flash attention: [n_head, na, head_dim], then heads merged: [na, n_embd].
        let rows = Queries {
            q: &s.q[..na * d],
            positions: &s.act_pos,
            seqs: &s.act_seq,
            ends: &s.act_end,
            rows_in_seq: &s.act_rows,
            exact: s.batch_exact,
        };
        self.attention(l, caches, rows, &mut s.att_hm[..na * d], &mut s.attn);
        for (h, block) in s.att_hm[..na * d].chunks_exact(na * hd).enumerate() {
            for (j, src) in block.chunks_exact(hd).enumerate() {
                s.att[j * d + h * hd..j * d + (h + 1) * hd].copy_from_slice(src);
            }
        }

        // attn_out = attn_output · att: [na, n_embd]; ffn_inp = attn_out + inpL.
        let slots = quantize_for(
            &[&lw.attn_output],
            &s.att[..na * d],
            na,
            s.batch_exact,
            &mut s.acts,
        );
        let attn_out = &mut s.mm[..d * na];
        matmul_group_in(
            &[(&lw.attn_output, acts_in(&s.acts, slots[0], s.batch_exact))],
            na,
            &mut s.pieces,
            attn_out,
        );
        tensor::add_rows(attn_out, d, &s.active, &mut s.x);
    }

    /// FFN half of layer `l` for the rows in `s.ffn_rows`: ffn_norm, ffn_gate/ffn_up in one
    /// parallel region, SwiGLU, ffn_down (`ffn_out`), `l_out = ffn_out + ffn_inp`; with
    /// `cos`, cos(ffn_inp, l_out) per row into `s.cos` (`[r]`).
    pub(super) fn ffn_block(&self, l: usize, s: &mut Scratch, cos: bool) {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, ff) = (c.n_embd, c.n_ff);
        let r = s.ffn_rows.len();
        let observe = cos;

        // ffn_norm: [r, n_embd], the running rows packed to the front.
        let (x, rows) = (&s.x, &s.ffn_rows);
        tensor::par_rows(&mut s.xn[..r * d], d, ROWS_PER_TASK, &|j, xn| {
            let i = rows[j];
            rms_norm(&x[i * d..(i + 1) * d], &lw.ffn_norm, c.rms_eps, xn)
        });
        if observe {
            copy_rows(&s.x, &s.ffn_rows, d, &mut s.ffn_inp);
        }

        // ffn_gate and ffn_up: [2][r, n_ff].
        let gate_up = [&lw.ffn_gate, &lw.ffn_up];
        let slots = quantize_for(&gate_up, &s.xn[..r * d], r, s.batch_exact, &mut s.acts);
        let mm = &mut s.mm[..2 * ff * r];
        matmul_group_in(
            &[
                (gate_up[0], acts_in(&s.acts, slots[0], s.batch_exact)),
                (gate_up[1], acts_in(&s.acts, slots[1], s.batch_exact)),
            ],
            r,
            &mut s.pieces,
            mm,
        );

        // SwiGLU into xn, one token row of n_ff at a time as ggml does: [r, n_ff].
        let (gate, up) = (&mm[..ff * r], &mm[ff * r..]);
        tensor::par_rows(&mut s.xn[..r * ff], ff, 4, &|i, y| {
            ggml::swiglu(&gate[i * ff..(i + 1) * ff], &up[i * ff..(i + 1) * ff], y)
        });

        // ffn_out = ffn_down · swiglu: [r, n_embd]; l_out = ffn_out + ffn_inp.
        let slots = quantize_for(
            &[&lw.ffn_down],
            &s.xn[..r * ff],
            r,
            s.batch_exact,
            &mut s.acts,
        );
        let ffn_out = &mut s.mm[..d * r];
        let acts = acts_in(&s.acts, slots[0], s.batch_exact);
        matmul_group_in(&[(&lw.ffn_down, acts)], r, &mut s.pieces, ffn_out);
        tensor::add_rows(ffn_out, d, &s.ffn_rows, &mut s.x);

        if observe {
            s.cos.clear();
            for (j, &i) in s.ffn_rows.iter().enumerate() {
                let ffn_inp = &s.ffn_inp[j * d..(j + 1) * d];
                s.cos.push(cosine(ffn_inp, &s.x[i * d..(i + 1) * d]));
            }
        }
    }

    /// result_norm (output_norm of l_out) and result_output (the output head) for the rows
    /// `logits` asks for: `[n_vocab]` for `Last`, `[B, n_vocab]` for `All`, empty for `None`.
    pub(super) fn head<'s>(&self, s: &'s mut Scratch, logits: Logits) -> &'s [f32] {
        let c = &self.config;
        let (d, nv) = (c.n_embd, c.n_vocab);
        let b = s.positions.len();
        let t0 = Instant::now();
        let (first, n) = match logits {
            Logits::None => return &[],
            Logits::Last => (b - 1, 1),
            Logits::All => (0, b),
        };

        // result_norm: [n, n_embd]
        for j in 0..n {
            let l_out = &s.x[(first + j) * d..(first + j + 1) * d];
            rms_norm(
                l_out,
                &self.weights.output_norm,
                c.rms_eps,
                &mut s.xn[j * d..(j + 1) * d],
            );
        }

        // result_output: [n, n_vocab].
        let out = &self.weights.output;
        let slots = quantize_for(&[out], &s.xn[..n * d], n, s.batch_exact, &mut s.acts);
        let group = [(out, acts_in(&s.acts, slots[0], s.batch_exact))];
        let result: &[f32] = if n == 1 {
            matmul_group_in(&group, 1, &mut s.pieces, &mut s.logits);
            &s.logits
        } else {
            let all = grown(&mut s.logits_all, nv * n);
            matmul_group_in(&group, n, &mut s.pieces, all);
            all
        };
        s.times.head += t0.elapsed();
        result
    }
}

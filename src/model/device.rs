//! The blocks on a ggml backend device: CUDA in a `--features cuda` build (`-ngl N`), or
//! ggml's own CPU backend, which runs the same graphs and lets them be tested anywhere.
//!
//! Weights are uploaded once from the GGUF mapping (as stored: quantized, never repacked);
//! the KV caches (f16, llama.cpp's layout `[n_head_kv · head_dim, n_ctx]` per layer and
//! sequence) and the residual stream `x` (`[n_embd, B]`, f32) stay on the device. Each block is
//! one ggml graph, the ops of llama.cpp's `llm_build_llama` for that block:
//!
//!   attention  rms_norm · attn_norm → Wq/Wk/Wv (+ biases) → rope_ext → set_rows into the cache
//!              → flash_attn_ext per sequence (mask −∞ past each row's position) → Wo → + x
//!   ffn        get_rows(x, rows) → rms_norm · ffn_norm → swiglu(Wgate, Wup) → Wdown → + x
//!              → set_rows(x, rows); cos(ffn_inp, l_out) per row into a device vector
//!   head       rms_norm · output_norm → output → host
//!
//! The cosines come back through an asynchronous copy into pinned memory, queued behind the
//! FFN; the forward loop queues the next attention block before it waits for them (DESIGN §1).
//! Sums run in ggml's order for the device, not in the order of our CPU path: logits agree
//! with it (and with llama.cpp on the same device) within a tolerance, not bit for bit.

use super::blocks::Blocks;
use super::config::{LlamaConfig, RopeMode, RopeScaling};
use super::forward::{ForwardError, Logits, Scratch};
use super::{KvCache, Llama};
use crate::ggml::graph::{
    read_f32, write_f32, Allocator, Backend, Device, DeviceKind, Graph, Pending, RopeParams, Store,
    StoreBuilder, Tensor, TensorId,
};
use crate::gguf::{ErrorKind, GgmlType, GgufFile};

/// KV positions per step of the attended length: graphs keep their shapes for 256 tokens, and
/// a padded length lets ggml's CUDA flash attention take its GQA path (`FATTN_KQ_STRIDE`,
/// `ggml-cuda/fattn.cu`).
const KV_PAD: usize = 256;

/// Where offloaded layers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadDevice {
    /// The first GPU in ggml's registry (a `--features cuda` build with a CUDA device).
    Gpu,
    /// ggml's CPU backend: the device graphs on the host (tests, comparisons).
    GgmlCpu,
}

/// Layers to run on a device (`-ngl N`): the last `layers` of the model, as llama.cpp's
/// `--n-gpu-layers` counts them; the head goes with the last layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offload {
    pub layers: usize,
    pub device: OffloadDevice,
}

struct LayerIds {
    attn_norm: TensorId,
    attn_q: TensorId,
    attn_k: TensorId,
    attn_v: TensorId,
    attn_output: TensorId,
    /// bq, bk, bv (Qwen2).
    bias: Option<[TensorId; 3]>,
    ffn_norm: TensorId,
    ffn_gate: TensorId,
    ffn_up: TensorId,
    ffn_down: TensorId,
}

/// The weights of the offloaded layers and the head, on the device.
pub struct DeviceModel {
    device: Device,
    first_layer: usize,
    store: Store,
    /// Per layer from `first_layer`.
    layers: Vec<LayerIds>,
    output_norm: TensorId,
    output: TensorId,
    rope_freqs: Option<TensorId>,
    rope: RopeParams,
    threads: usize,
}

/// The device's name and the bytes its weights take, for `inspect` and logs.
#[derive(Clone, Debug)]
pub struct DeviceSummary {
    pub name: String,
    pub description: String,
    pub layers: usize,
    pub first_layer: usize,
    pub weight_bytes: usize,
}

fn no_device(what: &str) -> String {
    let seen: Vec<String> = Device::all()
        .iter()
        .map(|d| {
            let i = d.info();
            format!("{} ({})", i.name, i.kind.as_str())
        })
        .collect();
    format!(
        "{what}: ggml has no such device (it has: {}){}",
        seen.join(", "),
        if cfg!(feature = "cuda") {
            ""
        } else {
            "; offloading to a GPU needs a build with --features cuda (scripts/build-cuda.sh)"
        }
    )
}

impl DeviceModel {
    /// Uploads the weights of the last `offload.layers` layers (all of them when it is at
    /// least `n_layer`) and of the head.
    pub(super) fn load(
        file: &GgufFile,
        config: &LlamaConfig,
        norms: &Llama,
        offload: Offload,
        threads: usize,
    ) -> Result<DeviceModel, String> {
        let device = match offload.device {
            OffloadDevice::Gpu => Device::first(DeviceKind::Gpu)
                .ok_or_else(|| no_device(&format!("-ngl {}", offload.layers)))?,
            OffloadDevice::GgmlCpu => {
                Device::first(DeviceKind::Cpu).ok_or_else(|| no_device("ggml CPU backend"))?
            }
        };
        if config.rope_scaling != RopeScaling::None
            && !matches!(config.rope_scaling, RopeScaling::Linear { .. })
        {
            return Err("this RoPE scaling is not supported on a device".into());
        }
        let n = config.n_layer;
        let first_layer = n - offload.layers.min(n);
        let mut b = StoreBuilder::new();
        let mut uploads: Vec<(TensorId, String)> = Vec::new();
        let mut matrix = |b: &mut StoreBuilder, name: String| -> Result<TensorId, String> {
            let info = file.tensor_info(&name).ok_or_else(|| {
                file.error(ErrorKind::MissingTensor {
                    tensor: name.clone(),
                })
                .to_string()
            })?;
            let ne: Vec<usize> = info.shape.iter().map(|&x| x as usize).collect();
            let id = b.tensor(info.ty, &ne);
            uploads.push((id, name));
            Ok(id)
        };
        let mut vectors: Vec<(TensorId, Vec<f32>)> = Vec::new();
        let mut vector = |b: &mut StoreBuilder, v: &[f32]| -> TensorId {
            let id = b.tensor(GgmlType::F32, &[v.len()]);
            vectors.push((id, v.to_vec()));
            id
        };
        let mut layers = Vec::new();
        for l in first_layer..n {
            let lw = &norms.weights.layers[l];
            let name = |t: &str| format!("blk.{l}.{t}.weight");
            layers.push(LayerIds {
                attn_norm: vector(&mut b, &lw.attn_norm),
                attn_q: matrix(&mut b, name("attn_q"))?,
                attn_k: matrix(&mut b, name("attn_k"))?,
                attn_v: matrix(&mut b, name("attn_v"))?,
                attn_output: matrix(&mut b, name("attn_output"))?,
                bias: lw
                    .attn_qkv_bias
                    .as_ref()
                    .map(|[q, k, v]| [vector(&mut b, q), vector(&mut b, k), vector(&mut b, v)]),
                ffn_norm: vector(&mut b, &lw.ffn_norm),
                ffn_gate: matrix(&mut b, name("ffn_gate"))?,
                ffn_up: matrix(&mut b, name("ffn_up"))?,
                ffn_down: matrix(&mut b, name("ffn_down"))?,
            });
        }
        let output_norm = vector(&mut b, &norms.weights.output_norm);
        let output_name = if norms.weights.tied_output {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        let output = matrix(&mut b, output_name.into())?;
        let rope_freqs = norms.weights.rope_freqs.as_ref().map(|f| vector(&mut b, f));
        let backend = Backend::new(device, threads)?;
        let mut store = b.allocate(&backend)?;
        store.mark_weights();
        for (id, name) in uploads {
            let info = file
                .tensor_info(&name)
                .ok_or_else(|| format!("{name}: missing"))?;
            let data = file.tensor_data(info);
            if data.len() != store.nbytes(id) {
                return Err(format!(
                    "{name}: {} bytes in the file, {} on the device",
                    data.len(),
                    store.nbytes(id)
                ));
            }
            store.set(id, 0, data);
        }
        for (id, v) in vectors {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            store.set(id, 0, &bytes);
        }
        Ok(DeviceModel {
            device,
            first_layer,
            store,
            layers,
            output_norm,
            output,
            rope_freqs,
            rope: RopeParams {
                n_dims: config.rope_dim,
                neox: config.arch.rope_mode() == RopeMode::Neox,
                n_ctx_orig: config.n_ctx_train,
                freq_base: config.rope_base,
                freq_scale: match config.rope_scaling {
                    RopeScaling::Linear { factor } => 1.0 / factor,
                    RopeScaling::None => 1.0,
                },
            },
            threads,
        })
    }

    /// The first layer that runs on the device (`n_layer` − offloaded layers).
    pub fn first_layer(&self) -> usize {
        self.first_layer
    }

    pub fn summary(&self) -> DeviceSummary {
        let i = self.device.info();
        DeviceSummary {
            name: i.name,
            description: i.description,
            layers: self.layers.len(),
            first_layer: self.first_layer,
            weight_bytes: self.store.buffer_bytes(),
        }
    }

    /// A forward pass's device state: a backend (stream) of its own, the residual stream
    /// and the cosine vector for `max_batch` rows. KV caches are added per sequence.
    pub(super) fn new_state(
        &self,
        config: &LlamaConfig,
        max_batch: usize,
    ) -> Result<DeviceState, ForwardError> {
        let err = ForwardError::Device;
        let backend = Backend::new(self.device, self.threads).map_err(err)?;
        let mut b = StoreBuilder::new();
        let x = b.tensor(GgmlType::F32, &[config.n_embd, max_batch]);
        let cos = b.tensor(GgmlType::F32, &[max_batch]);
        let store = b.allocate(&backend).map_err(err)?;
        Ok(DeviceState {
            attn: Allocator::new(&backend),
            ffn: Allocator::new(&backend),
            head: Allocator::new(&backend),
            pending: Pending::new(self.device, max_batch),
            backend,
            store,
            x,
            cos,
            kv: Vec::new(),
        })
    }
}

/// One sequence's KV cache on the device: per offloaded layer, K and V `[kv_dim, n_ctx]` f16.
struct DeviceKv {
    n_ctx: usize,
    store: Store,
    kv: Vec<(TensorId, TensorId)>,
}

/// What a [`Scratch`] keeps on the device between forward calls.
pub struct DeviceState {
    backend: Backend,
    store: Store,
    /// `[n_embd, max_batch]` f32: the residual stream of the batch's rows.
    x: TensorId,
    /// `[max_batch]` f32: cos(ffn_inp, l_out) of the last FFN block's rows.
    cos: TensorId,
    /// Per sequence (the forward call's cache index).
    kv: Vec<Option<DeviceKv>>,
    attn: Allocator,
    ffn: Allocator,
    head: Allocator,
    pending: Pending,
}

/// The device blocks of one forward call.
pub(super) struct DeviceBlocks<'a> {
    m: &'a DeviceModel,
    st: &'a mut DeviceState,
    /// Each sequence's cache capacity (its host [`KvCache`]'s `n_ctx`).
    n_ctx: Vec<usize>,
    cfg: Cfg,
}

/// The shapes a graph needs.
#[derive(Clone, Copy)]
struct Cfg {
    d: usize,
    kv: usize,
    hd: usize,
    n_head: usize,
    n_head_kv: usize,
    n_vocab: usize,
    eps: f32,
}

fn dev_err(e: String) -> ForwardError {
    ForwardError::Device(e)
}

/// Rows `[first, first + n)` of the residual stream `x`: `[d, n]`.
fn x_rows<'g>(g: &mut Graph<'g>, x: Tensor<'g>, d: usize, first: usize, n: usize) -> Tensor<'g> {
    g.view_2d(x, [d, n], d * 4, first * d * 4)
}

/// `rms_norm(x) · w`.
fn norm<'g>(g: &mut Graph<'g>, x: Tensor<'g>, w: Tensor<'g>, eps: f32) -> Tensor<'g> {
    let n = g.rms_norm(x, eps);
    g.mul(n, w)
}

impl<'a> DeviceBlocks<'a> {
    pub(super) fn new(
        m: &'a DeviceModel,
        st: &'a mut DeviceState,
        caches: &[KvCache],
        c: &LlamaConfig,
    ) -> Self {
        DeviceBlocks {
            m,
            st,
            n_ctx: caches.iter().map(|c| c.n_ctx).collect(),
            cfg: Cfg {
                d: c.n_embd,
                kv: c.kv_dim(),
                hd: c.head_dim,
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                n_vocab: c.n_vocab,
                eps: c.rms_eps,
            },
        }
    }

    /// Sequence `q`'s device cache, allocated on first use.
    fn ensure_kv(&mut self, q: usize) -> Result<(), ForwardError> {
        let n_ctx = self.n_ctx[q];
        if self.st.kv.len() <= q {
            self.st.kv.resize_with(q + 1, || None);
        }
        if self.st.kv[q].as_ref().is_some_and(|k| k.n_ctx == n_ctx) {
            return Ok(());
        }
        let mut b = StoreBuilder::new();
        let kv: Vec<(TensorId, TensorId)> = (0..self.m.layers.len())
            .map(|_| {
                (
                    b.tensor(GgmlType::F16, &[self.cfg.kv, n_ctx]),
                    b.tensor(GgmlType::F16, &[self.cfg.kv, n_ctx]),
                )
            })
            .collect();
        let store = b.allocate(&self.st.backend).map_err(dev_err)?;
        self.st.kv[q] = Some(DeviceKv { n_ctx, store, kv });
        Ok(())
    }
}

impl Blocks for DeviceBlocks<'_> {
    fn attention(&mut self, l: usize, s: &mut Scratch) -> Result<(), ForwardError> {
        let b = s.positions.len();
        for i in 0..b {
            if i == 0 || s.seqs[i] != s.seqs[i - 1] {
                self.ensure_kv(s.seqs[i])?;
            }
        }
        let Cfg {
            d,
            kv,
            hd,
            n_head,
            n_head_kv,
            eps,
            ..
        } = self.cfg;
        let m = self.m;
        let w = &m.layers[l - m.first_layer];
        let ws = &m.store;
        let DeviceState {
            backend,
            store,
            x,
            kv: caches,
            attn,
            ..
        } = &mut *self.st;
        let mut g = Graph::new(256 + 16 * b);
        let x = store.get(*x);
        let xb = x_rows(&mut g, x, d, 0, b);
        let cur = norm(&mut g, xb, ws.get(w.attn_norm), eps);
        let mut q = g.mul_mat(ws.get(w.attn_q), cur);
        let mut k = g.mul_mat(ws.get(w.attn_k), cur);
        let mut v = g.mul_mat(ws.get(w.attn_v), cur);
        if let Some([bq, bk, bv]) = w.bias {
            q = g.add(q, ws.get(bq));
            k = g.add(k, ws.get(bk));
            v = g.add(v, ws.get(bv));
        }
        let pos: Vec<i32> = s.positions.iter().map(|&p| p as i32).collect();
        let pos = g.input_i32(&pos);
        let ff = m.rope_freqs.map(|f| ws.get(f));
        let q3 = g.reshape_3d(q, hd, n_head, b);
        let q3 = g.rope(q3, pos, ff, m.rope);
        let k3 = g.reshape_3d(k, hd, n_head_kv, b);
        let k3 = g.rope(k3, pos, ff, m.rope);
        let k2 = g.reshape_2d(k3, kv, b);

        // Per sequence: its rows' K/V into its cache, then attention over its cache.
        let mut out: Option<Tensor> = None;
        let mut r0 = 0;
        while r0 < b {
            let seq = s.seqs[r0];
            let r1 = (r0..b).find(|&i| s.seqs[i] != seq).unwrap_or(b);
            let r = r1 - r0;
            let cache = caches[seq]
                .as_ref()
                .ok_or_else(|| dev_err(format!("no device cache for sequence {seq}")))?;
            let (kc, vc) = cache.kv[l - m.first_layer];
            let (kc, vc) = (cache.store.get(kc), cache.store.get(vc));
            let ids: Vec<i64> = s.positions[r0..r1].iter().map(|&p| p as i64).collect();
            let ids = g.input_i64(&ids);
            let k_rows = g.view_2d(k2, [kv, r], kv * 4, r0 * kv * 4);
            let v_rows = g.view_2d(v, [kv, r], kv * 4, r0 * kv * 4);
            let kc = g.set_rows(kc, k_rows, ids);
            let vc = g.set_rows(vc, v_rows, ids);
            g.expand(kc);
            g.expand(vc);
            // Attended length padded, so shapes repeat; keys past a row's position are masked.
            let n_kv = s.ends[r0].next_multiple_of(KV_PAD).min(cache.n_ctx);
            let kview = g.view_3d(kc, [hd, n_head_kv, n_kv], [hd * 2, kv * 2], 0);
            let kview = g.permute(kview, [0, 2, 1, 3]);
            let vview = g.view_3d(vc, [hd, n_head_kv, n_kv], [hd * 2, kv * 2], 0);
            let vview = g.permute(vview, [0, 2, 1, 3]);
            // mask [n_kv, r]: 0 where key j ≤ the row's position, −∞ elsewhere.
            let mut mask = vec![f32::NEG_INFINITY; n_kv * r];
            for (j, &p) in s.positions[r0..r1].iter().enumerate() {
                mask[j * n_kv..j * n_kv + p + 1].fill(0.0);
            }
            let mask = g.input_f16(&[n_kv, r], &mask);
            let qv = g.view_3d(q3, [hd, n_head, r], [hd * 4, d * 4], r0 * d * 4);
            let qv = g.permute(qv, [0, 2, 1, 3]);
            let fa = g.flash_attn(qv, kview, vview, mask, 1.0 / (hd as f32).sqrt());
            let fa = g.reshape_2d(fa, d, r);
            out = Some(match out {
                None => fa,
                Some(o) => g.concat(o, fa, 1),
            });
            r0 = r1;
        }
        let att = out.ok_or_else(|| dev_err("empty batch".into()))?;
        let o = g.mul_mat(ws.get(w.attn_output), att);
        let na = s.active.len();
        if na == b {
            let y = g.add(o, xb);
            let y = g.cpy(y, xb);
            g.expand(y);
        } else if na > 0 {
            // Exited rows keep their state: only the active rows get attn_out.
            let ids32: Vec<i32> = s.active.iter().map(|&i| i as i32).collect();
            let ids64: Vec<i64> = s.active.iter().map(|&i| i as i64).collect();
            let ids32 = g.input_i32(&ids32);
            let ids64 = g.input_i64(&ids64);
            let oa = g.get_rows(o, ids32);
            let xa = g.get_rows(xb, ids32);
            let y = g.add(oa, xa);
            let y = g.set_rows(x, y, ids64);
            g.expand(y);
        }
        attn.compute(backend, g).map_err(dev_err)
    }

    fn ffn(&mut self, l: usize, s: &mut Scratch, cos: bool) -> Result<(), ForwardError> {
        let Cfg { d, eps, .. } = self.cfg;
        let m = self.m;
        let w = &m.layers[l - m.first_layer];
        let ws = &m.store;
        let r = s.ffn_rows.len();
        let DeviceState {
            backend,
            store,
            x,
            cos: cos_id,
            ffn,
            pending,
            ..
        } = &mut *self.st;
        let mut g = Graph::new(64);
        let x = store.get(*x);
        let ids32: Vec<i32> = s.ffn_rows.iter().map(|&i| i as i32).collect();
        let ids64: Vec<i64> = s.ffn_rows.iter().map(|&i| i as i64).collect();
        let ids32 = g.input_i32(&ids32);
        let ids64 = g.input_i64(&ids64);
        let all = x_rows(&mut g, x, d, 0, s.positions.len());
        let h = g.get_rows(all, ids32);
        let cur = norm(&mut g, h, ws.get(w.ffn_norm), eps);
        let gate = g.mul_mat(ws.get(w.ffn_gate), cur);
        let up = g.mul_mat(ws.get(w.ffn_up), cur);
        let a = g.swiglu(gate, up);
        let o = g.mul_mat(ws.get(w.ffn_down), a);
        let y = g.add(o, h);
        let out = g.set_rows(x, y, ids64);
        g.expand(out);
        let cos_t = store.get(*cos_id);
        if cos {
            // cos = Σ h·y / √(Σ h² · Σ y²) per row: [1, r].
            let hy = g.mul(h, y);
            let hy = g.sum_rows(hy);
            let hh = g.sqr(h);
            let hh = g.sum_rows(hh);
            let yy = g.sqr(y);
            let yy = g.sum_rows(yy);
            let n = g.mul(hh, yy);
            let n = g.sqrt(n);
            let c = g.div(hy, n);
            let dst = g.view_2d(cos_t, [1, r], 4, 0);
            let c = g.cpy(c, dst);
            g.expand(c);
        }
        ffn.compute(backend, g).map_err(dev_err)?;
        if cos {
            pending.start(backend, cos_t, r);
        }
        Ok(())
    }

    fn cosines(&mut self, s: &mut Scratch) -> Result<(), ForwardError> {
        let st = &mut *self.st;
        let c = st.pending.wait(&st.backend);
        s.cos.clear();
        // A zero norm gives NaN on the device; the host's `cosine` gives 0.
        s.cos
            .extend(c.iter().map(|&x| if x.is_finite() { x } else { 0.0 }));
        Ok(())
    }

    fn pull(&mut self, s: &mut Scratch) -> Result<(), ForwardError> {
        let n = s.positions.len() * self.cfg.d;
        let st = &*self.st;
        read_f32(&st.backend, &st.store, st.x, &mut s.x[..n]);
        Ok(())
    }

    fn push(&mut self, s: &mut Scratch) -> Result<(), ForwardError> {
        let n = s.positions.len() * self.cfg.d;
        let st = &mut *self.st;
        write_f32(&st.backend, &mut st.store, st.x, &s.x[..n]);
        Ok(())
    }

    fn head(&mut self, s: &mut Scratch, logits: Logits) -> Result<(), ForwardError> {
        let Cfg {
            d, n_vocab, eps, ..
        } = self.cfg;
        let b = s.positions.len();
        let (first, n) = match logits {
            Logits::None => return Ok(()),
            Logits::Last => (b - 1, 1),
            Logits::All => (0, b),
        };
        let m = self.m;
        let ws = &m.store;
        let DeviceState {
            backend,
            store,
            x,
            head,
            ..
        } = &mut *self.st;
        let mut g = Graph::new(16);
        let x = store.get(*x);
        let rows = x_rows(&mut g, x, d, first, n);
        let cur = norm(&mut g, rows, ws.get(m.output_norm), eps);
        let out = g.mul_mat(ws.get(m.output), cur);
        let dst: &mut [f32] = if n == 1 {
            s.logits.resize(n_vocab, 0.0);
            &mut s.logits
        } else {
            if s.logits_all.len() < n * n_vocab {
                s.logits_all.resize(n * n_vocab, 0.0);
            }
            &mut s.logits_all[..n * n_vocab]
        };
        head.compute_read(backend, g, out, dst).map_err(dev_err)
    }
}

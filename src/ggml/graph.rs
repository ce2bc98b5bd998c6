//! ggml's graph and backend API behind a safe interface: the devices of ggml's registry (the
//! CPU always; CUDA GPUs in a `--features cuda` build), tensors allocated on a device
//! ([`Store`]), graphs of ggml ops built over them ([`Graph`]), and their execution
//! ([`Allocator::compute`]). `model::device` builds the model's blocks from these.
//!
//! Ownership: a [`Store`] owns its ggml context and backend buffer; [`Tensor`] handles borrow
//! the store or graph they live in, so a handle never outlives its memory. A [`Graph`] owns
//! the context of its intermediate tensors; an [`Allocator`] places them in a buffer of its
//! backend that it reuses across graphs.
//!
//! Every op's shapes are the caller's to get right: ggml aborts on a mismatch (`GGML_ASSERT`),
//! so shapes here come from the model's configuration, never from a request.

use std::ffi::CStr;
use std::marker::PhantomData;

use llama_cpp_sys_2 as sys;

use crate::gguf::GgmlType;

/// What kind of device ggml reports (`ggml_backend_dev_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
    Other,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "CPU",
            DeviceKind::Gpu => "GPU",
            DeviceKind::IntegratedGpu => "iGPU",
            DeviceKind::Accelerator => "accelerator",
            DeviceKind::Other => "other",
        }
    }
}

/// A device of ggml's backend registry. Registry devices live for the whole program.
#[derive(Clone, Copy)]
pub struct Device(sys::ggml_backend_dev_t);

// SAFETY: registry devices are immutable descriptors shared by all of ggml's threads.
unsafe impl Send for Device {}
// SAFETY: as above; every call on a device only reads it.
unsafe impl Sync for Device {}

/// A device's name, description and memory (bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub description: String,
    pub kind: DeviceKind,
    pub memory_free: usize,
    pub memory_total: usize,
}

fn c_string(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings that live as long as the device.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl Device {
    /// Every device ggml's registry holds, in its order (GPUs first, then the CPU).
    pub fn all() -> Vec<Device> {
        super::init();
        // SAFETY: the registry is initialised statically; indices below the count are valid.
        let n = unsafe { sys::ggml_backend_dev_count() };
        (0..n)
            // SAFETY: `i < n`, checked by the range.
            .map(|i| Device(unsafe { sys::ggml_backend_dev_get(i) }))
            .filter(|d| !d.0.is_null())
            .collect()
    }

    /// The first device of `kind`, if the registry has one.
    pub fn first(kind: DeviceKind) -> Option<Device> {
        Device::all().into_iter().find(|d| d.kind() == kind)
    }

    pub fn kind(&self) -> DeviceKind {
        // SAFETY: `self.0` is a registry device (non-null, checked in `all`).
        match unsafe { sys::ggml_backend_dev_type(self.0) } {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
            sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
            _ => DeviceKind::Other,
        }
    }

    pub fn info(&self) -> DeviceInfo {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: `self.0` is a registry device; the out-pointers are valid locals.
        let (name, description) = unsafe {
            sys::ggml_backend_dev_memory(self.0, &mut free, &mut total);
            (
                c_string(sys::ggml_backend_dev_name(self.0)),
                c_string(sys::ggml_backend_dev_description(self.0)),
            )
        };
        DeviceInfo {
            name,
            description,
            kind: self.kind(),
            memory_free: free,
            memory_total: total,
        }
    }
}

/// An initialised backend (a stream on a GPU, a thread pool on the CPU).
pub struct Backend {
    raw: sys::ggml_backend_t,
    device: Device,
}

// SAFETY: a backend is used by one thread at a time (the forward pass holds it by `&mut`
// or behind the session that owns it); ggml backends may move between threads.
unsafe impl Send for Backend {}

impl Backend {
    /// Initialises `device`; `threads` sets the CPU backend's thread count (ignored on GPUs).
    pub fn new(device: Device, threads: usize) -> Result<Backend, String> {
        // SAFETY: `device.0` is a registry device; null params select the defaults.
        let raw = unsafe { sys::ggml_backend_dev_init(device.0, std::ptr::null()) };
        if raw.is_null() {
            return Err(format!(
                "ggml could not initialise device {}",
                device.info().name
            ));
        }
        if device.kind() == DeviceKind::Cpu {
            // SAFETY: `raw` is a CPU backend (checked by the device kind).
            unsafe { sys::ggml_backend_cpu_set_n_threads(raw, threads.max(1) as i32) };
        }
        Ok(Backend { raw, device })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Waits until everything queued on the backend has finished.
    pub fn synchronize(&self) {
        // SAFETY: `raw` is a live backend.
        unsafe { sys::ggml_backend_synchronize(self.raw) }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: `raw` came from ggml_backend_dev_init and is freed once.
        unsafe { sys::ggml_backend_free(self.raw) }
    }
}

/// ggml's type code for a GGUF tensor type (the numbering is the same).
fn ggml_type(t: GgmlType) -> sys::ggml_type {
    t as u32 as sys::ggml_type
}

/// A ggml context that only describes tensors (`no_alloc`), sized for `n_tensors` of them
/// and, with `graph_nodes`, one graph of that many nodes.
fn describe_ctx(n_tensors: usize, graph_nodes: Option<usize>) -> *mut sys::ggml_context {
    // SAFETY: pure size queries.
    let mut size = n_tensors * unsafe { sys::ggml_tensor_overhead() };
    if let Some(n) = graph_nodes {
        // SAFETY: pure size query.
        size += unsafe { sys::ggml_graph_overhead_custom(n, false) };
    }
    let params = sys::ggml_init_params {
        mem_size: size,
        mem_buffer: std::ptr::null_mut(),
        no_alloc: true,
    };
    // SAFETY: ggml allocates `size` bytes of metadata and returns null on failure (checked
    // by the callers through `Store::build` / `Graph::new`).
    unsafe { sys::ggml_init(params) }
}

/// Index of a tensor in a [`Store`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorId(usize);

/// Tensors to allocate together on one backend (weights, KV caches, the residual stream).
pub struct StoreBuilder {
    specs: Vec<(GgmlType, Vec<usize>)>,
}

impl Default for StoreBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl StoreBuilder {
    pub fn new() -> Self {
        StoreBuilder { specs: Vec::new() }
    }

    /// A tensor of type `ty` and shape `ne` (ggml order: `ne[0]` is the row length), 1–4 dims.
    pub fn tensor(&mut self, ty: GgmlType, ne: &[usize]) -> TensorId {
        assert!((1..=4).contains(&ne.len()), "1 to 4 dimensions");
        self.specs.push((ty, ne.to_vec()));
        TensorId(self.specs.len() - 1)
    }

    /// Allocates every tensor in one buffer of `backend`'s device (contents undefined until
    /// set).
    pub fn allocate(self, backend: &Backend) -> Result<Store, String> {
        let ctx = describe_ctx(self.specs.len().max(1), None);
        if ctx.is_null() {
            return Err("ggml_init failed".into());
        }
        let mut tensors = Vec::with_capacity(self.specs.len());
        for (ty, ne) in &self.specs {
            let ne: Vec<i64> = ne.iter().map(|&x| x as i64).collect();
            // SAFETY: `ctx` has room for every spec's metadata (sized above); `ne` has
            // `ne.len()` ∈ 1..=4 entries.
            let t =
                unsafe { sys::ggml_new_tensor(ctx, ggml_type(*ty), ne.len() as i32, ne.as_ptr()) };
            tensors.push(t);
        }
        // SAFETY: every tensor of `ctx` is unallocated; the buffer is returned or null.
        let buffer = unsafe { sys::ggml_backend_alloc_ctx_tensors(ctx, backend.raw) };
        if buffer.is_null() && !self.specs.is_empty() {
            // SAFETY: `ctx` came from ggml_init and nothing references it.
            unsafe { sys::ggml_free(ctx) };
            return Err(format!(
                "{}: could not allocate {:.1} MiB",
                backend.device.info().name,
                self.specs
                    .iter()
                    .map(|(ty, ne)| spec_bytes(*ty, ne))
                    .sum::<usize>() as f64
                    / (1 << 20) as f64
            ));
        }
        Ok(Store {
            ctx,
            buffer,
            tensors,
        })
    }
}

fn spec_bytes(ty: GgmlType, ne: &[usize]) -> usize {
    let row = ty.row_bytes(ne[0] as u64).unwrap_or(0) as usize;
    row * ne[1..].iter().product::<usize>()
}

/// Tensors allocated on a backend.
pub struct Store {
    ctx: *mut sys::ggml_context,
    buffer: sys::ggml_backend_buffer_t,
    tensors: Vec<*mut sys::ggml_tensor>,
}

// SAFETY: the store's context and buffer are only touched through `&self`/`&mut self`.
unsafe impl Send for Store {}
// SAFETY: `&self` methods only read tensor metadata or copy out of the buffer.
unsafe impl Sync for Store {}

impl Store {
    pub fn get(&self, id: TensorId) -> Tensor<'_> {
        Tensor(self.tensors[id.0], PhantomData)
    }

    /// Bytes of tensor `id`.
    pub fn nbytes(&self, id: TensorId) -> usize {
        // SAFETY: the tensor belongs to this live store.
        unsafe { sys::ggml_nbytes(self.tensors[id.0]) }
    }

    /// Copies `data` into tensor `id` at byte `offset`; the range must lie inside it.
    pub fn set(&mut self, id: TensorId, offset: usize, data: &[u8]) {
        let t = self.tensors[id.0];
        assert!(
            offset + data.len() <= self.nbytes(id),
            "write past the tensor"
        );
        // SAFETY: `t` is allocated in this store's buffer and the range is inside it
        // (checked above); `data` is valid for `data.len()` bytes.
        unsafe { sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), offset, data.len()) }
    }

    /// Copies bytes `offset .. offset + out.len()` of tensor `id` into `out`.
    pub fn get_bytes(&self, id: TensorId, offset: usize, out: &mut [u8]) {
        let t = self.tensors[id.0];
        assert!(
            offset + out.len() <= self.nbytes(id),
            "read past the tensor"
        );
        // SAFETY: as in `set`, with `out` writable for `out.len()` bytes.
        unsafe { sys::ggml_backend_tensor_get(t, out.as_mut_ptr().cast(), offset, out.len()) }
    }

    /// Bytes of the store's buffer.
    pub fn buffer_bytes(&self) -> usize {
        if self.buffer.is_null() {
            return 0;
        }
        // SAFETY: a live buffer.
        unsafe { sys::ggml_backend_buffer_get_size(self.buffer) }
    }

    /// Marks the buffer as holding weights (ggml's schedulers prefer to run ops there).
    pub fn mark_weights(&mut self) {
        if !self.buffer.is_null() {
            // SAFETY: a live buffer.
            unsafe {
                sys::ggml_backend_buffer_set_usage(
                    self.buffer,
                    sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS,
                )
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: both were created by `StoreBuilder::allocate` and are freed once; graphs
        // that referenced the tensors borrowed the store and are gone.
        unsafe {
            if !self.buffer.is_null() {
                sys::ggml_backend_buffer_free(self.buffer);
            }
            sys::ggml_free(self.ctx);
        }
    }
}

/// A tensor handle, valid while the store or graph it came from is borrowed.
#[derive(Clone, Copy)]
pub struct Tensor<'a>(*mut sys::ggml_tensor, PhantomData<&'a ()>);

impl Tensor<'_> {
    /// `ne[0..4]` (ggml order).
    pub fn ne(&self) -> [usize; 4] {
        // SAFETY: the handle's tensor is alive for `'a`.
        let t = unsafe { &*self.0 };
        t.ne.map(|x| x as usize)
    }

    /// `nb[0..4]`, byte strides.
    pub fn nb(&self) -> [usize; 4] {
        // SAFETY: as in `ne`.
        let t = unsafe { &*self.0 };
        t.nb
    }
}

/// RoPE parameters (`ggml_rope_ext`).
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    pub n_dims: usize,
    /// `GGML_ROPE_TYPE_NORMAL` (0) or `GGML_ROPE_TYPE_NEOX` (2).
    pub neox: bool,
    pub n_ctx_orig: usize,
    pub freq_base: f32,
    pub freq_scale: f32,
}

/// One graph under construction: ops create tensors in the graph's own context; tensors of
/// stores borrowed for `'s` may be read and written (through views and `set_rows`/`cpy`).
pub struct Graph<'s> {
    ctx: *mut sys::ggml_context,
    graph: *mut sys::ggml_cgraph,
    /// Input tensors and the bytes to upload once the graph is allocated.
    inputs: Vec<(*mut sys::ggml_tensor, Vec<u8>)>,
    _stores: PhantomData<&'s Store>,
}

impl Drop for Graph<'_> {
    fn drop(&mut self) {
        // SAFETY: the context was created by `Graph::new` and is freed once; the graph lives
        // in it.
        unsafe { sys::ggml_free(self.ctx) }
    }
}

/// Builds `op` in the graph's context and wraps the result.
macro_rules! op {
    ($g:expr, $call:expr) => {{
        // SAFETY: every operand is a tensor alive for the graph's lifetime (handles borrow
        // their store or this graph); the context has room for the graph's tensors (sized in
        // `Graph::new`); shapes are checked by ggml, which aborts on a mismatch.
        let t = unsafe { $call };
        Tensor(t, PhantomData)
    }};
}

impl<'s> Graph<'s> {
    /// A graph of at most `max_nodes` ops.
    pub fn new(max_nodes: usize) -> Graph<'s> {
        let ctx = describe_ctx(max_nodes * 2 + 16, Some(max_nodes));
        assert!(!ctx.is_null(), "ggml_init failed for a graph context");
        // SAFETY: `ctx` has room for a graph of `max_nodes` nodes (sized above).
        let graph = unsafe { sys::ggml_new_graph_custom(ctx, max_nodes, false) };
        Graph {
            ctx,
            graph,
            inputs: Vec::new(),
            _stores: PhantomData,
        }
    }

    /// A tensor of the graph holding `data` once allocated (positions, masks, row ids).
    fn input(&mut self, ty: GgmlType, ne: &[usize], data: Vec<u8>) -> Tensor<'s> {
        let ne64: Vec<i64> = ne.iter().map(|&x| x as i64).collect();
        // SAFETY: the context has room (sized in `new`); `ne64` has 1–4 entries.
        let t = unsafe {
            let t = sys::ggml_new_tensor(self.ctx, ggml_type(ty), ne64.len() as i32, ne64.as_ptr());
            sys::ggml_set_input(t);
            t
        };
        // SAFETY: `t` was just created with this shape.
        assert_eq!(unsafe { sys::ggml_nbytes(t) }, data.len(), "input size");
        self.inputs.push((t, data));
        Tensor(t, PhantomData)
    }

    pub fn input_i32(&mut self, v: &[i32]) -> Tensor<'s> {
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.input(GgmlType::I32, &[v.len()], data)
    }

    pub fn input_i64(&mut self, v: &[i64]) -> Tensor<'s> {
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.input(GgmlType::I64, &[v.len()], data)
    }

    /// An f16 input of shape `ne` from f32 values.
    pub fn input_f16(&mut self, ne: &[usize], v: &[f32]) -> Tensor<'s> {
        let data = v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        self.input(GgmlType::F16, ne, data)
    }

    pub fn input_f32(&mut self, ne: &[usize], v: &[f32]) -> Tensor<'s> {
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.input(GgmlType::F32, ne, data)
    }

    /// Adds `t` and what it depends on to the graph.
    pub fn expand(&mut self, t: Tensor<'s>) {
        // SAFETY: `t` is alive (it borrows a store or this graph); the graph has room for
        // `max_nodes` nodes, which ggml checks.
        unsafe { sys::ggml_build_forward_expand(self.graph, t.0) }
    }

    /// Marks `t` as an output, so the allocator never reuses its memory within the graph.
    pub fn output(&mut self, t: Tensor<'s>) {
        // SAFETY: `t` is alive.
        unsafe { sys::ggml_set_output(t.0) };
        self.expand(t);
    }

    pub fn mul_mat(&mut self, w: Tensor<'s>, x: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_mul_mat(self.ctx, w.0, x.0))
    }
    pub fn add(&mut self, a: Tensor<'s>, b: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_add(self.ctx, a.0, b.0))
    }
    pub fn mul(&mut self, a: Tensor<'s>, b: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_mul(self.ctx, a.0, b.0))
    }
    pub fn div(&mut self, a: Tensor<'s>, b: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_div(self.ctx, a.0, b.0))
    }
    pub fn sqrt(&mut self, a: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_sqrt(self.ctx, a.0))
    }
    pub fn sqr(&mut self, a: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_sqr(self.ctx, a.0))
    }
    /// Σ over `ne[0]`: `[n, r] → [1, r]`.
    pub fn sum_rows(&mut self, a: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_sum_rows(self.ctx, a.0))
    }
    pub fn rms_norm(&mut self, a: Tensor<'s>, eps: f32) -> Tensor<'s> {
        op!(self, sys::ggml_rms_norm(self.ctx, a.0, eps))
    }
    /// `silu(gate) · up`.
    pub fn swiglu(&mut self, gate: Tensor<'s>, up: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_swiglu_split(self.ctx, gate.0, up.0))
    }
    /// Rows `ids` (I32/I64) of `a`.
    pub fn get_rows(&mut self, a: Tensor<'s>, ids: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_get_rows(self.ctx, a.0, ids.0))
    }
    /// Writes the rows of `b` into `dst` at rows `ids` (I64); returns the view of `dst`.
    pub fn set_rows(&mut self, dst: Tensor<'s>, b: Tensor<'s>, ids: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_set_rows(self.ctx, dst.0, b.0, ids.0))
    }
    /// Copies `a` into `dst` (same element count); returns the view of `dst`.
    pub fn cpy(&mut self, a: Tensor<'s>, dst: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_cpy(self.ctx, a.0, dst.0))
    }
    pub fn cont(&mut self, a: Tensor<'s>) -> Tensor<'s> {
        op!(self, sys::ggml_cont(self.ctx, a.0))
    }
    pub fn reshape_2d(&mut self, a: Tensor<'s>, ne0: usize, ne1: usize) -> Tensor<'s> {
        op!(
            self,
            sys::ggml_reshape_2d(self.ctx, a.0, ne0 as i64, ne1 as i64)
        )
    }
    pub fn reshape_3d(&mut self, a: Tensor<'s>, ne0: usize, ne1: usize, ne2: usize) -> Tensor<'s> {
        op!(
            self,
            sys::ggml_reshape_3d(self.ctx, a.0, ne0 as i64, ne1 as i64, ne2 as i64)
        )
    }
    /// A 2-D view: `ne0 × ne1` elements, row stride `nb1` bytes, from byte `offset`.
    pub fn view_2d(
        &mut self,
        a: Tensor<'s>,
        [ne0, ne1]: [usize; 2],
        nb1: usize,
        offset: usize,
    ) -> Tensor<'s> {
        op!(
            self,
            sys::ggml_view_2d(self.ctx, a.0, ne0 as i64, ne1 as i64, nb1, offset)
        )
    }
    /// A 3-D view with strides `nb1`, `nb2` bytes, from byte `offset`.
    pub fn view_3d(
        &mut self,
        a: Tensor<'s>,
        [ne0, ne1, ne2]: [usize; 3],
        [nb1, nb2]: [usize; 2],
        offset: usize,
    ) -> Tensor<'s> {
        op!(
            self,
            sys::ggml_view_3d(self.ctx, a.0, ne0 as i64, ne1 as i64, ne2 as i64, nb1, nb2, offset)
        )
    }
    pub fn permute(&mut self, a: Tensor<'s>, axes: [i32; 4]) -> Tensor<'s> {
        op!(
            self,
            sys::ggml_permute(self.ctx, a.0, axes[0], axes[1], axes[2], axes[3])
        )
    }
    /// Concatenation along dimension `dim`.
    pub fn concat(&mut self, a: Tensor<'s>, b: Tensor<'s>, dim: i32) -> Tensor<'s> {
        op!(self, sys::ggml_concat(self.ctx, a.0, b.0, dim))
    }
    /// RoPE of `a` (`[head_dim, n_head, n_rows]`) at positions `pos` (I32 `[n_rows]`), with
    /// optional per-frequency divisors.
    pub fn rope(
        &mut self,
        a: Tensor<'s>,
        pos: Tensor<'s>,
        freq_factors: Option<Tensor<'s>>,
        p: RopeParams,
    ) -> Tensor<'s> {
        let ff = freq_factors.map_or(std::ptr::null_mut(), |t| t.0);
        op!(
            self,
            sys::ggml_rope_ext(
                self.ctx,
                a.0,
                pos.0,
                ff,
                p.n_dims as i32,
                if p.neox { 2 } else { 0 },
                p.n_ctx_orig as i32,
                p.freq_base,
                p.freq_scale,
                0.0,
                1.0,
                32.0,
                1.0
            )
        )
    }
    /// Flash attention (`ggml_flash_attn_ext`, f32 accumulation): q `[hd, rows, n_head]`,
    /// k/v `[hd, n_kv, n_head_kv]`, mask f16 `[n_kv, rows]` → `[hd, n_head, rows]`.
    pub fn flash_attn(
        &mut self,
        q: Tensor<'s>,
        k: Tensor<'s>,
        v: Tensor<'s>,
        mask: Tensor<'s>,
        scale: f32,
    ) -> Tensor<'s> {
        let t = op!(
            self,
            sys::ggml_flash_attn_ext(self.ctx, q.0, k.0, v.0, mask.0, scale, 0.0, 0.0)
        );
        // SAFETY: `t` was just created by flash_attn_ext.
        unsafe { sys::ggml_flash_attn_ext_set_prec(t.0, sys::GGML_PREC_F32) };
        t
    }
}

/// Places graphs' intermediate tensors in a buffer of one backend, reused from graph to
/// graph (grown when a graph needs more), and runs them there.
pub struct Allocator {
    raw: sys::ggml_gallocr_t,
}

// SAFETY: used by one thread at a time (owned by the forward pass's state).
unsafe impl Send for Allocator {}

impl Allocator {
    pub fn new(backend: &Backend) -> Allocator {
        // SAFETY: `backend.raw` is live; its default buffer type lives as long as ggml.
        let raw = unsafe {
            sys::ggml_gallocr_new(sys::ggml_backend_get_default_buffer_type(backend.raw))
        };
        assert!(!raw.is_null(), "ggml_gallocr_new failed");
        Allocator { raw }
    }

    /// Allocates `graph`, uploads its inputs and queues it on `backend`; returns without
    /// waiting where the backend is asynchronous (a GPU).
    fn run(&mut self, backend: &Backend, graph: &mut Graph<'_>) -> Result<(), String> {
        // SAFETY: the graph's tensors are alive (the graph borrows its stores); gallocr
        // places the graph's own tensors in its buffer.
        if !unsafe { sys::ggml_gallocr_alloc_graph(self.raw, graph.graph) } {
            return Err(format!(
                "{}: could not allocate a graph's buffers",
                backend.device.info().name
            ));
        }
        // Inputs are written on the backend's own stream, behind the graphs queued before:
        // one that still runs reads its inputs where gallocr puts this graph's.
        for (t, data) in graph.inputs.drain(..) {
            // SAFETY: `t` is alive (the graph's context); an input no op of the graph reads
            // was not allocated and is skipped; an allocated one has exactly `data.len()`
            // bytes (checked in `Graph::input`). CUDA stages a copy from pageable memory
            // before returning, so `data` may be dropped after the call.
            unsafe {
                if !(*t).buffer.is_null() {
                    sys::ggml_backend_tensor_set_async(
                        backend.raw,
                        t,
                        data.as_ptr().cast(),
                        0,
                        data.len(),
                    )
                }
            };
        }
        // SAFETY: the graph is allocated and its inputs set.
        let status = unsafe { sys::ggml_backend_graph_compute_async(backend.raw, graph.graph) };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(format!(
                "{}: graph computation failed (ggml status {status})",
                backend.device.info().name
            ));
        }
        Ok(())
    }

    /// Queues `graph` (see `run`); its results stay in the stores it writes.
    pub fn compute(&mut self, backend: &Backend, mut graph: Graph<'_>) -> Result<(), String> {
        self.run(backend, &mut graph)
    }

    /// Runs `graph`, waits, and copies `out` (f32, `dst.len()` values) to `dst`.
    pub fn compute_read<'s>(
        &mut self,
        backend: &Backend,
        mut graph: Graph<'s>,
        out: Tensor<'s>,
        dst: &mut [f32],
    ) -> Result<(), String> {
        graph.output(out);
        self.run(backend, &mut graph)?;
        backend.synchronize();
        let n = std::mem::size_of_val(dst);
        // SAFETY: `out` is alive (its graph is); the range is checked against the tensor;
        // `dst` is writable for `n` bytes; the backend has finished.
        unsafe {
            assert!(sys::ggml_nbytes(out.0) >= n, "read past the tensor");
            sys::ggml_backend_tensor_get(out.0, dst.as_mut_ptr().cast(), 0, n)
        }
        Ok(())
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        // SAFETY: created by `Allocator::new`, freed once.
        unsafe { sys::ggml_gallocr_free(self.raw) }
    }
}

/// Reads `out.len()` f32 values from the start of stored tensor `id`, after everything
/// queued on `backend` has run.
pub fn read_f32(backend: &Backend, store: &Store, id: TensorId, out: &mut [f32]) {
    backend.synchronize();
    let t = store.tensors[id.0];
    let n = std::mem::size_of_val(out);
    assert!(n <= store.nbytes(id), "read past the tensor");
    // SAFETY: the range is inside the tensor (checked); `out` is writable for `n` bytes;
    // the backend has finished writing it (synchronized).
    unsafe { sys::ggml_backend_tensor_get(t, out.as_mut_ptr().cast(), 0, n) }
}

/// Writes f32 values at the start of stored tensor `id`, after queued work has run.
pub fn write_f32(backend: &Backend, store: &mut Store, id: TensorId, v: &[f32]) {
    backend.synchronize();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    store.set(id, 0, &bytes);
}

/// A copy from a device tensor into host memory, queued behind the work before it
/// (`ggml_backend_tensor_get_async`); the values are there after [`Pending::wait`]. The host
/// memory is pinned when the device offers a host buffer type (a CUDA GPU), so the copy runs
/// asynchronously.
pub struct Pending {
    host: HostMem,
    len: usize,
}

enum HostMem {
    Pinned {
        buffer: sys::ggml_backend_buffer_t,
        base: *mut f32,
        cap: usize,
    },
    Plain(Vec<f32>),
}

// SAFETY: the pinned buffer is owned by this value and only touched through it.
unsafe impl Send for Pending {}

impl Pending {
    /// Host room for `cap` f32 values on `device`.
    pub fn new(device: Device, cap: usize) -> Pending {
        // SAFETY: `device.0` is a registry device; a null buffer type means none.
        let buft = unsafe { sys::ggml_backend_dev_host_buffer_type(device.0) };
        let host = if buft.is_null() {
            HostMem::Plain(vec![0.0; cap])
        } else {
            // SAFETY: `buft` is the device's host buffer type.
            let buffer = unsafe { sys::ggml_backend_buft_alloc_buffer(buft, cap.max(1) * 4) };
            if buffer.is_null() {
                HostMem::Plain(vec![0.0; cap])
            } else {
                // SAFETY: a live host buffer of at least `cap · 4` bytes.
                let base = unsafe { sys::ggml_backend_buffer_get_base(buffer) }.cast::<f32>();
                HostMem::Pinned { buffer, base, cap }
            }
        };
        Pending { host, len: 0 }
    }

    fn cap(&self) -> usize {
        match &self.host {
            HostMem::Pinned { cap, .. } => *cap,
            HostMem::Plain(v) => v.len(),
        }
    }

    /// Queues a copy of `n` f32 values of `t` (contiguous, from its start) behind the work
    /// queued on `backend`. `t` must stay allocated until [`Pending::wait`].
    pub fn start(&mut self, backend: &Backend, t: Tensor<'_>, n: usize) {
        assert!(
            n <= self.cap(),
            "host room for {} values, asked {n}",
            self.cap()
        );
        // SAFETY: `t` is alive; its first `n` f32 are inside it (ggml checks the range);
        // the destination has room for `n` values (checked above) and lives until `wait`.
        unsafe {
            assert!(sys::ggml_nbytes(t.0) >= n * 4, "copy past the tensor");
            let dst = match &mut self.host {
                HostMem::Pinned { base, .. } => *base,
                HostMem::Plain(v) => v.as_mut_ptr(),
            };
            sys::ggml_backend_tensor_get_async(backend.raw, t.0, dst.cast(), 0, n * 4);
        }
        self.len = n;
    }

    /// Waits for the copy (and everything queued before it); returns the values.
    pub fn wait(&mut self, backend: &Backend) -> &[f32] {
        backend.synchronize();
        match &self.host {
            // SAFETY: the buffer holds `cap ≥ len` values, written by the finished copy.
            HostMem::Pinned { base, .. } => unsafe { std::slice::from_raw_parts(*base, self.len) },
            HostMem::Plain(v) => &v[..self.len],
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let HostMem::Pinned { buffer, .. } = self.host {
            // SAFETY: allocated in `new`, freed once.
            unsafe { sys::ggml_backend_buffer_free(buffer) }
        }
    }
}

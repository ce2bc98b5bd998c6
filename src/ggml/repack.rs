//! Weights repacked by ggml's CPU "extra buffer type" (`CPU_REPACK`, ggml-cpu/repack.cpp)
//! into the interleaved layouts of its GEMV/GEMM kernels, the way llama.cpp loads them.
//!
//! The repacking itself is ggml's: a tensor is allocated in a buffer of the `CPU_REPACK` type
//! (found through the CPU device's `ggml_backend_dev_get_extra_bufts`) and filled with
//! `ggml_backend_tensor_set`, which converts it. The products run ggml's exported kernels
//! (`ggml_gemv_*`), called row by row of activations, so a batch gives the same bits as the
//! same rows decoded one at a time.
//!
//! Which types: what `ggml_repack_get_optimal_repack_type` picks on x86 with AVX2: Q4_K →
//! `block_q4_Kx8` and Q4_0 → `block_q4_0x8` (8 rows interleaved in 8-byte groups), dotted
//! against Q8_K / Q8_0 activations by `ggml_gemv_*_8x8_*` one activation at a time, or by
//! `ggml_gemm_*_8x8_*` four at a time (activations packed by `ggml_quantize_mat_*_4x8`), as
//! llama.cpp's `forward_mul_mat` does for a batch.

use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

use crate::gguf::GgmlType;

/// `ggml_gemv_*`: `(n, s, bs, vx, vy, nr, nc)`: `s[0..nc] = dot(rows of vx, activation vy)`
/// for `nc` interleaved weight rows (a multiple of the interleave) of `n` elements.
/// `ggml_gemm_*` has the same signature: `s[a*bs + c] = dot(row c, activation a)` for `nr`
/// activations (a multiple of 4, packed four at a time by the layout's [`QuantMatFn`]).
type GemvFn = unsafe extern "C" fn(i32, *mut f32, usize, *const c_void, *const c_void, i32, i32);

/// `ggml_quantize_mat_*_4x8(x, vy, k)`: four rows of `k` floats (`x`, row-major) quantized to
/// the vec_dot_type and interleaved in 8-byte groups (`block_q8_0x4` / `block_q8_Kx4`).
type QuantMatFn = unsafe extern "C" fn(*const f32, *mut c_void, i64);

// The kernels, exported with C linkage by libggml-cpu (ggml-cpu/repack.h).
extern "C" {
    fn ggml_gemv_q4_K_8x8_q8_K(
        n: i32,
        s: *mut f32,
        bs: usize,
        vx: *const c_void,
        vy: *const c_void,
        nr: i32,
        nc: i32,
    );
    fn ggml_gemm_q4_K_8x8_q8_K(
        n: i32,
        s: *mut f32,
        bs: usize,
        vx: *const c_void,
        vy: *const c_void,
        nr: i32,
        nc: i32,
    );
    fn ggml_gemv_q4_0_8x8_q8_0(
        n: i32,
        s: *mut f32,
        bs: usize,
        vx: *const c_void,
        vy: *const c_void,
        nr: i32,
        nc: i32,
    );
    fn ggml_gemm_q4_0_8x8_q8_0(
        n: i32,
        s: *mut f32,
        bs: usize,
        vx: *const c_void,
        vy: *const c_void,
        nr: i32,
        nc: i32,
    );
    fn ggml_quantize_mat_q8_K_4x8(x: *const f32, vy: *mut c_void, k: i64);
    fn ggml_quantize_mat_q8_0_4x8(x: *const f32, vy: *mut c_void, k: i64);
}

/// A repacked layout and its kernels.
#[derive(Clone, Copy)]
struct Layout {
    ty: GgmlType,
    /// Rows interleaved per group; products cover whole groups.
    rows: usize,
    /// Elements per block of `ty`; a row must hold whole blocks.
    block: usize,
    /// Whether the GEMM gives each output the GEMV's bits (checked by tests/kernels.rs).
    gemm_exact: bool,
    gemv: GemvFn,
    gemm: GemvFn,
    quantize4: QuantMatFn,
}

/// The layout ggml picks for `ty` with `n_out` rows on this CPU, if wired here
/// (`ggml_repack_get_optimal_repack_type`: Q4_0 and Q4_K as 8×8 with AVX2).
fn layout(ty: GgmlType, n_out: usize) -> Option<Layout> {
    if !cfg!(target_arch = "x86_64") || !cpu_has_avx2() {
        return None;
    }
    let l = match ty {
        GgmlType::Q4_K => Layout {
            ty,
            rows: 8,
            block: 256,
            gemm_exact: false,
            gemv: ggml_gemv_q4_K_8x8_q8_K,
            gemm: ggml_gemm_q4_K_8x8_q8_K,
            quantize4: ggml_quantize_mat_q8_K_4x8,
        },
        GgmlType::Q4_0 => Layout {
            ty,
            rows: 8,
            block: 32,
            gemm_exact: true,
            gemv: ggml_gemv_q4_0_8x8_q8_0,
            gemm: ggml_gemm_q4_0_8x8_q8_0,
            quantize4: ggml_quantize_mat_q8_0_4x8,
        },
        _ => return None,
    };
    n_out.is_multiple_of(l.rows).then_some(l)
}

fn cpu_has_avx2() -> bool {
    // SAFETY: a getter without arguments reporting the compiled-in and detected features.
    unsafe { sys::ggml_cpu_has_avx2() != 0 }
}

/// Whether [`Packed::new`] repacks a `ty` matrix of `n_out` rows on this CPU.
pub fn repacks(ty: GgmlType, n_out: usize) -> bool {
    layout(ty, n_out).is_some() && repack_buffer_type().is_some()
}

/// ggml's `CPU_REPACK` buffer type, if the CPU backend offers it.
fn repack_buffer_type() -> Option<BufType> {
    static BUFT: OnceLock<Option<BufType>> = OnceLock::new();
    *BUFT.get_or_init(|| {
        super::init();
        type GetExtraBufts =
            unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t;
        // SAFETY: the device and registry getters return static objects of the statically
        // linked CPU backend (or null, checked). The proc address, when present, is
        // ggml-cpu's `ggml_backend_cpu_device_get_extra_buffers_type`, whose signature is
        // `GetExtraBufts` (ggml-backend.h, `ggml_backend_dev_get_extra_bufts_t`); it returns a
        // static null-terminated array, and `ggml_backend_buft_name` a static C string.
        unsafe {
            let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
            if dev.is_null() {
                return None;
            }
            let reg = sys::ggml_backend_dev_backend_reg(dev);
            if reg.is_null() {
                return None;
            }
            let f = sys::ggml_backend_reg_get_proc_address(
                reg,
                c"ggml_backend_dev_get_extra_bufts".as_ptr(),
            );
            if f.is_null() {
                return None;
            }
            let get: GetExtraBufts = std::mem::transmute::<*mut c_void, GetExtraBufts>(f);
            let mut p = get(dev);
            while !p.is_null() && !(*p).is_null() {
                let name = CStr::from_ptr(sys::ggml_backend_buft_name(*p));
                if name.to_bytes() == b"CPU_REPACK" {
                    return Some(BufType(*p));
                }
                p = p.add(1);
            }
            None
        }
    })
}

#[derive(Clone, Copy)]
struct BufType(sys::ggml_backend_buffer_type_t);
// SAFETY: a buffer type is a static, immutable descriptor in ggml-cpu; sharing the pointer
// across threads is what ggml itself does.
unsafe impl Send for BufType {}
unsafe impl Sync for BufType {}

/// One weight matrix in a repacked layout, owned in a ggml buffer (freed on drop).
pub struct Packed {
    ctx: *mut sys::ggml_context,
    buffer: sys::ggml_backend_buffer_t,
    data: *const u8,
    len: usize,
    n_in: usize,
    n_out: usize,
    layout: Layout,
}

// SAFETY: the buffer is written once in `new` and only read afterwards; the context and
// buffer are freed only by `drop`, which takes `&mut self`.
unsafe impl Send for Packed {}
unsafe impl Sync for Packed {}

impl Packed {
    /// Repacks `data` (`n_out` rows of `n_in` elements of `ty`, ggml's plain layout) as
    /// llama.cpp does at load, or `None` when ggml would not repack it on this CPU.
    pub fn new(ty: GgmlType, n_in: usize, n_out: usize, data: &[u8]) -> Option<Packed> {
        let layout = layout(ty, n_out)?;
        let buft = repack_buffer_type()?;
        let row = ty.row_bytes(n_in as u64)? as usize;
        if row.checked_mul(n_out)? != data.len() || !n_in.is_multiple_of(layout.block) {
            return None;
        }
        let (ne0, ne1) = (i64::try_from(n_in).ok()?, i64::try_from(n_out).ok()?);
        // SAFETY: the context holds only tensor metadata (no_alloc) and room for one tensor;
        // it and the buffer are freed on every path (here on failure, else by Drop). The
        // tensor's type and shape match `data` (checked above), so `tensor_set` reads exactly
        // `data.len()` bytes; `extra` is the repack traits `init_tensor` chose, and a null one
        // (ggml would not repack) is refused before `tensor_set`, which would dereference it.
        unsafe {
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: sys::ggml_tensor_overhead() * 2,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: true,
            });
            if ctx.is_null() {
                return None;
            }
            let t = sys::ggml_new_tensor_2d(ctx, ty as sys::ggml_type, ne0, ne1);
            let buffer = if t.is_null() {
                std::ptr::null_mut()
            } else {
                sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft.0)
            };
            if buffer.is_null()
                || (*t).extra.is_null()
                || (*t).data.is_null()
                || sys::ggml_nbytes(t) != data.len()
            {
                if !buffer.is_null() {
                    sys::ggml_backend_buffer_free(buffer);
                }
                sys::ggml_free(ctx);
                return None;
            }
            sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, data.len());
            Some(Packed {
                ctx,
                buffer,
                data: (*t).data as *const u8,
                len: data.len(),
                n_in,
                n_out,
                layout,
            })
        }
    }

    /// Whether [`Packed::gemm`] gives the bits of [`Packed::gemv`] row by row (Q4_0 yes; Q4_K's
    /// GEMM sums in another order).
    pub fn gemm_matches_gemv(&self) -> bool {
        self.layout.gemm_exact
    }

    /// Rows per interleaved group: product row ranges start and end on multiples of it.
    pub fn group_rows(&self) -> usize {
        self.layout.rows
    }

    /// Checks that `rows` are whole groups inside the matrix and that `acts` holds `n_acts`
    /// activation rows of the kernel's vec_dot_type; returns the bytes per weight row.
    fn check(&self, rows: &std::ops::Range<usize>, acts: &[u8], n_acts: usize) -> usize {
        let g = self.layout.rows;
        assert!(
            rows.start.is_multiple_of(g) && rows.end.is_multiple_of(g) && rows.end <= self.n_out,
            "rows {rows:?} of a {}-row matrix in groups of {g}",
            self.n_out
        );
        let vdt = super::kernels(self.layout.ty).map(|k| k.vec_dot_type);
        let act_bytes = vdt.and_then(|t| t.row_bytes(self.n_in as u64));
        assert_eq!(
            act_bytes.map(|b| b * n_acts as u64),
            Some(acts.len() as u64),
            "activation bytes"
        );
        self.len / self.n_out
    }

    /// `out[r - rows.start] = dot(row r, act)` for one activation row `act` (quantized to the
    /// matrix's vec_dot_type, `n_in` elements) and rows `rows` (whole groups).
    pub fn gemv(&self, rows: std::ops::Range<usize>, act: &[u8], out: &mut [f32]) {
        assert_eq!(out.len(), rows.len(), "output length");
        let row_bytes = self.check(&rows, act, 1);
        if rows.is_empty() {
            return;
        }
        // SAFETY: rows lie within the matrix in whole groups (checked), so the weights read
        // are [start*row_bytes, end*row_bytes) of the packed buffer (a group of g rows is
        // g*row_bytes bytes in the interleaved layout too); `act` is one activation row of
        // the kernel's vec_dot_type and `out` has room for `rows.len()` floats (checked).
        unsafe {
            (self.layout.gemv)(
                self.n_in as i32,
                out.as_mut_ptr(),
                0,
                self.data.add(rows.start * row_bytes).cast(),
                act.as_ptr().cast(),
                1,
                rows.len() as i32,
            )
        }
    }

    /// `out[a * stride + (r - rows.start)] = dot(row r, activation a)` for `n_acts` (a
    /// multiple of 4) activations packed by [`quantize4`] and rows `rows` (whole groups, at
    /// most `stride` of them).
    pub fn gemm(
        &self,
        rows: std::ops::Range<usize>,
        acts: &[u8],
        n_acts: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        assert!(n_acts.is_multiple_of(4), "{n_acts} activations");
        assert!(
            rows.len() <= stride && n_acts.saturating_sub(1) * stride + rows.len() <= out.len(),
            "output of {n_acts} × {} with stride {stride} in {} floats",
            rows.len(),
            out.len()
        );
        let row_bytes = self.check(&rows, acts, n_acts);
        if rows.is_empty() || n_acts == 0 {
            return;
        }
        // SAFETY: as in `gemv`; `acts` holds `n_acts` packed activations (checked) and `out`
        // `n_acts` rows of `rows.len()` floats `stride` apart (checked); the kernel writes
        // `out[a * stride + c]` for a < n_acts, c < rows.len().
        unsafe {
            (self.layout.gemm)(
                self.n_in as i32,
                out.as_mut_ptr(),
                stride,
                self.data.add(rows.start * row_bytes).cast(),
                acts.as_ptr().cast(),
                n_acts as i32,
                rows.len() as i32,
            )
        }
    }
}

/// Quantizes four activation rows (`x`: `[4, n]`) into `out` (four rows of `ty`'s
/// vec_dot_type, interleaved as the GEMM kernels read them); false when `ty` has no GEMM here.
pub fn quantize4(ty: GgmlType, x: &[f32], n: usize, out: &mut [u8]) -> bool {
    let Some(l) = layout(ty, 8) else {
        return false;
    };
    let vdt = super::kernels(ty).map(|k| k.vec_dot_type);
    let bytes = vdt.and_then(|t| t.row_bytes(n as u64));
    assert_eq!(x.len(), 4 * n, "four rows of {n}");
    assert_eq!(
        bytes.map(|b| 4 * b),
        Some(out.len() as u64),
        "four packed activation rows"
    );
    assert!(n.is_multiple_of(l.block), "row length {n}");
    // SAFETY: `x` holds four rows of `n` floats and `out` four rows of the vec_dot_type
    // (checked), which is what the interleaved 4-row block layout occupies.
    unsafe { (l.quantize4)(x.as_ptr(), out.as_mut_ptr().cast(), n as i64) };
    true
}

impl Drop for Packed {
    fn drop(&mut self) {
        // SAFETY: both were created in `new` and are freed exactly once, here.
        unsafe {
            sys::ggml_backend_buffer_free(self.buffer);
            sys::ggml_free(self.ctx);
        }
    }
}

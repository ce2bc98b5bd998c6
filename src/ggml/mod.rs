//! The only FFI in ffnskip: ggml's CPU type traits (SIMD dot products, activation
//! quantization, dequantization), its quantizer, and its CPU feature report, from the ggml
//! statically linked by `llama-cpp-sys-2`. Everything here is exposed through safe functions
//! that check slice lengths against the type's block geometry before calling into C.
//!
//! `order` holds the Rust copies of ggml's summation and rounding orders (some with SIMD
//! intrinsics). This module tree is the only place `unsafe` is allowed (the crate denies it),
//! besides the mmap in `gguf::reader`; every `unsafe` block carries a SAFETY comment.
#![allow(unsafe_code)]

pub mod graph;
pub mod mul_mat_op;
pub mod order;
pub mod repack;
pub mod sgemm;

use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

use crate::gguf::GgmlType;

/// `ggml_vec_dot_t`: `(n, out, bs, x, bx, y, by, nrc)`.
type VecDotFn = unsafe extern "C" fn(
    i32,
    *mut f32,
    usize,
    *const std::ffi::c_void,
    usize,
    *const std::ffi::c_void,
    usize,
    i32,
);

/// ggml's CPU kernels for one weight type.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub ty: GgmlType,
    /// The type activations are quantized to before `vec_dot` (Q8_0, Q8_1, Q8_K, F16, …).
    pub vec_dot_type: GgmlType,
    vec_dot: VecDotFn,
    from_float: Option<unsafe extern "C" fn(*const f32, *mut std::ffi::c_void, i64)>,
    to_float: Option<unsafe extern "C" fn(*const std::ffi::c_void, *mut f32, i64)>,
}

/// Calls `ggml_cpu_init` once (fills ggml's fp16 tables; required before any kernel).
pub fn init() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: ggml_cpu_init takes no arguments and is idempotent; OnceLock runs it once.
        // `log` is a valid callback for the whole program and ignores `user_data`.
        unsafe {
            sys::ggml_log_set(Some(log), std::ptr::null_mut());
            sys::ggml_cpu_init()
        }
    });
}

/// ggml's log, minus its debug and info chatter (one line per repacked tensor): warnings
/// and errors go to stderr. `CONT` continues the previous message at its level.
unsafe extern "C" fn log(
    level: sys::ggml_log_level,
    text: *const std::ffi::c_char,
    _: *mut std::ffi::c_void,
) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static LAST: AtomicU32 = AtomicU32::new(sys::GGML_LOG_LEVEL_NONE);
    let level = if level == sys::GGML_LOG_LEVEL_CONT {
        LAST.load(Ordering::Relaxed)
    } else {
        LAST.store(level, Ordering::Relaxed);
        level
    };
    if level >= sys::GGML_LOG_LEVEL_WARN && !text.is_null() {
        // SAFETY: ggml passes a NUL-terminated string valid for the duration of the call.
        let t = unsafe { std::ffi::CStr::from_ptr(text) };
        eprint!("{}", t.to_string_lossy());
    }
}

/// The kernels for `ty`, or `None` when ggml's CPU backend has no dot product for it.
pub fn kernels(ty: GgmlType) -> Option<Kernels> {
    static TABLE: OnceLock<Vec<Option<Kernels>>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        init();
        GgmlType::ALL.iter().map(|&t| load_kernels(t)).collect()
    });
    let idx = GgmlType::ALL.iter().position(|&t| t == ty)?;
    table[idx]
}

fn load_kernels(ty: GgmlType) -> Option<Kernels> {
    // SAFETY: both getters take any enum value below GGML_TYPE_COUNT (all of GgmlType::ALL
    // are) and return a pointer to a static table entry, or null; we only read it.
    let (cpu, base) = unsafe {
        (
            sys::ggml_get_type_traits_cpu(ty as sys::ggml_type).as_ref()?,
            sys::ggml_get_type_traits(ty as sys::ggml_type).as_ref()?,
        )
    };
    let vec_dot = cpu.vec_dot?;
    let vec_dot_type = GgmlType::from_u32(cpu.vec_dot_type)?;
    // A vec_dot_type must itself be producible from f32 on the CPU.
    // SAFETY: as above.
    let vdt_cpu = unsafe { sys::ggml_get_type_traits_cpu(cpu.vec_dot_type).as_ref()? };
    Some(Kernels {
        ty,
        vec_dot_type,
        vec_dot,
        from_float: vdt_cpu.from_float,
        to_float: base.to_float,
    })
}

impl Kernels {
    /// Quantizes one row of activations `x` (length n, n a multiple of the vec_dot_type
    /// block) into `out` (exactly `row_bytes(vec_dot_type, n)` bytes).
    pub fn quantize_activation(&self, x: &[f32], out: &mut [u8]) {
        let n = x.len() as u64;
        let need = self.vec_dot_type.row_bytes(n);
        assert_eq!(
            need,
            Some(out.len() as u64),
            "activation buffer size for {}",
            self.vec_dot_type
        );
        match self.from_float {
            // SAFETY: `x` holds n floats, `out` holds the row_bytes(n) bytes from_float writes
            // for n elements (checked above); n is a multiple of the block size.
            Some(f) => unsafe { f(x.as_ptr(), out.as_mut_ptr().cast(), n as i64) },
            None => panic!("ggml has no from_float for {}", self.vec_dot_type),
        }
    }

    /// Blocked product of weight rows with activation rows:
    /// `out[b * stride + r] = dot(rows[r], acts[b])` for every weight row r in `rows`
    /// (`n_rows` ≤ `stride` rows of `n` elements of `ty`) and activation row b in `acts`
    /// (`batch` rows of `n` elements of `vec_dot_type`): ggml's `[batch, rows]` layout. Sizes
    /// are checked once; the loop runs 16×16 tiles as ggml's `mul_mat` does, so a tile of
    /// weights and of activations stays in L1.
    pub fn matmul_tile(
        &self,
        n: usize,
        rows: &[u8],
        acts: &[u8],
        batch: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        const TILE: usize = 16;
        let bs = |t: GgmlType| t.block_size() as usize;
        assert!(
            n.is_multiple_of(bs(self.ty)) && n.is_multiple_of(bs(self.vec_dot_type)),
            "row length {n}"
        );
        let rb = n / bs(self.ty) * self.ty.block_bytes() as usize;
        let ab = n / bs(self.vec_dot_type) * self.vec_dot_type.block_bytes() as usize;
        assert!(
            rb > 0 && rows.len().is_multiple_of(rb),
            "weight rows for {}",
            self.ty
        );
        let n_rows = rows.len() / rb;
        assert_eq!(
            acts.len(),
            ab * batch,
            "activation rows for {}",
            self.vec_dot_type
        );
        assert!(
            n_rows <= stride && batch.saturating_sub(1) * stride + n_rows <= out.len(),
            "output of {batch} × {n_rows} with stride {stride} in {} floats",
            out.len()
        );
        for b0 in (0..batch).step_by(TILE) {
            for r0 in (0..n_rows).step_by(TILE) {
                for b in b0..(b0 + TILE).min(batch) {
                    let act = acts[b * ab..].as_ptr();
                    for r in r0..(r0 + TILE).min(n_rows) {
                        // SAFETY: r < n_rows ≤ stride and b < batch, so row r ([r*rb, (r+1)*rb))
                        // lies in `rows`, activation b in `acts`, and b*stride+r in `out` (all
                        // checked above); nrc = 1 is valid for every type.
                        unsafe {
                            (self.vec_dot)(
                                n as i32,
                                out.as_mut_ptr().add(b * stride + r),
                                0,
                                rows.as_ptr().add(r * rb).cast(),
                                0,
                                act.cast(),
                                0,
                                1,
                            )
                        }
                    }
                }
            }
        }
    }

    /// Dequantizes one row of `out.len()` elements.
    pub fn dequantize_row(&self, row: &[u8], out: &mut [f32]) {
        let n = out.len() as u64;
        assert_eq!(
            self.ty.row_bytes(n),
            Some(row.len() as u64),
            "row size for {}",
            self.ty
        );
        if self.ty == GgmlType::F32 {
            return f32_from_le(row, out);
        }
        match self.to_float {
            // SAFETY: `row` holds exactly the bytes of n elements of `ty`, `out` n floats.
            Some(f) => unsafe { f(row.as_ptr().cast(), out.as_mut_ptr(), n as i64) },
            None => panic!("ggml has no to_float for {}", self.ty),
        }
    }
}

/// Little-endian f32 bytes → floats (ggml has no `to_float` for F32 itself).
fn f32_from_le(data: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Whether `ty` can be dequantized (F32, or a type with `to_float`).
pub fn can_dequantize(ty: GgmlType) -> bool {
    init();
    if ty == GgmlType::F32 {
        return true;
    }
    // SAFETY: see load_kernels.
    unsafe { sys::ggml_get_type_traits(ty as sys::ggml_type).as_ref() }
        .is_some_and(|t| t.to_float.is_some())
}

/// Dequantizes a whole tensor's data (any number of rows) of type `ty`.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    init();
    if ty.row_bytes(out.len() as u64) != Some(data.len() as u64) {
        return Err(format!(
            "{} bytes are not {} elements of {ty}",
            data.len(),
            out.len()
        ));
    }
    if ty == GgmlType::F32 {
        f32_from_le(data, out);
        return Ok(());
    }
    // SAFETY: see load_kernels.
    let traits = unsafe { sys::ggml_get_type_traits(ty as sys::ggml_type).as_ref() };
    let f = traits
        .and_then(|t| t.to_float)
        .ok_or_else(|| format!("ggml cannot dequantize {ty}"))?;
    // SAFETY: data holds exactly out.len() elements of ty (checked above).
    unsafe { f(data.as_ptr().cast(), out.as_mut_ptr(), out.len() as i64) };
    Ok(())
}

/// Whether ggml needs an importance matrix to quantize to `ty` (IQ1/IQ2 types).
pub fn quantize_requires_imatrix(ty: GgmlType) -> bool {
    // SAFETY: pure function of the enum value.
    unsafe { sys::ggml_quantize_requires_imatrix(ty as sys::ggml_type) }
}

/// Quantizes `src` (`n_rows` × `n_per_row` floats) to `ty` with ggml's reference quantizer
/// (`ggml_quantize_chunk`, as llama.cpp's `llama-quantize` uses, without imatrix).
pub fn quantize(ty: GgmlType, src: &[f32], n_per_row: usize) -> Result<Vec<u8>, String> {
    init();
    if n_per_row == 0 || !src.len().is_multiple_of(n_per_row) {
        return Err(format!(
            "{} floats are not whole rows of {n_per_row}",
            src.len()
        ));
    }
    if quantize_requires_imatrix(ty) {
        return Err(format!(
            "{ty} needs an importance matrix, which ffnskip does not compute"
        ));
    }
    let n_rows = src.len() / n_per_row;
    let row_bytes = ty.row_bytes(n_per_row as u64).ok_or_else(|| {
        format!(
            "row length {n_per_row} is not a multiple of the {ty} block size {}",
            ty.block_size()
        )
    })? as usize;
    let mut dst = vec![0u8; row_bytes * n_rows];
    // SAFETY: ggml_quantize_init only fills static lookup tables for `ty`.
    unsafe { sys::ggml_quantize_init(ty as sys::ggml_type) };
    // SAFETY: src holds n_rows × n_per_row floats, dst n_rows × row_bytes bytes, which is
    // what ggml_quantize_chunk writes for start = 0; imatrix may be null for these types.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty as sys::ggml_type,
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            n_rows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    if written != dst.len() {
        return Err(format!(
            "ggml wrote {written} bytes, expected {}",
            dst.len()
        ));
    }
    Ok(dst)
}

/// f16 → f32 for a slice (ggml's vectorised conversion, F16C/AVX-512 where built).
pub fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: half::f16 is repr(transparent) over u16 = ggml_fp16_t; both slices hold len items.
    unsafe { sys::ggml_cpu_fp16_to_fp32(src.as_ptr().cast(), dst.as_mut_ptr(), src.len() as i64) }
}

/// f32 → f16 for a slice.
pub fn f32_to_f16(src: &[f32], dst: &mut [half::f16]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: as in f16_to_f32.
    unsafe { sys::ggml_cpu_fp32_to_fp16(src.as_ptr(), dst.as_mut_ptr().cast(), src.len() as i64) }
}

/// The SIMD features ggml's CPU kernels were compiled with (what `vec_dot` actually uses).
pub fn cpu_features() -> Vec<&'static str> {
    init();
    let probes: [(&str, unsafe extern "C" fn() -> i32); 16] = [
        ("SSE3", sys::ggml_cpu_has_sse3),
        ("SSSE3", sys::ggml_cpu_has_ssse3),
        ("AVX", sys::ggml_cpu_has_avx),
        ("AVX2", sys::ggml_cpu_has_avx2),
        ("F16C", sys::ggml_cpu_has_f16c),
        ("FMA", sys::ggml_cpu_has_fma),
        ("BMI2", sys::ggml_cpu_has_bmi2),
        ("AVX_VNNI", sys::ggml_cpu_has_avx_vnni),
        ("AVX512", sys::ggml_cpu_has_avx512),
        ("AVX512_VBMI", sys::ggml_cpu_has_avx512_vbmi),
        ("AVX512_VNNI", sys::ggml_cpu_has_avx512_vnni),
        ("AVX512_BF16", sys::ggml_cpu_has_avx512_bf16),
        ("NEON", sys::ggml_cpu_has_neon),
        ("ARM_FMA", sys::ggml_cpu_has_arm_fma),
        ("DOTPROD", sys::ggml_cpu_has_dotprod),
        ("SVE", sys::ggml_cpu_has_sve),
    ];
    probes
        .iter()
        // SAFETY: each probe takes no arguments and returns a compile-time constant.
        .filter(|(_, f)| unsafe { f() } != 0)
        .map(|(name, _)| *name)
        .collect()
}

/// ggml's own flash attention (`ggml_flash_attn_ext`, one thread, no mask) of one query row
/// `q` (`[hd]`) over one head's keys and values (`[n_kv, hd]` each, f16): `[hd]`. Run once, to
/// decide which rounding [`order::softmax_values`] mirrors; `None` if ggml cannot allocate.
pub fn flash_attn_one(q: &[f32], k: &[half::f16], v: &[half::f16], scale: f32) -> Option<Vec<f32>> {
    let hd = q.len();
    let n_kv = k.len() / hd.max(1);
    assert!(hd > 0 && k.len() == hd * n_kv && v.len() == k.len() && n_kv > 0);
    init();
    // SAFETY: the context owns its memory (no_alloc false, sized for the three inputs, the
    // output, the graph and per-tensor overhead); each input is created with exactly the
    // length copied into it; the graph runs synchronously, its output (`[hd, 1, 1, 1]`, F32)
    // is copied out before the context is freed, once, on every path.
    unsafe {
        let mem = (hd * 4 + 2 * k.len() * 2 + hd * 4) * 2 + (1 << 20);
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: mem,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        });
        if ctx.is_null() {
            return None;
        }
        let (h, n) = (hd as i64, n_kv as i64);
        let tq = sys::ggml_new_tensor_4d(ctx, sys::GGML_TYPE_F32, h, 1, 1, 1);
        let tk = sys::ggml_new_tensor_4d(ctx, sys::GGML_TYPE_F16, h, n, 1, 1);
        let tv = sys::ggml_new_tensor_4d(ctx, sys::GGML_TYPE_F16, h, n, 1, 1);
        let result = if tq.is_null() || tk.is_null() || tv.is_null() {
            None
        } else {
            std::ptr::copy_nonoverlapping(q.as_ptr(), (*tq).data.cast::<f32>(), hd);
            std::ptr::copy_nonoverlapping(k.as_ptr(), (*tk).data.cast::<half::f16>(), k.len());
            std::ptr::copy_nonoverlapping(v.as_ptr(), (*tv).data.cast::<half::f16>(), v.len());
            let out =
                sys::ggml_flash_attn_ext(ctx, tq, tk, tv, std::ptr::null_mut(), scale, 0.0, 0.0);
            let gf = sys::ggml_new_graph(ctx);
            if out.is_null() || gf.is_null() {
                None
            } else {
                sys::ggml_build_forward_expand(gf, out);
                (sys::ggml_graph_compute_with_ctx(ctx, gf, 1) == sys::GGML_STATUS_SUCCESS)
                    .then(|| std::slice::from_raw_parts((*out).data.cast::<f32>(), hd).to_vec())
            }
        };
        sys::ggml_free(ctx);
        result
    }
}

/// ggml's f16 dot product (`ggml_vec_dot_f16`: f16 inputs, f32 accumulation), the kernel
/// llama.cpp uses for q·k and p·v in attention.
#[derive(Clone, Copy)]
pub struct F16Dot {
    vec_dot: VecDotFn,
}

impl F16Dot {
    pub fn get() -> Self {
        let k = kernels(GgmlType::F16).expect("ggml always has an f16 vec_dot");
        F16Dot { vec_dot: k.vec_dot }
    }

    #[inline]
    pub fn dot(&self, a: &[half::f16], b: &[half::f16]) -> f32 {
        assert_eq!(a.len(), b.len());
        let mut s = 0f32;
        // SAFETY: a and b both hold n f16 values (checked); f16's block size is 1.
        unsafe {
            (self.vec_dot)(
                a.len() as i32,
                &mut s,
                0,
                a.as_ptr().cast(),
                0,
                b.as_ptr().cast(),
                0,
                1,
            )
        };
        s
    }
}

// ggml-cpu's vec.h: exported by the linked ggml-cpu library with C linkage, but not part of the
// sys crate's bindings (they cover ggml.h/llama.h only). The crate version is pinned, so the
// signature cannot drift under us.
extern "C" {
    fn ggml_vec_swiglu_f32(n: std::ffi::c_int, y: *mut f32, x: *const f32, g: *const f32);
}

/// `y[i] = silu(x[i]) * g[i]` with ggml's own kernel (`ggml_vec_swiglu_f32`: its SIMD exp for
/// whole vectors, libm's `expf` for the tail), so SwiGLU rounds as in llama.cpp. Call it per
/// activation row of `n_ff` elements, as ggml does, because the tail of a row takes the scalar path.
pub fn swiglu(x: &[f32], g: &[f32], y: &mut [f32]) {
    assert!(x.len() == g.len() && x.len() == y.len());
    // ggml takes an int length; rows are far shorter, but never pass one that would wrap.
    const MAX: usize = std::ffi::c_int::MAX as usize;
    for ((x, g), y) in x.chunks(MAX).zip(g.chunks(MAX)).zip(y.chunks_mut(MAX)) {
        // SAFETY: x, g and y each hold n ≤ c_int::MAX floats (equal lengths checked above);
        // ggml reads x[..n], g[..n] and writes y[..n] only; y is a distinct &mut borrow, so it
        // cannot alias x or g.
        unsafe {
            ggml_vec_swiglu_f32(
                y.len() as std::ffi::c_int,
                y.as_mut_ptr(),
                x.as_ptr(),
                g.as_ptr(),
            )
        }
    }
}

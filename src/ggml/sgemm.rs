//! llamafile's tinyBLAS (`llamafile_sgemm`, ggml-cpu/llamafile/sgemm.cpp), which llama.cpp's
//! `ggml_compute_forward_mul_mat` runs for a batch of two or more activation rows before
//! falling back to `vec_dot`. On x86 its quantized kernel (`tinyBLAS_Q0_AVX`) takes Q8_0,
//! Q4_0, Q5_0 and IQ4_NL weights against Q8_0 activations; it reads only the thread index and
//! count of its `ggml_compute_params`, so each of our chunks calls it as thread 0 of 1.
//!
//! Wired for Q8_0, Q4_0 and Q5_0, where each output has the bits of `vec_dot` on that row
//! alone (tests/kernels.rs), so batches stay equal to one-row decoding; IQ4_NL's differs in
//! the last place (and llama.cpp repacks IQ4_NL on AVX2 anyway).

use std::ffi::{c_int, c_void};

use crate::gguf::GgmlType;

/// `struct ggml_compute_params` (ggml-cpu/ggml-cpu-impl.h).
#[repr(C)]
struct ComputeParams {
    ith: c_int,
    nth: c_int,
    wsize: usize,
    wdata: *mut c_void,
    threadpool: *mut c_void,
    use_ref: bool,
}

extern "C" {
    // ggml-cpu/llamafile/sgemm.h (C linkage).
    fn llamafile_sgemm(
        params: *const ComputeParams,
        m: i64,
        n: i64,
        k: i64,
        a: *const c_void,
        lda: i64,
        b: *const c_void,
        ldb: i64,
        c: *mut c_void,
        ldc: i64,
        atype: c_int,
        btype: c_int,
        ctype: c_int,
    ) -> bool;
}

/// Whether tinyBLAS may multiply `ty` weights here (x86; types dotted against Q8_0). Built
/// without AVX, [`sgemm`] still declines.
pub fn supports(ty: GgmlType) -> bool {
    cfg!(target_arch = "x86_64") && matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0)
}

/// `out[a * stride + r] = dot(weight row r, activation a)` for `n_rows` ≤ `stride` rows of
/// `ty` (`rows`, `n` elements each) and `n_acts` ≥ 2 Q8_0 activation rows (`acts`). Returns
/// false, leaving `out` untouched, where tinyBLAS does not take the product.
pub fn sgemm(
    ty: GgmlType,
    n: usize,
    rows: &[u8],
    acts: &[u8],
    n_acts: usize,
    out: &mut [f32],
    stride: usize,
) -> bool {
    if !supports(ty) || n_acts < 2 || !n.is_multiple_of(32) {
        return false;
    }
    let (Some(rb), Some(ab)) = (ty.row_bytes(n as u64), GgmlType::Q8_0.row_bytes(n as u64)) else {
        return false;
    };
    let (rb, ab) = (rb as usize, ab as usize);
    if rb == 0 || !rows.len().is_multiple_of(rb) {
        return false;
    }
    let n_rows = rows.len() / rb;
    assert_eq!(acts.len(), ab * n_acts, "activation bytes");
    assert!(
        n_rows <= stride && (n_acts - 1) * stride + n_rows <= out.len(),
        "output of {n_acts} × {n_rows} with stride {stride} in {} floats",
        out.len()
    );
    let k = (n / 32) as i64;
    let params = ComputeParams {
        ith: 0,
        nth: 1,
        wsize: 0,
        wdata: std::ptr::null_mut(),
        threadpool: std::ptr::null_mut(),
        use_ref: false,
    };
    // SAFETY: `rows` holds n_rows rows of k blocks of `ty`, `acts` n_acts rows of k Q8_0
    // blocks and `out` n_acts rows of n_rows floats `stride` apart (all checked above), which
    // is what tinyBLAS reads and writes with lda = ldb = k (in blocks) and ldc = stride. For these types it
    // reads only `ith`/`nth` of the params (0 of 1: the whole product).
    unsafe {
        llamafile_sgemm(
            &params,
            n_rows as i64,
            n_acts as i64,
            k,
            rows.as_ptr().cast(),
            k,
            acts.as_ptr().cast(),
            k,
            out.as_mut_ptr().cast(),
            stride as i64,
            ty as c_int,
            GgmlType::Q8_0 as c_int,
            GgmlType::F32 as c_int,
        )
    }
}

//! One `ggml_mul_mat` op run by ggml itself, on the calling thread (a one-thread graph over
//! our chunk of weight rows), for the weight types whose batched kernel ggml keeps private:
//! the tiled K-quant GEMM (`ggml-cpu/tiled/`, `ggml_compute_forward_mul_mat_tiled`), which
//! llama.cpp's `ggml_compute_forward_mul_mat` takes for batches of ≥ 8 rows of Q6_K, Q5_K,
//! Q3_K, Q2_K, IQ4_XS and unrepacked Q4_K. Its sums differ from `vec_dot`'s, so it serves only
//! batches that need not equal decoding. The threading stays ours: each of our threads runs
//! the op for its own rows.

use std::cell::RefCell;

use llama_cpp_sys_2 as sys;

use crate::gguf::GgmlType;

/// Whether ggml's tiled K-quant GEMM takes a batch of `batch` rows of `ty` (ggml-cpu/tiled:
/// `ggml_tiled_supported`, `ggml_tiled_min_batch`) on this CPU (AVX2 or better).
pub fn takes(ty: GgmlType, batch: usize) -> bool {
    batch >= 8
        && cfg!(target_arch = "x86_64")
        && matches!(
            ty,
            GgmlType::Q6_K
                | GgmlType::Q5_K
                | GgmlType::Q4_K
                | GgmlType::Q3_K
                | GgmlType::Q2_K
                | GgmlType::IQ4_XS
        )
        && *AVX2.get_or_init(|| super::cpu_features().contains(&"AVX2"))
}

static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

thread_local! {
    /// ggml's work buffer for the op (quantized activations, tile scratch), kept per thread.
    static WORK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `out[b * n_rows + r] = dot(weight row r, act row b)` for `n_rows` rows of `ty` (`rows`, `n`
/// elements each) and `batch` activation rows `acts` already quantized to `ty`'s vec_dot_type
/// (Q8_K for every type [`takes`] lists, which ggml's tiled GEMM reads as they are), computed
/// by ggml's `ggml_mul_mat` on this thread. False (with `out` untouched) if ggml cannot set it
/// up.
pub fn mul_mat(
    ty: GgmlType,
    n: usize,
    rows: &[u8],
    acts: &[u8],
    batch: usize,
    out: &mut [f32],
) -> bool {
    let Some(rb) = ty.row_bytes(n as u64) else {
        return false;
    };
    let rb = rb as usize;
    if rb == 0 || !rows.len().is_multiple_of(rb) || batch == 0 {
        return false;
    }
    let n_rows = rows.len() / rb;
    let Some(vdt) = super::kernels(ty).map(|k| k.vec_dot_type) else {
        return false;
    };
    assert_eq!(
        vdt.row_bytes(n as u64).map(|b| b * batch as u64),
        Some(acts.len() as u64),
        "activation rows"
    );
    assert_eq!(out.len(), n_rows * batch, "output length");
    let (Ok(ne0), Ok(ne1), Ok(nb)) = (
        i64::try_from(n),
        i64::try_from(n_rows),
        i64::try_from(batch),
    ) else {
        return false;
    };
    super::init();
    WORK.with(|work| {
        let mut work = work.borrow_mut();
        // SAFETY: the context holds only metadata (no_alloc) for three tensors and one graph
        // and is freed on every path. The tensors point at caller memory of exactly their
        // size: `rows` (n_rows rows of `ty`, read only), `acts` (batch rows of n elements of
        // the vec_dot_type, contiguous, read only) and
        // `out` (n_rows × batch f32, written), all checked above and borrowed for the whole
        // call. The graph runs synchronously on this thread (one thread, no threadpool
        // kept), with a work buffer of the size `ggml_graph_plan` asks for.
        unsafe {
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: sys::ggml_tensor_overhead() * 4 + sys::ggml_graph_overhead(),
                mem_buffer: std::ptr::null_mut(),
                no_alloc: true,
            });
            if ctx.is_null() {
                return false;
            }
            let a = sys::ggml_new_tensor_2d(ctx, ty as sys::ggml_type, ne0, ne1);
            let b = sys::ggml_new_tensor_2d(ctx, vdt as sys::ggml_type, ne0, nb);
            let ok = !a.is_null() && !b.is_null() && {
                (*a).data = rows.as_ptr() as *mut _;
                (*b).data = acts.as_ptr() as *mut _;
                let c = sys::ggml_mul_mat(ctx, a, b);
                let gf = sys::ggml_new_graph(ctx);
                !c.is_null() && !gf.is_null() && {
                    (*c).data = out.as_mut_ptr().cast();
                    sys::ggml_build_forward_expand(gf, c);
                    let mut plan = sys::ggml_graph_plan(gf, 1, std::ptr::null_mut());
                    if work.len() < plan.work_size {
                        work.resize(plan.work_size, 0);
                    }
                    plan.work_data = work.as_mut_ptr();
                    sys::ggml_graph_compute(gf, &mut plan) == sys::GGML_STATUS_SUCCESS
                }
            };
            sys::ggml_free(ctx);
            ok
        }
    })
}

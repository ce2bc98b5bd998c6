//! Quantized weight matrices borrowed from the GGUF mapping, and row-parallel matrix
//! products over them using ggml's `vec_dot` kernels.
//!
//! Layout conventions: a weight matrix has `n_out` rows of `n_in` elements (ggml
//! `ne = [n_in, n_out]`); activations are row-major `[batch, n_in]`, quantized once per row
//! to the weight's `vec_dot_type`. Products are written row-major by output feature,
//! `[n_out, batch]`, so each thread owns one contiguous range of output rows.
//!
//! A matrix may also hold a copy repacked by ggml for its GEMV kernels ([`Matrix::pack`], as
//! llama.cpp does at load); products then run that kernel for every activation row, batched
//! or not, so batched and token-by-token evaluation give the same bits.

use std::sync::Arc;

use std::sync::Mutex;

use crate::ggml::repack::Packed;
use crate::ggml::{self, Kernels};
use crate::ggml::{mul_mat_op, sgemm};
use crate::gguf::{ErrorKind, GgmlType, GgufFile, Result};

#[derive(Clone)]
pub struct Matrix<'a> {
    pub ty: GgmlType,
    pub n_in: usize,
    pub n_out: usize,
    data: &'a [u8],
    kernels: Kernels,
    /// ggml's repacked copy, used for products when present.
    packed: Option<Arc<Packed>>,
}

impl<'a> Matrix<'a> {
    /// Views tensor `name` as an `[n_out, n_in]` matrix, checking its shape and that ggml's
    /// CPU backend can dot its type.
    pub fn from_gguf(f: &'a GgufFile, name: &str, n_in: usize, n_out: usize) -> Result<Self> {
        let info = f.tensor_info(name).ok_or_else(|| {
            f.error(ErrorKind::MissingTensor {
                tensor: name.to_string(),
            })
        })?;
        let expected = vec![n_in as u64, n_out as u64];
        if info.shape != expected {
            return Err(f.error(ErrorKind::WrongShape {
                tensor: name.to_string(),
                expected,
                found: info.shape.clone(),
            }));
        }
        let kernels = ggml::kernels(info.ty)
            .filter(|k| (n_in as u64).is_multiple_of(k.vec_dot_type.block_size()))
            .ok_or_else(|| {
                f.error(ErrorKind::WrongTensorType {
                    tensor: name.to_string(),
                    expected: "a type ggml's CPU backend can multiply".into(),
                    found: info.ty,
                })
            })?;
        Ok(Matrix {
            ty: info.ty,
            n_in,
            n_out,
            data: f.tensor_data(info),
            kernels,
            packed: None,
        })
    }

    /// Wraps raw row data (used by kernel tests and benches).
    pub fn from_raw(ty: GgmlType, n_in: usize, n_out: usize, data: &'a [u8]) -> Option<Self> {
        let kernels = ggml::kernels(ty)?;
        if ty.row_bytes(n_in as u64)? * n_out as u64 != data.len() as u64
            || !(n_in as u64).is_multiple_of(kernels.vec_dot_type.block_size())
        {
            return None;
        }
        Some(Matrix {
            ty,
            n_in,
            n_out,
            data,
            kernels,
            packed: None,
        })
    }

    /// Repacks the weights with ggml for its GEMV kernels when ggml would on this CPU (see
    /// [`crate::ggml::repack`]); returns whether it did. The mapped rows stay readable.
    pub fn pack(&mut self) -> bool {
        if self.packed.is_none() {
            self.packed = Packed::new(self.ty, self.n_in, self.n_out, self.data).map(Arc::new);
        }
        self.packed.is_some()
    }

    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// Whether a product over `batch` activation rows runs ggml's GEMM, four rows at a time
    /// (activations quantized by [`Matrix::quantize_acts`] with `fours`), as llama.cpp does for
    /// a batch of repacked weights. With `exact`, only where the GEMM gives the GEMV's bits, so
    /// that a batch equals the same rows decoded one at a time.
    pub fn uses_gemm(&self, batch: usize, exact: bool) -> bool {
        batch >= 4
            && self
                .packed
                .as_ref()
                .is_some_and(|p| !exact || p.gemm_matches_gemv())
    }

    /// Whether ggml runs a product over `batch` rows itself ([`mul_mat_op`]: its tiled K-quant
    /// GEMM); never with `exact`, whose bits must equal decoding's.
    pub fn ggml_runs(&self, batch: usize, exact: bool) -> bool {
        !exact && self.packed.is_none() && mul_mat_op::takes(self.ty, batch)
    }

    /// Quantizes `batch` rows of `x` (`[batch, n_in]`) to this matrix's vec_dot_type; with
    /// `fours`, the first `batch − batch % 4` rows packed four at a time for ggml's GEMM and
    /// the rest row by row, as llama.cpp's `forward_mul_mat` lays them out (same bytes).
    pub fn quantize_acts(&self, x: &[f32], batch: usize, fours: bool, out: &mut [u8]) {
        let (n, arb) = (self.n_in, self.act_row_bytes());
        let (x, out) = (&x[..n * batch], &mut out[..arb * batch]);
        let b4 = if fours { batch - batch % 4 } else { 0 };
        let (head, tail) = out.split_at_mut(b4 * arb);
        if b4 > 0 {
            par_rows(head, 4 * arb, 1, &|g, o| {
                let packed = ggml::repack::quantize4(self.ty, &x[4 * g * n..4 * (g + 1) * n], n, o);
                assert!(packed, "{} has no 4-row packer", self.ty);
            });
        }
        let k = self.kernels;
        let x = &x[b4 * n..];
        if batch - b4 > 4 {
            par_rows(tail, arb, 4, &|i, o| {
                k.quantize_activation(&x[i * n..(i + 1) * n], o)
            });
        } else {
            quantize_rows(&k, x, n, tail);
        }
    }

    /// Product row ranges start and end on multiples of this: a packed matrix's row group,
    /// and at least 16 (ggml's AVX-512 GEMMs take 16 columns at a time, 8 more slowly).
    pub fn row_align(&self) -> usize {
        self.packed.as_ref().map_or(1, |p| p.group_rows().max(16))
    }

    /// The mapped bytes (the GGUF's layout, also when packed).
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    pub fn vec_dot_type(&self) -> GgmlType {
        self.kernels.vec_dot_type
    }

    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.n_out
    }

    /// Bytes of weights read by one full product.
    pub fn n_bytes(&self) -> usize {
        self.data.len()
    }

    pub fn row(&self, i: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }

    /// Bytes of one activation row once quantized for this matrix.
    pub fn act_row_bytes(&self) -> usize {
        act_row_bytes(self.vec_dot_type(), self.n_in)
    }

    /// Single-threaded `out[b*nr + (o - rows.start)] = dot(row o, act row b)` for rows `rows`
    /// (`nr` of them; `out` is `[batch, nr]`, ggml's layout): through ggml's own op (its tiled
    /// K-quant GEMM), its repacked GEMM/GEMV, llamafile's tinyBLAS (a batch of Q8_0, Q4_0 or
    /// Q5_0), or `vec_dot` in 16×16 tiles — the kernels llama.cpp picks for the same product.
    fn product_rows(&self, rows: std::ops::Range<usize>, act: Acts, batch: usize, out: &mut [f32]) {
        let arb = self.act_row_bytes();
        let acts = &act.data[..arb * batch];
        let packed = self.packed.as_deref();
        let rb = self.row_bytes();
        let nr = rows.len();
        let out = &mut out[..nr * batch];
        if self.ggml_runs(batch, act.exact) {
            let w = &self.data[rows.start * rb..rows.end * rb];
            if mul_mat_op::mul_mat(self.ty, self.n_in, w, acts, batch, out) {
                return;
            }
            // ggml could not set the op up: vec_dot below.
        }
        let tiny = packed.is_none() && batch >= 2 && sgemm::supports(self.ty);
        if packed.is_none() && !tiny {
            let w = &self.data[rows.start * rb..rows.end * rb];
            self.kernels.matmul_tile(self.n_in, w, acts, batch, out, nr);
            return;
        }
        // Tiles of TILE weight rows (small enough to stay in L2 across the activations); the
        // GEMMs run ACTS activations per call, straight into `out`.
        const TILE: usize = 64;
        const ACTS: usize = 16;
        let n_gemm = match packed {
            Some(_) if act.fours => batch - batch % 4,
            Some(_) => 0,
            None => batch,
        };
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r1 = (r0 + TILE).min(rows.end);
            let c0 = r0 - rows.start;
            for a0 in (0..n_gemm).step_by(ACTS) {
                let na = ACTS.min(n_gemm - a0);
                let a = &acts[a0 * arb..(a0 + na) * arb];
                let o = &mut out[a0 * nr + c0..];
                match packed {
                    Some(p) => p.gemm(r0..r1, a, na, o, nr),
                    None => {
                        let w = &self.data[r0 * rb..r1 * rb];
                        if !sgemm::sgemm(self.ty, self.n_in, w, a, na, o, nr) {
                            // One activation left (or tinyBLAS declined): vec_dot.
                            self.kernels.matmul_tile(self.n_in, w, a, na, o, nr);
                        }
                    }
                }
            }
            if let Some(p) = packed {
                for (b, act) in acts.chunks_exact(arb).enumerate().skip(n_gemm) {
                    p.gemv(r0..r1, act, &mut out[b * nr + c0..b * nr + c0 + (r1 - r0)]);
                }
            }
            r0 = r1;
        }
    }
}

pub fn act_row_bytes(vec_dot_type: GgmlType, n: usize) -> usize {
    (n as u64 / vec_dot_type.block_size() * vec_dot_type.block_bytes()) as usize
}

/// Activation rows quantized for a matrix: `[batch, act_row_bytes]`, the first
/// `batch − batch % 4` of them packed four at a time for ggml's GEMM when `fours`.
#[derive(Clone, Copy)]
pub struct Acts<'a> {
    pub data: &'a [u8],
    pub fours: bool,
    /// Whether the batch's products must give the bits of one-row products; when not, ggml may
    /// run them itself ([`Matrix::ggml_runs`]).
    pub exact: bool,
}

impl<'a> Acts<'a> {
    /// Rows one after another (`tensor::quantize_rows`).
    pub fn rows(data: &'a [u8]) -> Self {
        Acts {
            data,
            fours: false,
            exact: true,
        }
    }
}

/// Quantizes `batch` rows of `x` (`[batch, n]`) into `out` for `vec_dot_type`.
pub fn quantize_rows(k: &Kernels, x: &[f32], n: usize, out: &mut [u8]) {
    let arb = act_row_bytes(k.vec_dot_type, n);
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(arb)) {
        k.quantize_activation(xr, or);
    }
}

/// Products of several matrices over the same input rows in one parallel region (q/k/v,
/// gate/up). Each matrix comes with the input quantized to its `vec_dot_type` ([`Acts`];
/// matrices of the same type and layout share one buffer). `out` holds the matrices' outputs
/// one after another, each `[batch, n_out]` (token rows, ggml's layout). Weight rows are split
/// across the current team's threads in contiguous ranges of equal weight bytes; each range's
/// products land `[batch, rows]` in a scratch buffer and are then copied into place, row
/// pieces at a time (for one token they land in place).
pub fn matmul_group(mats: &[(&Matrix, Acts)], batch: usize, out: &mut [f32]) {
    matmul_group_in(mats, batch, &mut Vec::new(), out)
}

/// [`matmul_group`] with its scratch buffer `pieces` kept by the caller (grown to
/// `Σ n_out × batch` floats for batches of more than one row, never shrunk).
pub fn matmul_group_in(
    mats: &[(&Matrix, Acts)],
    batch: usize,
    pieces: &mut Vec<f32>,
    out: &mut [f32],
) {
    let total_rows: usize = mats.iter().map(|(m, _)| m.n_out).sum();
    assert_eq!(out.len(), total_rows * batch);
    let total_bytes: usize = mats.iter().map(|(m, _)| m.n_bytes()).sum();
    // Chunks of equal weight bytes, a few per thread when the product is large enough, so
    // dynamic claiming evens out threads that run slower (other work, mixed types).
    let threads = crate::team::current_threads().clamp(1, MAX_SPLITS);
    // ggml's own op repacks the whole batch per call: one chunk per thread.
    let per_thread = if mats.iter().any(|(m, a)| m.ggml_runs(batch, a.exact)) {
        1
    } else {
        CHUNKS_PER_THREAD
    };
    let threads = (threads * per_thread)
        .min(total_bytes / MIN_CHUNK_BYTES)
        .clamp(threads, MAX_SPLITS);
    // Row boundaries (in the concatenated row space) of each chunk, by bytes.
    let mut bounds = [0usize; MAX_SPLITS + 1];
    for (t, b) in bounds.iter_mut().enumerate().take(threads + 1).skip(1) {
        let target = total_bytes * t / threads;
        let (mut row, mut bytes) = (0usize, 0usize);
        for (m, _) in mats {
            if bytes + m.n_bytes() >= target {
                let within = (target - bytes) / m.row_bytes().max(1);
                row += within - within % m.row_align();
                break;
            }
            row += m.n_out;
            bytes += m.n_bytes();
        }
        *b = row.min(total_rows);
    }
    bounds[threads] = total_rows;
    // Each chunk's products: for each matrix it overlaps, rows [a, b) of the concatenated
    // row space as `[batch, b − a]` at offset a·batch.
    let run = |lo: usize, hi: usize, chunk: &mut [f32], _: &mut ()| {
        let mut base = 0;
        let mut filled = 0;
        for (m, act) in mats {
            let (a, b) = (lo.max(base), hi.min(base + m.n_out));
            if a < b {
                let n = (b - a) * batch;
                m.product_rows(
                    a - base..b - base,
                    *act,
                    batch,
                    &mut chunk[filled..filled + n],
                );
                filled += n;
            }
            base += m.n_out;
        }
    };
    let mut units = [(); MAX_SPLITS];
    let bounds = &bounds[..=threads];
    if batch == 1 {
        par_split(out, &mut units[..threads], bounds, batch, &run);
        return;
    }
    if pieces.len() < total_rows * batch {
        pieces.resize(total_rows * batch, 0.0);
    }
    let pieces = &mut pieces[..total_rows * batch];
    par_split(pieces, &mut units[..threads], bounds, batch, &run);
    let mut base = 0;
    let mut rest = out;
    for (m, _) in mats {
        let (block, r) = std::mem::take(&mut rest).split_at_mut(m.n_out * batch);
        rest = r;
        gather(pieces, bounds, base..base + m.n_out, batch, block);
        base += m.n_out;
    }
}

/// Copies one matrix's output (`rows` of the concatenated row space) from the chunks of
/// `pieces` (split at `bounds`, each part `[batch, b − a]` at a·batch) into `out`
/// (`[batch, rows.len()]`), token rows in parallel.
fn gather(
    pieces: &[f32],
    bounds: &[usize],
    rows: std::ops::Range<usize>,
    batch: usize,
    out: &mut [f32],
) {
    let n = rows.len();
    let mut parts = [(0usize, 0usize); MAX_SPLITS + 1];
    let mut np = 0;
    for w in bounds.windows(2) {
        let (a, b) = (w[0].max(rows.start), w[1].min(rows.end));
        if a < b {
            parts[np] = (a, b);
            np += 1;
        }
    }
    let parts = &parts[..np];
    par_rows(out, n, (1 << 12) / n.max(1), &|t, row| {
        for &(a, b) in parts {
            let w = b - a;
            row[a - rows.start..b - rows.start]
                .copy_from_slice(&pieces[a * batch + t * w..a * batch + (t + 1) * w]);
        }
    });
}

/// Most threads a product is split over.
pub const MAX_SPLITS: usize = 64;

/// Chunks per thread in [`matmul_group`], and the fewest weight bytes worth a chunk of its own.
const CHUNKS_PER_THREAD: usize = 4;
const MIN_CHUNK_BYTES: usize = 64 << 10;

/// Runs `f(lo, hi, chunk, scratch)` for consecutive row ranges `[bounds[i], bounds[i+1])` in
/// parallel on the current [`team`](crate::team) (no allocation); `chunk` is that range's part
/// of `out` (`row_len` items per row) and `scratch` is `scratch[i]`.
pub fn par_split<T, S, F>(out: &mut [T], scratch: &mut [S], bounds: &[usize], row_len: usize, f: &F)
where
    T: Send,
    S: Send,
    F: Fn(usize, usize, &mut [T], &mut S) + Sync,
{
    debug_assert_eq!(scratch.len() + 1, bounds.len());
    let n = scratch.len();
    if n <= 1 {
        if let Some(s) = scratch.first_mut() {
            f(bounds[0], bounds[1], out, s);
        }
        return;
    }
    assert!(n <= MAX_SPLITS, "{n} splits, at most {MAX_SPLITS}");
    // Each task takes its own chunk and scratch out of its cell.
    type Cell<'a, T, S> = Mutex<Option<(&'a mut [T], &'a mut S)>>;
    let cells: [Cell<T, S>; MAX_SPLITS] = std::array::from_fn(|_| Mutex::new(None));
    let mut rest = out;
    for (i, s) in scratch.iter_mut().enumerate() {
        let (chunk, r) =
            std::mem::take(&mut rest).split_at_mut((bounds[i + 1] - bounds[i]) * row_len);
        *cells[i].lock().unwrap_or_else(|e| e.into_inner()) = Some((chunk, s));
        rest = r;
    }
    crate::team::run(n, &|i| {
        let taken = cells[i].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((chunk, s)) = taken {
            f(bounds[i], bounds[i + 1], chunk, s);
        }
    });
}

/// Runs `f(i, row)` for every `row_len`-sized row of `out` (with `row_len` > 0), in up to
/// [`MAX_SPLITS`] contiguous parts on the current team; single-threaded below `min_rows` rows.
pub fn par_rows<T, F>(out: &mut [T], row_len: usize, min_rows: usize, f: &F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync,
{
    let rows = out.len() / row_len;
    let parts = (crate::team::current_threads() * 2)
        .min(rows / min_rows.max(1))
        .clamp(1, MAX_SPLITS);
    let mut bounds = [0usize; MAX_SPLITS + 1];
    for (p, b) in bounds.iter_mut().enumerate().take(parts + 1) {
        *b = rows * p / parts;
    }
    let mut units = [(); MAX_SPLITS];
    let run = |lo: usize, _hi: usize, chunk: &mut [T], _: &mut ()| {
        for (i, row) in chunk.chunks_exact_mut(row_len).enumerate() {
            f(lo + i, row);
        }
    };
    par_split(
        &mut out[..rows * row_len],
        &mut units[..parts],
        &bounds[..=parts],
        row_len,
        &run,
    );
}

/// Residual add of a product's token rows: `x[rows[j]*n + k] += src[j*n + k]` for
/// `j < rows.len()` (`src` is `[rows.len(), n]`).
pub fn add_rows(src: &[f32], n: usize, rows: &[usize], x: &mut [f32]) {
    for (&i, s) in rows.iter().zip(src.chunks_exact(n)) {
        for (a, &v) in x[i * n..(i + 1) * n].iter_mut().zip(s) {
            *a += v;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn add_rows_adds_each_product_row_to_its_stream_row() {
        let (n, batch) = (5, 3);
        let src: Vec<f32> = (0..n * batch).map(|i| i as f32).collect();
        // Rows 0, 2, 4 of a stream twice as tall.
        let idx: Vec<usize> = (0..batch).map(|j| 2 * j).collect();
        let mut x = vec![1.0; 2 * batch * n];
        super::add_rows(&src, n, &idx, &mut x);
        for (j, &i) in idx.iter().enumerate() {
            for k in 0..n {
                assert_eq!(x[i * n + k], 1.0 + src[j * n + k]);
                assert_eq!(x[(i + 1) * n + k], 1.0);
            }
        }
    }
}

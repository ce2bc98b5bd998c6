//! Criterion micro-benchmarks: one matrix-vector product per weight type (2048 × 2048, the
//! activation quantized to the type's `vec_dot_type` once, rayon over rows as in decode), and
//! the skip controller's overhead per decoded token on the default model.
//!
//! `cargo bench --bench kernels` (`FFNSKIP_BENCH_THREADS`, default 2).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use ffnskip::gguf::{GgmlType, GgufFile};
use ffnskip::model::Llama;
use ffnskip::session::{Session, SessionConfig};
use ffnskip::skip::{Controller, NoSkip, Policy, SkipController, SkipOptions, SkipParams};
use ffnskip::tensor::{act_row_bytes, matmul_group, quantize_rows, Acts, Matrix};

fn threads() -> usize {
    std::env::var("FFNSKIP_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn matvec(c: &mut Criterion) {
    let pool = ffnskip::team::Team::new(threads()).expect("thread pool");
    let n = 2048;
    // Deterministic weights in [-1, 1).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let w: Vec<f32> = (0..n * n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let x: Vec<f32> = w[..n].iter().map(|v| v * 0.5).collect();
    let mut g = c.benchmark_group("matvec_2048x2048");
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q6_K,
        GgmlType::Q5_K,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q4_1,
        GgmlType::Q4_0,
    ] {
        let data = ffnskip::ggml::quantize(ty, &w, n).expect("quantize");
        let m = Matrix::from_raw(ty, n, n, &data).expect("matrix");
        let mut act = vec![0u8; act_row_bytes(m.vec_dot_type(), n)];
        quantize_rows(m.kernels(), &x, n, &mut act);
        let mut out = vec![0f32; n];
        g.throughput(Throughput::Bytes(m.n_bytes() as u64));
        g.bench_function(BenchmarkId::from_parameter(ty.name()), |b| {
            b.iter(|| pool.install(|| matmul_group(&[(&m, Acts::rows(&act))], 1, &mut out)))
        });
    }
    g.finish();
}

fn decode_step<H: Controller>(s: &mut Session<'_, H>, t: &mut u32) {
    if s.history().len() + 1 >= s.n_ctx() {
        s.reset();
        s.prefill(&[1, 2, 3, 4]).expect("prefill");
    }
    let l = s.decode(*t).expect("decode");
    *t = ffnskip::peer::argmax(l);
}

fn controller_overhead(c: &mut Criterion) {
    let path = ffnskip::fetch::default_model().expect("default model");
    let file = GgufFile::open(&path).expect("open");
    let model = Llama::load(&file).expect("load");
    let cfg = SessionConfig::new(512, threads());
    let mut g = c.benchmark_group("decode_step_controller");
    g.sample_size(30);
    let make = |opts: SkipOptions| {
        let p = SkipParams::resolve(&opts, model.config.n_layer, None).expect("params");
        SkipController::new(p, model.layer_bytes())
    };
    let mut plain = Session::with_controller(&model, cfg, NoSkip).expect("session");
    plain.prefill(&[1, 2, 3, 4]).expect("prefill");
    let mut t = 5;
    g.bench_function("no_controller", |b| {
        b.iter(|| decode_step(&mut plain, &mut t))
    });
    let mut none =
        Session::with_controller(&model, cfg, make(SkipOptions::none())).expect("session");
    none.prefill(&[1, 2, 3, 4]).expect("prefill");
    g.bench_function("policy_none", |b| b.iter(|| decode_step(&mut none, &mut t)));
    // Adaptive that observes every FFN but never fires: the pure decision cost.
    let observing = SkipOptions {
        threshold: Some(2.0),
        warmup: Some(0),
        ratio: Some(0.25),
        ..SkipOptions::new(Policy::Adaptive)
    };
    let mut adaptive = Session::with_controller(&model, cfg, make(observing)).expect("session");
    adaptive.prefill(&[1, 2, 3, 4]).expect("prefill");
    g.bench_function("adaptive_never_firing", |b| {
        b.iter(|| decode_step(&mut adaptive, &mut t))
    });
    g.finish();
}

criterion_group!(benches, matvec, controller_overhead);
criterion_main!(benches);

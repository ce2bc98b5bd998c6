//! The device blocks (`model::device`): the same forward loop and controller with every
//! block as a ggml graph. Without a GPU they run on ggml's CPU backend and are checked
//! against our CPU path; with a GPU (a `--features cuda` build on a CUDA machine) the same
//! checks run there, plus logits against llama.cpp's CUDA backend. GPU tests print SKIPPED
//! and pass where ggml has no GPU.
//!
//! Tolerance: on ggml's CPU backend the graphs give our CPU path's bits exactly (both are
//! llama.cpp's CPU numerics). A GPU sums in its own order (matmul tiling, flash attention,
//! reductions): logits agree within `TOL` (absolute, on logits of magnitude ~10–30) and
//! greedy tokens are identical.

mod common;

use common::{catalogue_model, default_model, max_abs_diff, test_profile};
use ffnskip::ggml::graph::{Device, DeviceKind};
use ffnskip::gguf::GgufFile;
use ffnskip::model::{Batch, Llama, LoadOptions, Logits, Offload, OffloadDevice, Scratch};
use ffnskip::peer::{argmax, LlamaCpp, PeerMode};
use ffnskip::session::{Session, SessionConfig};
use ffnskip::skip::compensation::Compensation;
use ffnskip::skip::{Controller, NoSkip, Policy, SkipController, SkipOptions, SkipParams};
use ffnskip::tokenizer::Tokenizer;

const PROMPT: &str = "The history of the city begins in the early middle ages, when";
const N_GEN: usize = 16;
/// Max |Δ logit| between a device and our CPU path, or llama.cpp on the same device.
const TOL: f32 = 0.05;

/// Exact batches: our CPU path then gives llama.cpp's CPU bits for prompts as well, which
/// ggml's CPU backend running the device graphs reproduces exactly.
fn config() -> SessionConfig {
    SessionConfig {
        exact_batches: true,
        ..SessionConfig::new(256, 2)
    }
}

/// What a device must match our CPU path within: exactly on ggml's CPU backend.
fn tolerance(device: OffloadDevice) -> f32 {
    match device {
        OffloadDevice::GgmlCpu => 0.0,
        OffloadDevice::Gpu => TOL,
    }
}

fn load(file: &GgufFile, layers: usize, device: OffloadDevice) -> Llama<'_> {
    Llama::load_with(
        file,
        LoadOptions {
            offload: Some(Offload { layers, device }),
            device_threads: 2,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

/// The device `device` stands for, or `None` after a loud SKIPPED for `test`.
fn present(device: OffloadDevice, test: &str) -> Option<OffloadDevice> {
    let kind = match device {
        OffloadDevice::Gpu => DeviceKind::Gpu,
        OffloadDevice::GgmlCpu => DeviceKind::Cpu,
    };
    if Device::first(kind).is_some() {
        return Some(device);
    }
    eprintln!(
        "SKIPPED {test}: ggml has no {kind:?} device (a GPU needs a --features cuda build on a \
         CUDA machine: scripts/build-cuda.sh, docs/CUDA.md)"
    );
    None
}

fn prompt(file: &GgufFile) -> Vec<u32> {
    Tokenizer::from_gguf(file)
        .unwrap()
        .encode(PROMPT, true, false)
}

/// Prefill, then `n` greedy steps: the tokens and every step's logits (prefill's first).
fn greedy<H: Controller>(s: &mut Session<'_, H>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let first = s.prefill(prompt).unwrap().to_vec();
    let mut t = argmax(&first);
    let (mut toks, mut all) = (vec![t], first);
    for _ in 0..n {
        let l = s.decode(t).unwrap();
        t = argmax(l);
        all.extend_from_slice(l);
        toks.push(t);
    }
    (toks, all)
}

fn controller(model: &Llama, policy: Policy, compensate: Compensation) -> SkipController {
    let o = SkipOptions {
        ratio: Some(0.25),
        warmup: Some(3),
        seed: 3,
        compensate,
        ..SkipOptions::new(policy)
    };
    let n = model.config.n_layer;
    let profile = test_profile(n);
    let params = SkipParams::resolve(&o, n, Some((&profile, "test profile"))).unwrap();
    let mut c = SkipController::new(params, model.layer_bytes());
    c.record_decisions(true);
    c
}

/// The check `$check` as two tests: on ggml's CPU backend, and on the GPU (SKIPPED without).
macro_rules! on_both_devices {
    ($check:ident: $cpu:ident, $gpu:ident) => {
        #[test]
        fn $cpu() {
            $check(OffloadDevice::GgmlCpu, stringify!($cpu));
        }

        #[test]
        fn $gpu() {
            $check(OffloadDevice::Gpu, stringify!($gpu));
        }
    };
}

fn matches_the_cpu_path(device: OffloadDevice, test: &str) {
    let Some(device) = present(device, test) else {
        return;
    };
    let file = GgufFile::open(default_model()).unwrap();
    let cpu = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    let (want, want_logits) = greedy(&mut Session::new(&cpu, config()).unwrap(), &ids, N_GEN);
    let n = cpu.config.n_layer;
    // Every layer, and the last 10 (the first 20 on the CPU, the stream moving over).
    for layers in [n, 10] {
        let dev = load(&file, layers, device);
        assert_eq!(dev.device.as_ref().unwrap().first_layer(), n - layers);
        let (got, got_logits) = greedy(&mut Session::new(&dev, config()).unwrap(), &ids, N_GEN);
        let diff = max_abs_diff(&want_logits, &got_logits);
        eprintln!("{test}: {layers} layers offloaded, max |Δ logit| {diff}");
        assert_eq!(got, want, "{layers} layers: greedy tokens differ");
        let tol = tolerance(device);
        assert!(diff <= tol, "{layers} layers: max |Δ logit| {diff} > {tol}");
    }
}

fn none_equals_no_controller(device: OffloadDevice, test: &str) {
    let Some(device) = present(device, test) else {
        return;
    };
    let file = GgufFile::open(default_model()).unwrap();
    let dev = load(&file, usize::MAX, device);
    let ids = prompt(&file);
    let (a, la) = greedy(&mut Session::new(&dev, config()).unwrap(), &ids, N_GEN);
    let c = controller(&dev, Policy::None, Compensation::None);
    let mut s = Session::with_controller(&dev, config(), c).unwrap();
    let (b, lb) = greedy(&mut s, &ids, N_GEN);
    assert_eq!(a, b);
    assert!(la == lb, "skip none: max |Δ| {}", max_abs_diff(&la, &lb));
    assert_eq!(s.controller.stats.skipped_ffn, 0);
}

/// Every policy runs on the device. Policies planned ahead of the cosines make the CPU
/// path's decisions; the adaptive ones read device cosines (f32 sums, not f64) and skip
/// at the CPU path's ratio within 5 points.
fn every_policy_runs(device: OffloadDevice, test: &str) {
    let Some(device) = present(device, test) else {
        return;
    };
    let file = GgufFile::open(default_model()).unwrap();
    let cpu = Llama::load(&file).unwrap();
    let dev = load(&file, usize::MAX, device);
    let ids = prompt(&file);
    let cases = Policy::ALL.iter().map(|&p| (p, Compensation::None)).chain([
        (Policy::Adaptive, Compensation::Lowrank),
        (Policy::Placed, Compensation::Mean),
    ]);
    for (policy, comp) in cases {
        let run = |m: &Llama| {
            let mut s = Session::with_controller(m, config(), controller(m, policy, comp)).unwrap();
            let (toks, _) = greedy(&mut s, &ids, 24);
            (toks, s.controller.stats.clone())
        };
        let (_, want) = run(&cpu);
        let (_, got) = run(&dev);
        let name = format!("{policy:?}{}", comp.suffix());
        eprintln!(
            "{test}: {name}: skip ratio {:.3} on the device, {:.3} on the CPU",
            got.ratio(),
            want.ratio()
        );
        if policy != Policy::None {
            assert!(got.skipped_ffn > 0, "{name} skipped nothing on the device");
        }
        if policy.is_adaptive() {
            assert!((got.ratio() - want.ratio()).abs() <= 0.05, "{name}");
        } else {
            assert_eq!(got.decisions, want.decisions, "{name}");
        }
    }
}

/// Two sequences decoded as rows of one batch (each with its own cache) give, within
/// `TOL`, the logits each gets alone, and the same greedy tokens.
fn batched_equals_sequential(device: OffloadDevice, test: &str) {
    let Some(device) = present(device, test) else {
        return;
    };
    let file = GgufFile::open(default_model()).unwrap();
    let dev = load(&file, usize::MAX, device);
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let prompts = [
        tok.encode(PROMPT, true, false),
        tok.encode("Once upon a time there was a little", true, false),
    ];
    let nv = dev.config.n_vocab;
    // Alone: each prompt in its own cache, then greedy steps.
    let mut alone = Vec::new();
    for p in &prompts {
        let mut s = Session::new(&dev, config()).unwrap();
        alone.push(greedy(&mut s, p, 8));
    }
    // Together: prompts one after the other, then both sequences' steps as one batch.
    let mut caches = vec![dev.new_cache(256), dev.new_cache(256)];
    let mut scratch = Scratch::new(&dev, 64, 256);
    let mut next = Vec::new();
    for (q, p) in prompts.iter().enumerate() {
        let seqs = vec![q; p.len()];
        let batch = Batch {
            tokens: p,
            prompt: true,
            logits: Logits::Last,
        };
        let l = dev
            .forward_seqs(&mut caches, &seqs, &mut scratch, &batch, &mut NoSkip)
            .unwrap();
        next.push(argmax(l));
    }
    let mut together = [vec![next[0]], vec![next[1]]];
    for step in 0..8 {
        let toks = [together[0][step], together[1][step]];
        let batch = Batch {
            tokens: &toks,
            prompt: false,
            logits: Logits::All,
        };
        let l = dev
            .forward_seqs(&mut caches, &[0, 1], &mut scratch, &batch, &mut NoSkip)
            .unwrap()
            .to_vec();
        for q in 0..2 {
            let row = &l[q * nv..(q + 1) * nv];
            let want = &alone[q].1[(step + 1) * nv..(step + 2) * nv];
            let diff = max_abs_diff(row, want);
            let tol = tolerance(device);
            assert!(
                diff <= tol,
                "sequence {q} step {step}: max |Δ| {diff} > {tol}"
            );
            together[q].push(argmax(row));
        }
    }
    for q in 0..2 {
        assert_eq!(together[q], alone[q].0, "sequence {q}");
    }
}

on_both_devices!(matches_the_cpu_path: ggml_cpu_device_matches_the_cpu_path, gpu_matches_the_cpu_path);

on_both_devices!(none_equals_no_controller: ggml_cpu_device_skip_none_equals_no_controller, gpu_skip_none_equals_no_controller);

on_both_devices!(every_policy_runs: ggml_cpu_device_runs_every_policy, gpu_runs_every_policy);

on_both_devices!(batched_equals_sequential: ggml_cpu_device_batched_equals_sequential, gpu_batched_equals_sequential);

/// All layers on the GPU against llama.cpp with all layers on its CUDA backend, on the
/// default model and Qwen2.5-Coder-1.5B: prompt logits within `TOL`, same greedy tokens.
#[test]
fn gpu_logits_match_llama_cpp_cuda() {
    let test = "gpu_logits_match_llama_cpp_cuda";
    if present(OffloadDevice::Gpu, test).is_none() {
        return;
    }
    for path in [default_model(), catalogue_model("qwen2.5-coder-1.5b")] {
        let file = GgufFile::open(&path).unwrap();
        let dev = load(&file, usize::MAX, OffloadDevice::Gpu);
        let ids = prompt(&file);
        let (ours, ours_logits) = greedy(&mut Session::new(&dev, config()).unwrap(), &ids, N_GEN);
        let peer = LlamaCpp::load_gpu(&path).unwrap();
        let mut ctx = peer.context(256, 2, PeerMode::Default).unwrap();
        let nv = dev.config.n_vocab;
        let mut theirs = Vec::new();
        let mut t = ids.clone();
        for step in 0..=N_GEN {
            let l = ctx.eval(&t, false).unwrap();
            let last = &l[0];
            let diff = max_abs_diff(last, &ours_logits[step * nv..(step + 1) * nv]);
            eprintln!(
                "{test}: {} step {step}: max |Δ logit| {diff}",
                path.display()
            );
            assert!(
                diff <= TOL,
                "{}: step {step}: max |Δ| {diff}",
                path.display()
            );
            let next = argmax(last);
            theirs.push(next);
            t = vec![next];
        }
        assert_eq!(ours, theirs, "{}", path.display());
    }
}

//! The `ffnskip` binary end to end on the default model.

mod common;

use std::process::Command;

fn ffnskip(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ffnskip"))
        .args(args)
        .output()
        .expect("run ffnskip")
}

#[test]
fn generate_json_is_one_object_with_greedy_tokens_of_llama_cpp() {
    let model = common::default_model();
    let m = model.to_str().expect("utf-8 path");
    let out = ffnskip(&[
        "generate",
        "-m",
        m,
        "-p",
        "The capital of France is",
        "-n",
        "12",
        "--temp",
        "0",
        "-t",
        "2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "exactly one JSON line: {stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    for key in [
        "model",
        "prompt_tokens",
        "tokens",
        "text",
        "timings",
        "stop_reason",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    for key in ["load_ms", "prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(
            v["timings"][key].as_f64().is_some_and(|x| x > 0.0),
            "timings.{key} in {v}"
        );
    }
    assert_eq!(v["prompt_tokens"], 5);
    assert_eq!(v["stop_reason"], "max_tokens");
    let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).expect("ids");
    // llama.cpp's greedy continuation of the same prompt.
    let peer = ffnskip::peer::LlamaCpp::load(&model).expect("llama.cpp");
    let ids = peer.tokenize("The capital of France is", true, true);
    let mut ctx = peer
        .context(256, 2, ffnskip::peer::PeerMode::Reference { ubatch: 1 })
        .expect("ctx");
    let want = ctx.greedy(&ids, 12, |_| false).expect("greedy");
    assert_eq!(tokens, want);
    assert_eq!(
        v["text"].as_str().expect("text"),
        String::from_utf8_lossy(&peer.detokenize(&want))
    );
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let model = common::default_model();
    let out = ffnskip(&[
        "generate",
        "-m",
        model.to_str().expect("path"),
        "-p",
        "Once upon a time",
        "-n",
        "8",
        "--temp",
        "0",
    ]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("generated at") && err.contains("tok/s"),
        "{err}"
    );
}

#[test]
fn inspect_reports_hyperparameters_quant_mix_tokenizer_and_simd() {
    let model = common::default_model();
    let out = ffnskip(&["inspect", model.to_str().expect("path")]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for want in [
        "architecture llama",
        "layers       30",
        "embedding    576  ffn 1536",
        "heads        9 (kv 3, GQA 3×), head dim 64",
        "rope         base 100000",
        "vocabulary   49152",
        "tied to token_embd.weight",
        "gpt2 byte-level BPE (gpt2), pre-tokenizer 'smollm', 49152 tokens",
        "chat         template present",
        "q4_1",
        "q8_0",
        "blk.29.ffn_down.weight",
        "kernels      ggml CPU:",
    ] {
        assert!(s.contains(want), "inspect output lacks {want:?}:\n{s}");
    }
    #[cfg(target_arch = "x86_64")]
    assert!(s.contains("AVX2"), "{s}");
    #[cfg(not(feature = "cuda"))]
    assert!(
        s.contains(
            "devices      CPU (CPU); CPU-only build (-ngl needs --features cuda: docs/CUDA.md)"
        ),
        "{s}"
    );
}

/// `-ngl N` (llama.cpp's spelling) without a GPU: an error that names the flag, the devices
/// ggml has and the build that offloads; nothing runs.
#[cfg(not(feature = "cuda"))]
#[test]
fn ngl_without_a_gpu_is_a_clear_error() {
    let model = common::default_model();
    let m = model.to_str().expect("path");
    for flag in [&["-ngl", "99"][..], &["-ngl=99"], &["--n-gpu-layers", "99"]] {
        let mut args = vec!["generate", "-m", m, "-p", "Hi", "-n", "2"];
        args.extend_from_slice(flag);
        let out = ffnskip(&args);
        assert!(!out.status.success(), "{flag:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "{}: cannot offload to the device: -ngl 99: ggml has no such device (it has: \
                 CPU (CPU)); offloading to a GPU needs a build with --features cuda \
                 (scripts/build-cuda.sh)",
                model.display()
            )),
            "{flag:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{flag:?}");
    }
}

#[test]
fn tokenize_prints_llama_cpp_ids_as_json() {
    let model = common::default_model();
    let text = "Hello world! <|im_start|>user";
    let out = ffnskip(&["tokenize", "-m", model.to_str().expect("path"), "-p", text]);
    assert!(out.status.success());
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).expect("json array");
    let peer = ffnskip::peer::LlamaCpp::load_vocab(&model).expect("vocab");
    assert_eq!(ids, peer.tokenize(text, true, true));
}

#[test]
fn bad_inputs_fail_with_messages_not_panics() {
    let out = ffnskip(&["generate", "-m", "/nonexistent/model.gguf", "-p", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "error: -m/--model /nonexistent/model.gguf: no such file"
    );
    let dir = std::env::temp_dir().join(format!("ffnskip-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00").expect("write");
    let out = ffnskip(&["inspect", bad.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "bad.gguf: truncated file: tensor count at offset 8 needs 8 bytes, only 0 remain"
        ),
        "{err}"
    );
    let out = ffnskip(&["generate", "-p", "x", "--top-p", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top-p"));
    let out = ffnskip(&["generate"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no prompt"));
    let _ = std::fs::remove_dir_all(dir);
}

/// `generate --skip adaptive --json` reports the skip statistics, and says on stderr which
/// parameters it used (no profile in the default model: the paper's defaults).
#[test]
fn generate_with_adaptive_skip_reports_statistics() {
    let model = common::default_model();
    let m = model.to_str().expect("utf-8 path");
    let out = ffnskip(&[
        "generate",
        "-m",
        m,
        "-p",
        "The capital of France is",
        "-n",
        "20",
        "--temp",
        "0",
        "-t",
        "2",
        "--json",
        "--skip",
        "adaptive",
        "--skip-ratio",
        "0.3",
        "--warmup",
        "4",
        "--skip-trace",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("skip: adaptive at target 30%") && stderr.contains("paper defaults"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let s = &v["skip"];
    assert_eq!(s["policy"], "adaptive");
    let (skipped, eligible) = (
        s["skipped_ffn"].as_u64().unwrap(),
        s["eligible_ffn"].as_u64().unwrap(),
    );
    // 20 tokens: the first comes from the prefill, 19 decode steps, 4 warm-up → 15 × 30.
    assert_eq!(eligible, 15 * 30);
    assert!(skipped > 0);
    let ratio = s["ffn_skip_ratio"].as_f64().unwrap();
    assert!((ratio - skipped as f64 / eligible as f64).abs() < 1e-12);
    let per_layer: Vec<u64> = serde_json::from_value(s["per_layer"].clone()).unwrap();
    assert_eq!(per_layer.len(), 30);
    assert_eq!(per_layer.iter().sum::<u64>(), skipped);
    assert!(s["bytes_skipped"].as_u64().unwrap() > 0);
    assert_eq!(s["decisions"].as_array().unwrap().len(), 15);
}

#[test]
fn skip_flag_errors_are_clear() {
    let model = common::default_model();
    let m = model.to_str().expect("utf-8 path");
    let out = ffnskip(&["generate", "-m", m, "-p", "hi", "--skip", "shortgpt"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--skip shortgpt ranks layers by Block Influence and needs a calibration profile"
        ),
        "{stderr}"
    );
    let out = ffnskip(&[
        "generate",
        "-m",
        m,
        "-p",
        "hi",
        "--skip",
        "adaptive",
        "--cold-start",
        "20",
        "--cold-end",
        "20",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: --cold-start 20 + --cold-end 20 exceed the model's 30 layers"
    );
    let out = ffnskip(&[
        "generate",
        "-m",
        m,
        "-p",
        "hi",
        "--skip",
        "adaptive",
        "--skip-profile",
        "/nonexistent.json",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read skip profile /nonexistent.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ffnskip(&["bench", "-m", m, "--skip", "adaptive:2"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: --skip adaptive:2: ratio '2' is not a number in 0..1"
    );
    // `auto` (alias `best`) needs a profile with the low-rank compensation.
    for name in ["auto", "best"] {
        let out = ffnskip(&["generate", "-m", m, "-p", "hi", "--skip", name]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && stderr.contains(
                    "error: --skip auto adds the calibrated low-rank FFN estimate (ffn_lowrank, \
                     from this version) and needs a calibration profile: run `ffnskip calibrate"
                ),
            "{stderr}"
        );
    }
    let out = ffnskip(&[
        "generate",
        "-m",
        m,
        "-p",
        "hi",
        "--skip",
        "adaptive",
        "--compensate",
        "median",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'median' for '--compensate [<COMPENSATE>]': 'median' is not one of none, mean, lowrank"),
        "{stderr}"
    );
}

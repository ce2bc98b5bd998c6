//! `ffnskip quantize` on the default model (SmolLM2-135M Q4_1: 30 layers, n_embd 576, which is
//! not a multiple of 256, n_ff 1536, tied embeddings): per-tensor types against llama.cpp's
//! rules, the output against llama.cpp's own quantizer (`llama_model_quantize`, same tensor
//! types and the same bytes), logits of ffnskip and llama.cpp on our quantized files, an F32
//! source (stories260K, whose FFN rows of 172 need the F16 fallback), and the error messages.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{default_model, temp_path, TempFile};
use ffnskip::convert::quantize::{quantize_file, Plan, Target};
use ffnskip::gguf::{GgmlType, GgufFile, Value};
use ffnskip::model::Llama;
use ffnskip::peer::{argmax, LlamaCpp, PeerMode};
use ffnskip::session::{Session, SessionConfig};

use GgmlType::*;

const PROMPT: &str = "The history of the city begins in the early middle ages, when a small \
                      group of monks built a church beside the river crossing.";
const N_TOKENS: usize = 16;
/// Top-2 margin (logits) below which llama.cpp's own choice depends on its batch shape
/// (as in tests/llama_parity.rs).
const TIE: f32 = 1.0;

/// llama.cpp's `use_more_bits` (llama-quant.cpp), restated for the expectations.
fn more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type llama.cpp gives each tensor of the default model for `target`, written out by
/// hand from llama-quant.cpp for this model's shapes (rows of 576 except ffn_down's 1536).
fn expected_type(target: Target, name: &str, from: GgmlType) -> GgmlType {
    if name.ends_with("_norm.weight") {
        return from; // 1-D: never quantized
    }
    let layer: Option<i64> = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok());
    match target {
        Target::F16 => F16,
        // Tied output head: Q6_K for 32-block targets, which 576 cannot take → Q8_0;
        // 256-block targets go to Q8_0 directly.
        _ if name == "token_embd.weight" => Q8_0,
        Target::Q8_0 => Q8_0,
        Target::Q4_0 => Q4_0,
        Target::Q4_1 => Q4_1,
        Target::Q5_0 => Q5_0,
        Target::Q6_K => {
            if name.contains("ffn_down") {
                Q6_K
            } else {
                Q8_0 // 576-wide rows: Q6_K → Q8_0 fallback
            }
        }
        Target::Q4_K_M | Target::Q5_K_M => {
            let base = if target == Target::Q4_K_M { Q4_K } else { Q5_K };
            let small = if target == Target::Q4_K_M { Q5_0 } else { Q5_1 };
            let l = layer.expect("layer tensor");
            if name.contains("ffn_down") {
                if more_bits(l, 30) {
                    Q6_K
                } else {
                    base
                }
            } else if name.contains("attn_v") && more_bits(l, 30) {
                Q8_0 // Q6_K → Q8_0 fallback
            } else {
                small
            }
        }
    }
}

fn types_of(f: &GgufFile) -> BTreeMap<String, GgmlType> {
    f.tensors().iter().map(|t| (t.name.clone(), t.ty)).collect()
}

#[test]
fn every_target_follows_llama_cpp_type_rules_on_the_default_model() {
    let path = default_model();
    let file = GgufFile::open(&path).expect("open");
    for target in Target::ALL {
        let plan = Plan::new(&file, target).expect("plan");
        assert_eq!(plan.tensors.len(), file.tensors().len());
        for t in &plan.tensors {
            assert_eq!(
                t.to,
                expected_type(target, &t.name, t.from),
                "{target}: tensor {}",
                t.name
            );
        }
        let fallbacks = plan.n_fallback();
        let expected_fallbacks = match target {
            Target::Q8_0 | Target::F16 => 0,
            // token_embd: Q6_K → Q8_0
            Target::Q4_0 | Target::Q4_1 | Target::Q5_0 => 1,
            // every 576-wide matrix but token_embd (which goes to Q8_0 before the fallback)
            Target::Q6_K | Target::Q4_K_M | Target::Q5_K_M => 180,
        };
        assert_eq!(fallbacks, expected_fallbacks, "{target}: fallbacks");
        eprintln!(
            "{target}: {:?}, {fallbacks} fallbacks",
            plan.types()
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect::<Vec<_>>()
        );
    }
}

/// Initialises llama.cpp's backend (with its logs silenced unless FFNSKIP_LLAMA_LOG is set)
/// by loading the default model's vocabulary through the peer.
fn init_llama_cpp() {
    LlamaCpp::load_vocab(&default_model()).expect("llama.cpp backend");
}

/// llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs) with default
/// parameters, requantization allowed.
fn llama_cpp_quantize(input: &Path, output: &Path, ftype: u32) {
    init_llama_cpp();
    let c = |p: &Path| std::ffi::CString::new(p.to_str().expect("utf-8 path")).expect("no NUL");
    let (inp, out) = (c(input), c(output));
    // SAFETY: returns a plain struct by value.
    let mut params = unsafe { llama_cpp_sys_2::llama_model_quantize_default_params() };
    params.ftype = ftype;
    params.allow_requantize = true;
    params.nthread = 2;
    // SAFETY: both paths are NUL-terminated strings that outlive the call; params is a valid
    // struct from llama_model_quantize_default_params with only plain fields changed (all its
    // pointers stay null).
    let rc = unsafe { llama_cpp_sys_2::llama_model_quantize(inp.as_ptr(), out.as_ptr(), &params) };
    assert_eq!(rc, 0, "llama_model_quantize failed for ftype {ftype}");
}

/// Quantizes `input` with ffnskip and llama.cpp for each target and compares the files:
/// same tensor types, bytes per tensor and metadata, then the whole file.
fn compare_with_llama_cpp(input: &Path, targets: &[Target], tag: &str) {
    for &target in targets {
        let ours = TempFile(temp_path(tag, &format!("ours-{target}.gguf")));
        let theirs = TempFile(temp_path(tag, &format!("llama-{target}.gguf")));
        let t0 = std::time::Instant::now();
        quantize_file(input, &ours.0, target).expect("ffnskip quantize");
        let t_ours = t0.elapsed();
        let t0 = std::time::Instant::now();
        llama_cpp_quantize(input, &theirs.0, target.ftype());
        let t_theirs = t0.elapsed();
        let (a, b) = (
            GgufFile::open(&ours.0).expect("ours opens"),
            GgufFile::open(&theirs.0).expect("llama.cpp's opens"),
        );
        assert_eq!(
            types_of(&a),
            types_of(&b),
            "{target}: tensor types differ from llama.cpp's quantizer"
        );
        for t in b.tensors() {
            let mine = a.tensor_info(&t.name).expect("same tensors");
            assert!(
                a.tensor_data(mine) == b.tensor_data(t),
                "{target}: tensor {} ({}) has different bytes than llama.cpp's",
                t.name,
                t.ty
            );
        }
        assert_eq!(
            a.metadata(),
            b.metadata(),
            "{target}: metadata differs from llama.cpp's"
        );
        let same_file =
            std::fs::read(&ours.0).expect("read") == std::fs::read(&theirs.0).expect("read");
        eprintln!(
            "{tag} {target}: {} tensors, types and data identical to llama.cpp's quantizer; whole file identical: {same_file} \
             (ffnskip {:.2} s, llama.cpp {:.2} s)",
            b.tensors().len(),
            t_ours.as_secs_f64(),
            t_theirs.as_secs_f64()
        );
        assert!(
            same_file,
            "{target}: files differ outside tensor data and metadata"
        );
    }
}

#[test]
fn output_is_byte_identical_to_llama_cpp_quantizer() {
    compare_with_llama_cpp(&default_model(), &Target::ALL, "qbytes");
}

/// qwen2 (Qwen2.5-Coder-0.5B: tied embeddings, Q/K/V biases, n_embd 896 = 3.5 × 256 so the
/// K-quants fall back on some rows): the same bytes as llama.cpp's quantizer.
#[test]
fn qwen2_output_is_byte_identical_to_llama_cpp_quantizer() {
    let q = common::catalogue_model("qwen2.5-coder-0.5b");
    let targets = ["q8_0", "q4_k", "q4_0"].map(|t| Target::parse(t).unwrap());
    compare_with_llama_cpp(&q, &targets, "qbytes-qwen2");
}

#[test]
fn f32_source_with_f16_fallback_is_byte_identical_to_llama_cpp_quantizer() {
    let Some(shared) = common::shared("f32_source_with_f16_fallback") else {
        return;
    };
    let dir = shared.join("models/tinyllamas");
    let gguf = TempFile(temp_path("qs260k", "stories260K.gguf"));
    ffnskip::convert::convert_llama2c(
        &dir.join("stories260K.bin"),
        &dir.join("tok512.bin"),
        &gguf.0,
    )
    .expect("convert stories260K");
    let f = GgufFile::open(&gguf.0).expect("open");
    let plan = Plan::new(&f, Target::Q8_0).expect("plan");
    // dim 64, hidden 172: ffn_down rows (172) fit no 32-block type → F16, as llama.cpp does.
    let down: Vec<_> = plan
        .tensors
        .iter()
        .filter(|t| t.name.contains("ffn_down"))
        .collect();
    assert_eq!(down.len(), 5, "one ffn_down per layer");
    for t in down {
        assert_eq!((t.shape[0], t.to, t.fell_back_from), (172, F16, Some(Q8_0)));
    }
    assert_eq!(plan.n_fallback(), 5);
    assert!(
        plan.requantized().is_empty(),
        "F32 source is not requantized"
    );
    compare_with_llama_cpp(
        &gguf.0,
        &[Target::Q8_0, Target::Q4_K_M, Target::F16],
        "qs260k",
    );
}

/// ffnskip's and llama.cpp's logits at every position of the prompt on `path`.
fn logits_parity(path: &Path, label: &str) -> (f32, usize, usize) {
    let peer = LlamaCpp::load(path).expect("llama.cpp loads our quantized file");
    let ids: Vec<u32> = peer.tokenize(PROMPT, true, true)[..N_TOKENS].to_vec();
    let mut pc = peer
        .context(64, 2, PeerMode::Reference { ubatch: 1 })
        .expect("context");
    let theirs = pc.eval(&ids, true).expect("eval");
    let file = GgufFile::open(path).expect("open");
    let model = Llama::load(&file).expect("ffnskip loads our quantized file");
    let n_vocab = model.config.n_vocab;
    // Exact batches: llama.cpp here runs one token per ubatch.
    let config = SessionConfig {
        exact_batches: true,
        ..SessionConfig::new(64, 2)
    };
    let mut s = Session::new(&model, config).expect("session");
    let ours = s.eval_all(&ids, true).expect("forward");
    let (mut worst, mut same, mut ties) = (0f32, 0, 0);
    for (i, t) in theirs.iter().enumerate() {
        let o = &ours[i * n_vocab..(i + 1) * n_vocab];
        let (a, b) = (argmax(o), argmax(t));
        if a == b {
            same += 1;
        } else {
            assert!(
                t[b as usize] - t[a as usize] < TIE,
                "{label}: top-1 differs at position {i}: ours {a}, llama.cpp {b}, {} apart",
                t[b as usize] - t[a as usize]
            );
            ties += 1;
        }
        worst = worst.max(common::max_abs_diff(o, t));
    }
    eprintln!(
        "{label}: {N_TOKENS} positions, top-1 identical at {same} ({ties} near-ties); max |Δlogit| ffnskip vs llama.cpp = {worst:.4}"
    );
    assert!(worst < 2.0, "{label}: max |Δlogit| {worst}");
    (worst, same, ties)
}

#[test]
fn q8_0_and_q4_0_load_in_both_engines_with_matching_logits() {
    let input = default_model();
    let src = GgufFile::open(&input).expect("open");
    for target in [Target::Q8_0, Target::Q4_0] {
        let out = TempFile(temp_path("qlogits", &format!("{target}.gguf")));
        let (plan, report) = quantize_file(&input, &out.0, target).expect("quantize");
        let f = GgufFile::open(&out.0).expect("output opens");
        assert_eq!(report.out_file_bytes, f.file_size());
        // Types: norms F32, tied token_embd Q8_0, every other matrix the target type.
        for t in f.tensors() {
            let want = if t.shape.len() == 1 {
                F32
            } else if t.name == "token_embd.weight" {
                Q8_0
            } else {
                target.default_type()
            };
            assert_eq!(t.ty, want, "{target}: tensor {}", t.name);
        }
        assert_eq!(plan.requantized(), BTreeMap::from([(Q4_1, 210)]));
        // Metadata: every input key kept with its value, except the two llama.cpp sets.
        assert_eq!(
            f.get("general.file_type"),
            Some(&Value::U32(target.ftype()))
        );
        assert_eq!(f.get("general.quantization_version"), Some(&Value::U32(2)));
        assert_eq!(f.metadata().len(), src.metadata().len());
        for (k, v) in src.metadata() {
            if k != "general.file_type" {
                assert_eq!(f.get(k), Some(v), "{target}: metadata key {k}");
            }
        }
        drop(f);
        let (worst, _, _) = logits_parity(&out.0, &format!("{target}"));
        // Both engines run the same kernels (Q4_0 repacked at load into ggml's interleaved
        // layout, its GEMM/GEMV; Q8_0 through tinyBLAS/vec_dot), batched here against
        // llama.cpp one token at a time: identical to the bit.
        assert_eq!(worst, 0.0, "{target} logits differ from llama.cpp's");
    }
}

#[test]
fn errors_name_the_problem() {
    let msg = |r: anyhow::Result<Target>| format!("{:#}", r.expect_err("must fail"));
    assert_eq!(
        msg(Target::parse("q3_k")),
        "unsupported --type 'q3_k'; supported types: q8_0, q6_k, q5_k (= q5_k_m), q5_0, q4_k (= q4_k_m), q4_1, q4_0, f16"
    );
    assert_eq!(
        msg(Target::parse("int4")),
        "unsupported --type 'int4'; supported types: q8_0, q6_k, q5_k (= q5_k_m), q5_0, q4_k (= q4_k_m), q4_1, q4_0, f16"
    );
    assert_eq!(
        msg(Target::parse("IQ2_XXS")),
        "--type IQ2_XXS: iq2_xxs needs an importance matrix (imatrix), which ffnskip quantize does not compute; \
         supported types: q8_0, q6_k, q5_k (= q5_k_m), q5_0, q4_k (= q4_k_m), q4_1, q4_0, f16"
    );

    let input = default_model();
    let err = quantize_file(&input, &input, Target::Q8_0).expect_err("OUT == IN");
    assert_eq!(
        format!("{err:#}"),
        format!(
            "refusing to write OUT {0}: it is the input IN {0}; choose another output path",
            input.display()
        )
    );
    // The same file through another spelling of its path.
    let dir = input.parent().expect("dir");
    let other = dir.join(".").join(input.file_name().expect("name"));
    let err = quantize_file(&input, &other, Target::Q8_0).expect_err("OUT == IN");
    assert!(format!("{err:#}").ends_with("; choose another output path"));

    let missing = temp_path("qerr", "missing.gguf");
    let out = TempFile(temp_path("qerr", "out.gguf"));
    let err = quantize_file(&missing, &out.0, Target::Q8_0).expect_err("missing input");
    assert_eq!(
        format!("{err:#}"),
        format!("input file {} does not exist", missing.display())
    );
    assert!(!out.0.exists());
}

#[test]
fn cli_quantize_prints_warning_fallbacks_and_summary() {
    let input = default_model();
    let out = TempFile(temp_path("qcli", "q4_0.gguf"));
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ffnskip"))
            .args(args)
            .output()
            .expect("run ffnskip")
    };
    let i = input.to_str().expect("utf-8");
    let o = out.0.to_str().expect("utf-8");
    let r = run(&["quantize", i, o, "--type", "q4_0", "-t", "2"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(
        stderr.contains("is already quantized (input types: 210 q4_1)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fallback: 1 of 272 tensors need a smaller-block type, as llama.cpp does: 1 q6_K → q8_0 (row length 576 is not a multiple of 256)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("as q4_0 (general.file_type 2)")
            && stderr.contains("272 tensors: 61 f32, 210 q4_0, 1 q8_0; 1 fell back"),
        "{stderr}"
    );
    assert!(GgufFile::open(&out.0).is_ok());

    let r = run(&["quantize", i, o, "--type", "q2_k"]);
    assert!(!r.status.success());
    assert_eq!(
        String::from_utf8_lossy(&r.stderr).trim(),
        "error: unsupported --type 'q2_k'; supported types: q8_0, q6_k, q5_k (= q5_k_m), q5_0, q4_k (= q4_k_m), q4_1, q4_0, f16"
    );
}

/// A tiny `llama`-looking file with one F32 matrix (rows of 32) and a norm.
fn tiny_gguf(arch: &str, matrix: &[f32]) -> TempFile {
    let mut w = ffnskip::gguf::GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    w.set(&format!("{arch}.block_count"), Value::U32(1));
    let bytes: Vec<u8> = matrix.iter().flat_map(|x| x.to_le_bytes()).collect();
    w.add_tensor(
        "blk.0.attn_q.weight",
        F32,
        &[32, matrix.len() as u64 / 32],
        bytes,
    )
    .expect("tensor");
    w.add_tensor("blk.0.attn_norm.weight", F32, &[32], vec![0u8; 128])
        .expect("tensor");
    let f = TempFile(temp_path("qbad", "tiny.gguf"));
    w.write_file(&f.0).expect("write");
    f
}

#[test]
fn bad_input_is_refused_naming_file_tensor_and_expectation() {
    let mut m: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
    let out = TempFile(temp_path("qbad", "out.gguf"));

    let ok = tiny_gguf("llama", &m);
    let (plan, _) = quantize_file(&ok.0, &out.0, Target::Q4_0).expect("tiny file quantizes");
    assert_eq!(
        plan.types(),
        BTreeMap::from([(F32, 1), (Q4_0, 1)]),
        "norm stays F32, the matrix becomes Q4_0"
    );

    m[32 + 3] = f32::NAN;
    let nan = tiny_gguf("llama", &m);
    let err = quantize_file(&nan.0, &out.0, Target::Q8_0).expect_err("NaN weight");
    assert_eq!(
        format!("{err:#}"),
        format!(
            "{}: tensor 'blk.0.attn_q.weight' (f32 [32, 2] → q8_0): row 1 holds NaN at column 3; expected finite weights",
            nan.0.display()
        )
    );

    let gpt2 = tiny_gguf("gpt2", &m);
    let err = quantize_file(&gpt2.0, &out.0, Target::Q8_0).expect_err("not llama");
    assert_eq!(
        format!("{err:#}"),
        format!(
            "{}: general.architecture is 'gpt2'; ffnskip quantize mirrors llama.cpp's type rules for 'llama' and 'qwen2' models only",
            gpt2.0.display()
        )
    );
    // A failed run leaves no temporary file behind, and the earlier output untouched.
    let name = out
        .0
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let left: Vec<_> = std::fs::read_dir(out.0.parent().expect("dir"))
        .expect("temp dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&name) && *n != name)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

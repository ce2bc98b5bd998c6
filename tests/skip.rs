//! FFN skipping on the default model (SmolLM2-135M, 30 layers): the controller's contract,
//! each policy's rules, the statistics, batched == sequential, and calibration profiles.

mod common;

use common::{default_model, shared, temp_path, test_profile, TempFile};
use ffnskip::convert::convert_llama2c;
use ffnskip::gguf::GgufFile;
use ffnskip::measure::calibrate::calibrate;
use ffnskip::model::Llama;
use ffnskip::peer::argmax;
use ffnskip::session::{Session, SessionConfig};
use ffnskip::skip::compensation::Compensation;
use ffnskip::skip::{
    Controller, Decision, ParamsError, Policy, Profile, SkipController, SkipOptions, SkipParams,
};
use ffnskip::skip_setup::profile_file;
use ffnskip::tokenizer::Tokenizer;

const PROMPT: &str = "The history of the city begins in the early middle ages, when";
const N_GEN: usize = 24;

fn config() -> SessionConfig {
    SessionConfig::new(256, 2)
}

/// Prompt ids of [`PROMPT`] for `file`.
fn prompt(file: &GgufFile) -> Vec<u32> {
    Tokenizer::from_gguf(file)
        .unwrap()
        .encode(PROMPT, true, false)
}

/// Greedy decoding: prefill `prompt`, then `n` decode steps; every step's logits.
fn greedy<H: Controller>(
    s: &mut Session<'_, H>,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut t = argmax(s.prefill(prompt).unwrap());
    let (mut toks, mut all) = (vec![t], Vec::new());
    for _ in 0..n {
        let l = s.decode(t).unwrap().to_vec();
        t = argmax(&l);
        toks.push(t);
        all.push(l);
    }
    (toks, all)
}

fn controller(model: &Llama, opts: &SkipOptions, profile: Option<&Profile>) -> SkipController {
    let params = SkipParams::resolve(
        opts,
        model.config.n_layer,
        profile.map(|p| (p, "test profile")),
    )
    .unwrap();
    let mut c = SkipController::new(params, model.layer_bytes());
    c.record_decisions(true);
    c
}

fn opts(policy: Policy, ratio: f64) -> SkipOptions {
    SkipOptions {
        ratio: Some(ratio),
        ..SkipOptions::new(policy)
    }
}

#[test]
fn none_is_bit_identical_to_no_controller() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    let mut plain = Session::new(&model, config()).unwrap();
    let (t0, l0) = greedy(&mut plain, &ids, N_GEN);
    let c = controller(&model, &SkipOptions::none(), None);
    let mut none = Session::with_controller(&model, config(), c).unwrap();
    let (t1, l1) = greedy(&mut none, &ids, N_GEN);
    assert_eq!(t0, t1);
    assert_eq!(
        l0, l1,
        "policy none must give the plain model's logits bit for bit"
    );
    assert_eq!(none.controller.stats.skipped_ffn, 0);
    assert_eq!(none.controller.stats.eligible_ffn, 0);
}

#[test]
fn threshold_above_one_never_skips() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    let (_, full) = greedy(&mut Session::new(&model, config()).unwrap(), &ids, N_GEN);
    let o = SkipOptions {
        threshold: Some(1.01),
        warmup: Some(2),
        ..opts(Policy::Adaptive, 0.5)
    };
    let mut s = Session::with_controller(&model, config(), controller(&model, &o, None)).unwrap();
    let (_, got) = greedy(&mut s, &ids, N_GEN);
    assert_eq!(got, full);
    let st = &s.controller.stats;
    assert_eq!(st.skipped_ffn, 0);
    assert_eq!(st.counted_tokens, (N_GEN - 2) as u64);
    assert_eq!(st.eligible_ffn, (N_GEN - 2) as u64 * 30);
    assert!(st.decisions.iter().all(|d| d.to_string() == "F".repeat(30)));
}

#[test]
fn threshold_minus_one_skips_the_whole_non_cold_region_after_warmup() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    let (_, full) = greedy(&mut Session::new(&model, config()).unwrap(), &ids, N_GEN);
    let warmup = 5;
    let o = SkipOptions {
        threshold: Some(-1.0),
        warmup: Some(warmup),
        cold_start: Some(3),
        cold_end: Some(4),
        ..opts(Policy::Adaptive, 1.0)
    };
    let mut s = Session::with_controller(&model, config(), controller(&model, &o, None)).unwrap();
    let (_, got) = greedy(&mut s, &ids, N_GEN);
    // Warm-up tokens run the full model: same logits bit for bit.
    assert_eq!(got[..warmup], full[..warmup]);
    assert_ne!(got[warmup], full[warmup], "skipping must change the logits");
    let st = &s.controller.stats;
    let expect = format!("{}{}{}", "F".repeat(3), "s".repeat(23), "F".repeat(4));
    assert_eq!(st.decisions.len(), N_GEN - warmup);
    assert!(
        st.decisions.iter().all(|d| d.to_string() == expect),
        "{:?}",
        st.decisions
    );
    assert_eq!(st.skipped_ffn, 23 * (N_GEN - warmup) as u64);
    assert_eq!(st.decoded_tokens, N_GEN as u64);
}

#[test]
fn cold_regions_and_warmup_are_never_skipped() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    for (policy, thr) in [
        (Policy::Adaptive, 0.9),
        (Policy::Adaptive, 0.97),
        (Policy::Static, 0.0),
    ] {
        let o = SkipOptions {
            threshold: Some(thr),
            warmup: Some(4),
            cold_start: Some(4),
            cold_end: Some(6),
            ..opts(policy, 0.35)
        };
        let mut s =
            Session::with_controller(&model, config(), controller(&model, &o, None)).unwrap();
        greedy(&mut s, &ids, N_GEN);
        let st = &s.controller.stats;
        assert!(st.skipped_ffn > 0, "{policy:?} at {thr} skipped nothing");
        assert_eq!(
            st.per_layer[..4],
            [0; 4],
            "{policy:?} skipped a cold-start layer"
        );
        assert_eq!(
            st.per_layer[24..],
            [0; 6],
            "{policy:?} skipped a cold-end layer"
        );
        // Warm-up tokens are not counted and their decisions are all "ran".
        assert_eq!(st.decoded_tokens - st.counted_tokens, 4);
    }
}

#[test]
fn kv_before_the_first_skipped_ffn_is_unchanged() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    let mut full = Session::new(&model, config()).unwrap();
    let (toks, _) = greedy(&mut full, &ids, N_GEN);
    // Teacher-force the full model's tokens so both caches hold the same sequence.
    let warmup = 6;
    let o = SkipOptions {
        warmup: Some(warmup),
        ..opts(Policy::Adaptive, 0.3)
    };
    let mut s = Session::with_controller(&model, config(), controller(&model, &o, None)).unwrap();
    s.prefill(&ids).unwrap();
    for &t in &toks[..N_GEN] {
        s.decode(t).unwrap();
    }
    assert!(s.controller.stats.skipped_ffn > 0);
    // The first skipping token sits at position len(prompt) + warmup; its own K/V at every
    // layer up to the first skipped one is unchanged too, but later layers differ.
    let first = ids.len() + warmup;
    let (a, b) = (full.cache(), s.cache());
    let c = &model.config;
    let (mut same_before, mut differs_after) = (true, false);
    for l in 0..c.n_layer {
        for h in 0..c.n_head_kv {
            let (ka, kb) = (a.keys(l, h, first + 4), b.keys(l, h, first + 4));
            let hd = c.head_dim;
            same_before &= ka[..first * hd] == kb[..first * hd];
            differs_after |= ka[first * hd..] != kb[first * hd..];
            let (va, vb) = (a.values(l, h, first + 4), b.values(l, h, first + 4));
            same_before &= va[..first * hd] == vb[..first * hd];
            differs_after |= va[first * hd..] != vb[first * hd..];
        }
    }
    assert!(
        same_before,
        "K/V of positions before the first skip changed"
    );
    assert!(differs_after, "skipping left every later K/V unchanged");
}

#[test]
fn random_and_static_are_reproducible_with_a_seed() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    for policy in [Policy::Random, Policy::Static] {
        let run = |seed: u64| {
            let o = SkipOptions {
                seed,
                warmup: Some(2),
                ..opts(policy, 0.25)
            };
            let mut s =
                Session::with_controller(&model, config(), controller(&model, &o, None)).unwrap();
            let (toks, _) = greedy(&mut s, &ids, N_GEN);
            (toks, s.controller.stats.decisions.clone())
        };
        let (a, b, c) = (run(7), run(7), run(8));
        assert_eq!(a, b, "{policy:?} with the same seed differs");
        assert_ne!(a.1, c.1, "{policy:?} ignores the seed");
        // Exactly k = 0.25 × 30 = 7.5 → 7 or 8 blocks per token.
        for d in &a.1 {
            let n = d.count(Decision::Skipped);
            assert!(n == 7 || n == 8, "{policy:?}: {d}");
            if policy == Policy::Static {
                let d = d.to_string();
                let first = d.find('s').unwrap();
                assert_eq!(
                    &d[first..first + n],
                    "s".repeat(n),
                    "static block not contiguous: {d}"
                );
            }
        }
    }
}

#[test]
fn ratio_accounting_is_exact() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    // Threshold −1 fires at the first non-cold layer: k = 0.2 × 30 = 6 blocks, layers 2..8,
    // for every token after 3 warm-up tokens; every 4th of those runs in full.
    let o = SkipOptions {
        threshold: Some(-1.0),
        warmup: Some(3),
        cold_start: Some(2),
        cold_end: Some(2),
        full_every: Some(4),
        ..opts(Policy::Adaptive, 0.2)
    };
    let mut s = Session::with_controller(&model, config(), controller(&model, &o, None)).unwrap();
    greedy(&mut s, &ids, 19);
    let st = &s.controller.stats;
    // 19 decode steps: 3 warm-up, then 16 counted: 12 skipping (k = 0.2·30·4/3 = 8) + 4 full.
    assert_eq!(st.decoded_tokens, 19);
    assert_eq!(st.counted_tokens, 16);
    assert_eq!(st.eligible_ffn, 16 * 30);
    assert_eq!(st.skipped_ffn, 12 * 8);
    assert!((st.ratio() - 96.0 / 480.0).abs() < 1e-12);
    let mut per_layer = vec![0u64; 30];
    per_layer[2..10].fill(12);
    assert_eq!(st.per_layer, per_layer);
    let bytes = model.layer_bytes();
    let expect: u64 = (2..10).map(|l| 12 * bytes.ffn[l]).sum();
    assert_eq!(st.bytes_skipped, expect);
}

#[test]
fn batched_equals_sequential_under_every_policy() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    let (cont, _) = greedy(&mut Session::new(&model, config()).unwrap(), &ids, 40);
    let profile = test_profile(30);
    let mut plain_logits: Option<Vec<f32>> = None;
    let cases = Policy::ALL.iter().map(|&p| (p, Compensation::None)).chain([
        (Policy::Adaptive, Compensation::Mean),
        (Policy::Random, Compensation::Mean),
        (Policy::Static, Compensation::Mean),
        (Policy::Adaptive, Compensation::Lowrank),
        (Policy::Random, Compensation::Lowrank),
        (Policy::Placed, Compensation::Lowrank),
        (Policy::AdaptiveLayer, Compensation::Lowrank),
    ]);
    for (policy, compensate) in cases {
        let o = SkipOptions {
            warmup: Some(3),
            seed: 3,
            compensate,
            ..opts(policy, 0.3)
        };
        let policy = format!("{policy:?}{}", compensate.suffix());
        // Exact batches, as `eval` runs them: teacher forcing must score what decoding does.
        let exact = SessionConfig {
            exact_batches: true,
            ..config()
        };
        let mut seq =
            Session::with_controller(&model, exact, controller(&model, &o, Some(&profile)))
                .unwrap();
        seq.prefill(&ids).unwrap();
        let mut seq_logits = Vec::new();
        for &t in &cont {
            seq_logits.extend_from_slice(seq.decode(t).unwrap());
        }
        let mut bat =
            Session::with_controller(&model, exact, controller(&model, &o, Some(&profile)))
                .unwrap();
        bat.prefill(&ids).unwrap();
        let bat_logits = bat.eval_all(&cont, false).unwrap();
        assert_eq!(
            seq.controller.stats.decisions, bat.controller.stats.decisions,
            "{policy:?}"
        );
        assert_eq!(
            seq.controller.stats.skipped_ffn, bat.controller.stats.skipped_ffn,
            "{policy:?}"
        );
        if policy != "None" {
            assert!(
                bat.controller.stats.skipped_ffn > 0,
                "{policy:?} skipped nothing"
            );
        }
        assert!(
            seq_logits == bat_logits,
            "{policy:?}: batched logits differ from sequential (max |Δ| {})",
            common::max_abs_diff(&seq_logits, &bat_logits)
        );
        // The estimate is added: the same skips give other logits than without it.
        match policy.as_str() {
            "Random" => plain_logits = Some(bat_logits.clone()),
            "Random+mean" | "Random+lowrank" => assert!(
                plain_logits.as_deref() != Some(&bat_logits[..]),
                "{policy} changed nothing"
            ),
            _ => {}
        }
    }
}

/// Eval cost (issue 13, item 6): a prompt prefilled once under the full model and restored for
/// another policy decodes exactly as prefilling it under that policy does: same decisions,
/// same statistics, same logits. ShortGPT removes layers from the prompt, so it never reuses.
#[test]
fn a_restored_full_model_prompt_decodes_as_its_own_prefill_under_every_policy() {
    use ffnskip::prompt_cache::PromptCache;
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    let profile = test_profile(30);
    let exact = SessionConfig {
        exact_batches: true,
        ..config()
    };
    let mut full = Session::new(&model, exact)
        .unwrap()
        .with_prompt_cache(PromptCache::new(1 << 30));
    let (cont, _) = greedy(&mut full, &ids, 20);
    let mut cache = full.take_prompt_cache().unwrap();
    assert_eq!((cache.len(), cache.reused_tokens), (1, 0));
    let cases = Policy::ALL.iter().map(|&p| (p, Compensation::None)).chain([
        (Policy::Adaptive, Compensation::Lowrank),
        (Policy::Placed, Compensation::Lowrank),
    ]);
    for (policy, compensate) in cases {
        let o = SkipOptions {
            warmup: Some(3),
            seed: 3,
            compensate,
            ..opts(policy, 0.3)
        };
        let label = format!("{policy:?}{}", compensate.suffix());
        let run = |s: &mut Session<'_, SkipController>| {
            let first = s.prefill(&ids).unwrap().to_vec();
            let mut logits = vec![first];
            for &t in &cont {
                logits.push(s.decode(t).unwrap().to_vec());
            }
            logits
        };
        let mut own =
            Session::with_controller(&model, exact, controller(&model, &o, Some(&profile)))
                .unwrap();
        let own_logits = run(&mut own);
        let before = cache.reused_tokens;
        let mut reused =
            Session::with_controller(&model, exact, controller(&model, &o, Some(&profile)))
                .unwrap()
                .with_prompt_cache(cache);
        let reused_logits = run(&mut reused);
        cache = reused.take_prompt_cache().unwrap();
        let restored = cache.reused_tokens - before;
        assert_eq!(
            restored,
            if policy == Policy::Shortgpt {
                0
            } else {
                ids.len()
            },
            "{label}: prompt tokens restored"
        );
        assert_eq!(reused.history(), own.history(), "{label}");
        assert_eq!(
            reused.controller.stats.decisions, own.controller.stats.decisions,
            "{label}"
        );
        assert_eq!(
            reused.controller.stats.skipped_ffn, own.controller.stats.skipped_ffn,
            "{label}"
        );
        assert!(
            reused_logits == own_logits,
            "{label}: logits after a restored prompt differ (max |Δ| {})",
            common::max_abs_diff(&reused_logits.concat(), &own_logits.concat())
        );
    }
    // A cache bound to another batch shape starts empty: its bits could differ.
    let other = Session::new(&model, config())
        .unwrap()
        .with_prompt_cache(cache)
        .take_prompt_cache()
        .unwrap();
    assert!(other.is_empty());
}

#[test]
fn early_exit_and_shortgpt_follow_their_plans() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let ids = prompt(&file);
    let profile = test_profile(30);
    let o = SkipOptions {
        warmup: Some(0),
        ..opts(Policy::Shortgpt, 0.2)
    };
    let mut s =
        Session::with_controller(&model, config(), controller(&model, &o, Some(&profile))).unwrap();
    // The 6 lowest Block Influences of the synthetic profile: (7l mod 30) smallest.
    let mut order: Vec<usize> = (0..30).collect();
    order.sort_by_key(|&l| (l * 7) % 30);
    let mut removed = order[..6].to_vec();
    removed.sort();
    assert_eq!(s.controller.params().removed, removed);
    greedy(&mut s, &ids, 8);
    let d = &s.controller.stats.decisions[0];
    for (l, &c) in d.0.iter().enumerate() {
        assert_eq!(c == Decision::Removed, removed.contains(&l), "{d}");
    }
    let o = SkipOptions {
        warmup: Some(0),
        ..opts(Policy::EarlyExit, 0.2)
    };
    let mut s = Session::with_controller(&model, config(), controller(&model, &o, None)).unwrap();
    greedy(&mut s, &ids, 8);
    let bytes = model.layer_bytes();
    for d in &s.controller.stats.decisions {
        assert_eq!(
            d.to_string(),
            format!("{}{}", "F".repeat(24), "e".repeat(6))
        );
    }
    let per_token: u64 = (24..30).map(|l| bytes.ffn[l] + bytes.attn_qo[l]).sum();
    assert_eq!(s.controller.stats.bytes_skipped, 8 * per_token);
}

#[test]
fn shortgpt_without_a_profile_is_a_clear_error() {
    let e = SkipParams::resolve(&opts(Policy::Shortgpt, 0.25), 30, None).unwrap_err();
    assert_eq!(e, ParamsError::NeedsProfile(Policy::Shortgpt));
    assert!(e.to_string().contains("needs a calibration profile"), "{e}");
    let e = SkipParams::resolve(&opts(Policy::Adaptive, 1.5), 30, None).unwrap_err();
    assert_eq!(e, ParamsError::RatioOutOfRange(1.5));
    assert_eq!(e.to_string(), "ratio 1.5 is out of range (expected 0..1)");
    let p = test_profile(12);
    let e =
        SkipParams::resolve(&opts(Policy::Adaptive, 0.2), 30, Some((&p, "x.json"))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the skip profile from x.json is for 12 layers but the model has 30"
    );
}

#[test]
fn adaptive_without_profile_uses_paper_defaults_and_says_so() {
    let p = SkipParams::resolve(&opts(Policy::Adaptive, 0.25), 30, None).unwrap();
    assert_eq!((p.cold_start, p.cold_end), (5, 5)); // 5 of 32 scaled to 30
    assert_eq!(p.threshold, 0.95);
    assert_eq!(p.schedule.k, 7.5);
    assert!(p.source.starts_with("paper defaults"), "{}", p.source);
    let prof = test_profile(30);
    let p =
        SkipParams::resolve(&opts(Policy::Adaptive, 0.25), 30, Some((&prof, "m.gguf"))).unwrap();
    assert_eq!(
        (p.cold_start, p.cold_end, p.threshold, p.schedule.k),
        (2, 2, 0.96, 8.0)
    );
    assert!(p.source.contains("m.gguf"), "{}", p.source);
}

/// Calibration on a model, then the profile through JSON and through GGUF metadata.
fn calibrate_and_round_trip(path: &std::path::Path, text: &str, tokens: usize) -> Profile {
    let file = GgufFile::open(path).unwrap();
    let model = Llama::load(&file).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let mut ids = tok.encode(text, true, false);
    ids.truncate(tokens);
    let (p, rec) = calibrate(&model, &ids, 2, "test text", 0).unwrap();
    assert_eq!(rec.tokens(), ids.len());
    assert_eq!(p.n_layer, model.config.n_layer);
    assert_eq!(p.suggestions.len(), 5);
    // Compensations and damage per layer: the low-rank map within 2% of the FFN's bytes.
    assert_eq!(p.ffn_lowrank.len(), p.n_layer);
    let bytes = model.layer_bytes();
    for (l, m) in p.ffn_lowrank.iter().enumerate() {
        assert!(m.rank() >= 1, "layer {l}: rank 0");
        assert!(
            m.bytes() as f64 <= 0.02 * bytes.ffn[l] as f64,
            "layer {l}: {} bytes",
            m.bytes()
        );
    }
    assert_eq!(p.ffn_damage.len(), p.n_layer);
    assert!(p.ffn_damage.iter().all(|d| d.is_finite() && *d >= 0.0));
    // Skipping any one FFN for every token moves the distributions.
    assert!(p.ffn_damage.iter().all(|&d| d > 0.0), "{:?}", p.ffn_damage);
    // Mean FFN output per layer (compensation), finite and not all zero.
    assert_eq!(p.ffn_mean.len(), p.n_layer);
    assert!(p.ffn_mean.iter().all(|v| v.len() == model.config.n_embd));
    assert!(p.ffn_mean.iter().flatten().any(|&x| x != 0.0));
    let json = TempFile(temp_path("skip", "profile.json"));
    profile_file::save_json(&p, &json.0).unwrap();
    assert_eq!(profile_file::load_json(&json.0).unwrap(), p);
    let gguf = TempFile(temp_path("skip", "profiled.gguf"));
    profile_file::embed(&p, &file, &gguf.0).unwrap();
    let g = GgufFile::open(&gguf.0).unwrap();
    assert_eq!(profile_file::from_gguf(&g).unwrap().as_ref(), Some(&p));
    assert_eq!(profile_file::from_gguf(&file).unwrap(), None);
    // The copy is still the same model: same tensors, same logits.
    let m2 = Llama::load(&g).unwrap();
    let a = Session::new(&model, config())
        .unwrap()
        .prefill(&ids[..8])
        .unwrap()
        .to_vec();
    let b = Session::new(&m2, config())
        .unwrap()
        .prefill(&ids[..8])
        .unwrap()
        .to_vec();
    assert_eq!(a, b);
    p
}

#[test]
fn calibration_on_the_default_model_matches_the_numpy_reference() {
    let Some(shared) = shared("calibration_on_the_default_model") else {
        return;
    };
    let text = std::fs::read_to_string(shared.join("data/wikitext-2/wikitext-2-raw/wiki.test.raw"))
        .unwrap();
    let p = calibrate_and_round_trip(&default_model(), &text[..20000], 512);
    // DESIGN §2 (independent NumPy forward, tools/ffn_profile.py): mean cos(h, h+ffn) 0.05 at
    // layer 0, 0.78 at layer 29, 0.955–0.983 in between; Block Influence 0.99 at layer 0.
    let m = p.ffn_cos_mean();
    assert!((m[0] - 0.05).abs() < 0.1, "layer 0: {}", m[0]);
    assert!((m[29] - 0.78).abs() < 0.1, "layer 29: {}", m[29]);
    assert!(m[1..29].iter().all(|&c| c > 0.93), "{m:?}");
    assert!(p.block_influence[0] > 0.9);
    assert_eq!((p.cold_start, p.cold_end), (1, 1));
}

/// stories260K converted to a GGUF named `name` (removed on drop) and a calibration text for
/// it; `None` (the test passes as skipped) without `../shared`.
fn stories260k(test: &str, name: &str) -> Option<(TempFile, String)> {
    let dir = shared(test)?.join("models/tinyllamas");
    let out = TempFile(temp_path("skip", name));
    convert_llama2c(
        &dir.join("stories260K.bin"),
        &dir.join("tok512.bin"),
        &out.0,
    )
    .unwrap();
    let text = "Once upon a time, there was a little girl named Lily. She loved to play outside. \
                One day, she saw a big dog in the park and she was happy. "
        .repeat(6);
    Some((out, text))
}

#[test]
fn calibration_runs_on_stories260k() {
    let Some((out, text)) = stories260k("calibration_runs_on_stories260k", "stories260K.gguf")
    else {
        return;
    };
    let p = calibrate_and_round_trip(&out.0, &text, 200);
    assert_eq!(p.n_layer, 5);
    assert!(p.cold_start + p.cold_end <= 5);
    // Adaptive generation with the embedded profile works on a 5-layer model too.
    let file = GgufFile::open(&out.0).unwrap();
    let model = Llama::load(&file).unwrap();
    let o = SkipOptions {
        warmup: Some(1),
        threshold: Some(-1.0),
        cold_start: Some(1),
        cold_end: Some(1),
        ..opts(Policy::Adaptive, 0.4)
    };
    let mut s =
        Session::with_controller(&model, config(), controller(&model, &o, Some(&p))).unwrap();
    let ids = Tokenizer::from_gguf(&file)
        .unwrap()
        .encode("Once upon", true, false);
    greedy(&mut s, &ids, 10);
    // 9 counted tokens, each skipping inside the 3-layer warm region.
    let st = &s.controller.stats;
    assert_eq!(st.counted_tokens, 9);
    assert!(st.skipped_ffn > 0 && st.skipped_ffn <= 9 * 3, "{st:?}");
}

#[test]
fn compensation_needs_a_profile_with_its_fit_and_an_ffn_policy() {
    let mut p = test_profile(30);
    p.ffn_mean.clear();
    let o = SkipOptions {
        compensate: Compensation::Mean,
        ..opts(Policy::Adaptive, 0.25)
    };
    let e = SkipParams::resolve(&o, 30, Some((&p, "old.json"))).unwrap_err();
    assert_eq!(e, ParamsError::NeedsCompensation(Compensation::Mean));
    let msg = ffnskip::skip_setup::flag_message(&e);
    assert!(
        msg.starts_with(
            "--compensate mean (or --skip …+mean) adds what calibration fitted (ffn_mean)"
        ),
        "{msg}"
    );
    assert!(msg.contains("rerun `ffnskip calibrate -m MODEL`"), "{msg}");
    p.ffn_lowrank.clear();
    for policy in [Policy::Adaptive, Policy::Auto] {
        let o = SkipOptions {
            compensate: Compensation::Lowrank,
            ..opts(policy, 0.25)
        };
        let e = SkipParams::resolve(&o, 30, Some((&p, "old.json"))).unwrap_err();
        let want = match policy {
            Policy::Auto => ParamsError::NeedsProfile(Policy::Auto),
            _ => ParamsError::NeedsCompensation(Compensation::Lowrank),
        };
        assert_eq!(e, want);
    }
    let o = SkipOptions {
        compensate: Compensation::Mean,
        ..opts(Policy::Shortgpt, 0.25)
    };
    assert_eq!(
        SkipParams::resolve(&o, 30, Some((&test_profile(30), "p.json"))).unwrap_err(),
        ParamsError::CompensationPolicy(Policy::Shortgpt)
    );
    let e = ffnskip::measure::bench::PolicySpec::parse("shortgpt+mean:0.2")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--skip shortgpt+mean:0.2: +mean"), "{e}");
    let e = ffnskip::measure::bench::PolicySpec::parse("adaptive+median:0.2")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--skip adaptive+median:0.2: unknown compensation '+median' (expected +mean or +lowrank)"
    );
    let s = ffnskip::measure::bench::PolicySpec::parse("random+mean:0.2").unwrap();
    assert!(s.compensate == Compensation::Mean && s.label() == "random+mean:0.2");
    let s = ffnskip::measure::bench::PolicySpec::parse("best:0.1").unwrap();
    assert!(s.policy == Policy::Auto && s.label() == "auto:0.1");
    // `auto` is adaptive with the low-rank compensation.
    let params = SkipParams::resolve(
        &opts(Policy::Auto, 0.2),
        30,
        Some((&test_profile(30), "p.json")),
    )
    .unwrap();
    assert_eq!(
        (params.policy, params.compensation),
        (Policy::Adaptive, Compensation::Lowrank)
    );
    assert_eq!(params.ffn_estimate.len(), 30);
}

/// `placed` skips, for every token, the contiguous run of k non-cold layers with the least
/// summed calibrated damage.
#[test]
fn placed_skips_the_least_damage_run() {
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let p = test_profile(30);
    let o = SkipOptions {
        warmup: Some(0),
        ..opts(Policy::Placed, 0.1)
    };
    let mut s =
        Session::with_controller(&model, config(), controller(&model, &o, Some(&p))).unwrap();
    s.controller.record_decisions(true);
    greedy(&mut s, &prompt(&file), 6);
    // k = 3 of 30; damage |l − 12| · 0.01 + 0.02 is least for the run 11, 12, 13.
    let want: Vec<Decision> = (0..30)
        .map(|l| {
            if (11..14).contains(&l) {
                Decision::Skipped
            } else {
                Decision::Ran
            }
        })
        .collect();
    let st = &s.controller.stats;
    assert!(!st.decisions.is_empty());
    for d in &st.decisions {
        assert_eq!(d.0, want);
    }
    let mut none = test_profile(30);
    none.ffn_damage.clear();
    assert_eq!(
        SkipParams::resolve(&o, 30, Some((&none, "old.json"))).unwrap_err(),
        ParamsError::NeedsProfile(Policy::Placed)
    );
}

/// `--max-kld X`: calibration records adaptive's KL divergence to the full model at each
/// ratio (with and without compensation, the same numbers when measured again), and a budget
/// picks the largest calibrated ratio whose KLD stays within it.
#[test]
fn max_kld_picks_the_largest_calibrated_ratio_within_budget() {
    let Some((out, text)) = stories260k("max_kld_on_stories260k", "stories260K-kld.gguf") else {
        return;
    };
    let p = calibrate_and_round_trip(&out.0, &text, 200);
    assert_eq!(p.kld_curve.len(), 21, "{:?}", p.kld_curve);
    let file = GgufFile::open(&out.0).unwrap();
    let model = Llama::load(&file).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let mut ids = tok.encode(&text, true, false);
    ids.truncate(200);
    let again = ffnskip::measure::calibrate::Reference::new(&model, &ids, 2)
        .unwrap()
        .curve(&model, 2, &p)
        .unwrap();
    assert_eq!(again, p.kld_curve);
    assert!(
        p.kld_curve.iter().any(|k| k.kld_mean > 0.0),
        "{:?}",
        p.kld_curve
    );
    for budget in p.kld_curve.iter().map(|k| k.kld_mean) {
        let o = SkipOptions {
            max_kld: Some(budget),
            ..SkipOptions::new(Policy::Adaptive)
        };
        let params = SkipParams::resolve(&o, 5, Some((&p, "test"))).unwrap();
        // `--skip adaptive` reads its own series (with and without compensation).
        let want = p
            .kld_curve
            .iter()
            .filter(|k| k.policy == Policy::Adaptive && k.kld_mean <= budget)
            .max_by(|a, b| {
                a.ratio
                    .total_cmp(&b.ratio)
                    .then(b.kld_mean.total_cmp(&a.kld_mean))
            });
        match want {
            Some(want) => {
                assert!(want.kld_mean <= budget);
                assert_eq!(params.ratio, want.ratio, "budget {budget}");
                assert_eq!(params.compensation, want.compensation, "budget {budget}");
            }
            None => assert_eq!(params.policy, Policy::None, "{}", params.source),
        }
        assert!(params.source.contains("--max-kld"), "{}", params.source);
        // `--skip auto --max-kld`: the same, over the recommended rule's own series.
        let o = SkipOptions {
            max_kld: Some(budget),
            ..SkipOptions::new(Policy::Auto)
        };
        let params = SkipParams::resolve(&o, 5, Some((&p, "test"))).unwrap();
        let want = p
            .kld_curve
            .iter()
            .filter(|k| k.compensation == Compensation::Lowrank && k.kld_mean <= budget)
            .max_by(|a, b| {
                a.ratio
                    .total_cmp(&b.ratio)
                    .then(b.kld_mean.total_cmp(&a.kld_mean))
            });
        match want {
            Some(w) => {
                assert_eq!(
                    (params.policy, params.ratio, params.compensation),
                    (w.policy, w.ratio, Compensation::Lowrank)
                );
                assert!(w.kld_mean <= budget, "{w:?}");
            }
            None => assert_eq!(params.policy, Policy::None, "{}", params.source),
        }
    }
    let min = p
        .kld_curve
        .iter()
        .map(|k| k.kld_mean)
        .fold(f64::INFINITY, f64::min);
    if min > 0.0 {
        let o = SkipOptions {
            max_kld: Some(min / 2.0),
            ..SkipOptions::new(Policy::Adaptive)
        };
        let params = SkipParams::resolve(&o, 5, Some((&p, "test"))).unwrap();
        assert_eq!(params.policy, Policy::None, "{}", params.source);
    }
    // Without a curve, or with another policy, it is a clear error.
    let mut old = p.clone();
    old.kld_curve.clear();
    let o = SkipOptions {
        max_kld: Some(0.05),
        ..SkipOptions::new(Policy::Adaptive)
    };
    assert_eq!(
        SkipParams::resolve(&o, 5, Some((&old, "old.json"))).unwrap_err(),
        ParamsError::NeedsKldCurve(Policy::Adaptive)
    );
    let o = SkipOptions {
        max_kld: Some(0.05),
        ..SkipOptions::new(Policy::Random)
    };
    let e = SkipParams::resolve(&o, 5, Some((&p, "p.json"))).unwrap_err();
    assert_eq!(e, ParamsError::NeedsKldCurve(Policy::Random));
    assert!(ffnskip::skip_setup::flag_message(&e).starts_with(
        "--max-kld picks the ratio from the KL divergence curve of a calibration profile, which has none for --skip random"
    ));
}

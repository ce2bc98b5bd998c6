//! `eval` end to end on stories260K (converted llama2.c model, no chat template) with a tiny
//! slice of every task, and resuming after an interruption.

mod common;

use std::path::Path;

use common::{shared, temp_path, TempFile};
use ffnskip::convert::convert_llama2c;
use ffnskip::convert::quantize::{quantize_file, Target};
use ffnskip::gguf::GgufFile;
use ffnskip::measure::bench::PolicySpec;
use ffnskip::measure::eval::{summary_markdown, EvalConfig, Evaluator, Task, TaskReport};
use ffnskip::model::Llama;
use ffnskip::skip::SkipOptions;

fn config(shared: &Path, out: &Path, limit: usize) -> EvalConfig {
    EvalConfig {
        specs: ["none", "adaptive:0.4", "random:0.4"]
            .iter()
            .map(|s| PolicySpec::parse(s).unwrap())
            .collect(),
        data: Some(shared.join("data")),
        limit: Some(limit),
        task_limits: Default::default(),
        threads: 2,
        base: SkipOptions {
            warmup: Some(1),
            threshold: Some(-1.0),
            cold_start: Some(1),
            cold_end: Some(1),
            ..SkipOptions::none()
        },
        profile: None,
        out_dir: out.to_path_buf(),
        gen_tokens: 12,
        code_format: Default::default(),
        kld_reference: None,
    }
}

fn metric(r: &TaskReport, policy: &str, key: &str) -> f64 {
    let p = r.results.iter().find(|p| p.policy == policy).unwrap();
    *p.metrics
        .get(key)
        .unwrap_or_else(|| panic!("{policy} has no {key}: {:?}", p.metrics))
}

/// `../shared` and stories260K converted to a GGUF (removed on drop) under a `tag` temp name;
/// `None` (the test passes as skipped) without `../shared`.
fn stories260k(test: &str, tag: &str) -> Option<(std::path::PathBuf, TempFile)> {
    let shared = shared(test)?;
    let dir = shared.join("models/tinyllamas");
    let gguf = TempFile(temp_path(tag, "stories260K.gguf"));
    convert_llama2c(
        &dir.join("stories260K.bin"),
        &dir.join("tok512.bin"),
        &gguf.0,
    )
    .unwrap();
    Some((shared, gguf))
}

#[test]
fn every_task_runs_on_stories260k_and_resumes() {
    let Some((shared, gguf)) = stories260k("eval_on_stories260k", "eval") else {
        return;
    };
    let out = temp_path("eval", "results");
    let file = GgufFile::open(&gguf.0).unwrap();
    let model = Llama::load(&file).unwrap();
    let ev = Evaluator::new(&gguf.0, &file, &model, config(&shared, &out, 2)).unwrap();
    let mut reports = Vec::new();
    for task in Task::ALL {
        let mut log = Vec::new();
        let r = ev.run(task, &mut |l| log.push(l.to_string())).unwrap();
        assert_eq!(r.results.len(), 3, "{task:?}");
        // Both skip policies restore the prompts the full model prefilled (eval cost).
        for (i, l) in log.iter().enumerate() {
            if l.contains(":0.4: 2 items") {
                assert!(
                    log.get(i + 1).is_some_and(|r| r
                        .ends_with("prompt tokens restored from the full model's prefill (2 prompts, 0 MiB kept)")),
                    "{task:?}: {log:?}"
                );
            }
        }
        assert_eq!(r.results[0].policy, "none");
        assert_eq!(r.results[0].ffn_skip_ratio, 0.0);
        // Threshold −1 with cold 1 + 1 of 5 layers: every counted token skips 2 of 5 FFNs.
        assert!(
            (r.results[1].ffn_skip_ratio - 0.4).abs() < 1e-9,
            "{task:?}: {:?}",
            r.results[1]
        );
        assert_eq!(metric(&r, "none", "items"), 2.0);
        // Adaptive skips FFN matrices only: 40% of the layers' FFN bytes per counted token.
        let lb = model.layer_bytes();
        let want = 0.4 * lb.ffn.iter().sum::<u64>() as f64 / model.bytes_per_token() as f64;
        assert!(
            (r.results[1].weight_bytes_skipped - want).abs() < 1e-9,
            "{task:?}: {} vs {want}",
            r.results[1].weight_bytes_skipped
        );
        assert_eq!(r.results[0].weight_bytes_skipped, 0.0);
        reports.push(r);
    }
    let [qa, ppl, agree, summ, code] = &reports[..] else {
        unreachable!()
    };
    let p_full = metric(ppl, "none", "perplexity");
    assert!(p_full > 1.0 && p_full < 512.0, "perplexity {p_full}");
    assert!(metric(ppl, "adaptive:0.4", "perplexity_vs_full").is_finite());
    assert!((0.0..=1.0).contains(&metric(code, "none", "pass_at_1")));
    for r in [qa, agree, summ, code] {
        let m = metric(r, "adaptive:0.4", "match_rate");
        assert!((0.0..=1.0).contains(&m));
        assert!(metric(r, "none", "collapse") >= 0.0);
    }
    assert!((0.0..=1.0).contains(&metric(summ, "none", "rouge_l_reference")));
    let table = summary_markdown(&reports);
    let random = table
        .lines()
        .find(|l| l.starts_with("| random:0.4 |"))
        .unwrap_or_else(|| panic!("{table}"));
    // Ratios per task (all 40%), then the perplexity ratio against the full model.
    assert!(
        random.starts_with("| random:0.4 | 40.0 / 40.0 / 40.0 / 40.0 / 40.0% |"),
        "{random}"
    );
    assert!(
        random.contains(&format!(
            " {:.4} |",
            metric(ppl, "random:0.4", "perplexity_vs_full")
        )),
        "{random}"
    );

    // Interrupt: drop the last record of a policy and leave a half-written line.
    let f = out.join("agreement/adaptive-0.4.jsonl");
    let text = std::fs::read_to_string(&f).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    std::fs::write(&f, format!("{}\n{{\"id\": \"8", lines[0])).unwrap();
    let mut log = Vec::new();
    let again = ev
        .run(Task::Agreement, &mut |l| log.push(l.to_string()))
        .unwrap();
    assert!(
        log.iter()
            .any(|l| l == "agreement / adaptive:0.4: 2 items (1 done before)"),
        "{log:?}"
    );
    assert!(log
        .iter()
        .any(|l| l == "agreement / none: 2 items (2 done before)"));
    // The redone item gives the same tokens and metrics (only its timing is new).
    for (a, b) in again.results.iter().zip(&agree.results) {
        assert_eq!(
            (&a.policy, a.ffn_skip_ratio, &a.metrics),
            (&b.policy, b.ffn_skip_ratio, &b.metrics)
        );
    }
    assert_eq!(std::fs::read_to_string(&f).unwrap().lines().count(), 2);
    let _ = std::fs::remove_dir_all(&out);
}

/// KL(full ‖ policy) through the whole pipeline: the full model's distributions are stored with
/// its perplexity windows and read back for each policy. A policy that skips nothing computes
/// the same logits, so its KLD is exactly 0 and its top-1 always agrees; one that skips 40% of
/// the FFN blocks is measurably away from the full model.
#[test]
fn kl_divergence_to_the_full_model_on_stories260k() {
    let Some((shared, gguf)) = stories260k("kld_on_stories260k", "kld") else {
        return;
    };
    let out = temp_path("kld", "results");
    let file = GgufFile::open(&gguf.0).unwrap();
    let model = Llama::load(&file).unwrap();
    let mut cfg = config(&shared, &out, 1);
    cfg.specs = ["none", "random:0", "adaptive:0.4"]
        .iter()
        .map(|s| PolicySpec::parse(s).unwrap())
        .collect();
    let ev = Evaluator::new(&gguf.0, &file, &model, cfg).unwrap();
    let r = ev.run(Task::Perplexity, &mut |_| {}).unwrap();
    assert_eq!(r.results[1].ffn_skip_ratio, 0.0);
    assert_eq!(metric(&r, "random:0", "kld_mean"), 0.0);
    assert_eq!(metric(&r, "random:0", "kld_p99"), 0.0);
    assert_eq!(metric(&r, "random:0", "top1_agreement"), 1.0);
    let (mean, median, p99) = (
        metric(&r, "adaptive:0.4", "kld_mean"),
        metric(&r, "adaptive:0.4", "kld_median"),
        metric(&r, "adaptive:0.4", "kld_p99"),
    );
    assert!(
        mean > 1e-4 && 0.0 <= median && median <= p99,
        "{mean} {median} {p99}"
    );
    assert!((0.0..1.0).contains(&metric(&r, "adaptive:0.4", "top1_agreement")));
    // Every scored position has its KLD: the window's tokens minus the first.
    let text = std::fs::read_to_string(out.join("perplexity/adaptive-0.4.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let n = metric(&r, "adaptive:0.4", "tokens") as usize;
    assert_eq!(rec["kld"].as_array().map(Vec::len), Some(n));
    let table = summary_markdown(std::slice::from_ref(&r));
    assert!(
        table.contains("| KLD mean (nats) | top-1 same |"),
        "{table}"
    );
    // `--kld-reference`: a Q8_0 requantization scored against the F32 file's distributions;
    // its own `none` now has a KLD, small and above 0, and skipping adds to it.
    let q8 = TempFile(temp_path("kld", "stories260K-q8_0.gguf"));
    quantize_file(&gguf.0, &q8.0, Target::parse("q8_0").unwrap()).unwrap();
    let qfile = GgufFile::open(&q8.0).unwrap();
    let qmodel = Llama::load(&qfile).unwrap();
    let qout = temp_path("kld", "results-q8_0");
    let mut cfg = config(&shared, &qout, 1);
    cfg.specs = ["none", "adaptive:0.4"]
        .iter()
        .map(|s| PolicySpec::parse(s).unwrap())
        .collect();
    cfg.kld_reference = Some(out.join("perplexity/none.jsonl"));
    let ev = Evaluator::new(&q8.0, &qfile, &qmodel, cfg).unwrap();
    let q = ev.run(Task::Perplexity, &mut |_| {}).unwrap();
    let (qn, qa) = (
        metric(&q, "none", "kld_mean"),
        metric(&q, "adaptive:0.4", "kld_mean"),
    );
    assert!(0.0 < qn && qn < 0.05 && qn < qa, "{qn} {qa}");
    // A reference without distributions for these windows is a clear error.
    let mut cfg = config(&shared, &qout, 1);
    cfg.kld_reference = Some(out.join("perplexity/adaptive-0.4.jsonl"));
    let e = Evaluator::new(&q8.0, &qfile, &qmodel, cfg)
        .unwrap()
        .run(Task::Perplexity, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adaptive-0.4.jsonl: no full-model distributions for these perplexity windows"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&qout);
}

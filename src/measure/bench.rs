//! Decode and prefill speed of ffnskip under skip policies, against llama.cpp running the
//! same GGUF with the same thread count in the same process (DESIGN §3): runs alternate
//! within each repetition, and medians (with min and max) are reported as ratios.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::gguf::{GgmlType, GgufFile};
use crate::model::Llama;
use crate::peer::{argmax, LlamaCpp, PeerMode};
use crate::session::{Session, SessionConfig};
use crate::skip::compensation::Compensation;
use crate::skip::{Policy, SkipOptions};
use crate::skip_setup;

/// One policy to measure: `name[+mean|+lowrank][:ratio]` on the command line (`+mean`: each
/// skipped FFN's calibrated mean output is added instead of nothing; `+lowrank`: a calibrated
/// low-rank map of its input).
#[derive(Clone, Debug)]
pub struct PolicySpec {
    pub policy: Policy,
    pub ratio: f64,
    pub compensate: Compensation,
}

impl PolicySpec {
    /// Parses `none`, `adaptive`, `adaptive:0.25`, `shortgpt:0.3`, … (ratio default 0.25).
    pub fn parse(s: &str) -> anyhow::Result<PolicySpec> {
        let (name, ratio) = match s.split_once(':') {
            Some((n, r)) => (
                n,
                r.parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        anyhow::anyhow!("--skip {s}: ratio '{r}' is not a number in 0..1")
                    })?,
            ),
            None => (s, crate::skip::params::DEFAULT_RATIO),
        };
        let (name, compensate) = match name.split_once('+') {
            Some((n, c)) => (
                n,
                Compensation::parse(c)
                    .filter(|&c| c != Compensation::None)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--skip {s}: unknown compensation '+{c}' (expected +mean or +lowrank)"
                        )
                    })?,
            ),
            None => (name, Compensation::None),
        };
        let policy = Policy::parse(name).ok_or_else(|| {
            anyhow::anyhow!(
                "--skip {s}: unknown policy '{name}' (expected none, adaptive, adaptive-layer, placed, auto, random, static, shortgpt or early-exit, optionally with +mean or +lowrank and :RATIO)"
            )
        })?;
        anyhow::ensure!(
            compensate == Compensation::None || policy.skips_ffn_only(),
            "--skip {s}: {} (an estimate in place of a skipped FFN) applies to adaptive, \
             adaptive-layer, placed, auto, random and static, which skip FFN blocks only",
            compensate.suffix()
        );
        let ratio = if policy == Policy::None { 0.0 } else { ratio };
        Ok(PolicySpec {
            policy,
            ratio,
            compensate,
        })
    }

    pub fn label(&self) -> String {
        let plus = self.compensate.suffix();
        match self.policy {
            Policy::None => "none".into(),
            p => format!("{}{plus}:{}", p.name(), self.ratio),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub threads: usize,
    /// Prefill length (tokens).
    pub prompt_tokens: usize,
    /// Decoded tokens per repetition (after a 16-token prompt).
    pub gen_tokens: usize,
    pub reps: usize,
    /// Skip options other than policy and ratio (warm-up, seed, …).
    pub base: SkipOptions,
    /// Profile for policies that use one (else the one embedded in each model, if any).
    pub profile: Option<PathBuf>,
    /// How ffnskip loads the weights (llama.cpp always repacks, its default).
    pub load: crate::model::LoadOptions,
}

/// Median, min and max of samples.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(v: &[f64]) -> Summary {
        if v.is_empty() {
            return Summary::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        Summary {
            median: s[s.len() / 2],
            min: s[0],
            max: s[s.len() - 1],
        }
    }
}

/// One row of results: a model × policy.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub model: String,
    /// Dominant weight type of the model's matrices (e.g. Q4_1).
    pub quant: String,
    pub policy: String,
    pub target_ratio: f64,
    /// Realized FFN skip ratio (authors' counting).
    pub ffn_skip_ratio: f64,
    pub decode_tokens_per_s: Summary,
    pub prefill_tokens_per_s: Summary,
    /// llama.cpp, full model, same file and threads, same repetitions.
    pub llama_cpp_decode_tokens_per_s: Summary,
    pub llama_cpp_prefill_tokens_per_s: Summary,
    /// Median decode vs this model's `none` row (when measured).
    pub speedup_vs_full: Option<f64>,
    pub speedup_vs_llama_cpp: f64,
    pub prefill_vs_llama_cpp: f64,
    /// Weight bytes read per decoded token (all decoded tokens, warm-up included).
    pub weight_bytes_per_token: f64,
    /// `weight_bytes_per_token × median decode tok/s`.
    pub gb_per_s: f64,
    /// Highest 1-minute load average seen after a repetition (Linux `/proc/loadavg`).
    pub load_average_max: Option<f64>,
    /// Median time per decoded token spent waiting for the cosines skip decisions read
    /// (µs; 0 on the CPU, where they are computed in line).
    pub decision_wait_us_per_token: f64,
}

/// The 1-minute load average, where the system reports one.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Signs that something else ran while `rows` were measured: a load average above the
/// thread count, or a run more than 3× off its own series' median.
pub fn busy_warnings(rows: &[BenchRow], threads: usize) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(load) = rows
        .iter()
        .filter_map(|r| r.load_average_max)
        .reduce(f64::max)
    {
        // A quarter of a thread of slack: the average jitters around the benchmark's own threads.
        if load > threads as f64 + 0.25 {
            w.push(format!(
                "the load average reached {load:.2} with {threads} benchmark threads: another \
                 process was running, so these figures are unreliable"
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in rows {
        let series = [
            (
                format!("{} {}", r.model, r.policy),
                "decode",
                &r.decode_tokens_per_s,
            ),
            (
                format!("{} {}", r.model, r.policy),
                "prefill",
                &r.prefill_tokens_per_s,
            ),
            (
                format!("{} llama.cpp", r.model),
                "decode",
                &r.llama_cpp_decode_tokens_per_s,
            ),
            (
                format!("{} llama.cpp", r.model),
                "prefill",
                &r.llama_cpp_prefill_tokens_per_s,
            ),
        ];
        for (who, what, s) in series {
            let off = s.median > 0.0 && (s.max > 3.0 * s.median || s.min * 3.0 < s.median);
            if off && seen.insert(format!("{who} {what}")) {
                w.push(format!(
                    "{who}: a {what} run was more than 3× off its median ({:.1} tok/s, range \
                     {:.1}–{:.1}): the machine was busy, rerun",
                    s.median, s.min, s.max
                ));
            }
        }
    }
    w
}

/// The most common matrix type by bytes (the model's "quant type").
pub fn dominant_type(f: &GgufFile) -> GgmlType {
    let mut by: Vec<(GgmlType, u64)> = Vec::new();
    for t in f.tensors().iter().filter(|t| t.shape.len() >= 2) {
        match by.iter_mut().find(|(ty, _)| *ty == t.ty) {
            Some(e) => e.1 += t.n_bytes,
            None => by.push((t.ty, t.n_bytes)),
        }
    }
    by.into_iter()
        .max_by_key(|e| e.1)
        .map_or(GgmlType::F32, |e| e.0)
}

/// Filler prompt text for the prefill measurement.
const FILLER: &str = "The history of the city begins in the early middle ages, when a small settlement grew around the river crossing. ";

/// Measures every policy of `specs` on the model at `path`; `progress` gets one line per step.
pub fn bench_model(
    path: &Path,
    specs: &[PolicySpec],
    cfg: &BenchConfig,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Vec<BenchRow>> {
    let file = GgufFile::open(path)?;
    let model = Llama::load_with(&file, cfg.load)?;
    // llama.cpp offloads as many layers as we do (`-ngl`), and nothing else.
    let peer = match cfg.load.offload {
        Some(o) => LlamaCpp::load_offloaded(path, o.layers.min(999) as u32)?,
        None => LlamaCpp::load(path)?,
    };
    let n_ctx = (cfg.prompt_tokens + cfg.gen_tokens + 32).max(256);
    let mut peer_ctx = peer.context(n_ctx as u32, cfg.threads, PeerMode::Default)?;
    let text = FILLER.repeat(cfg.prompt_tokens / 8 + 8);
    let mut prompt = peer.tokenize(&text, false, false);
    prompt.truncate(cfg.prompt_tokens.max(16));
    let profile = skip_setup::load_profile(cfg.profile.as_deref(), &file)?;
    let mut sessions = Vec::new();
    for spec in specs {
        let opts = SkipOptions {
            policy: spec.policy,
            ratio: Some(spec.ratio),
            compensate: spec.compensate,
            ..cfg.base.clone()
        };
        let setup = skip_setup::build(&opts, profile.as_ref(), &model)
            .map_err(|e| anyhow::anyhow!("{}: --skip {}: {e}", path.display(), spec.label()))?;
        progress(&setup.description);
        sessions.push(Session::with_controller(
            &model,
            SessionConfig::new(n_ctx, cfg.threads),
            setup.controller,
        )?);
    }
    let full_bytes = model.bytes_per_token() as f64;
    let n = specs.len();
    let (mut tg, mut pp) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    let (mut ptg, mut ppp) = (Vec::new(), Vec::new());
    let mut load_max: Option<f64> = None;
    let mut skipped_bytes = vec![0f64; n];
    let mut ratio = vec![0f64; n];
    let mut wait = vec![Vec::new(); n];
    for rep in 0..=cfg.reps {
        // llama.cpp: decode after a 16-token prompt, then prefill.
        peer_ctx.clear();
        peer_ctx.eval(&prompt[..16], false)?;
        let mut t = peer_ctx.argmax_last();
        let start = Instant::now();
        for _ in 0..cfg.gen_tokens {
            peer_ctx.step(t)?;
            t = peer_ctx.argmax_last();
        }
        let peer_tg = cfg.gen_tokens as f64 / start.elapsed().as_secs_f64();
        peer_ctx.clear();
        let start = Instant::now();
        for chunk in prompt.chunks(512) {
            peer_ctx.eval(chunk, false)?;
        }
        let peer_pp = prompt.len() as f64 / start.elapsed().as_secs_f64();
        for (i, s) in sessions.iter_mut().enumerate() {
            s.reset();
            s.controller.reset_stats();
            let mut t = argmax(s.prefill(&prompt[..16])?);
            let waited = s.stage_times().decision_wait;
            let start = Instant::now();
            for _ in 0..cfg.gen_tokens {
                t = argmax(s.decode(t)?);
            }
            let secs = start.elapsed().as_secs_f64();
            let waited = (s.stage_times().decision_wait - waited).as_secs_f64();
            let st = &s.controller.stats;
            if rep > 0 {
                tg[i].push(cfg.gen_tokens as f64 / secs);
                wait[i].push(waited * 1e6 / cfg.gen_tokens as f64);
                skipped_bytes[i] = st.bytes_skipped as f64 / st.decoded_tokens.max(1) as f64;
                ratio[i] = st.ratio();
            }
            s.reset();
            let start = Instant::now();
            s.prefill(&prompt)?;
            if rep > 0 {
                pp[i].push(prompt.len() as f64 / start.elapsed().as_secs_f64());
            }
        }
        if rep == 0 {
            progress("warm-up repetition done");
            continue;
        }
        ptg.push(peer_tg);
        ppp.push(peer_pp);
        if let Some(l) = load_average() {
            load_max = Some(load_max.map_or(l, |m: f64| m.max(l)));
        }
        let med = |v: &[f64]| Summary::of(v).median;
        progress(&format!(
            "rep {rep}/{}: llama.cpp {:.1} tok/s; {}",
            cfg.reps,
            peer_tg,
            specs
                .iter()
                .zip(&tg)
                .map(|(s, v)| format!("{} {:.1}", s.label(), med(&v[v.len() - 1..])))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let (peer_tg, peer_pp) = (Summary::of(&ptg), Summary::of(&ppp));
    let full = specs
        .iter()
        .position(|s| s.policy == Policy::None)
        .map(|i| Summary::of(&tg[i]).median);
    let quant = dominant_type(&file).name().to_uppercase();
    Ok(specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let d = Summary::of(&tg[i]);
            let p = Summary::of(&pp[i]);
            let bytes = full_bytes - skipped_bytes[i];
            BenchRow {
                model: path.display().to_string(),
                quant: quant.clone(),
                policy: spec.label(),
                target_ratio: spec.ratio,
                ffn_skip_ratio: ratio[i],
                decode_tokens_per_s: d,
                prefill_tokens_per_s: p,
                llama_cpp_decode_tokens_per_s: peer_tg,
                llama_cpp_prefill_tokens_per_s: peer_pp,
                speedup_vs_full: full.map(|f| d.median / f),
                speedup_vs_llama_cpp: d.median / peer_tg.median,
                prefill_vs_llama_cpp: p.median / peer_pp.median,
                weight_bytes_per_token: bytes,
                gb_per_s: bytes * d.median / 1e9,
                load_average_max: load_max,
                decision_wait_us_per_token: Summary::of(&wait[i]).median,
            }
        })
        .collect())
}

/// Results as a markdown table.
pub fn markdown(rows: &[BenchRow], cfg: &BenchConfig) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} threads, decode {} tokens after a 16-token prompt, prefill {} tokens, median (min–max) of {} repetitions\n",
        cfg.threads, cfg.gen_tokens, cfg.prompt_tokens, cfg.reps
    );
    let _ = writeln!(
        s,
        "| model | quant | policy | FFN skip | decode tok/s | vs full | vs llama.cpp | llama.cpp decode | prefill tok/s | vs llama.cpp | weights MB/token | GB/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let name = Path::new(&r.model)
            .file_name()
            .map_or(r.model.clone(), |n| n.to_string_lossy().into_owned());
        let d = &r.decode_tokens_per_s;
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {:.1}% | {:.1} ({:.1}–{:.1}) | {} | {:.3}× | {:.1} | {:.1} | {:.3}× | {:.1} | {:.2} |",
            r.quant,
            r.policy,
            r.ffn_skip_ratio * 100.0,
            d.median,
            d.min,
            d.max,
            r.speedup_vs_full
                .map_or("–".into(), |x| format!("{x:.3}×")),
            r.speedup_vs_llama_cpp,
            r.llama_cpp_decode_tokens_per_s.median,
            r.prefill_tokens_per_s.median,
            r.prefill_vs_llama_cpp,
            r.weight_bytes_per_token / 1e6,
            r.gb_per_s
        );
    }
    if let Some(o) = cfg.load.offload {
        let _ = writeln!(
            s,
            "\n{} layers offloaded (-ngl; llama.cpp the same); waiting for skip decisions, µs per decoded token: {}",
            o.layers,
            rows.iter()
                .map(|r| format!("{} {:.0}", r.policy, r.decision_wait_us_per_token))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s.push_str(&compounding(rows));
    s
}

/// With several models: decode tok/s as policy × model, each against the full run of the
/// model that reads the most weight bytes (the highest-precision one), so quantization and
/// skipping read as one speedup.
fn compounding(rows: &[BenchRow]) -> String {
    use std::fmt::Write as _;
    let mut models: Vec<(&str, &str)> = Vec::new();
    let mut policies: Vec<&str> = Vec::new();
    for r in rows {
        if !models.iter().any(|m| m.0 == r.model) {
            models.push((&r.model, &r.quant));
        }
        if !policies.contains(&r.policy.as_str()) {
            policies.push(&r.policy);
        }
    }
    let base = rows.iter().filter(|r| r.policy == "none").max_by(|a, b| {
        a.weight_bytes_per_token
            .total_cmp(&b.weight_bytes_per_token)
    });
    let Some(base) = base.filter(|_| models.len() > 1) else {
        return String::new();
    };
    let mut s = format!(
        "\nDecode tok/s, policy × model, and the ratio to {} ({}) running in full:\n\n| policy |",
        base.quant,
        Path::new(&base.model)
            .file_name()
            .map_or(base.model.clone(), |n| n.to_string_lossy().into_owned())
    );
    for m in &models {
        let _ = write!(s, " {} |", m.1);
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(models.len()));
    s.push('\n');
    for p in policies {
        let _ = write!(s, "| {p} |");
        for m in &models {
            match rows.iter().find(|r| r.model == m.0 && r.policy == p) {
                Some(r) => {
                    let d = r.decode_tokens_per_s.median;
                    let _ = write!(s, " {d:.1} ({:.2}×) |", d / base.decode_tokens_per_s.median);
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Results as CSV (one header line).
pub fn csv(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "model,quant,policy,target_ratio,ffn_skip_ratio,decode_median,decode_min,decode_max,prefill_median,llama_cpp_decode_median,llama_cpp_prefill_median,speedup_vs_full,speedup_vs_llama_cpp,prefill_vs_llama_cpp,weight_bytes_per_token,gb_per_s\n",
    );
    for r in rows {
        let q = |x: &str| {
            if x.contains([',', '"']) {
                format!("\"{}\"", x.replace('"', "\"\""))
            } else {
                x.to_string()
            }
        };
        s.push_str(&format!(
            "{},{},{},{},{:.6},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{:.6},{:.6},{:.0},{:.4}\n",
            q(&r.model),
            r.quant,
            r.policy,
            r.target_ratio,
            r.ffn_skip_ratio,
            r.decode_tokens_per_s.median,
            r.decode_tokens_per_s.min,
            r.decode_tokens_per_s.max,
            r.prefill_tokens_per_s.median,
            r.llama_cpp_decode_tokens_per_s.median,
            r.llama_cpp_prefill_tokens_per_s.median,
            r.speedup_vs_full
                .map_or(String::new(), |x| format!("{x:.6}")),
            r.speedup_vs_llama_cpp,
            r.prefill_vs_llama_cpp,
            r.weight_bytes_per_token,
            r.gb_per_s
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, quant: &str, policy: &str, decode: f64, bytes: f64) -> BenchRow {
        let s = Summary::of(&[decode]);
        BenchRow {
            model: model.into(),
            quant: quant.into(),
            policy: policy.into(),
            target_ratio: 0.25,
            ffn_skip_ratio: 0.25,
            decode_tokens_per_s: s,
            prefill_tokens_per_s: s,
            llama_cpp_decode_tokens_per_s: s,
            llama_cpp_prefill_tokens_per_s: s,
            speedup_vs_full: None,
            speedup_vs_llama_cpp: 1.0,
            prefill_vs_llama_cpp: 1.0,
            weight_bytes_per_token: bytes,
            gb_per_s: 1.0,
            load_average_max: Some(1.0),
            decision_wait_us_per_token: 0.0,
        }
    }

    #[test]
    fn busy_machine_is_reported() {
        let quiet = [row("/m/a.gguf", "Q4_1", "none", 100.0, 1e8)];
        assert!(busy_warnings(&quiet, 2).is_empty());
        let mut loaded = quiet.clone();
        loaded[0].load_average_max = Some(3.5);
        assert_eq!(
            busy_warnings(&loaded, 2),
            [
                "the load average reached 3.50 with 2 benchmark threads: another process was \
              running, so these figures are unreliable"
            ]
        );
        let mut outlier = quiet.clone();
        outlier[0].decode_tokens_per_s = Summary::of(&[100.0, 98.0, 30.0]);
        assert_eq!(
            busy_warnings(&outlier, 2),
            [
                "/m/a.gguf none: a decode run was more than 3× off its median (98.0 tok/s, range \
              30.0–100.0): the machine was busy, rerun"
            ]
        );
    }

    #[test]
    fn compounding_table_is_against_the_largest_full_model() {
        let rows = [
            row("/m/a-q8.gguf", "Q8_0", "none", 100.0, 140e6),
            row("/m/a-q8.gguf", "Q8_0", "adaptive:0.25", 120.0, 120e6),
            row("/m/a-q4.gguf", "Q4_0", "none", 150.0, 90e6),
            row("/m/a-q4.gguf", "Q4_0", "adaptive:0.25", 180.0, 80e6),
        ];
        let t = compounding(&rows);
        assert!(
            t.contains("ratio to Q8_0 (a-q8.gguf) running in full"),
            "{t}"
        );
        assert!(
            t.contains("| none | 100.0 (1.00×) | 150.0 (1.50×) |"),
            "{t}"
        );
        assert!(
            t.contains("| adaptive:0.25 | 120.0 (1.20×) | 180.0 (1.80×) |"),
            "{t}"
        );
        assert_eq!(compounding(&rows[..2]), "");
    }
}

//! The speed × quality frontier (the frontier issue, item 3): joins `bench --json` rows
//! (decode tok/s, weight bytes per token) with `eval --json` perplexity reports (KL divergence
//! to the distributed file's full model) and MBPP pass@1, per file and policy, and charts
//! decode tok/s against KLD with one line per quant type and rule.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::plot::Chart;

/// One (file, policy) point.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Point {
    /// File name of the GGUF.
    pub file: String,
    pub quant: String,
    /// Policy label (`none`, `auto:0.25`, …).
    pub policy: String,
    pub ffn_skip: f64,
    /// Decode tok/s: median, min, max over the bench repetitions.
    pub tok_s: [f64; 3],
    /// llama.cpp decode tok/s on the same file (median).
    pub llama_cpp_tok_s: f64,
    /// Weight bytes read per decoded token.
    pub bytes_per_token: f64,
    /// Share of the full model's weight bytes per token not read (teacher-forced, `eval`).
    pub bytes_skipped: Option<f64>,
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    pub top1: Option<f64>,
    pub pass_at_1: Option<f64>,
}

impl Point {
    /// The rule a point belongs to: the label before `:` (`none` belongs to every rule).
    pub fn rule(&self) -> &str {
        self.policy.split(':').next().unwrap_or("")
    }
}

fn base_name(p: &str) -> String {
    Path::new(p)
        .file_name()
        .map_or_else(|| p.to_string(), |s| s.to_string_lossy().into_owned())
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// Reads a JSON file holding either one value or one value per line (`eval --json` prints
/// one report per task).
fn read_values(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(|v| v.with_context(|| format!("{}: not JSON", path.display())))
        .collect()
}

/// Joins bench rows and eval reports by (file name, policy label).
pub fn join(bench: &[&Path], evals: &[&Path]) -> anyhow::Result<Vec<Point>> {
    let mut points: BTreeMap<(String, String), Point> = BTreeMap::new();
    for path in bench {
        for v in read_values(path)? {
            let rows = v.as_array().with_context(|| {
                format!(
                    "{}: expected the array `bench --json` prints",
                    path.display()
                )
            })?;
            for r in rows {
                let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                let file = base_name(&s("model"));
                let p = points.entry((file.clone(), s("policy"))).or_default();
                p.file = file;
                p.quant = s("quant");
                p.policy = s("policy");
                p.ffn_skip = num(r, &["ffn_skip_ratio"]).unwrap_or(0.0);
                p.tok_s = ["median", "min", "max"]
                    .map(|k| num(r, &["decode_tokens_per_s", k]).unwrap_or(f64::NAN));
                p.llama_cpp_tok_s =
                    num(r, &["llama_cpp_decode_tokens_per_s", "median"]).unwrap_or(f64::NAN);
                p.bytes_per_token = num(r, &["weight_bytes_per_token"]).unwrap_or(f64::NAN);
            }
        }
    }
    for path in evals {
        for report in read_values(path)? {
            let file = base_name(report.get("model").and_then(Value::as_str).unwrap_or(""));
            let task = report.get("task").and_then(Value::as_str).unwrap_or("");
            let Some(results) = report.get("results").and_then(Value::as_array) else {
                anyhow::bail!("{}: expected `eval --json` reports", path.display());
            };
            for r in results {
                let policy = r
                    .get("policy")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let p = points.entry((file.clone(), policy.clone())).or_default();
                if p.file.is_empty() {
                    p.file = file.clone();
                    p.policy = policy;
                    p.tok_s = [f64::NAN; 3];
                    p.llama_cpp_tok_s = f64::NAN;
                    p.bytes_per_token = f64::NAN;
                    p.ffn_skip = num(r, &["ffn_skip_ratio"]).unwrap_or(0.0);
                }
                let m = |k: &str| num(r, &["metrics", k]);
                match task {
                    "perplexity" => {
                        p.kld_mean = m("kld_mean");
                        p.bytes_skipped = num(r, &["weight_bytes_skipped"]);
                        p.kld_p99 = m("kld_p99");
                        p.top1 = m("top1_agreement");
                        // The teacher-forced ratio (every row of every window decides) is the
                        // one the KLD belongs to, and steadier than a short bench run's.
                        p.ffn_skip = num(r, &["ffn_skip_ratio"]).unwrap_or(p.ffn_skip);
                    }
                    "code" => p.pass_at_1 = m("pass_at_1"),
                    _ => {}
                }
            }
        }
    }
    // Files in first-seen order of the bench input (else by name); per file `none` first,
    // then by rule and realized ratio.
    let mut pts: Vec<Point> = points.into_values().collect();
    pts.sort_by(|a, b| {
        a.file
            .cmp(&b.file)
            .then((a.policy != "none").cmp(&(b.policy != "none")))
            .then(a.rule().cmp(b.rule()))
            .then(a.ffn_skip.total_cmp(&b.ffn_skip))
    });
    Ok(pts)
}

/// Markdown table of `points`, files in the given order, policies by rule then ratio.
pub fn markdown(points: &[Point]) -> String {
    let f = |x: Option<f64>, d: usize| x.map_or("–".into(), |x| format!("{x:.d$}"));
    let mut s = String::from(
        "| file | quant | policy | FFN skip | bytes skipped | decode tok/s | vs full | MB/token | KLD mean | KLD p99 | top-1 same | MBPP pass@1 |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        let full = points
            .iter()
            .find(|q| q.file == p.file && q.policy == "none")
            .map(|q| q.tok_s[0]);
        let vs = full
            .filter(|f| f.is_finite() && p.tok_s[0].is_finite())
            .map(|f| p.tok_s[0] / f);
        s.push_str(&format!(
            "| {} | {} | {} | {:.1}% | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.file,
            p.quant,
            p.policy,
            p.ffn_skip * 100.0,
            p.bytes_skipped
                .map_or("–".into(), |b| format!("{:.1}%", b * 100.0)),
            if p.tok_s[0].is_finite() {
                format!("{:.1} ({:.1}–{:.1})", p.tok_s[0], p.tok_s[1], p.tok_s[2])
            } else {
                "–".into()
            },
            vs.map_or("–".into(), |v| format!("{v:.3}×")),
            if p.bytes_per_token.is_finite() {
                format!("{:.1}", p.bytes_per_token / 1e6)
            } else {
                "–".into()
            },
            f(p.kld_mean, 4),
            f(p.kld_p99, 3),
            f(p.top1, 3),
            f(p.pass_at_1, 3),
        ));
    }
    s
}

/// KLD below this is drawn at it (the reference file's own full model has KLD 0).
const KLD_FLOOR: f64 = 1e-3;

/// Decode tok/s against mean KLD (log scale), one line per (file, rule).
pub struct FrontierChart<'a> {
    pub points: &'a [Point],
    pub title: String,
}

impl Chart for FrontierChart<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("plotting: {e}");
        root.fill(&WHITE).map_err(err)?;
        let pts: Vec<&Point> = self
            .points
            .iter()
            .filter(|p| p.tok_s[0].is_finite() && p.kld_mean.is_some())
            .collect();
        let x = |p: &Point| p.kld_mean.unwrap_or(0.0).max(KLD_FLOOR);
        let x_max = pts.iter().map(|p| x(p)).fold(0.01, f64::max) * 2.0;
        let y_max = pts.iter().map(|p| p.tok_s[0]).fold(1.0, f64::max) * 1.1;
        let y_min = pts.iter().map(|p| p.tok_s[0]).fold(y_max, f64::min) * 0.9;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((KLD_FLOOR * 0.7..x_max).log_scale(), y_min..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("mean KL divergence to the distributed file's full model (nats/token, log)")
            .y_desc("decode tokens/s (median)")
            .draw()
            .map_err(err)?;
        // Lines: (file, rule), each starting at the file's full model.
        let mut lines: Vec<(String, String)> = Vec::new();
        for p in &pts {
            if p.policy != "none" && !lines.contains(&(p.file.clone(), p.rule().to_string())) {
                lines.push((p.file.clone(), p.rule().to_string()));
            }
        }
        for (i, (file, rule)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut line: Vec<&Point> = pts
                .iter()
                .copied()
                .filter(|p| p.file == *file && (p.policy == "none" || p.rule() == rule))
                .collect();
            line.sort_by(|a, b| a.ffn_skip.total_cmp(&b.ffn_skip));
            let quant = line.first().map_or("", |p| p.quant.as_str());
            let coords: Vec<(f64, f64)> = line.iter().map(|p| (x(p), p.tok_s[0])).collect();
            chart
                .draw_series(LineSeries::new(coords.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(format!("{quant} {rule}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(coords.iter().map(|&c| Circle::new(c, 3, color.filled())))
                .map_err(err)?;
            chart
                .draw_series(line.iter().filter(|p| p.policy != "none").map(|p| {
                    Text::new(
                        format!("{:.0}%", p.ffn_skip * 100.0),
                        (x(p) * 1.05, p.tok_s[0]),
                        ("sans-serif", 10).into_font().color(&color),
                    )
                }))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_bench_and_eval_by_file_and_policy() {
        let dir = std::env::temp_dir().join(format!("ffnskip-frontier-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = dir.join("b.json");
        std::fs::write(
            &b,
            r#"[{"model":"/x/m.gguf","quant":"Q8_0","policy":"auto:0.25","ffn_skip_ratio":0.25,
                 "decode_tokens_per_s":{"median":12.0,"min":11.0,"max":13.0},
                 "llama_cpp_decode_tokens_per_s":{"median":10.0,"min":9.0,"max":11.0},
                 "weight_bytes_per_token":1.0e9}]"#,
        )
        .unwrap();
        let e = dir.join("e.json");
        std::fs::write(
            &e,
            r#"{"task":"perplexity","model":"/y/m.gguf","results":[{"policy":"auto:0.25","ffn_skip_ratio":0.26,"weight_bytes_skipped":0.125,"metrics":{"kld_mean":0.5,"kld_p99":3.0,"top1_agreement":0.8}}]}
{"task":"code","model":"/y/m.gguf","results":[{"policy":"auto:0.25","ffn_skip_ratio":0.2,"metrics":{"pass_at_1":0.7}}]}"#,
        )
        .unwrap();
        let pts = join(&[&b], &[&e]).unwrap();
        assert_eq!(pts.len(), 1);
        let p = &pts[0];
        assert_eq!(
            (p.file.as_str(), p.quant.as_str(), p.rule()),
            ("m.gguf", "Q8_0", "auto")
        );
        assert_eq!(p.tok_s, [12.0, 11.0, 13.0]);
        assert_eq!(
            (p.kld_mean, p.pass_at_1, p.ffn_skip),
            (Some(0.5), Some(0.7), 0.26)
        );
        assert!(markdown(&pts)
            .contains("| m.gguf | Q8_0 | auto:0.25 | 26.0% | 12.5% | 12.0 (11.0–13.0) |"));
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        let e = join(&[], &[&bad]).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("bad.json: not JSON"), "{e}");
    }
}

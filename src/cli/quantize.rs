//! `ffnskip quantize IN OUT --type T`: requantize a GGUF with llama.cpp's type rules.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::convert::quantize::{check_paths, write_quantized, Plan, Target};
use crate::gguf::{GgmlType, GgufFile};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Input GGUF model (F32/F16/BF16 ideally; quantized input is requantized, with a warning).
    pub input: PathBuf,
    /// Output GGUF file (written to a temporary file, then renamed; must not be the input).
    pub output: PathBuf,
    /// Target: q8_0, q6_k, q5_k (llama.cpp's Q5_K_M mix), q5_0, q4_k (Q4_K_M mix), q4_1,
    /// q4_0 or f16.
    #[arg(long = "type", value_name = "T")]
    pub ty: String,
    /// Worker threads (default: available cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// `61 f32, 211 q8_0`.
fn counts(m: &BTreeMap<GgmlType, usize>) -> String {
    m.iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let target = Target::parse(&a.ty)?;
    check_paths(&a.input, &a.output)?;
    let start = Instant::now();
    let file = GgufFile::open(&a.input)?;
    let plan = Plan::new(&file, target)?;

    let requant = plan.requantized();
    if !requant.is_empty() {
        let n: usize = requant.values().sum();
        eprintln!(
            "warning: {} is already quantized (input types: {}); requantizing {n} tensors to {target} \
             compounds the quantization error — quantize from an F32/F16/BF16 GGUF if you have one",
            a.input.display(),
            counts(&requant)
        );
    }
    let n_fallback = plan.n_fallback();
    if n_fallback > 0 {
        let groups: Vec<String> = plan
            .fallbacks()
            .iter()
            .map(|((chosen, to, ncols), n)| {
                format!(
                    "{n} {chosen} → {to} (row length {ncols} is not a multiple of {})",
                    chosen.block_size()
                )
            })
            .collect();
        eprintln!(
            "fallback: {n_fallback} of {} tensors need a smaller-block type, as llama.cpp does: {}",
            plan.tensors.len(),
            groups.join("; ")
        );
    }

    let total: u64 = plan
        .tensors
        .iter()
        .filter_map(|t| file.tensor_info(&t.name))
        .map(|i| i.n_bytes)
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} in {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("ffnskip-quantize-{i}"))
        .build()?;
    let (mut done, mut written) = (0usize, 0u64);
    let n_tensors = plan.tensors.len();
    let result = pool.install(|| {
        write_quantized(&file, &plan, &a.output, |t, bytes_in, bytes_out| {
            done += 1;
            written += bytes_out;
            bar.inc(bytes_in);
            bar.set_message(format!(
                "→ {} out | [{done}/{n_tensors}] {} {} → {}",
                indicatif::HumanBytes(written),
                t.name,
                t.from,
                t.to
            ));
        })
    });
    bar.finish_and_clear();
    let report = result?;
    eprintln!(
        "quantized {} ({}) → {} ({}) as {target} (general.file_type {}) in {:.1} s: {} tensors: {}{}",
        a.input.display(),
        mb(report.in_file_bytes),
        a.output.display(),
        mb(report.out_file_bytes),
        target.ftype(),
        start.elapsed().as_secs_f64(),
        n_tensors,
        counts(&plan.types()),
        if n_fallback > 0 {
            format!("; {n_fallback} fell back to a smaller-block type")
        } else {
            String::new()
        }
    );
    Ok(())
}

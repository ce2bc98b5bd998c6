//! `ffnskip frontier`: joins `bench --json` and `eval --json` outputs into the speed ×
//! quality frontier (markdown table, JSON, and a tok/s-versus-KLD chart). `scripts/results.sh`
//! drives it.

use std::path::PathBuf;

use clap::Args;

use crate::measure::frontier::{join, markdown, FrontierChart};
use crate::measure::plot::draw_svg_png;

#[derive(Args, Debug)]
pub struct FrontierArgs {
    /// `ffnskip bench --json` output files (repeatable).
    #[arg(long = "bench", value_name = "JSON")]
    pub bench: Vec<PathBuf>,
    /// `ffnskip eval --json` output files: perplexity (KLD) and code (MBPP) reports.
    #[arg(long = "eval", value_name = "JSON")]
    pub eval: Vec<PathBuf>,
    /// Chart title.
    #[arg(long = "title", default_value = "speed × quality frontier")]
    pub title: String,
    /// Write the tok/s-versus-KLD chart to PATH.svg and PATH.png.
    #[arg(long = "plot")]
    pub plot: Option<PathBuf>,
    /// Print JSON instead of a markdown table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: FrontierArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !a.bench.is_empty() || !a.eval.is_empty(),
        "nothing to join: pass --bench and/or --eval files"
    );
    let bench: Vec<&std::path::Path> = a.bench.iter().map(PathBuf::as_path).collect();
    let eval: Vec<&std::path::Path> = a.eval.iter().map(PathBuf::as_path).collect();
    let points = join(&bench, &eval)?;
    if let Some(base) = &a.plot {
        let inputs: Vec<(&str, &std::path::Path)> = bench
            .iter()
            .map(|p| ("--bench", *p))
            .chain(eval.iter().map(|p| ("--eval", *p)))
            .collect();
        let (svg, png) = crate::measure::plot::outputs(base);
        crate::outfile::ensure_not_input("--plot", &svg, &inputs)?;
        crate::outfile::ensure_not_input("--plot", &png, &inputs)?;
        let (svg, png) = draw_svg_png(
            &FrontierChart {
                points: &points,
                title: a.title.clone(),
            },
            base,
            (1000, 640),
        )?;
        eprintln!("wrote {}, {}", svg.display(), png.display());
    }
    if a.json {
        super::outln(&serde_json::to_string_pretty(&points)?)
    } else {
        super::outln(&markdown(&points))
    }
}

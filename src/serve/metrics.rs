//! Server metrics in Prometheus' text format (`GET /metrics`), every name prefixed `ffnskip_`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds of the time-to-first-token histogram, seconds.
const TTFT_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Decode steps whose rate `ffnskip_decode_tokens_per_second` averages over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Inner {
    /// (endpoint, status) → count.
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    generated_tokens: u64,
    decode_tokens: u64,
    decode_seconds: f64,
    /// (time, rows, seconds) of the recent decode steps.
    recent: Vec<(Instant, usize, f64)>,
    ttft_counts: [u64; TTFT_BUCKETS.len()],
    ttft_count: u64,
    ttft_sum: f64,
    queue_depth: usize,
    active: usize,
    slots: usize,
    rejected: u64,
    cancelled: u64,
    /// reason → count.
    finished: BTreeMap<String, u64>,
    /// policy → (skipped, eligible) FFN blocks of finished sequences.
    skip: BTreeMap<String, (u64, u64)>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut m) = self.inner.lock() {
            f(&mut m);
        }
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.with(|m| *m.requests.entry((endpoint.into(), status)).or_default() += 1);
    }
    pub fn prompt_tokens(&self, n: usize) {
        self.with(|m| m.prompt_tokens += n as u64);
    }
    pub fn generated_tokens(&self, n: usize) {
        self.with(|m| m.generated_tokens += n as u64);
    }
    /// One decode step of `rows` sequences that took `t`.
    pub fn decode_step(&self, rows: usize, t: Duration) {
        self.with(|m| {
            let now = Instant::now();
            m.decode_tokens += rows as u64;
            m.decode_seconds += t.as_secs_f64();
            m.recent
                .retain(|(at, _, _)| now.duration_since(*at) < RATE_WINDOW);
            m.recent.push((now, rows, t.as_secs_f64()));
        });
    }
    pub fn first_token(&self, t: Duration) {
        self.with(|m| {
            let s = t.as_secs_f64();
            m.ttft_count += 1;
            m.ttft_sum += s;
            for (c, &b) in m.ttft_counts.iter_mut().zip(&TTFT_BUCKETS) {
                if s <= b {
                    *c += 1;
                }
            }
        });
    }
    pub fn set_queue_depth(&self, n: usize) {
        self.with(|m| m.queue_depth = n);
    }
    /// A sequence took a slot.
    pub fn slot_taken(&self) {
        self.with(|m| m.active += 1);
    }
    /// A slot was freed, before its client hears that its request ended.
    pub fn slot_freed(&self) {
        self.with(|m| m.active = m.active.saturating_sub(1));
    }
    pub fn set_slots(&self, n: usize) {
        self.with(|m| m.slots = n);
    }
    pub fn request_rejected(&self) {
        self.with(|m| m.rejected += 1);
    }
    pub fn cancelled(&self) {
        self.with(|m| m.cancelled += 1);
    }
    pub fn finished(&self, reason: &str, policy: &str, skipped: u64, eligible: u64) {
        self.with(|m| {
            *m.finished.entry(reason.into()).or_default() += 1;
            let e = m.skip.entry(policy.into()).or_default();
            e.0 += skipped;
            e.1 += eligible;
        });
    }

    /// Busy slots now.
    pub fn active(&self) -> usize {
        self.inner.lock().map_or(0, |m| m.active)
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let Ok(m) = self.inner.lock() else {
            return String::new();
        };
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(
                o,
                "# HELP ffnskip_{name} {help}\n# TYPE ffnskip_{name} {kind}"
            );
        };
        head(
            &mut o,
            "requests_total",
            "counter",
            "HTTP requests by endpoint and status.",
        );
        for ((ep, st), n) in &m.requests {
            let _ = writeln!(
                o,
                "ffnskip_requests_total{{endpoint=\"{}\",status=\"{st}\"}} {n}",
                escape(ep)
            );
        }
        let scalar = |o: &mut String, name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(
                o,
                "# HELP ffnskip_{name} {help}\n# TYPE ffnskip_{name} {kind}\nffnskip_{name} {v}"
            );
        };
        scalar(
            &mut o,
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of started requests.",
            m.prompt_tokens as f64,
        );
        scalar(
            &mut o,
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            m.generated_tokens as f64,
        );
        scalar(
            &mut o,
            "decode_seconds_total",
            "counter",
            "Time spent in decode steps.",
            m.decode_seconds,
        );
        let now = Instant::now();
        let (rows, secs) = m
            .recent
            .iter()
            .filter(|(at, _, _)| now.duration_since(*at) < RATE_WINDOW)
            .fold((0usize, 0f64), |(r, s), (_, n, t)| (r + n, s + t));
        let rate = if secs > 0.0 { rows as f64 / secs } else { 0.0 };
        scalar(&mut o, "decode_tokens_per_second", "gauge", "Aggregate decode rate of the steps in the last 10 s (tokens per second of decode time).", rate);
        head(
            &mut o,
            "time_to_first_token_seconds",
            "histogram",
            "From submission to the first generated token.",
        );
        for (c, b) in m.ttft_counts.iter().zip(&TTFT_BUCKETS) {
            let _ = writeln!(
                o,
                "ffnskip_time_to_first_token_seconds_bucket{{le=\"{b}\"}} {c}"
            );
        }
        let _ = writeln!(
            o,
            "ffnskip_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {}\nffnskip_time_to_first_token_seconds_sum {}\nffnskip_time_to_first_token_seconds_count {}",
            m.ttft_count, m.ttft_sum, m.ttft_count
        );
        scalar(
            &mut o,
            "queue_depth",
            "gauge",
            "Requests waiting for a slot.",
            m.queue_depth as f64,
        );
        scalar(
            &mut o,
            "active_slots",
            "gauge",
            "Slots holding a sequence.",
            m.active as f64,
        );
        scalar(
            &mut o,
            "slots",
            "gauge",
            "Sequence slots (--parallel).",
            m.slots as f64,
        );
        scalar(
            &mut o,
            "requests_rejected_total",
            "counter",
            "Requests the engine refused after reading them (400).",
            m.rejected as f64,
        );
        scalar(
            &mut o,
            "requests_cancelled_total",
            "counter",
            "Requests whose client went away before they finished.",
            m.cancelled as f64,
        );
        head(
            &mut o,
            "requests_finished_total",
            "counter",
            "Sequences that finished, by reason.",
        );
        for (r, n) in &m.finished {
            let _ = writeln!(
                o,
                "ffnskip_requests_finished_total{{reason=\"{}\"}} {n}",
                escape(r)
            );
        }
        head(
            &mut o,
            "ffn_skip_ratio",
            "gauge",
            "Skipped / eligible FFN blocks of finished sequences, by policy.",
        );
        for (p, (s, e)) in &m.skip {
            let r = if *e == 0 { 0.0 } else { *s as f64 / *e as f64 };
            let _ = writeln!(o, "ffnskip_ffn_skip_ratio{{policy=\"{}\"}} {r}", escape(p));
        }
        head(
            &mut o,
            "ffn_blocks_skipped_total",
            "counter",
            "FFN blocks skipped by finished sequences, by policy.",
        );
        for (p, (s, _)) in &m.skip {
            let _ = writeln!(
                o,
                "ffnskip_ffn_blocks_skipped_total{{policy=\"{}\"}} {s}",
                escape(p)
            );
        }
        o
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

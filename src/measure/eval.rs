//! Quality under skipping (DESIGN §3): per task and policy, against the full model on the same
//! prompts. Every item's result is appended to a JSONL file as soon as it is done, so an
//! interrupted run keeps what it finished and a rerun resumes where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::bench::PolicySpec;
use super::code::{self, CodeFormat, CodeProblem};
use super::data::{self, MtBenchItem, QaItem, Story};
use super::metrics;
use crate::chat::{ChatTemplate, Message};
use crate::gguf::GgufFile;
use crate::model::Llama;
use crate::prompt_cache::PromptCache;
use crate::sampling::{Sampler, SamplerConfig};
use crate::session::{generate, GenerateOptions, Session, SessionConfig};
use crate::skip::compensation::Compensation;
use crate::skip::{Policy, SkipController, SkipOptions};
use crate::skip_setup::{self, SourcedProfile};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Freebaseqa,
    Perplexity,
    Agreement,
    Summarize,
    Code,
}

impl Task {
    pub const ALL: [Task; 5] = [
        Task::Freebaseqa,
        Task::Perplexity,
        Task::Agreement,
        Task::Summarize,
        Task::Code,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Freebaseqa => "freebaseqa",
            Task::Perplexity => "perplexity",
            Task::Agreement => "agreement",
            Task::Summarize => "summarize",
            Task::Code => "code",
        }
    }

    /// Items evaluated when `--limit` is not given.
    pub fn default_limit(self) -> usize {
        match self {
            Task::Freebaseqa => 200,
            Task::Perplexity => 8,
            Task::Agreement => 20,
            Task::Summarize => 6,
            Task::Code => 50,
        }
    }
}

/// The FreebaseQA prompt (user turn of the chat template; `Question: …\nAnswer:` as a raw
/// prompt for models without a template). Fixed so that results are comparable.
/// Memory for prompts prefilled once and restored for every other policy (eval cost; prompts
/// always run in full). 2 GiB holds ~75k positions of Qwen2.5-Coder-1.5B's f16 cache.
const PROMPT_CACHE_BYTES: usize = 2 << 30;

pub const FREEBASEQA_PROMPT: &str =
    "Answer the following question with just the answer, in a few words.\nQuestion: {question}";
/// The summarization prompt (user turn), after LLM-KICK's CNN/DM setup.
pub const SUMMARIZE_PROMPT: &str =
    "Summarize the following news article in three sentences.\n\n{article}";
/// Most tokens generated per code completion (it usually stops earlier, at the end of the
/// function).
pub const CODE_TOKENS: usize = 384;
/// Tokens per perplexity window (the first token is the prompt, the rest teacher-forced).
pub const PPL_WINDOW: usize = 512;

#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// Policies; `none` (the reference) is run first whether listed or not.
    pub specs: Vec<PolicySpec>,
    pub data: Option<PathBuf>,
    /// Items per task for every task (else `Task::default_limit`) …
    pub limit: Option<usize>,
    /// … overridden per task (`Task::name` → items).
    pub task_limits: BTreeMap<String, usize>,
    pub threads: usize,
    /// Skip options other than policy and ratio.
    pub base: SkipOptions,
    pub profile: Option<PathBuf>,
    /// Where per-item results are kept (resume).
    pub out_dir: PathBuf,
    /// Most tokens generated per answer (agreement, summarize; FreebaseQA uses 32).
    pub gen_tokens: usize,
    /// Layout of the code task's problem file.
    pub code_format: CodeFormat,
    /// Perplexity: another model's `perplexity/none.jsonl` whose full-model distributions
    /// every policy here (`none` too) is scored against, so requantized files and skipping
    /// share one KL divergence scale.
    pub kld_reference: Option<PathBuf>,
}

/// One item's outcome under one policy, as stored in the JSONL files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemRecord {
    pub id: String,
    #[serde(default)]
    pub tokens: Vec<u32>,
    #[serde(default)]
    pub text: String,
    pub skipped_ffn: u64,
    pub eligible_ffn: u64,
    /// Tokens counted for skipping (from the first one allowed to skip) and the weight bytes
    /// they did not read.
    #[serde(default)]
    pub counted_tokens: u64,
    #[serde(default)]
    pub bytes_skipped: u64,
    /// Tokens and seconds of decoding (or of teacher-forced evaluation for perplexity).
    pub decode_tokens: u64,
    pub decode_secs: f64,
    pub metrics: BTreeMap<String, f64>,
    /// Perplexity windows of the full model: its distribution at each teacher-forced position
    /// (top [`metrics::KLD_TOP_K`] tokens), the reference of every policy's KL divergence.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference: Vec<metrics::TopK>,
    /// Perplexity windows of a policy: KL(full ‖ policy) in nats at each position.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kld: Vec<f32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyResult {
    pub policy: String,
    pub ffn_skip_ratio: f64,
    /// Share of the full model's weight bytes per token not read, over counted tokens: FFN
    /// skips plus the attention matrices that ShortGPT and early exit also leave out.
    pub weight_bytes_skipped: f64,
    pub decode_tokens_per_s: f64,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskReport {
    pub task: Task,
    pub model: String,
    pub results: Vec<PolicyResult>,
}

/// One evaluation item, whatever the task.
enum Item {
    Qa(QaItem),
    Ppl { id: String, tokens: Vec<u32> },
    Chat(MtBenchItem),
    Story(Story),
    Code(CodeProblem),
}

impl Item {
    fn id(&self) -> String {
        match self {
            Item::Qa(q) => q.id.clone(),
            Item::Ppl { id, .. } => id.clone(),
            Item::Chat(m) => m.id.to_string(),
            Item::Story(s) => format!("{}/{}", s.bucket, s.id),
            Item::Code(p) => p.id.clone(),
        }
    }
}

/// Loads the model, tokenizer and chat template once for every task.
pub struct Evaluator<'m> {
    pub path: PathBuf,
    pub file: &'m GgufFile,
    pub model: &'m Llama<'m>,
    pub tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    profile: Option<SourcedProfile>,
    pub cfg: EvalConfig,
}

impl<'m> Evaluator<'m> {
    pub fn new(
        path: &Path,
        file: &'m GgufFile,
        model: &'m Llama<'m>,
        cfg: EvalConfig,
    ) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::from_gguf(file)?;
        let template = match file.opt_str("tokenizer.chat_template")? {
            Some(src) => {
                let text = |t: Option<u32>| t.map_or("", |t| tokenizer.token_text(t)).to_string();
                Some(ChatTemplate::new(
                    &path.display().to_string(),
                    src,
                    &text(tokenizer.bos()),
                    &text(tokenizer.eos()),
                )?)
            }
            None => None,
        };
        let profile = skip_setup::load_profile(cfg.profile.as_deref(), file)?;
        Ok(Evaluator {
            path: path.to_path_buf(),
            file,
            model,
            tokenizer,
            template,
            profile,
            cfg,
        })
    }

    fn specs(&self) -> Vec<PolicySpec> {
        let mut specs = vec![PolicySpec {
            policy: Policy::None,
            ratio: 0.0,
            compensate: Compensation::None,
        }];
        specs.extend(
            self.cfg
                .specs
                .iter()
                .filter(|s| s.policy != Policy::None)
                .cloned(),
        );
        specs
    }

    fn controller(&self, spec: &PolicySpec) -> anyhow::Result<SkipController> {
        let opts = SkipOptions {
            policy: spec.policy,
            ratio: Some(spec.ratio),
            compensate: spec.compensate,
            ..self.cfg.base.clone()
        };
        let setup = skip_setup::build(&opts, self.profile.as_ref(), self.model)
            .with_context(|| format!("--skip {}", spec.label()))?;
        Ok(setup.controller)
    }

    /// Prompt ids: the chat template around `user` when the model has one, else `raw`.
    fn prompt(&self, user: &str, raw: &str) -> anyhow::Result<Vec<u32>> {
        Ok(match &self.template {
            Some(t) => {
                let text = t.render(&[Message::new("user", user)], true)?;
                self.tokenizer.encode(&text, true, true)
            }
            None => self.tokenizer.encode(raw, true, false),
        })
    }

    /// Items evaluated for `task`.
    pub fn limit(&self, task: Task) -> usize {
        self.cfg
            .task_limits
            .get(task.name())
            .copied()
            .or(self.cfg.limit)
            .unwrap_or(task.default_limit())
    }

    fn items(&self, task: Task) -> anyhow::Result<Vec<Item>> {
        let data = self.cfg.data.as_deref();
        let limit = self.limit(task);
        Ok(match task {
            Task::Freebaseqa => data::load_freebaseqa(&data::resolve(data, data::FREEBASEQA_DEV)?)?
                .into_iter()
                .take(limit)
                .map(Item::Qa)
                .collect(),
            Task::Agreement => data::load_mt_bench(&data::resolve(data, data::MT_BENCH)?)?
                .into_iter()
                .take(limit)
                .map(Item::Chat)
                .collect(),
            Task::Summarize => {
                // `limit` stories per length bucket, each story once.
                let stories = data::load_cnndm(&data::resolve(data, data::CNNDM_STORIES)?)?;
                let mut seen = std::collections::HashSet::new();
                let mut per: BTreeMap<String, usize> = BTreeMap::new();
                let per_bucket = limit.div_ceil(3).max(1);
                stories
                    .into_iter()
                    .filter(|s| seen.insert(s.id.clone()))
                    .filter(|s| {
                        let n = per.entry(s.bucket_by_words.clone()).or_default();
                        *n += 1;
                        *n <= per_bucket
                    })
                    .take(limit)
                    .map(Item::Story)
                    .collect()
            }
            Task::Code => {
                let file = match self.cfg.code_format {
                    CodeFormat::Mbpp => data::resolve(data, code::MBPP_SANITIZED)?,
                    CodeFormat::Humaneval => match data {
                        Some(p) if p.is_file() => p.to_path_buf(),
                        _ => anyhow::bail!(
                            "--code-format humaneval: pass the problem file with --data FILE.jsonl"
                        ),
                    },
                };
                code::load_problems(&file, self.cfg.code_format)?
                    .into_iter()
                    .take(limit)
                    .map(Item::Code)
                    .collect()
            }
            Task::Perplexity => {
                let text = data::load_wikitext2_test(&data::resolve(data, data::WIKITEXT2_TEST)?)?;
                let want = limit * PPL_WINDOW;
                let mut end = text.len().min(want * 8 + 4096);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                let ids = self.tokenizer.encode(&text[..end], false, false);
                ids.chunks_exact(PPL_WINDOW)
                    .take(limit)
                    .enumerate()
                    .map(|(i, w)| Item::Ppl {
                        id: format!("window-{i}"),
                        tokens: w.to_vec(),
                    })
                    .collect()
            }
        })
    }

    /// Runs `task` for every policy, resuming from the stored records; returns the report.
    pub fn run(&self, task: Task, progress: &mut dyn FnMut(&str)) -> anyhow::Result<TaskReport> {
        let items = self.items(task)?;
        anyhow::ensure!(!items.is_empty(), "{}: no items to evaluate", task.name());
        let dir = self.cfg.out_dir.join(task.name());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut reference: BTreeMap<String, ItemRecord> = BTreeMap::new();
        let external = match (&self.cfg.kld_reference, task) {
            (Some(p), Task::Perplexity) => {
                reference = load_records(p)?;
                reference.retain(|_, r| !r.reference.is_empty());
                anyhow::ensure!(
                    items.iter().any(|i| reference.contains_key(&i.id())),
                    "--kld-reference {}: no full-model distributions for these perplexity windows \
                     (expected the perplexity/none.jsonl of an eval of the same tokenizer and data)",
                    p.display()
                );
                true
            }
            _ => false,
        };
        let mut results = Vec::new();
        let mut prompts = Some(PromptCache::new(PROMPT_CACHE_BYTES));
        for spec in self.specs() {
            let path = dir.join(format!("{}.jsonl", spec.label().replace(':', "-")));
            let mut inputs: Vec<(&str, &Path)> = vec![("-m/--model", &self.path)];
            if let Some(d) = &self.cfg.data {
                inputs.push(("--data", d));
            }
            if let Some(p) = &self.cfg.profile {
                inputs.push(("--skip-profile", p));
            }
            if let Some(p) = &self.cfg.kld_reference {
                inputs.push(("--kld-reference", p));
            }
            crate::outfile::ensure_not_input("result file", &path, &inputs)?;
            let mut done = load_records(&path)?;
            if task == Task::Perplexity {
                // Windows stored before KL divergence was measured run again.
                let full = spec.policy == Policy::None && !external;
                done.retain(|_, r| {
                    !(if full {
                        r.reference.is_empty()
                    } else {
                        r.kld.is_empty()
                    })
                });
            }
            let todo = items.iter().filter(|i| !done.contains_key(&i.id())).count();
            progress(&format!(
                "{} / {}: {} items ({} done before)",
                task.name(),
                spec.label(),
                items.len(),
                items.len() - todo
            ));
            if todo > 0 {
                // Teacher-forced batches must score what decoding would produce.
                let config = SessionConfig {
                    exact_batches: true,
                    ..SessionConfig::new(4096.min(self.model.config.n_ctx_train), self.cfg.threads)
                };
                let mut session =
                    Session::with_controller(self.model, config, self.controller(&spec)?)?;
                if let Some(c) = prompts.take() {
                    session = session.with_prompt_cache(c);
                }
                // The whole file is rewritten atomically after each item: an interruption
                // leaves every finished item and no cut line.
                let mut jsonl = String::new();
                for rec in done.values() {
                    jsonl.push_str(&serde_json::to_string(rec)?);
                    jsonl.push('\n');
                }
                let bar = indicatif::ProgressBar::new(todo as u64).with_style(
                    indicatif::ProgressStyle::with_template(
                        "  {prefix} [{bar:30}] {pos}/{len} {elapsed_precise}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_prefix(format!("{} {}", task.name(), spec.label()));
                let pending: Vec<&Item> = items
                    .iter()
                    .filter(|i| !done.contains_key(&i.id()))
                    .collect();
                for item in pending {
                    let rec = self.run_item(&mut session, item, reference.get(&item.id()))?;
                    jsonl.push_str(&serde_json::to_string(&rec)?);
                    jsonl.push('\n');
                    crate::outfile::write_atomic(&path, jsonl.as_bytes())?;
                    done.insert(rec.id.clone(), rec);
                    bar.inc(1);
                }
                bar.finish_and_clear();
                prompts = session.take_prompt_cache();
                if let Some(c) = &mut prompts {
                    if c.reused_tokens > 0 {
                        progress(&format!(
                            "  {} prompt tokens restored from the full model's prefill ({} prompts, {} MiB kept)",
                            c.reused_tokens,
                            c.len(),
                            c.bytes() >> 20
                        ));
                        c.reused_tokens = 0;
                    }
                }
            }
            // Aggregate in item order (records of items outside this run's slice are ignored).
            let recs: Vec<&ItemRecord> = items.iter().filter_map(|i| done.get(&i.id())).collect();
            results.push(aggregate(
                task,
                &spec,
                &recs,
                &reference,
                self.model.bytes_per_token() as f64,
            ));
            if spec.policy == Policy::None && !external {
                reference = done;
            }
        }
        Ok(TaskReport {
            task,
            model: self.path.display().to_string(),
            results,
        })
    }

    fn run_item(
        &self,
        s: &mut Session<'_, SkipController>,
        item: &Item,
        full: Option<&ItemRecord>,
    ) -> anyhow::Result<ItemRecord> {
        s.reset();
        s.controller.reset_stats();
        let mut m = BTreeMap::new();
        let (mut reference, mut kld) = (Vec::new(), Vec::new());
        let Answer {
            text,
            tokens,
            decode_steps: decode_tokens,
            decode_secs,
        } = match item {
            Item::Ppl { tokens, .. } => {
                // First token as the prompt, the rest teacher-forced with the policy active
                // per row (warm-up honoured): the same computation as generating them.
                let first = s.prefill(&tokens[..1])?.to_vec();
                let start = Instant::now();
                let rest = s.eval_all(&tokens[1..tokens.len() - 1], false)?;
                let secs = start.elapsed().as_secs_f64();
                let nv = self.model.config.n_vocab;
                let mut nll = -metrics::log_softmax_at(&first, tokens[1]);
                for (row, &next) in rest.chunks_exact(nv).zip(&tokens[2..]) {
                    nll -= metrics::log_softmax_at(row, next);
                }
                m.insert("nll_sum".into(), nll);
                let rows = std::iter::once(&first[..]).chain(rest.chunks_exact(nv));
                match full.map(|f| &f.reference) {
                    // The full model: its distributions become the reference.
                    None => {
                        reference = rows
                            .map(|r| metrics::top_k(r, metrics::KLD_TOP_K))
                            .collect()
                    }
                    Some(refs) => {
                        let mut same = 0usize;
                        for (p, row) in refs.iter().zip(rows) {
                            if let Some((kl, top1)) = metrics::kld_top_k(p, row) {
                                kld.push(kl as f32);
                                same += usize::from(top1);
                            }
                        }
                        m.insert("top1_same".into(), same as f64);
                    }
                }
                m.insert("predicted".into(), (tokens.len() - 1) as f64);
                Answer {
                    text: String::new(),
                    tokens: Vec::new(),
                    decode_steps: (tokens.len() - 2) as u64,
                    decode_secs: secs,
                }
            }
            Item::Qa(q) => {
                let user = FREEBASEQA_PROMPT.replace("{question}", &q.question);
                let raw = format!("Question: {}\nAnswer:", q.question);
                let ids = self.prompt(&user, &raw)?;
                let g = self.greedy(s, &ids, 32)?;
                m.insert(
                    "correct".into(),
                    f64::from(u8::from(metrics::answer_matches(&g.text, &q.answers))),
                );
                // Teacher-forced log-probability of the first gold answer, policy active.
                let stats = s.controller.stats.clone();
                s.reset();
                let gold = self.tokenizer.encode(
                    &format!(
                        "{}{}",
                        if self.template.is_some() { "" } else { " " },
                        q.answers[0]
                    ),
                    false,
                    false,
                );
                let mut lp = 0.0;
                if !gold.is_empty() {
                    let first = s.prefill(&ids)?.to_vec();
                    lp += metrics::log_softmax_at(&first, gold[0]);
                    if gold.len() > 1 {
                        let nv = self.model.config.n_vocab;
                        let rest = s.eval_all(&gold[..gold.len() - 1], false)?;
                        for (row, &next) in rest.chunks_exact(nv).zip(&gold[1..]) {
                            lp += metrics::log_softmax_at(row, next);
                        }
                    }
                }
                s.controller.stats = stats;
                m.insert("gold_logprob".into(), lp);
                g
            }
            Item::Chat(c) => {
                let ids = self.prompt(&c.first_turn, &c.first_turn)?;
                self.greedy(s, &ids, self.cfg.gen_tokens)?
            }
            Item::Code(p) => {
                // Completion mode: the raw prompt, no chat template; stop at the function's end.
                let ids = self.tokenizer.encode(&p.prompt, true, false);
                let g = self.greedy_until(s, &ids, CODE_TOKENS, &p.stop)?;
                let outcome = code::run_program(&p.program(&g.text), code::Limits::default())?;
                m.insert(
                    "passed".into(),
                    f64::from(u8::from(outcome == code::Outcome::Passed)),
                );
                m.insert(
                    "timed_out".into(),
                    f64::from(u8::from(outcome == code::Outcome::TimedOut)),
                );
                g
            }
            Item::Story(st) => {
                // Articles longer than the context allows are cut (by words) to fit.
                let budget = s.n_ctx().saturating_sub(self.cfg.gen_tokens + 8);
                let mut words: Vec<&str> = st.article.split_whitespace().collect();
                let ids = loop {
                    let article = words.join(" ");
                    let user = SUMMARIZE_PROMPT.replace("{article}", &article);
                    let raw = format!("{article}\n\nSummary:");
                    let ids = self.prompt(&user, &raw)?;
                    if ids.len() <= budget || words.len() <= 16 {
                        break ids;
                    }
                    let keep = words.len() * budget / ids.len();
                    words.truncate(keep.min(words.len() - 1).max(16));
                };
                m.insert("article_words_used".into(), words.len() as f64);
                let g = self.greedy(s, &ids, self.cfg.gen_tokens)?;
                m.insert(
                    "rouge_l_reference".into(),
                    metrics::rouge_l(&g.text, &st.highlights).f1,
                );
                m.insert("article_words".into(), st.article_words as f64);
                g
            }
        };
        if !matches!(item, Item::Ppl { .. }) {
            m.insert("collapse".into(), metrics::collapse_score(&text));
            if let Some(f) = full {
                m.insert(
                    "identical_to_full".into(),
                    f64::from(u8::from(tokens == f.tokens)),
                );
                m.insert(
                    "first_divergence".into(),
                    metrics::first_divergence(&tokens, &f.tokens) as f64,
                );
                m.insert("match_rate".into(), metrics::match_rate(&tokens, &f.tokens));
                m.insert("rouge_l_full".into(), metrics::rouge_l(&text, &f.text).f1);
            }
        }
        let st = &s.controller.stats;
        Ok(ItemRecord {
            id: item.id(),
            tokens,
            text,
            skipped_ffn: st.skipped_ffn,
            eligible_ffn: st.eligible_ffn,
            counted_tokens: st.counted_tokens,
            bytes_skipped: st.bytes_skipped,
            decode_tokens,
            decode_secs,
            metrics: m,
            reference,
            kld,
        })
    }

    /// Greedy answer to `prompt`, at most `max` tokens (fewer when the context is full).
    fn greedy(
        &self,
        s: &mut Session<'_, SkipController>,
        prompt: &[u32],
        max: usize,
    ) -> anyhow::Result<Answer> {
        self.greedy_until(s, prompt, max, &[])
    }

    /// [`Self::greedy`], stopping before any of `stop`.
    fn greedy_until(
        &self,
        s: &mut Session<'_, SkipController>,
        prompt: &[u32],
        max: usize,
        stop: &[String],
    ) -> anyhow::Result<Answer> {
        let free = s.n_ctx().saturating_sub(prompt.len() + 1);
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        let g = generate(
            s,
            &self.tokenizer,
            &mut sampler,
            prompt,
            &GenerateOptions {
                max_tokens: max.min(free).max(1),
                stop: stop.to_vec(),
            },
            &mut |_: &str| std::ops::ControlFlow::Continue(()),
        )?;
        Ok(Answer {
            decode_steps: g.tokens.len().saturating_sub(1) as u64,
            decode_secs: g.decode.as_secs_f64(),
            text: g.text,
            tokens: g.tokens,
        })
    }
}

/// What an item produced under one policy: generated text and ids (empty for perplexity
/// windows) and the decode work it took.
struct Answer {
    text: String,
    tokens: Vec<u32>,
    /// Decode steps (generated tokens after the first, which comes from the prefill; for a
    /// perplexity window, the teacher-forced rows after the first).
    decode_steps: u64,
    decode_secs: f64,
}

fn load_records(path: &Path) -> anyhow::Result<BTreeMap<String, ItemRecord>> {
    let mut out = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(out);
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ItemRecord>(line) {
            Ok(r) => {
                out.insert(r.id.clone(), r);
            }
            // A line cut by an interruption is redone; anything else is an error.
            Err(_) if i + 1 == text.lines().count() && !text.ends_with('\n') => {}
            Err(e) => anyhow::bail!("{}:{}: not an eval record: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v {
        s += x;
        n += 1;
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

fn aggregate(
    task: Task,
    spec: &PolicySpec,
    recs: &[&ItemRecord],
    reference: &BTreeMap<String, ItemRecord>,
    bytes_per_token: f64,
) -> PolicyResult {
    let skipped: u64 = recs.iter().map(|r| r.skipped_ffn).sum();
    let counted: u64 = recs.iter().map(|r| r.counted_tokens).sum();
    let bytes: u64 = recs.iter().map(|r| r.bytes_skipped).sum();
    let eligible: u64 = recs.iter().map(|r| r.eligible_ffn).sum();
    let toks: u64 = recs.iter().map(|r| r.decode_tokens).sum();
    let secs: f64 = recs.iter().map(|r| r.decode_secs).sum();
    let metric = |k: &str| mean(recs.iter().filter_map(|r| r.metrics.get(k).copied()));
    let mut m = BTreeMap::new();
    m.insert("items".into(), recs.len() as f64);
    match task {
        Task::Perplexity => {
            let nll: f64 = recs.iter().filter_map(|r| r.metrics.get("nll_sum")).sum();
            let n: f64 = recs.iter().filter_map(|r| r.metrics.get("predicted")).sum();
            let ppl = (nll / n.max(1.0)).exp();
            m.insert("perplexity".into(), ppl);
            m.insert("tokens".into(), n);
            let full: f64 = recs
                .iter()
                .filter_map(|r| reference.get(&r.id)?.metrics.get("nll_sum"))
                .sum();
            if !reference.is_empty() {
                m.insert("perplexity_vs_full".into(), ppl / (full / n.max(1.0)).exp());
            }
            // KL(full ‖ policy) over every scored position; the full model against itself is 0.
            let mut kld: Vec<f32> = recs.iter().flat_map(|r| r.kld.iter().copied()).collect();
            if !kld.is_empty() {
                kld.sort_by(f32::total_cmp);
                let q = |f: f64| kld[((kld.len() - 1) as f64 * f).round() as usize] as f64;
                m.insert("kld_mean".into(), mean(kld.iter().map(|&x| x as f64)));
                m.insert("kld_median".into(), q(0.5));
                m.insert("kld_p99".into(), q(0.99));
                let same: f64 = recs.iter().filter_map(|r| r.metrics.get("top1_same")).sum();
                m.insert("top1_agreement".into(), same / kld.len() as f64);
            } else if spec.policy == Policy::None {
                // The full model against itself (`--kld-reference` scores it like the rest).
                m.insert("kld_mean".into(), 0.0);
                m.insert("top1_agreement".into(), 1.0);
            }
        }
        _ => {
            for k in [
                "passed",
                "timed_out",
                "correct",
                "gold_logprob",
                "collapse",
                "identical_to_full",
                "first_divergence",
                "match_rate",
                "rouge_l_full",
                "rouge_l_reference",
            ] {
                let v = metric(k);
                if !v.is_nan() {
                    let name = match k {
                        "correct" => "accuracy",
                        "passed" => "pass_at_1",
                        _ => k,
                    };
                    m.insert(name.into(), v);
                }
            }
            for (key, name) in [("correct", "accuracy_vs_full"), ("passed", "pass_vs_full")] {
                if reference.is_empty() || metric(key).is_nan() {
                    continue;
                }
                let full = mean(
                    recs.iter()
                        .filter_map(|r| reference.get(&r.id)?.metrics.get(key).copied()),
                );
                if full > 0.0 {
                    m.insert(name.into(), metric(key) / full);
                }
            }
        }
    }
    PolicyResult {
        policy: spec.label(),
        ffn_skip_ratio: if eligible == 0 {
            0.0
        } else {
            skipped as f64 / eligible as f64
        },
        weight_bytes_skipped: if counted == 0 || bytes_per_token <= 0.0 {
            0.0
        } else {
            bytes as f64 / (counted as f64 * bytes_per_token)
        },
        decode_tokens_per_s: if secs > 0.0 { toks as f64 / secs } else { 0.0 },
        metrics: m,
    }
}

/// A metric for a table: counts as integers, large values in exponent form.
fn fmt_metric(v: f64) -> String {
    if !v.is_finite() {
        format!("{v}")
    } else if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if v.abs() >= 1e5 {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

/// A report as a markdown table.
pub fn markdown(r: &TaskReport) -> String {
    use std::fmt::Write as _;
    let mut keys: Vec<&String> = Vec::new();
    for p in &r.results {
        for k in p.metrics.keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let mut s = format!(
        "### {} — {}\n\n| policy | FFN skip | weight bytes skipped | tok/s |",
        r.task.name(),
        r.model
    );
    for k in &keys {
        let _ = write!(s, " {k} |");
    }
    s.push_str("\n|---|---|---|---|");
    s.push_str(&"---|".repeat(keys.len()));
    s.push('\n');
    for p in &r.results {
        let _ = write!(
            s,
            "| {} | {:.1}% | {:.1}% | {:.1} |",
            p.policy,
            p.ffn_skip_ratio * 100.0,
            p.weight_bytes_skipped * 100.0,
            p.decode_tokens_per_s
        );
        for k in &keys {
            match p.metrics.get(*k) {
                Some(v) => {
                    let _ = write!(s, " {} |", fmt_metric(*v));
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

/// One row per policy across the tasks of one run: the headline figure of each task next to
/// the realized skip ratios.
pub fn summary_markdown(reports: &[TaskReport]) -> String {
    use std::fmt::Write as _;
    // (task, metric key, column title)
    const COLUMNS: [(Task, &str, &str); 13] = [
        (Task::Code, "pass_at_1", "code pass@1"),
        (Task::Code, "identical_to_full", "code same as full"),
        (Task::Perplexity, "kld_mean", "KLD mean (nats)"),
        (Task::Perplexity, "top1_agreement", "top-1 same"),
        (Task::Perplexity, "perplexity_vs_full", "ppl ×full"),
        (Task::Freebaseqa, "accuracy_vs_full", "QA acc ×full"),
        (Task::Freebaseqa, "gold_logprob", "QA gold logprob"),
        (Task::Freebaseqa, "identical_to_full", "QA same as full"),
        (
            Task::Agreement,
            "first_divergence",
            "MT-Bench tokens to divergence",
        ),
        (Task::Agreement, "match_rate", "MT-Bench match"),
        (Task::Agreement, "rouge_l_full", "MT-Bench ROUGE-L vs full"),
        (Task::Summarize, "rouge_l_full", "CNN/DM ROUGE-L vs full"),
        (
            Task::Summarize,
            "rouge_l_reference",
            "CNN/DM ROUGE-L vs highlights",
        ),
    ];
    let cols: Vec<_> = COLUMNS
        .iter()
        .filter(|c| reports.iter().any(|r| r.task == c.0))
        .collect();
    let mut policies: Vec<&str> = Vec::new();
    for r in reports {
        for p in &r.results {
            if !policies.contains(&p.policy.as_str()) {
                policies.push(&p.policy);
            }
        }
    }
    let mut s = String::from(
        "| policy | FFN skip (per task) | weight bytes skipped (per task) | collapse (max) |",
    );
    for c in &cols {
        let _ = write!(s, " {} |", c.2);
    }
    s.push_str("\n|---|---|---|---|");
    s.push_str(&"---|".repeat(cols.len()));
    s.push('\n');
    for pol in policies {
        let rows: Vec<(Task, &PolicyResult)> = reports
            .iter()
            .filter_map(|r| Some((r.task, r.results.iter().find(|p| p.policy == pol)?)))
            .collect();
        let ratios: Vec<String> = rows
            .iter()
            .map(|(_, p)| format!("{:.1}", p.ffn_skip_ratio * 100.0))
            .collect();
        let bytes: Vec<String> = rows
            .iter()
            .map(|(_, p)| format!("{:.1}", p.weight_bytes_skipped * 100.0))
            .collect();
        let collapse = rows
            .iter()
            .filter_map(|(_, p)| p.metrics.get("collapse").copied())
            .fold(f64::NAN, f64::max);
        let _ = write!(
            s,
            "| {pol} | {}% | {}% | {} |",
            ratios.join(" / "),
            bytes.join(" / "),
            if collapse.is_nan() {
                "–".into()
            } else {
                format!("{collapse:.3}")
            }
        );
        for c in &cols {
            match rows
                .iter()
                .find(|(t, _)| *t == c.0)
                .and_then(|(_, p)| p.metrics.get(c.1))
            {
                Some(v) => {
                    let _ = write!(s, " {} |", fmt_metric(*v));
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    let _ = write!(
        s,
        "\nPer-task figures in the order {}.\n",
        reports
            .iter()
            .map(|r| r.task.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    s
}

//! Loaders for the evaluation data of `ffnskip eval` (DESIGN.md §3), as laid out under
//! `shared/data` (provenance and exact conversions: `shared/data/PROVENANCE.md`):
//!
//! - FreebaseQA dev v1.1 (Jiang et al., NAACL 2019): [`FREEBASEQA_DEV`], 3,994 questions.
//! - MT-Bench questions (Zheng et al. 2023, lm-sys/FastChat): [`MT_BENCH`], 80 questions.
//! - CNN/DailyMail stories picked by LLM-KICK (Jaiswal et al., ICLR 2024): [`CNNDM_STORIES`],
//!   90 records, 30 per length bucket (small, mid, large).
//! - wikitext-2 raw test split (Merity et al. 2016): [`WIKITEXT2_TEST`].
//!
//! Every loader takes a path that is either the file itself or a data directory (the file is
//! then looked up at its relative path inside it, see [`resolve`]). Malformed content is an
//! error naming the file and the 1-based line (`FILE:LINE: ...`); nothing here panics on
//! file content.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// FreebaseQA dev split, JSONL, relative to the data directory.
pub const FREEBASEQA_DEV: &str = "freebaseqa/freebaseqa_dev_v1.1.jsonl";
/// MT-Bench questions, JSONL, relative to the data directory.
pub const MT_BENCH: &str = "mt_bench/question.jsonl";
/// LLM-KICK's CNN/DailyMail stories, JSONL, relative to the data directory.
pub const CNNDM_STORIES: &str = "cnndm_llmkick/cnndm_llmkick_stories.jsonl";
/// wikitext-2 raw test split, plain text, relative to the data directory.
pub const WIKITEXT2_TEST: &str = "wikitext-2/wikitext-2-raw/wiki.test.raw";

/// One FreebaseQA question with its accepted answers (mostly lowercase in the source).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct QaItem {
    /// e.g. `FreebaseQA-v1.1-dev-0`.
    pub id: String,
    pub question: String,
    /// At least one.
    pub answers: Vec<String>,
}

/// The first turn of one MT-Bench question (the second turn is not used: there is no judge).
#[derive(Clone, Debug, PartialEq)]
pub struct MtBenchItem {
    /// `question_id`, 81–160 in the released set.
    pub id: u64,
    /// writing, roleplay, reasoning, math, coding, extraction, stem or humanities.
    pub category: String,
    pub first_turn: String,
}

/// One CNN/DailyMail story with its reference highlights.
#[derive(Clone, Debug, PartialEq)]
pub struct Story {
    /// CNN/DM story id (sha1 of the story URL). Not unique across buckets: 18 stories of
    /// `mid` are copies of `small` ones.
    pub id: String,
    /// LLM-KICK's folder: `small`, `mid` or `large`.
    pub bucket: String,
    /// Bucket by article length: `small` (≤ 470 words), `medium`, `large` (≥ 790 words).
    pub bucket_by_words: String,
    /// Whitespace-separated words in `article`.
    pub article_words: usize,
    pub article: String,
    /// The reference summary: the story's `@highlight` sentences, one per line (joined
    /// with `\n`).
    pub highlights: String,
}

/// The file to read: `data` itself when it is a file; `data/rel` when it is a directory;
/// `data_dir()/rel` when `data` is None. Errors name the path that was tried.
pub fn resolve(data: Option<&Path>, rel: &str) -> anyhow::Result<PathBuf> {
    const HINT: &str = "pass --data PATH (the data directory or the file itself)";
    let candidate = match data {
        Some(p) if p.is_file() => return Ok(p.to_path_buf()),
        Some(p) if p.is_dir() => p.join(rel),
        Some(p) => bail!("{}: no such file or directory; {HINT}", p.display()),
        None => match super::data_dir() {
            Some(d) => d.join(rel),
            None => bail!(
                "no evaluation data directory ($FFNSKIP_DATA is unset and ../shared/data does \
                 not exist), looking for {rel}; {HINT}"
            ),
        },
    };
    ensure!(
        candidate.is_file(),
        "{}: no such file; {HINT}",
        candidate.display()
    );
    Ok(candidate)
}

/// Loads FreebaseQA (`{"id", "question", "answers": [...]}` per line) from `path`, a file
/// or a data directory holding [`FREEBASEQA_DEV`]. Every question needs an answer; ids are
/// unique.
pub fn load_freebaseqa(path: &Path) -> anyhow::Result<Vec<QaItem>> {
    let file = resolve(Some(path), FREEBASEQA_DEV)?;
    let rows = read_jsonl::<QaItem>(&file, "FreebaseQA")?;
    for (line, q) in &rows {
        ensure!(
            !q.answers.is_empty(),
            "{}:{line}: FreebaseQA question {:?} has no answers",
            file.display(),
            q.id
        );
    }
    check_unique(&file, &rows, |q| &q.id)?;
    Ok(rows.into_iter().map(|(_, q)| q).collect())
}

#[derive(Deserialize)]
struct MtBenchRecord {
    question_id: u64,
    category: String,
    turns: Vec<String>,
}

/// Loads the MT-Bench questions (`{"question_id", "category", "turns": [...]}` per line)
/// from `path`, a file or a data directory holding [`MT_BENCH`]; keeps the first turn.
pub fn load_mt_bench(path: &Path) -> anyhow::Result<Vec<MtBenchItem>> {
    let file = resolve(Some(path), MT_BENCH)?;
    let rows = read_jsonl::<MtBenchRecord>(&file, "MT-Bench")?;
    check_unique(&file, &rows, |r| &r.question_id)?;
    rows.into_iter()
        .map(|(line, r)| {
            let Some(first_turn) = r.turns.into_iter().next() else {
                bail!(
                    "{}:{line}: MT-Bench question {} has no turns",
                    file.display(),
                    r.question_id
                );
            };
            Ok(MtBenchItem {
                id: r.question_id,
                category: r.category,
                first_turn,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct StoryRecord {
    id: String,
    bucket: String,
    bucket_by_words: String,
    article_words: usize,
    article: String,
    highlights: Vec<String>,
}

/// Loads LLM-KICK's CNN/DailyMail stories (`{"id", "bucket", "bucket_by_words",
/// "article_words", "article", "highlights": [...]}` per line) from `path`, a file or a data
/// directory holding [`CNNDM_STORIES`]. Article and highlights must be non-empty; ids may
/// repeat across buckets.
pub fn load_cnndm(path: &Path) -> anyhow::Result<Vec<Story>> {
    let file = resolve(Some(path), CNNDM_STORIES)?;
    let rows = read_jsonl::<StoryRecord>(&file, "CNN/DM story")?;
    rows.into_iter()
        .map(|(line, r)| {
            let where_ = || format!("{}:{line}: story {:?}", file.display(), r.id);
            ensure!(
                !r.article.trim().is_empty(),
                "{} has an empty article",
                where_()
            );
            ensure!(
                r.highlights.iter().any(|h| !h.trim().is_empty()),
                "{} has no highlights",
                where_()
            );
            Ok(Story {
                highlights: r.highlights.join("\n"),
                id: r.id,
                bucket: r.bucket,
                bucket_by_words: r.bucket_by_words,
                article_words: r.article_words,
                article: r.article,
            })
        })
        .collect()
}

/// Loads the wikitext-2 raw test split as one string (UTF-8, unchanged) from `path`, a file
/// or a data directory holding [`WIKITEXT2_TEST`].
pub fn load_wikitext2_test(path: &Path) -> anyhow::Result<String> {
    let file = resolve(Some(path), WIKITEXT2_TEST)?;
    let text = read_text(&file)?;
    ensure!(!text.trim().is_empty(), "{}: empty file", file.display());
    Ok(text)
}

/// The file as UTF-8, without a leading byte-order mark.
fn read_text(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Parses one JSON object per non-blank line; returns (1-based line, record). `what` names
/// the record kind in errors, e.g. `FILE:3: not a FreebaseQA record: missing field
/// `answers` at column 29`. An input without records is an error.
pub(crate) fn read_jsonl<T: DeserializeOwned>(
    path: &Path,
    what: &str,
) -> anyhow::Result<Vec<(usize, T)>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str::<T>(line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: not a {what} record: {}",
                path.display(),
                i + 1,
                json_message(&e)
            )
        })?;
        rows.push((i + 1, record));
    }
    ensure!(!rows.is_empty(), "{}: no {what} records", path.display());
    Ok(rows)
}

/// serde_json's message with its position given as a column only (each record is a single
/// line, so serde's own line number is always 1 and would be confused with the file's).
fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    if e.line() == 0 {
        return full;
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(msg) => format!("{msg} at column {}", e.column()),
        None => full,
    }
}

/// Errors on the second occurrence of an id, naming both lines.
pub(crate) fn check_unique<T, K: Eq + Hash + std::fmt::Debug>(
    path: &Path,
    rows: &[(usize, T)],
    key: impl Fn(&T) -> &K,
) -> anyhow::Result<()> {
    let mut seen: HashMap<&K, usize> = HashMap::new();
    for (line, row) in rows {
        let k = key(row);
        if let Some(first) = seen.insert(k, *line) {
            bail!(
                "{}:{line}: duplicate id {k:?} (first on line {first})",
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A temp file or directory removed on drop (also when the test fails).
    struct Temp(PathBuf);

    impl Drop for Temp {
        fn drop(&mut self) {
            if self.0.is_dir() {
                let _ = std::fs::remove_dir_all(&self.0);
            } else {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("ffnskip-data-{}-{n}-{name}", std::process::id()))
    }

    fn temp_file(name: &str, content: &str) -> Temp {
        let p = temp_path(name);
        std::fs::write(&p, content).expect("write temp file");
        Temp(p)
    }

    fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
        format!("{:#}", r.expect_err("expected an error"))
    }

    #[test]
    fn freebaseqa_sample() {
        let t = temp_file(
            "fbqa.jsonl",
            "{\"id\": \"q0\", \"question\": \"Capital of France?\", \"answers\": [\"paris\"]}\n\
             \n\
             {\"id\": \"q1\", \"question\": \"Two?\", \"answers\": [\"a\", \"b\"], \"extra\": 1}\n",
        );
        let items = load_freebaseqa(&t.0).expect("parse");
        assert_eq!(
            items,
            [
                QaItem {
                    id: "q0".into(),
                    question: "Capital of France?".into(),
                    answers: vec!["paris".into()],
                },
                QaItem {
                    id: "q1".into(),
                    question: "Two?".into(),
                    answers: vec!["a".into(), "b".into()],
                },
            ]
        );
    }

    #[test]
    fn freebaseqa_from_directory() {
        let dir = Temp(temp_path("dir"));
        let sub = dir.0.join("freebaseqa");
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(
            sub.join("freebaseqa_dev_v1.1.jsonl"),
            "{\"id\": \"q0\", \"question\": \"Q\", \"answers\": [\"x\"]}\n",
        )
        .expect("write");
        let items = load_freebaseqa(&dir.0).expect("parse");
        assert_eq!(items.len(), 1);
        // The same directory has no MT-Bench file: the error names the path tried.
        let e = err_text(load_mt_bench(&dir.0));
        assert_eq!(
            e,
            format!(
                "{}: no such file; pass --data PATH (the data directory or the file itself)",
                dir.0.join(MT_BENCH).display()
            )
        );
    }

    #[test]
    fn freebaseqa_malformed_lines() {
        let good = "{\"id\": \"q0\", \"question\": \"Q\", \"answers\": [\"x\"]}\n";
        // Line 2 lacks "answers".
        let t = temp_file(
            "missing.jsonl",
            &format!("{good}{{\"id\": \"q1\", \"question\": \"Q\"}}\n"),
        );
        assert_eq!(
            err_text(load_freebaseqa(&t.0)),
            format!(
                "{}:2: not a FreebaseQA record: missing field `answers` at column 29",
                t.0.display()
            )
        );
        // Line 3 is not JSON (line 2 blank).
        let t = temp_file("broken.jsonl", &format!("{good}\n{{\"id\": \"q1\",\n"));
        assert_eq!(
            err_text(load_freebaseqa(&t.0)),
            format!(
                "{}:3: not a FreebaseQA record: EOF while parsing a value at column 12",
                t.0.display()
            )
        );
        // Wrong type.
        let t = temp_file(
            "type.jsonl",
            "{\"id\": \"q0\", \"question\": \"Q\", \"answers\": \"x\"}\n",
        );
        assert_eq!(
            err_text(load_freebaseqa(&t.0)),
            format!(
                "{}:1: not a FreebaseQA record: invalid type: string \"x\", expected a \
                 sequence at column 44",
                t.0.display()
            )
        );
        // No answers.
        let t = temp_file(
            "noans.jsonl",
            &format!("{good}{{\"id\": \"q1\", \"question\": \"Q\", \"answers\": []}}\n"),
        );
        assert_eq!(
            err_text(load_freebaseqa(&t.0)),
            format!(
                "{}:2: FreebaseQA question \"q1\" has no answers",
                t.0.display()
            )
        );
        // Duplicate id.
        let t = temp_file("dup.jsonl", &format!("{good}\n{good}"));
        assert_eq!(
            err_text(load_freebaseqa(&t.0)),
            format!("{}:3: duplicate id \"q0\" (first on line 1)", t.0.display())
        );
        // Only blank lines.
        let t = temp_file("empty.jsonl", "\n  \n");
        assert_eq!(
            err_text(load_freebaseqa(&t.0)),
            format!("{}: no FreebaseQA records", t.0.display())
        );
    }

    #[test]
    fn mt_bench_sample_and_errors() {
        let t = temp_file(
            "mt.jsonl",
            "\u{feff}{\"question_id\": 81, \"category\": \"writing\", \"turns\": [\"Write.\", \"Again.\"]}\r\n\
             {\"question_id\": 82, \"category\": \"math\", \"turns\": [\"1+1?\"]}\r\n",
        );
        let items = load_mt_bench(&t.0).expect("parse");
        assert_eq!(
            items,
            [
                MtBenchItem {
                    id: 81,
                    category: "writing".into(),
                    first_turn: "Write.".into(),
                },
                MtBenchItem {
                    id: 82,
                    category: "math".into(),
                    first_turn: "1+1?".into(),
                },
            ]
        );
        let t = temp_file(
            "mt-noturn.jsonl",
            "{\"question_id\": 81, \"category\": \"writing\", \"turns\": []}\n",
        );
        assert_eq!(
            err_text(load_mt_bench(&t.0)),
            format!("{}:1: MT-Bench question 81 has no turns", t.0.display())
        );
        let t = temp_file(
            "mt-id.jsonl",
            "{\"question_id\": \"81\", \"category\": \"writing\", \"turns\": [\"x\"]}\n",
        );
        assert_eq!(
            err_text(load_mt_bench(&t.0)),
            format!(
                "{}:1: not a MT-Bench record: invalid type: string \"81\", expected u64 at \
                 column 20",
                t.0.display()
            )
        );
    }

    const STORY: &str = "{\"id\": \"s1\", \"bucket\": \"small\", \"bucket_by_words\": \"small\", \
        \"article_words\": 3, \"article\": \"One two three.\", \"highlights\": [\"One.\", \"Two.\"]}";

    #[test]
    fn cnndm_sample_and_errors() {
        let t = temp_file("cnn.jsonl", &format!("{STORY}\n"));
        let stories = load_cnndm(&t.0).expect("parse");
        assert_eq!(
            stories,
            [Story {
                id: "s1".into(),
                bucket: "small".into(),
                bucket_by_words: "small".into(),
                article_words: 3,
                article: "One two three.".into(),
                highlights: "One.\nTwo.".into(),
            }]
        );
        let t = temp_file(
            "cnn-nohl.jsonl",
            &format!(
                "{STORY}\n{}\n",
                STORY.replace("[\"One.\", \"Two.\"]", "[\"\"]")
            ),
        );
        assert_eq!(
            err_text(load_cnndm(&t.0)),
            format!("{}:2: story \"s1\" has no highlights", t.0.display())
        );
        let t = temp_file(
            "cnn-words.jsonl",
            &STORY.replace("\"article_words\": 3", "\"article_words\": -3"),
        );
        assert_eq!(
            err_text(load_cnndm(&t.0)),
            format!(
                "{}:1: not a CNN/DM story record: invalid value: integer `-3`, expected usize \
                 at column 79",
                t.0.display()
            )
        );
    }

    #[test]
    fn wikitext_and_resolve_errors() {
        let t = temp_file("wiki.raw", " \n = Title = \n");
        assert_eq!(load_wikitext2_test(&t.0).expect("read"), " \n = Title = \n");
        let t = temp_file("wiki-empty.raw", "\n\n");
        assert_eq!(
            err_text(load_wikitext2_test(&t.0)),
            format!("{}: empty file", t.0.display())
        );
        let missing = temp_path("missing");
        assert_eq!(
            err_text(resolve(Some(&missing), WIKITEXT2_TEST)),
            format!(
                "{}: no such file or directory; pass --data PATH (the data directory or the \
                 file itself)",
                missing.display()
            )
        );
        // Not UTF-8: the read error names the file.
        let p = temp_path("latin1.raw");
        std::fs::write(&p, b"caf\xe9\n").expect("write");
        let t = Temp(p);
        let e = err_text(load_wikitext2_test(&t.0));
        assert!(
            e.starts_with(&format!("cannot read {}: ", t.0.display())),
            "{e}"
        );
    }

    /// The real data directory, or None (and a SKIPPED note) when it is absent.
    fn real_data(test: &str) -> Option<PathBuf> {
        let d = crate::measure::data_dir();
        if d.is_none() {
            eprintln!("SKIPPED {test}: no data directory (../shared/data or $FFNSKIP_DATA)");
        }
        d
    }

    #[test]
    fn real_freebaseqa_dev() {
        let Some(d) = real_data("real_freebaseqa_dev") else {
            return;
        };
        let items = load_freebaseqa(&d).expect("load FreebaseQA");
        assert_eq!(items.len(), 3994);
        assert_eq!(items[1].id, "FreebaseQA-v1.1-dev-1");
        assert_eq!(items[1].answers, ["salman rushdie"]);
        // PROVENANCE.md: 16 dev questions have more than one answer.
        assert_eq!(items.iter().filter(|q| q.answers.len() > 1).count(), 16);
        // resolve(None, ..) finds the same file.
        let f = resolve(None, FREEBASEQA_DEV).expect("resolve");
        assert_eq!(load_freebaseqa(&f).expect("load file"), items);
    }

    #[test]
    fn real_mt_bench() {
        let Some(d) = real_data("real_mt_bench") else {
            return;
        };
        let items = load_mt_bench(&d).expect("load MT-Bench");
        assert_eq!(items.len(), 80);
        assert_eq!(
            items.iter().map(|q| q.id).collect::<Vec<_>>(),
            (81..=160).collect::<Vec<_>>()
        );
        let mut per_category: HashMap<&str, usize> = HashMap::new();
        for q in &items {
            *per_category.entry(q.category.as_str()).or_default() += 1;
        }
        assert_eq!(per_category.len(), 8);
        assert!(per_category.values().all(|&n| n == 10), "{per_category:?}");
        assert!(items[0]
            .first_turn
            .starts_with("Compose an engaging travel blog post"));
    }

    #[test]
    fn real_cnndm() {
        let Some(d) = real_data("real_cnndm") else {
            return;
        };
        let stories = load_cnndm(&d).expect("load CNN/DM");
        assert_eq!(stories.len(), 90);
        for b in ["small", "mid", "large"] {
            assert_eq!(stories.iter().filter(|s| s.bucket == b).count(), 30, "{b}");
        }
        let s = &stories[0];
        assert_eq!(s.id, "06bd91854e207a314fb74bddee6c7474c40aa59b");
        assert_eq!(s.article_words, 310);
        assert_eq!(s.article.split_whitespace().count(), 310);
        assert_eq!(s.highlights.lines().count(), 3);
        assert!(s
            .highlights
            .starts_with("Ohio man hoped to raise $10 on Kickstarter"));
        // PROVENANCE.md: 72 unique stories.
        let unique: std::collections::HashSet<&str> =
            stories.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(unique.len(), 72);
    }

    #[test]
    fn real_wikitext2_test() {
        let Some(d) = real_data("real_wikitext2_test") else {
            return;
        };
        let text = load_wikitext2_test(&d).expect("load wikitext-2");
        // PROVENANCE.md: 1,290,590 bytes, 4,358 lines.
        assert_eq!(text.len(), 1_290_590);
        assert_eq!(text.lines().count(), 4358);
        assert!(text.starts_with(" \n = Robert Boulter = \n"));
    }
}

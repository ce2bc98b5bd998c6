//! Pure quality metrics for `ffnskip eval` (DESIGN.md §3): answer containment for FreebaseQA,
//! ROUGE-L and greedy agreement against the full model, a collapse score, and log-probabilities
//! for perplexity. No model, no I/O: every function here is a deterministic function of its
//! arguments.

use std::collections::HashSet;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

/// Articles removed by [`normalize_answer`] (SQuAD v1.1 `normalize_answer`).
const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// Length of the n-grams counted by [`collapse_score`] and [`collapse_score_ids`].
pub const COLLAPSE_N: usize = 4;

/// SQuAD-style answer normalization (Rajpurkar et al. 2016, `evaluate-v1.1.py`): lowercase,
/// punctuation → space, drop the whole words "a", "an", "the", collapse whitespace, trim.
///
/// Punctuation is Unicode-aware: every char that is neither `char::is_alphanumeric` nor
/// whitespace. Unlike SQuAD (which deletes punctuation) it becomes a space, so "U.S.A."
/// normalizes to "u s" (the trailing "a" is an article); gold and generated text get the same
/// treatment, so containment stays consistent.
pub fn normalize_answer(s: &str) -> String {
    let spaced: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    spaced
        .split_whitespace()
        .filter(|w| !ARTICLES.contains(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `needle` occurs in `haystack` as a contiguous run of whole elements.
fn contains_run<T: PartialEq>(haystack: &[T], needle: &[T]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// FreebaseQA accuracy test: true when any gold answer, normalized with [`normalize_answer`],
/// occurs in the normalized generated text as a whole-word sequence ("paris" matches
/// "it is paris france"; "par" does not match "paris"). Golds that normalize to nothing
/// (e.g. "the") never match.
pub fn answer_matches(generated: &str, golds: &[String]) -> bool {
    let gen = normalize_answer(generated);
    let gen_words: Vec<&str> = gen.split_whitespace().collect();
    golds.iter().any(|g| {
        let gold = normalize_answer(g);
        let gold_words: Vec<&str> = gold.split_whitespace().collect();
        contains_run(&gen_words, &gold_words)
    })
}

/// Lowercase word tokens for ROUGE: maximal runs of `char::is_alphanumeric` chars
/// (everything else separates). No stemming, no stop-word removal.
pub fn tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence of `a` and `b` (not necessarily contiguous).
/// Dynamic programming in O(|a|·|b|) time and O(min(|a|, |b|)) memory.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    // row[j] = LCS(long[..i], short[..j]) for the current i.
    let mut row = vec![0usize; short.len() + 1];
    for x in long {
        let mut diag = 0; // LCS(long[..i-1], short[..j-1])
        for (j, y) in short.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[short.len()]
}

/// ROUGE-L scores, each in [0, 1].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct RougeL {
    /// LCS / candidate length.
    pub precision: f64,
    /// LCS / reference length.
    pub recall: f64,
    /// F-measure with β = 1: 2PR / (P + R).
    pub f1: f64,
}

/// ROUGE-L from an LCS length and the two sequence lengths; all 0 when either is empty or
/// nothing is shared.
fn rouge_from_lcs(lcs: usize, candidate_len: usize, reference_len: usize) -> RougeL {
    if lcs == 0 || candidate_len == 0 || reference_len == 0 {
        return RougeL::default();
    }
    let precision = lcs as f64 / candidate_len as f64;
    let recall = lcs as f64 / reference_len as f64;
    let f1 = 2.0 * precision * recall / (precision + recall);
    RougeL {
        precision,
        recall,
        f1,
    }
}

/// Sentence-level ROUGE-L of Lin (2004, "ROUGE: A Package for Automatic Evaluation of
/// Summaries", §3.1): P = LCS/|candidate|, R = LCS/|reference|, F_lcs with β = 1, over the
/// whole texts as single token sequences ([`tokens`]: lowercase, split on non-alphanumeric,
/// no stemming). Not the summary-level ROUGE-Lsum (union LCS over sentences).
pub fn rouge_l(candidate: &str, reference: &str) -> RougeL {
    let c = tokens(candidate);
    let r = tokens(reference);
    rouge_from_lcs(lcs_len(&c, &r), c.len(), r.len())
}

/// [`rouge_l`] on token ids: `a` is the candidate, `b` the reference.
pub fn rouge_l_ids(a: &[u32], b: &[u32]) -> RougeL {
    rouge_from_lcs(lcs_len(a, b), a.len(), b.len())
}

/// Length of the common prefix of `a` and `b`, in tokens: the number of greedy tokens
/// generated before the first disagreement with the full model.
pub fn first_divergence(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Positional agreement: the share of positions i < max(|a|, |b|) where both sequences have
/// a token and a\[i\] == b\[i\]. 1.0 when both are empty.
pub fn match_rate(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len().max(b.len());
    if n == 0 {
        return 1.0;
    }
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / n as f64
}

/// Share of repeated n-grams: 1 − distinct / total over the overlapping n-grams of `items`;
/// 0 when there is no n-gram (fewer than `n` items) or `n` is 0.
pub fn repeated_ngram_share<T: Eq + Hash>(items: &[T], n: usize) -> f64 {
    if n == 0 || items.len() < n {
        return 0.0;
    }
    let total = items.len() - n + 1;
    let distinct: HashSet<&[T]> = items.windows(n).collect();
    1.0 - distinct.len() as f64 / total as f64
}

/// Collapse score of generated text: share of repeated word 4-grams (words as in [`tokens`]),
/// 1 − distinct/total. 0 for text without repetition or shorter than 4 words; approaches 1
/// for a degenerate loop.
pub fn collapse_score(text: &str) -> f64 {
    repeated_ngram_share(&tokens(text), COLLAPSE_N)
}

/// [`collapse_score`] on token ids (4-grams of ids).
pub fn collapse_score_ids(ids: &[u32]) -> f64 {
    repeated_ngram_share(ids, COLLAPSE_N)
}

/// log softmax(logits)\[id\] in nats, computed in f64 as x\[id\] − (m + ln Σ exp(x − m)) with
/// m = max x, so large logits do not overflow. `-inf` logits (masked tokens) are allowed; the
/// result is NaN when no logit is finite or any is NaN/+inf.
///
/// Panics when `id` is out of range (a caller bug, not a data error).
pub fn log_softmax_at(logits: &[f32], id: u32) -> f64 {
    let id = id as usize;
    assert!(
        id < logits.len(),
        "token id {id} out of range for {} logits",
        logits.len()
    );
    logits[id] as f64 - log_sum_exp(logits)
}

/// Tokens of the reference distribution kept per position for [`kld_top_k`].
pub const KLD_TOP_K: usize = 64;

/// One position's reference distribution, kept compactly: its `k` most likely tokens and their
/// log-probabilities (natural log), most likely first; the remaining mass is one bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopK {
    pub ids: Vec<u32>,
    pub logp: Vec<f32>,
}

/// log Σ e^x over a row, in f64 (NaN when no entry is finite).
fn log_sum_exp(logits: &[f32]) -> f64 {
    let m = logits
        .iter()
        .map(|&x| x as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return f64::NAN;
    }
    m + logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln()
}

/// The `k` most likely tokens of `logits` (ties by lower id) with their log-probabilities.
pub fn top_k(logits: &[f32], k: usize) -> TopK {
    let lse = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by);
    }
    idx.truncate(k);
    idx.sort_unstable_by(by);
    TopK {
        logp: idx
            .iter()
            .map(|&i| (logits[i as usize] as f64 - lse) as f32)
            .collect(),
        ids: idx,
    }
}

/// KL(P ‖ Q) in nats between a reference position `p` (its top tokens and one bucket for the
/// rest) and the distribution of `logits`, over the same partition: Σ_top p·(ln p − ln q) plus
/// the rest bucket's term. That is the exact KL divergence when the reference's top tokens hold
/// all its mass, and a lower bound otherwise (the partition merges the tail). Also whether the
/// most likely token is the same (ties by lower id). `None` for an empty reference or
/// non-finite logits.
pub fn kld_top_k(p: &TopK, logits: &[f32]) -> Option<(f64, bool)> {
    let lse = log_sum_exp(logits);
    if p.ids.is_empty() || !lse.is_finite() {
        return None;
    }
    let (mut kl, mut p_top, mut q_top) = (0.0f64, 0.0f64, 0.0f64);
    for (&id, &lp) in p.ids.iter().zip(&p.logp) {
        // Rounded as the reference's log-probabilities are stored, so that identical logits
        // give exactly 0.
        let lq = ((*logits.get(id as usize)? as f64 - lse) as f32) as f64;
        let (lp, pp) = (lp as f64, (lp as f64).exp());
        kl += pp * (lp - lq);
        p_top += pp;
        q_top += lq.exp();
    }
    let (p_rest, q_rest) = ((1.0 - p_top).max(0.0), (1.0 - q_top).max(0.0));
    if p_rest > 1e-12 {
        kl += p_rest * (p_rest.ln() - q_rest.max(f64::MIN_POSITIVE).ln());
    }
    let best = logits
        .iter()
        .enumerate()
        .fold(0usize, |b, (i, &x)| if x > logits[b] { i } else { b });
    Some((kl.max(0.0), best as u32 == p.ids[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn golds(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn normalize_examples() {
        // "The  Beatles!" → lower "the  beatles!" → "!"→" " → words [the, beatles] → drop "the".
        assert_eq!(normalize_answer("The  Beatles!"), "beatles");
        // "." → " ", trailing space trimmed.
        assert_eq!(normalize_answer("Salman Rushdie."), "salman rushdie");
        // Leading article "A" dropped; "of" stays.
        assert_eq!(
            normalize_answer("A Tale of Two Cities"),
            "tale of two cities"
        );
        // Articles only as whole words: "anthem", "theatre", "another" keep their letters.
        assert_eq!(
            normalize_answer("An anthem in the theatre, another"),
            "anthem in theatre another"
        );
        // Unicode: accented letters are alphanumeric; the em dash and apostrophe are not.
        assert_eq!(normalize_answer("Théâtre—d'Été"), "théâtre d été");
        // Digits stay; "$" and "," become spaces: "$ 3 000" → words [3, 000].
        assert_eq!(normalize_answer("$3,000"), "3 000");
        // "U.S.A." → "u s a " → the trailing "a" is an article and goes (documented quirk).
        assert_eq!(normalize_answer("U.S.A."), "u s");
        // Tabs/newlines collapse; nothing but punctuation and articles → "".
        assert_eq!(normalize_answer("\tNew\n York "), "new york");
        assert_eq!(normalize_answer("The ... a!"), "");
        assert_eq!(normalize_answer(""), "");
    }

    #[test]
    fn containment_examples() {
        // "It is Paris, France." → "it is paris france" ⊇ [paris].
        assert!(answer_matches("It is Paris, France.", &golds(&["Paris"])));
        // "par" is not a whole word of "paris".
        assert!(!answer_matches("paris", &golds(&["par"])));
        // Multi-word gold must be contiguous: [new york] ⊄ [new jersey york].
        assert!(answer_matches("I think New York.", &golds(&["new york"])));
        assert!(!answer_matches("new jersey york", &golds(&["new york"])));
        // Article in the gold is dropped: "The Beatles" → [beatles] ⊆ [beatles were band].
        assert!(answer_matches(
            "Beatles were a band",
            &golds(&["The Beatles"])
        ));
        // Any of several golds.
        assert!(answer_matches(
            "feast of the ascension",
            &golds(&["ascension day", "feast of the ascension"])
        ));
        // Golds that normalize to nothing, and no golds, never match.
        assert!(!answer_matches("the answer", &golds(&["The", "!"])));
        assert!(!answer_matches("anything", &[]));
        assert!(!answer_matches("", &golds(&["paris"])));
    }

    #[test]
    fn tokens_split_on_non_alphanumeric() {
        assert_eq!(
            tokens("Police killed the gunman."),
            ["police", "killed", "the", "gunman"]
        );
        assert_eq!(tokens("it's 5-star!"), ["it", "s", "5", "star"]);
        assert!(tokens(" ... ").is_empty());
    }

    #[test]
    fn lcs_examples() {
        // CLRS example: LCS("ABCBDAB", "BDCABA") = 4 ("BCBA"), symmetric.
        let a: Vec<char> = "ABCBDAB".chars().collect();
        let b: Vec<char> = "BDCABA".chars().collect();
        assert_eq!(lcs_len(&a, &b), 4);
        assert_eq!(lcs_len(&b, &a), 4);
        assert_eq!(lcs_len::<u32>(&[], &[1, 2]), 0);
        assert_eq!(lcs_len(&[1, 2, 3], &[1, 2, 3]), 3);
        assert_eq!(lcs_len(&[1, 2, 3], &[4, 5]), 0);
    }

    #[test]
    fn rouge_l_lin_2004_examples() {
        let r = "police killed the gunman";
        // "police kill the gunman": LCS = [police, the, gunman] = 3; P = 3/4, R = 3/4,
        // F = 2·(9/16)/(3/2) = 0.75.
        let s = rouge_l("police kill the gunman", r);
        assert!(close(s.precision, 0.75) && close(s.recall, 0.75) && close(s.f1, 0.75));
        // "the gunman kill police": LCS = [the, gunman] = 2; P = R = 2/4, F = 0.5.
        let s = rouge_l("the gunman kill police", r);
        assert!(close(s.precision, 0.5) && close(s.recall, 0.5) && close(s.f1, 0.5));
        // Case and punctuation ignored: identical token sequences → 1.
        let s = rouge_l("Police killed the gunman!", r);
        assert!(close(s.f1, 1.0));
        // Unequal lengths: "the cat" vs "the cat sat on the mat": LCS 2, P = 2/2 = 1,
        // R = 2/6 = 1/3, F = 2·(1/3)/(4/3) = 0.5.
        let s = rouge_l("the cat", "the cat sat on the mat");
        assert!(close(s.precision, 1.0) && close(s.recall, 1.0 / 3.0) && close(s.f1, 0.5));
        // Empty on either side, or nothing shared → all 0.
        assert_eq!(rouge_l("", r), RougeL::default());
        assert_eq!(rouge_l(r, ""), RougeL::default());
        assert_eq!(rouge_l("!!", "??"), RougeL::default());
        assert_eq!(rouge_l("dog", "cat"), RougeL::default());
    }

    #[test]
    fn rouge_l_on_ids() {
        // [1 2 3 4] vs [1 5 3 4]: LCS [1 3 4] = 3 → P = R = F = 3/4.
        let s = rouge_l_ids(&[1, 2, 3, 4], &[1, 5, 3, 4]);
        assert!(close(s.f1, 0.75));
        // Candidate [1 2] vs reference [1 2 3 4 5 6]: P = 1, R = 1/3, F = 0.5.
        let s = rouge_l_ids(&[1, 2], &[1, 2, 3, 4, 5, 6]);
        assert!(close(s.precision, 1.0) && close(s.recall, 1.0 / 3.0) && close(s.f1, 0.5));
        assert_eq!(rouge_l_ids(&[], &[]), RougeL::default());
    }

    #[test]
    fn divergence_and_match_rate() {
        // [1 2 3 4] vs [1 2 5 4]: prefix [1 2] → 2; positions 0,1,3 agree → 3/4.
        assert_eq!(first_divergence(&[1, 2, 3, 4], &[1, 2, 5, 4]), 2);
        assert!(close(match_rate(&[1, 2, 3, 4], &[1, 2, 5, 4]), 0.75));
        // One is a prefix of the other: prefix 2; max length 3, 2 agree → 2/3.
        assert_eq!(first_divergence(&[1, 2], &[1, 2, 3]), 2);
        assert!(close(match_rate(&[1, 2], &[1, 2, 3]), 2.0 / 3.0));
        // Differ at 0.
        assert_eq!(first_divergence(&[9, 2], &[1, 2]), 0);
        assert!(close(match_rate(&[9, 2], &[1, 2]), 0.5));
        // Empty cases.
        assert_eq!(first_divergence(&[], &[]), 0);
        assert!(close(match_rate(&[], &[]), 1.0));
        assert!(close(match_rate(&[], &[7]), 0.0));
    }

    #[test]
    fn collapse_examples() {
        // "a b c d a b c d": 8 words → 5 four-grams abcd, bcda, cdab, dabc, abcd;
        // 4 distinct → 1 − 4/5 = 0.2.
        assert!(close(collapse_score("a b c d a b c d"), 0.2));
        // "x x x x x x": 3 four-grams, all "x x x x" → 1 − 1/3 = 2/3.
        assert!(close(collapse_score("x x x x x x"), 2.0 / 3.0));
        // Exactly one four-gram → 1 − 1/1 = 0; fewer than 4 words → 0.
        assert!(close(collapse_score("a b c d"), 0.0));
        assert!(close(collapse_score("one two three"), 0.0));
        assert!(close(collapse_score(""), 0.0));
        // Case and punctuation do not make n-grams distinct: same as the first example.
        assert!(close(collapse_score("A b, c d. a B c D!"), 0.2));
        // Ids: same definition.
        assert!(close(collapse_score_ids(&[1, 2, 3, 4, 1, 2, 3, 4]), 0.2));
        assert!(close(collapse_score_ids(&[1, 2, 3]), 0.0));
        assert!(close(repeated_ngram_share(&[1, 1, 1], 0), 0.0));
    }

    #[test]
    fn log_softmax_by_hand() {
        // logits [1, 2, 3]: logsumexp = 3 + ln(1 + e^-1 + e^-2)
        //   = 3 + ln(1 + 0.36787944117 + 0.13533528324) = 3 + ln(1.50321472441)
        //   = 3 + 0.40760596444 = 3.40760596444.
        let l = [1.0f32, 2.0, 3.0];
        assert!((log_softmax_at(&l, 2) - (-0.40760596444)).abs() < 1e-10);
        assert!((log_softmax_at(&l, 0) - (-2.40760596444)).abs() < 1e-10);
        // Probabilities sum to 1.
        let total: f64 = (0..3).map(|i| log_softmax_at(&l, i).exp()).sum();
        assert!(close(total, 1.0));
        // Stability: [1000, 1000] would overflow exp naively; each is ln(1/2).
        assert!(close(log_softmax_at(&[1000.0, 1000.0], 1), -(2.0f64.ln())));
        // A masked (-inf) logit has probability 0 and does not disturb the others.
        assert_eq!(
            log_softmax_at(&[0.0, f32::NEG_INFINITY], 1),
            f64::NEG_INFINITY
        );
        assert!(close(log_softmax_at(&[0.0, f32::NEG_INFINITY], 0), 0.0));
        assert!(log_softmax_at(&[f32::NEG_INFINITY; 2], 0).is_nan());
    }

    #[test]
    #[should_panic(expected = "token id 3 out of range for 3 logits")]
    fn log_softmax_id_out_of_range() {
        log_softmax_at(&[0.0, 0.0, 0.0], 3);
    }

    #[test]
    fn kld_of_a_distribution_with_itself_is_zero_and_top1_agrees() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32) * 0.07).collect();
        for k in [1, 64, 1000] {
            let p = top_k(&logits, k);
            let (kl, same) = kld_top_k(&p, &logits).unwrap();
            assert_eq!(kl, 0.0, "k {k}");
            assert!(same);
        }
    }

    /// A 3-token vocabulary, by hand: P = (1/2, 1/4, 1/4) from logits ln(2, 1, 1), Q uniform.
    /// KL = ½·ln(3/2) + 2·¼·ln(3/4) = ½·ln(9/8) ≈ 0.058892.
    #[test]
    fn kld_on_three_tokens_by_hand() {
        let p = top_k(&[2f32.ln(), 0.0, 0.0], 3);
        assert_eq!(p.ids, vec![0, 1, 2]);
        let (kl, same) = kld_top_k(&p, &[5.0, 5.0, 5.0]).unwrap();
        assert!((kl - 0.5 * (9.0f64 / 8.0).ln()).abs() < 1e-6, "{kl}");
        assert!(same, "ties go to the lower id");
        // Top 1 only: P = (½ | ½ rest), Q = (⅓ | ⅔): ½·ln(3/2) + ½·ln(3/4) = ½·ln(9/8) too.
        let p1 = top_k(&[2f32.ln(), 0.0, 0.0], 1);
        let (kl1, _) = kld_top_k(&p1, &[5.0, 5.0, 5.0]).unwrap();
        assert!((kl1 - 0.5 * (9.0f64 / 8.0).ln()).abs() < 1e-6, "{kl1}");
        // Q puts its maximum elsewhere: top-1 differs.
        let (_, same) = kld_top_k(&p, &[0.0, 1.0, 0.0]).unwrap();
        assert!(!same);
        assert_eq!(kld_top_k(&p, &[f32::NAN; 3]), None);
    }
}

//! Logits against llama.cpp, identical to the bit: every prompt position (ffnskip batched,
//! llama.cpp in the given mode), then greedy steps with each engine fed its own choice.

use ffnskip::model::Llama;
use ffnskip::peer::{argmax, LlamaCpp, PeerMode};
use ffnskip::session::{Session, SessionConfig};

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Checks `prompt` (and `greedy` steps after it) and returns the number of prompt positions.
/// `tag` names the model in failure messages.
pub fn prompt_and_greedy_identical(
    tag: &str,
    model: &Llama,
    peer: &LlamaCpp,
    mode: PeerMode,
    prompt: &str,
    greedy: usize,
) -> usize {
    let n_vocab = model.config.n_vocab;
    let ids = peer.tokenize(prompt, true, true);
    if prompt == super::LONG {
        assert!(ids.len() >= 280, "long prompt has {} tokens", ids.len());
    }
    let mut pc = peer.context(1024, 2, mode).expect("context");
    let theirs = pc.eval(&ids, true).expect("eval");
    // Exact batches: llama.cpp here runs one token per ubatch (GEMV, never GEMM).
    let config = SessionConfig {
        exact_batches: true,
        ..SessionConfig::new(1024, 2)
    };
    let mut s = Session::new(model, config).expect("session");
    let ours = s.eval_all(&ids, true).expect("forward");
    for (i, t) in theirs.iter().enumerate() {
        let o = &ours[i * n_vocab..(i + 1) * n_vocab];
        assert!(
            bits_equal(o, t),
            "{tag}: logits differ at position {i} of {prompt:?}: max |Δ| {}, top-1 ours {} llama.cpp {}",
            super::max_abs_diff(o, t),
            argmax(o),
            argmax(t)
        );
    }
    if greedy == 0 {
        return ids.len();
    }
    pc.clear();
    s.reset();
    let mut theirs = pc.eval(&ids, false).expect("eval").remove(0);
    let mut ours = s.prefill(&ids).expect("prefill").to_vec();
    let mut text = Vec::new();
    for step in 0..greedy {
        let (a, b) = (argmax(&ours), argmax(&theirs));
        assert_eq!(a, b, "{tag}: greedy step {step} of {prompt:?}");
        assert!(
            bits_equal(&ours, &theirs),
            "{tag}: greedy step {step} of {prompt:?}: logits differ by {}",
            super::max_abs_diff(&ours, &theirs)
        );
        text.push(a);
        theirs = pc.eval(&[a], false).expect("eval").remove(0);
        ours = s.decode(a).expect("decode").to_vec();
    }
    eprintln!(
        "{tag}: {:?}… → {:?}: {greedy} greedy tokens identical",
        &prompt[..prompt.len().min(24)],
        String::from_utf8_lossy(&peer.detokenize(&text[..text.len().min(24)])),
    );
    ids.len()
}

/// ffnskip's batched logits against llama.cpp's default (batched) evaluation of the same
/// prompts, with llama.cpp's own batched-vs-token-by-token difference as the yardstick.
pub struct DefaultNoise {
    pub positions: usize,
    /// Positions whose top-1 differs from llama.cpp's (each a near-tie there).
    pub ties: usize,
    /// max |Δlogit|, ffnskip batched (llama.cpp's kinds of batch kernels) vs llama.cpp batched.
    pub worst: f32,
    /// max |Δlogit|, ffnskip with exact batches (the bits of decoding) vs llama.cpp batched.
    pub worst_exact: f32,
    /// max |Δlogit|, ffnskip batched vs ffnskip exact: our own batch-kernel difference.
    pub ours_self: f32,
    /// max |Δlogit|, llama.cpp batched vs llama.cpp token by token, and its top-1 flips.
    pub worst_self: f32,
    pub self_flips: usize,
}

/// Runs `prompts` through both engines; a top-1 difference must be a near-tie (under `tie`
/// logits apart) in llama.cpp's batched logits. `tag` names the model in failure messages.
pub fn against_llama_cpp_default(
    tag: &str,
    model: &Llama,
    peer: &LlamaCpp,
    prompts: &[&str],
    tie: f32,
) -> DefaultNoise {
    let n_vocab = model.config.n_vocab;
    let mut r = DefaultNoise {
        positions: 0,
        ties: 0,
        worst: 0.0,
        worst_exact: 0.0,
        ours_self: 0.0,
        worst_self: 0.0,
        self_flips: 0,
    };
    for prompt in prompts {
        let ids = peer.tokenize(prompt, true, true);
        // llama.cpp, batched (every position's logits) and token by token.
        let mut pc = peer.context(1024, 2, PeerMode::Default).expect("context");
        let theirs = pc.eval(&ids, true).expect("eval");
        pc.clear();
        let theirs_seq: Vec<Vec<f32>> = ids
            .iter()
            .map(|&t| pc.eval(&[t], false).expect("eval").remove(0))
            .collect();
        let mut s = Session::new(model, SessionConfig::new(1024, 2)).expect("session");
        let ours = s.eval_all(&ids, true).expect("forward");
        let exact = SessionConfig {
            exact_batches: true,
            ..SessionConfig::new(1024, 2)
        };
        let ours_exact = Session::new(model, exact)
            .expect("session")
            .eval_all(&ids, true)
            .expect("forward");
        for (i, t) in theirs.iter().enumerate() {
            let o = &ours[i * n_vocab..(i + 1) * n_vocab];
            let oe = &ours_exact[i * n_vocab..(i + 1) * n_vocab];
            r.worst_exact = r.worst_exact.max(super::max_abs_diff(oe, t));
            r.ours_self = r.ours_self.max(super::max_abs_diff(o, oe));
            let (a, b) = (argmax(o), argmax(t));
            if a != b {
                // Only where llama.cpp's batched logits are themselves a near-tie.
                let margin = t[b as usize] - t[a as usize];
                assert!(
                    margin < tie,
                    "{tag}: top-1 differs at position {i} of {prompt:?}: ours {a}, llama.cpp {b}, {margin} apart"
                );
                r.ties += 1;
            }
            r.worst = r.worst.max(super::max_abs_diff(o, t));
            r.worst_self = r.worst_self.max(super::max_abs_diff(t, &theirs_seq[i]));
            r.self_flips += usize::from(argmax(t) != argmax(&theirs_seq[i]));
        }
        r.positions += ids.len();
    }
    eprintln!(
        "{tag} vs llama.cpp defaults: {} positions, top-1 differs at {} near-ties; max |Δlogit| \
         {:.4} (exact batches {:.4}); llama.cpp batched vs its own token-by-token: {:.4}, top-1 \
         flips {}; ffnskip batched vs exact: {:.4}",
        r.positions, r.ties, r.worst, r.worst_exact, r.worst_self, r.self_flips, r.ours_self
    );
    r
}

//! Chat through its library API: when the context is full, the oldest turns are dropped, the
//! system prompt stays, and the answer is exactly what a fresh session gives on what remains.

mod common;

use std::ops::ControlFlow;

use ffnskip::chat::Message;
use ffnskip::conversation::{template_of, Conversation};
use ffnskip::gguf::GgufFile;
use ffnskip::model::Llama;
use ffnskip::sampling::{Sampler, SamplerConfig};
use ffnskip::session::{generate, GenerateOptions, Session, SessionConfig, StopReason};
use ffnskip::tokenizer::Tokenizer;

fn quiet() -> impl FnMut(&str) -> ControlFlow<()> {
    |_: &str| ControlFlow::Continue(())
}

#[test]
fn a_full_context_drops_the_oldest_turns_and_chat_goes_on() {
    let path = common::default_model();
    let file = GgufFile::open(&path).expect("open");
    let model = Llama::load(&file).expect("load");
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
    let template = template_of(&file, &tokenizer).expect("template");
    let system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    let n_ctx = 192;
    let mut session = Session::new(&model, SessionConfig::new(n_ctx, 2)).expect("session");
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    let opts = GenerateOptions {
        max_tokens: 48,
        stop: Vec::new(),
    };
    let mut chat = Conversation::new(&template, &tokenizer, Some(system));
    let questions = [
        "Tell me about dragons.",
        "And about cats?",
        "What about dogs?",
        "And horses?",
        "Finally, birds?",
    ];
    let mut dropped_at = None;
    for (i, q) in questions.iter().enumerate() {
        let r = chat
            .reply(&mut session, &mut sampler, q, &opts, &mut quiet())
            .unwrap_or_else(|e| panic!("turn {i}: {e:#}"));
        assert!(!r.generation.tokens.is_empty(), "turn {i}");
        assert!(session.history().len() <= n_ctx);
        if r.dropped_messages == 0 {
            continue;
        }
        dropped_at.get_or_insert(i);
        assert_eq!(r.dropped_messages % 2, 0, "whole turns are dropped");
        // What remains: the kept turns up to this question; a fresh session on them gives
        // the same answer, token for token.
        let kept = chat.turns();
        assert_eq!(kept[kept.len() - 2], Message::new("user", q));
        assert!(kept.len() < 2 * (i + 1));
        let mut messages = vec![Message::new("system", system)];
        messages.extend_from_slice(&kept[..kept.len() - 1]);
        let text = template.render(&messages, true).expect("render");
        let ids = tokenizer.encode(&text, true, true);
        let mut fresh = Session::new(&model, SessionConfig::new(n_ctx, 2)).expect("session");
        let mut s2 = Sampler::new(SamplerConfig::greedy());
        let g = generate(&mut fresh, &tokenizer, &mut s2, &ids, &opts, &mut quiet()).expect("gen");
        assert_eq!(g.tokens, r.generation.tokens, "turn {i}");
        // The cache holds the kept prompt and the answer (the last token of an answer cut
        // at max_tokens was never fed back).
        assert_eq!(
            session.history().len(),
            ids.len() + g.tokens.len() - usize::from(g.stop_reason == StopReason::MaxTokens)
        );
        assert_eq!(session.history()[..ids.len()], ids[..]);
    }
    assert!(dropped_at.is_some(), "the context never filled up");
    // A message that cannot fit at all is refused and leaves the conversation as it was.
    let before = chat.turns().to_vec();
    let huge = "word ".repeat(400);
    let e = chat
        .reply(&mut session, &mut sampler, &huge, &opts, &mut quiet())
        .expect_err("too long");
    assert!(
        e.to_string().ends_with(&format!(
            "more than the context of {n_ctx} (raise -c/--ctx or send a shorter message)"
        )),
        "{e}"
    );
    assert_eq!(chat.turns(), &before[..]);
}

/// The Qwen2.5 files' own Jinja chat template (ChatML with Qwen's default system prompt).
#[test]
fn qwen_chat_template_renders_chatml() {
    let path = common::catalogue_model("qwen2.5-coder-0.5b");
    let file = GgufFile::open(&path).expect("open");
    let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
    let t = template_of(&file, &tok).expect("template");
    let user = Message::new("user", "Reverse a string in Python.");
    assert_eq!(
        t.render(&[Message::new("system", "Be brief."), user.clone()], true)
            .expect("render"),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nReverse a string in Python.<|im_end|>\n<|im_start|>assistant\n"
    );
    // No system message: the template supplies Qwen's own.
    assert_eq!(
        t.render(
            &[
                user.clone(),
                Message::new("assistant", "s[::-1]"),
                Message::new("user", "Thanks")
            ],
            true
        )
        .expect("render"),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nReverse a string in Python.<|im_end|>\n\
         <|im_start|>assistant\ns[::-1]<|im_end|>\n\
         <|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"
    );
    // `<|im_end|>` ends an answer: it is an end-of-generation token.
    let im_end = tok.encode("<|im_end|>", false, true);
    assert_eq!(im_end.len(), 1);
    assert!(tok.is_eog(im_end[0]));
}

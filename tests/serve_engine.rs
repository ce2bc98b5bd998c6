//! The batching engine without HTTP: continuous batching gives each sequence the tokens it
//! gets alone (mixed policies included) and the tokens `generate` gives; cancellation frees
//! the slot; the queue is bounded; bad requests name their field; deadlines and shutdown end
//! what runs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::default_model;
use ffnskip::chat::Message;
use ffnskip::gguf::GgufFile;
use ffnskip::model::Llama;
use ffnskip::sampling::{Sampler, SamplerConfig};
use ffnskip::serve::{
    Engine, EngineConfig, Event, Finish, FinishReason, Metrics, Prompt, Request, Stream,
    SubmitError,
};
use ffnskip::session::{generate, GenerateOptions, Session, SessionConfig};
use ffnskip::skip::{Policy, SkipOptions};
use ffnskip::skip_setup;
use ffnskip::tokenizer::Tokenizer;

const CHUNK: usize = 32;
const N_CTX: usize = 512;

/// One engine at a time: each spins its own worker threads on the machine's cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn engine(parallel: usize, queue: usize) -> Engine {
    let cfg = EngineConfig {
        parallel,
        n_ctx: N_CTX,
        threads: 2,
        queue,
        prefill_chunk: CHUNK,
        ..EngineConfig::new(default_model())
    };
    let e = Engine::start(cfg, Arc::new(Metrics::new())).unwrap();
    e.wait_ready().unwrap();
    e
}

fn skip(policy: Policy, ratio: f64) -> SkipOptions {
    SkipOptions {
        ratio: Some(ratio),
        warmup: Some(2),
        seed: 5,
        ..SkipOptions::new(policy)
    }
}

/// Prompts of different lengths (several prefill chunks for the longest) and policies.
fn requests() -> Vec<Request> {
    let texts = [
        "The capital of France is",
        common::LONG,
        "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):",
    ];
    let policies = [
        SkipOptions::none(),
        skip(Policy::Adaptive, 0.3),
        skip(Policy::Random, 0.25),
        skip(Policy::Static, 0.25),
    ];
    texts
        .iter()
        .zip(policies)
        .enumerate()
        .map(|(i, (t, p))| Request {
            max_tokens: Some(24 + 4 * i),
            skip: Some(p),
            ..Request::new(Prompt::Text(t.to_string()))
        })
        .collect()
}

/// Reads events until the first text; panics if the stream ends first.
fn first_text(s: &mut Stream) {
    loop {
        match s.blocking_next() {
            Some(Event::Text(_)) => return,
            Some(Event::Accepted { .. }) => {}
            other => panic!("no text before {other:?}"),
        }
    }
}

/// Every event of a stream, until it ends.
fn drain(mut s: Stream) -> (String, Option<Finish>, Vec<Event>) {
    let (mut text, mut done, mut all) = (String::new(), None, Vec::new());
    while let Some(ev) = s.blocking_next() {
        match &ev {
            Event::Text(t) => text.push_str(t),
            Event::Done(f) => done = Some(f.clone()),
            _ => {}
        }
        all.push(ev);
    }
    (text, done, all)
}

#[test]
fn batched_sequences_get_the_tokens_they_get_alone_and_from_generate() {
    let _serial = serial();
    let together = engine(4, 8);
    let streams: Vec<Stream> = requests()
        .into_iter()
        .map(|r| together.submit(r).unwrap())
        .collect();
    let batched: Vec<(String, Option<Finish>, Vec<Event>)> =
        streams.into_iter().map(drain).collect();
    drop(together);

    let alone = engine(1, 8);
    let file = GgufFile::open(default_model()).unwrap();
    let model = Llama::load(&file).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    for (i, r) in requests().into_iter().enumerate() {
        let (text, done, events) = &batched[i];
        let done = done
            .as_ref()
            .unwrap_or_else(|| panic!("request {i}: {events:?}"));
        assert!(matches!(events[0], Event::Accepted { prompt_tokens } if prompt_tokens > 0));
        assert_eq!(done.completion_tokens, done.tokens.len());
        assert_eq!(
            &tok.decode(&done.tokens),
            text,
            "request {i}: streamed text"
        );
        if r.skip.as_ref().unwrap().policy != Policy::None {
            assert!(
                done.ffn_skip_ratio > 0.05,
                "request {i} skipped nothing: {done:?}"
            );
        }
        // Alone in the engine, text only at the end.
        let (streamed, solo, _) = drain(
            alone
                .submit(Request {
                    stream_text: false,
                    ..r.clone()
                })
                .unwrap(),
        );
        let solo = solo.unwrap();
        assert_eq!((streamed.as_str(), solo.text.as_str()), ("", text.as_str()));
        assert_eq!(solo.tokens, done.tokens, "request {i}: batched vs alone");
        assert_eq!(solo.ffn_skip_ratio, done.ffn_skip_ratio, "request {i}");

        // `generate` on a session prefilling in the same chunks.
        let opts = r.skip.clone().unwrap();
        let setup = skip_setup::build(&opts, None, &model).unwrap();
        let config = SessionConfig {
            batch: CHUNK,
            ..SessionConfig::new(N_CTX, 2)
        };
        let mut s = Session::with_controller(&model, config, setup.controller).unwrap();
        let Prompt::Text(p) = &r.prompt else {
            unreachable!()
        };
        let ids = tok.encode(p, true, true);
        let g = generate(
            &mut s,
            &tok,
            &mut Sampler::new(SamplerConfig::greedy()),
            &ids,
            &GenerateOptions {
                max_tokens: r.max_tokens.unwrap(),
                stop: Vec::new(),
            },
            &mut |_: &str| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
        assert_eq!(g.tokens, done.tokens, "request {i}: engine vs generate");
        assert_eq!(done.prompt_tokens, ids.len());
        assert_eq!(
            s.controller.stats.ratio(),
            done.ffn_skip_ratio,
            "request {i}"
        );
    }
}

/// ShortGPT removes layers for every row of a forward call, so the engine decodes its
/// sequences apart from the others; each still gets the tokens it gets alone.
#[test]
fn shortgpt_sequences_batch_apart_and_match_decoding_alone() {
    let _serial = serial();
    let profile = common::temp_path("serve", "profile.json");
    skip_setup::profile_file::save_json(&common::test_profile(30), &profile).unwrap();
    let start = |parallel: usize| {
        let cfg = EngineConfig {
            parallel,
            n_ctx: N_CTX,
            threads: 2,
            prefill_chunk: CHUNK,
            skip_profile: Some(profile.clone()),
            ..EngineConfig::new(default_model())
        };
        let e = Engine::start(cfg, Arc::new(Metrics::new())).unwrap();
        e.wait_ready().unwrap();
        e
    };
    let reqs: Vec<Request> = [
        SkipOptions {
            ratio: Some(0.2),
            ..SkipOptions::new(Policy::Shortgpt)
        },
        skip(Policy::Adaptive, 0.3),
        SkipOptions::none(),
        SkipOptions {
            ratio: Some(0.1),
            ..SkipOptions::new(Policy::Shortgpt)
        },
    ]
    .into_iter()
    .map(|p| Request {
        max_tokens: Some(20),
        skip: Some(p),
        ..Request::new(Prompt::Text("The history of the city begins".into()))
    })
    .collect();
    let together = start(4);
    let streams: Vec<Stream> = reqs
        .iter()
        .map(|r| together.submit(r.clone()).unwrap())
        .collect();
    let batched: Vec<Finish> = streams.into_iter().map(|s| drain(s).1.unwrap()).collect();
    drop(together);
    let alone = start(1);
    for (i, r) in reqs.into_iter().enumerate() {
        let solo = drain(alone.submit(r).unwrap()).1.unwrap();
        assert_eq!(
            solo.tokens, batched[i].tokens,
            "request {i} ({})",
            solo.policy
        );
        assert_eq!(solo.ffn_skip_ratio, batched[i].ffn_skip_ratio);
    }
    assert!(batched[0].ffn_skip_ratio > 0.1, "{:?}", batched[0]);
    assert_ne!(batched[0].tokens, batched[2].tokens);
    let _ = std::fs::remove_file(&profile);
}

#[test]
fn a_dropped_stream_frees_its_slot_before_the_next_tokens() {
    let _serial = serial();
    let e = engine(1, 4);
    let mut s = e
        .submit(Request {
            max_tokens: Some(400),
            ..Request::new(Prompt::Text(
                "Count from one to a thousand: one, two,".into(),
            ))
        })
        .unwrap();
    let mut texts = 0;
    while texts < 3 {
        if let Some(Event::Text(_)) = s.blocking_next() {
            texts += 1;
        }
    }
    assert_eq!(e.metrics().active(), 1);
    drop(s);
    let t0 = Instant::now();
    while e.metrics().active() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "slot still busy");
        std::thread::sleep(Duration::from_millis(5));
    }
    let m = e.metrics().render();
    assert!(m.contains("ffnskip_requests_cancelled_total 1\n"), "{m}");
    // The slot serves the next request.
    let (_, done, _) = drain(
        e.submit(Request {
            max_tokens: Some(4),
            ..Request::new(Prompt::Text("Hello".into()))
        })
        .unwrap(),
    );
    assert_eq!(done.unwrap().completion_tokens, 4);
}

#[test]
fn the_queue_is_bounded() {
    let _serial = serial();
    let e = engine(1, 1);
    let mut first = e
        .submit(Request {
            max_tokens: Some(300),
            ..Request::new(Prompt::Text("Once upon a time, a dragon".into()))
        })
        .unwrap();
    first_text(&mut first);
    // The first is in the only slot: one request may wait, the next is refused.
    let _second = e.submit(Request::new(Prompt::Text("Hi".into()))).unwrap();
    match e.submit(Request::new(Prompt::Text("Hi".into()))) {
        Err(SubmitError::QueueFull { queued, capacity }) => assert_eq!((queued, capacity), (1, 1)),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn bad_requests_name_their_field() {
    let _serial = serial();
    let e = engine(1, 4);
    let error = |r: Request| match drain(e.submit(r).unwrap()).2.as_slice() {
        [Event::Error(err)] => (err.param.clone().unwrap_or_default(), err.message.clone()),
        other => panic!("{other:?}"),
    };
    let long = "word ".repeat(N_CTX);
    let (param, msg) = error(Request::new(Prompt::Text(long)));
    assert_eq!(param, "prompt");
    assert!(
        msg.contains(&format!("but a slot's context holds {N_CTX}")),
        "{msg}"
    );
    let (param, msg) = error(Request {
        skip: Some(skip(Policy::Adaptive, 1.5)),
        ..Request::new(Prompt::Text("Hi".into()))
    });
    assert_eq!(param, "ffnskip");
    assert_eq!(
        msg,
        "ffnskip: skip_ratio 1.5 is out of range (expected 0..1)"
    );
    let (param, msg) = error(Request {
        skip: Some(SkipOptions::new(Policy::Shortgpt)),
        ..Request::new(Prompt::Chat(vec![Message::new("user", "Hi")]))
    });
    assert_eq!(param, "ffnskip");
    assert!(msg.contains("calibration profile"), "{msg}");
}

#[test]
fn chat_deadline_and_shutdown_end_generation() {
    let _serial = serial();
    let e = engine(1, 4);
    // A chat request through the template, ended by its deadline.
    let (_, done, _) = drain(
        e.submit(Request {
            max_tokens: Some(2000),
            deadline: Some(Duration::from_millis(300)),
            ..Request::new(Prompt::Chat(vec![Message::new(
                "user",
                "Tell me everything about the history of Rome.",
            )]))
        })
        .unwrap(),
    );
    let done = done.unwrap();
    assert_eq!(done.reason, FinishReason::Deadline);
    assert_eq!(done.reason.openai(), "length");
    // Shutdown with no grace ends a running request and refuses new ones.
    let mut s = e
        .submit(Request {
            max_tokens: Some(2000),
            ..Request::new(Prompt::Text("Once upon a time".into()))
        })
        .unwrap();
    first_text(&mut s);
    // Waits for the only slot: shutdown refuses it for the engine's state, not as a bad request.
    let waiting = e.submit(Request::new(Prompt::Text("Hi".into()))).unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| e.shutdown(Duration::ZERO));
        let (_, done, _) = drain(s);
        assert_eq!(done.unwrap().reason, FinishReason::Shutdown);
    });
    let (_, done, events) = drain(waiting);
    assert!(done.is_none());
    assert_eq!(
        events.last(),
        Some(&Event::Refused(SubmitError::ShuttingDown)),
        "{events:?}"
    );
    assert!(matches!(
        e.submit(Request::new(Prompt::Text("Hi".into()))),
        Err(SubmitError::Failed(_) | SubmitError::ShuttingDown)
    ));
}

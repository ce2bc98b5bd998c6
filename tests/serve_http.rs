//! `ffnskip serve` through HTTP on a free loopback port: every endpoint, streamed and not,
//! per-request skipping, every error case with OpenAI's error shape, cancellation on
//! disconnect (the slot is free again in /metrics), and shutdown on SIGTERM with status 0.

mod common;

use std::io::Read;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::Server;
use ffnskip::serve::http::{router, AppState};
use ffnskip::serve::{Engine, EngineConfig, Metrics};
use serde_json::{json, Value};

/// One server at a time: each spins its worker threads on the machine's cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn start(extra: &[&str]) -> Server {
    let mut args = vec!["-c", "512"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

trait Requests {
    fn post(&self, path: &str, body: &Value) -> (u16, Value);
    fn metric(&self, name: &str) -> f64;
}

impl Requests for Server {
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client()
            .post(self.url(path))
            .json(body)
            .send()
            .expect("post");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    fn metric(&self, name: &str) -> f64 {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .and_then(|r| r.text())
            .expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in {text}"))
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// The `data:` payloads of an SSE body.
fn sse(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The error object of an OpenAI error body, with its four fields present.
fn error(v: &Value) -> (&str, &str, Option<&str>) {
    let e = &v["error"];
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error without `{k}`: {v}");
    }
    (
        e["message"].as_str().unwrap_or(""),
        e["type"].as_str().unwrap_or(""),
        e["param"].as_str(),
    )
}

fn chat(content: &str, extra: Value) -> Value {
    let mut b = json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        "temperature": 0,
    });
    if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    b
}

#[test]
fn endpoints_streaming_and_per_request_skipping() {
    let _serial = serial();
    let s = start(&["--parallel", "2"]);
    let r = client().get(s.url("/health")).send().unwrap();
    assert_eq!(r.json::<Value>().unwrap(), json!({"status": "ok"}));

    let models = client()
        .get(s.url("/v1/models"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    assert_eq!(models["object"], "list");
    let id = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(id, "SmolLM2-135M-Instruct.Q4_1");

    // Chat, whole and streamed: the same greedy text.
    let (st, whole) = s.post(
        "/v1/chat/completions",
        &chat("Name three colors.", json!({"model": id})),
    );
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    let u = &whole["usage"];
    let n = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=16).contains(&n), "{whole}");
    let finish = if n == 16 { "length" } else { "stop" };
    assert_eq!(whole["choices"][0]["finish_reason"], finish);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + n)
    );
    assert_eq!(u["ffn_skip_ratio"], 0.0);
    let body = client()
        .post(s.url("/v1/chat/completions"))
        .json(&chat(
            "Name three colors.",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .unwrap();
    assert!(body.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse(&body.text().unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!(finish)]);
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);

    // Completions with a stop string: the text ends before it.
    let (st, c) = s.post(
        "/v1/completions",
        &json!({"prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": ["7"]}),
    );
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["text"], " 5, 6, ");
    assert_eq!(c["choices"][0]["finish_reason"], "stop");

    // Per-request policy: usage reports the realized skip ratio.
    let (st, k) = s.post(
        "/v1/chat/completions",
        &chat(
            "Tell me a story.",
            json!({"max_tokens": 32, "ffnskip": {"skip": "adaptive", "skip_ratio": 0.3, "warmup": 2}}),
        ),
    );
    assert_eq!(st, 200, "{k}");
    let ratio = k["usage"]["ffn_skip_ratio"].as_f64().unwrap();
    assert!((0.2..=0.4).contains(&ratio), "{k}");
    assert_eq!(k["ffnskip"]["policy"], "adaptive:0.3");
    assert!(s.metric("ffnskip_ffn_skip_ratio{policy=\"adaptive:0.3\"}") > 0.2);
    assert_eq!(s.metric("ffnskip_active_slots"), 0.0);
    assert_eq!(s.metric("ffnskip_slots"), 2.0);
    assert!(
        s.metric("ffnskip_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}") >= 3.0
    );
}

#[test]
fn errors_have_openai_shape_and_status() {
    let _serial = serial();
    let s = start(&["--api-key", "sekrit", "--max-body", "4096"]);
    let c = client();
    let authed = |path: &str, body: &Value| {
        let r = c
            .post(s.url(path))
            .bearer_auth("sekrit")
            .json(body)
            .send()
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    // 401: no key, wrong key; /health and /metrics stay open.
    let (st, v) = s.post("/v1/chat/completions", &chat("Hi", json!({})));
    assert_eq!(st, 401);
    assert!(error(&v).0.starts_with("missing API key"), "{v}");
    let r = c
        .get(s.url("/v1/models"))
        .bearer_auth("nope")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(c.get(s.url("/metrics")).send().unwrap().status(), 200);
    // 400 naming the field.
    let cases = [
        (json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2}), "n", "n = 2: only n = 1 is supported"),
        (json!({"max_tokens": 4}), "messages", "missing field `messages`"),
        (chat("Hi", json!({"temperature": 5})), "temperature", "temperature = 5 is out of range (expected 0..2)"),
        (chat("Hi", json!({"max_tokens": 0})), "max_tokens", "max_tokens = 0: expected at least 1"),
        (chat("Hi", json!({"top_p": 1.5})), "top_p", "top_p = 1.5 is out of range (expected 0..1)"),
        (json!({"messages": [{"role": "robot", "content": "Hi"}]}), "messages[0].role", "messages[0].role 'robot' is not one of system, developer, user, assistant"),
        (chat("Hi", json!({"ffnskip": {"skip": "fastest"}})), "ffnskip.skip", "ffnskip.skip 'fastest' is not a policy (none, adaptive, adaptive-layer, placed, auto, random, static, shortgpt, early-exit)"),
        (chat("Hi", json!({"ffnskip": {"skip": "adaptive", "skip_ratio": 2}})), "ffnskip", "ffnskip: skip_ratio 2 is out of range (expected 0..1)"),
        (chat("Hi", json!({"logprobs": true})), "logprobs", "`logprobs` is not supported by this server"),
        (chat("Hi", json!({"stop": ""})), "stop", "stop string of 0 bytes: expected 1..256"),
    ];
    for (body, param, msg) in cases {
        let (st, v) = authed("/v1/chat/completions", &body);
        assert_eq!(st, 400, "{body}: {v}");
        let (m, kind, p) = error(&v);
        assert_eq!(
            (m, kind, p),
            (msg, "invalid_request_error", Some(param)),
            "{body}"
        );
    }
    let (st, v) = authed(
        "/v1/completions",
        &json!({"prompt": "word ".repeat(600), "max_tokens": 4}),
    );
    assert_eq!(st, 400);
    let (m, _, p) = error(&v);
    assert_eq!(p, Some("prompt"));
    assert!(m.contains("but a slot's context holds 512"), "{m}");
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("sekrit")
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert!(error(&v).0.starts_with("the body is not valid JSON"), "{v}");
    // 404: route and model.
    let r = c.get(s.url("/v2/nothing")).send().unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error(&r.json().unwrap()).0, "no route GET /v2/nothing");
    let (st, v) = authed(
        "/v1/chat/completions",
        &chat("Hi", json!({"model": "gpt-4"})),
    );
    assert_eq!(st, 404);
    assert_eq!(error(&v).2, Some("model"));
    // 413: a body over --max-body.
    let (st, v) = authed("/v1/completions", &json!({"prompt": "x".repeat(8000)}));
    assert_eq!(st, 413, "{v}");
    error(&v);
}

#[test]
fn a_full_queue_answers_429_and_a_disconnect_frees_the_slot() {
    let _serial = serial();
    let s = start(&["--parallel", "1", "--queue", "1"]);
    // A long stream holds the only slot; read its first chunk, then keep it open.
    let mut long = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true}))
        .send()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = long.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("data: "));
    assert_eq!(s.metric("ffnskip_active_slots"), 1.0);
    // A second request waits in the queue; a third is refused.
    let base = s.base.clone();
    let waiting = std::thread::spawn(move || {
        client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "Hello", "max_tokens": 2}))
            .send()
            .map(|r| r.status().as_u16())
    });
    let t0 = Instant::now();
    while s.metric("ffnskip_queue_depth") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Hello", "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().unwrap();
    assert_eq!(error(&v).1, "rate_limit_error");
    // The client of the long stream goes away: its slot serves the waiting request.
    drop(long);
    assert_eq!(waiting.join().unwrap().unwrap(), 200);
    let t0 = Instant::now();
    while s.metric("ffnskip_active_slots") != 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "slot leaked");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.metric("ffnskip_requests_cancelled_total"), 1.0);
    assert!(s.metric("ffnskip_generated_tokens_total") < 400.0);
}

#[test]
fn sigterm_finishes_streams_and_exits_zero() {
    let _serial = serial();
    stop_with_signal("-TERM");
}

#[test]
fn ctrl_c_finishes_streams_and_exits_zero() {
    let _serial = serial();
    stop_with_signal("-INT");
}

fn stop_with_signal(signal: &str) {
    let mut s = start(&["--shutdown-grace", "1"]);
    let mut long = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "stream": true}))
        .send()
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = long.read(&mut buf).unwrap();
    let pid = s.child.id().to_string();
    let t0 = Instant::now();
    assert!(Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap()
        .success());
    // While the running stream finishes, new requests get 503 (not a refused connection).
    let refused = loop {
        let (st, v) = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
        if st == 503 {
            break v;
        }
        assert_eq!(st, 200, "{v}");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no 503 after {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(refused["error"]["code"], "shutting_down", "{refused}");
    let health = client().get(s.url("/health")).send().unwrap();
    assert_eq!(health.status(), 503);
    assert_eq!(
        health.json::<Value>().unwrap(),
        json!({"status": "shutting_down"})
    );
    // The stream ends properly within the grace: a finish and [DONE].
    let mut rest = String::new();
    long.read_to_string(&mut rest).unwrap();
    let events = sse(&rest);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{rest}");
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still running after {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() < Duration::from_secs(8));
}

/// `/health` is 503 while the model loads and names the error if loading fails; requests
/// get 503 meanwhile. (The model file is a FIFO: opening it blocks until the test lets go.)
#[test]
fn health_reports_loading_then_the_load_error() {
    let _serial = serial();
    let fifo = common::temp_path("serve", "model.gguf");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let engine = Arc::new(
        Engine::start(
            EngineConfig {
                threads: 1,
                ..EngineConfig::new(fifo.clone())
            },
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    );
    let app = router(
        Arc::new(AppState::new(engine.clone(), None, Duration::from_secs(5))),
        1 << 20,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let call = |req: axum::http::Request<axum::body::Body>| {
        rt.block_on(async {
            use tower::ServiceExt;
            let r = app.clone().oneshot(req).await.unwrap();
            let st = r.status().as_u16();
            let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            (
                st,
                serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
            )
        })
    };
    let get = |p: &str| {
        axum::http::Request::get(p)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    assert_eq!(call(get("/health")), (503, json!({"status": "loading"})));
    let post = axum::http::Request::post("/v1/chat/completions")
        .body(axum::body::Body::from(chat("Hi", json!({})).to_string()))
        .unwrap();
    let (st, v) = call(post);
    assert_eq!(st, 503);
    assert_eq!(v["error"]["code"], "loading");
    // Let the open go through with an empty file: loading fails.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    let t0 = Instant::now();
    let (st, v) = loop {
        let r = call(get("/health"));
        if r.0 != 503 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(st, 500);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(fifo.to_str().unwrap()),
        "{v}"
    );
    let _ = std::fs::remove_file(&fifo);
}

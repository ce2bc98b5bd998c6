//! OpenAI's request and response shapes for `/v1/chat/completions` and `/v1/completions`:
//! parsing with errors that name the field, range checks, and the JSON sent back (whole or as
//! SSE chunks). Fields this server cannot honour (`n` > 1, `logprobs`, tools, penalties) are
//! refused, not ignored.

use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::{Finish, Prompt, Request};
use crate::chat::Message;
use crate::sampling::SamplerConfig;
use crate::skip::compensation::Compensation;
use crate::skip::{Policy, SkipOptions};

/// An error for the client: HTTP status, OpenAI's `type`, `param` and `code`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_string()),
            code: None,
        }
    }

    pub fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        ApiError {
            status,
            message,
            kind,
            param: None,
            code: Some(code),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The `ffnskip` field: the same options as the CLI's `--skip …` flags.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SkipField {
    skip: Option<String>,
    skip_ratio: Option<f64>,
    threshold: Option<f32>,
    warmup: Option<usize>,
    cold_start: Option<usize>,
    cold_end: Option<usize>,
    full_every: Option<usize>,
    compensate: Option<String>,
    max_kld: Option<f64>,
    seed: Option<u64>,
}

/// Both endpoints' fields (`messages` for chat, `prompt` for completions).
#[derive(Deserialize)]
struct Body {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<OneOrMany>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    echo: Option<bool>,
    best_of: Option<i64>,
    tools: Option<Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    ffnskip: Option<SkipField>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A parsed, checked request.
pub struct Parsed {
    pub model: Option<String>,
    pub request: Request,
    pub stream: bool,
    pub include_usage: bool,
}

/// Stop strings a request may carry, and their longest length in bytes.
const MAX_STOP: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// Parses and checks a request body for `endpoint`.
pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<Parsed, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let body: Body = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // "missing field `x`" at the top level: the field is the parameter.
        let param = if path == "." {
            msg.split('`').nth(1).unwrap_or("").to_string()
        } else {
            path.clone()
        };
        let what = if inner.is_syntax() || inner.is_eof() {
            format!("the body is not valid JSON: {msg}")
        } else if path == "." {
            msg
        } else {
            format!("{path}: {msg}")
        };
        ApiError::bad(
            if inner.is_syntax() || inner.is_eof() {
                ""
            } else {
                &param
            },
            what,
        )
    })?;
    let prompt = match endpoint {
        Endpoint::Chat => {
            let Some(messages) = body.messages else {
                return Err(ApiError::bad("messages", "missing field `messages`"));
            };
            if messages.is_empty() {
                return Err(ApiError::bad(
                    "messages",
                    "`messages` must hold at least one message",
                ));
            }
            let mut out = Vec::with_capacity(messages.len());
            for (i, m) in messages.into_iter().enumerate() {
                if !matches!(
                    m.role.as_str(),
                    "system" | "user" | "assistant" | "developer"
                ) {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].role"),
                        format!(
                            "messages[{i}].role '{}' is not one of system, developer, user, assistant",
                            m.role
                        ),
                    ));
                }
                let role = if m.role == "developer" {
                    "system"
                } else {
                    &m.role
                };
                let content = match m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) => {
                        let mut t = String::new();
                        for (j, p) in parts.into_iter().enumerate() {
                            match (p.kind.as_str(), p.text) {
                                ("text", Some(s)) => t.push_str(&s),
                                _ => {
                                    return Err(ApiError::bad(
                                        &format!("messages[{i}].content[{j}]"),
                                        format!(
                                            "messages[{i}].content[{j}]: only text parts are supported (got type '{}')",
                                            p.kind
                                        ),
                                    ))
                                }
                            }
                        }
                        t
                    }
                };
                out.push(Message::new(role, &content));
            }
            Prompt::Chat(out)
        }
        Endpoint::Completions => match body.prompt {
            None => return Err(ApiError::bad("prompt", "missing field `prompt`")),
            Some(OneOrMany::One(s)) => Prompt::Text(s),
            Some(OneOrMany::Many(v)) if v.len() == 1 => Prompt::Text(v.into_iter().collect()),
            Some(OneOrMany::Many(v)) => {
                return Err(ApiError::bad(
                    "prompt",
                    format!("`prompt` holds {} prompts; send one per request", v.len()),
                ))
            }
        },
    };
    if let Some(n) = body.n.filter(|&n| n != 1) {
        return Err(ApiError::bad(
            "n",
            format!("n = {n}: only n = 1 is supported"),
        ));
    }
    if let Some(b) = body.best_of.filter(|&b| b != 1) {
        return Err(ApiError::bad(
            "best_of",
            format!("best_of = {b}: only 1 is supported"),
        ));
    }
    let unsupported = [
        (
            "logprobs",
            body.logprobs
                .as_ref()
                .is_some_and(|v| !v.is_null() && v != &json!(false)),
        ),
        (
            "top_logprobs",
            body.top_logprobs.as_ref().is_some_and(|v| !v.is_null()),
        ),
        ("echo", body.echo == Some(true)),
        ("tools", body.tools.as_ref().is_some_and(|v| !v.is_null())),
        (
            "presence_penalty",
            body.presence_penalty.is_some_and(|p| p != 0.0),
        ),
        (
            "frequency_penalty",
            body.frequency_penalty.is_some_and(|p| p != 0.0),
        ),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
        return Err(ApiError::bad(
            name,
            format!("`{name}` is not supported by this server"),
        ));
    }
    let max_tokens = match (body.max_completion_tokens, body.max_tokens) {
        (Some(m), _) => Some(("max_completion_tokens", m)),
        (None, Some(m)) => Some(("max_tokens", m)),
        _ => None,
    };
    if let Some((name, m)) = max_tokens.filter(|(_, m)| *m < 1) {
        return Err(ApiError::bad(
            name,
            format!("{name} = {m}: expected at least 1"),
        ));
    }
    let range = |name: &str, v: Option<f64>, lo: f64, hi: f64| -> Result<(), ApiError> {
        match v {
            Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::bad(
                name,
                format!("{name} = {x} is out of range (expected {lo}..{hi})"),
            )),
            _ => Ok(()),
        }
    };
    range("temperature", body.temperature, 0.0, 2.0)?;
    range("top_p", body.top_p, 0.0, 1.0)?;
    range("min_p", body.min_p, 0.0, 1.0)?;
    if body.top_p == Some(0.0) {
        return Err(ApiError::bad(
            "top_p",
            "top_p = 0 keeps no token (expected above 0, up to 1)",
        ));
    }
    if let Some(k) = body.top_k.filter(|&k| k < 0) {
        return Err(ApiError::bad(
            "top_k",
            format!("top_k = {k}: expected 0 (off) or more"),
        ));
    }
    let stop = match body.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::bad(
            "stop",
            format!("{} stop strings: at most {MAX_STOP}", stop.len()),
        ));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::bad(
            "stop",
            format!(
                "stop string of {} bytes: expected 1..{MAX_STOP_BYTES}",
                s.len()
            ),
        ));
    }
    let mut sampling = SamplerConfig::default();
    if let Some(t) = body.temperature {
        sampling.temperature = t as f32;
    }
    if let Some(p) = body.top_p {
        sampling.top_p = p as f32;
    }
    if let Some(k) = body.top_k {
        sampling.top_k = k as usize;
    }
    if let Some(p) = body.min_p {
        sampling.min_p = p as f32;
    }
    // OpenAI has no repetition penalty: off, so that temperature 0 is plain greedy decoding.
    sampling.repeat_penalty = 1.0;
    sampling.seed = match body.seed {
        Some(s) => s as u64,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let skip = body
        .ffnskip
        .map(|f| skip_options(f, sampling.seed))
        .transpose()?;
    Ok(Parsed {
        model: body.model,
        request: Request {
            prompt,
            max_tokens: max_tokens.map(|(_, m)| m as usize),
            sampling,
            stop,
            skip,
            deadline: None,
            stream_text: body.stream,
        },
        stream: body.stream,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn skip_options(f: SkipField, seed: u64) -> Result<SkipOptions, ApiError> {
    let name = f.skip.as_deref().unwrap_or("adaptive");
    let (name, suffix) = match name.split_once('+') {
        Some((n, c)) => (n, Some(c)),
        None => (name, None),
    };
    let policy = Policy::parse(name).ok_or_else(|| {
        ApiError::bad(
            "ffnskip.skip",
            format!("ffnskip.skip '{name}' is not a policy (none, adaptive, adaptive-layer, placed, auto, random, static, shortgpt, early-exit)"),
        )
    })?;
    let comp = match (suffix, f.compensate.as_deref()) {
        (Some(c), _) | (None, Some(c)) => Compensation::parse(c).ok_or_else(|| {
            ApiError::bad(
                "ffnskip.compensate",
                format!("ffnskip.compensate '{c}' is not one of none, mean, lowrank"),
            )
        })?,
        (None, None) => Compensation::None,
    };
    Ok(SkipOptions {
        policy,
        ratio: f.skip_ratio,
        threshold: f.threshold,
        warmup: f.warmup,
        cold_start: f.cold_start,
        cold_end: f.cold_end,
        full_every: f.full_every,
        seed: f.seed.unwrap_or(seed),
        compensate: comp,
        max_kld: f.max_kld,
    })
}

/// Fields every response and chunk shares.
pub struct Ids<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

pub fn usage(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "ffn_skip_ratio": f.ffn_skip_ratio,
    })
}

/// The whole (non-streamed) response.
pub fn response(endpoint: Endpoint, ids: &Ids, text: &str, f: &Finish) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": f.reason.openai(),
        }),
        Endpoint::Completions => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": f.reason.openai(),
        }),
    };
    json!({
        "id": ids.id,
        "object": if endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" },
        "created": ids.created,
        "model": ids.model,
        "choices": [choice],
        "usage": usage(f),
        "ffnskip": {"policy": f.policy, "finish": f.reason.as_str()},
    })
}

/// One streamed chunk: `delta` text (chat: with the role on the first), or the finish.
pub fn chunk(
    endpoint: Endpoint,
    ids: &Ids,
    text: Option<&str>,
    first: bool,
    finish: Option<&Finish>,
) -> Value {
    let reason = finish.map(|f| f.reason.openai());
    let choice = match endpoint {
        Endpoint::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
        }
        Endpoint::Completions => json!({
            "index": 0,
            "text": text.unwrap_or(""),
            "logprobs": null,
            "finish_reason": reason,
        }),
    };
    json!({
        "id": ids.id,
        "object": if endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": ids.created,
        "model": ids.model,
        "choices": [choice],
    })
}

/// The last chunk before `[DONE]` when the client asked for usage.
pub fn usage_chunk(endpoint: Endpoint, ids: &Ids, f: &Finish) -> Value {
    json!({
        "id": ids.id,
        "object": if endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": ids.created,
        "model": ids.model,
        "choices": [],
        "usage": usage(f),
    })
}

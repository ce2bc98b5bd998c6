//! The OpenAI-compatible HTTP layer over the [`Engine`]: axum routes, API-key check, body
//! limit, request metrics, SSE streaming with keep-alive, and every error in OpenAI's
//! `{"error": {message, type, param, code}}` shape.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::engine::{Engine, Event, Finish, SubmitError};
use super::openai::{self, ApiError, Endpoint, Ids};

/// What the handlers share.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub api_key: Option<String>,
    /// Each request's generation deadline.
    pub timeout: Duration,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(engine: Arc<Engine>, api_key: Option<String>, timeout: Duration) -> Self {
        AppState {
            engine,
            api_key,
            timeout,
            next_id: AtomicU64::new(1),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut r = (status, Json(self.body())).into_response();
        if matches!(self.status, 429 | 503) {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// The router: `/health`, `/metrics`, `/v1/models`, `/v1/chat/completions`,
/// `/v1/completions`; bodies above `max_body` bytes get 413.
pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(state)
}

/// `ffnskip_requests_total{endpoint, status}`.
async fn count(State(s): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let r = next.run(req).await;
    s.engine.metrics().request(&endpoint, r.status().as_u16());
    r
}

/// `Authorization: Bearer KEY` when the server has `--api-key`.
async fn auth(State(s): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            let what = if given.is_none() { "missing" } else { "wrong" };
            return ApiError::new(
                401,
                "invalid_request_error",
                "invalid_api_key",
                format!(
                    "{what} API key: send `Authorization: Bearer KEY` with the server's --api-key"
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: HttpRequest) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        "not_found",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: HttpRequest) -> ApiError {
    ApiError::new(
        405,
        "invalid_request_error",
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let e = &s.engine;
    if e.is_ready() {
        Json(json!({"status": "ok"})).into_response()
    } else if let Some(err) = e.error() {
        let body = json!({"status": "error", "error": err});
        (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
    } else if e.is_stopping() || e.info().is_some() {
        unavailable("shutting_down")
    } else {
        unavailable("loading")
    }
}

/// 503 `{"status": STATUS}` with `Retry-After: 1`.
fn unavailable(status: &str) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": status })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut r = s.engine.metrics().render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// The answer to a request the engine would not take in its present state.
fn refused(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull { .. } => {
            ApiError::new(429, "rate_limit_error", "queue_full", e.to_string())
        }
        SubmitError::Loading => loading(),
        SubmitError::ShuttingDown => {
            ApiError::new(503, "server_error", "shutting_down", e.to_string())
        }
        SubmitError::Failed(_) => {
            ApiError::new(500, "server_error", "engine_failed", e.to_string())
        }
    }
}

fn loading() -> ApiError {
    ApiError::new(
        503,
        "server_error",
        "loading",
        "the model is still loading; retry shortly".into(),
    )
}

async fn models(State(s): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let info = s.engine.info().ok_or_else(loading)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": info.id,
            "object": "model",
            "created": 0,
            "owned_by": "ffnskip",
            "meta": {
                "path": info.path.display().to_string(),
                "parallel": info.parallel,
                "n_ctx_slot": info.n_ctx,
                "skip": info.skip,
            },
        }],
    }))
    .into_response())
}

async fn chat(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    complete(s, Endpoint::Chat, body).await
}

async fn completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    complete(s, Endpoint::Completions, body).await
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn complete(
    s: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status().as_u16();
        if status == 413 {
            ApiError::new(
                413,
                "invalid_request_error",
                "request_too_large",
                format!(
                    "the request body is larger than the server's limit: {}",
                    e.body_text()
                ),
            )
        } else {
            ApiError {
                status,
                ..ApiError::bad("", e.body_text())
            }
        }
    })?;
    let info = s.engine.info().ok_or_else(loading)?;
    let mut parsed = openai::parse(endpoint, &bytes)?;
    if let Some(m) = parsed
        .model
        .as_deref()
        .filter(|m| !m.is_empty() && *m != info.id)
    {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                404,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "model '{m}' is not served here; this server serves '{}'",
                    info.id
                ),
            )
        });
    }
    parsed.request.deadline = Some(s.timeout);
    let mut stream = s.engine.submit(parsed.request).map_err(refused)?;
    // The first event says whether the engine took the request.
    match stream.next().await {
        Some(Event::Accepted { .. }) => {}
        Some(Event::Error(e)) => {
            return Err(ApiError::bad(e.param.as_deref().unwrap_or(""), e.message))
        }
        Some(Event::Refused(e)) => return Err(refused(e)),
        other => {
            return Err(ApiError::new(
                500,
                "server_error",
                "engine_failed",
                format!("the engine answered {other:?}"),
            ))
        }
    }
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{n}"),
        Endpoint::Completions => format!("cmpl-{n}"),
    };
    let model = info.id.clone();
    let created = now_s();
    if !parsed.stream {
        let finish = loop {
            match stream.next().await {
                Some(Event::Text(_)) => {}
                Some(Event::Done(f)) => break f,
                Some(Event::Error(e)) => {
                    return Err(ApiError::new(
                        500,
                        "server_error",
                        "engine_failed",
                        e.message,
                    ))
                }
                Some(Event::Refused(e)) => return Err(refused(e)),
                Some(Event::Accepted { .. }) => {}
                None => {
                    return Err(ApiError::new(
                        500,
                        "server_error",
                        "engine_failed",
                        "the engine dropped the request".into(),
                    ))
                }
            }
        };
        let ids = Ids {
            id: &id,
            created,
            model: &model,
        };
        return Ok(Json(openai::response(endpoint, &ids, &finish.text, &finish)).into_response());
    }
    // Streamed: one SSE event per released piece of text, the finish, usage if asked, [DONE].
    struct St {
        stream: super::engine::Stream,
        id: String,
        model: String,
        created: u64,
        first: bool,
        include_usage: bool,
        pending: std::collections::VecDeque<SseEvent>,
        done: bool,
    }
    let st = St {
        stream,
        id,
        model,
        created,
        first: true,
        include_usage: parsed.include_usage,
        pending: Default::default(),
        done: false,
    };
    let events = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            let ids = Ids {
                id: &st.id,
                created: st.created,
                model: &st.model,
            };
            let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
            match st.stream.next().await {
                Some(Event::Text(t)) => {
                    let c = openai::chunk(endpoint, &ids, Some(&t), st.first, None);
                    st.first = false;
                    st.pending.push_back(data(c));
                }
                Some(Event::Done(f)) => {
                    st.pending.extend(finish_events(
                        endpoint,
                        &ids,
                        &f,
                        st.first,
                        st.include_usage,
                    ));
                    st.done = true;
                }
                Some(Event::Error(e)) => {
                    let err = ApiError::new(500, "server_error", "engine_failed", e.message);
                    st.pending.push_back(data(err.body()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Event::Refused(e)) => {
                    st.pending.push_back(data(refused(e).body()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Event::Accepted { .. }) => {}
                None => st.done = true,
            }
        }
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok((headers, Sse::new(events).keep_alive(KeepAlive::default())).into_response())
}

/// The finish chunk, the usage chunk if asked, and `[DONE]`.
fn finish_events(
    endpoint: Endpoint,
    ids: &Ids,
    f: &Finish,
    first: bool,
    include_usage: bool,
) -> Vec<SseEvent> {
    let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
    let mut out = vec![data(openai::chunk(endpoint, ids, None, first, Some(f)))];
    if include_usage {
        out.push(data(openai::usage_chunk(endpoint, ids, f)));
    }
    out.push(SseEvent::default().data("[DONE]"));
    out
}

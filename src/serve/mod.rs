//! Serving: the batching [`engine`] (a library API, no HTTP) and the OpenAI-compatible HTTP
//! layer above it ([`http`], with the request and response shapes in [`openai`]).

pub mod engine;
pub mod http;
pub mod metrics;
pub mod openai;
mod scheduler;

pub use engine::{
    Engine, EngineConfig, Event, Finish, FinishReason, ModelInfo, Prompt, Request, RequestError,
    Stream, SubmitError,
};
pub use metrics::Metrics;

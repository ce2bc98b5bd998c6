//! ffnskip: a CPU runtime for quantized LLaMA GGUF models with FFN-SkipLLM.
//!
//! Layers, each using only those below it: `gguf` (bytes → typed file) and `ggml` (the one
//! FFI module) → `tensor` (matrices, parallel products) → `skip` (the `Controller` trait the
//! forward pass calls, and the policies) → `model` (forward pass) → `skip_setup` (controllers
//! from options and profiles) → `tokenizer`, `chat`, `sampling`, `session`, `conversation` →
//! `measure` → `cli`. `outfile` and `interrupt` are leaves for commands that write or chat.
//!
//! `unsafe` is denied everywhere but in `ggml` (the FFI and ggml's SIMD orders, each block
//! with a SAFETY comment) and at the one mmap in `gguf::reader`.
#![deny(unsafe_code)]

pub mod chat;
pub mod cli;
pub mod conversation;
pub mod convert;
pub mod fetch;
pub mod ggml;
pub mod gguf;
pub mod interrupt;
pub mod measure;
pub mod model;
pub mod outfile;
pub mod peer;
pub mod prompt_cache;
pub mod sampling;
pub mod serve;
pub mod session;
pub mod skip;
pub mod skip_setup;
pub mod team;
pub mod tensor;
pub mod tokenizer;

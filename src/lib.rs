//! pensieve: a local LLM server in one binary.
//!
//! The request path:
//!
//! ```text
//! client ──HTTP──▶ server (hyper, tokio): guard (Host, Origin), auth, routes::Route, body limit
//!                   │ api::anthropic | api::openai    wire JSON ─▶ request::GenerateRequest
//!                   ▼
//!                 models::ModelSet   the request's `model` ─▶ a configured model (name, alias,
//!                   │                default), loaded on demand ─▶ a Lease on its EngineHandle
//!                   ▼
//!                 EngineHandle::generate   tool_choice check, late system messages placed,
//!                   │                      admission (slots, queue, memory) ─▶ permit,
//!                   │                      then the prompt: tokenizer::PromptTokenizer (Rust,
//!                   │                      verified at start-up) or the engine's Python tokenizer
//!                   │ std mpsc Command::Generate
//!                   ▼
//!                 engine thread: worker::serve (the loop, no pyo3) ─ py::PyBackend (pyo3)
//!                   │            ─ python/pensieve_shim/ (Engine: scheduler, prefix cache) ─ mlx_lm
//!                   │ per-request tokio mpsc of TokenEvent (one per generated token)
//!                   ▼
//!                 Generation (permit, stop matcher) ─▶ request::GenEvent
//!                   ▼
//!                 server::handlers: collected into the dialect's JSON, or rendered by the
//!                 dialect's StreamRenderer into SSE frames ─▶ the client (a client that
//!                 hangs up or stops reading drops the Generation: the engine cancels it)
//! ```
//!
//! Modules:
//! - [`cli`]: the subcommands (serve, claude, env, status).
//! - [`config`]: flags (each also an env var).
//! - [`server`]: accept loop, routing, auth, body limits, handlers, shutdown.
//! - [`api`]: the dialects (Anthropic Messages, OpenAI chat/completions, OpenAI Responses,
//!   Ollama); each converts its wire types to the internal request
//!   and renders the output (naming tool calls its own way).
//! - [`request`]: the internal request and output types both dialects and the engine share.
//! - [`engine`]: the engine thread, admission control, the token stream; its
//!   `py` module is the only code that touches pyo3.
//! - [`constrain`]: structured outputs: grammars (llguidance) and per-sequence token masks.
//! - [`stop`]: text-level stop sequences across token boundaries.
//! - [`sse`]: event-stream encoding.
//! - [`blas`]: routes MLX's CPU matmuls to OpenBLAS on Linux.
//! - [`demo`]: the trained demo model embedded in the binary.
//! - [`memory`]: system / process memory readings.
//! - [`metrics`]: Prometheus metrics (`GET /metrics`).
//! - [`models`]: the models a server has: routing client names, load on demand, keep-alive, eviction.
//! - [`ollama`]: models Ollama pulled, found through its manifests.
//! - [`private_dir`]: the prefix-cache folder kept private to its user.
//! - [`shard`]: one model over several processes or machines (MLX's distributed group): ranks, launch, health.
//! - [`tokenizer`]: chat template + tokenizer in Rust (verified against Python at start-up).
//! - [`error`]: the one error type and its mapping to HTTP and each dialect.

pub mod api;
pub mod blas;
pub mod cli;
pub mod config;
pub mod constrain;
pub mod demo;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod ollama;
#[cfg(unix)]
pub mod private_dir;
pub mod request;
pub mod server;
pub mod shard;
pub mod sse;
pub mod stop;
pub mod tokenizer;

pub use config::Config;
pub use engine::EngineHandle;

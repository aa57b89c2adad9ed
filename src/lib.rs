//! pensieve: a local LLM server in one binary.
//!
//! The request path:
//!
//! ```text
//! client ──HTTP──▶ server (hyper, tokio)  auth, body limit, routing
//!                   │ api::anthropic      wire JSON ─▶ engine::GenerateRequest
//!                   ▼
//!                 EngineHandle::generate   admission (semaphore, queue, memory) ─▶ permit
//!                   │ std mpsc Command
//!                   ▼
//!                 engine thread (owns Python) ─ py.rs ─ python/pensieve_shim/ ─ mlx_lm
//!                   │ per-request tokio mpsc of TokenEvent (one per decoded token)
//!                   ▼
//!                 Generation (permit + stop matcher) ─▶ JSON or SSE back to the client
//! ```
//!
//! Modules:
//! - [`cli`]: the subcommands (serve, claude, env, status).
//! - [`config`]: flags (each also an env var).
//! - [`server`]: accept loop, routing, auth, body limits, handlers, shutdown.
//! - [`api`]: the dialects; each converts its wire types to the internal request.
//! - [`engine`]: the engine thread, admission control, the token stream; its
//!   `py` module is the only code that touches pyo3.
//! - [`stop`]: text-level stop sequences across token boundaries.
//! - [`sse`]: event-stream encoding.
//! - [`blas`]: routes MLX's CPU matmuls to OpenBLAS on Linux.
//! - [`demo`]: the trained demo model embedded in the binary.
//! - [`memory`]: system / process memory readings.
//! - [`metrics`]: Prometheus metrics (`GET /metrics`).
//! - [`ollama`]: models Ollama pulled, found through its manifests.
//! - [`private_dir`]: the prefix-cache folder kept private to its user.
//! - [`tokenizer`]: chat template + tokenizer in Rust (verified against Python at start-up).
//! - [`error`]: the one error type and its mapping to HTTP and each dialect.

pub mod api;
pub mod blas;
pub mod cli;
pub mod config;
pub mod demo;
pub mod engine;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod ollama;
#[cfg(unix)]
pub mod private_dir;
pub mod server;
pub mod sse;
pub mod stop;
pub mod tokenizer;

pub use config::Config;
pub use engine::EngineHandle;

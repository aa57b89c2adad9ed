//! The engine: one thread that owns the model, fed over channels.
//!
//! `EngineHandle::generate` takes an admission permit (bounded concurrency,
//! bounded queue, memory gate), sends a `Command::Generate` to the engine
//! thread and returns a [`Generation`]: the per-request token stream with the
//! permit inside it. Dropping the `Generation` (client gone, stop sequence hit)
//! closes the channel; the engine sees that before its next step and removes
//! the sequence from the batch, and the permit returns to the pool.

mod admission;
#[cfg(test)]
mod fake;
mod py;
mod worker;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

pub use admission::Admission;
pub use py::{compare_cpu_kernels, logits_per_blas};

use crate::config::Config;
use crate::error::ApiError;
use crate::stop::StopMatcher;
use crate::tokenizer::PromptTokenizer;

// The internal request and output types live in crate::request; the
// engine and both dialects use them from there.
pub use crate::request::*;

// ---------------------------------------------------------------------------
// What flows back.

/// Raw events from the engine thread, one `Token` per generated token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenEvent {
    Started {
        prompt_tokens: u32,
        cached_tokens: u32,
        max_tokens: u32,
    },
    /// One generated token and what its text completed (maybe nothing yet),
    /// with its log-probability when the request asked.
    Token(Vec<Piece>, Option<worker::RawLogprob>),
    /// Output that is not a new token (text the detokenizer held back).
    Flush(Vec<Piece>),
    Finished(EngineFinish),
    Failed(ApiError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EngineFinish {
    Eos,
    Length,
}

/// One admitted request's output stream. Owns the admission permit: the slot
/// is held exactly as long as this value lives.
pub struct Generation {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub max_tokens: u32,
    output_tokens: u32,
    rx: Option<mpsc::UnboundedReceiver<TokenEvent>>,
    stop: StopMatcher,
    pending: VecDeque<GenEvent>,
    tool_calls: u32,
    started: std::time::Instant,
    ttft: Option<std::time::Duration>,
    /// How it ended, for the log line and metrics (None: still running or dropped).
    outcome: Option<&'static str>,
    /// Request id, route and model for the log line.
    pub label: RequestLabel,
    /// Token ids to text, for log-probabilities.
    vocab: Option<Arc<crate::constrain::Grammars>>,
    _permit: OwnedSemaphorePermit,
    /// Time spent loading the model for this request (counted in its TTFT).
    load_wait: Option<std::time::Duration>,
    /// Whatever must live as long as the generation (the model's lease).
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// Who a generation belongs to, for its log line.
#[derive(Debug, Clone, Default)]
pub struct RequestLabel {
    pub id: String,
    pub route: &'static str,
    pub model: String,
}

impl Drop for Generation {
    /// One log line and the metrics per generation, however it ended:
    /// finished, failed, or dropped because the client went away.
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or("cancelled");
        let secs = self.started.elapsed().as_secs_f64();
        crate::metrics::generation_done(outcome, self.prompt_tokens, self.cached_tokens, self.output_tokens, secs);
        tracing::info!(
            id = %self.label.id,
            route = self.label.route,
            model = %self.label.model,
            tokens_in = self.prompt_tokens,
            cached = self.cached_tokens,
            tokens_out = self.output_tokens,
            ttft_ms = self.ttft.map(|t| t.as_millis() as u64),
            load_ms = self.load_wait.map(|t| t.as_millis() as u64),
            ms = (secs * 1000.0) as u64,
            outcome,
            "generation"
        );
    }
}

impl Generation {
    /// The request waited `load` for its model to load, from `since`: its
    /// times (TTFT, duration) count from then, so they include the load.
    pub fn waited_for_load(&mut self, since: std::time::Instant, load: std::time::Duration) {
        self.started = self.started.min(since);
        self.load_wait = Some(load);
    }

    /// Keeps `value` alive until this generation ends (dropped with it).
    pub fn hold(&mut self, value: Box<dyn std::any::Any + Send + Sync>) {
        self._held = Some(value);
    }

    pub fn output_tokens(&self) -> u32 {
        self.output_tokens
    }

    /// When the request was admitted.
    pub fn started(&self) -> std::time::Instant {
        self.started
    }

    /// Time from admission to the first output, once there was some.
    pub fn ttft(&self) -> Option<std::time::Duration> {
        self.ttft
    }

    /// The next event; `None` after `Done` or `Error`.
    pub async fn next(&mut self) -> Option<GenEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                match &e {
                    GenEvent::Text(_) | GenEvent::Thinking(_) | GenEvent::ToolCall(_) if self.ttft.is_none() => {
                        let t = self.started.elapsed();
                        crate::metrics::ttft(t.as_secs_f64());
                        self.ttft = Some(t);
                    }
                    GenEvent::Done { reason, .. } => {
                        self.outcome = Some(match reason {
                            StopReason::EndTurn => "end_turn",
                            StopReason::MaxTokens => "max_tokens",
                            StopReason::StopSequence(_) => "stop_sequence",
                            StopReason::ToolUse => "tool_use",
                        })
                    }
                    GenEvent::Error(_) => self.outcome = Some("error"),
                    _ => {}
                }
                return Some(e);
            }
            let rx = self.rx.as_mut()?;
            let event = if crate::shard::distributed() {
                // Sharded: a lost group fails the stream even while the
                // engine thread is stuck in a collective.
                tokio::select! {
                    biased;
                    e = rx.recv() => e,
                    why = crate::shard::when_lost() => Some(TokenEvent::Failed(ApiError::Unavailable(format!(
                        "the model's shard group is lost ({why}): the server is restarting"
                    )))),
                }
            } else {
                rx.recv().await
            };
            match event {
                Some(TokenEvent::Token(pieces, logprob)) => {
                    self.output_tokens += 1;
                    if let (Some(lp), Some(vocab)) = (logprob, &self.vocab) {
                        if self.rx.is_some() {
                            self.pending.push_back(GenEvent::Logprob(token_logprob(vocab, lp)));
                        }
                    }
                    self.take_pieces(pieces);
                }
                Some(TokenEvent::Flush(pieces)) => self.take_pieces(pieces),
                Some(TokenEvent::Finished(f)) => {
                    let rest = self.stop.flush();
                    if !rest.is_empty() {
                        self.pending.push_back(GenEvent::Text(rest));
                    }
                    self.finish(match f {
                        EngineFinish::Eos if self.tool_calls > 0 => StopReason::ToolUse,
                        EngineFinish::Eos => StopReason::EndTurn,
                        EngineFinish::Length => StopReason::MaxTokens,
                    });
                }
                Some(TokenEvent::Failed(e)) => {
                    self.rx = None;
                    self.pending.push_back(GenEvent::Error(e));
                }
                Some(TokenEvent::Started { .. }) => {}
                None => {
                    self.rx = None;
                    self.pending.push_back(GenEvent::Error(ApiError::Unavailable("the engine stopped while generating".into())));
                }
            }
        }
    }

    /// Classified output of one engine item: text goes through the stop
    /// matcher; thinking and tool calls pass as they are.
    fn take_pieces(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            if self.rx.is_none() {
                break; // a stop sequence ended the generation
            }
            match piece {
                Piece::Text(t) => {
                    let out = self.stop.push(&t);
                    if !out.emit.is_empty() {
                        self.pending.push_back(GenEvent::Text(out.emit));
                    }
                    if let Some(i) = out.matched {
                        let seq = self.stop.stops()[i].clone();
                        self.finish(StopReason::StopSequence(seq));
                    }
                }
                Piece::Thinking(t) => self.pending.push_back(GenEvent::Thinking(t)),
                Piece::ToolCall { name, arguments } => {
                    // Text held back by the stop matcher precedes the call.
                    let held = self.stop.flush();
                    if !held.is_empty() {
                        self.pending.push_back(GenEvent::Text(held));
                    }
                    self.tool_calls += 1;
                    self.pending.push_back(GenEvent::ToolCall(OutputToolCall { name, arguments }));
                }
            }
        }
    }

    fn finish(&mut self, reason: StopReason) {
        // Dropping the receiver tells the engine to stop this sequence now
        // (it matters for stop sequences; for EOS/length it is already gone).
        self.rx = None;
        self.pending.push_back(GenEvent::Done { reason, output_tokens: self.output_tokens });
    }

    /// Runs to the end and collects the output (non-streaming responses).
    pub async fn collect(&mut self) -> Result<(Collected, StopReason), ApiError> {
        let mut out = Collected::default();
        while let Some(ev) = self.next().await {
            match ev {
                GenEvent::Done { reason, .. } => return Ok((out, reason)),
                GenEvent::Error(e) => return Err(e),
                ev => out.push(ev),
            }
        }
        Err(ApiError::Internal("generation ended without a result".into()))
    }
}

/// Token ids to text: the engine reports ids only.
fn token_logprob(vocab: &crate::constrain::Grammars, (token, logprob, top): worker::RawLogprob) -> TokenLogprob {
    let alt = |t: u32, lp: f32| {
        let bytes = vocab.token_bytes(t);
        Alternative { text: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob: lp }
    };
    TokenLogprob {
        token: alt(token, logprob),
        // Alternatives the grammar forbids have no probability at all.
        top: top.into_iter().filter(|(_, lp)| lp.is_finite()).map(|(t, lp)| alt(t, lp)).collect(),
    }
}

// ---------------------------------------------------------------------------
// Engine state shared with the HTTP side (read without the GIL).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EngineState {
    Loading = 0,
    Ready = 1,
    Failed = 2,
    Stopped = 3,
}

/// Facts about the loaded model, from the shim's `info()`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelInfo {
    pub model: String,
    pub model_type: Option<String>,
    /// The context served (the model's window, or less with --context-length).
    pub context_length: u64,
    /// The model's own window.
    #[serde(default)]
    pub model_context_length: u64,
    pub vocab_size: Option<u64>,
    /// Tokens that end a sequence.
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    pub model_bytes: u64,
    pub load_seconds: f64,
    pub mlx_version: String,
    pub device: String,
    #[serde(default)]
    pub blas: String,
    /// What the CPU kernels do for this model (src/kernels/): the
    /// instruction set and layers, or why they are not used.
    #[serde(default)]
    pub cpu_kernels: serde_json::Value,
    /// Whether sequences share decode steps (false: the model cannot batch, they run one at a time).
    #[serde(default = "yes")]
    pub batching: bool,
    /// Sampling values used when a request sends none, each with its source.
    #[serde(default)]
    pub sampling_defaults: serde_json::Value,
    /// Whether the model thinks in tags (its template has a thinking switch).
    #[serde(default)]
    pub thinking: bool,
    /// How the template takes a system message in mid-conversation: "system"
    /// (in place), "user" (as its own user turn), "merge" (joined to a user turn).
    #[serde(default = "system_mode")]
    pub late_system: String,
    /// Tokenizer file and chat template, for the Rust-side tokenizer.
    #[serde(default, skip_serializing)]
    pub template: crate::tokenizer::TemplateInfo,
    /// Sharded over a distributed group: {mode, ranks, rank} (this rank's
    /// `model_bytes` are its shard's).
    #[serde(default)]
    pub shard: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

fn system_mode() -> String {
    "system".into()
}

/// A system message that is not the first message (Claude Code's
/// environment block, reminders) stays where it stands, so the head of the
/// prompt — system prompt and tools — is the same turn after turn and session
/// after session. Templates that drop or refuse a system message there get it
/// as `<system-reminder>` text in a user turn at the same place (`mode`
/// "user"), or joined to the neighbouring user turn where roles must
/// alternate ("merge"; appending after a user turn then changes that turn).
pub fn place_late_system_messages(prompt: &mut Prompt, mode: &str) {
    if mode == "system" || !prompt.messages.iter().skip(1).any(|m| m.role == "system") {
        return;
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(prompt.messages.len());
    for (i, m) in prompt.messages.drain(..).enumerate() {
        if i == 0 || m.role != "system" {
            out.push(m);
            continue;
        }
        let reminder = format!("<system-reminder>\n{}\n</system-reminder>", m.content);
        match out.last_mut() {
            Some(last) if mode == "merge" && last.role == "user" => {
                last.content.push_str("\n\n");
                last.content.push_str(&reminder);
            }
            _ => out.push(ChatMessage::new("user", reminder)),
        }
    }
    if mode == "merge" {
        // A reminder that followed an assistant turn joins the next user turn.
        let mut merged: Vec<ChatMessage> = Vec::with_capacity(out.len());
        for m in out {
            match merged.last_mut() {
                Some(last) if last.role == "user" && m.role == "user" && m.tool_calls.is_empty() => {
                    last.content.push_str("\n\n");
                    last.content.push_str(&m.content);
                }
                _ => merged.push(m),
            }
        }
        out = merged;
    }
    prompt.messages = out;
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MemorySnapshot {
    pub mlx_active_bytes: u64,
    pub mlx_peak_bytes: u64,
    pub mlx_cache_bytes: u64,
    pub prompt_cache_bytes: u64,
    pub running_sequences: u64,
    /// KV caches of the sequences in flight (running and prefilling).
    pub live_kv_bytes: u64,
    /// The most KV bytes (prefix cache + live) held at once since start.
    pub kv_peak_bytes: u64,
    /// The most sequences decoded in one step since start (proof of batching).
    pub peak_batch: u64,
}

#[derive(Debug)]
pub struct EngineStatus {
    state: AtomicU8,
    pub info: OnceLock<ModelInfo>,
    pub memory: Mutex<MemorySnapshot>,
    pub generated_tokens: AtomicU64,
    /// Set while the sampling probe fails (what sampled requests need is
    /// broken): `/health` is then 503, whatever the thread's state.
    pub sampling_error: Mutex<Option<String>>,
    /// Tokens per second over the last refresh interval (f64 bits).
    decode_tps_bits: AtomicU64,
    /// (when, generated_tokens) samples of the last two minutes, for the
    /// tokens/s of the last minute.
    rate_samples: Mutex<VecDeque<(std::time::Instant, u64)>>,
}

impl EngineStatus {
    fn new() -> EngineStatus {
        EngineStatus {
            state: AtomicU8::new(EngineState::Loading as u8),
            info: OnceLock::new(),
            memory: Mutex::new(MemorySnapshot::default()),
            generated_tokens: AtomicU64::new(0),
            sampling_error: Mutex::new(None),
            decode_tps_bits: AtomicU64::new(0),
            rate_samples: Mutex::new(VecDeque::new()),
        }
    }

    pub fn state(&self) -> EngineState {
        match self.state.load(Ordering::Acquire) {
            0 => EngineState::Loading,
            1 => EngineState::Ready,
            2 => EngineState::Failed,
            _ => EngineState::Stopped,
        }
    }

    /// Why sampling does not work, if the last probe failed.
    pub fn sampling_error(&self) -> Option<String> {
        self.sampling_error.lock().unwrap().clone()
    }

    /// Ready and able to serve what requests need.
    pub fn healthy(&self) -> bool {
        self.state() == EngineState::Ready && self.sampling_error.lock().unwrap().is_none()
    }

    pub fn decode_tps(&self) -> f64 {
        f64::from_bits(self.decode_tps_bits.load(Ordering::Relaxed))
    }

    /// Generated tokens per second over (about) the last minute.
    pub fn tokens_per_second_last_minute(&self) -> f64 {
        let now = std::time::Instant::now();
        let count = self.generated_tokens.load(Ordering::Relaxed);
        let samples = self.rate_samples.lock().unwrap();
        let minute = std::time::Duration::from_secs(60);
        let base = samples.iter().rev().find(|(t, _)| now.duration_since(*t) >= minute).or(samples.front());
        match base {
            Some((t, c)) if now > *t => count.saturating_sub(*c) as f64 / now.duration_since(*t).as_secs_f64(),
            _ => 0.0,
        }
    }

    fn record_rate_sample(&self) {
        let now = std::time::Instant::now();
        let mut samples = self.rate_samples.lock().unwrap();
        samples.push_back((now, self.generated_tokens.load(Ordering::Relaxed)));
        // Keep one sample older than a minute (the window's start), no more.
        while samples.len() > 2 && now.duration_since(samples[1].0) >= std::time::Duration::from_secs(60) {
            samples.pop_front();
        }
    }

    fn set_decode_tps(&self, v: f64) {
        self.decode_tps_bits.store(v.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn set_state(&self, s: EngineState) {
        self.state.store(s as u8, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------
// Commands to the engine thread.

pub(crate) enum Command {
    /// `tokens`: the prompt already tokenized on the Rust side, if trusted.
    Generate {
        id: u64,
        request: Box<GenerateRequest>,
        tokens: Option<Vec<u32>>,
        events: mpsc::UnboundedSender<TokenEvent>,
    },
    Tokenize {
        prompt: Prompt,
        reply: oneshot::Sender<Result<Vec<u32>, ApiError>>,
    },
    Shutdown,
}

/// Settings the engine thread needs (a plain copy, no clap types).
#[derive(Debug, Clone)]
pub(crate) struct EngineOptions {
    pub model: Option<String>,
    pub cache_root: std::path::PathBuf,
    pub venv: std::path::PathBuf,
    pub blas: crate::config::BlasChoice,
    pub cpu_kernels: crate::config::CpuKernels,
    pub max_batch: u32,
    pub prefill_step: u32,
    pub prefill_batch: u32,
    pub prompt_cache_bytes: u64,
    pub context_length: Option<u32>,
    pub mlx_cache_limit: u64,
    pub max_decode_stall_ms: u64,
    pub prompt_cache_dir: Option<std::path::PathBuf>,
    pub special_tokens_in_content: bool,
    /// --temperature, --top-p, --top-k, --min-p (over the model's defaults).
    pub sampling_flags: serde_json::Value,
    /// The shard mode, when this process is a rank of a distributed group.
    pub shard: Option<&'static str>,
    /// --shard-timeout.
    pub shard_timeout: std::time::Duration,
}

impl EngineOptions {
    fn of(config: &Config, model: Option<&str>) -> EngineOptions {
        let sharded = crate::shard::distributed();
        EngineOptions {
            model: model.map(str::to_string),
            cache_root: config.cache_root(),
            venv: config.venv_dir(),
            blas: config.blas,
            cpu_kernels: config.cpu_kernels,
            max_batch: config.max_concurrent,
            prefill_step: config.prefill_step,
            prefill_batch: config.prefill_batch,
            mlx_cache_limit: config.mlx_cache_limit,
            max_decode_stall_ms: config.max_decode_stall_ms,
            prompt_cache_bytes: config.prompt_cache_bytes,
            context_length: config.context_length,
            prompt_cache_dir: if sharded { None } else { config.prompt_cache_persist_dir() },
            special_tokens_in_content: config.special_tokens_in_content,
            sampling_flags: serde_json::json!({
                "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k, "min_p": config.min_p,
            }),
            shard: sharded.then(|| config.shard.as_str()),
            shard_timeout: std::time::Duration::from_secs_f64(config.shard_timeout.max(0.1)),
        }
    }
}

/// A rank above 0 of a sharded group: loads its shard of the model rank 0
/// names and runs every operation rank 0 broadcasts, until rank 0 stops the
/// group (Ok) or the group breaks (Err). No HTTP, no engine thread: this is
/// the process's main thread.
pub fn follow(config: &Config, timeout: std::time::Duration) -> anyhow::Result<()> {
    crate::memory::tune_heap();
    let mut opts = EngineOptions::of(config, None);
    opts.shard_timeout = timeout;
    py::follow(opts)
}

/// Engines alive in this process, stopped at exit (see `stop_engines_at_exit`).
static LIVE_ENGINES: Mutex<Vec<(std::sync::mpsc::Sender<Command>, Arc<EngineStatus>)>> = Mutex::new(Vec::new());

fn register_for_exit(tx: std::sync::mpsc::Sender<Command>, status: Arc<EngineStatus>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain extern "C" function that takes no arguments.
    ONCE.call_once(|| unsafe {
        libc::atexit(stop_engines_at_exit);
    });
    LIVE_ENGINES.lock().unwrap().push((tx, status));
}

/// A process that exits while an engine is mid-step (a test ending, an
/// embedding program returning from main) would tear down MLX and OpenBLAS
/// under it. At exit, ask every engine to stop and give them a moment to
/// leave MLX before the libraries' destructors run.
extern "C" fn stop_engines_at_exit() {
    let engines = std::mem::take(&mut *LIVE_ENGINES.lock().unwrap_or_else(|e| e.into_inner()));
    for (tx, _) in &engines {
        let _ = tx.send(Command::Shutdown);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline
        && engines.iter().any(|(_, st)| matches!(st.state(), EngineState::Ready | EngineState::Loading))
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Engine threads outlive the models they serve: a thread whose model was
/// unloaded waits for the next model to load. MLX keeps each thread's
/// streams (and their worker threads and buffers) after the thread ends, so
/// a fresh thread per load would leak those on every load and unload.
pub(crate) mod threads {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::Mutex;

    type Job = Box<dyn FnOnce() + Send>;

    /// Idle engine threads, each waiting on its job channel.
    static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

    /// Resolves when a job has run (or its thread died).
    pub struct Finished(Receiver<()>);

    impl Finished {
        pub fn join(self) {
            let _ = self.0.recv();
        }
    }

    /// Runs `job` on an idle engine thread, or a new one.
    pub fn run(job: impl FnOnce() + Send + 'static) -> std::io::Result<Finished> {
        let (done_tx, done_rx) = channel();
        let mut job: Job = Box::new(move || {
            job();
            let _ = done_tx.send(());
        });
        loop {
            let idle = IDLE.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(thread) = idle else { break };
            match thread.send(job) {
                Ok(()) => return Ok(Finished(done_rx)),
                // That thread is gone: try the next.
                Err(e) => job = e.0,
            }
        }
        std::thread::Builder::new().name("pensieve-engine".into()).spawn(move || {
            let mut job = job;
            loop {
                job();
                let (tx, rx) = channel();
                IDLE.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
                match rx.recv() {
                    Ok(next) => job = next,
                    Err(_) => return,
                }
            }
        })?;
        Ok(Finished(done_rx))
    }
}

/// Cheap to clone; the way the HTTP side talks to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::Sender<Command>,
    status: Arc<EngineStatus>,
    admission: Arc<Admission>,
    next_id: Arc<AtomicU64>,
    thread: Arc<Mutex<Option<threads::Finished>>>,
    /// Set when the Rust tokenizer reproduced Python's ids on the probes.
    tokenizer: Option<Arc<PromptTokenizer>>,
    /// `--special-tokens-in-content`: request text may spell control tokens.
    special_tokens_in_content: bool,
    /// Grammars over the model's vocabulary (structured outputs), or why
    /// there are none.
    grammars: Arc<Result<Arc<crate::constrain::Grammars>, String>>,
    /// Set by `shutdown`: the engine stopping is then no death.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl EngineHandle {
    /// Starts the engine thread for the default model and waits until it is
    /// loaded. A load failure is returned here, before any listener opens.
    pub fn start(config: &Config) -> anyhow::Result<EngineHandle> {
        Self::start_model(config, config.default_model())
    }

    /// Starts an engine thread serving `model` (as --model takes it) with
    /// `config`'s settings, and waits until it is loaded.
    pub fn start_model(config: &Config, model: &str) -> anyhow::Result<EngineHandle> {
        crate::memory::tune_heap();
        #[cfg(unix)]
        if let Some(dir) = config.prompt_cache_persist_dir() {
            let tightened = crate::private_dir::prepare(&dir)?;
            if tightened > 0 {
                tracing::info!("prefix cache: restricted {tightened} folders and files under {} to this user", dir.display());
            }
        }
        let opts = EngineOptions::of(config, Some(model));
        let (tx, rx) = std::sync::mpsc::channel();
        let status = Arc::new(EngineStatus::new());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let st = status.clone();
        let thread = threads::run(move || py::engine_thread(opts, rx, st, ready_tx))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => {
                thread.join();
                anyhow::bail!(msg);
            }
            Err(_) => {
                thread.join();
                anyhow::bail!("the engine thread died while loading the model");
            }
        }
        register_for_exit(tx.clone(), status.clone());
        let mut handle = EngineHandle {
            tx,
            status,
            admission: Arc::new(Admission::new(config.max_concurrent, config.max_queue, config.min_free_memory)),
            next_id: Arc::new(AtomicU64::new(1)),
            thread: Arc::new(Mutex::new(Some(thread))),
            tokenizer: None,
            special_tokens_in_content: config.special_tokens_in_content,
            grammars: Arc::new(Err("not loaded".into())),
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        handle.tokenizer = handle.verified_rust_tokenizer().map(Arc::new);
        handle.grammars = Arc::new(handle.load_grammars().map(Arc::new));
        if let Err(e) = handle.grammars.as_ref() {
            tracing::info!("structured outputs are not available for this model: {e}");
        }
        Ok(handle)
    }

    /// The grammar engine over the model's vocabulary (its tokenizer.json).
    fn load_grammars(&self) -> Result<crate::constrain::Grammars, String> {
        let info = self.status.info.get().ok_or("no model information")?;
        let file = info.template.tokenizer_file.as_deref().ok_or("the model has no tokenizer.json")?;
        let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
        let n_vocab = info.vocab_size.unwrap_or(0) as usize;
        crate::constrain::Grammars::new(&text, n_vocab, &info.eos_token_ids, info.template.tool_call_shape.clone())
            .map_err(|e| format!("its tokenizer cannot be read as bytes per token: {e}"))
    }

    /// Grammars over the model's vocabulary, if the model has them.
    pub fn grammars(&self) -> Option<&Arc<crate::constrain::Grammars>> {
        self.grammars.as_ref().as_ref().ok()
    }

    /// Compiles a request's constraints (response format, strict or forced
    /// tool calls) on a blocking worker, never on the engine thread: a
    /// schema it cannot enforce is the request's error, before any token.
    async fn compile_constraint(&self, request: &mut GenerateRequest) -> Result<(), ApiError> {
        if request.logprobs.is_some() {
            if let Err(e) = self.grammars.as_ref() {
                return Err(ApiError::InvalidRequest(format!(
                    "logprobs are not available for this model (its tokens cannot be spelled: {e})"
                )));
            }
        }
        if !crate::constrain::wanted(request) {
            return Ok(());
        }
        if request.force_tool.is_some() && request.format.is_none() && request.strict_tools.is_empty() {
            // A forced call without a call format keeps the opening-token
            // forcing below (the model still must call a tool).
            if self.info().and_then(|i| i.template.tool_call_shape.as_ref()).is_none() {
                return Ok(());
            }
        }
        let grammars = match self.grammars.as_ref() {
            Ok(g) => g.clone(),
            Err(e) => return Err(ApiError::InvalidRequest(format!("structured outputs are not available for this model: {e}"))),
        };
        // What the grammar is made of: the tools and the constraints, not the conversation.
        let mut probe = GenerateRequest::new(
            Prompt { tools: request.prompt.tools.clone(), ..Default::default() },
            request.max_tokens,
            request.sampling,
            vec![],
        );
        probe.format = request.format.clone();
        probe.strict_tools = request.strict_tools.clone();
        probe.force_tool = request.force_tool.clone();
        let compiled = tokio::task::spawn_blocking(move || grammars.compile_for(&probe))
            .await
            .map_err(|e| ApiError::Internal(format!("grammar compile task failed: {e}")))??;
        request.constraint = Some(crate::constrain::Constraint(compiled));
        Ok(())
    }

    /// Loads the Rust tokenizer and keeps it only if it reproduces the Python
    /// tokenizer's ids on every probe prompt (errors must agree too).
    fn verified_rust_tokenizer(&self) -> Option<PromptTokenizer> {
        let info = self.status.info.get()?;
        let tok = match PromptTokenizer::load(&info.template, self.special_tokens_in_content) {
            Ok(t) => t,
            Err(e) => {
                tracing::info!("prompts are tokenized on the engine thread (Rust tokenizer unavailable: {e})");
                return None;
            }
        };
        for (i, probe) in crate::tokenizer::probe_prompts().into_iter().enumerate() {
            let rust = tok.tokenize(&probe);
            let (reply, rx) = oneshot::channel();
            self.tx.send(Command::Tokenize { prompt: probe, reply }).ok()?;
            let python = rx.blocking_recv().ok()?;
            let agree = match (&rust, &python) {
                (Ok(a), Ok(b)) => a == b,
                (Err(_), Err(_)) => true,
                _ => false,
            };
            if !agree {
                tracing::info!(
                    probe = i,
                    "prompts are tokenized on the engine thread (the Rust chat-template render differs from Python's)"
                );
                tracing::debug!(?rust, ?python, "probe mismatch");
                return None;
            }
        }
        tracing::info!("prompts are tokenized in Rust (verified against the model's Python tokenizer)");
        Some(tok)
    }

    /// Token ids from the model's Python tokenizer on the engine thread (the
    /// reference the Rust tokenizer is checked against).
    pub async fn tokenize_on_engine(&self, prompt: Prompt) -> Result<Vec<u32>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Tokenize { prompt, reply })
            .map_err(|_| ApiError::Unavailable("the engine is not running".into()))?;
        rx.await.map_err(|_| ApiError::Unavailable("the engine stopped".into()))?
    }

    /// Token ids with the Rust tokenizer, if it is in use.
    pub fn tokenize_in_rust_now(&self, prompt: &Prompt) -> Option<Result<Vec<u32>, String>> {
        self.tokenizer.as_ref().map(|t| t.tokenize(prompt))
    }

    /// The rendered prompt text with the Rust tokenizer's template, if in use.
    pub fn render_in_rust_now(&self, prompt: &Prompt) -> Option<Result<String, String>> {
        self.tokenizer.as_ref().map(|t| t.render(prompt))
    }

    /// Whether prompts are tokenized in Rust (off the engine thread).
    pub fn rust_tokenizer_active(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// Token ids with the Rust tokenizer, off the async workers.
    async fn tokenize_in_rust(tok: &Arc<PromptTokenizer>, prompt: Prompt) -> Result<Vec<u32>, ApiError> {
        let tok = tok.clone();
        tokio::task::spawn_blocking(move || tok.tokenize(&prompt))
            .await
            .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
            .map_err(ApiError::InvalidRequest)
    }

    pub fn status(&self) -> &EngineStatus {
        &self.status
    }

    /// The engine thread ended without `shutdown` asking it to (a panic, a
    /// killed engine): the server should exit for a restart.
    pub fn died(&self) -> bool {
        !self.stopping.load(Ordering::Acquire) && matches!(self.status.state(), EngineState::Stopped | EngineState::Failed)
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    pub fn info(&self) -> Option<&ModelInfo> {
        self.status.info.get()
    }

    fn ensure_alive(&self) -> Result<(), ApiError> {
        match self.status.state() {
            EngineState::Ready => Ok(()),
            EngineState::Loading => Err(ApiError::Unavailable("the model is still loading".into())),
            _ => Err(ApiError::Unavailable("the engine is not running; restart pensieve".into())),
        }
    }

    /// Admits, submits, and waits until the engine has rendered the prompt
    /// (so prompt errors come back as plain 4xx, before any stream starts).
    pub async fn generate(&self, mut request: GenerateRequest) -> Result<Generation, ApiError> {
        self.apply_tool_choice(&mut request)?;
        self.place_system_messages(&mut request.prompt);
        self.ensure_alive()?;
        self.compile_constraint(&mut request).await?;
        // Admission first: a request bound for 529 (queue full, memory low)
        // costs no rendering or tokenizing.
        let permit = self.admission.acquire().await?;
        let tokens = match &self.tokenizer {
            Some(tok) => Some(Self::tokenize_in_rust(tok, request.prompt.clone()).await?),
            None => None,
        };
        let started = std::time::Instant::now();
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = StopMatcher::new(&request.stop);
        self.tx
            .send(Command::Generate { id, request: Box::new(request), tokens, events: events_tx })
            .map_err(|_| ApiError::Unavailable("the engine is not running".into()))?;
        match events_rx.recv().await {
            Some(TokenEvent::Started { prompt_tokens, cached_tokens, max_tokens }) => Ok(Generation {
                prompt_tokens,
                cached_tokens,
                max_tokens,
                output_tokens: 0,
                rx: Some(events_rx),
                stop,
                pending: VecDeque::new(),
                tool_calls: 0,
                started,
                ttft: None,
                outcome: None,
                label: RequestLabel::default(),
                vocab: self.grammars().cloned(),
                _permit: permit,
                load_wait: None,
                _held: None,
            }),
            Some(TokenEvent::Failed(e)) => Err(e),
            Some(other) => Err(ApiError::Internal(format!("engine protocol error: {other:?}"))),
            None => Err(ApiError::Unavailable("the engine stopped".into())),
        }
    }

    /// `tool_choice` any / tool: checked here; the engine then constrains the
    /// first tokens to the model's own tool-call opening (see the shim).
    fn apply_tool_choice(&self, request: &mut GenerateRequest) -> Result<(), ApiError> {
        let Some(force) = &request.force_tool else { return Ok(()) };
        if request.prompt.tools.is_empty() {
            return Err(ApiError::InvalidRequest("tool_choice requires tools".into()));
        }
        let has_format = self.info().and_then(|i| i.template.tool_call_start.as_deref()).is_some_and(|s| !s.is_empty());
        if !has_format {
            return Err(ApiError::InvalidRequest(
                "tool_choice any/tool is not supported: the model has no known tool-call format".into(),
            ));
        }
        if let ForceTool::Named(name) = force {
            if !request.prompt.tools.iter().any(|t| t["function"]["name"] == name.as_str()) {
                return Err(ApiError::InvalidRequest(format!("tool_choice names {name:?}, which is not in tools")));
            }
        }
        Ok(())
    }

    /// Late system messages as this model's template can take them.
    fn place_system_messages(&self, prompt: &mut Prompt) {
        if let Some(info) = self.info() {
            place_late_system_messages(prompt, &info.late_system);
        }
    }

    /// Tokens the prompt renders to, with the model's own template.
    pub async fn count_tokens(&self, mut prompt: Prompt) -> Result<u32, ApiError> {
        self.ensure_alive()?;
        self.place_system_messages(&mut prompt);
        if let Some(tok) = &self.tokenizer {
            return Ok(Self::tokenize_in_rust(tok, prompt).await?.len() as u32);
        }
        Ok(self.tokenize_on_engine(prompt).await?.len() as u32)
    }

    /// Asks the engine thread to finish and waits for it.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        LIVE_ENGINES.lock().unwrap_or_else(|e| e.into_inner()).retain(|(_, st)| !Arc::ptr_eq(st, &self.status));
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().unwrap().take() {
            t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(roles: &[(&str, &str)]) -> Prompt {
        Prompt { messages: roles.iter().map(|(r, c)| ChatMessage::new(r, *c)).collect(), ..Default::default() }
    }

    #[test]
    fn late_system_messages_stay_in_place_in_each_mode() {
        let p = conv(&[
            ("system", "sys"),
            ("user", "u1"),
            ("system", "env"),
            ("assistant", "a1"),
            ("system", "note"),
            ("user", "u2"),
        ]);
        let mut q = p.clone();
        place_late_system_messages(&mut q, "system");
        assert_eq!(q, p);

        let mut q = p.clone();
        place_late_system_messages(&mut q, "user");
        let got: Vec<(&str, &str)> = q.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(
            got,
            [
                ("system", "sys"),
                ("user", "u1"),
                ("user", "<system-reminder>\nenv\n</system-reminder>"),
                ("assistant", "a1"),
                ("user", "<system-reminder>\nnote\n</system-reminder>"),
                ("user", "u2"),
            ]
        );

        let mut q = p;
        place_late_system_messages(&mut q, "merge");
        let got: Vec<(&str, &str)> = q.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(
            got,
            [
                ("system", "sys"),
                ("user", "u1\n\n<system-reminder>\nenv\n</system-reminder>"),
                ("assistant", "a1"),
                ("user", "<system-reminder>\nnote\n</system-reminder>\n\nu2"),
            ]
        );
    }
}

//! The engine thread's loop, independent of pyo3: it talks to the model
//! through the [`Backend`] trait (implemented over the Python shim in
//! `py.rs`).
//!
//! Each turn: take new commands (blocking, with the GIL released, only when
//! nothing is running), drop sequences whose client went away, run one batch
//! step, and fan the step's tokens out to the per-request channels.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::{Command, EngineFinish, EngineStatus, GenerateRequest, MemorySnapshot, Piece, Prompt, TokenEvent};
use crate::error::ApiError;

/// One step's output for one request.
pub(crate) struct StepItem {
    pub rid: u64,
    pub pieces: Vec<Piece>,
    /// "stop" (EOS) or "length", when this token ended the sequence.
    pub finish: Option<String>,
    /// A Python error that failed this request.
    pub error: Option<String>,
    /// Whether this item is a newly generated token (a finish for a token
    /// already sent early carries only leftover text).
    pub counts: bool,
    /// The token's log-probability and top alternatives (requests that ask).
    pub logprob: Option<RawLogprob>,
}

/// (token, log-probability, [(token, log-probability)] alternatives).
pub(crate) type RawLogprob = (u32, f32, Vec<(u32, f32)>);

pub(crate) struct Submitted {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub max_tokens: u32,
}

/// The model, as the loop sees it. All methods run on the engine thread.
pub(crate) trait Backend {
    /// Queues a request; `tokens` is the prompt if already tokenized.
    fn submit(&mut self, rid: u64, req: &GenerateRequest, tokens: Option<Vec<u32>>) -> Result<Submitted, ApiError>;
    fn tokenize(&mut self, prompt: &Prompt) -> Result<Vec<u32>, ApiError>;
    fn cancel(&mut self, rid: u64);
    fn step(&mut self) -> Result<Vec<StepItem>, ApiError>;
    fn memory(&mut self) -> Option<MemorySnapshot>;
    /// Runs what sampled requests need on a tiny input; `Some(error)` when broken.
    fn check_sampling(&mut self) -> Option<String>;
    /// Runs `f` with the interpreter released (waiting for work).
    fn wait<T: Send>(&mut self, f: impl FnOnce() -> T + Send) -> T;
    /// How often to call `heartbeat` while idle (sharded: the other ranks
    /// learn rank 0 is alive); None: never.
    fn heartbeat_every(&self) -> Option<Duration> {
        None
    }
    fn heartbeat(&mut self) {}
    /// Why the engine cannot go on (its shard group is lost), once it cannot.
    fn fatal(&self) -> Option<String> {
        None
    }
}

enum Waited {
    Command(Command),
    Idle,
    Closed,
}

/// Fails every running request and the engine when the backend cannot go
/// on. Returns true when the loop must end.
fn gave_up<B: Backend>(backend: &B, active: &mut HashMap<u64, Active>, status: &EngineStatus) -> bool {
    let Some(why) = backend.fatal() else { return false };
    for (_, a) in active.drain() {
        let _ = a.events.send(TokenEvent::Failed(ApiError::Unavailable(format!("the model's shard group is lost: {why}"))));
    }
    status.set_state(super::EngineState::Failed);
    true
}

struct Active {
    events: UnboundedSender<TokenEvent>,
}

/// The serving loop. Returns when told to shut down or when every handle is gone.
pub(crate) fn serve<B: Backend>(backend: &mut B, rx: Receiver<Command>, status: &EngineStatus) {
    let mut active: HashMap<u64, Active> = HashMap::new();
    let mut rx = Some(rx);
    let mut last_memory = (Instant::now() - Duration::from_secs(1), 0u64);
    // Whether the sampling probe should run before the loop next waits: at
    // start, and after any work (a request that broke something shows here,
    // before the next one arrives).
    let mut probe_due = true;
    loop {
        // 1. Commands. Block (GIL released) only when there is nothing to run.
        if active.is_empty() {
            if probe_due {
                probe_sampling(backend, status);
                probe_due = false;
            }
            refresh_memory(backend, status, &mut last_memory, true);
            let r = rx.take().unwrap();
            let every = backend.heartbeat_every();
            let (r, waited) = backend.wait(move || {
                let w = match every {
                    None => r.recv().map(Waited::Command).unwrap_or(Waited::Closed),
                    Some(d) => match r.recv_timeout(d) {
                        Ok(c) => Waited::Command(c),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Waited::Idle,
                        Err(_) => Waited::Closed,
                    },
                };
                (r, w)
            });
            rx = Some(r);
            match waited {
                Waited::Command(c) => {
                    if !handle(backend, c, &mut active) {
                        return;
                    }
                }
                Waited::Idle => backend.heartbeat(),
                Waited::Closed => return,
            }
            if gave_up(backend, &mut active, status) {
                return;
            }
            if active.is_empty() {
                continue;
            }
        }
        loop {
            match rx.as_ref().unwrap().try_recv() {
                Ok(c) => {
                    if !handle(backend, c, &mut active) {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if gave_up(backend, &mut active, status) {
            return;
        }

        // 2. Cancellation: a closed channel means nobody reads this stream.
        let gone: Vec<u64> = active.iter().filter(|(_, a)| a.events.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            backend.cancel(id);
            active.remove(&id);
        }
        if active.is_empty() {
            continue;
        }

        // 3. One batch step.
        probe_due = true;
        match backend.step() {
            Ok(items) => {
                let n_tokens = items.iter().filter(|i| i.error.is_none() && i.counts).count() as u64;
                status.generated_tokens.fetch_add(n_tokens, Ordering::Relaxed);
                let failed = items.iter().any(|i| i.error.is_some());
                if items.iter().any(|i| i.finish.is_some() || i.error.is_some()) {
                    // A finished request's prompt just entered the prefix
                    // cache: read memory before its client hears it is done,
                    // so /health never lags behind a response.
                    if let Some(m) = backend.memory() {
                        *status.memory.lock().unwrap() = m;
                    }
                }
                for item in items {
                    dispatch(item, &mut active);
                }
                if failed {
                    probe_sampling(backend, status);
                }
            }
            Err(e) => {
                if gave_up(backend, &mut active, status) {
                    return;
                }
                // The backend could not step at all: fail everything running.
                for (_, a) in active.drain() {
                    let _ = a.events.send(TokenEvent::Failed(e.clone()));
                }
                probe_sampling(backend, status);
            }
        }
        if gave_up(backend, &mut active, status) {
            return;
        }
        refresh_memory(backend, status, &mut last_memory, false);
    }
}

fn dispatch(item: StepItem, active: &mut HashMap<u64, Active>) {
    let Some(a) = active.get(&item.rid) else { return };
    if let Some(err) = item.error {
        tracing::warn!(rid = item.rid, "generation failed: {err}");
        let _ = a.events.send(TokenEvent::Failed(ApiError::Internal(format!("generation failed: {err}"))));
        active.remove(&item.rid);
        return;
    }
    let finish = match item.finish.as_deref() {
        None => None,
        Some("stop") => Some(EngineFinish::Eos),
        Some(_) => Some(EngineFinish::Length),
    };
    // One item per generated token (EOS included, as hosted APIs count it);
    // its text may be empty while the detokenizer waits for more bytes.
    let _ =
        a.events.send(if item.counts { TokenEvent::Token(item.pieces, item.logprob) } else { TokenEvent::Flush(item.pieces) });
    if let Some(f) = finish {
        let _ = a.events.send(TokenEvent::Finished(f));
        active.remove(&item.rid);
    }
}

/// Returns false when the loop should end.
fn handle<B: Backend>(backend: &mut B, cmd: Command, active: &mut HashMap<u64, Active>) -> bool {
    match cmd {
        Command::Generate { id, request, tokens, events } => {
            if events.is_closed() {
                return true;
            }
            if request.fault == Some(super::Fault::KillEngine) {
                panic!("engine killed on purpose (x-pensieve-fault: kill-engine)");
            }
            match backend.submit(id, &request, tokens) {
                Ok(s) => {
                    let _ = events.send(TokenEvent::Started {
                        prompt_tokens: s.prompt_tokens,
                        cached_tokens: s.cached_tokens,
                        max_tokens: s.max_tokens,
                    });
                    active.insert(id, Active { events });
                }
                Err(e) => {
                    let _ = events.send(TokenEvent::Failed(e));
                }
            }
            true
        }
        Command::Tokenize { prompt, reply } => {
            let _ = reply.send(backend.tokenize(&prompt));
            true
        }
        Command::Shutdown => {
            for (id, a) in active.drain() {
                backend.cancel(id);
                let _ = a.events.send(TokenEvent::Failed(ApiError::Unavailable("the server is shutting down".into())));
            }
            false
        }
    }
}

/// Runs the sampling probe and records its verdict (logged when it changes).
fn probe_sampling<B: Backend>(backend: &mut B, status: &EngineStatus) {
    let verdict = backend.check_sampling();
    let mut slot = status.sampling_error.lock().unwrap();
    match (&*slot, &verdict) {
        (None, Some(e)) => tracing::error!("sampling is broken: {e}; /health answers 503 (restart pensieve)"),
        (Some(_), None) => tracing::info!("sampling works again"),
        _ => {}
    }
    *slot = verdict;
}

/// Refreshes the memory readings and the decode rate at most every 250 ms
/// (`last`: when, and the token count then), or now when `force`.
fn refresh_memory<B: Backend>(backend: &mut B, status: &EngineStatus, last: &mut (Instant, u64), force: bool) {
    let elapsed = last.0.elapsed();
    if !force && elapsed < Duration::from_millis(250) {
        return;
    }
    let now_count = status.generated_tokens.load(Ordering::Relaxed);
    let rate = now_count.saturating_sub(last.1) as f64 / elapsed.as_secs_f64().max(1e-3);
    *last = (Instant::now(), now_count);
    status.set_decode_tps(if force { 0.0 } else { rate });
    status.record_rate_sample();
    if let Some(m) = backend.memory() {
        *status.memory.lock().unwrap() = m;
    }
}

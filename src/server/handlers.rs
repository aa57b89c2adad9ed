//! Route handlers.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{json_response, AppState, Body, LoggedByGeneration};
use crate::api::anthropic::{self, EventStream, MessagesRequest, Usage};
use crate::api::openai::{self, ChatRequest, ChunkStream, CompletionRequest, Endpoint};
use crate::api::{new_id, parse_json, rfc3339, StreamRenderer};
use crate::api::{ollama, responses};
use crate::engine::{Collected, EngineState, Fault, GenEvent, GenerateRequest, Generation, RequestLabel, StopReason};
use crate::error::ApiError;
use crate::models::{Lease, Model};

/// How often an idle stream gets a `ping` (keeps proxies and clients from
/// timing out during a long prefill).
const KEEPALIVE: Duration = Duration::from_secs(10);

/// What the loaded engines hold together: memory, slots, throughput.
struct Totals {
    memory: crate::engine::MemorySnapshot,
    in_use: usize,
    queued: usize,
    capacity: usize,
    generated: u64,
    tps_1m: f64,
    decode_tps: f64,
}

fn totals(state: &AppState) -> Totals {
    let mut t =
        Totals { memory: Default::default(), in_use: 0, queued: 0, capacity: 0, generated: 0, tps_1m: 0.0, decode_tps: 0.0 };
    for e in state.models.loaded() {
        let (m, adm, st) = (*e.status().memory.lock().unwrap(), e.admission(), e.status());
        // MLX's readings are the process's (every engine reports the same).
        t.memory.mlx_active_bytes = t.memory.mlx_active_bytes.max(m.mlx_active_bytes);
        t.memory.mlx_peak_bytes = t.memory.mlx_peak_bytes.max(m.mlx_peak_bytes);
        t.memory.mlx_cache_bytes = t.memory.mlx_cache_bytes.max(m.mlx_cache_bytes);
        t.memory.prompt_cache_bytes += m.prompt_cache_bytes;
        t.memory.live_kv_bytes += m.live_kv_bytes;
        t.memory.running_sequences += m.running_sequences;
        t.memory.kv_peak_bytes = t.memory.kv_peak_bytes.max(m.kv_peak_bytes);
        t.memory.peak_batch = t.memory.peak_batch.max(m.peak_batch);
        t.in_use += adm.in_use();
        t.queued += adm.queued();
        t.capacity += adm.capacity();
        t.generated += st.generated_tokens.load(std::sync::atomic::Ordering::Relaxed);
        t.tps_1m += st.tokens_per_second_last_minute();
        t.decode_tps += st.decode_tps();
    }
    t
}

/// `GET /health`: 200 while every loaded model's engine is ready and
/// sampling works, and the server is not draining (a model unloaded for
/// idleness is no fault: it loads again on demand). The top-level `engine`
/// and `model` describe the default model; `models` lists every model with
/// its state, memory and context. `detail` (with the key, when one is set)
/// adds the default model's path and the memory and slot readings.
pub fn health(state: &AppState, detail: bool) -> Response<Body> {
    let default = state.models.default_model();
    let engine = default.engine();
    let loaded = state.models.loaded();
    let sampling = loaded.iter().find_map(|e| e.status().sampling_error());
    let draining = state.draining();
    let lost = crate::shard::lost();
    let ok = loaded.iter().all(|e| e.status().state() == EngineState::Ready) && sampling.is_none() && !draining && lost.is_none();
    let info = default.info();
    let models: Vec<Value> = state.models.all().iter().map(|m| state.models.describe(m)).collect();
    let mut body = json!({
        "status": if ok { "ok" } else if draining { "draining" } else { "unavailable" },
        "engine": match engine.as_ref().map(|e| e.status().state()) {
            Some(EngineState::Loading) => "loading",
            Some(EngineState::Ready) => "ready",
            Some(EngineState::Failed) => "failed",
            Some(EngineState::Stopped) => "stopped",
            None => default.state(),
        },
        "checks": {"sampling": match &sampling { None => "ok".to_string(), Some(e) => format!("broken: {e}") }},
        "shard": info.as_ref().and_then(|i| i.shard.clone()).map(|mut s| {
            s["group"] = json!(match lost { None => "ok".to_string(), Some(why) => format!("lost: {why}") });
            s["local_ranks"] = json!(crate::shard::child_pids().iter().map(|(rank, pid)| json!({"rank": rank, "pid": pid})).collect::<Vec<_>>());
            s
        }),
        "model": {"id": default.id()},
        "models": models,
        "aliases": state.models.aliases().iter().map(|a| json!({"pattern": a.pattern, "model": state.models.all()[a.target].id()})).collect::<Vec<_>>(),
    });
    if detail {
        let t = totals(state);
        let memory = state.models.memory();
        let info = info.as_ref();
        body["model"] = json!({
            "id": default.id(),
            "state": default.state(),
            "type": info.and_then(|i| i.model_type.clone()),
            "context_length": info.map(|i| i.context_length),
            "model_context_length": info.map(|i| i.model_context_length),
            "weights_bytes": info.map(|i| i.model_bytes),
            "device": info.map(|i| i.device.clone()),
            "mlx_version": info.map(|i| i.mlx_version.clone()),
            "blas": info.map(|i| i.blas.clone()),
            "cpu_kernels": info.map(|i| i.cpu_kernels.clone()),
            "batching": info.map(|i| i.batching),
            "sampling_defaults": info.map(|i| i.sampling_defaults.clone()),
            "late_system_messages": info.map(|i| i.late_system.clone()),
            // "rust": the Rust tokenizer reproduced Python's ids at start-up.
            "prompt_tokenizer": engine.as_ref().map(|e| if e.rust_tokenizer_active() { "rust" } else { "python" }),
        });
        // A filesystem path only to a caller that proved it holds the key.
        if state.config.api_key.is_some() {
            body["model"]["path"] = json!(info.map(|i| i.model.clone()));
        }
        let mem = t.memory;
        body["memory"] = json!({
            "system_available_bytes": memory.available(),
            "process_rss_bytes": memory.process_rss(),
            "mlx_active_bytes": mem.mlx_active_bytes,
            "mlx_peak_bytes": mem.mlx_peak_bytes,
            "mlx_cache_bytes": mem.mlx_cache_bytes,
            "prompt_cache_bytes": mem.prompt_cache_bytes,
            "live_kv_bytes": mem.live_kv_bytes,
            "kv_peak_bytes": mem.kv_peak_bytes,
        });
        body["slots"] = json!({"capacity": t.capacity, "in_use": t.in_use, "queued": t.queued, "peak_batch": mem.peak_batch});
        body["generated_tokens"] = json!(t.generated);
        body["tokens_per_second_1m"] = json!((t.tps_1m * 10.0).round() / 10.0);
        body["uptime_seconds"] = json!(state.started.elapsed().as_secs());
    }
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, &body)
}

/// Unix seconds when the server started.
fn started_unix(state: &AppState) -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs().saturating_sub(state.started.elapsed().as_secs())
}

fn model_entry(state: &AppState, model: &Model) -> Value {
    let created_unix = started_unix(state);
    let info = model.info();
    let context = info.as_ref().map(|i| i.context_length);
    let thinking = info.as_ref().is_some_and(|i| i.thinking);
    let tools = info.as_ref().is_some_and(|i| i.template.tool_call_start.as_deref().is_some_and(|s| !s.is_empty()));
    let structured = model.engine().map(|e| e.grammars().is_some());
    let yes_no = |b: bool| json!({"supported": b});
    let described = state.models.describe(model);
    // Fields of both the Anthropic and the OpenAI model shapes, so both SDKs'
    // `models.list()` parse the same answer. Anthropic's carry the window
    // (`max_input_tokens`), the output limit and what the model can do
    // (known once it has been loaded); pensieve's own add its state and memory.
    json!({
        "type": "model",
        "id": model.id(),
        "display_name": model.id(),
        "created_at": rfc3339(created_unix),
        "lifecycle": "active",
        "max_input_tokens": context,
        "max_tokens": context,
        "capabilities": {
            "batch": yes_no(false),
            "citations": yes_no(false),
            "code_execution": yes_no(false),
            "context_management": {"supported": false},
            "effort": {"supported": false, "low": yes_no(false), "medium": yes_no(false), "high": yes_no(false), "max": yes_no(false)},
            "image_input": yes_no(false),
            "pdf_input": yes_no(false),
            "server_tools": {"supported": false, "code_execution": yes_no(false), "web_search": yes_no(false)},
            "structured_outputs": yes_no(structured.unwrap_or(info.is_some())),
            "thinking": {"supported": thinking, "types": {
                "enabled": yes_no(thinking), "adaptive": yes_no(thinking), "disabled": yes_no(true), "between_tools": yes_no(false)}},
            "tool_use": yes_no(tools),
        },
        "object": "model",
        "created": created_unix,
        "owned_by": "pensieve",
        "state": described["state"],
        "context_length": context,
        "memory_bytes": described["memory_bytes"],
        "weights_bytes": described["weights_bytes"],
        "default": described["default"],
    })
}

pub fn metrics(state: &AppState) -> Response<Body> {
    let t = totals(state);
    for m in state.models.all() {
        crate::metrics::model_loaded(m.id(), m.state() == "loaded");
    }
    let text = crate::metrics::render(&crate::metrics::Snapshot {
        slots_in_use: t.in_use,
        queue_depth: t.queued,
        memory: t.memory,
        decode_tokens_per_second: t.decode_tps,
        process_rss_bytes: state.models.memory().process_rss(),
        engine_up: state.models.loaded().iter().all(|e| e.status().healthy()),
    });
    let mut r = Response::new(http_body_util::Full::new(Bytes::from(text)).boxed());
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

pub fn list_models(state: &AppState) -> Response<Body> {
    let data: Vec<Value> = state.models.all().iter().map(|m| model_entry(state, m)).collect();
    let first = state.models.all().first().map(|m| m.id().to_string());
    let last = state.models.all().last().map(|m| m.id().to_string());
    json_response(StatusCode::OK, &json!({"data": data, "has_more": false, "first_id": first, "last_id": last, "object": "list"}))
}

/// `GET /v1/models/{id}`: the model a request naming `id` would get (by
/// name, alias, or the default), under the asked name; `--strict-models`:
/// 404 for a name that selects none.
pub fn get_model(state: &AppState, id: &str) -> Result<Response<Body>, ApiError> {
    let model = state.models.route(Some(id))?;
    let mut m = model_entry(state, model);
    if !id.is_empty() {
        m["id"] = json!(id);
    }
    Ok(json_response(StatusCode::OK, &m))
}

pub async fn count_tokens(state: &Arc<AppState>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let req: MessagesRequest = parse_json(body)?;
    let prompt = req.to_prompt()?;
    let lease = lease(state, Some(&req.model)).await?;
    let n = lease.engine.count_tokens(prompt).await?;
    Ok(json_response(StatusCode::OK, &json!({"input_tokens": n})))
}

/// The model a request names, held for it (loaded first when it is not).
async fn lease(state: &Arc<AppState>, name: Option<&str>) -> Result<Lease, ApiError> {
    let model = state.models.route(name)?.clone();
    state.models.acquire(&model).await
}

/// What the router knows about a generation request.
pub struct Ctx {
    pub label: RequestLabel,
    pub fault: Option<Fault>,
}

pub async fn messages(state: &Arc<AppState>, body: &[u8], mut ctx: Ctx) -> Result<Response<Body>, ApiError> {
    let req: MessagesRequest = parse_json(body)?;
    let mut gen_req = req.to_generate()?;
    gen_req.fault = ctx.fault;
    let id = new_id("msg_");
    let model = req.model.clone();
    ctx.label.model = model.clone();
    let omit = req.thinking_omitted();
    let stream = req.stream.unwrap_or(false).then(|| EventStream::new(&id, &model).omitting_thinking(omit));
    serve_generation(state, gen_req, ctx.label, None, stream, |out, reason, g| {
        anthropic::message_response(&id, &model, out, reason, usage_of(g), omit)
    })
    .await
}

pub async fn chat_completions(state: &Arc<AppState>, body: &[u8], ctx: Ctx) -> Result<Response<Body>, ApiError> {
    let req: ChatRequest = parse_json(body)?;
    let mut gen_req = req.to_generate()?;
    gen_req.fault = ctx.fault;
    let model = req.model.clone().unwrap_or_else(|| state.models.default_model().id().to_string());
    openai_generation(state, gen_req, ctx.label, Endpoint::Chat, &model, &req.common).await
}

pub async fn completions(state: &Arc<AppState>, body: &[u8], ctx: Ctx) -> Result<Response<Body>, ApiError> {
    let req: CompletionRequest = parse_json(body)?;
    let mut gen_req = req.to_generate()?;
    gen_req.fault = ctx.fault;
    let model = req.model.clone().unwrap_or_else(|| state.models.default_model().id().to_string());
    openai_generation(state, gen_req, ctx.label, Endpoint::Completions, &model, &req.common).await
}

async fn openai_generation(
    state: &Arc<AppState>,
    gen_req: GenerateRequest,
    mut label: RequestLabel,
    endpoint: Endpoint,
    model: &str,
    common: &openai::Common,
) -> Result<Response<Body>, ApiError> {
    let id = match endpoint {
        Endpoint::Chat => new_id("chatcmpl-"),
        Endpoint::Completions => new_id("cmpl-"),
    };
    label.model = model.to_string();
    let logprobs = gen_req.logprobs.is_some();
    let stream =
        common.streaming().then(|| ChunkStream::new(endpoint, &id, model, common.include_usage()).with_logprobs(logprobs));
    serve_generation(state, gen_req, label, None, stream, |out, reason, g| {
        let usage = openai::usage_json(g.prompt_tokens, g.cached_tokens, g.output_tokens());
        openai::response(endpoint, &id, model, out, reason, usage, logprobs)
    })
    .await
}

pub async fn ollama_chat(state: &Arc<AppState>, body: &[u8], ctx: Ctx) -> Result<Response<Body>, ApiError> {
    let req: ollama::ChatRequest = parse_json(body)?;
    let gen_req = req.to_generate()?;
    ollama_generation(state, gen_req, ctx, ollama::Endpoint::Chat, req.model.as_deref(), &req.common).await
}

pub async fn ollama_generate(state: &Arc<AppState>, body: &[u8], ctx: Ctx) -> Result<Response<Body>, ApiError> {
    let req: ollama::GenerateRequestBody = parse_json(body)?;
    let gen_req = req.to_generate()?;
    ollama_generation(state, gen_req, ctx, ollama::Endpoint::Generate, req.model.as_deref(), &req.common).await
}

async fn ollama_generation(
    state: &Arc<AppState>,
    mut gen_req: GenerateRequest,
    ctx: Ctx,
    endpoint: ollama::Endpoint,
    model: Option<&str>,
    common: &ollama::Common,
) -> Result<Response<Body>, ApiError> {
    gen_req.fault = ctx.fault;
    let keep = common.keep_alive()?;
    let model =
        model.filter(|m| !m.is_empty()).map(str::to_string).unwrap_or_else(|| state.models.default_model().id().to_string());
    let mut label = ctx.label;
    label.model = model.clone();
    let timing = ollama::Timing::new();
    let stream = common.streaming().then(|| ollama::LineStream::new(endpoint, &model, timing));
    serve_generation(state, gen_req, label, keep, stream, |out, reason, g| {
        let mut t = timing;
        t.first_output = g.ttft().map(|d| g.started() + d);
        ollama::response(endpoint, &model, out, reason, t.stats(g.prompt_tokens, g.output_tokens()))
    })
    .await
}

pub async fn responses(state: &Arc<AppState>, body: &[u8], ctx: Ctx) -> Result<Response<Body>, ApiError> {
    let req: responses::ResponsesRequest = parse_json(body)?;
    let history = match &req.previous_response_id {
        None => vec![],
        Some(id) => state.responses.conversation(id).ok_or_else(|| {
            ApiError::NotFound(format!(
                "previous_response_id: no stored response {id:?} (responses are kept in memory, the oldest dropped first, and not across restarts)"
            ))
        })?,
    };
    let mut gen_req = req.to_generate(&history)?;
    gen_req.fault = ctx.fault;
    let model = req.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| state.models.default_model().id().to_string());
    let mut label = ctx.label;
    label.model = model.clone();
    let meta = responses::Meta::new(&req, &model);
    let keep = req.stored().then(|| (state.responses.clone(), gen_req.prompt.clone(), req.instructions.is_some()));
    let stream = req.streaming().then(|| {
        let mut s = responses::EventStream::new(responses::Meta::new(&req, &model));
        s.store = keep.clone();
        s
    });
    serve_generation(state, gen_req, label, None, stream, move |out, reason, g| {
        let (r, calls) = responses::response(&meta, out, reason, g.prompt_tokens, g.cached_tokens, g.output_tokens());
        if let Some((store, prompt, had_instructions)) = keep {
            store.insert(r.clone(), responses::conversation(&prompt, had_instructions, &out.text(), &calls));
        }
        r
    })
    .await
}

/// `GET` / `DELETE /v1/responses/{id}`.
pub fn stored_response(state: &AppState, id: &str, delete: bool) -> Result<Response<Body>, ApiError> {
    let missing = || ApiError::NotFound(format!("no stored response {id:?}"));
    if delete {
        if !state.responses.delete(id) {
            return Err(missing());
        }
        return Ok(json_response(StatusCode::OK, &json!({"id": id, "object": "response", "deleted": true})));
    }
    state.responses.get(id).map(|r| json_response(StatusCode::OK, &r)).ok_or_else(missing)
}

/// What Ollama's listings say about a model.
fn ollama_model(state: &AppState, model: &Model) -> Value {
    let info = model.info();
    let family = info.as_ref().and_then(|i| i.model_type.clone()).unwrap_or_default();
    let gguf = model.entry.spec.to_ascii_lowercase().ends_with(".gguf")
        || model.entry.spec.starts_with("ollama:")
        || info.as_ref().is_some_and(|i| i.model.contains("/gguf/"));
    json!({
        "name": model.id(),
        "model": model.id(),
        "modified_at": rfc3339(started_unix(state)),
        "size": model.weights().unwrap_or(0),
        "digest": "",
        "details": {
            "parent_model": "",
            "format": if gguf { "gguf" } else { "safetensors" },
            "family": family,
            "families": [family],
            "parameter_size": "",
            "quantization_level": "",
        },
        "state": model.state(),
        "context_length": info.as_ref().map(|i| i.context_length),
    })
}

pub fn ollama_tags(state: &AppState) -> Response<Body> {
    let models: Vec<Value> = state.models.all().iter().map(|m| ollama_model(state, m)).collect();
    json_response(StatusCode::OK, &json!({"models": models}))
}

/// `GET /api/ps`: the loaded models, with when each unloads if left idle.
pub fn ollama_ps(state: &AppState) -> Response<Body> {
    let now = (Instant::now(), SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs());
    let models: Vec<Value> = state
        .models
        .all()
        .iter()
        .filter(|m| m.state() == "loaded")
        .map(|m| {
            let mut v = ollama_model(state, m);
            v["size"] = json!(m.charge());
            v["size_vram"] = json!(0);
            v["expires_at"] = json!(match state.models.expires(m) {
                Some(at) => rfc3339(now.1 + at.saturating_duration_since(now.0).as_secs()),
                // Never unloaded (--keep-alive -1), or in use now.
                None => "2318-01-01T00:00:00Z".to_string(),
            });
            v
        })
        .collect();
    json_response(StatusCode::OK, &json!({"models": models}))
}

pub fn ollama_version() -> Response<Body> {
    // The Ollama API version whose endpoints and fields this server speaks.
    json_response(StatusCode::OK, &json!({"version": "0.12.0"}))
}

pub fn ollama_show(state: &AppState, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let req: Value = parse_json(body)?;
    if !req.is_object() {
        return Err(ApiError::InvalidRequest("expected a JSON object with \"model\"".into()));
    }
    let name = req.get("model").or(req.get("name")).and_then(Value::as_str);
    let model = state.models.route(name)?;
    let info = model.info();
    let info = info.as_ref();
    let arch = info.and_then(|i| i.model_type.clone()).unwrap_or_default();
    let mut capabilities = vec!["completion"];
    if info.is_some_and(|i| i.template.tool_call_start.as_deref().is_some_and(|s| !s.is_empty())) {
        capabilities.push("tools");
    }
    if info.is_some_and(|i| i.thinking) {
        capabilities.push("thinking");
    }
    let m = ollama_model(state, model);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "modelfile": format!("# served by pensieve as {}\n", model.id()),
            "parameters": "",
            "template": info.and_then(|i| i.template.chat_template.clone()).unwrap_or_default(),
            "details": m["details"],
            "model_info": {
                "general.architecture": arch,
                format!("{arch}.context_length"): info.map(|i| i.context_length),
                "general.parameter_count": Value::Null,
            },
            "capabilities": capabilities,
            "modified_at": m["modified_at"],
        }),
    ))
}

/// Pull, push, create, delete, copy: pensieve serves the models it was started with.
pub fn ollama_manage(path: &str) -> ApiError {
    let what = path.trim_start_matches("/api/");
    ApiError::InvalidRequest(format!(
        "{what} is not supported: pensieve serves the models it was started with (--model, repeatable; \
         --models-dir; ollama:NAME for a model Ollama already pulled), loading each when a request names it"
    ))
}

/// Admits and runs one generation (`keep_alive`: how long its model then
/// stays loaded when idle, as Ollama's requests say); answers with a JSON body built by
/// `complete`, or, when `stream` is given, with an event stream it renders.
async fn serve_generation<R: StreamRenderer>(
    state: &Arc<AppState>,
    gen_req: GenerateRequest,
    mut label: RequestLabel,
    keep_alive: Option<crate::config::KeepAlive>,
    stream: Option<R>,
    complete: impl FnOnce(&Collected, &StopReason, &Generation) -> Value,
) -> Result<Response<Body>, ApiError> {
    // `label.model` is the name the client sent (or the default's): it
    // picks the model, and the response echoes it.
    let lease = lease(state, Some(&label.model)).await?;
    if label.model != lease.model.id() {
        label.model = format!("{} (served by {})", label.model, lease.model.id());
    }
    if let Some(k) = keep_alive {
        lease.keep_alive(k);
    }
    let mut generation = lease.engine.generate(gen_req).await?;
    if let Some(wait) = lease.load_wait {
        generation.waited_for_load(lease.since, wait);
    }
    generation.hold(Box::new(lease));
    generation.label = label;
    let mut resp = match stream {
        None => {
            let (out, reason) = generation.collect().await?;
            json_response(StatusCode::OK, &complete(&out, &reason, &generation))
        }
        Some(renderer) => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(32);
            let write_timeout = Duration::from_secs(state.config.write_timeout.max(1));
            let content_type = renderer.content_type();
            tokio::spawn(drive_stream(generation, renderer, tx, write_timeout));
            sse_response(rx, content_type)
        }
    };
    resp.extensions_mut().insert(LoggedByGeneration);
    Ok(resp)
}

fn usage_of(g: &Generation) -> Usage {
    Usage { prompt_tokens: g.prompt_tokens, cached_tokens: g.cached_tokens, output_tokens: g.output_tokens() }
}

fn sse_response(
    rx: mpsc::Receiver<Result<Frame<Bytes>, std::convert::Infallible>>,
    content_type: &'static str,
) -> Response<Body> {
    let mut r = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Drives one streamed response: generation events in, SSE frames out. Ends
/// when the generation does, when the client goes away (the frame channel
/// closes), or when the client stops reading for `write_timeout` (the
/// channel stays full); each way `generation` is dropped, which cancels the
/// sequence in the engine and frees its slot.
async fn drive_stream<R: StreamRenderer>(
    mut generation: Generation,
    mut renderer: R,
    tx: mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>,
    write_timeout: Duration,
) {
    let send = |text: String| {
        let tx = tx.clone();
        async move {
            if text.is_empty() {
                return true;
            }
            match tokio::time::timeout(write_timeout, tx.send(Ok(Frame::data(Bytes::from(text))))).await {
                Ok(sent) => sent.is_ok(),
                Err(_) => {
                    tracing::warn!("a streaming client stopped reading for {write_timeout:?}: cutting its stream");
                    false
                }
            }
        }
    };
    if !send(renderer.start(generation.prompt_tokens, generation.cached_tokens)).await {
        return;
    }
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    loop {
        tokio::select! {
            ev = generation.next() => {
                let out = match ev {
                    Some(GenEvent::Text(t)) => renderer.text(&t),
                    Some(GenEvent::Thinking(t)) => renderer.thinking(&t),
                    Some(GenEvent::ToolCall(c)) => renderer.tool_call(&c),
                    Some(GenEvent::Logprob(lp)) => renderer.logprob(lp),
                    Some(GenEvent::Done { reason, output_tokens }) => {
                        let _ = send(renderer.finish(&reason, generation.prompt_tokens, generation.cached_tokens, output_tokens)).await;
                        return;
                    }
                    Some(GenEvent::Error(e)) => {
                        let _ = send(renderer.error(&e.for_client(&generation.label.id))).await;
                        return;
                    }
                    None => return,
                };
                if !send(out).await {
                    return;
                }
                keepalive.reset();
            }
            _ = keepalive.tick() => {
                if !send(renderer.keepalive()).await {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

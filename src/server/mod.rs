//! HTTP: the accept loop, routing, auth, body limits, and response helpers.

pub mod guard;
mod handlers;
pub mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::engine::EngineHandle;
use crate::error::{ApiError, Dialect};
use routes::Route;

pub type Body = BoxBody<Bytes, Infallible>;

/// Everything a request handler needs.
pub struct AppState {
    pub config: Config,
    /// The models: the default one (loaded at start) and those loaded on demand.
    pub models: Arc<crate::models::ModelSet>,
    pub started: Instant,
    /// Responses kept for `previous_response_id` (the Responses API).
    pub responses: Arc<crate::api::responses::ResponseStore>,
    /// Which hosts and browser origins are answered.
    access: guard::AccessPolicy,
    /// Set on the shutdown signal (or engine death): every request, on new or
    /// kept-alive connections, gets 503 with `Connection: close` while the
    /// running ones finish.
    draining: AtomicBool,
    /// Set once the drain is over: every connection finishes the response it
    /// is writing (a cancelled stream's error event included), then closes.
    close_connections: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// How `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The shutdown signal arrived; requests were drained.
    Shutdown,
    /// The engine thread died; the process should exit non-zero so that a
    /// supervisor restarts it.
    EngineDied,
}

/// Marks a response whose generation logs its own line (with tokens, TTFT
/// and outcome) when it ends.
#[derive(Clone, Copy)]
pub(crate) struct LoggedByGeneration;

/// Serves until `shutdown` resolves or the engine dies, then drains: every
/// new request (on any connection) gets 503 with `Connection: close`, waiting
/// requests get 503 at once, running generations have up to
/// `--shutdown-timeout` to finish; then the engine stops (which ends any stream
/// still open with an error event).
/// The Responses API's store: this many responses, this many bytes at most.
const RESPONSES_KEPT: usize = 256;
const RESPONSES_BYTES: usize = 64 << 20;

pub async fn run(listener: TcpListener, config: Config, engine: EngineHandle, shutdown: impl Future<Output = ()>) -> RunOutcome {
    run_with(listener, None, config, engine, shutdown).await
}

/// `run`, also accepting on `extra` (`--ollama-port`).
pub async fn run_with(
    listener: TcpListener,
    extra: Option<TcpListener>,
    config: Config,
    engine: EngineHandle,
    shutdown: impl Future<Output = ()>,
) -> RunOutcome {
    if config.metrics {
        crate::metrics::install();
    }
    let models = match crate::models::ModelSet::new(&config, engine.clone()) {
        Ok(m) => m,
        Err(e) => {
            // `serve` checks the catalog before loading anything; embedders get it here.
            tracing::error!("{e}");
            engine.shutdown();
            return RunOutcome::Shutdown;
        }
    };
    models.spawn_reaper();
    let state = Arc::new(AppState {
        models,
        responses: Arc::new(crate::api::responses::ResponseStore::new(RESPONSES_KEPT, RESPONSES_BYTES)),
        access: guard::AccessPolicy::from_config(&config),
        config,
        started: Instant::now(),
        draining: AtomicBool::new(false),
        close_connections: tokio::sync::watch::channel(false).0,
    });
    let connections = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections as usize));
    tokio::pin!(shutdown);
    let engine_died = engine_death(state.models.clone());
    tokio::pin!(engine_died);
    let outcome = loop {
        tokio::select! {
            accepted = accept(&listener, extra.as_ref(), &connections) => spawn_connection(&state, accepted),
            _ = &mut shutdown => break RunOutcome::Shutdown,
            _ = &mut engine_died => break RunOutcome::EngineDied,
        }
    };
    match outcome {
        RunOutcome::Shutdown => tracing::info!("shutting down: new requests get 503; draining running requests"),
        RunOutcome::EngineDied => tracing::error!("the engine thread died: new requests get 503; exiting for a restart"),
    }
    state.draining.store(true, Ordering::Release);
    // Requests waiting for a slot fail now instead of at the deadline.
    for engine in state.models.loaded() {
        engine.admission().close();
    }
    let in_use = || state.models.loaded().iter().map(|e| e.admission().in_use()).sum::<usize>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(state.config.shutdown_timeout);
    // Keep answering (with 503 and `draining` on /health) while running
    // requests finish, so clients and supervisors learn why.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    // A dead engine: keep answering 503 a moment, so health checks see why.
    let answer_until = tokio::time::Instant::now()
        + if matches!(outcome, RunOutcome::EngineDied) { Duration::from_secs(2) } else { Duration::ZERO };
    while (in_use() > 0 || tokio::time::Instant::now() < answer_until) && tokio::time::Instant::now() < deadline {
        tokio::select! {
            accepted = accept(&listener, extra.as_ref(), &connections) => spawn_connection(&state, accepted),
            _ = tick.tick() => {}
        }
    }
    drop(listener);
    drop(extra);
    // Each engine saves its prefix cache as it stops.
    let set = state.models.clone();
    let running = state.models.loaded();
    let _ = tokio::task::spawn_blocking(move || set.shutdown_all()).await;
    // Let cancelled streams write their error event before returning.
    let grace = Instant::now() + Duration::from_secs(2);
    while running.iter().map(|e| e.admission().in_use()).sum::<usize>() > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then every connection writes out what it has and closes (idle ones at
    // once), so no response is cut by the process exiting.
    state.close_connections.send_replace(true);
    let max = state.config.max_connections as usize;
    while connections.available_permits() < max && Instant::now() < grace + Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    outcome
}

/// A connection slot, then a connection: at the cap, new connections wait in
/// the kernel's backlog instead of being accepted and starved.
async fn accept(
    listener: &TcpListener,
    extra: Option<&TcpListener>,
    connections: &Arc<tokio::sync::Semaphore>,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    let permit = connections.clone().acquire_owned().await.expect("never closed");
    let accepted = match extra {
        None => listener.accept().await,
        Some(x) => tokio::select! {
            r = listener.accept() => r,
            r = x.accept() => r,
        },
    };
    match accepted {
        Ok((stream, peer)) => Some((stream, peer, permit)),
        Err(e) => {
            // Out of file descriptors and the like: back off, keep serving.
            tracing::warn!("accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// Largest amount of response data the kernel holds for one client: a
/// streaming client that stops reading fills it (and hyper's buffer, also
/// bounded) within this many bytes, so `--write-timeout` starts counting then
/// instead of after megabytes of an auto-tuned send buffer.
const SEND_BUFFER_BYTES: usize = 64 * 1024;

fn spawn_connection(
    state: &Arc<AppState>,
    accepted: Option<(tokio::net::TcpStream, std::net::SocketAddr, tokio::sync::OwnedSemaphorePermit)>,
) {
    let Some((stream, peer, permit)) = accepted else { return };
    let _ = stream.set_nodelay(true);
    bound_send_buffer(&stream);
    let st = state.clone();
    let st_close = state.close_connections.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let header_timeout = Duration::from_secs(st.config.header_timeout.max(1));
        let svc = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(handle(st, req).await) }
        });
        let mut close = st_close.subscribe();
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(SEND_BUFFER_BYTES)
            .serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        let closing = async move {
            while !*close.borrow_and_update() {
                if close.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let ended = tokio::select! {
            r = conn.as_mut() => r,
            _ = closing => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, "connection ended: {e}");
        }
    });
}

/// Sets SO_SNDBUF (which also turns off the kernel's send-buffer auto-tuning).
fn bound_send_buffer(stream: &tokio::net::TcpStream) {
    #[cfg(unix)]
    // SAFETY: setsockopt on the stream's own open socket, with a pointer to a
    // c_int that outlives the call and its exact size.
    unsafe {
        use std::os::fd::AsRawFd;
        let size = SEND_BUFFER_BYTES as libc::c_int;
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Resolves when a loaded model's engine thread is gone without being asked
/// to stop (unloading asks).
async fn engine_death(models: Arc<crate::models::ModelSet>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if models.loaded().iter().any(|e| e.died()) {
            return;
        }
    }
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request_id = crate::api::new_id("req_");
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let dialect = Route::dialect_for(&path);
    let mut resp = match state.access.check(req.headers(), req.uri().host()) {
        Err(e) => error_response(&e, dialect, &request_id),
        Ok(origin) => {
            let mut r = if method == Method::OPTIONS && origin.is_some() {
                // A CORS preflight from an allowed origin.
                let mut r = Response::new(Full::new(Bytes::new()).boxed());
                *r.status_mut() = StatusCode::NO_CONTENT;
                guard::preflight_headers(r.headers_mut(), req.headers().get("access-control-request-headers"));
                r
            } else {
                match route(&state, req, &request_id).await {
                    Ok(r) => r,
                    Err(e) => error_response(&e, dialect, &request_id),
                }
            };
            if let Some(o) = origin {
                guard::add_cors_headers(r.headers_mut(), &o);
            }
            r
        }
    };
    if state.draining() {
        resp.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp.headers_mut().insert("request-id", HeaderValue::from_str(&request_id).unwrap());
    let route = Route::label_for(&path);
    if state.config.metrics {
        crate::metrics::request(route, resp.status().as_u16(), started.elapsed().as_secs_f64());
    }
    if resp.extensions().get::<LoggedByGeneration>().is_none() {
        tracing::info!(
            id = %request_id,
            %method,
            route,
            path = %path,
            status = resp.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
    }
    resp
}

async fn route(state: &Arc<AppState>, req: Request<Incoming>, request_id: &str) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let resolved = Route::resolve(&path).filter(|(r, _)| *r != Route::Metrics || state.config.metrics);
    if state.draining() && resolved.map(|(r, _)| r) != Some(Route::Health) {
        return Err(ApiError::Unavailable("the server is shutting down; retry in a moment".into()));
    }
    if resolved.is_none_or(|(r, _)| r.needs_key()) {
        check_auth(&state.config, &req)?;
    }
    let Some((route, model_id)) = resolved else {
        return Err(ApiError::NotFound(format!("no route for {method} {}", req.uri().path())));
    };
    if !route.methods().contains(&method) {
        return Err(ApiError::MethodNotAllowed {
            message: format!("{method} is not allowed on {path}; use {}", route.allow()),
            allow: route.allow(),
        });
    }
    let ctx = |fault| handlers::Ctx {
        label: crate::engine::RequestLabel { id: request_id.to_string(), route: route.label(), model: String::new() },
        fault,
    };
    match route {
        Route::Health => {
            // Details (paths, memory) only for whoever holds the key, if one is set.
            let detail = state.config.api_key.is_none() || check_auth(&state.config, &req).is_ok();
            Ok(handlers::health(state, detail))
        }
        Route::Metrics => Ok(handlers::metrics(state)),
        Route::Models => Ok(handlers::list_models(state)),
        Route::Model => handlers::get_model(state, model_id.unwrap_or_default()),
        Route::CountTokens => {
            let body = read_body(req, &state.config, route).await?;
            handlers::count_tokens(state, &body).await
        }
        Route::OllamaTags => Ok(handlers::ollama_tags(state)),
        Route::OllamaPs => Ok(handlers::ollama_ps(state)),
        Route::OllamaVersion => Ok(handlers::ollama_version()),
        Route::OllamaManage => Err(handlers::ollama_manage(&path)),
        Route::Response => handlers::stored_response(state, model_id.unwrap_or_default(), method == Method::DELETE),
        Route::OllamaShow => {
            let body = read_body(req, &state.config, route).await?;
            handlers::ollama_show(state, &body)
        }
        Route::Messages
        | Route::ChatCompletions
        | Route::Completions
        | Route::OllamaChat
        | Route::OllamaGenerate
        | Route::Responses => {
            let fault = fault_hook(&state.config, &req)?;
            let body = read_body(req, &state.config, route).await?;
            match route {
                Route::Messages => handlers::messages(state, &body, ctx(fault)).await,
                Route::ChatCompletions => handlers::chat_completions(state, &body, ctx(fault)).await,
                Route::OllamaChat => handlers::ollama_chat(state, &body, ctx(fault)).await,
                Route::OllamaGenerate => handlers::ollama_generate(state, &body, ctx(fault)).await,
                Route::Responses => handlers::responses(state, &body, ctx(fault)).await,
                _ => handlers::completions(state, &body, ctx(fault)).await,
            }
        }
    }
}

/// Accepts `x-api-key: KEY` or `Authorization: Bearer KEY`, compared in
/// constant time: a request is authorized when either carries the key (a
/// client may send both, one of them empty or stale).
fn check_auth(config: &Config, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(expected) = &config.api_key else { return Ok(()) };
    let h = req.headers();
    let presented: Vec<&str> = h
        .get_all("x-api-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .chain(h.get_all(hyper::header::AUTHORIZATION).iter().filter_map(|v| {
            let v = v.to_str().ok()?;
            v.get(..7).filter(|s| s.eq_ignore_ascii_case("bearer ")).map(|_| &v[7..])
        }))
        .map(str::trim)
        .collect();
    // Every candidate is compared (no early exit on the first match).
    let ok = presented.iter().fold(false, |ok, k| keys_match(k.as_bytes(), expected.as_bytes()) | ok);
    match (ok, presented.is_empty()) {
        (true, _) => Ok(()),
        (false, true) => Err(ApiError::Authentication("missing API key: send x-api-key or Authorization: Bearer".into())),
        (false, false) => Err(ApiError::Authentication("invalid API key".into())),
    }
}

fn keys_match(a: &[u8], b: &[u8]) -> bool {
    // ct_eq on equal lengths; a length mismatch still does a full compare.
    if a.len() != b.len() {
        let _ = b.ct_eq(b);
        return false;
    }
    a.ct_eq(b).into()
}

fn fault_hook(config: &Config, req: &Request<Incoming>) -> Result<Option<crate::engine::Fault>, ApiError> {
    if !config.enable_fault_injection {
        return Ok(None);
    }
    let Some(v) = req.headers().get("x-pensieve-fault").and_then(|v| v.to_str().ok()) else { return Ok(None) };
    match v {
        "kill-engine" => return Ok(Some(crate::engine::Fault::KillEngine)),
        "raise-in-sampler" => return Ok(Some(crate::engine::Fault::RaiseInSampler)),
        "poison-sampling" => return Ok(Some(crate::engine::Fault::PoisonSampling)),
        _ => {}
    }
    if let Some(n) = v.strip_prefix("raise-in-forward-after=").and_then(|n| n.parse().ok()) {
        return Ok(Some(crate::engine::Fault::RaiseInForwardAfter(n)));
    }
    if let Some(n) = v.strip_prefix("raise-in-sampler-after=").and_then(|n| n.parse().ok()) {
        return Ok(Some(crate::engine::Fault::RaiseInSamplerAfter(n)));
    }
    v.strip_prefix("raise-after=")
        .and_then(|n| n.parse().ok())
        .map(|n| Some(crate::engine::Fault::RaiseAfter(n)))
        .ok_or_else(|| ApiError::InvalidRequest("x-pensieve-fault: expected raise-after=N, raise-in-forward-after=N, raise-in-sampler-after=N, kill-engine, raise-in-sampler or poison-sampling".into()))
}

/// Reads a JSON body: checks the content-type, the size limit and the time
/// limit (a client trickling its body must not hold a connection forever).
async fn read_body(req: Request<Incoming>, config: &Config, route: Route) -> Result<Bytes, ApiError> {
    let limit = config.max_body_bytes;
    // A JSON content-type is required: the types a web page may send
    // without a CORS preflight (text/plain, forms, none) are all refused.
    // Ollama's clients (and its documentation's `curl -d` examples) often
    // send none or a form type: on its routes that is allowed from
    // non-browser clients (no Origin header; browsers send one with every
    // POST), the body still parsed as JSON.
    let ct = req.headers().get(CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?").to_ascii_lowercase());
    let essence = ct.as_deref().map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    let not_a_browser = !req.headers().contains_key(hyper::header::ORIGIN);
    match essence.as_deref() {
        Some("application/json") => {}
        Some(e) if e.ends_with("+json") => {}
        Some("application/x-www-form-urlencoded" | "text/plain") | None
            if route.dialect() == crate::error::Dialect::Ollama && not_a_browser => {}
        Some(e) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "content-type {e:?} is not supported: send a JSON body with content-type: application/json"
            )))
        }
        None => {
            return Err(ApiError::UnsupportedMediaType(
                "no content-type: send a JSON body with content-type: application/json".into(),
            ))
        }
    }
    let too_large = || ApiError::RequestTooLarge(format!("request body exceeds the {limit}-byte limit (--max-body-bytes)"));
    if let Some(len) = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        if len > limit {
            return Err(too_large());
        }
    }
    let read = Limited::new(req.into_body(), limit as usize).collect();
    match tokio::time::timeout(Duration::from_secs(config.body_timeout.max(1)), read).await {
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the request body did not arrive within {} s (--body-timeout)",
            config.body_timeout
        ))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::InvalidRequest(format!("could not read the request body: {e}"))),
    }
}

pub fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn error_response(e: &ApiError, dialect: Dialect, request_id: &str) -> Response<Body> {
    let e = &e.for_client(request_id);
    let mut r = json_response(e.status(), &e.body(dialect, Some(request_id)));
    if let Some(secs) = e.retry_after() {
        r.headers_mut().insert("retry-after", HeaderValue::from(secs));
    }
    if let ApiError::MethodNotAllowed { allow, .. } = e {
        // RFC 9110: a 405 names the allowed methods.
        r.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    }
    r
}

/// Starts the engine, binds, and serves: the whole program behind `main`.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    crate::models::Catalog::discover(&config).map_err(anyhow::Error::msg)?;
    let cfg = config.clone();
    let engine = tokio::task::spawn_blocking(move || EngineHandle::start(&cfg)).await??;
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    tracing::info!(
        "pensieve serving {} on http://{} (Anthropic: /v1/messages)",
        config.served_model_id(),
        listener.local_addr()?
    );
    let extra = match config.ollama_port {
        None => None,
        Some(port) => {
            let l = TcpListener::bind((config.host.as_str(), port)).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on {}:{port} (--ollama-port; is Ollama itself running there?): {e}", config.host)
            })?;
            tracing::info!("also listening on http://{} (--ollama-port: Ollama's API at /api/...)", l.local_addr()?);
            Some(l)
        }
    };
    let (first_signal, drain) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(signals(first_signal));
    match run_with(listener, extra, config, engine, async move {
        let _ = drain.await;
    })
    .await
    {
        RunOutcome::Shutdown => Ok(()),
        RunOutcome::EngineDied => {
            anyhow::bail!("the engine thread died (see the log above); exiting so a supervisor can restart pensieve")
        }
    }
}

/// The first SIGINT or SIGTERM starts the drain; a second one ends the
/// process at once: no waiting for running requests and no prefix-cache save
/// (a save under way leaves only a temporary folder, cleaned at the next save).
async fn signals(first: tokio::sync::oneshot::Sender<()>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut next = async || -> i32 {
            tokio::select! {
                _ = term.recv() => libc::SIGTERM,
                _ = int.recv() => libc::SIGINT,
            }
        };
        let sig = next().await;
        tracing::info!("signal {sig}: draining (a second signal exits at once)");
        let _ = first.send(());
        let sig = next().await;
        tracing::warn!("second signal ({sig}): exiting now, without waiting for running requests");
        // _exit: no atexit handlers or library destructors under a running engine.
        // SAFETY: _exit(2) ends the process; nothing runs after it.
        unsafe { libc::_exit(128 + sig) };
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        let _ = first.send(());
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    }
}

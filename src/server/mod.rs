//! HTTP: the accept loop, routing, auth, body limits, and response helpers.

mod handlers;

use std::convert::Infallible;
use std::future::Future;
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

pub type Body = BoxBody<Bytes, Infallible>;

/// Everything a request handler needs.
pub struct AppState {
    pub config: Config,
    pub engine: EngineHandle,
    pub started: Instant,
    /// The id /v1/models reports.
    pub model_id: String,
}

/// Serves until `shutdown` resolves, then stops accepting, lets running
/// generations finish for up to `--shutdown-timeout`, and stops the engine
/// (which ends any stream still open with an error event).
pub async fn run(listener: TcpListener, config: Config, engine: EngineHandle, shutdown: impl Future<Output = ()>) {
    let state = Arc::new(AppState {
        model_id: config.served_model_id(),
        config,
        engine,
        started: Instant::now(),
    });
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; draining running requests");
    let adm = state.engine.admission();
    let deadline = Instant::now() + Duration::from_secs(state.config.shutdown_timeout);
    while adm.in_use() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    adm.close();
    let engine = state.engine.clone();
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request_id = crate::api::new_id("req_");
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let dialect = dialect_for(&path);
    let mut resp = match route(&state, req, &request_id).await {
        Ok(r) => r,
        Err(e) => error_response(&e, dialect, &request_id),
    };
    resp.headers_mut().insert("request-id", HeaderValue::from_str(&request_id).unwrap());
    tracing::info!(
        id = %request_id,
        %method,
        path = %path,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

fn dialect_for(path: &str) -> Dialect {
    if path.starts_with("/v1/chat") || path.starts_with("/v1/completions") {
        Dialect::OpenAi
    } else {
        Dialect::Anthropic
    }
}

async fn route(state: &Arc<AppState>, req: Request<Incoming>, request_id: &str) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    if path != "/health" {
        check_auth(&state.config, &req)?;
    }
    let allowed: &[Method] = match path.as_str() {
        "/health" | "/v1/models" => &[Method::GET],
        "/v1/messages" | "/v1/messages/count_tokens" | "/v1/chat/completions" | "/v1/completions" => &[Method::POST],
        p if p.starts_with("/v1/models/") => &[Method::GET],
        _ => return Err(ApiError::NotFound(format!("no route for {method} {}", req.uri().path()))),
    };
    if !allowed.contains(&method) {
        return Err(ApiError::MethodNotAllowed(format!(
            "{method} is not allowed on {path}; use {}",
            allowed.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    match path.as_str() {
        "/health" => Ok(handlers::health(state)),
        "/v1/models" => Ok(handlers::list_models(state)),
        p if p.starts_with("/v1/models/") => handlers::get_model(state, &p["/v1/models/".len()..]),
        "/v1/messages" => {
            let fault = fault_hook(&state.config, &req)?;
            let body = read_body(req, state.config.max_body_bytes).await?;
            handlers::messages(state, &body, request_id, fault).await
        }
        "/v1/chat/completions" => {
            let fault = fault_hook(&state.config, &req)?;
            let body = read_body(req, state.config.max_body_bytes).await?;
            handlers::chat_completions(state, &body, request_id, fault).await
        }
        "/v1/completions" => {
            let fault = fault_hook(&state.config, &req)?;
            let body = read_body(req, state.config.max_body_bytes).await?;
            handlers::completions(state, &body, request_id, fault).await
        }
        "/v1/messages/count_tokens" => {
            let body = read_body(req, state.config.max_body_bytes).await?;
            handlers::count_tokens(state, &body).await
        }
        _ => unreachable!("routes above are exhaustive"),
    }
}

/// Accepts `x-api-key: KEY` or `Authorization: Bearer KEY`, compared in constant time.
fn check_auth(config: &Config, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(expected) = &config.api_key else { return Ok(()) };
    let h = req.headers();
    let presented = h
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .or_else(|| {
            h.get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
        });
    match presented {
        None => Err(ApiError::Authentication(
            "missing API key: send x-api-key or Authorization: Bearer".into(),
        )),
        Some(k) if keys_match(k.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::Authentication("invalid API key".into())),
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

fn fault_hook(config: &Config, req: &Request<Incoming>) -> Result<Option<u32>, ApiError> {
    if !config.enable_fault_injection {
        return Ok(None);
    }
    match req.headers().get("x-pensieve-fault").and_then(|v| v.to_str().ok()) {
        None => Ok(None),
        Some(v) => v
            .strip_prefix("raise-after=")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| ApiError::InvalidRequest("x-pensieve-fault: expected raise-after=N".into())),
    }
}

async fn read_body(req: Request<Incoming>, limit: u64) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::RequestTooLarge(format!("request body exceeds the {limit}-byte limit (--max-body-bytes)"));
    if let Some(len) = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        if len > limit {
            return Err(too_large());
        }
    }
    match Limited::new(req.into_body(), limit as usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::InvalidRequest(format!("could not read the request body: {e}"))),
    }
}

pub fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn error_response(e: &ApiError, dialect: Dialect, request_id: &str) -> Response<Body> {
    let mut r = json_response(e.status(), &e.body(dialect, Some(request_id)));
    if let Some(secs) = e.retry_after() {
        r.headers_mut().insert("retry-after", HeaderValue::from(secs));
    }
    if matches!(e, ApiError::MethodNotAllowed(_)) {
        // RFC 9110: a 405 names the allowed methods.
        let allow = e.message().rsplit("use ").next().unwrap_or("").to_string();
        if let Ok(v) = HeaderValue::from_str(&allow) {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
    }
    r
}

/// Starts the engine, binds, and serves: the whole program behind `main`.
pub async fn serve(config: Config) -> anyhow::Result<()> {
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
    run(listener, config, engine, shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

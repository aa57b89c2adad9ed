//! A faster BLAS for MLX's CPU backend on Linux.
//!
//! The `mlx[cpu]` wheel is linked against the reference (netlib) BLAS, about
//! 5 GFLOP/s here. MLX calls `cblas_sgemm` through the global symbol scope,
//! and the executable comes first in that scope, so this binary defines and
//! exports (see build.rs) its own `cblas_sgemm` that forwards to OpenBLAS:
//! the scipy-openblas32 wheel in the venv (whose symbols carry a `scipy_`
//! prefix) or a system libopenblas. With `--blas off`, or when neither is
//! found, calls go on to the next definition in the scope (RTLD_NEXT): the
//! reference BLAS MLX was built with.

use std::ffi::{c_char, c_float, c_int, c_void, CString};
use std::path::Path;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::config::BlasChoice;

type SgemmFn = unsafe extern "C" fn(
    c_int, c_int, c_int, c_int, c_int, c_int,
    c_float, *const c_float, c_int, *const c_float, c_int,
    c_float, *mut c_float, c_int,
);

static SGEMM: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// Our `cblas_sgemm`: same signature as CBLAS, forwards to the chosen BLAS.
///
/// # Safety
/// Called by MLX with valid CBLAS arguments.
#[no_mangle]
pub unsafe extern "C" fn cblas_sgemm(
    order: c_int, ta: c_int, tb: c_int, m: c_int, n: c_int, k: c_int,
    alpha: c_float, a: *const c_float, lda: c_int, b: *const c_float, ldb: c_int,
    beta: c_float, c: *mut c_float, ldc: c_int,
) {
    let mut f = SGEMM.load(Ordering::Acquire);
    if f.is_null() {
        f = next_sgemm();
        SGEMM.store(f, Ordering::Release);
    }
    let f: SgemmFn = std::mem::transmute(f);
    f(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

fn next_sgemm() -> *mut c_void {
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"cblas_sgemm".as_ptr()) };
    assert!(!p.is_null(), "no cblas_sgemm found after pensieve's own (is MLX loaded?)");
    p
}

unsafe fn open(path: &str, symbol: &str) -> Option<*mut c_void> {
    let cpath = CString::new(path).ok()?;
    let handle = libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
    if handle.is_null() {
        return None;
    }
    let csym = CString::new(symbol).ok()?;
    let f = libc::dlsym(handle, csym.as_ptr() as *const c_char);
    (!f.is_null()).then_some(f)
}

/// Picks the BLAS before mlx is imported. Returns a description for the log
/// and /health.
pub fn init(choice: BlasChoice, site_packages: &Path) -> String {
    // Keep our definition in the link even if nothing else names it.
    std::hint::black_box(cblas_sgemm as *const c_void);
    if !cfg!(target_os = "linux") {
        return "platform default (Accelerate/Metal)".into();
    }
    if choice == BlasChoice::Off {
        return reference(site_packages, "reference BLAS from the MLX wheel (--blas off)");
    }
    let wheel = site_packages.join("scipy_openblas32/lib/libscipy_openblas.so");
    let candidates = [
        (wheel.to_string_lossy().to_string(), "scipy_cblas_sgemm", "OpenBLAS (scipy-openblas32 wheel)"),
        ("libopenblas.so.0".to_string(), "cblas_sgemm", "OpenBLAS (system libopenblas)"),
    ];
    for (path, sym, name) in candidates {
        if let Some(f) = unsafe { open(&path, sym) } {
            SGEMM.store(f, Ordering::Release);
            return name.into();
        }
    }
    reference(site_packages, "reference BLAS from the MLX wheel (no OpenBLAS found)")
}

/// Binds to the reference BLAS the mlx-cpu wheel ships (mlx_cpu.libs/libblas-*).
fn reference(site_packages: &Path, what: &str) -> String {
    let libs = site_packages.join("mlx_cpu.libs");
    let found = std::fs::read_dir(&libs).ok().and_then(|dir| {
        dir.flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libblas")))
    });
    let f = found.and_then(|p| unsafe { open(&p.to_string_lossy(), "cblas_sgemm") });
    match f {
        Some(f) => {
            SGEMM.store(f, Ordering::Release);
            what.into()
        }
        // Not the pip wheel layout (a source build of MLX): resolve lazily.
        None => format!("{what}; resolved at first use"),
    }
}

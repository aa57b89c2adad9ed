//! The kernels as C functions, for the MLX primitives in `mlx_ops.cpp`
//! (the `pensieve_mlx` extension build.rs compiles against the venv's mlx).
//! The extension links to nothing of ours: the binary hands it the address
//! of [`TABLE`] at start, through Python (`pensieve_mlx.bind`).
//!
//! Every function here catches panics (nothing unwinds into C++) and
//! reports failure as a non-zero return.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::attention::{self, Mask, View};
use super::quant::QuantMatrix;
use super::Isa;

/// Must match `View4` in mlx_ops.cpp.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct View4 {
    pub data: *const f32,
    pub shape: [i64; 4],
    pub strides: [i64; 4],
}

/// Must match `AttentionArgs` in mlx_ops.cpp.
#[repr(C)]
pub struct AttentionArgs {
    pub q: View4,
    pub k: View4,
    pub v: View4,
    pub mask: View4,
    pub has_mask: i32,
    pub causal: i32,
    pub scale: f32,
    pub out: *mut f32,
    /// `out` is `[B, L, Hq, Dv]` rather than `[B, Hq, L, Dv]`.
    pub blhd: i32,
}

/// Must match `RopeArgs` in mlx_ops.cpp.
#[repr(C)]
pub struct RopeArgs {
    pub x: View4,
    pub dims: i32,
    pub traditional: i32,
    pub scale: f32,
    /// `dims / 2` frequencies, or null for `base`'s.
    pub freqs: *const f32,
    pub base: f32,
    pub offsets: *const i32,
    pub n_offsets: i64,
    pub out: *mut f32,
}

/// Must match `KernelTable` in mlx_ops.cpp.
#[repr(C)]
pub struct KernelTable {
    pub version: u32,
    pub retain: unsafe extern "C" fn(*const c_void),
    pub release: unsafe extern "C" fn(*const c_void),
    pub qmatmul: unsafe extern "C" fn(*const c_void, *const f32, i64, *mut f32) -> i32,
    pub gather: unsafe extern "C" fn(*const c_void, *const u32, i64, *mut f32) -> i32,
    pub attention: unsafe extern "C" fn(*const AttentionArgs) -> i32,
    pub silu_mul: unsafe extern "C" fn(*const f32, *const f32, i64, *mut f32) -> i32,
    pub rope: unsafe extern "C" fn(*const RopeArgs) -> i32,
    pub rms_norm: unsafe extern "C" fn(*const f32, *const f32, i64, i64, f32, *mut f32) -> i32,
}

pub static TABLE: KernelTable =
    KernelTable { version: 3, retain, release, qmatmul, gather, attention: attention_c, silu_mul, rope: rope_c, rms_norm };

/// The address `pensieve_mlx.bind` takes.
pub fn table_address() -> usize {
    &TABLE as *const KernelTable as usize
}

/// A matrix's handle for the extension: its `Arc`'s pointer, with one
/// strong count taken for the caller (given back by `release`).
pub fn handle(m: &Arc<QuantMatrix>) -> usize {
    Arc::as_ptr(m) as usize
}

/// Calls and nanoseconds spent per kernel kind (qmatmul, gather,
/// attention, silu_mul, rope, rms_norm), for `pensieve_kernels.stats()`.
pub static STATS: [(AtomicU64, AtomicU64); 6] = [const { (AtomicU64::new(0), AtomicU64::new(0)) }; 6];
pub const STAT_NAMES: [&str; 6] = ["qmatmul", "gather", "attention", "silu_mul", "rope", "rms_norm"];

fn guarded(kind: usize, f: impl FnOnce() -> Result<(), String>) -> i32 {
    let t = std::time::Instant::now();
    let r = guarded_inner(f);
    STATS[kind].0.fetch_add(1, Relaxed);
    STATS[kind].1.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
    r
}

fn guarded_inner(f: impl FnOnce() -> Result<(), String>) -> i32 {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            tracing::error!("CPU kernel: {e}");
            1
        }
        Err(_) => {
            tracing::error!("CPU kernel panicked");
            2
        }
    }
}

/// # Safety
/// `m` is a handle from [`handle`] whose matrix is alive.
unsafe extern "C" fn retain(m: *const c_void) {
    // SAFETY: an Arc<QuantMatrix>'s pointer with a live strong count.
    unsafe { Arc::increment_strong_count(m as *const QuantMatrix) }
}

/// # Safety
/// `m` was retained by [`retain`].
unsafe extern "C" fn release(m: *const c_void) {
    // SAFETY: gives back the count `retain` took.
    unsafe { Arc::decrement_strong_count(m as *const QuantMatrix) }
}

/// # Safety
/// `m` is a retained handle, `x` holds `n * cols` values, `out` room for
/// `n * rows`.
unsafe extern "C" fn qmatmul(m: *const c_void, x: *const f32, n: i64, out: *mut f32) -> i32 {
    guarded(0, || {
        // SAFETY: the caller's promises.
        let (m, x, out) = unsafe {
            let m = &*(m as *const QuantMatrix);
            let n = n as usize;
            (m, std::slice::from_raw_parts(x, n * m.cols()), std::slice::from_raw_parts_mut(out, n * m.rows()))
        };
        m.matmul(x, n as usize, out);
        Ok(())
    })
}

/// # Safety
/// `m` is a retained handle, `ids` holds `n` values, `out` room for
/// `n * cols`.
unsafe extern "C" fn gather(m: *const c_void, ids: *const u32, n: i64, out: *mut f32) -> i32 {
    guarded(1, || {
        // SAFETY: the caller's promises.
        let (m, ids, out) = unsafe {
            let m = &*(m as *const QuantMatrix);
            let n = n as usize;
            (m, std::slice::from_raw_parts(ids, n), std::slice::from_raw_parts_mut(out, n * m.cols()))
        };
        m.gather(ids, out)
    })
}

/// A view over exactly the memory its shape and strides reach.
///
/// # Safety
/// `v.data` is valid for reads over that extent.
unsafe fn view<'a>(v: &View4) -> Result<View<'a>, String> {
    if v.shape.iter().any(|&s| s < 0) || v.strides.iter().any(|&s| s < 0) {
        return Err("negative shape or stride".into());
    }
    let shape = v.shape.map(|s| s as usize);
    let strides = v.strides.map(|s| s as usize);
    let len = if shape.contains(&0) { 0 } else { (0..4).map(|i| (shape[i] - 1) * strides[i]).sum::<usize>() + 1 };
    // SAFETY: the caller's promise, for exactly `len` values.
    let data = unsafe { std::slice::from_raw_parts(v.data, len) };
    Ok(View { data, shape, strides })
}

/// # Safety
/// `args` points at arguments whose views are readable over their extents
/// and whose `out` has room for `[B, Hq, L, Dv]` values.
unsafe extern "C" fn attention_c(args: *const AttentionArgs) -> i32 {
    guarded(2, || {
        // SAFETY: the caller's promises.
        let a = unsafe { &*args };
        // SAFETY: as above.
        let (q, k, v) = unsafe { (view(&a.q)?, view(&a.k)?, view(&a.v)?) };
        let mask = if a.has_mask != 0 {
            // SAFETY: as above.
            Mask::Additive(unsafe { view(&a.mask)? })
        } else if a.causal != 0 {
            Mask::Causal
        } else {
            Mask::None
        };
        let n = q.shape[0] * q.shape[1] * q.shape[2] * v.shape[3];
        // SAFETY: as above.
        let out = unsafe { std::slice::from_raw_parts_mut(a.out, n) };
        attention::attention_into(Isa::best(), q, k, v, a.scale, mask, out, a.blhd != 0)
    })
}

/// # Safety
/// `gate` and `x` hold `n` values, `out` room for `n`.
unsafe extern "C" fn silu_mul(gate: *const f32, x: *const f32, n: i64, out: *mut f32) -> i32 {
    guarded(3, || {
        let n = n as usize;
        // SAFETY: the caller's promises.
        let (g, x, o) = unsafe {
            (std::slice::from_raw_parts(gate, n), std::slice::from_raw_parts(x, n), std::slice::from_raw_parts_mut(out, n))
        };
        super::elementwise::silu_mul(Isa::best(), g, x, o);
        Ok(())
    })
}

/// # Safety
/// `args.x` is readable over its extent, `freqs` (when not null) holds
/// `dims / 2` values, `offsets` holds `n_offsets`, and `out` has room for
/// the input's element count.
unsafe extern "C" fn rope_c(args: *const RopeArgs) -> i32 {
    guarded(4, || {
        // SAFETY: the caller's promises.
        let a = unsafe { &*args };
        if a.dims < 0 || a.n_offsets < 1 {
            return Err("rope: negative dims or no offset".into());
        }
        let dims = a.dims as usize;
        // SAFETY: as above.
        let x = unsafe { view(&a.x)? };
        let inv = if a.freqs.is_null() {
            super::rope::inv_freq(dims, a.base)
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(a.freqs, dims / 2) }.iter().map(|f| 1.0 / f).collect()
        };
        // SAFETY: as above.
        let offsets = unsafe { std::slice::from_raw_parts(a.offsets, a.n_offsets as usize) };
        let n = x.shape.iter().product();
        // SAFETY: as above.
        let out = unsafe { std::slice::from_raw_parts_mut(a.out, n) };
        let r = super::rope::Rope { dims, traditional: a.traditional != 0, inv_freq: &inv, scale: a.scale, offsets };
        super::rope::rope(Isa::best(), x, &r, out)
    })
}

/// # Safety
/// `x` holds `rows * dims` values, `weight` (when not null) `dims`, and
/// `out` has room for `rows * dims`.
unsafe extern "C" fn rms_norm(x: *const f32, weight: *const f32, rows: i64, dims: i64, eps: f32, out: *mut f32) -> i32 {
    guarded(5, || {
        if rows < 0 || dims < 1 {
            return Err("rms_norm: bad shape".into());
        }
        let (rows, dims) = (rows as usize, dims as usize);
        // SAFETY: the caller's promises.
        let (x, w, o) = unsafe {
            (
                std::slice::from_raw_parts(x, rows * dims),
                (!weight.is_null()).then(|| std::slice::from_raw_parts(weight, dims)),
                std::slice::from_raw_parts_mut(out, rows * dims),
            )
        };
        super::elementwise::rms_norm(Isa::best(), x, w, dims, eps, o);
        Ok(())
    })
}

//! Elementwise kernels: `silu(gate) * x`, the gated MLP's activation
//! (mlx-lm's `swiglu`), which MLX's CPU backend computes with a scalar
//! `exp` and a libm `fmaf` per element — a tenth of a prefill.

use super::{parallel_for, Isa, SharedOut};
use crate::kernels::attention::exp;

/// Elements per task when split over the pool.
const CHUNK: usize = 1 << 14;

/// `out[i] = silu(gate[i]) * x[i]`, `silu(g) = g / (1 + e^-g)`.
pub fn silu_mul(isa: Isa, gate: &[f32], x: &[f32], out: &mut [f32]) {
    assert!(gate.len() == x.len() && x.len() == out.len(), "silu_mul: lengths differ");
    assert!(Isa::available().contains(&isa), "{isa:?} does not run here");
    let n = out.len();
    let dst = SharedOut(out.as_mut_ptr());
    parallel_for(n.div_ceil(CHUNK), |c| {
        let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
        // SAFETY: elements lo..hi of `out`, one chunk per task.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.at(lo), hi - lo) };
        let (g, x) = (&gate[lo..hi], &x[lo..hi]);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` runs on this CPU (checked above).
            Isa::Avx512 => unsafe { silu_mul_avx512(g, x, o) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { silu_mul_avx2(g, x, o) },
            _ => silu_mul_body(g, x, o),
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn silu_mul_avx512(g: &[f32], x: &[f32], o: &mut [f32]) {
    silu_mul_body(g, x, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: &[f32], x: &[f32], o: &mut [f32]) {
    silu_mul_body(g, x, o)
}

#[inline(always)]
fn silu_mul_body(g: &[f32], x: &[f32], o: &mut [f32]) {
    for ((o, &g), &x) in o.iter_mut().zip(g).zip(x) {
        // e^-|g| <= 1 keeps the exp in the range it is accurate for.
        let e = exp(-g.abs());
        let sig = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        *o = g * sig * x;
    }
}

/// Rows per task for [`rms_norm`] when split over the pool.
const NORM_ROWS: usize = 64;

/// RMS normalization of each `dims`-long row of `x`: `x / sqrt(mean(x²) +
/// eps) * weight` (what `mx.fast.rms_norm` computes; `weight` may be absent).
/// MLX's CPU backend builds it from five separate ops.
pub fn rms_norm(isa: Isa, x: &[f32], weight: Option<&[f32]>, dims: usize, eps: f32, out: &mut [f32]) {
    assert!(dims > 0 && x.len().is_multiple_of(dims) && x.len() == out.len(), "rms_norm: x and out must be whole rows of {dims}");
    assert!(weight.is_none_or(|w| w.len() == dims), "rms_norm: weight must hold {dims} values");
    assert!(Isa::available().contains(&isa), "{isa:?} does not run here");
    let rows = x.len() / dims;
    let dst = SharedOut(out.as_mut_ptr());
    parallel_for(rows.div_ceil(NORM_ROWS), |c| {
        for r in c * NORM_ROWS..((c + 1) * NORM_ROWS).min(rows) {
            // SAFETY: row r of `out`, one chunk of rows per task.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * dims), dims) };
            let xr = &x[r * dims..(r + 1) * dims];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` runs on this CPU (checked above).
                Isa::Avx512 => unsafe { rms_norm_avx512(xr, weight, eps, o) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe { rms_norm_avx2(xr, weight, eps, o) },
                _ => rms_norm_body(xr, weight, eps, o),
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn rms_norm_avx512(x: &[f32], w: Option<&[f32]>, eps: f32, o: &mut [f32]) {
    rms_norm_body(x, w, eps, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_avx2(x: &[f32], w: Option<&[f32]>, eps: f32, o: &mut [f32]) {
    rms_norm_body(x, w, eps, o)
}

#[inline(always)]
fn rms_norm_body(x: &[f32], w: Option<&[f32]>, eps: f32, o: &mut [f32]) {
    // Eight partial sums: a vectorizable reduction, as MLX's own is.
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let sum = acc.iter().sum::<f32>() + tail;
    let r = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    match w {
        Some(w) => {
            for ((o, &v), &w) in o.iter_mut().zip(x).zip(w) {
                *o = (v * r) * w;
            }
        }
        None => {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v * r;
            }
        }
    }
}

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

//! Rotary position embedding (what `mx.fast.rope` computes), in one pass.
//! On its CPU backend MLX builds rope from about fifteen separate ops
//! (positions, frequencies, sines, cosines, slices, products, a concatenate),
//! ~250 us a call at decode: two calls per layer were a third of a
//! SmolLM2 decode step.

use super::attention::View;
use super::{parallel_for, Isa, SharedOut};

/// Positions per task: their sines and cosines are computed once and used
/// for every head.
const POSITIONS: usize = 16;

/// What to rotate and how.
pub struct Rope<'a> {
    /// Leading features rotated (even, at most the head size); the rest are
    /// copied.
    pub dims: usize,
    /// Rotate consecutive pairs (GPT-J style) rather than the two halves.
    pub traditional: bool,
    /// `dims / 2` angular frequencies: `base^(-2i/dims)`, or `1 / freqs[i]`.
    pub inv_freq: &'a [f32],
    /// Positions are multiplied by this.
    pub scale: f32,
    /// Position of each batch row's first query: one for all, or one per row.
    pub offsets: &'a [i32],
}

/// The default frequencies for `base`, as MLX's own rope computes them:
/// `exp(-i * ln(base) / (dims / 2))` in float32.
pub fn inv_freq(dims: usize, base: f32) -> Vec<f32> {
    let half = dims / 2;
    let step = base.ln() / half as f32;
    (0..half).map(|i| (-(i as f32) * step).exp()).collect()
}

/// Rotates `x` (`[B, H, L, D]`, any non-negative strides with the last one
/// 1) into `out` (`[B, H, L, D]`, contiguous).
pub fn rope(isa: Isa, x: View, r: &Rope, out: &mut [f32]) -> Result<(), String> {
    let [b, h, l, d] = x.shape;
    if !r.dims.is_multiple_of(2) || r.dims > d || r.inv_freq.len() != r.dims / 2 {
        return Err(format!("rope: dims {} must be even, at most the head size {d}, with dims/2 frequencies", r.dims));
    }
    if r.offsets.len() != 1 && r.offsets.len() != b {
        return Err(format!("rope: {} offsets for a batch of {b}", r.offsets.len()));
    }
    if d > 1 && x.strides[3] != 1 {
        return Err("rope: the last dimension must be contiguous".into());
    }
    if out.len() != b * h * l * d {
        return Err("rope: output size".into());
    }
    if !Isa::available().contains(&isa) {
        return Err(format!("{isa:?} does not run here"));
    }
    if out.is_empty() {
        return Ok(());
    }
    let chunks = l.div_ceil(POSITIONS);
    let dst = SharedOut(out.as_mut_ptr());
    parallel_for(b * chunks, |task| {
        let (bi, c) = (task / chunks, task % chunks);
        let (l0, l1) = (c * POSITIONS, ((c + 1) * POSITIONS).min(l));
        let offset = r.offsets[if r.offsets.len() == 1 { 0 } else { bi }];
        let half = r.dims / 2;
        // cos, sin for each position of this chunk and each frequency.
        let mut table = vec![0f32; (l1 - l0) * half * 2];
        for (p, row) in (l0..l1).zip(table.chunks_exact_mut(half * 2)) {
            let pos = (p as f32 + offset as f32) * r.scale;
            let (cos, sin) = row.split_at_mut(half);
            for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(r.inv_freq) {
                let (sv, cv) = (pos * f).sin_cos();
                *c = cv;
                *s = sv;
            }
        }
        for hi in 0..h {
            for (p, cs) in (l0..l1).zip(table.chunks_exact(half * 2)) {
                let src = bi * x.strides[0] + hi * x.strides[1] + p * x.strides[2];
                let src = &x.data[src..src + d];
                let o = ((bi * h + hi) * l + p) * d;
                // SAFETY: row (bi, hi, p) of `out`; each task owns its (bi, positions) rows.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.at(o), d) };
                let (cos, sin) = cs.split_at(half);
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `isa` runs on this CPU (checked above).
                    Isa::Avx512 => unsafe { rotate_avx512(src, cos, sin, r.dims, r.traditional, o) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Isa::Avx2 => unsafe { rotate_avx2(src, cos, sin, r.dims, r.traditional, o) },
                    _ => rotate(src, cos, sin, r.dims, r.traditional, o),
                }
            }
        }
    });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn rotate_avx512(x: &[f32], cos: &[f32], sin: &[f32], dims: usize, traditional: bool, o: &mut [f32]) {
    rotate(x, cos, sin, dims, traditional, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rotate_avx2(x: &[f32], cos: &[f32], sin: &[f32], dims: usize, traditional: bool, o: &mut [f32]) {
    rotate(x, cos, sin, dims, traditional, o)
}

/// One row: MLX's arithmetic (`x1*cos - x2*sin`, `x1*sin + x2*cos`, no
/// fused multiply-adds), so the result is its to the rounding of sin/cos.
#[inline(always)]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], dims: usize, traditional: bool, o: &mut [f32]) {
    let half = dims / 2;
    if traditional {
        for i in 0..half {
            let (x1, x2) = (x[2 * i], x[2 * i + 1]);
            o[2 * i] = x1 * cos[i] - x2 * sin[i];
            o[2 * i + 1] = x1 * sin[i] + x2 * cos[i];
        }
    } else {
        let (a, rest) = o.split_at_mut(half);
        let b = &mut rest[..half];
        let (x1, x2) = (&x[..half], &x[half..dims]);
        for i in 0..half {
            a[i] = x1[i] * cos[i] - x2[i] * sin[i];
            b[i] = x1[i] * sin[i] + x2[i] * cos[i];
        }
    }
    o[dims..].copy_from_slice(&x[dims..]);
}

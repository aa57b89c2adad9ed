//! Fused scaled-dot-product attention for the CPU backend.
//!
//! MLX's CPU attention materializes the scores and runs a scalar `exp` over
//! them: at 4k tokens of context the softmax costs several times both
//! matmuls together. Here each work item is one key/value head and a block
//! of queries of every query head that shares it (GQA without repeating K or
//! V); it walks the keys in blocks of [`BK`] with an online softmax (running
//! max and sum, the output rescaled as the max grows), so scores never leave
//! the cache, and the `exp` is a polynomial the compiler vectorizes. Causal
//! attention skips the key blocks no query of the item can see. Items run
//! on the kernel thread pool.
//!
//! Semantics are MLX's `mx.fast.scaled_dot_product_attention`: queries
//! `[B, Hq, L, D]`, keys `[B, Hkv, S, D]`, values `[B, Hkv, S, Dv]`; a causal
//! mask lines the last query up with the last key (query `i` sees keys
//! `j <= i + S - L`); an additive mask broadcasts to `[B, Hq, L, S]`.

// Kernels index several arrays with one loop variable.
#![allow(clippy::needless_range_loop)]

use super::{parallel_for, Isa, SharedOut};

/// Keys per block.
pub const BK: usize = 64;
/// Queries per work item (per query head).
pub const BQ: usize = 64;
/// The largest head size (queries, keys, values) the kernel takes.
pub const MAX_HEAD: usize = 256;

/// A strided 4-D view of f32 values: strides in elements; broadcast
/// dimensions have size 1 (or stride 0).
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub shape: [usize; 4],
    pub strides: [usize; 4],
}

impl<'a> View<'a> {
    /// A contiguous row-major view.
    pub fn contiguous(data: &'a [f32], shape: [usize; 4]) -> View<'a> {
        let strides = [shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1];
        View { data, shape, strides }
    }

    fn check(&self, what: &str) -> Result<(), String> {
        if self.shape.contains(&0) {
            return Ok(());
        }
        let last: usize = (0..4).map(|i| (self.shape[i] - 1) * self.strides[i]).sum();
        if last >= self.data.len() {
            return Err(format!(
                "{what}: a view of shape {:?} and strides {:?} overruns its {} values",
                self.shape,
                self.strides,
                self.data.len()
            ));
        }
        Ok(())
    }

    #[inline(always)]
    fn offset(&self, a: usize, b: usize, c: usize) -> usize {
        a * self.strides[0] + b * self.strides[1] + c * self.strides[2]
    }
}

/// Which keys each query sees.
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    None,
    Causal,
    /// Added to the scores; broadcasts to `[B, Hq, L, S]` (size-1 dimensions).
    Additive(View<'a>),
}

/// `out` (`[B, Hq, L, Dv]`, contiguous) = softmax(scale * q k^T + mask) v.
pub fn attention(isa: Isa, q: View, k: View, v: View, scale: f32, mask: Mask, out: &mut [f32]) -> Result<(), String> {
    attention_into(isa, q, k, v, scale, mask, out, false)
}

/// [`attention`], with `out` laid out `[B, L, Hq, Dv]` when `blhd` (what
/// the output projection reads: no transpose and copy after).
#[allow(clippy::too_many_arguments)]
pub fn attention_into(
    isa: Isa,
    q: View,
    k: View,
    v: View,
    scale: f32,
    mask: Mask,
    out: &mut [f32],
    blhd: bool,
) -> Result<(), String> {
    let [b, hq, l, d] = q.shape;
    let [kb, hkv, s, kd] = k.shape;
    let [vb, vh, vs, dv] = v.shape;
    if kb != b || vb != b || vh != hkv || vs != s || kd != d {
        return Err(format!("attention shapes do not agree: q {:?}, k {:?}, v {:?}", q.shape, k.shape, v.shape));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!("{hq} query heads do not share {hkv} key/value heads evenly"));
    }
    if d > MAX_HEAD || dv > MAX_HEAD {
        return Err(format!("head size {} is over {MAX_HEAD}", d.max(dv)));
    }
    if q.strides[3] != 1 || k.strides[3] != 1 || v.strides[3] != 1 {
        return Err("the last dimension of q, k and v must be contiguous".into());
    }
    if out.len() != b * hq * l * dv {
        return Err(format!("output holds {} values, not {}", out.len(), b * hq * l * dv));
    }
    q.check("queries")?;
    k.check("keys")?;
    v.check("values")?;
    if let Mask::Additive(m) = mask {
        for (i, (&ms, want)) in m.shape.iter().zip([b, hq, l, s]).enumerate() {
            if ms != 1 && ms != want {
                return Err(format!("mask dimension {i} is {ms}; it must be 1 or {want}"));
            }
        }
        m.check("mask")?;
    }
    if matches!(mask, Mask::Causal) && s < l {
        return Err(format!("a causal mask needs at least as many keys ({s}) as queries ({l})"));
    }
    if !Isa::available().contains(&isa) {
        return Err(format!("{isa:?} does not run here"));
    }
    if out.is_empty() {
        return Ok(());
    }
    let g = hq / hkv;
    let qblocks = l.div_ceil(BQ);
    // With several query blocks, the keys are transposed once per call, a
    // block of BK at a time (`[b][h][block][c * BK + j]`, zero-padded to DP
    // columns and BK keys), for every query block to share (each used to
    // transpose its own copy: 2k-token prefill attention 182 -> 201
    // GFLOP/s). One query block (decode) transposes as it goes: a separate
    // pass over the keys cost it 20%.
    let dp = padded_head(d, dv);
    let kblocks = if qblocks > 1 { s.div_ceil(BK) } else { 0 };
    thread_local! {
        static KT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    KT.with_borrow_mut(|kt| {
        let need = b * hkv * kblocks * dp * BK;
        if kt.len() < need {
            *kt = vec![0f32; need];
        }
        let dst = SharedOut(kt.as_mut_ptr());
        parallel_for(b * hkv * kblocks, |item| {
            let (bh, blk) = (item / kblocks, item % kblocks);
            // SAFETY: block `item` of kt (dp * BK values), this item's alone.
            let t = unsafe { std::slice::from_raw_parts_mut(dst.at(item * dp * BK), dp * BK) };
            t.fill(0.0);
            for j in 0..BK.min(s - blk * BK) {
                let src = &k.data[k.offset(bh / hkv, bh % hkv, blk * BK + j)..][..d];
                for (c, x) in src.iter().enumerate() {
                    t[c * BK + j] = *x;
                }
            }
        });
        let job = Job { q, k, v, scale, mask, g, out: SharedOut(out.as_mut_ptr()), blhd, kt: &kt[..need], kblocks };
        parallel_for(b * hkv * qblocks, |item| {
            let (bi, rest) = (item / (hkv * qblocks), item % (hkv * qblocks));
            let (h, qb) = (rest / qblocks, rest % qblocks);
            job.run(isa, bi, h, qb * BQ, ((qb + 1) * BQ).min(l), d, dv);
        });
    });
    Ok(())
}

/// The head size the loops are compiled for: `d` and `dv` rounded up to a
/// multiple of 32 (at most [`MAX_HEAD`]).
fn padded_head(d: usize, dv: usize) -> usize {
    d.max(dv).div_ceil(32) * 32
}

struct Job<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    scale: f32,
    mask: Mask<'a>,
    g: usize,
    out: SharedOut,
    /// `out` is `[B, L, Hq, Dv]` rather than `[B, Hq, L, Dv]`.
    blhd: bool,
    /// The keys transposed, by block (see `attention_into`), or empty.
    kt: &'a [f32],
    kblocks: usize,
}

// SAFETY: the views are shared reads; `out` is written at disjoint rows per
// item (see `item`).
unsafe impl Sync for Job<'_> {}

impl Job<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run(&self, isa: Isa, b: usize, h: usize, q0: usize, q1: usize, d: usize, dv: usize) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was checked to run on this CPU.
            Isa::Avx512 => unsafe { self.run_avx512(b, h, q0, q1, d, dv) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { self.run_avx2(b, h, q0, q1, d, dv) },
            // aarch64's baseline has FMA; a pre-AVX2 x86 gets separate ops.
            _ => self.run_sized::<{ cfg!(target_arch = "aarch64") }, false>(b, h, q0, q1, d, dv),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn run_avx512(&self, b: usize, h: usize, q0: usize, q1: usize, d: usize, dv: usize) {
        self.run_sized::<true, true>(b, h, q0, q1, d, dv)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, b: usize, h: usize, q0: usize, q1: usize, d: usize, dv: usize) {
        self.run_sized::<true, false>(b, h, q0, q1, d, dv)
    }

    /// The loops are compiled for head sizes in steps of 32 up to
    /// [`MAX_HEAD`]; a head size in between is zero-padded to the next.
    /// `F`: multiply-adds fused (where the instruction set has them); `W`:
    /// the AVX-512 micro-kernels.
    #[inline(always)]
    fn run_sized<const F: bool, const W: bool>(&self, b: usize, h: usize, q0: usize, q1: usize, d: usize, dv: usize) {
        match padded_head(d, dv) {
            32 => self.item::<F, W, 32>(b, h, q0, q1, d, dv),
            64 => self.item::<F, W, 64>(b, h, q0, q1, d, dv),
            96 => self.item::<F, W, 96>(b, h, q0, q1, d, dv),
            128 => self.item::<F, W, 128>(b, h, q0, q1, d, dv),
            160 => self.item::<F, W, 160>(b, h, q0, q1, d, dv),
            192 => self.item::<F, W, 192>(b, h, q0, q1, d, dv),
            224 => self.item::<F, W, 224>(b, h, q0, q1, d, dv),
            _ => self.item::<F, W, 256>(b, h, q0, q1, d, dv),
        }
    }

    /// Queries `q0..q1` of every query head sharing key/value head `h` of
    /// batch row `b`, with head sizes padded to `DP`. Rows (query head,
    /// query) go through the key blocks four at a time: a 4 x BK tile of
    /// scores and a 4 x DP tile of output stay in registers while a key
    /// block (transposed) or value block streams past — a GEMM-shaped loop
    /// rather than dot products.
    #[inline(always)]
    fn item<const F: bool, const W: bool, const DP: usize>(&self, b: usize, h: usize, q0: usize, q1: usize, d: usize, dv: usize) {
        let (l, s) = (self.q.shape[2], self.k.shape[2]);
        let hq = self.q.shape[1];
        let nq = q1 - q0;
        let rows = self.g * nq;
        let padded = rows.div_ceil(4) * 4;
        // Value rows as they lie when they are DP wide and one after the
        // other (a cache's [B, H, S, D] buffer): no copy into vb.
        let v_in_place = dv == DP && self.v.strides[2] == DP;
        let mut vb = if v_in_place { Vec::new() } else { vec![0f32; BK * DP] };
        let mut own_kt = if self.kt.is_empty() { vec![0f32; DP * BK] } else { Vec::new() };
        let mut o = vec![0f32; padded * DP];
        let mut m = vec![f32::NEG_INFINITY; padded];
        let mut den = vec![0f32; padded];
        // Queries pre-scaled, contiguous, zero-padded to DP columns and to a
        // multiple of four rows.
        let mut qs = vec![0f32; padded * DP];
        for gi in 0..self.g {
            for qi in 0..nq {
                let src = &self.q.data[self.q.offset(b, h * self.g + gi, q0 + qi)..][..d];
                for (dst, x) in qs[(gi * nq + qi) * DP..][..d].iter_mut().zip(src) {
                    *dst = x * self.scale;
                }
            }
        }
        let causal = matches!(self.mask, Mask::Causal);
        // Keys past the last one any query here may see are skipped.
        let key_end = if causal { (q1 + s - l).min(s) } else { s };
        let mut j0 = 0;
        while j0 < key_end {
            let bk = BK.min(key_end - j0);
            // kt[c * BK + j] = k[j0 + j][c] (transposed up front);
            // vb[j * DP + c] = v[j0 + j][c], zero past bk (padding columns
            // stay zero from the start).
            let shared = !self.kt.is_empty();
            for j in 0..BK {
                if j < bk {
                    if !shared {
                        let src = &self.k.data[self.k.offset(b, h, j0 + j)..][..d];
                        for (c, x) in src.iter().enumerate() {
                            own_kt[c * BK + j] = *x;
                        }
                    }
                    if !v_in_place {
                        vb[j * DP..][..dv].copy_from_slice(&self.v.data[self.v.offset(b, h, j0 + j)..][..dv]);
                    }
                } else {
                    if !shared {
                        for c in 0..d {
                            own_kt[c * BK + j] = 0.0;
                        }
                    }
                    if !v_in_place {
                        vb[j * DP..][..dv].fill(0.0);
                    }
                }
            }
            let vb: &[f32] = if v_in_place { &self.v.data[self.v.offset(b, h, j0)..][..bk * DP] } else { &vb };
            let hkv = self.k.shape[1];
            let kt = if shared { &self.kt[((b * hkv + h) * self.kblocks + j0 / BK) * DP * BK..][..DP * BK] } else { &own_kt[..] };
            for r0 in (0..padded).step_by(4) {
                let mut sc = [[0f32; BK]; 4];
                // Scores: 4 rows x BK keys.
                #[cfg(target_arch = "x86_64")]
                if W {
                    // SAFETY: W is only set where AVX-512 runs (run_avx512);
                    // qs has four rows of DP from r0, kt DP rows of BK.
                    unsafe { x86::scores4::<DP>(&qs[r0 * DP..][..4 * DP], kt, &mut sc) };
                }
                for c in 0..DP {
                    if W && cfg!(target_arch = "x86_64") {
                        break;
                    }
                    let kc: &[f32; BK] = kt[c * BK..][..BK].try_into().unwrap();
                    for (r, row) in sc.iter_mut().enumerate() {
                        let x = qs[(r0 + r) * DP + c];
                        for j in 0..BK {
                            row[j] = madd::<F>(x, kc[j], row[j]);
                        }
                    }
                }
                let mut corr = [1f32; 4];
                for (r, row) in sc.iter_mut().enumerate() {
                    let rr = r0 + r;
                    if rr >= rows {
                        row.fill(0.0);
                        continue;
                    }
                    let (gi, qi) = (rr / nq, rr % nq);
                    // Masking: padding, causality, the additive mask.
                    let visible = if causal { (q0 + qi + s - l + 1).saturating_sub(j0).min(bk) } else { bk };
                    for x in row[visible..].iter_mut() {
                        *x = f32::NEG_INFINITY;
                    }
                    if let Mask::Additive(mv) = self.mask {
                        let ix = |dim: usize, i: usize| if mv.shape[dim] == 1 { 0 } else { i * mv.strides[dim] };
                        let base = ix(0, b) + ix(1, h * self.g + gi) + ix(2, q0 + qi);
                        for (j, x) in row[..visible].iter_mut().enumerate() {
                            *x += mv.data[base + ix(3, j0 + j)];
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: W is only set where AVX-512 runs (run_avx512).
                    let row_max = if W { unsafe { x86::row_max(row) } } else { lanes_max(row) };
                    #[cfg(not(target_arch = "x86_64"))]
                    let row_max = lanes_max(row);
                    let mnew = m[rr].max(row_max);
                    if mnew == f32::NEG_INFINITY {
                        row.fill(0.0); // nothing visible yet
                        continue;
                    }
                    // (A max that did not move needs no rescaling: skip
                    // the scalar polynomial, exactly 1 anyway.)
                    corr[r] = if mnew == m[rr] { 1.0 } else { exp(m[rr] - mnew) };
                    m[rr] = mnew;
                    #[cfg(target_arch = "x86_64")]
                    if W {
                        // SAFETY: as above.
                        den[rr] = den[rr] * corr[r] + unsafe { x86::exp_row(row, mnew) };
                        continue;
                    }
                    for x in row.iter_mut() {
                        *x = exp(*x - mnew);
                    }
                    den[rr] = den[rr] * corr[r] + lanes_sum(row);
                }
                // Output: 4 rows x DP, rescaled, plus P (4 x BK) times the value block.
                #[cfg(target_arch = "x86_64")]
                if W {
                    // SAFETY: as for scores4: four rows of DP in o from r0,
                    // bk rows of DP in vb.
                    unsafe { x86::accumulate4::<DP>(&mut o[r0 * DP..][..4 * DP], corr, &sc, vb, bk) };
                    continue;
                }
                let mut acc = [[0f32; DP]; 4];
                for (r, a) in acc.iter_mut().enumerate() {
                    for (x, y) in a.iter_mut().zip(&o[(r0 + r) * DP..][..DP]) {
                        *x = y * corr[r];
                    }
                }
                for j in 0..bk {
                    let vr: &[f32; DP] = vb[j * DP..][..DP].try_into().unwrap();
                    for (r, a) in acc.iter_mut().enumerate() {
                        let p = sc[r][j];
                        for c in 0..DP {
                            a[c] = madd::<F>(p, vr[c], a[c]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    o[(r0 + r) * DP..][..DP].copy_from_slice(a);
                }
            }
            j0 += BK;
        }
        for gi in 0..self.g {
            for qi in 0..nq {
                let row = gi * nq + qi;
                let inv = if den[row] > 0.0 { 1.0 / den[row] } else { 0.0 };
                let head = h * self.g + gi;
                let at = if self.blhd { ((b * l + q0 + qi) * hq + head) * dv } else { ((b * hq + head) * l + q0 + qi) * dv };
                for c in 0..dv {
                    // SAFETY: row (b, head, q0 + qi) of `out` ([B, Hq, L, Dv]),
                    // written by this item only: items own distinct (b, h,
                    // query block) and so distinct (b, head, query) rows.
                    unsafe { *self.out.0.add(at + c) = o[row * DP + c] * inv };
                }
            }
        }
    }
}

/// `a * b + c`, fused when `F`.
#[inline(always)]
fn madd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Sum and max of a block in 16 lanes (a reduction the compiler may
/// vectorize without reordering a single chain of float adds).
#[inline(always)]
fn lanes_sum(x: &[f32; BK]) -> f32 {
    let mut acc = [0f32; 16];
    for c in x.chunks_exact(16) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum()
}

#[inline(always)]
fn lanes_max(x: &[f32; BK]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    for c in x.chunks_exact(16) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.max(*v);
        }
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v))
}

/// `e^x` for `x <= 0` (scores minus their running max), to about 2 ulp; 0
/// below -87 (and for -inf). Branch-free so loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.max(-87.0);
    let n = (xc * LOG2E).round();
    // Cody-Waite: r = x - n ln2 in two steps keeps r exact enough.
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // e^r on [-ln2/2, ln2/2]: Taylor to r^6.
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// The AVX-512 micro-kernels: accumulators as named vector registers (the
/// compiler does not keep the portable loops' arrays in registers).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BK;
    use std::arch::x86_64::*;

    /// The largest of a block of scores.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn row_max(row: &[f32; BK]) -> f32 {
        let p = row.as_ptr();
        // SAFETY: four vectors of 16 in a row of BK = 64.
        unsafe {
            let a = _mm512_max_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let b = _mm512_max_ps(_mm512_loadu_ps(p.add(32)), _mm512_loadu_ps(p.add(48)));
            _mm512_reduce_max_ps(_mm512_max_ps(a, b))
        }
    }

    /// `row[j] = e^(row[j] - max)`, returning their sum: [`super::exp`]
    /// sixteen lanes at a time (the portable loop compiled to scalar code:
    /// `f32::max` and the float-to-int conversion kept LLVM from
    /// vectorizing it), with `vscalefps` for the power of two.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_row(row: &mut [f32; BK], max: f32) -> f32 {
        let p = row.as_mut_ptr();
        let mut sum = _mm512_setzero_ps();
        for i in 0..BK / 16 {
            // SAFETY: vector i of a row of BK = 64.
            unsafe {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(16 * i)), _mm512_set1_ps(max)));
                _mm512_storeu_ps(p.add(16 * i), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        _mm512_reduce_add_ps(sum)
    }

    /// [`super::exp`] in 16 lanes: the same reduction and polynomial.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        let xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            xc,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut poly = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c));
        }
        let e = _mm512_scalef_ps(poly, n);
        // Below -87 (and -inf): 0.
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0)), e)
    }

    /// `sc[r][j] = sum_c q[r * DP + c] * kt[c * BK + j]` for four rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores4<const DP: usize>(q: &[f32], kt: &[f32], sc: &mut [[f32; BK]; 4]) {
        assert!(q.len() >= 4 * DP && kt.len() >= DP * BK);
        let mut a = [[_mm512_setzero_ps(); 4]; 4];
        for c in 0..DP {
            // SAFETY: row c of kt has BK = 64 values (checked above).
            let k = unsafe {
                let p = kt.as_ptr().add(c * BK);
                [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p.add(32)), _mm512_loadu_ps(p.add(48))]
            };
            for (r, ar) in a.iter_mut().enumerate() {
                let x = _mm512_set1_ps(q[r * DP + c]);
                for (acc, kv) in ar.iter_mut().zip(k) {
                    *acc = _mm512_fmadd_ps(x, kv, *acc);
                }
            }
        }
        for (row, ar) in sc.iter_mut().zip(a) {
            for (i, v) in ar.into_iter().enumerate() {
                // SAFETY: 16 values at 16 * i < BK in a row of BK.
                unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(16 * i), v) };
            }
        }
    }

    /// `o[r] = o[r] * corr[r] + sum_j p[r][j] * vb[j]` for four rows of DP.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate4<const DP: usize>(o: &mut [f32], corr: [f32; 4], p: &[[f32; BK]; 4], vb: &[f32], bk: usize) {
        assert!(o.len() >= 4 * DP && vb.len() >= bk * DP && bk <= BK && DP.is_multiple_of(16));
        // Up to 256 columns: 16 vectors a row; unused ones are never touched.
        let n = DP / 16;
        // All four rows at once up to 64 columns (16 accumulators: each
        // value vector loaded once for four rows), else two rows at a time,
        // which keeps the accumulators in registers up to 256.
        let per = if DP <= 64 { 4 } else { 2 };
        for pass in 0..4 / per {
            let mut a = [[_mm512_setzero_ps(); 16]; 4];
            for (r, ar) in a.iter_mut().enumerate().take(per) {
                let row = per * pass + r;
                let c = _mm512_set1_ps(corr[row]);
                for (i, acc) in ar.iter_mut().enumerate().take(n) {
                    // SAFETY: 16 values of row `row` of o (4 x DP, checked).
                    *acc = unsafe { _mm512_mul_ps(_mm512_loadu_ps(o.as_ptr().add(row * DP + 16 * i)), c) };
                }
            }
            for j in 0..bk {
                for i in 0..n {
                    // SAFETY: 16 values of row j of vb (bk x DP, checked).
                    let v = unsafe { _mm512_loadu_ps(vb.as_ptr().add(j * DP + 16 * i)) };
                    for r in 0..per {
                        a[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(p[per * pass + r][j]), v, a[r][i]);
                    }
                }
            }
            for (r, ar) in a.iter().enumerate().take(per) {
                let row = per * pass + r;
                for (i, acc) in ar.iter().enumerate().take(n) {
                    // SAFETY: as above.
                    unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(row * DP + 16 * i), *acc) };
                }
            }
        }
    }
}

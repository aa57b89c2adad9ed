//! Matrix products on quantized weights that stay quantized.
//!
//! The weights come in MLX's affine layout (`w = scale * q + bias` per group
//! of `group_size` columns, `q` packed little-end-first into `uint32` words):
//! what `mx.quantize` makes, what MLX-quantized models ship and what GGUF
//! Q4_0 / Q4_1 / Q8_0 tensors load into. [`QuantMatrix::from_mlx`] repacks
//! them once into blocks of 32 columns, each with its own scale and bias (a
//! group of 64 or 128 columns gives its scale to each of its blocks):
//!
//! - 4-bit: 16 bytes per block, byte `i` holding column `i` in its low nibble
//!   and column `16 + i` in its high one, so one 16-byte load and two masks
//!   give the block's 32 values in column order;
//! - 8-bit: 32 signed bytes `q - 128` per block (the bias absorbs the 128).
//!
//! Two ways to multiply, chosen by the number of input rows:
//!
//! - few rows (decode: one per running sequence): each block's 32 weights
//!   are dequantized in registers (`scale * q + bias`; 4-bit values looked
//!   up in a 16-entry table of those) and multiplied into up to eight input
//!   rows at a time (four with AVX2), so weights are read once per eight
//!   rows and the products are the float32 model's to rounding. Columns go
//!   in tiles that keep those input rows in L1.
//!   (`Path::Integer` instead quantizes the activations to 8 bits per block,
//!   as llama.cpp does, for integer dot products — `maddubs` on AVX2,
//!   `vpdpbusd` with AVX-512 VNNI: ~12% faster, less exact.)
//! - many rows (prefill): tiles of the weights are dequantized to f32 and
//!   multiplied by the BLAS sgemm (OpenBLAS), so the product is the f32
//!   model's to rounding.

// Kernels index several arrays with one loop variable.
#![allow(clippy::needless_range_loop)]

use super::{parallel_for, Isa, SharedOut};

/// Columns per block.
pub const BLOCK: usize = 32;

/// Input rows up to which the integer path is used; above it, dequantized
/// tiles through sgemm.
pub const SMALL_N: usize = 8;

/// Input rows the float few-rows kernels take per pass over the weights
/// (the integer ones take up to 4).
const ROWS: usize = 8;

/// Floats of dequantized weights one sgemm of the many-rows path takes.
const SGEMM_TILE_FLOATS: usize = 4 << 20;

/// Bytes of input rows a column tile of the few-rows products holds.
const TILE_BYTES: usize = 32 << 10;

/// A quantized weight matrix (`rows` outputs by `cols` inputs), repacked.
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    bits: u32,
    /// Packed values: `rows * blocks * block_bytes`.
    q: Vec<u8>,
    /// Per block: scale, bias.
    sb: Scales,
}

/// The blocks' scales and biases: half precision when every one of them is
/// exactly a half (GGUF's are; MLX's bfloat16 ones nearly always), which
/// cuts a 4-bit block from 24 bytes to 20 — decode reads every byte of
/// the weights per token — else float32.
enum Scales {
    F16(Vec<Half>),
    F32(Vec<f32>),
    /// A scale per block and a bias that is `offset * scale` in every block:
    /// GGUF Q4_0 (bias -8 scales) and Q8_0 (bias 0 once the 128 is folded
    /// in), whose blocks then take 18 and 34 bytes as in llama.cpp.
    Symmetric(Vec<Half>, f32),
}

/// How a row's block parameters lie in memory (vector kernels load 16
/// blocks' worth at once).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// (scale, bias) pairs of halves.
    PairsHalf,
    /// (scale, bias) pairs of floats.
    PairsF32,
    /// One half scale a block; the bias is `offset() * scale`.
    Symmetric,
}

/// A weight row's block parameters as the kernels read them.
pub trait Params: Copy + Send + Sync {
    const LAYOUT: Layout;
    /// Blocks held.
    fn blocks(self) -> usize;
    /// The first block's parameters, laid out as `LAYOUT` says.
    fn base(self) -> *const u8;
    /// The bias per unit of scale ([`Layout::Symmetric`]; else 0).
    fn offset(self) -> f32;
    /// Blocks `b0..b1` alone.
    fn range(self, b0: usize, b1: usize) -> Self;
    /// Block `b`'s scale and bias.
    ///
    /// # Safety
    /// `b < self.blocks()`.
    unsafe fn sm(self, b: usize) -> (f32, f32);

    /// [`Params::sm`] with halves converted by F16C: only for kernels
    /// compiled with it (the x86 ones; `Isa::Avx2` requires it).
    ///
    /// # Safety
    /// As `sm`, and the CPU has F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn sm_x86(self, b: usize) -> (f32, f32);
}

/// (scale, bias) pairs.
#[derive(Clone, Copy)]
pub struct Pairs<'a, S>(&'a [S]);

impl<S: Scale> Params for Pairs<'_, S> {
    const LAYOUT: Layout = if S::HALF { Layout::PairsHalf } else { Layout::PairsF32 };
    #[inline(always)]
    fn blocks(self) -> usize {
        self.0.len() / 2
    }
    #[inline(always)]
    fn base(self) -> *const u8 {
        self.0.as_ptr() as *const u8
    }
    #[inline(always)]
    fn offset(self) -> f32 {
        0.0
    }
    #[inline(always)]
    fn range(self, b0: usize, b1: usize) -> Self {
        Pairs(&self.0[2 * b0..2 * b1])
    }
    #[inline(always)]
    unsafe fn sm(self, b: usize) -> (f32, f32) {
        // SAFETY: b < blocks, so 2b + 1 < len (the caller's promise).
        unsafe { (self.0.get_unchecked(2 * b).f(), self.0.get_unchecked(2 * b + 1).f()) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sm_x86(self, b: usize) -> (f32, f32) {
        // SAFETY: as in `sm`; F16C is the caller's promise.
        unsafe { (self.0.get_unchecked(2 * b).f_x86(), self.0.get_unchecked(2 * b + 1).f_x86()) }
    }
}

/// Scales, with the bias a fixed multiple of each.
#[derive(Clone, Copy)]
pub struct Symmetric<'a>(&'a [Half], f32);

impl Params for Symmetric<'_> {
    const LAYOUT: Layout = Layout::Symmetric;
    #[inline(always)]
    fn blocks(self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn base(self) -> *const u8 {
        self.0.as_ptr() as *const u8
    }
    #[inline(always)]
    fn offset(self) -> f32 {
        self.1
    }
    #[inline(always)]
    fn range(self, b0: usize, b1: usize) -> Self {
        Symmetric(&self.0[b0..b1], self.1)
    }
    #[inline(always)]
    unsafe fn sm(self, b: usize) -> (f32, f32) {
        // SAFETY: b < blocks (the caller's promise).
        let s = unsafe { self.0.get_unchecked(b).f() };
        (s, self.1 * s)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sm_x86(self, b: usize) -> (f32, f32) {
        // SAFETY: as in `sm`; F16C is the caller's promise.
        let s = unsafe { self.0.get_unchecked(b).f_x86() };
        (s, self.1 * s)
    }
}

/// A scale as stored.
pub trait Scale: Copy + Send + Sync + 'static {
    /// Stored as a half (else as an f32).
    const HALF: bool;
    fn f(self) -> f32;
    /// `f`, in kernels compiled with F16C (exactly the same value).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn f_x86(self) -> f32 {
        self.f()
    }
}

impl Scale for f32 {
    const HALF: bool = false;
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}

/// An IEEE half, as bits.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Half(pub u16);

impl Scale for Half {
    const HALF: bool = true;
    /// Exact for finite halves, subnormals included: the half's exponent
    /// and mantissa shifted into a float's, rescaled by 2^112.
    #[inline(always)]
    fn f(self) -> f32 {
        let magnitude = f32::from_bits(((self.0 & 0x7fff) as u32) << 13) * f32::from_bits(0x7780_0000);
        f32::from_bits(magnitude.to_bits() | (((self.0 & 0x8000) as u32) << 16))
    }
    /// One `vcvtph2ps` (exact for every half, as `f` is).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn f_x86(self) -> f32 {
        use std::arch::x86_64::{_mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32};
        // SAFETY: called only from kernels compiled with F16C, which run on
        // CPUs that have it (Isa::available).
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(self.0 as i32))) }
    }
}

impl Half {
    /// `v` as a half, when it is exactly one.
    pub fn exact(v: f32) -> Option<Half> {
        let bits = v.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let a = v.abs();
        let h = if a == 0.0 {
            sign
        } else if (6.103_515_6e-5..=65504.0).contains(&a) {
            // Normal: a 10-bit mantissa, the rest zero.
            let exp = ((bits >> 23) & 0xff) as u16;
            sign | ((exp - 112) << 10) | ((bits & 0x7f_ffff) >> 13) as u16
        } else if (5.960_464_5e-8..6.103_515_6e-5).contains(&a) {
            // Subnormal: a whole number of 2^-24.
            sign | (a / 5.960_464_5e-8) as u16
        } else {
            return None;
        };
        (Half(h).f() == v).then_some(Half(h))
    }
}

/// Runs `$body` with `$p` bound to row `$row`'s block parameters, whatever
/// their storage (one instantiation of the kernels per kind).
macro_rules! with_params {
    ($m:expr, $row:expr, |$p:ident| $body:expr) => {{
        let blocks = $m.cols / BLOCK;
        match &$m.sb {
            Scales::F16(v) => {
                let $p = Pairs(&v[$row * blocks * 2..($row + 1) * blocks * 2]);
                $body
            }
            Scales::F32(v) => {
                let $p = Pairs(&v[$row * blocks * 2..($row + 1) * blocks * 2]);
                $body
            }
            Scales::Symmetric(v, offset) => {
                let $p = Symmetric(&v[$row * blocks..($row + 1) * blocks], *offset);
                $body
            }
        }
    }};
}

/// [`with_params!`] for `$n` consecutive rows from `$row`, each limited to
/// the blocks in `$tile`: `$p` is an array of `$n`.
macro_rules! with_params_n {
    ($m:expr, $row:expr, $n:expr, $tile:expr, |$p:ident| $body:expr) => {{
        let blocks = $m.cols / BLOCK;
        let (b0, b1) = ($tile.start, $tile.end);
        match &$m.sb {
            Scales::F16(v) => {
                let $p: [_; $n] =
                    std::array::from_fn(|w| Pairs(&v[($row + w) * blocks * 2..($row + w + 1) * blocks * 2]).range(b0, b1));
                $body
            }
            Scales::F32(v) => {
                let $p: [_; $n] =
                    std::array::from_fn(|w| Pairs(&v[($row + w) * blocks * 2..($row + w + 1) * blocks * 2]).range(b0, b1));
                $body
            }
            Scales::Symmetric(v, offset) => {
                let $p: [_; $n] =
                    std::array::from_fn(|w| Symmetric(&v[($row + w) * blocks..($row + w + 1) * blocks], *offset).range(b0, b1));
                $body
            }
        }
    }};
}

impl QuantMatrix {
    /// Repacks MLX affine-quantized weights: `w` is `rows` by
    /// `cols * bits / 32` words, `scales` and `biases` `rows` by
    /// `cols / group_size`.
    pub fn from_mlx(
        w: &[u32],
        scales: &[f32],
        biases: &[f32],
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
    ) -> Result<QuantMatrix, String> {
        if bits != 4 && bits != 8 {
            return Err(format!("{bits}-bit weights are not supported (4 and 8 are)"));
        }
        if group_size == 0 || !group_size.is_multiple_of(BLOCK) || !cols.is_multiple_of(group_size) {
            return Err(format!("group size {group_size} does not tile {cols} columns in blocks of {BLOCK}"));
        }
        let words = cols * bits as usize / 32;
        let groups = cols / group_size;
        if w.len() != rows * words || scales.len() != rows * groups || biases.len() != rows * groups {
            return Err(format!(
                "sizes do not match {rows}x{cols} at {bits} bits, group {group_size}: {} words, {} scales, {} biases",
                w.len(),
                scales.len(),
                biases.len()
            ));
        }
        let blocks = cols / BLOCK;
        let bb = block_bytes(bits);
        let mut q = vec![0u8; rows * blocks * bb];
        let mut sb = vec![0f32; rows * blocks * 2];
        let per_word = 32 / bits as usize;
        let mask = (1u32 << bits) - 1;
        for r in 0..rows {
            let wr = &w[r * words..(r + 1) * words];
            let value = |c: usize| (wr[c / per_word] >> (bits as usize * (c % per_word))) & mask;
            for b in 0..blocks {
                let g = r * groups + b * BLOCK / group_size;
                let (s, m) = (scales[g], biases[g]);
                let dst = &mut q[(r * blocks + b) * bb..(r * blocks + b + 1) * bb];
                let c0 = b * BLOCK;
                if bits == 4 {
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = (value(c0 + i) | (value(c0 + 16 + i) << 4)) as u8;
                    }
                    sb[(r * blocks + b) * 2] = s;
                    sb[(r * blocks + b) * 2 + 1] = m;
                } else {
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = (value(c0 + i) as i32 - 128) as i8 as u8;
                    }
                    sb[(r * blocks + b) * 2] = s;
                    sb[(r * blocks + b) * 2 + 1] = m + 128.0 * s;
                }
            }
        }
        // 4-bit: bias -8 scales (Q4_0); 8-bit: bias 0 after the 128 (Q8_0).
        let offset = if bits == 4 { -8.0 } else { 0.0 };
        let symmetric: Option<Vec<Half>> =
            sb.chunks_exact(2).map(|p| if p[1] == offset * p[0] { Half::exact(p[0]) } else { None }).collect();
        let sb = match symmetric {
            Some(h) => Scales::Symmetric(h, offset),
            None => match sb.iter().map(|&v| Half::exact(v)).collect::<Option<Vec<Half>>>() {
                Some(h) => Scales::F16(h),
                None => Scales::F32(sb),
            },
        };
        Ok(QuantMatrix { rows, cols, bits, q, sb })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn bits(&self) -> u32 {
        self.bits
    }
    /// Whether scales and biases are stored as halves.
    pub fn half_scales(&self) -> bool {
        matches!(self.sb, Scales::F16(_) | Scales::Symmetric(..))
    }

    /// Whether each block stores a scale only (its bias a fixed multiple).
    pub fn symmetric(&self) -> bool {
        matches!(self.sb, Scales::Symmetric(..))
    }

    /// Bytes held (packed values, scales and biases).
    pub fn bytes(&self) -> usize {
        self.q.len()
            + match &self.sb {
                Scales::F16(v) | Scales::Symmetric(v, _) => v.len() * 2,
                Scales::F32(v) => v.len() * 4,
            }
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// Row `r` as f32 into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        with_params!(self, r, |p| self.dequantize_row_p(p, r, out))
    }

    fn dequantize_row_p<P: Params>(&self, p: P, r: usize, out: &mut [f32]) {
        let blocks = self.blocks();
        assert_eq!(p.blocks(), blocks);
        let bb = block_bytes(self.bits);
        for b in 0..blocks {
            let k = r * blocks + b;
            // SAFETY: b < blocks = p.blocks() (asserted).
            let (s, m) = unsafe { p.sm(b) };
            let src = &self.q[k * bb..(k + 1) * bb];
            let dst = &mut out[b * BLOCK..(b + 1) * BLOCK];
            if self.bits == 4 {
                for i in 0..16 {
                    dst[i] = s * (src[i] & 15) as f32 + m;
                    dst[16 + i] = s * (src[i] >> 4) as f32 + m;
                }
            } else {
                for i in 0..BLOCK {
                    dst[i] = s * (src[i] as i8) as f32 + m;
                }
            }
        }
    }

    /// `out` (`n` by `rows`) = `x` (`n` by `cols`) times this matrix
    /// transposed: what `x @ w.T` is for the dequantized weights.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(Isa::best(), x, n, out)
    }

    /// [`matmul`](Self::matmul) with the kernels compiled for `isa` (which
    /// this CPU must run).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_path(isa, x, n, out, if n <= SMALL_N { decode_path() } else { Path::Sgemm })
    }

    /// Any path, by choice (tests and benches compare them).
    pub fn matmul_path(&self, isa: Isa, x: &[f32], n: usize, out: &mut [f32], path: Path) {
        assert_eq!(x.len(), n * self.cols, "x is n by cols");
        assert_eq!(out.len(), n * self.rows, "out is n by rows");
        assert!(Isa::available().contains(&isa), "{isa:?} does not run here");
        if n == 0 || self.rows == 0 {
            return;
        }
        match path {
            Path::Float => self.matmul_rows(isa, x, n, out, None),
            Path::Integer => self.matmul_rows(isa, x, n, out, Some(&QuantActivations::new(x, n, self.cols))),
            Path::Sgemm => self.matmul_sgemm(x, n, out),
        }
    }

    /// The few-rows paths: each weight row against every input row, up to
    /// eight input rows per pass over the weights (four on the integer path
    /// and with AVX2).
    fn matmul_rows(&self, isa: Isa, x: &[f32], n: usize, out: &mut [f32], act: Option<&QuantActivations>) {
        let step = if act.is_none() && isa == Isa::Avx512 { ROWS } else { 4 };
        let chunk = (self.rows / (super::threads() * 8)).clamp(16, 256);
        let chunks = self.rows.div_ceil(chunk);
        let dst = SharedOut(out.as_mut_ptr());
        let (rows, blocks) = (self.rows, self.blocks());
        parallel_for(chunks, |c| {
            let weight_rows = c * chunk..((c + 1) * chunk).min(rows);
            let mut r = 0;
            while r < n {
                let take = (n - r).min(step);
                // Column tiles small enough that the `take` input rows stay
                // in L1 while every weight row of the chunk passes over them
                // (eight rows of a 2048-wide input are 64 KiB: read whole
                // for each weight row, they came from L2, and eight rows
                // cost four times what four did). Multiples of 16 blocks.
                let tile = match act {
                    Some(_) => blocks,
                    None => (TILE_BYTES / (take * BLOCK * 4)).max(16) / 16 * 16,
                };
                let mut b0 = 0;
                while b0 < blocks {
                    let b1 = (b0 + tile).min(blocks);
                    // Several weight rows at a time: four for one or two
                    // input rows, two for more.
                    #[allow(unused_mut)]
                    let mut o = weight_rows.start;
                    #[cfg(target_arch = "x86_64")]
                    if act.is_none() && isa == Isa::Avx512 {
                        if take <= 2 {
                            o = self.rows_f32::<4>(o..weight_rows.end, x, r, take, b0..b1, dst);
                        } else {
                            o = self.rows_f32::<2>(o..weight_rows.end, x, r, take, b0..b1, dst);
                        }
                    }
                    for o in o..weight_rows.end {
                        let mut sums = [0f32; ROWS];
                        match act {
                            Some(act) => self.row_dot(isa, o, act, r, take, &mut sums),
                            None => self.row_dot_f32(isa, o, x, r, take, b0..b1, &mut sums),
                        }
                        for (i, s) in sums[..take].iter().enumerate() {
                            // SAFETY: element (r + i, o) of `out`, which has n x
                            // rows elements; each `o` belongs to one chunk, so
                            // no two threads touch the same element.
                            unsafe {
                                let p = dst.at((r + i) * rows + o);
                                *p = if b0 == 0 { *s } else { *p + *s };
                            }
                        }
                    }
                    b0 = b1;
                }
                r += take;
            }
        });
    }

    /// Weight rows `w` (as many whole groups of W as there are) against
    /// input rows `r..r + take`, over the blocks of `tile`: sums added into
    /// `dst` (set on the first tile). Returns the first row not done.
    #[cfg(target_arch = "x86_64")]
    fn rows_f32<const W: usize>(
        &self,
        w: std::ops::Range<usize>,
        x: &[f32],
        r: usize,
        take: usize,
        tile: std::ops::Range<usize>,
        dst: SharedOut,
    ) -> usize {
        let (blocks, bb, rows) = (self.blocks(), block_bytes(self.bits), self.rows);
        let mut o = w.start;
        while o + W <= w.end {
            let mut sums = [[0f32; ROWS]; W];
            with_params_n!(self, o, W, tile, |ps| {
                let q = &self.q[(o * blocks + tile.start) * bb..((o + W - 1) * blocks + tile.end) * bb];
                let xs = &x[r * self.cols + tile.start * BLOCK..(r + take - 1) * self.cols + tile.end * BLOCK];
                // SAFETY: the caller runs this with AVX-512 only (matmul_path
                // checked isa); q holds W rows' tile blocks, blocks * bb
                // bytes apart, ps their parameters, xs `take` input rows of
                // the tile, cols apart.
                unsafe { x86::rows_f32(self.bits, q, blocks * bb, ps, xs, self.cols, take, &mut sums) }
            });
            for (k, ws) in sums.iter().enumerate() {
                for (i, s) in ws[..take].iter().enumerate() {
                    // SAFETY: element (r + i, o + k) of `out` (n x rows);
                    // rows o..o + W belong to this chunk alone.
                    unsafe {
                        let p = dst.at((r + i) * rows + o + k);
                        *p = if tile.start == 0 { *s } else { *p + *s };
                    }
                }
            }
            o += W;
        }
        o
    }

    /// Dot products of weight row `o` with activation rows `r..r + take`.
    fn row_dot(&self, isa: Isa, o: usize, act: &QuantActivations, r: usize, take: usize, sums: &mut [f32; ROWS]) {
        with_params!(self, o, |p| self.row_dot_p(p, isa, o, act, r, take, sums))
    }

    #[allow(clippy::too_many_arguments)]
    fn row_dot_p<P: Params>(
        &self,
        sb: P,
        isa: Isa,
        o: usize,
        act: &QuantActivations,
        r: usize,
        take: usize,
        sums: &mut [f32; ROWS],
    ) {
        let blocks = self.blocks();
        let bb = block_bytes(self.bits);
        let q = &self.q[o * blocks * bb..(o + 1) * blocks * bb];
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => {
                // SAFETY: `isa` was checked to run on this CPU (matmul_path),
                // and the slices hold `blocks` blocks for each row used.
                unsafe { x86::row_dot(isa, self.bits, q, sb, act, r, take, sums) }
            }
            _ => {
                for i in 0..take {
                    sums[i] = row_dot_portable(self.bits, q, sb, act, r + i);
                }
            }
        }
    }

    /// Dot products of weight row `o`, dequantized in registers, with float
    /// input rows `r..r + take` over the blocks of `tile`: the f32 model's
    /// products to rounding.
    #[allow(clippy::too_many_arguments)]
    fn row_dot_f32(
        &self,
        isa: Isa,
        o: usize,
        x: &[f32],
        r: usize,
        take: usize,
        tile: std::ops::Range<usize>,
        sums: &mut [f32; ROWS],
    ) {
        with_params!(self, o, |p| self.row_dot_f32_p(p, isa, o, x, r, take, tile, sums))
    }

    #[allow(clippy::too_many_arguments)]
    fn row_dot_f32_p<P: Params>(
        &self,
        sb: P,
        isa: Isa,
        o: usize,
        x: &[f32],
        r: usize,
        take: usize,
        tile: std::ops::Range<usize>,
        sums: &mut [f32; ROWS],
    ) {
        let (blocks, cols) = (self.blocks(), self.cols);
        let bb = block_bytes(self.bits);
        let q = &self.q[(o * blocks + tile.start) * bb..(o * blocks + tile.end) * bb];
        // Rows r..r + take of x, from the tile's first column.
        let xs = &x[r * cols + tile.start * BLOCK..(r + take - 1) * cols + tile.end * BLOCK];
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => {
                // SAFETY: `isa` was checked to run on this CPU (matmul_path);
                // q and sb hold the tile's blocks of this weight row, xs
                // `take` rows of the tile, `cols` apart.
                unsafe { x86::row_dot_f32(isa, self.bits, q, sb.range(tile.start, tile.end), xs, cols, take, sums) }
            }
            _ => {
                let mut w = vec![0f32; cols];
                self.dequantize_row(o, &mut w);
                let w = &w[tile.start * BLOCK..tile.end * BLOCK];
                for i in 0..take {
                    let xr = &xs[i * cols..i * cols + w.len()];
                    // 16 lanes, so the compiler may vectorize the sum.
                    let mut acc = [0f32; 16];
                    for (wc, xc) in w.chunks_exact(16).zip(xr.chunks_exact(16)) {
                        for l in 0..16 {
                            acc[l] += wc[l] * xc[l];
                        }
                    }
                    sums[i] = acc.iter().sum();
                }
            }
        }
    }

    fn matmul_sgemm(&self, x: &[f32], n: usize, out: &mut [f32]) {
        // Tiles of up to 16 MiB of f32 weights, dequantized, then one sgemm
        // each: the sgemm repacks all of x for every call, so few large
        // calls beat many small ones (1B Q4_0, 2k-token prefill: products
        // 20 s with 2 MiB tiles, 16-17 s with 8-32 MiB). The buffer is kept
        // between calls (a fresh 16 MiB one faults in 4k pages each time).
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let tile = (SGEMM_TILE_FLOATS / self.cols.max(1)).max(16).min(self.rows);
        SCRATCH.with_borrow_mut(|buf| {
            if buf.len() < tile * self.cols {
                *buf = vec![0f32; tile * self.cols];
            }
            self.sgemm_tiles(x, n, out, tile, buf)
        })
    }

    fn sgemm_tiles(&self, x: &[f32], n: usize, out: &mut [f32], tile: usize, buf: &mut [f32]) {
        let mut o0 = 0;
        while o0 < self.rows {
            let t = tile.min(self.rows - o0);
            let w = &mut buf[..t * self.cols];
            let dq = SharedOut(w.as_mut_ptr());
            let cols = self.cols;
            parallel_for(t.div_ceil(32), |c| {
                for i in c * 32..((c + 1) * 32).min(t) {
                    // SAFETY: row i of the tile (t x cols), one chunk per thread.
                    let row = unsafe { std::slice::from_raw_parts_mut(dq.at(i * cols), cols) };
                    self.dequantize_row(o0 + i, row);
                }
            });
            // SAFETY: row-major operands of the sizes stated: x is n x cols,
            // the tile t x cols (used transposed), the output block n x t
            // inside out (n x rows, leading dimension rows).
            unsafe {
                crate::blas::cblas_sgemm(
                    101,
                    111,
                    112,
                    n as i32,
                    t as i32,
                    cols as i32,
                    1.0,
                    x.as_ptr(),
                    cols as i32,
                    w.as_ptr(),
                    cols as i32,
                    0.0,
                    out.as_mut_ptr().add(o0),
                    self.rows as i32,
                )
            };
            o0 += t;
        }
    }

    /// Rows `ids` as f32 (an embedding lookup): `out` is `ids.len()` by `cols`.
    pub fn gather(&self, ids: &[u32], out: &mut [f32]) -> Result<(), String> {
        assert_eq!(out.len(), ids.len() * self.cols);
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= self.rows {
                return Err(format!("row {id} is out of range (the matrix has {} rows)", self.rows));
            }
            self.dequantize_row(id, &mut out[i * self.cols..(i + 1) * self.cols]);
        }
        Ok(())
    }
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantMatrix({}x{}, {}-bit)", self.rows, self.cols, self.bits)
    }
}

/// How a product is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Weights dequantized in registers, float activations: decode.
    Float,
    /// 8-bit activations, integer dot products (llama.cpp's way): decode
    /// with `PENSIEVE_DECODE_PATH=integer`.
    Integer,
    /// Dequantized tiles through the BLAS sgemm (prefill).
    Sgemm,
}

/// The few-rows path: [`Path::Float`] (the float32 model's products to
/// rounding), or [`Path::Integer`] with `PENSIEVE_DECODE_PATH=integer`:
/// 12% faster end to end on SmolLM2 here (33 vs 29 tok/s), but its 8-bit
/// activations turned SmolLM2's first answer token to "What is the capital
/// of France?" from "The" (the float32 model's) to "L'".
pub fn decode_path() -> Path {
    static P: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *P.get_or_init(|| match std::env::var("PENSIEVE_DECODE_PATH").as_deref() {
        Ok("integer") => Path::Integer,
        _ => Path::Float,
    })
}

fn block_bytes(bits: u32) -> usize {
    BLOCK * bits as usize / 8
}

/// Activation rows quantized to 8 bits per block of 32: `x ≈ d * xq`, with
/// each block's exact sum kept for the weights' bias term.
pub struct QuantActivations {
    xq: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<f32>,
    blocks: usize,
}

impl QuantActivations {
    pub fn new(x: &[f32], n: usize, cols: usize) -> QuantActivations {
        let blocks = cols / BLOCK;
        let mut xq = vec![0i8; n * cols];
        let mut d = vec![0f32; n * blocks];
        let mut sum = vec![0f32; n * blocks];
        for k in 0..n * blocks {
            let src = &x[k * BLOCK..(k + 1) * BLOCK];
            let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, v) in xq[k * BLOCK..(k + 1) * BLOCK].iter_mut().zip(src) {
                *q = (v * inv).round() as i8;
            }
            d[k] = amax / 127.0;
            sum[k] = src.iter().sum();
        }
        QuantActivations { xq, d, sum, blocks }
    }
}

fn row_dot_portable<P: Params>(bits: u32, q: &[u8], sb: P, act: &QuantActivations, r: usize) -> f32 {
    assert_eq!(sb.blocks(), act.blocks);
    let blocks = act.blocks;
    let bb = block_bytes(bits);
    let mut total = 0f32;
    for b in 0..blocks {
        let k = r * blocks + b;
        let xq = &act.xq[k * BLOCK..(k + 1) * BLOCK];
        let qb = &q[b * bb..(b + 1) * bb];
        let mut dot = 0i32;
        if bits == 4 {
            for i in 0..16 {
                dot += (qb[i] & 15) as i32 * xq[i] as i32 + (qb[i] >> 4) as i32 * xq[16 + i] as i32;
            }
        } else {
            for i in 0..BLOCK {
                dot += (qb[i] as i8) as i32 * xq[i] as i32;
            }
        }
        // SAFETY: b < blocks = sb.blocks() (asserted).
        let (s, m) = unsafe { sb.sm(b) };
        total += s * act.d[k] * dot as f32 + m * act.sum[k];
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Layout, Params, QuantActivations, BLOCK, ROWS};
    use crate::kernels::Isa;
    use std::arch::x86_64::*;

    /// # Safety
    /// `isa` runs on this CPU; `q` and `sb` hold one weight row's blocks and
    /// `act` rows `r..r + take` (take <= 4).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn row_dot<P: Params>(
        isa: Isa,
        bits: u32,
        q: &[u8],
        sb: P,
        act: &QuantActivations,
        r: usize,
        take: usize,
        sums: &mut [f32; ROWS],
    ) {
        // SAFETY: the caller's promises, passed on (every arm).
        unsafe {
            match (isa, bits, take) {
                (Isa::Avx512, 4, 1) => row_q4_vnni::<P, 1>(q, sb, act, r, sums),
                (Isa::Avx512, 4, 2) => row_q4_vnni::<P, 2>(q, sb, act, r, sums),
                (Isa::Avx512, 4, 3) => row_q4_vnni::<P, 3>(q, sb, act, r, sums),
                (Isa::Avx512, 4, _) => row_q4_vnni::<P, 4>(q, sb, act, r, sums),
                (Isa::Avx512, _, 1) => row_q8_vnni::<P, 1>(q, sb, act, r, sums),
                (Isa::Avx512, _, 2) => row_q8_vnni::<P, 2>(q, sb, act, r, sums),
                (Isa::Avx512, _, 3) => row_q8_vnni::<P, 3>(q, sb, act, r, sums),
                (Isa::Avx512, _, _) => row_q8_vnni::<P, 4>(q, sb, act, r, sums),
                (_, 4, 1) => row_q4_avx2::<P, 1>(q, sb, act, r, sums),
                (_, 4, 2) => row_q4_avx2::<P, 2>(q, sb, act, r, sums),
                (_, 4, 3) => row_q4_avx2::<P, 3>(q, sb, act, r, sums),
                (_, 4, _) => row_q4_avx2::<P, 4>(q, sb, act, r, sums),
                (_, _, 1) => row_q8_avx2::<P, 1>(q, sb, act, r, sums),
                (_, _, 2) => row_q8_avx2::<P, 2>(q, sb, act, r, sums),
                (_, _, 3) => row_q8_avx2::<P, 3>(q, sb, act, r, sums),
                (_, _, _) => row_q8_avx2::<P, 4>(q, sb, act, r, sums),
            }
        }
    }

    /// # Safety
    /// `isa` runs on this CPU; `q` and `sb` hold `sb.blocks()` blocks of one
    /// weight row and `x` as many blocks of `take` (<= 8; <= 4 for AVX2)
    /// input rows, `stride` floats apart.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn row_dot_f32<P: Params>(
        isa: Isa,
        bits: u32,
        q: &[u8],
        sb: P,
        x: &[f32],
        stride: usize,
        take: usize,
        sums: &mut [f32; ROWS],
    ) {
        macro_rules! by_rows {
            ($f:ident, $bits:literal, [$($r:literal)*]) => {
                match take {
                    $($r => $f::<P, $bits, $r>(q, sb, x, stride, sums),)*
                    _ => unreachable!("{take} rows"),
                }
            };
        }
        // SAFETY: the caller's promises, passed on (every arm).
        unsafe {
            match (isa, bits) {
                (Isa::Avx512, 4) => by_rows!(f32_avx512, 4, [1 2 3 4 5 6 7 8]),
                (Isa::Avx512, _) => by_rows!(f32_avx512, 8, [1 2 3 4 5 6 7 8]),
                (_, 4) => by_rows!(f32_avx2, 4, [1 2 3 4]),
                (_, _) => by_rows!(f32_avx2, 8, [1 2 3 4]),
            }
        }
    }

    /// How far ahead (bytes) the decode kernels prefetch weights: 4 KiB
    /// measured best on 1B Q4_0 decode (1 KiB: 18.4 tok/s with four rows
    /// in flight, 4 KiB: 24.6, 16 KiB: 24.0).
    const PREFETCH: usize = 4096;

    /// Scales and biases of blocks `b..b + 16`, as floats: one load and
    /// conversion for sixteen blocks instead of one a block.
    ///
    /// # Safety
    /// `b + 16 <= sb.blocks()`; the CPU has AVX-512F and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn params16<P: Params>(sb: P, b: usize) -> (__m512, __m512) {
        // SAFETY: blocks b..b + 16 lie within the row's parameters (the
        // caller's promise), laid out as P::LAYOUT says.
        unsafe {
            let base = sb.base();
            let pairs = |lo: __m512, hi: __m512| {
                // (s0, m0, s1, m1, ...) over two vectors: evens and odds.
                let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
                (_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi))
            };
            match P::LAYOUT {
                Layout::Symmetric => {
                    let s = _mm512_cvtph_ps(_mm256_loadu_si256((base as *const u16).add(b) as *const __m256i));
                    (s, _mm512_mul_ps(s, _mm512_set1_ps(sb.offset())))
                }
                Layout::PairsHalf => {
                    let p = (base as *const u16).add(2 * b);
                    pairs(
                        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.add(16) as *const __m256i)),
                    )
                }
                Layout::PairsF32 => {
                    let p = (base as *const f32).add(2 * b);
                    pairs(_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                }
            }
        }
    }

    /// The 32 weights of the block at `p` (`BITS` wide) as two vectors of
    /// 16 floats, `s * q + m`: 4-bit values looked up in a table of the
    /// sixteen (one FMA a block; `vpermps` reads an index's low four bits,
    /// so the low nibble needs no mask), 8-bit ones (signed; the 128 is in
    /// the bias) converted.
    ///
    /// # Safety
    /// `p` points at one block (BITS * 4 bytes).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn block_weights<const BITS: usize>(p: *const u8, s: __m512, m: __m512) -> [__m512; 2] {
        // SAFETY: the block's bytes (the caller's promise).
        unsafe {
            if BITS == 4 {
                let values = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                let table = _mm512_fmadd_ps(values, s, m);
                [_mm512_permutexvar_ps(v, table), _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table)]
            } else {
                let v0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i));
                let v1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
                [_mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), s, m), _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), s, m)]
            }
        }
    }

    /// AVX-512: a block's 32 weights as two vectors of 16 floats, each
    /// multiplied into R input rows.
    ///
    /// Weights as [`block_weights`] makes them (the 4-bit lookup: three
    /// shuffles and one FMA a block where converting took two masks, two
    /// conversions and two FMAs); scales and biases converted sixteen
    /// blocks at a time.
    ///
    /// Two blocks a step; up to two rows keep four accumulators each (one
    /// chain of dependent FMAs would leave the core waiting on their
    /// latency), more rows two each (the rows are the independent chains).
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn f32_avx512<P: Params, const BITS: usize, const R: usize>(
        q: &[u8],
        sb: P,
        x: &[f32],
        stride: usize,
        sums: &mut [f32; ROWS],
    ) {
        let blocks = sb.blocks();
        let bb = BLOCK * BITS / 8;
        assert!(q.len() >= blocks * bb && x.len() >= (R - 1) * stride + blocks * BLOCK);
        // Prefetch the weights this kernel reads next: further along the
        // row, or, in a column tile, the same blocks two rows on (the
        // caller goes row by row through a tile; further along this row is
        // the next tile, not read until every row of the chunk has passed).
        let ahead = if blocks * BLOCK < stride { 2 * (stride / BLOCK) * bb } else { PREFETCH };
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let weights = |b: usize, s: __m512, m: __m512| {
            // SAFETY: block b of q (bb bytes), b < blocks (checked above).
            unsafe {
                let p = q.as_ptr().add(b * bb);
                // The weights stream from memory once per token: ask for
                // them early (wrapping_add: a hint past the end is harmless).
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
                block_weights::<BITS>(p, s, m)
            }
        };
        // A macro, not a closure: a closure holding `acc` was not inlined,
        // and every FMA went through memory.
        macro_rules! step {
            ($b:expr, $wa:expr, $wb:expr) => {{
                let (b, wa, wb): (usize, [__m512; 2], Option<[__m512; 2]>) = ($b, $wa, $wb);
                for (i, a) in acc.iter_mut().enumerate() {
                    // SAFETY: blocks b (and b + 1 with wb) of row i of x (checked above).
                    unsafe {
                        let xp = x.as_ptr().add(i * stride + b * BLOCK);
                        a[0] = _mm512_fmadd_ps(wa[0], _mm512_loadu_ps(xp), a[0]);
                        a[1] = _mm512_fmadd_ps(wa[1], _mm512_loadu_ps(xp.add(16)), a[1]);
                        if let Some(wb) = wb {
                            let k = if R > 2 { 0 } else { 2 };
                            a[k] = _mm512_fmadd_ps(wb[0], _mm512_loadu_ps(xp.add(32)), a[k]);
                            a[k + 1] = _mm512_fmadd_ps(wb[1], _mm512_loadu_ps(xp.add(48)), a[k + 1]);
                        }
                    }
                }
            }};
        }
        let mut b = 0;
        let mut s16 = [0f32; 16];
        let mut m16 = [0f32; 16];
        while b + 16 <= blocks {
            // SAFETY: blocks b..b + 16 exist (loop condition).
            unsafe {
                let (s, m) = params16(sb, b);
                _mm512_storeu_ps(s16.as_mut_ptr(), s);
                _mm512_storeu_ps(m16.as_mut_ptr(), m);
            }
            for j in (0..16).step_by(2) {
                let wa = weights(b + j, _mm512_set1_ps(s16[j]), _mm512_set1_ps(m16[j]));
                let wb = weights(b + j + 1, _mm512_set1_ps(s16[j + 1]), _mm512_set1_ps(m16[j + 1]));
                step!(b + j, wa, Some(wb));
            }
            b += 16;
        }
        while b < blocks {
            // SAFETY: b < blocks <= sb.blocks(); F16C is enabled here.
            let (s, m) = unsafe { sb.sm_x86(b) };
            let wa = weights(b, _mm512_set1_ps(s), _mm512_set1_ps(m));
            step!(b, wa, None);
            b += 1;
        }
        for (i, a) in acc.iter().enumerate() {
            sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
        }
    }

    /// W weight rows against `take` input rows: W = 4 for one or two input
    /// rows (decode: four rows' weights in flight at once, each input
    /// vector loaded once for four rows), W = 2 for up to eight (each input
    /// vector loaded once for two rows); the per-row costs (scales, the
    /// final sums, the call) are shared.
    ///
    /// # Safety
    /// The CPU has AVX-512F and F16C; `q` holds W weight rows' blocks (as
    /// many as `sbs[w].blocks()`), `row_bytes` apart; `x` `take` input rows
    /// of those blocks, `stride` floats apart; take <= 2 when W > 2.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows_f32<P: Params, const W: usize>(
        bits: u32,
        q: &[u8],
        row_bytes: usize,
        sbs: [P; W],
        x: &[f32],
        stride: usize,
        take: usize,
        sums: &mut [[f32; ROWS]; W],
    ) {
        macro_rules! by_rows {
            ($bits:literal, [$($r:literal)*]) => {
                match take {
                    $($r => rows_avx512::<P, $bits, $r, W>(q, row_bytes, sbs, x, stride, sums),)*
                    _ => unreachable!("{take} rows"),
                }
            };
        }
        // SAFETY: the caller's promises, passed on.
        unsafe {
            match (bits, W) {
                (4, 4) => by_rows!(4, [1 2]),
                (_, 4) => by_rows!(8, [1 2]),
                (4, _) => by_rows!(4, [1 2 3 4 5 6 7 8]),
                (_, _) => by_rows!(8, [1 2 3 4 5 6 7 8]),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn rows_avx512<P: Params, const BITS: usize, const R: usize, const W: usize>(
        q: &[u8],
        row_bytes: usize,
        sbs: [P; W],
        x: &[f32],
        stride: usize,
        sums: &mut [[f32; ROWS]; W],
    ) {
        let blocks = sbs[0].blocks();
        let bb = BLOCK * BITS / 8;
        assert!(R * W <= 16 && sbs.iter().all(|p| p.blocks() == blocks));
        assert!(q.len() >= (W - 1) * row_bytes + blocks * bb && x.len() >= (R - 1) * stride + blocks * BLOCK);
        // As in f32_avx512, with the next W rows in a column tile.
        let ahead = if blocks * BLOCK < stride { W * row_bytes } else { PREFETCH };
        // Two accumulators a (weight row, input row) pair while there are
        // few pairs (independent chains for the FMAs' latency), one when
        // there are many (registers).
        let split = R * W <= 8;
        let mut acc = [[[_mm512_setzero_ps(); 2]; R]; W];
        let mut s16 = [[0f32; 16]; W];
        let mut m16 = [[0f32; 16]; W];
        let mut b = 0;
        while b < blocks {
            // In a whole group of 16 blocks, the parameters come from the
            // group's conversion.
            let group = b - b % 16 + 16 <= blocks;
            if group && b % 16 == 0 {
                for w in 0..W {
                    // SAFETY: blocks b..b + 16 exist (group).
                    unsafe {
                        let (s, m) = params16(sbs[w], b);
                        _mm512_storeu_ps(s16[w].as_mut_ptr(), s);
                        _mm512_storeu_ps(m16[w].as_mut_ptr(), m);
                    }
                }
            }
            // (A loop, not array::from_fn: the closure was not inlined, and
            // took every intrinsic out of line with it.)
            let mut wv = [[_mm512_setzero_ps(); 2]; W];
            for (w, wv) in wv.iter_mut().enumerate() {
                // SAFETY: block b of weight row w (b < blocks, checked
                // above); its parameters likewise.
                *wv = unsafe {
                    let (s, m) = if group {
                        (_mm512_set1_ps(s16[w][b % 16]), _mm512_set1_ps(m16[w][b % 16]))
                    } else {
                        let (s, m) = sbs[w].sm_x86(b);
                        (_mm512_set1_ps(s), _mm512_set1_ps(m))
                    };
                    let p = q.as_ptr().add(w * row_bytes + b * bb);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
                    block_weights::<BITS>(p, s, m)
                };
            }
            for i in 0..R {
                // SAFETY: x holds block b of each of its R rows (checked above).
                let (x0, x1) = unsafe {
                    let xp = x.as_ptr().add(i * stride + b * BLOCK);
                    (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)))
                };
                for w in 0..W {
                    let a = &mut acc[w][i];
                    a[0] = _mm512_fmadd_ps(wv[w][0], x0, a[0]);
                    let k = if split { 1 } else { 0 };
                    a[k] = _mm512_fmadd_ps(wv[w][1], x1, a[k]);
                }
            }
            b += 1;
        }
        for w in 0..W {
            for i in 0..R {
                sums[w][i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[w][i][0], acc[w][i][1]));
            }
        }
    }

    /// AVX2: a block's 32 weights as four vectors of 8 floats (4-bit values
    /// unsigned, 8-bit ones signed), each multiplied into R input rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f32_avx2<P: Params, const BITS: usize, const R: usize>(
        q: &[u8],
        sb: P,
        x: &[f32],
        stride: usize,
        sums: &mut [f32; ROWS],
    ) {
        let blocks = sb.blocks();
        let bb = BLOCK * BITS / 8;
        assert!(q.len() >= blocks * bb && x.len() >= (R - 1) * stride + blocks * BLOCK);
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for b in 0..blocks {
            // SAFETY: block b of q (bb bytes), of sb, and of each x row (checked above).
            unsafe {
                let p = q.as_ptr().add(b * bb);
                // Four groups of 8 values, as 32-bit integers.
                let v = if BITS == 4 {
                    let low = _mm_set1_epi8(15);
                    let raw = _mm_loadu_si128(p as *const __m128i);
                    let lo = _mm_and_si128(raw, low);
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
                    [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)].map(|g| _mm256_cvtepu8_epi32(g))
                } else {
                    [0, 1, 2, 3].map(|k| _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k) as *const __m128i)))
                };
                let (s, m) = sb.sm_x86(b);
                let (s, m) = (_mm256_set1_ps(s), _mm256_set1_ps(m));
                let ws = v.map(|g| _mm256_fmadd_ps(_mm256_cvtepi32_ps(g), s, m));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xp = x.as_ptr().add(i * stride + b * BLOCK);
                    for (k, wk) in ws.iter().enumerate() {
                        a[k] = _mm256_fmadd_ps(*wk, _mm256_loadu_ps(xp.add(8 * k)), a[k]);
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            sums[i] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 values of a 4-bit block, in column order, as bytes 0..15.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4_block(p: *const u8) -> __m256i {
        // SAFETY: p points at 16 readable bytes (one block).
        unsafe {
            let raw = _mm_loadu_si128(p as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        }
    }

    macro_rules! row_kernel {
        ($name:ident, $features:literal, $bb:expr, |$qp:ident, $xv:ident| $dot:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<P: Params, const R: usize>(
                q: &[u8],
                sb: P,
                act: &QuantActivations,
                r: usize,
                sums: &mut [f32; ROWS],
            ) {
                let blocks = act.blocks;
                assert!(sb.blocks() >= blocks);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut bias = [0f32; R];
                for b in 0..blocks {
                    // SAFETY: block b of this row's `q` and `sb`, and of each
                    // activation row r + i (i < R): all within their slices.
                    unsafe {
                        let $qp = q.as_ptr().add(b * $bb);
                        let (s, m) = sb.sm_x86(b);
                        for i in 0..R {
                            let k = (r + i) * blocks + b;
                            let $xv = _mm256_loadu_si256(act.xq.as_ptr().add(k * BLOCK) as *const __m256i);
                            let p: __m256i = $dot;
                            let scale = _mm256_set1_ps(s * *act.d.get_unchecked(k));
                            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i]);
                            bias[i] += m * *act.sum.get_unchecked(k);
                        }
                    }
                }
                for i in 0..R {
                    sums[i] = hsum(acc[i]) + bias[i];
                }
            }
        };
    }

    // AVX2: u8 x i8 pairs summed to i16 (maddubs), then pairs to i32.
    row_kernel!(row_q4_avx2, "avx2,fma,f16c", 16, |qp, xv| {
        let qv = q4_block(qp);
        _mm256_madd_epi16(_mm256_maddubs_epi16(qv, xv), _mm256_set1_epi16(1))
    });
    // 8-bit values are signed: |q| times x with q's sign (|q| <= 128,
    // |x| <= 127, so a pair's sum fits i16).
    row_kernel!(row_q8_avx2, "avx2,fma,f16c", 32, |qp, xv| {
        let qv = _mm256_loadu_si256(qp as *const __m256i);
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(qv, qv), _mm256_sign_epi8(xv, qv));
        _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
    });
    // AVX-512 VNNI: four u8 x i8 products summed into i32 in one instruction.
    row_kernel!(row_q4_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", 16, |qp, xv| {
        let qv = q4_block(qp);
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), qv, xv)
    });
    row_kernel!(row_q8_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", 32, |qp, xv| {
        let qv = _mm256_loadu_si256(qp as *const __m256i);
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(qv, qv), _mm256_sign_epi8(xv, qv))
    });
}

//! The CPU kernels (src/kernels/) against plain loops: every instruction set
//! this CPU runs, odd sizes, strided and broadcast views, masks.

mod common;

use pensieve::kernels::attention::{self, Mask, View};
use pensieve::kernels::quant::{Half, Path, QuantMatrix, Scale, BLOCK};
use pensieve::kernels::{elementwise, rope, Isa};
use proptest::prelude::*;
use std::sync::Once;

/// The sgemm path needs a BLAS behind `cblas_sgemm`: the venv's OpenBLAS.
fn init_blas() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let lib = common::config().venv_dir().join("lib");
        let sp = std::fs::read_dir(&lib)
            .expect("the venv exists (cargo build makes it)")
            .flatten()
            .map(|e| e.path().join("site-packages"))
            .find(|p| p.is_dir())
            .expect("site-packages in the venv");
        pensieve::blas::init(pensieve::config::BlasChoice::Auto, &sp);
    });
}

/// A small deterministic generator (xorshift), so a failing case replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// MLX-layout weights and the f32 matrix they stand for, decoded straight
/// from the MLX definition (not through the repacking under test).
struct Mlx {
    w: Vec<u32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
    dense: Vec<f32>,
}

/// `kind` 0: float scales and biases; 1: exactly halves (as GGUF's are), so
/// the matrix stores them as halves; 2: halves with the bias -2^(bits-1)
/// scales (GGUF Q4_0 / Q8_0), stored as scales only.
fn mlx_weights(rng: &mut Rng, rows: usize, cols: usize, bits: u32, group: usize, kind: u8) -> Mlx {
    let halves = kind > 0;
    let words = cols * bits as usize / 32;
    let w: Vec<u32> = (0..rows * words).map(|_| rng.next() as u32).collect();
    let groups = cols / group;
    let round = |v: f32| if halves { (v * 4096.0).round() / 4096.0 } else { v };
    let scales: Vec<f32> = (0..rows * groups).map(|_| round(0.01 + 0.05 * rng.unit().abs())).collect();
    let mut biases: Vec<f32> = (0..rows * groups).map(|_| round(0.3 * rng.unit())).collect();
    if kind == 2 {
        let offset = -((1u32 << (bits - 1)) as f32);
        biases = scales.iter().map(|s| offset * s).collect();
    }
    let mut dense = vec![0f32; rows * cols];
    let per = 32 / bits as usize;
    for r in 0..rows {
        for c in 0..cols {
            let q = (w[r * words + c / per] >> (bits as usize * (c % per))) & ((1 << bits) - 1);
            let g = r * groups + c / group;
            dense[r * cols + c] = scales[g] * q as f32 + biases[g];
        }
    }
    Mlx { w, scales, biases, dense }
}

fn reference_matmul(x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * rows];
    for i in 0..n {
        for o in 0..rows {
            out[i * rows + o] = (0..cols).map(|c| x[i * cols + c] as f64 * w[o * cols + c] as f64).sum();
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The integer path: within the error its 8-bit activations allow (each
    /// value off by at most half its block's step), and the same on every
    /// instruction set; the float paths: the f32 product to rounding.
    #[test]
    fn quantized_matmul_matches_a_plain_loop(
        seed in 1u64..u64::MAX,
        rows in 1usize..70,
        blocks in 1usize..40, // past 16: the kernels load 16 blocks' scales at once
        n in 1usize..13,
        bits in prop::sample::select(vec![4u32, 8]),
        group_blocks in prop::sample::select(vec![1usize, 2, 4]),
        kind in 0u8..3,
    ) {
        init_blas();
        let group = group_blocks * BLOCK;
        let cols = blocks.div_ceil(group_blocks) * group;
        let mut rng = Rng(seed);
        let m = mlx_weights(&mut rng, rows, cols, bits, group, kind);
        let qm = QuantMatrix::from_mlx(&m.w, &m.scales, &m.biases, rows, cols, bits, group).unwrap();
        prop_assert_eq!(qm.symmetric(), kind == 2);
        // 8-bit biases absorb 128 scales; those may stop being halves.
        if bits == 4 || kind == 2 {
            prop_assert_eq!(qm.half_scales(), kind > 0);
        }
        let x: Vec<f32> = (0..n * cols).map(|_| rng.unit() * 2.0).collect();
        let want = reference_matmul(&x, n, &m.dense, rows, cols);
        // The bound for 8-bit activations: sum over blocks of step/2 * sum |w|.
        let bound = |i: usize, o: usize| -> f64 {
            (0..cols / BLOCK).map(|b| {
                let xs = &x[i * cols + b * BLOCK..][..BLOCK];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                let wsum: f64 = m.dense[o * cols + b * BLOCK..][..BLOCK].iter().map(|v| v.abs() as f64).sum();
                amax / 127.0 / 2.0 * wsum
            }).sum::<f64>() * 1.001 + 1e-4
        };
        let mut portable = vec![0f32; n * rows];
        for isa in Isa::available() {
            let mut got = vec![0f32; n * rows];
            qm.matmul_path(isa, &x, n, &mut got, Path::Integer);
            for i in 0..n {
                for o in 0..rows {
                    let (g, w) = (got[i * rows + o] as f64, want[i * rows + o]);
                    prop_assert!((g - w).abs() <= bound(i, o), "{isa:?} ({i},{o}): {g} vs {w}, bound {}", bound(i, o));
                }
            }
            if isa == Isa::Portable {
                portable = got;
            } else {
                // Same integer sums, float terms added in another order.
                for (k, (a, b)) in got.iter().zip(&portable).enumerate() {
                    let scale: f64 = (0..cols).map(|c| (x[(k / rows) * cols + c] * m.dense[(k % rows) * cols + c]).abs() as f64).sum();
                    prop_assert!(((a - b).abs() as f64) <= 1e-5 * scale + 1e-6, "{isa:?} vs portable: {a} vs {b}");
                }
            }
        }
        // The float paths: the dequantized product to rounding, on every
        // instruction set (few rows) and through sgemm (many).
        let mut paths: Vec<(Isa, Path)> = Isa::available().into_iter().map(|i| (i, Path::Float)).collect();
        paths.push((Isa::best(), Path::Sgemm));
        for (isa, path) in paths {
            let mut got = vec![0f32; n * rows];
            qm.matmul_path(isa, &x, n, &mut got, path);
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let scale: f64 = (0..cols).map(|c| (x[(k / rows) * cols + c] * m.dense[(k % rows) * cols + c]).abs() as f64).sum();
                prop_assert!((*g as f64 - w).abs() <= 1e-5 * scale + 1e-6, "{isa:?} {path:?} {k}: {g} vs {w}");
            }
        }
        // An embedding lookup gives the dequantized rows.
        let ids: Vec<u32> = (0..3).map(|_| (rng.next() % rows as u64) as u32).collect();
        let mut rows_out = vec![0f32; ids.len() * cols];
        qm.gather(&ids, &mut rows_out).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            for c in 0..cols {
                let (g, w) = (rows_out[i * cols + c], m.dense[id as usize * cols + c]);
                prop_assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()));
            }
        }
    }
}

/// Every finite half converts to the float it is, and back.
#[test]
fn halves_convert_exactly() {
    for bits in 0..=u16::MAX {
        let h = Half(bits);
        if bits & 0x7c00 == 0x7c00 {
            continue; // infinities and NaNs: never stored
        }
        let v = h.f();
        // The reference: sign, exponent and mantissa by definition.
        let (sign, exp, man) = ((bits >> 15) as i32, ((bits >> 10) & 0x1f) as i32, (bits & 0x3ff) as f64);
        let want = if exp == 0 { man * 2f64.powi(-24) } else { (1.0 + man / 1024.0) * 2f64.powi(exp - 15) };
        let want = if sign == 1 { -want } else { want };
        assert_eq!(v as f64, want, "half {bits:#06x}");
        // The kernels' F16C conversion gives the same value.
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("f16c") {
            assert_eq!(h.f_x86().to_bits(), v.to_bits(), "F16C on half {bits:#06x}");
        }
        assert_eq!(Half::exact(v).map(|h| h.0), Some(if v == 0.0 { bits & 0x8000 } else { bits }), "back from {v}");
    }
    assert!(Half::exact(0.1).is_none(), "0.1 is no half");
    assert!(Half::exact(1e6).is_none() && Half::exact(1e-9).is_none());
}

#[test]
fn quantized_weights_are_checked() {
    let w = vec![0u32; 4 * 8];
    let s = vec![1f32; 4 * 2];
    assert!(QuantMatrix::from_mlx(&w, &s, &s, 4, 64, 4, 32).is_ok());
    assert!(QuantMatrix::from_mlx(&w, &s, &s, 4, 64, 3, 32).unwrap_err().contains("3-bit"));
    assert!(QuantMatrix::from_mlx(&w, &s, &s, 4, 64, 4, 16).unwrap_err().contains("group size"));
    assert!(QuantMatrix::from_mlx(&w[1..], &s, &s, 4, 64, 4, 32).unwrap_err().contains("do not match"));
    let qm = QuantMatrix::from_mlx(&w, &s, &s, 4, 64, 4, 32).unwrap();
    assert!(qm.gather(&[4], &mut [0f32; 64]).unwrap_err().contains("out of range"));
}

/// softmax(scale q k^T + mask) v, in f64, one query at a time.
#[allow(clippy::too_many_arguments)]
fn reference_attention(q: &View, k: &View, v: &View, scale: f32, mask: &Mask) -> Vec<f64> {
    let [b, hq, l, d] = q.shape;
    let (hkv, s, dv) = (k.shape[1], k.shape[2], v.shape[3]);
    let at =
        |x: &View, i: [usize; 4]| x.data[(0..4).map(|j| if x.shape[j] == 1 { 0 } else { i[j] * x.strides[j] }).sum::<usize>()];
    let mut out = vec![0f64; b * hq * l * dv];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hkv);
            for i in 0..l {
                let mut sc: Vec<f64> = (0..s)
                    .map(|j| {
                        let dot: f64 = (0..d).map(|c| at(q, [bi, h, i, c]) as f64 * at(k, [bi, kh, j, c]) as f64).sum();
                        let add = match mask {
                            Mask::None => 0.0,
                            Mask::Causal => {
                                if j <= i + s - l {
                                    0.0
                                } else {
                                    f64::NEG_INFINITY
                                }
                            }
                            Mask::Additive(m) => at(m, [bi, h, i, j]) as f64,
                        };
                        dot * scale as f64 + add
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for x in sc.iter_mut() {
                    *x = (*x - mx).exp();
                    sum += *x;
                }
                for c in 0..dv {
                    out[((bi * hq + h) * l + i) * dv + c] = (0..s).map(|j| sc[j] / sum * at(v, [bi, kh, j, c]) as f64).sum();
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Keys and values are read through strides (a KV cache's preallocated
    /// buffer, sliced), heads are shared (GQA), masks broadcast.
    #[test]
    fn attention_matches_a_plain_softmax(
        seed in 1u64..u64::MAX,
        b in 1usize..3,
        hkv in 1usize..3,
        g in 1usize..4,
        l in 1usize..140, // past BQ = 64: the keys are then transposed once for all query blocks
        extra in 0usize..90,
        d in prop::sample::select(vec![64usize, 128, 24, 80]),
        spare in 0usize..5,
        mask_kind in 0usize..4,
    ) {
        let mut rng = Rng(seed);
        let s = l + extra;
        let hq = hkv * g;
        let qdata: Vec<f32> = (0..b * hq * l * d).map(|_| rng.unit()).collect();
        let q = View::contiguous(&qdata, [b, hq, l, d]);
        // K and V live in a buffer with room for `spare` more positions.
        let cap = s + spare;
        let kdata: Vec<f32> = (0..b * hkv * cap * d).map(|_| rng.unit() * 2.0).collect();
        let vdata: Vec<f32> = (0..b * hkv * cap * d).map(|_| rng.unit()).collect();
        let strides = [hkv * cap * d, cap * d, d, 1];
        let k = View { data: &kdata, shape: [b, hkv, s, d], strides };
        let v = View { data: &vdata, shape: [b, hkv, s, d], strides };
        // Additive masks: per query row and key (one batch row, all heads),
        // or per batch row and key (a decode step's padding mask).
        let mdata: Vec<f32> = (0..b * l * s).map(|_| if rng.unit() < -0.6 { f32::NEG_INFINITY } else { rng.unit() }).collect();
        let mask = match mask_kind {
            0 => Mask::None,
            1 => Mask::Causal,
            2 => Mask::Additive(View { data: &mdata, shape: [b, 1, l, s], strides: [l * s, 0, s, 1] }),
            _ => Mask::Additive(View { data: &mdata, shape: [b, 1, 1, s], strides: [s, 0, 0, 1] }),
        };
        let scale = 1.0 / (d as f32).sqrt();
        let want = reference_attention(&q, &k, &v, scale, &mask);
        for isa in Isa::available() {
            let mut out = vec![0f32; b * hq * l * d];
            attention::attention(isa, q, k, v, scale, mask, &mut out).unwrap();
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                // A row with every key masked has no softmax; MLX gives NaN, we 0.
                if !w.is_finite() { continue; }
                prop_assert!((*g as f64 - w).abs() <= 2e-5, "{isa:?} element {i}: {g} vs {w}");
            }
            // The same, laid out [B, L, Hq, D] (for the output projection).
            let mut blhd = vec![0f32; b * hq * l * d];
            attention::attention_into(isa, q, k, v, scale, mask, &mut blhd, true).unwrap();
            for (bi, hi, li) in (0..b).flat_map(|bi| (0..hq).flat_map(move |hi| (0..l).map(move |li| (bi, hi, li)))) {
                prop_assert_eq!(&blhd[((bi * l + li) * hq + hi) * d..][..d], &out[((bi * hq + hi) * l + li) * d..][..d]);
            }
        }
    }
}

#[test]
fn attention_rejects_what_it_cannot_compute() {
    let data = vec![0f32; 2 * 3 * 4 * 8];
    let q = View::contiguous(&data, [1, 3, 4, 8]);
    let k = View::contiguous(&data, [1, 2, 4, 8]);
    let mut out = vec![0f32; 3 * 4 * 8];
    let e = attention::attention(Isa::Portable, q, k, k, 1.0, Mask::None, &mut out).unwrap_err();
    assert!(e.contains("evenly"), "{e}");
    let k = View::contiguous(&data, [1, 1, 2, 8]);
    let e = attention::attention(Isa::Portable, q, k, k, 1.0, Mask::Causal, &mut out).unwrap_err();
    assert!(e.contains("causal"), "{e}");
    let big = View { data: &data[..10], shape: [1, 3, 4, 8], strides: [96, 32, 8, 1] };
    let e = attention::attention(Isa::Portable, big, big, big, 1.0, Mask::None, &mut out).unwrap_err();
    assert!(e.contains("overruns"), "{e}");
}

#[test]
fn the_vectorized_exp_is_accurate() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 0.0 {
        let (got, want) = (attention::exp(x) as f64, (x as f64).exp());
        worst = worst.max((got - want).abs() / want);
        x += 0.001;
    }
    assert!(worst < 1e-6, "worst relative error {worst:e}");
    assert_eq!(attention::exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(attention::exp(-100.0), 0.0);
    assert_eq!(attention::exp(0.0), 1.0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Rope over a strided input (queries as the projection lays them out,
    /// `[B, L, H, D]` viewed as `[B, H, L, D]`), both pairings, part of the
    /// head rotated, one offset for all rows or one per row, custom
    /// frequencies: against the definition in f64.
    #[test]
    fn rope_matches_the_definition(
        seed in 1u64..u64::MAX,
        b in 1usize..4,
        h in 1usize..5,
        l in 1usize..40,
        d in prop::sample::select(vec![64usize, 128, 24, 80, 6]),
        partial in any::<bool>(),
        traditional in any::<bool>(),
        per_row in any::<bool>(),
        custom in any::<bool>(),
        scale in prop::sample::select(vec![1.0f32, 0.25]),
    ) {
        let mut rng = Rng(seed);
        let dims = if partial { (d / 2) & !1 } else { d }.max(2);
        let data: Vec<f32> = (0..b * l * h * d).map(|_| rng.unit()).collect();
        let x = View { data: &data, shape: [b, h, l, d], strides: [l * h * d, d, h * d, 1] };
        let offsets: Vec<i32> = (0..if per_row { b } else { 1 }).map(|_| (rng.next() % 5000) as i32).collect();
        let inv: Vec<f32> = if custom {
            (0..dims / 2).map(|i| 1.0 / (1.0 + i as f32 * 3.7)).collect()
        } else {
            rope::inv_freq(dims, 10000.0)
        };
        let r = rope::Rope { dims, traditional, inv_freq: &inv, scale, offsets: &offsets };
        for isa in Isa::available() {
            let mut out = vec![0f32; b * h * l * d];
            rope::rope(isa, x, &r, &mut out).unwrap();
            for (bi, hi, li) in (0..b).flat_map(|bi| (0..h).flat_map(move |hi| (0..l).map(move |li| (bi, hi, li)))) {
                let src = &data[bi * l * h * d + li * h * d + hi * d..][..d];
                let got = &out[((bi * h + hi) * l + li) * d..][..d];
                let pos = (li as f64 + offsets[if per_row { bi } else { 0 }] as f64) * scale as f64;
                for (i, &f) in inv.iter().enumerate() {
                    let t = pos * f as f64;
                    let (a, c) = if traditional { (2 * i, 2 * i + 1) } else { (i, i + dims / 2) };
                    let (x1, x2) = (src[a] as f64, src[c] as f64);
                    // f32 angles of up to ~5000 rad carry ~3e-4 of rounding.
                    let tol = 1e-5 + 1e-7 * t.abs();
                    prop_assert!((got[a] as f64 - (x1 * t.cos() - x2 * t.sin())).abs() <= tol, "{isa:?} {bi} {hi} {li} {i}");
                    prop_assert!((got[c] as f64 - (x1 * t.sin() + x2 * t.cos())).abs() <= tol, "{isa:?} {bi} {hi} {li} {i}");
                }
                prop_assert_eq!(&got[dims..], &src[dims..]);
            }
        }
    }

    /// RMS norm of rows of any length, with and without a weight.
    #[test]
    fn rms_norm_matches_the_definition(
        seed in 1u64..u64::MAX,
        rows in 1usize..200,
        dims in 1usize..700,
        weighted in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let x: Vec<f32> = (0..rows * dims).map(|_| rng.unit() * 3.0).collect();
        let w: Vec<f32> = (0..dims).map(|_| rng.unit()).collect();
        let eps = 1e-5f32;
        for isa in Isa::available() {
            let mut out = vec![0f32; rows * dims];
            elementwise::rms_norm(isa, &x, weighted.then_some(&w[..]), dims, eps, &mut out);
            for r in 0..rows {
                let row = &x[r * dims..][..dims];
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dims as f64;
                let k = 1.0 / (ms + eps as f64).sqrt();
                for (i, &v) in row.iter().enumerate() {
                    let want = v as f64 * k * if weighted { w[i] as f64 } else { 1.0 };
                    let got = out[r * dims + i] as f64;
                    prop_assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{isa:?} row {r} element {i}: {got} vs {want}");
                }
            }
        }
    }
}

#[test]
fn rope_rejects_what_it_cannot_compute() {
    let data = vec![0f32; 2 * 2 * 3 * 8];
    let x = View::contiguous(&data, [2, 2, 3, 8]);
    let inv = rope::inv_freq(8, 10000.0);
    let mut out = vec![0f32; data.len()];
    let odd = rope::Rope { dims: 7, traditional: false, inv_freq: &inv, scale: 1.0, offsets: &[0] };
    assert!(rope::rope(Isa::Portable, x, &odd, &mut out).is_err());
    let three = rope::Rope { dims: 8, traditional: false, inv_freq: &inv, scale: 1.0, offsets: &[0, 1, 2] };
    assert!(rope::rope(Isa::Portable, x, &three, &mut out).unwrap_err().contains("3 offsets"));
    let strided = View { data: &data, shape: [2, 2, 3, 4], strides: [48, 24, 8, 2] };
    let ok = rope::Rope { dims: 4, traditional: false, inv_freq: &inv[..2], scale: 1.0, offsets: &[0] };
    assert!(rope::rope(Isa::Portable, strided, &ok, &mut out[..48]).is_err());
}

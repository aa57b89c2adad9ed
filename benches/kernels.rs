//! criterion benches of the CPU kernels (src/kernels/) alone: quantized
//! matrix-vector products in GB/s of weights read (against this machine's
//! measured read bandwidth, printed first), quantized prefill products and
//! fused attention in GFLOP/s.
//!
//!   cargo bench --bench kernels
//!   PENSIEVE_KERNELS_ISA=avx2 cargo bench --bench kernels   # a lesser instruction set

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pensieve::kernels::attention::{self, Mask, View};
use pensieve::kernels::quant::{Path, QuantMatrix};
use pensieve::kernels::{threads, Isa};

fn init_blas() {
    let lib = std::path::PathBuf::from(env!("PENSIEVE_VENV")).join("lib");
    let sp = std::fs::read_dir(&lib).unwrap().flatten().map(|e| e.path().join("site-packages")).find(|p| p.is_dir()).unwrap();
    pensieve::blas::init(pensieve::config::BlasChoice::Auto, &sp);
}

fn matrix(rows: usize, cols: usize, bits: u32) -> QuantMatrix {
    let words = cols * bits as usize / 32;
    let mut x = 0x9E3779B97F4A7C15u64;
    let w: Vec<u32> = (0..rows * words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u32
        })
        .collect();
    // Exactly halves (as GGUF scales are): stored as halves.
    let s = vec![0.010742188f32; rows * cols / 32];
    QuantMatrix::from_mlx(&w, &s, &s, rows, cols, bits, 32).unwrap()
}

/// Read bandwidth: XOR-folding a 512 MiB buffer, on one thread and on all.
/// (Integer XOR is associative, so the compiler unrolls and vectorizes it
/// freely; a float sum, one chain of dependent adds, measured half of what
/// this machine reads.)
fn read_bandwidth() {
    let n: usize = 128 << 20;
    let data: Vec<u32> = (0..n as u32).collect();
    let sum = |d: &[u32]| d.iter().fold(0u32, |a, &v| a ^ v);
    let t = Instant::now();
    std::hint::black_box(sum(&data));
    let one = (n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let t = Instant::now();
    let k = threads();
    std::thread::scope(|s| {
        for c in data.chunks(n.div_ceil(k)) {
            s.spawn(move || std::hint::black_box(sum(c)));
        }
    });
    let all = (n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9;
    eprintln!(
        "read bandwidth: {one:.1} GB/s on one thread, {all:.1} GB/s on {k}; kernels use {} ({k} threads)",
        Isa::best().name()
    );
}

fn matvec(c: &mut Criterion) {
    init_blas();
    read_bandwidth();
    let mut g = c.benchmark_group("quantized matvec");
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500)).sample_size(20);
    // SmolLM2-135M's MLP up projection, a 1B model's, and a 49k-vocabulary head.
    for (rows, cols) in [(1536, 576), (8192, 2048), (49152, 576)] {
        for bits in [4u32, 8] {
            let m = matrix(rows, cols, bits);
            for n in [1usize, 2, 4, 8] {
                let x = vec![0.5f32; n * cols];
                let mut out = vec![0f32; n * rows];
                g.throughput(Throughput::Bytes(m.bytes() as u64));
                for path in [Path::Float, Path::Integer] {
                    let id = BenchmarkId::new(format!("{rows}x{cols} q{bits} {path:?}"), format!("n={n}"));
                    g.bench_with_input(id, &n, |b, &n| b.iter(|| m.matmul_path(Isa::best(), &x, n, &mut out, path)));
                }
            }
        }
    }
    g.finish();
}

fn prefill(c: &mut Criterion) {
    init_blas();
    let mut g = c.benchmark_group("quantized prefill matmul");
    g.measurement_time(Duration::from_secs(3)).sample_size(10);
    let (rows, cols, n) = (1536, 576, 512);
    for bits in [4u32, 8] {
        let m = matrix(rows, cols, bits);
        let x = vec![0.5f32; n * cols];
        let mut out = vec![0f32; n * rows];
        g.throughput(Throughput::Elements((2 * n * rows * cols) as u64));
        g.bench_function(format!("{n}x{cols} by {rows}x{cols} q{bits} (flops)"), |b| b.iter(|| m.matmul(&x, n, &mut out)));
    }
    g.finish();
}

fn attention_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("fused attention");
    g.measurement_time(Duration::from_secs(3)).sample_size(10);
    // SmolLM2-135M's heads: 9 query heads over 3 key/value heads of 64.
    let (hq, hkv, d) = (9, 3, 64);
    for (l, s) in [(512, 512), (512, 4096), (512, 8192), (1, 4096), (1, 300)] {
        let q = vec![0.1f32; hq * l * d];
        let k: Vec<f32> = (0..hkv * s * d).map(|i| (i % 7) as f32 * 0.1).collect();
        let v = k.clone();
        let mut out = vec![0f32; hq * l * d];
        // Causal: query i sees s - l + i + 1 keys.
        let pairs: usize = (0..l).map(|i| s - l + i + 1).sum();
        g.throughput(Throughput::Elements((4 * hq * pairs * d) as u64));
        g.bench_function(format!("{l} queries over {s} keys (flops)"), |b| {
            b.iter(|| {
                attention::attention(
                    Isa::best(),
                    View::contiguous(&q, [1, hq, l, d]),
                    View::contiguous(&k, [1, hkv, s, d]),
                    View::contiguous(&v, [1, hkv, s, d]),
                    0.125,
                    Mask::Causal,
                    &mut out,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, matvec, prefill, attention_bench);
criterion_main!(benches);

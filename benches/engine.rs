//! criterion benches through the engine (no HTTP): decode and prefill tokens/s,
//! batched throughput at 1, 4 and 8 concurrent sequences, and memory (process
//! RSS peak, MLX active/peak) at each concurrency.
//!
//!   cargo bench --bench engine                        # SmolLM-135M-shaped f32 model
//!   PENSIEVE_BENCH_SHAPE=smollm-360m cargo bench --bench engine
//!   PENSIEVE_BENCH_MODEL=/path/to/mlx/model cargo bench --bench engine

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pensieve::engine::{GenEvent, GenerateRequest};
use pensieve::{Config, EngineHandle};

use common::{greedy_chat, words};

const NEW_TOKENS: u64 = 64;
const PREFILL_TOKENS: usize = 512;

fn bench_model() -> String {
    if let Ok(m) = std::env::var("PENSIEVE_BENCH_MODEL") {
        return m;
    }
    let shape = std::env::var("PENSIEVE_BENCH_SHAPE").unwrap_or_else(|_| "smollm-135m".into());
    common::bench_model_dir(&shape)
}

/// Runs one generation to the end; returns (output tokens, time to first token).
async fn run_one(engine: &EngineHandle, req: GenerateRequest) -> (u32, Duration) {
    let t0 = Instant::now();
    let mut g = engine.generate(req).await.expect("admitted");
    let mut ttft = None;
    while let Some(ev) = g.next().await {
        match ev {
            GenEvent::Text(_) | GenEvent::Thinking(_) | GenEvent::ToolCall(_) => {
                ttft.get_or_insert_with(|| t0.elapsed());
            }
            GenEvent::Done { output_tokens, .. } => return (output_tokens, ttft.unwrap_or_else(|| t0.elapsed())),
            GenEvent::Error(e) => panic!("generation failed: {e}"),
            GenEvent::Logprob(_) => {}
        }
    }
    unreachable!()
}

fn rss_peak_reset() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn rss_peak() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmHWM")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0) * 1024
}

fn benches(c: &mut Criterion) {
    let mut cfg = Config::default_for_tests();
    cfg.model = vec![bench_model()];
    cfg.max_concurrent = 8;
    cfg.max_queue = 64;
    cfg.min_free_memory = 0;
    let engine = EngineHandle::start(&cfg).expect("engine loads the bench model");
    let rt = tokio::runtime::Runtime::new().unwrap();
    eprintln!("bench model {}, BLAS: {}", cfg.default_model(), engine.info().unwrap().blas);

    // Decode: a short prompt (prefix-cached after the first run), 64 new tokens.
    let mut g = c.benchmark_group("decode");
    g.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(25));
    g.throughput(Throughput::Elements(NEW_TOKENS));
    g.bench_function("single_stream_64_tokens", |b| {
        b.to_async(&rt).iter(|| async {
            let (n, _) = run_one(&engine, greedy_chat(words(1, 20), NEW_TOKENS)).await;
            assert!(n > 0);
        })
    });
    g.finish();

    // Prefill: a fresh 512-token-ish prompt every time (no cache hit), 1 new token.
    let mut g = c.benchmark_group("prefill");
    g.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(20));
    let probe = rt.block_on(engine.count_tokens(greedy_chat(words(7, PREFILL_TOKENS * 3 / 4), 1).prompt)).unwrap();
    g.throughput(Throughput::Elements(probe as u64));
    let mut seed = 100;
    g.bench_function(format!("prompt_{probe}_tokens"), |b| {
        b.to_async(&rt).iter(|| {
            seed += 1;
            let req = greedy_chat(words(seed, PREFILL_TOKENS * 3 / 4), 1);
            let engine = &engine;
            async move { run_one(engine, req).await }
        })
    });
    g.finish();

    // Batched: c concurrent sequences of 64 tokens; throughput = c * 64.
    let mut g = c.benchmark_group("concurrent");
    g.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(30));
    let mut memory = vec![];
    for conc in [1u64, 4, 8] {
        g.throughput(Throughput::Elements(conc * NEW_TOKENS));
        let mut round = 1000 * conc;
        g.bench_with_input(BenchmarkId::from_parameter(conc), &conc, |b, &conc| {
            b.to_async(&rt).iter(|| {
                round += 1;
                let reqs: Vec<_> = (0..conc).map(|i| greedy_chat(words(round * 10 + i, 60), NEW_TOKENS)).collect();
                let engine = &engine;
                async move { futures_util::future::join_all(reqs.into_iter().map(|r| run_one(engine, r))).await }
            })
        });
        // Memory at this concurrency, measured on one more wave.
        rss_peak_reset();
        let reqs: Vec<_> = (0..conc).map(|i| greedy_chat(words(99_000 + conc * 10 + i, 60), NEW_TOKENS)).collect();
        rt.block_on(futures_util::future::join_all(reqs.into_iter().map(|r| run_one(&engine, r))));
        std::thread::sleep(Duration::from_millis(1200)); // the engine refreshes its memory readings about once a second
        let m = *engine.status().memory.lock().unwrap();
        memory.push((conc, rss_peak(), m.mlx_active_bytes, m.mlx_peak_bytes, m.prompt_cache_bytes, m.kv_peak_bytes));
    }
    g.finish();

    println!("\nmemory by concurrency ({NEW_TOKENS} new tokens per sequence, ~80-token prompts):");
    println!("| concurrent | process RSS peak MiB | MLX active MiB | MLX peak MiB (since start) | prefix cache MiB | KV peak MiB (since start) |");
    println!("|---|---|---|---|---|---|");
    for (conc, rss, active, peak, pc, kv) in memory {
        println!("| {conc} | {} | {} | {} | {} | {} |", rss >> 20, active >> 20, peak >> 20, pc >> 20, kv >> 20);
    }
    engine.shutdown();
}

criterion_group!(engine, benches);
criterion_main!(engine);

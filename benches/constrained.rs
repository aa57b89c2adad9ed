//! What constrained decoding costs, printed as tables:
//! - schema compile time: a small schema, Claude Code's largest tool input
//!   schema, and all of Claude Code's tools as one forced-call grammar;
//! - mask time per token (grammar advance + mask), p50 / p99, along walks
//!   through those grammars that pick allowed tokens at random;
//! - aggregate decode tokens/s with 8 concurrent sequences, all constrained
//!   vs none (through the engine, no HTTP).
//!
//!   cargo bench --bench constrained        # builtin:smollm2 (49k vocab), then the smollm-135m bench model
//!   PENSIEVE_BENCH_MODELS=builtin:smollm2 cargo bench --bench constrained

mod common;

use std::time::{Duration, Instant};

use pensieve::constrain::Grammars;
use pensieve::engine::{ForceTool, GenEvent, GenerateRequest, ResponseFormat};
use pensieve::{Config, EngineHandle};
use serde_json::{json, Value};

use common::{bench_model_dir, greedy_chat, words};

const NEW_TOKENS: u64 = 128;
const CONCURRENT: usize = 8;
const ROUNDS: usize = 5;

fn claude_code_tools() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/claude-code-request.json"))
        .expect("the Claude Code request fixture");
    let v: Value = serde_json::from_str(&text).unwrap();
    let body = v.get("body").unwrap_or(&v);
    body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!({"type": "function", "function": {"name": t["name"], "description": "", "parameters": t["input_schema"]}}))
        .collect()
}

fn small_schema() -> Value {
    json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "today": {"type": "object", "properties": {"temp": {"type": "integer", "minimum": -30, "maximum": 45}, "sunny": {"type": "boolean"}},
                  "required": ["temp", "sunny"], "additionalProperties": false},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}},
        "required": ["city", "today"], "additionalProperties": false})
}

fn with_format(schema: Value) -> GenerateRequest {
    let mut r = greedy_chat("x".into(), 1);
    r.format = Some(ResponseFormat::JsonSchema(schema));
    r
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Walks a grammar `tokens` times (restarting when it ends), each step a
/// random allowed token; returns each mask's time in microseconds.
fn mask_times(g: &Grammars, lark: &str, tokens: usize, seed: u64) -> Vec<f64> {
    let compiled = g.compile(lark).expect("compiles");
    let n = g.n_vocab();
    let mut row = vec![0u8; n];
    let mut m = compiled.matcher();
    let mut last: Vec<u32> = vec![];
    let mut x = seed;
    let mut times = Vec::with_capacity(tokens);
    while times.len() < tokens {
        let t0 = Instant::now();
        m.advance_and_mask(&last, &mut row).expect("mask");
        times.push(t0.elapsed().as_secs_f64() * 1e6);
        let allowed: Vec<u32> = (0..n as u32).filter(|&t| row[t as usize] == 1).collect();
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let pick = allowed[(x >> 33) as usize % allowed.len()];
        if m.is_accepting() && g.token_bytes(pick).is_empty() || allowed.len() <= 2 && m.is_accepting() {
            m = compiled.matcher();
            last.clear();
            continue;
        }
        last = vec![pick];
    }
    times
}

/// One wave of `CONCURRENT` generations; returns (output tokens, seconds).
async fn wave(engine: &EngineHandle, round: u64, constrained: bool) -> (u64, f64) {
    // A string of at least 4000 characters: the grammar never lets a
    // sequence end before max_tokens, so both waves decode the same counts.
    let schema =
        json!({"type": "object", "properties": {"report": {"type": "string", "minLength": 4000}}, "required": ["report"]});
    let reqs: Vec<GenerateRequest> = (0..CONCURRENT as u64)
        .map(|i| {
            // Fresh prompts for every wave: both kinds prefill cold.
            let seed = round * 100 + i + if constrained { 50 } else { 0 };
            let mut r = greedy_chat(format!("Write a long story about {}.", words(seed, 30)), NEW_TOKENS);
            if constrained {
                r.format = Some(ResponseFormat::JsonSchema(schema.clone()));
            }
            r
        })
        .collect();
    let t0 = Instant::now();
    let outs = futures_util::future::join_all(reqs.into_iter().map(|r| async move {
        let mut g = engine.generate(r).await.expect("admitted");
        loop {
            match g.next().await {
                Some(GenEvent::Done { output_tokens, .. }) => return output_tokens as u64,
                Some(GenEvent::Error(e)) => panic!("generation failed: {e}"),
                None => return 0,
                _ => {}
            }
        }
    }))
    .await;
    (outs.iter().sum(), t0.elapsed().as_secs_f64())
}

fn bench(model: &str, rt: &tokio::runtime::Runtime) {
    let mut cfg = Config::default_for_tests();
    cfg.model = vec![model.to_string()];
    cfg.max_concurrent = CONCURRENT as u32;
    cfg.max_queue = 64;
    cfg.min_free_memory = 0;
    cfg.no_prompt_cache_persist = true;
    let engine = EngineHandle::start(&cfg).expect("engine loads the model");
    let g = engine.grammars().expect("the model has grammars").clone();
    println!("\n## {model} (vocabulary {} tokens)\n", g.n_vocab());

    // Compile times (uncached), median of 5.
    let tools = claude_code_tools();
    let largest = tools
        .iter()
        .max_by_key(|t| t["function"]["parameters"].to_string().len())
        .map(|t| (t["function"]["name"].as_str().unwrap().to_string(), t["function"]["parameters"].clone()))
        .unwrap();
    let mut grammars = vec![
        (format!("small schema ({} bytes)", small_schema().to_string().len()), g.grammar(&with_format(small_schema())).unwrap()),
        (
            format!("Claude Code's {} input schema ({} bytes)", largest.0, largest.1.to_string().len()),
            g.grammar(&with_format(largest.1.clone())).unwrap(),
        ),
    ];
    let mut forced = greedy_chat("x".into(), 1);
    forced.prompt.tools = tools.clone();
    forced.force_tool = Some(ForceTool::Any);
    match g.grammar(&forced) {
        Ok(lark) => grammars.push((format!("all {} Claude Code tools, one forced call", tools.len()), lark)),
        Err(e) => println!("(no forced-call grammar for this model: {})", e.message()),
    }
    println!("| grammar | compile ms (median of 5) | mask µs p50 | mask µs p99 |");
    println!("|---|---|---|---|");
    for (name, lark) in &grammars {
        let mut ms: Vec<f64> = (0..5).map(|_| g.compile_uncached(lark).expect("compiles").as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let mut t = mask_times(&g, lark, 3000, 7);
        t.sort_by(f64::total_cmp);
        println!("| {name} | {:.2} | {:.1} | {:.1} |", ms[2], percentile(&t, 0.5), percentile(&t, 0.99));
    }

    // c=8 aggregate tokens/s, alternating waves.
    rt.block_on(wave(&engine, 0, false));
    rt.block_on(wave(&engine, 1, true));
    let (mut free, mut constrained) = (vec![], vec![]);
    let (mut free_tokens, mut constrained_tokens) = (0, 0);
    for round in 0..ROUNDS as u64 {
        // Alternating which kind goes first.
        for constrained_wave in [round % 2 == 1, round % 2 == 0] {
            let (n, s) = rt.block_on(wave(&engine, 10 + round, constrained_wave));
            if constrained_wave {
                constrained.push(n as f64 / s);
                constrained_tokens += n;
            } else {
                free.push(n as f64 / s);
                free_tokens += n;
            }
        }
    }
    let per_seq = |n: u64| n as f64 / (ROUNDS * CONCURRENT) as f64;
    println!(
        "tokens per sequence: unconstrained {:.1}, constrained {:.1} (of {NEW_TOKENS}; fewer means sequences ended early and the batch shrank)",
        per_seq(free_tokens),
        per_seq(constrained_tokens)
    );
    free.sort_by(f64::total_cmp);
    constrained.sort_by(f64::total_cmp);
    let (f, c) = (free[ROUNDS / 2], constrained[ROUNDS / 2]);
    println!(
        "\nc={CONCURRENT}, {NEW_TOKENS} new tokens each (median of {ROUNDS} waves): unconstrained {f:.1} tok/s, all constrained {c:.1} tok/s ({:+.1}%)",
        (c / f - 1.0) * 100.0
    );
    engine.shutdown();
    std::thread::sleep(Duration::from_millis(200));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let models: Vec<String> = match std::env::var("PENSIEVE_BENCH_MODELS") {
        Ok(m) => m.split(',').map(str::to_string).collect(),
        Err(_) => vec![pensieve::config::BUILTIN_SMOLLM2.to_string(), bench_model_dir("smollm-135m")],
    };
    for m in models {
        bench(&m, &rt);
    }
}

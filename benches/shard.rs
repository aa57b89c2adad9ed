//! Sharded serving on this machine, over real HTTP, printed as a table:
//! per-rank peak memory (VmHWM) against the unsharded process, and the
//! tokens/s the collectives cost at 1 and 8 concurrent streams.
//!
//! The two ranks run on this machine's cores together, so this measures the
//! overhead of sharding (two processes, a ring all-reduce per layer half, a
//! broadcast per step), not a speed-up: on two machines each rank has its
//! own cores and memory bandwidth.
//!
//! The model is the random-weight `llama-1b` bench shape (float32, 4 GB;
//! made once under target/bench-models/): tensor parallel. Its Qwen2 twin
//! (same weights) runs the pipeline mode.
//!
//!   cargo bench --bench shard
//!   PENSIEVE_SHARD_BENCH_SHAPE=smollm-135m cargo bench --bench shard   # a quick run (pipeline only: 9 heads)

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{bench_model_dir, words};

const NEW_TOKENS: u64 = 64;

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGTERM lets rank 0 stop its ranks.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// GET `url`: (status, JSON body).
fn get(url: &str) -> Option<(u16, Value)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let r = reqwest::get(url).await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.json().await.unwrap_or(Value::Null)))
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(model: &str, extra: &[&str]) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_pensieve"))
        .args(["--model", model, "--port", &port.to_string(), "--no-prompt-cache-persist", "--max-concurrent", "8"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("the pensieve binary");
    let base = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        if let Some((200, _)) = get(&format!("{base}/health")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "the server did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    Server { child, base }
}

/// Peak resident memory of a process (VmHWM), bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

async fn stream(http: &reqwest::Client, base: &str, seed: u64) -> u64 {
    let body = json!({"model": "m", "max_tokens": NEW_TOKENS, "temperature": 0, "stream": true,
                      "messages": [{"role": "user", "content": format!("Write about {}.", words(seed, 8))}]});
    let mut r = http.post(format!("{base}/v1/messages")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut buf = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    buf.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["type"] == "message_delta")
        .map(|v| v["usage"]["output_tokens"].as_u64().unwrap())
        .next_back()
        .unwrap()
}

/// Aggregate tokens/s of `c` concurrent streams (median of 3 rounds).
fn tps(base: &str, c: usize) -> f64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    rt.block_on(stream(&http, base, 999)); // warm-up
    let mut runs: Vec<f64> = (0..3u64)
        .map(|round| {
            let t0 = Instant::now();
            let outs = rt.block_on(futures_util::future::join_all((0..c as u64).map(|i| stream(&http, base, round * 100 + i))));
            outs.iter().sum::<u64>() as f64 / t0.elapsed().as_secs_f64()
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[1]
}

struct Row {
    what: String,
    peaks: Vec<u64>,
    c1: f64,
    c8: f64,
}

fn measure(what: &str, model: &str, extra: &[&str]) -> Row {
    eprintln!("{what}...");
    let s = start(model, extra);
    let c1 = tps(&s.base, 1);
    let c8 = tps(&s.base, 8);
    let (_, h) = get(&format!("{}/health", s.base)).unwrap();
    let mut peaks = vec![peak_rss(s.child.id())];
    for r in h["shard"]["local_ranks"].as_array().into_iter().flatten() {
        peaks.push(peak_rss(r["pid"].as_u64().unwrap() as u32));
    }
    Row { what: what.to_string(), peaks, c1, c8 }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks
    }
    let shape = std::env::var("PENSIEVE_SHARD_BENCH_SHAPE").unwrap_or_else(|_| "llama-1b".into());
    let model = bench_model_dir(&shape);
    let twin = format!("{model}-qwen2");
    if !std::path::Path::new(&twin).join("model.safetensors").exists() {
        let ok = Command::new(format!("{}/bin/python", env!("PENSIEVE_VENV")))
            .args([concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_model.py"), "qwen2-twin", &model, &twin])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let port = |i: u16| (33000 + i * 10).to_string();
    let mut rows = vec![measure("unsharded (1 process)", &model, &[])];
    let heads: u64 = {
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(format!("{model}/config.json")).unwrap()).unwrap();
        cfg["num_key_value_heads"].as_u64().unwrap()
    };
    if heads.is_multiple_of(2) {
        rows.push(measure("tensor parallel, 2 ranks", &model, &["--ranks", "2", "--shard", "tensor", "--shard-port", &port(1)]));
    }
    rows.push(measure(
        "pipeline, 2 ranks (Qwen2 twin)",
        &twin,
        &["--ranks", "2", "--shard", "pipeline", "--shard-port", &port(2)],
    ));
    let base_peak = rows[0].peaks[0] as f64;
    println!("\nsharded serving: {shape} (float32), {NEW_TOKENS} new tokens per stream, two ranks on one 2-core machine");
    println!("| setup | peak RSS per rank (MiB) | vs unsharded | c=1 tok/s | c=8 tok/s |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let mib: Vec<String> = r.peaks.iter().map(|p| format!("{:.0}", *p as f64 / 1048576.0)).collect();
        let ratio = r.peaks.iter().map(|p| *p as f64 / base_peak).fold(0.0, f64::max);
        println!(
            "| {} | {} | {:.2}× | {:.1} ({:+.0}%) | {:.1} ({:+.0}%) |",
            r.what,
            mib.join(" / "),
            ratio,
            r.c1,
            100.0 * (r.c1 / rows[0].c1 - 1.0),
            r.c8,
            100.0 * (r.c8 / rows[0].c8 - 1.0)
        );
    }
}

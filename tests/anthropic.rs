//! The Anthropic Messages API against the real server and demo model.

mod common;

use common::{client, parse_sse, read_events, shared, start};
use serde_json::{json, Value};

fn hello(max_tokens: u64) -> Value {
    json!({"model": "claude-test", "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": "hello there, what is the weather in Paris?"}]})
}

fn text_of(msg: &Value) -> String {
    msg["content"].as_array().unwrap().iter().filter_map(|b| b["text"].as_str()).collect()
}

async fn stream(server: &common::TestServer, body: &Value) -> Vec<(String, Value)> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = client().post(server.url("/v1/messages")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    parse_sse(&r.text().await.unwrap())
}

/// Checks the event grammar and returns (text, final message_delta).
fn check_grammar(events: &[(String, Value)]) -> (String, Value) {
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).filter(|n| *n != "ping").collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
    let mut open: Option<u64> = None;
    let mut next_index = 0;
    let mut text = String::new();
    for (name, data) in events {
        assert_eq!(data["type"], name.as_str(), "event name matches data.type");
        match name.as_str() {
            "content_block_start" => {
                assert!(open.is_none());
                assert_eq!(data["index"], next_index);
                open = Some(next_index);
            }
            "content_block_delta" => {
                assert_eq!(data["index"].as_u64(), open);
                assert_eq!(data["delta"]["type"], "text_delta");
                text.push_str(data["delta"]["text"].as_str().unwrap());
            }
            "content_block_stop" => {
                assert_eq!(data["index"].as_u64(), open);
                open = None;
                next_index += 1;
            }
            "message_delta" => assert!(open.is_none(), "blocks closed before message_delta"),
            _ => {}
        }
    }
    let start = &events[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["content"], json!([]));
    assert!(start["stop_reason"].is_null());
    let delta = events.iter().find(|e| e.0 == "message_delta").unwrap().1.clone();
    (text, delta)
}

#[tokio::test]
async fn non_streaming_message_has_the_documented_shape() {
    let s = shared();
    let (status, m) = s.post("/v1/messages", &hello(8)).await;
    assert_eq!(status, 200, "{m}");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "claude-test", "the requested name is echoed");
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(m["stop_reason"], "max_tokens");
    assert!(m["stop_sequence"].is_null());
    assert_eq!(m["usage"]["output_tokens"], 8);
    // input = the rendered prompt's tokens (split into uncached + cache read).
    let (_, count) = s.post("/v1/messages/count_tokens", &hello(8)).await;
    let u = &m["usage"];
    let total = u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!(total, count["input_tokens"].as_u64().unwrap());
    assert!(total > 10);
}

#[tokio::test]
async fn streaming_follows_the_event_grammar_and_matches_non_streaming() {
    let s = shared();
    let body = hello(12);
    let events = stream(s, &body).await;
    let (text, delta) = check_grammar(&events);
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 12);
    let start_usage = &events[0].1["message"]["usage"];
    let prompt = start_usage["input_tokens"].as_u64().unwrap() + start_usage["cache_read_input_tokens"].as_u64().unwrap();
    let (_, count) = s.post("/v1/messages/count_tokens", &body).await;
    assert_eq!(prompt, count["input_tokens"].as_u64().unwrap());
    let (_, m) = s.post("/v1/messages", &body).await;
    assert_eq!(text, text_of(&m), "greedy stream and non-stream agree");
    assert!(!text.is_empty());
}

#[tokio::test]
async fn count_tokens_uses_the_real_tokenizer() {
    let s = shared();
    let short = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let long = json!({"model": "m", "messages": [{"role": "user", "content": "hi ".repeat(200)}]});
    let sys = json!({"model": "m", "system": "alpha bravo charlie", "messages": [{"role": "user", "content": "hi"}]});
    let (st, a) = s.post("/v1/messages/count_tokens", &short).await;
    assert_eq!(st, 200);
    let (_, b) = s.post("/v1/messages/count_tokens", &long).await;
    let (_, c) = s.post("/v1/messages/count_tokens", &sys).await;
    let (a, b, c) =
        (a["input_tokens"].as_u64().unwrap(), b["input_tokens"].as_u64().unwrap(), c["input_tokens"].as_u64().unwrap());
    assert!(a > 0 && b > a + 100 && c > a, "{a} {b} {c}");
}

#[tokio::test]
async fn stop_sequences_cut_text_and_are_reported() {
    let s = shared();
    let body = hello(24);
    let (_, m) = s.post("/v1/messages", &body).await;
    let text = text_of(&m);
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "greedy output too short: {text:?}");
    let mid = chars.len() / 2;
    let stop: String = chars[mid..mid + 3].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];

    let mut with_stop = body.clone();
    with_stop["stop_sequences"] = json!(["NEVER-APPEARS", stop]);
    let (_, m2) = s.post("/v1/messages", &with_stop).await;
    assert_eq!(m2["stop_reason"], "stop_sequence", "{m2}");
    assert_eq!(m2["stop_sequence"], stop.as_str());
    assert_eq!(text_of(&m2), expected);
    assert!(m2["usage"]["output_tokens"].as_u64().unwrap() <= 24);

    let events = stream(s, &with_stop).await;
    let (streamed, delta) = check_grammar(&events);
    assert_eq!(streamed, expected, "the stop sequence is never streamed");
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence");
    assert_eq!(delta["delta"]["stop_sequence"], stop.as_str());
}

#[tokio::test]
async fn huge_max_tokens_is_clamped_not_rejected() {
    // A 256-token context (--context-length) so that clamping is quick to
    // reach; the random-weight model never ends a reply by itself.
    let mut cfg = common::config();
    cfg.context_length = Some(256);
    let s = start(cfg);
    let (_, h) = s.get("/health").await;
    assert_eq!(h["model"]["context_length"], 256, "{h}");
    assert!(h["model"]["model_context_length"].as_u64().unwrap() > 256, "{h}");

    // Claude Code's max_tokens (128000): clamped to what fits after the prompt.
    let (st, m) = s.post("/v1/messages", &hello(128_000)).await;
    assert_eq!(st, 200, "{m}");
    let prompt = m["usage"]["input_tokens"].as_u64().unwrap();
    assert_eq!(m["usage"]["output_tokens"].as_u64().unwrap(), 256 - prompt, "{m}");
    assert_eq!(m["stop_reason"], "max_tokens");

    // Streamed: the same clamp, told in message_delta.
    let mut body = hello(128_000);
    body["stream"] = json!(true);
    let r = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let evs = common::parse_sse(&r.text().await.unwrap());
    let delta = &evs.iter().find(|e| e.0 == "message_delta").unwrap().1;
    assert_eq!(delta["usage"]["output_tokens"].as_u64().unwrap(), 256 - prompt, "{delta}");
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");

    // OpenAI: the same clamp, finish_reason "length".
    let (st, c) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "m", "max_tokens": 100_000, "temperature": 0,
        "messages": [{"role": "user", "content": "hello there, what is the weather in Paris?"}]}),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    let p = c["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(c["usage"]["completion_tokens"].as_u64().unwrap(), 256 - p, "{c}");
    assert_eq!(c["choices"][0]["finish_reason"], "length");

    // A max_tokens that fits is kept as sent.
    let (_, m) = s.post("/v1/messages", &hello(7)).await;
    assert_eq!(m["usage"]["output_tokens"], 7);
    // A prompt that leaves no room is refused, in the words Claude Code parses.
    let mut long = hello(10);
    long["messages"][0]["content"] = json!("weather in Paris ".repeat(200));
    let (st, e) = s.post("/v1/messages", &long).await;
    assert_eq!(st, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("tokens > 255 maximum"), "{e}");
}

#[tokio::test]
async fn the_claude_code_request_streams_as_is() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/claude-code-request.json");
    let text = std::fs::read_to_string(path).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let s = start(common::config());
    let mut req = client().post(s.url(fixture["path"].as_str().unwrap()));
    for (k, v) in fixture["headers"].as_object().unwrap() {
        if k.eq_ignore_ascii_case("accept-encoding") || k.eq_ignore_ascii_case("connection") {
            continue;
        }
        req = req.header(k, v.as_str().unwrap());
    }
    let mut r = req.body(fixture["body"].to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let evs = read_events(&mut r, 6).await;
    assert_eq!(evs[0].0, "message_start");
    assert_eq!(evs[0].1["message"]["model"], "claude-opus-5-5");
    let usage = &evs[0].1["message"]["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 1000, "{usage}");
    assert!(evs.iter().any(|e| e.0 == "content_block_start"));
    assert!(evs.iter().any(|e| e.0 == "content_block_delta"));
    drop(r); // Claude Code's max_tokens is 128000: hang up rather than wait.
    s.wait_idle(10).await;
}

#[tokio::test]
async fn errors_use_the_anthropic_shape_and_the_server_keeps_serving() {
    let s = shared();
    let c = client();
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("POST", "/v1/messages", Some("{not json".into()), 400, "invalid_request_error"),
        ("POST", "/v1/messages", Some("".into()), 400, "invalid_request_error"),
        ("POST", "/v1/messages", Some(r#"{"model":"m","max_tokens":5,"messages":[]}"#.into()), 400, "invalid_request_error"),
        ("POST", "/v1/messages", Some(r#"{"model":"m","max_tokens":5}"#.into()), 400, "invalid_request_error"),
        (
            "POST",
            "/v1/messages",
            Some(r#"{"model":"m","max_tokens":"5","messages":[{"role":"user","content":"x"}]}"#.into()),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/messages",
            Some(r#"{"model":"m","max_tokens":5,"messages":[{"role":"robot","content":"x"}]}"#.into()),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/messages",
            Some(r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":null}]}"#.into()),
            400,
            "invalid_request_error",
        ),
        ("POST", "/v1/messages", Some(r#"[1,2,3]"#.into()), 400, "invalid_request_error"),
        (
            "POST",
            "/v1/messages",
            Some(r#"{"model":"m","max_tokens":5,"stop_sequences":[""],"messages":[{"role":"user","content":"x"}]}"#.into()),
            400,
            "invalid_request_error",
        ),
        ("POST", "/v1/messages/count_tokens", Some(r#"{"model":"m","messages":"hi"}"#.into()), 400, "invalid_request_error"),
        ("GET", "/v1/nope", None, 404, "not_found_error"),
        ("GET", "/v1/messages", None, 405, "invalid_request_error"),
        ("DELETE", "/health", None, 405, "invalid_request_error"),
    ];
    for (method, path, body, status, kind) in cases {
        let mut req = c.request(method.parse().unwrap(), s.url(path));
        if let Some(b) = &body {
            req = req.header("content-type", "application/json").body(b.clone());
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path} {body:?}");
        assert!(r.headers().contains_key("request-id"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{method} {path} {body:?}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (st, _) = s.post("/v1/messages", &hello(2)).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn query_strings_and_version_headers_are_accepted() {
    let s = shared();
    let r = client()
        .post(s.url("/v1/messages?beta=true"))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14")
        .json(&hello(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn auth_accepts_x_api_key_and_bearer_and_leaves_health_open() {
    let mut cfg = common::config();
    cfg.api_key = Some("sekrit".into());
    let s = start(cfg);
    let c = client();
    let url = s.url("/v1/messages");
    let r = c.post(&url).json(&hello(2)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = c.post(&url).header("x-api-key", "wrong").json(&hello(2)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.post(&url).header("x-api-key", "sekrit-but-longer").json(&hello(2)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.post(&url).header("x-api-key", "sekrit").json(&hello(2)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.post(&url).bearer_auth("sekrit").json(&hello(2)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Auth off (the shared server): no key needed.
    let (st, _) = shared().post("/v1/messages", &hello(1)).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn models_and_health() {
    let s = shared();
    let (st, m) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    assert_eq!(m["has_more"], false);
    let d = &m["data"][0];
    assert_eq!(d["type"], "model");
    assert_eq!(d["id"], "pensieve-demo-random");
    assert!(d["display_name"].is_string());
    assert!(d["created_at"].as_str().unwrap().ends_with('Z'));
    let (st, h) = s.get("/health").await;
    assert_eq!(st, 200);
    assert_eq!(h["engine"], "ready");
    assert!(h["model"]["weights_bytes"].as_u64().unwrap() > 0);
    assert!(h["memory"]["mlx_active_bytes"].as_u64().unwrap() > 0);
    assert!(h["memory"]["mlx_peak_bytes"].as_u64().unwrap() >= h["memory"]["mlx_active_bytes"].as_u64().unwrap());
    assert!(h["memory"]["process_rss_bytes"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn full_slots_and_queue_answer_529_with_retry_after() {
    let mut cfg = common::config();
    cfg.max_concurrent = 1;
    cfg.max_queue = 0;
    let s = start(cfg);
    let mut long = hello(100_000);
    long["stream"] = json!(true);
    let mut holder = client().post(s.url("/v1/messages")).json(&long).send().await.unwrap();
    read_events(&mut holder, 3).await;
    let r = client().post(s.url("/v1/messages")).json(&hello(2)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 529);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    drop(holder);
    s.wait_idle(10).await;
    let (st, _) = s.post("/v1/messages", &hello(2)).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn requests_beyond_max_concurrent_queue_and_all_complete() {
    let mut cfg = common::config();
    cfg.max_concurrent = 2;
    cfg.max_queue = 16;
    let s = start(cfg);
    let (_, alone) = s.post("/v1/messages", &hello(16)).await;
    let body = hello(16);
    let futs = (0..6).map(|_| s.post("/v1/messages", &body));
    let results = futures_util::future::join_all(futs).await;
    for (st, m) in results {
        assert_eq!(st, 200, "{m}");
        assert_eq!(text_of(&m), text_of(&alone), "greedy output is the same in a batch as alone");
    }
    s.wait_idle(5).await;
}

/// Sequences of different lengths join a running batch at different times
/// (merged caches with left padding), leave it early (max_tokens), and the
/// last one runs alone again: greedy text must match each prompt run alone.
#[tokio::test]
async fn greedy_output_is_the_same_alone_and_in_a_changing_batch() {
    let mut cfg = common::config();
    cfg.max_concurrent = 4;
    cfg.prompt_cache_bytes = 0; // every run prefills its whole prompt
    assert!(alone_vs_batched(cfg).await >= 2, "sequences shared decode steps");
}

/// The same with prompts prefilled in 7-token chunks and a decode step
/// between every chunk: long prompts interleave with running streams.
#[tokio::test]
async fn greedy_output_is_the_same_with_chunked_prefill_between_decode_steps() {
    let mut cfg = common::config();
    cfg.max_concurrent = 4;
    cfg.prompt_cache_bytes = 0;
    cfg.prefill_step = 7;
    cfg.max_decode_stall_ms = 0;
    assert!(alone_vs_batched(cfg).await >= 2, "sequences shared decode steps");
}

/// A model whose attention cannot take batch masks (Gemma 2's soft-capping)
/// is found out at load and served one sequence at a time: concurrent
/// requests all succeed, each with the text it gets alone.
#[tokio::test]
async fn a_model_that_cannot_batch_is_served_one_sequence_at_a_time() {
    let dir = std::env::temp_dir().join(format!("pensieve-demo-gemma2-{}", std::process::id()));
    let maker = concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_model.py");
    let made = std::process::Command::new(common::config().venv_dir().join("bin/python"))
        .args([maker, "demo-gemma2", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let mut cfg = common::config();
    cfg.model = vec![dir.to_string_lossy().into()];
    cfg.max_concurrent = 4;
    cfg.prompt_cache_bytes = 0;
    let (_, h) = start(cfg.clone()).get("/health").await;
    assert_eq!(h["model"]["type"], "gemma2");
    assert_eq!(h["model"]["batching"], false, "{h}");
    assert_eq!(alone_vs_batched(cfg).await, 1, "one sequence at a time, never a batch");
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs the comparison; returns the most sequences that shared a decode step.
async fn alone_vs_batched(cfg: pensieve::Config) -> u64 {
    let s = start(cfg);
    let ask = |i: usize| {
        let words = "tell me about the weather in the city and the harbour today ".repeat(i * 3 + 1);
        json!({"model": "m", "max_tokens": 64 + 16 * i as u64, "temperature": 0,
               "messages": [{"role": "user", "content": words}]})
    };
    let mut alone = vec![];
    for i in 0..4 {
        let (st, m) = s.post("/v1/messages", &ask(i)).await;
        assert_eq!(st, 200, "{m}");
        alone.push(text_of(&m));
    }
    let futs = (0..4).map(|i| {
        let s = &s;
        let body = ask(i);
        async move {
            // All in flight at once: they join one by one as their prefills
            // finish (shortest first) and leave as their max_tokens run out.
            tokio::time::sleep(std::time::Duration::from_millis(5 * i as u64)).await;
            s.post("/v1/messages", &body).await
        }
    });
    let results = futures_util::future::join_all(futs).await;
    for (i, (st, m)) in results.into_iter().enumerate() {
        assert_eq!(st, 200, "{m}");
        assert_eq!(m["usage"]["output_tokens"], 64 + 16 * i as u64);
        assert_eq!(text_of(&m), alone[i], "request {i}: batched greedy text differs from alone");
    }
    s.wait_idle(5).await;
    s.get("/health").await.1["slots"]["peak_batch"].as_u64().unwrap()
}

#[tokio::test]
async fn low_memory_is_refused_with_529() {
    let mut cfg = common::config();
    cfg.min_free_memory = u64::MAX / 2;
    let s = start(cfg);
    let r = client().post(s.url("/v1/messages")).json(&hello(2)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 529);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("memory is low"));
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    let mut cfg = common::config();
    cfg.max_concurrent = 1;
    cfg.max_queue = 0;
    let s = start(cfg);
    let mut body = hello(50_000);
    body["stream"] = json!(true);
    let mut r = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    read_events(&mut r, 5).await;
    let (_, h) = s.get("/health").await;
    assert_eq!(h["slots"]["in_use"], 1);
    drop(r);
    s.wait_idle(10).await;
    // The engine drops the sequence at its next step (one token may land meanwhile).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let generated = s.get("/health").await.1["generated_tokens"].as_u64().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(s.get("/health").await.1["generated_tokens"].as_u64().unwrap(), generated, "generation stopped");
    // What the cancelled turn computed stays in the prefix cache: the same
    // conversation sent again (as clients do after an interrupt) reuses it.
    let (st, again) = s.post("/v1/messages", &hello(2)).await;
    assert_eq!(st, 200);
    let prompt = again["usage"]["input_tokens"].as_u64().unwrap() + again["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert!(again["usage"]["cache_read_input_tokens"].as_u64().unwrap() >= prompt - 1, "{again}");
}

#[tokio::test]
async fn a_non_streaming_client_that_hangs_up_frees_its_slot() {
    let mut cfg = common::config();
    cfg.max_concurrent = 1;
    let s = start(cfg);
    let short = reqwest::Client::builder().timeout(std::time::Duration::from_millis(500)).build().unwrap();
    let err = short.post(s.url("/v1/messages")).json(&hello(50_000)).send().await;
    assert!(err.is_err(), "timed out client side");
    s.wait_idle(10).await;
}

#[tokio::test]
async fn a_python_exception_fails_only_its_request() {
    let mut cfg = common::config();
    cfg.enable_fault_injection = true;
    let s = start(cfg);
    let c = client();
    // A healthy stream runs alongside the failing ones.
    let mut ok_body = hello(40);
    ok_body["stream"] = json!(true);
    let healthy = c.post(s.url("/v1/messages")).json(&ok_body).send();

    let r = c.post(s.url("/v1/messages")).header("x-pensieve-fault", "raise-after=3").json(&hello(40)).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    common::assert_internal_error(&v, "RuntimeError", "injected fault");

    let mut sb = hello(40);
    sb["stream"] = json!(true);
    let r = c.post(s.url("/v1/messages")).header("x-pensieve-fault", "raise-after=3").json(&sb).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let evs = parse_sse(&r.text().await.unwrap());
    let last = evs.last().unwrap();
    assert_eq!(last.0, "error", "{evs:?}");
    assert_eq!(last.1["error"]["type"], "api_error");
    common::assert_internal_error(&last.1, "RuntimeError", "injected fault");
    assert!(evs.iter().any(|e| e.0 == "content_block_delta"), "some tokens came before the error");

    let healthy = healthy.await.unwrap();
    let (text, delta) = {
        let evs = parse_sse(&healthy.text().await.unwrap());
        let d = evs.iter().find(|e| e.0 == "message_delta").expect("healthy stream completed").1.clone();
        (evs.len(), d)
    };
    assert!(text > 3);
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    s.wait_idle(5).await;
    let (st, _) = s.post("/v1/messages", &hello(2)).await;
    assert_eq!(st, 200);
}

#[test]
fn a_bad_model_path_fails_before_listening() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pensieve"))
        .args(["--model", "/nonexistent/models/llama", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/models/llama"), "{err}");
    assert!(!err.contains("serving"), "{err}");

    let dir = std::env::temp_dir().join(format!("pensieve-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pensieve"))
        .args(["--model", dir.to_str().unwrap(), "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json") && err.contains("safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn follow_up_turns_reuse_the_prefix_cache() {
    let s = start(common::config());
    let first = json!({"model": "m", "max_tokens": 8, "temperature": 0,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.328.593; cc_entrypoint=sdk-cli;"},
                   {"type": "text", "text": "You are a helpful assistant. ".repeat(40)}],
        "messages": [{"role": "user", "content": "tell me about the weather in Paris ".repeat(10)}]});
    let (_, m1) = s.post("/v1/messages", &first).await;
    assert_eq!(m1["usage"]["cache_read_input_tokens"], 0, "cold: {m1}");
    let prompt1 = m1["usage"]["input_tokens"].as_u64().unwrap();

    // Next turn: the whole conversation again plus a new question; the
    // billing header's hash changed, which must not spoil the match.
    let mut second = first.clone();
    second["system"][0]["text"] = json!("x-anthropic-billing-header: cc_version=2.1.328.a1b; cc_entrypoint=sdk-cli;");
    second["messages"] = json!([
        first["messages"][0],
        {"role": "assistant", "content": text_of(&m1)},
        {"role": "user", "content": "and tomorrow?"}
    ]);
    let (_, m2) = s.post("/v1/messages", &second).await;
    let cached = m2["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert!(cached >= prompt1 - 1, "the first turn's prompt is reused: {cached} of {prompt1}: {m2}");
    let (_, count) = s.post("/v1/messages/count_tokens", &second).await;
    assert_eq!(cached + m2["usage"]["input_tokens"].as_u64().unwrap(), count["input_tokens"].as_u64().unwrap());

    // A cached prefix gives the same greedy output as a cold run would.
    let cold = start(common::config());
    let (_, m2_cold) = cold.post("/v1/messages", &second).await;
    assert_eq!(m2_cold["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(text_of(&m2), text_of(&m2_cold));
}

/// A graceful restart keeps warm prefixes: the prefix cache is saved at
/// shutdown and restored at start (into the same model only), and a
/// restored prefix gives the same greedy text as a cold run.
#[tokio::test]
async fn the_prefix_cache_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("pensieve-prompt-cache-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let persisting = |model: &str| {
        let mut cfg = common::config();
        cfg.model = vec![model.into()];
        cfg.no_prompt_cache_persist = false;
        cfg.prompt_cache_dir = Some(dir.clone());
        cfg
    };
    let first = json!({"model": "m", "max_tokens": 8, "temperature": 0,
        "system": "You are a helpful assistant. ".repeat(30),
        "messages": [{"role": "user", "content": "tell me about the weather in Paris ".repeat(8)}]});
    let (s, stop, done) = common::start_controlled(persisting(pensieve::config::BUILTIN_RANDOM));
    let (_, m1) = s.post("/v1/messages", &first).await;
    let prompt1 = m1["usage"]["input_tokens"].as_u64().unwrap();
    stop.send(()).unwrap();
    tokio::task::spawn_blocking(move || done.recv_timeout(std::time::Duration::from_secs(30))).await.unwrap().unwrap();
    let saved = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(saved, 1, "one model folder under {}", dir.display());

    let second = json!({"model": "m", "max_tokens": 8, "temperature": 0, "system": first["system"],
        "messages": [first["messages"][0], {"role": "assistant", "content": text_of(&m1)},
                     {"role": "user", "content": "and tomorrow?"}]});
    // Another model must not pick up these entries, even one whose token
    // ids are the same (a copy with the same tokenizer and template), nor
    // the same path once its weights are replaced.
    let copy = common::copy_of_random_model("prefix-cache-other-model");
    let copy_str = copy.to_string_lossy().to_string();
    for round in ["another model", "its weights replaced in place"] {
        if round != "another model" {
            let w = copy.join("model.safetensors");
            let bytes = std::fs::read(&w).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            std::fs::write(&w, bytes).unwrap();
        }
        let (other, stop_other, done_other) = common::start_controlled(persisting(&copy_str));
        let (_, o) = other.post("/v1/messages", &first).await;
        assert_eq!(o["usage"]["input_tokens"].as_u64().unwrap(), prompt1, "{round}: the same ids: {o} vs {m1}");
        assert_eq!(o["usage"]["cache_read_input_tokens"], 0, "{round}: {o}");
        stop_other.send(()).unwrap();
        tokio::task::spawn_blocking(move || done_other.recv_timeout(std::time::Duration::from_secs(30))).await.unwrap().unwrap();
    }
    std::fs::remove_dir_all(&copy).ok();

    let (restarted, stop_restarted, done_restarted) = common::start_controlled(persisting(pensieve::config::BUILTIN_RANDOM));
    let (_, m2) = restarted.post("/v1/messages", &second).await;
    let cached = m2["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert!(cached >= prompt1 - 1, "restored prefix reused: {cached} of {prompt1}: {m2}");
    let cold = start(common::config());
    let (_, m2_cold) = cold.post("/v1/messages", &second).await;
    assert_eq!(m2_cold["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(text_of(&m2), text_of(&m2_cold));
    stop_restarted.send(()).unwrap();
    tokio::task::spawn_blocking(move || done_restarted.recv_timeout(std::time::Duration::from_secs(30))).await.unwrap().unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3, "one folder per model (and per set of weights)");
    std::fs::remove_dir_all(&dir).ok();
}

/// The prefix cache holds what fits in --prompt-cache-bytes and lets the
/// least recently used entry go first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_evicts_the_least_recently_used_at_its_byte_budget() {
    let conv = |topic: &str| {
        json!({"model": "m", "max_tokens": 1, "temperature": 0,
               "messages": [{"role": "user", "content": format!("{topic} weather report. ").repeat(20)}]})
    };
    let cache_bytes = |h: &Value| h["memory"]["prompt_cache_bytes"].as_u64().unwrap();
    let read = |m: &Value| m["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    // Each conversation's entry size, on a server with room for all.
    let roomy = start(common::config());
    let mut sizes = vec![];
    for topic in ["alpha", "bravo", "charlie"] {
        let before = cache_bytes(&roomy.get("/health").await.1);
        roomy.post("/v1/messages", &conv(topic)).await;
        sizes.push(cache_bytes(&roomy.get("/health").await.1) - before);
    }
    assert!(sizes.iter().all(|&b| b > 0), "{sizes:?}");
    let (a, b, c) = (sizes[0], sizes[1], sizes[2]);

    // Room for alpha and charlie, not for all three.
    let mut cfg = common::config();
    cfg.prompt_cache_bytes = a + c + b / 2;
    let s = start(cfg);
    // A hit serves the whole prompt but its last token; a miss only the
    // template's opening that every conversation shares.
    let hit = |m: &Value| read(m) + 1 >= m["usage"]["input_tokens"].as_u64().unwrap();
    let miss = |m: &Value| read(m) < 10;
    for topic in ["alpha", "bravo"] {
        let (_, m) = s.post("/v1/messages", &conv(topic)).await;
        assert!(miss(&m), "{topic} is new: {m}");
    }
    // alpha again: a hit, and now the most recently used.
    let (_, m) = s.post("/v1/messages", &conv("alpha")).await;
    assert!(hit(&m), "{m}");
    // charlie needs room: bravo (least recently used) goes, alpha stays.
    let (_, m) = s.post("/v1/messages", &conv("charlie")).await;
    assert!(miss(&m), "{m}");
    let (_, h) = s.get("/health").await;
    assert_eq!(cache_bytes(&h), a + c, "alpha and charlie kept, within the budget: {h}");
    let (_, m) = s.post("/v1/messages", &conv("alpha")).await;
    assert!(hit(&m), "alpha was kept: {m}");
    let (_, m) = s.post("/v1/messages", &conv("bravo")).await;
    assert!(miss(&m), "bravo was evicted: {m}");
}

/// A prompt served from the prefix cache joins a running batch of prompts
/// of other lengths and still produces exactly what it produces cold and alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prompt_joining_a_batch_of_other_lengths_gives_the_same_tokens() {
    let s = start(common::config());
    let probe = json!({"model": "m", "max_tokens": 48, "temperature": 0,
        "messages": [{"role": "user", "content": "what is the weather in Paris tomorrow? ".repeat(6)}]});
    let (_, cold) = s.post("/v1/messages", &probe).await;
    assert_eq!(cold["usage"]["cache_read_input_tokens"], 0);
    // Two long streams of other prompt lengths, read to the end as they
    // come, decoding when the probe arrives.
    let mut streams = vec![];
    for n in [1, 11] {
        let body = json!({"model": "m", "max_tokens": 1500, "temperature": 0, "stream": true,
            "messages": [{"role": "user", "content": "rain in Oslo ".repeat(n)}]});
        let mut r = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
        read_events(&mut r, 4).await; // decoding
        streams.push(tokio::spawn(async move { while r.chunk().await.unwrap().is_some() {} }));
    }
    let (_, warm) = s.post("/v1/messages", &probe).await;
    let (_, h) = s.get("/health").await;
    assert!(warm["usage"]["cache_read_input_tokens"].as_u64().unwrap() > 0, "{warm}");
    assert_eq!(text_of(&warm), text_of(&cold));
    assert_eq!(h["slots"]["in_use"], 2, "both streams still ran when the probe ended: {h}");
    assert!(h["slots"]["peak_batch"].as_u64().unwrap() >= 3, "the probe decoded beside both streams: {h}");
    for t in streams {
        t.await.unwrap();
    }
}

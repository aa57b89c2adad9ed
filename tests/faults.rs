//! Limits and fault paths: oversize and slow requests, shutdown drain,
//! engine death, metrics.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{client, config, parse_sse, read_events, start, start_controlled};
use pensieve::server::RunOutcome;
use serde_json::{json, Value};

fn hello(max_tokens: u64) -> Value {
    json!({"model": "m", "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": "hello"}]})
}

fn addr(s: &common::TestServer) -> String {
    s.base.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn oversize_bad_type_and_bad_bytes_are_4xx() {
    let mut cfg = config();
    cfg.max_body_bytes = 2048;
    let s = start(cfg);
    let big = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let r = client().post(s.url("/v1/messages")).json(&big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "request_too_large");
    // Chunked (no content-length) oversize bodies are caught while reading.
    let chunks = futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1000])));
    let r = client()
        .post(s.url("/v1/messages"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    let r = client()
        .post(s.url("/v1/messages"))
        .header("content-type", "text/plain")
        .body(hello(2).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let r = client()
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(vec![b'{', 0xff, 0xfe, b'}'])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "OpenAI shape: {v}");
    let (st, _) = s.post("/v1/messages", &hello(2)).await;
    assert_eq!(st, 200);
}

#[test]
fn a_client_that_stalls_in_its_headers_is_disconnected() {
    let mut cfg = config();
    cfg.header_timeout = 1;
    let s = start(cfg);
    let mut tcp = std::net::TcpStream::connect(addr(&s)).unwrap();
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf);
    assert!(t.elapsed() < Duration::from_secs(5), "closed after the header timeout, not {:?}", t.elapsed());
}

#[test]
fn a_client_that_stalls_in_its_body_gets_408() {
    let mut cfg = config();
    cfg.body_timeout = 1;
    let s = start(cfg);
    let mut tcp = std::net::TcpStream::connect(addr(&s)).unwrap();
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"")
        .unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    let n = tcp.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
}

#[tokio::test]
async fn shutdown_drains_running_streams_then_stops() {
    let (s, stop, done) = start_controlled(config());
    let mut body = hello(40);
    body["stream"] = json!(true);
    let mut r = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    read_events(&mut r, 3).await;
    stop.send(()).unwrap();
    // The running stream still finishes normally...
    let rest = r.text().await.unwrap();
    let evs = parse_sse(&rest);
    assert_eq!(evs.last().unwrap().0, "message_stop", "{evs:?}");
    let delta = evs.iter().find(|e| e.0 == "message_delta").unwrap();
    assert_eq!(delta.1["usage"]["output_tokens"], 40);
    // ...and then run returns; nothing listens any more.
    let outcome = tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(20))).await.unwrap().unwrap();
    assert_eq!(outcome, RunOutcome::Shutdown);
    assert!(client().get(s.url("/health")).send().await.is_err());
}

#[tokio::test]
async fn shutdown_timeout_cancels_streams_with_an_error_event() {
    let mut cfg = config();
    cfg.shutdown_timeout = 1;
    let (s, stop, done) = start_controlled(cfg);
    let mut body = hello(100_000);
    body["stream"] = json!(true);
    let mut r = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    read_events(&mut r, 3).await;
    let t = Instant::now();
    stop.send(()).unwrap();
    let evs = parse_sse(&r.text().await.unwrap());
    let last = evs.last().unwrap();
    assert_eq!(last.0, "error", "{last:?}");
    assert!(last.1["error"]["message"].as_str().unwrap().contains("shutting down"));
    assert!(t.elapsed() < Duration::from_secs(10));
    let outcome = tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(20))).await.unwrap().unwrap();
    assert_eq!(outcome, RunOutcome::Shutdown);
}

#[tokio::test]
async fn engine_death_turns_health_503_and_ends_run() {
    let mut cfg = config();
    cfg.enable_fault_injection = true;
    let (s, _stop, done) = start_controlled(cfg);
    let r = client().post(s.url("/v1/messages")).header("x-pensieve-fault", "kill-engine").json(&hello(5)).send().await;
    if let Ok(r) = r {
        assert!(r.status().is_server_error(), "{}", r.status());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
    }
    let outcome = tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(20))).await.unwrap().unwrap();
    assert_eq!(outcome, RunOutcome::EngineDied);
}

#[tokio::test]
async fn a_dead_engine_fails_requests_fast_while_draining() {
    // A second server, killed, then probed before its run() finishes
    // draining: health says 503 and generation requests fail at once.
    let mut cfg = config();
    cfg.enable_fault_injection = true;
    cfg.shutdown_timeout = 30;
    let s = start(cfg);
    // Hold a slot so run() keeps draining (the listener closes, but this
    // test reads health through an already-open keep-alive connection).
    let c = client();
    let (st, _) = s.get("/health").await;
    assert_eq!(st, 200);
    let _ = c.post(s.url("/v1/messages")).header("x-pensieve-fault", "kill-engine").json(&hello(5)).send().await;
    let t = Instant::now();
    loop {
        match c.get(s.url("/health")).send().await {
            Ok(r) if r.status() == 503 => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["engine"], "stopped");
                break;
            }
            Ok(_) => {}
            Err(_) => break, // already closed: also a clear signal
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_expose_requests_tokens_and_slots() {
    let s = start(config());
    // Counters are process-wide (several servers share a test process): compare before and after.
    let count = |text: &str, name: &str| -> f64 {
        text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    let before = s.get_text("/metrics").await.1;
    let (st, _) = s.post("/v1/messages", &hello(4)).await;
    assert_eq!(st, 200);
    let mut body = hello(4);
    body["stream"] = json!(true);
    let r = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    let _ = r.text().await.unwrap();
    let _ = client().post(s.url("/v1/messages")).body("{").header("content-type", "application/json").send().await.unwrap();
    s.wait_idle(5).await;
    let (st, text) = s.get_text("/metrics").await;
    assert_eq!(st, 200);
    for name in [
        "pensieve_requests_total",
        "pensieve_request_duration_seconds_bucket",
        "pensieve_ttft_seconds_bucket",
        "pensieve_input_tokens_total",
        "pensieve_output_tokens_total",
        "pensieve_cached_tokens_total",
        "pensieve_decode_tokens_per_second",
        "pensieve_running_sequences",
        "pensieve_queue_depth",
        "pensieve_slots_in_use",
        "pensieve_prompt_cache_bytes",
        "pensieve_process_rss_bytes",
        "pensieve_mlx_active_bytes",
        "pensieve_mlx_peak_bytes",
        "pensieve_engine_up",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(text.contains(r#"route="messages",status="200""#), "{text}");
    // The values move with what this test did (other tests may add more, never less).
    let ok = r#"pensieve_requests_total{route="messages",status="200"}"#;
    assert!(count(&text, ok) - count(&before, ok) >= 2.0, "two generations counted");
    assert!(count(&text, "pensieve_output_tokens_total") - count(&before, "pensieve_output_tokens_total") >= 8.0);
    assert!(text.contains(r#"status="400""#), "{text}");
    let slots: f64 = text
        .lines()
        .find(|l| l.starts_with("pensieve_slots_in_use "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert_eq!(slots, 0.0);
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let s = start(config());
    for (method, path) in [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/nope"), ("POST", "/v1/messages")] {
        let r = client().request(method.parse().unwrap(), s.url(path)).json(&hello(1)).send().await.unwrap();
        let id = r.headers().get("request-id").unwrap().to_str().unwrap().to_string();
        assert!(id.starts_with("req_"), "{path}: {id}");
    }
}

/// A streaming client that stops reading (`rcvbuf`: its socket's receive
/// buffer, None for the system default) loses its slot to the write timeout,
/// long before its 30000 tokens would have been generated: the server's send
/// buffer and hyper's buffer are bounded, so they fill within a few hundred
/// tokens whatever the client's buffers.
fn stops_reading_and_loses_its_slot(rcvbuf: Option<libc::c_int>) {
    let mut cfg = config();
    cfg.write_timeout = 1;
    cfg.max_concurrent = 1;
    let s = start(cfg);
    let mut tcp = std::net::TcpStream::connect(addr(&s)).unwrap();
    if let Some(size) = rcvbuf {
        // SAFETY: setsockopt on our own open socket, with a c_int and its size.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    let body = json!({"model": "m", "max_tokens": 30000, "stream": true, "temperature": 0,
                      "messages": [{"role": "user", "content": "hello ".repeat(50)}]})
    .to_string();
    write!(
        tcp,
        "POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Instant::now();
        while s.get("/health").await.1["slots"]["in_use"] != 1 {
            assert!(t.elapsed() < Duration::from_secs(10), "the stream was admitted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.wait_idle(60).await;
        let generated = s.get("/health").await.1["generated_tokens"].as_u64().unwrap();
        assert!(generated < 10_000, "cut by the write timeout, not by finishing: {generated} tokens");
        let (st, _) = s.post("/v1/messages", &hello(2)).await;
        assert_eq!(st, 200);
    });
    drop(tcp);
}

#[test]
fn a_stream_client_that_stops_reading_loses_its_slot() {
    stops_reading_and_loses_its_slot(Some(4096));
}

/// With default client buffers the kernel used to absorb megabytes (an
/// auto-tuned send buffer): the slot was held for the whole generation.
#[test]
fn a_stream_client_that_never_reads_loses_its_slot_with_default_buffers() {
    stops_reading_and_loses_its_slot(None);
}

/// A failure inside a batched forward pass fails only the request that
/// causes it: the step is run again sequence by sequence, and the healthy
/// requests in the same batch finish with exactly the tokens they get alone.
#[tokio::test]
async fn a_failure_inside_a_batched_step_fails_only_its_request() {
    let mut cfg = config();
    cfg.enable_fault_injection = true;
    let s = start(cfg);
    let ask = |text: &str| {
        json!({"model": "m", "max_tokens": 300, "temperature": 0,
                                  "messages": [{"role": "user", "content": text}]})
    };
    let (a, b, c) = (ask("tell me about the weather in Paris"), ask("hello there"), ask("what is a tool call"));
    // Alone, one after another: the reference tokens.
    let (_, ref_a) = s.post("/v1/messages", &a).await;
    let (_, ref_b) = s.post("/v1/messages", &b).await;
    // Together: the third request's forward passes raise from its 8th token on.
    let faulty = async {
        // Joins once the two healthy ones are decoding together.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let r = client()
            .post(s.url("/v1/messages"))
            .header("x-pensieve-fault", "raise-in-forward-after=8")
            .json(&c)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let ((_, got_a), (_, got_b), (st_c, got_c)) = tokio::join!(s.post("/v1/messages", &a), s.post("/v1/messages", &b), faulty);
    assert_eq!(st_c, 500, "{got_c}");
    common::assert_internal_error(&got_c, "RuntimeError", "injected fault in a forward pass");
    for (got, want) in [(&got_a, &ref_a), (&got_b, &ref_b)] {
        assert_eq!(got["stop_reason"], "max_tokens", "{got}");
        assert_eq!(got["content"], want["content"], "identical tokens to running alone");
    }
    let (st, h) = s.get("/health").await;
    assert_eq!(st, 200);
    assert!(h["slots"]["peak_batch"].as_u64().unwrap() >= 3, "the three really shared decode steps: {h}");
    s.wait_idle(10).await;
    let (st, _) = s.post("/v1/messages", &ask("still serving")).await;
    assert_eq!(st, 200);
}

/// One HTTP/1.1 response read from a raw connection: (status line + headers, body).
fn read_response(tcp: &mut std::net::TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).unwrap() == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).unwrap_or(0);
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).unwrap();
    (head, String::from_utf8_lossy(&body).to_string())
}

#[test]
fn connection_limits_keep_alive_and_expect_continue() {
    let mut cfg = config();
    cfg.max_connections = 1;
    cfg.header_timeout = 1;
    let s = start(cfg);
    // Expect: 100-continue (curl sends it for larger bodies): 100, then the answer.
    let body = hello(2).to_string();
    let mut a = std::net::TcpStream::connect(addr(&s)).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(a, "POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nExpect: 100-continue\r\n\r\n", body.len()).unwrap();
    let mut line = [0u8; 25];
    a.read_exact(&mut line).unwrap();
    assert!(String::from_utf8_lossy(&line).starts_with("HTTP/1.1 100 Continue"), "{}", String::from_utf8_lossy(&line));
    a.write_all(body.as_bytes()).unwrap();
    let (head, body) = read_response(&mut a);
    assert!(head.contains(" 200 "), "{head}{body}");
    // --max-connections 1: while `a` is open (idle, kept alive) a second
    // connection is not served...
    let mut b = std::net::TcpStream::connect(addr(&s)).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    b.write_all(b"GET /v1/models/claude-sonnet-4-5 HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut probe = [0u8; 1];
    assert!(b.read(&mut probe).is_err(), "answered beyond --max-connections");
    // ...until the idle keep-alive connection is closed by the server (header timeout, 1 s).
    let t = Instant::now();
    assert_eq!(a.read(&mut probe).unwrap(), 0, "the idle connection was closed");
    assert!(t.elapsed() < Duration::from_secs(5));
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (head, body) = read_response(&mut b);
    assert!(head.contains(" 200 "), "{head}");
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["id"], "claude-sonnet-4-5", "/v1/models/{{id}} echoes the name asked for: {m}");
}

/// A sampler that raises inside a batched step (after the step's logits
/// processors ran for every sequence), in the merged prefill and in a
/// decode step: the rerun gives the healthy neighbour, a forced tool call
/// whose processor follows the tokens so far, exactly its tokens alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampler_failing_in_a_batch_leaves_a_forced_neighbour_intact() {
    let mut cfg = pensieve::Config::default_for_tests(); // the trained demo model (it has a tool format)
    cfg.enable_fault_injection = true;
    let s = start(cfg);
    let tool = json!({"name": "get_weather", "description": "Get the current weather for a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}});
    let forced = json!({"model": "m", "max_tokens": 60, "temperature": 0, "tools": [tool],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [{"role": "user", "content": "hello, how are you"}]});
    let (_, alone) = s.post("/v1/messages", &forced).await;
    assert!(alone["content"].as_array().is_some_and(|c| !c.is_empty()), "{alone}");
    for after in [0, 3] {
        let faulty = async {
            let body = json!({"model": "m", "max_tokens": 200, "temperature": 0,
                "messages": [{"role": "user", "content": "tell me about the weather in Paris today"}]});
            let r = client()
                .post(s.url("/v1/messages"))
                .header("x-pensieve-fault", format!("raise-in-sampler-after={after}"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        };
        let ((st, got), (st_f, err)) = tokio::join!(s.post("/v1/messages", &forced), faulty);
        assert_eq!(st_f, 500, "{err}");
        common::assert_internal_error(&err, "RuntimeError", "injected sampler fault");
        assert_eq!(st, 200, "{got}");
        // The same blocks (tool-use ids are fresh per response).
        let blocks = |v: &Value| {
            let mut c = v["content"].clone();
            c.as_array_mut().unwrap().iter_mut().for_each(|b| drop(b.as_object_mut().unwrap().remove("id")));
            c
        };
        assert_eq!(blocks(&got), blocks(&alone), "fault after {after} draws: the forced call is unchanged");
        let (_, h) = s.get("/health").await;
        if after > 0 {
            // (With 0 the faulty one fails in the prefill, before any decode step.)
            assert!(h["slots"]["peak_batch"].as_u64().unwrap() >= 2, "they shared a decode step: {h}");
        }
        assert_eq!(h["checks"]["sampling"], "ok", "{h}");
    }
}

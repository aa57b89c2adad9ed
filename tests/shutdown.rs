//! The real binary under signals: the first SIGTERM/SIGINT drains (health
//! 503 `draining`, 503 with `Connection: close` on kept-alive connections,
//! queued requests refused at once, running streams finish), a second one
//! exits at once.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::binary::{signal, spawn, wait_exit};
use serde_json::{json, Value};

/// One HTTP/1.1 exchange on an open connection: (status, lower-cased head, body).
fn exchange(tcp: &mut TcpStream, request: &str) -> (u16, String, String) {
    tcp.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut byte).unwrap(), 1, "connection closed mid-head: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("a sized response");
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head, String::from_utf8(body).unwrap())
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
}

fn post(path: &str, body: &Value) -> String {
    let b = body.to_string();
    format!("POST {path} HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len())
}

fn message(max_tokens: u64, stream: bool) -> Value {
    json!({"model": "m", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
           "messages": [{"role": "user", "content": "hello"}]})
}

/// Opens a stream and reads until its first text delta arrived.
async fn open_stream(addr: &str, max_tokens: u64) -> reqwest::Response {
    let mut r =
        reqwest::Client::new().post(format!("http://{addr}/v1/messages")).json(&message(max_tokens, true)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    while !seen.contains("content_block_delta") {
        seen.push_str(std::str::from_utf8(&r.chunk().await.unwrap().expect("stream open")).unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_refuses_new_work_everywhere_and_lets_streams_finish() {
    let mut s = spawn(&["--max-concurrent", "1", "--shutdown-timeout", "60"]);
    // A kept-alive connection, opened before the signal.
    let mut kept = TcpStream::connect(&s.addr).unwrap();
    let mut kept2 = TcpStream::connect(&s.addr).unwrap();
    for k in [&mut kept, &mut kept2] {
        k.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (st, _, _) = exchange(k, &get("/health"));
        assert_eq!(st, 200);
    }

    let running = open_stream(&s.addr, 600).await;
    // A second request waits for the only slot.
    let addr = s.addr.clone();
    let queued = tokio::spawn(async move {
        let r = reqwest::Client::new().post(format!("http://{addr}/v1/messages")).json(&message(5, false)).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "the second request waits for the slot");

    let signalled = Instant::now();
    signal(&s, libc::SIGTERM);
    // The queued request is refused at once, not at the deadline.
    let (st, body, at) = queued.await.unwrap();
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["type"], "error", "Anthropic error shape: {body}");
    assert!(at.duration_since(signalled) < Duration::from_secs(5), "refused after {:?}", at.duration_since(signalled));

    // On the connection kept alive from before: health says draining, a new
    // request gets 503 in the dialect's shape, and the connection closes.
    let (st, head, body) = exchange(&mut kept, &get("/health"));
    assert_eq!(st, 503);
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "draining");
    let (st, head, body) =
        exchange(&mut kept2, &post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]})));
    assert_eq!(st, 503);
    assert!(head.contains("connection: close"), "{head}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("shutting down"), "OpenAI error shape: {v}");
    // New connections are still answered (so a supervisor learns why).
    let mut fresh = TcpStream::connect(&s.addr).unwrap();
    fresh.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (st, _, body) = exchange(&mut fresh, &post("/v1/messages", &message(5, false)));
    assert_eq!(st, 503);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["type"], "api_error");

    // The running stream still ends normally, then the process exits 0.
    let rest = running.text().await.unwrap();
    assert!(rest.contains("event: message_stop"), "{rest}");
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut s, 30)).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_shutdown_timeout_streams_end_with_an_error_event() {
    let mut s = spawn(&["--shutdown-timeout", "1"]);
    let running = open_stream(&s.addr, 100_000).await;
    let t = Instant::now();
    signal(&s, libc::SIGINT);
    let rest = running.text().await.unwrap();
    assert!(rest.contains("event: error") && rest.contains("shutting down"), "{}", &rest[rest.len().saturating_sub(400)..]);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut s, 30)).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let mut s = spawn(&["--shutdown-timeout", "120"]);
    let running = open_stream(&s.addr, 100_000).await;
    signal(&s, libc::SIGINT);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.child.try_wait().unwrap().is_none(), "still draining after the first signal");
    let t = Instant::now();
    signal(&s, libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut s, 10)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    // The cut stream never saw a normal end.
    let rest = running.text().await.unwrap_or_default();
    assert!(!rest.contains("message_stop"));
}

/// Engine death on the real binary: /health turns 503, a new request gets
/// 503 at once, and after draining the process exits non-zero (so a
/// supervisor restarts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_death_answers_503_then_exits_non_zero() {
    let mut s = spawn(&["--enable-fault-injection", "--shutdown-timeout", "5"]);
    // A kept-alive connection, so the answers during the drain can be read.
    let mut kept = TcpStream::connect(&s.addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (st, _, _) = exchange(&mut kept, &get("/health"));
    assert_eq!(st, 200);
    let kill = reqwest::Client::new()
        .post(format!("http://{}/v1/messages", s.addr))
        .header("x-pensieve-fault", "kill-engine")
        .json(&message(5, false))
        .send()
        .await;
    if let Ok(r) = kill {
        assert!(r.status().is_server_error(), "{}", r.status());
    }
    // The engine thread's state turns over a moment after the request fails.
    let t = Instant::now();
    let body = loop {
        let (st, _, body) = exchange(&mut kept, &get("/health"));
        if st == 503 {
            break body;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "health still {st}: {body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_ne!(health["engine"], "ready", "{health}");
    let mut fresh = TcpStream::connect(&s.addr).unwrap();
    fresh.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    let (st, _, body) = exchange(&mut fresh, &post("/v1/messages", &message(5, false)));
    assert_eq!(st, 503, "{body}");
    assert!(t.elapsed() < Duration::from_secs(10), "refused at once");
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut s, 30)).await.unwrap();
    assert_eq!(status.code(), Some(1), "non-zero for a supervisor: {status:?}");
}

/// SIGINT while a stream runs: the stream still ends with message_stop, the
/// process exits 0 having saved the prefix cache, and the next start (same
/// folder) serves the conversation's follow-up from it. SIGTERM then stops
/// that one the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_is_saved_at_a_signal_and_restored_by_the_next_start() {
    let dir = std::env::temp_dir().join(format!("pensieve-signal-prompt-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = ["--prompt-cache-dir", dir.to_str().unwrap(), "--shutdown-timeout", "60"];
    let first = json!({"model": "m", "max_tokens": 6, "temperature": 0,
        "system": "You are a weather assistant. ".repeat(20),
        "messages": [{"role": "user", "content": "what is the weather in Lisbon this week? ".repeat(4)}]});
    let ask = |addr: String, body: Value| async move {
        let r = reqwest::Client::new().post(format!("http://{addr}/v1/messages")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    };

    let (mut s, _) = common::binary::spawn_with(&args, None);
    let m1 = ask(s.addr.clone(), first.clone()).await;
    let prompt = m1["usage"]["input_tokens"].as_u64().unwrap();
    let running = open_stream(&s.addr, 300).await;
    signal(&s, libc::SIGINT);
    let rest = running.text().await.unwrap();
    assert!(rest.contains("event: message_stop"), "{}", &rest[rest.len().saturating_sub(300)..]);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut s, 60)).await.unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "saved under {}", dir.display());

    let (mut s, before) = common::binary::spawn_with(&args, None);
    assert!(before.iter().any(|l| l.contains("restored")), "{before:#?}");
    let text = m1["content"][0]["text"].as_str().unwrap();
    let second = json!({"model": "m", "max_tokens": 6, "temperature": 0, "system": first["system"],
        "messages": [first["messages"][0], {"role": "assistant", "content": text},
                     {"role": "user", "content": "and next week?"}]});
    let m2 = ask(s.addr.clone(), second).await;
    let cached = m2["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert!(cached >= prompt - 1, "the follow-up starts from the saved prefix: {cached} of {prompt}: {m2}");
    signal(&s, libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut s, 60)).await.unwrap();
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(&dir).ok();
}

//! Ollama's API (`/api/...`) through the official ollama Python client
//! (tests/clients/ollama_client.py) against the trained demo model, which
//! calls its weather tool: chat and generate streamed and not, tools, format,
//! listings, errors in Ollama's shape; and `--ollama-port`.

mod common;

use common::{client, start};
use pensieve::Config;

#[test]
fn the_official_ollama_client_chats_generates_and_lists() {
    let s = start(Config::default_for_tests());
    common::run_checks("ollama_client.py", &[&s.base]);
}

/// `--ollama-port`: the real binary also answers on a second port, where
/// apps with Ollama's address hard-wired look (11434 in real use; a free one
/// here).
#[test]
fn the_ollama_port_serves_the_same_apis() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let s = common::binary::spawn(&["--ollama-port", &port]);
    let out = std::process::Command::new(common::venv_python())
        .args([
            "-c",
            "import sys, httpx, ollama; c = ollama.Client(host=sys.argv[1]); \
             r = c.chat(model='x', messages=[{'role': 'user', 'content': 'hi'}], options={'num_predict': 3}); \
             v = httpx.get(sys.argv[2] + '/api/version').json()['version']; \
             print(c.list().models[0].model, r.eval_count, r.done_reason, bool(v))",
            &format!("http://127.0.0.1:{port}"),
            &format!("http://{}", s.addr),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The main port answers too (the last field).
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pensieve-demo-random 3 length True");
}

/// Malformed and hostile bodies on the Ollama and Responses routes get a 4xx
/// in that dialect's shape, never a 5xx; the key is required there as on the
/// other routes; the server keeps serving.
#[tokio::test]
async fn bad_inputs_and_missing_keys_get_each_dialects_error_shape() {
    let mut c = common::config();
    c.api_key = Some("sekrit".into());
    let s = start(c);
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let bodies = [
        "{oops".to_string(),
        "[]".to_string(),
        "null".to_string(),
        "{}".to_string(),
        deep,
        r#"{"messages": "x", "prompt": 5, "input": 7}"#.to_string(),
        r#"{"messages": [{"role": "user", "content": 5}], "input": [{"type": "nope"}]}"#.to_string(),
        r#"{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "input": "x", "options": {"num_predict": "many"}, "max_output_tokens": -1}"#
            .to_string(),
        r#"{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "input": "x", "format": {"type": "strin"}, "text": {"format": {"type": "json_schema", "schema": {"type": "strin"}}}}"#
            .to_string(),
    ];
    for path in ["/api/chat", "/api/generate", "/v1/responses"] {
        let ollama = path.starts_with("/api/");
        let shape_ok = |v: &serde_json::Value| if ollama { v["error"].is_string() } else { v["error"]["message"].is_string() };
        // No key: 401 in the route's shape.
        let r = client().post(s.url(path)).json(&serde_json::json!({"model": "m"})).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(shape_ok(&r.json().await.unwrap()), "{path}");
        for body in &bodies {
            let r = client()
                .post(s.url(path))
                .header("x-api-key", "sekrit")
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap();
            assert!((400..500).contains(&status), "{path} {body:.80}: {status} {v}");
            assert!(shape_ok(&v), "{path} {body:.80}: {v}");
        }
    }
    let r = client().get(s.url("/api/tags")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .post(s.url("/api/generate"))
        .header("authorization", "Bearer sekrit")
        .json(&serde_json::json!({"model": "m", "prompt": "hi", "stream": false, "options": {"num_predict": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving");
}

/// `think` on a thinking model: the thinking comes back in its own field
/// (streamed too); `think: false` turns the template's thinking off.
#[tokio::test]
async fn think_returns_thinking_apart_and_false_turns_it_off() {
    let mut c = common::config();
    c.model = vec![pensieve::config::BUILTIN_RANDOM_THINK.into()];
    let s = start(c);
    let ask = |think: bool, stream: bool| {
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "think": think, "stream": stream,
                           "options": {"temperature": 0, "num_predict": 8}})
    };
    let (st, on) = s.post("/api/chat", &ask(true, false)).await;
    assert_eq!(st, 200, "{on}");
    // Random weights never close the block: all eight tokens are thinking.
    let thought = on["message"]["thinking"].as_str().unwrap_or_default();
    assert!(!thought.is_empty() && on["message"]["content"] == "", "{on}");
    let r = client().post(s.url("/api/chat")).json(&ask(true, true)).send().await.unwrap();
    let streamed: String = r
        .text()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["message"]["thinking"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, thought);
    let (st, off) = s.post("/api/chat", &ask(false, false)).await;
    assert_eq!(st, 200, "{off}");
    assert!(off["message"].get("thinking").is_none() && off["message"]["content"] != "", "{off}");
}

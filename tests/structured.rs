//! Structured outputs (constrained decoding) end to end: response formats,
//! strict and forced tool calls, log-probabilities, in both dialects through
//! the official SDKs (tests/clients/structured.py, which checks every answer
//! with a real JSON-schema validator), with the random-weight model whose
//! unconstrained output is noise; strict tools with the trained demo model
//! (which does call tools); a thinking model, whose constraint starts after
//! its thinking block.

mod common;

use common::{client, parse_sse, start};
use pensieve::Config;
use serde_json::{json, Value};

#[test]
fn every_constrained_answer_validates_in_both_dialects() {
    let s = common::shared();
    common::run_checks("structured.py", &[&s.base]);
}

/// The same checks with a random model whose template writes `shape`'s
/// tool calls, parsed by that family's mlx-lm parser.
fn checks_with_call_format(shape: &str) {
    let dir = std::env::temp_dir().join(format!("pensieve-{shape}-{}", std::process::id()));
    let made = std::process::Command::new(common::venv_python())
        .args([concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_model.py"), shape, &dir.to_string_lossy()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let mut c = common::config();
    c.model = vec![dir.to_string_lossy().to_string()];
    let s = start(c);
    common::run_checks("structured.py", &[&s.base]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Qwen3-Coder-style calls: arguments as XML parameters, strings raw.
#[test]
fn every_constrained_answer_validates_with_parameter_style_tool_calls() {
    checks_with_call_format("demo-coder");
}

/// LFM2-style calls: `[name(k=v, ...)]`, values as Python literals.
#[test]
fn every_constrained_answer_validates_with_python_style_tool_calls() {
    checks_with_call_format("demo-pythonic");
}

/// The demo model calls `get_weather` with the city it was asked about; a
/// strict tool whose schema does not allow that city gets an allowed one.
#[tokio::test]
async fn a_strict_tools_call_follows_its_schema_where_the_model_would_not() {
    let s = start(Config::default_for_tests());
    let ask = |strict: bool| {
        json!({"model": "m", "max_tokens": 100, "temperature": 0,
               "messages": [{"role": "user", "content": "what is the weather in Paris?"}],
               "tools": [{"name": "get_weather", "description": "Get the weather for a city", "strict": strict,
                          "input_schema": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}},
                                           "required": ["city"], "additionalProperties": false}}]})
    };
    let (st, loose) = s.post("/v1/messages", &ask(false)).await;
    assert_eq!(st, 200, "{loose}");
    let (st, strict) = s.post("/v1/messages", &ask(true)).await;
    assert_eq!(st, 200, "{strict}");
    let city = |m: &Value| m["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").map(|b| b["input"].clone());
    // Without strict the model names a city outside the enum (the schema is
    // only a hint in its prompt); with strict it cannot.
    let loose_city = city(&loose).unwrap_or_else(|| panic!("the demo model calls the tool: {loose}"));
    assert!(!["Oslo", "Rome"].contains(&loose_city["city"].as_str().unwrap_or("")), "{loose}");
    let strict_city = city(&strict).unwrap_or_else(|| panic!("{strict}"));
    assert!(["Oslo", "Rome"].contains(&strict_city["city"].as_str().unwrap_or("")), "{strict}");
    assert_eq!(strict_city.as_object().unwrap().len(), 1, "no other keys: {strict}");
}

/// A thinking model thinks freely; the answer after the block is the JSON.
#[tokio::test]
async fn the_constraint_starts_after_the_thinking_block() {
    let mut c = common::config();
    c.model = vec![pensieve::config::BUILTIN_RANDOM_THINK.into()];
    let s = start(c);
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["ok", "n"], "additionalProperties": false});
    let body = |stream: bool| {
        json!({"model": "m", "max_tokens": 200, "temperature": 0, "stream": stream,
               "thinking": {"type": "enabled", "budget_tokens": 8},
               "output_config": {"format": {"type": "json_schema", "schema": schema}},
               "messages": [{"role": "user", "content": "hello"}]})
    };
    let (st, m) = s.post("/v1/messages", &body(false)).await;
    assert_eq!(st, 200, "{m}");
    let blocks = m["content"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "thinking", "{m}");
    let thought = blocks[0]["thinking"].as_str().unwrap();
    assert!(!thought.trim().is_empty() && !thought.contains('{'), "thinking is the model's own: {m}");
    let text = blocks.iter().filter_map(|b| b["text"].as_str()).collect::<String>();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(v["ok"].is_boolean() && v["n"].as_u64().is_some_and(|n| n <= 9), "{v}");
    assert_eq!(m["stop_reason"], "end_turn", "{m}");

    // Streamed: the same answer.
    let r = client().post(s.url("/v1/messages")).json(&body(true)).send().await.unwrap();
    let events = parse_sse(&r.text().await.unwrap());
    let streamed: String = events
        .iter()
        .filter(|(e, d)| e == "content_block_delta" && d["delta"]["type"] == "text_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, text);
}

/// Tool calls cannot be constrained for a model without a tool-call format:
/// a 400 before any token, in the dialect's shape.
#[tokio::test]
async fn strict_tools_need_a_model_with_a_call_format() {
    let mut c = Config::default_for_tests();
    c.model = vec![pensieve::config::BUILTIN_SMOLLM2.into()];
    let s = start(c);
    let (st, e) = s
        .post(
            "/v1/messages",
            &json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"name": "t", "strict": true, "input_schema": {"type": "object"}}]}),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("tool-call format"), "{e}");
    // The model still answers in JSON when asked (its own vocabulary).
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"max_tokens": 60, "temperature": 0, "messages": [{"role": "user", "content": "Give a city and its country."}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": {
                        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
                        "required": ["city", "country"], "additionalProperties": false}}}}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(v["city"].is_string() && v["country"].is_string(), "{v}");
}

//! Tool use end to end through the trained demo model (the default model).

mod common;

use common::{client, parse_sse, start};
use pensieve::Config;
use serde_json::{json, Value};

fn demo() -> common::TestServer {
    start(Config::default_for_tests())
}

fn weather_tool() -> Value {
    json!({"name": "get_weather", "description": "Get the current weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                            "required": ["city"]}})
}

#[test]
fn the_official_sdks_complete_a_tool_round_trip() {
    let s = demo();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/tool_roundtrip.py");
    let out = std::process::Command::new(common::venv_python()).args([path, &s.base]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();

    let call = &r["anthropic_call"];
    assert_eq!(call["stop_reason"], "tool_use", "{r}");
    assert_eq!(call["calls"][0]["name"], "get_weather");
    assert_eq!(call["calls"][0]["input"], json!({"city": "Paris"}));
    assert!(call["calls"][0]["id"].as_str().unwrap().starts_with("toolu_"));

    let stream = &r["anthropic_stream"];
    assert_eq!(stream["stop_reason"], "tool_use");
    assert_eq!(stream["saw_input_json"], true, "input arrived as input_json_delta events");
    assert_eq!(stream["inputs"][0], call["calls"][0]["input"], "the SDK reassembles the same input");

    let answer = r["anthropic_answer"]["text"].as_str().unwrap();
    assert_eq!(r["anthropic_answer"]["stop_reason"], "end_turn");
    assert!(answer.contains("Paris") && answer.contains("sunny"), "the answer uses the tool result: {answer:?}");

    let ocall = &r["openai_call"];
    assert_eq!(ocall["finish_reason"], "tool_calls");
    assert_eq!(ocall["calls"][0]["name"], "get_weather");
    assert_eq!(ocall["calls"][0]["arguments"], json!({"city": "Paris"}));
    assert!(ocall["calls"][0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(r["openai_stream"]["finish_reason"], "tool_calls");
    assert_eq!(r["openai_stream"]["arguments"][0], json!({"city": "Paris"}));
    let oanswer = r["openai_answer"]["text"].as_str().unwrap();
    assert!(oanswer.contains("Paris") && oanswer.contains("sunny"), "{oanswer:?}");
}

#[tokio::test]
async fn the_demo_model_answers_in_its_domain() {
    let s = demo();
    let (st, m) = s
        .post(
            "/v1/messages",
            &json!({"model": "m", "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": "hello"}]}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(m["stop_reason"], "end_turn", "{m}");
    let text = m["content"][0]["text"].as_str().unwrap();
    assert!(text.to_lowercase().contains("weather"), "{text:?}");
}

#[tokio::test]
async fn tool_choice_any_forces_a_call_and_none_hides_tools() {
    let s = demo();
    let body = json!({"model": "m", "max_tokens": 40, "temperature": 0, "tools": [weather_tool()],
        "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "What is the weather in Oslo?"}]});
    let (st, m) = s.post("/v1/messages", &body).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["stop_reason"], "tool_use", "{m}");
    let call = m["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").unwrap();
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["input"], json!({"city": "Oslo"}));

    // A named tool: the call opens with that name (the model's own tokens).
    let mut named = body.clone();
    named["tool_choice"] = json!({"type": "tool", "name": "get_weather"});
    named["messages"] = json!([{"role": "user", "content": "how is it in Lima today?"}]);
    let (_, m) = s.post("/v1/messages", &named).await;
    assert_eq!(m["stop_reason"], "tool_use", "{m}");
    let call = m["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").unwrap();
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["input"], json!({"city": "Lima"}));

    // Forced where this toy model would never call: what it writes does not
    // parse as a call, and comes back as text (200), never as an error.
    named["messages"] = json!([{"role": "user", "content": "hello"}]);
    let (st, m) = s.post("/v1/messages", &named).await;
    assert_eq!(st, 200, "{m}");

    let mut named = body.clone();
    named["tool_choice"] = json!({"type": "tool", "name": "nope"});
    let (st, e) = s.post("/v1/messages", &named).await;
    assert_eq!(st, 400, "{e}");

    let mut none = body.clone();
    none["tool_choice"] = json!({"type": "none"});
    let (_, m) = s.post("/v1/messages", &none).await;
    assert_ne!(m["stop_reason"], "tool_use", "{m}");
}

#[tokio::test]
async fn streamed_tool_use_follows_the_grammar() {
    let s = demo();
    let body = json!({"model": "m", "max_tokens": 60, "temperature": 0, "stream": true, "tools": [weather_tool()],
        "messages": [{"role": "user", "content": "Tell me the weather in Tokyo."}]});
    let r = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    let evs = parse_sse(&r.text().await.unwrap());
    let start = evs.iter().find(|e| e.0 == "content_block_start" && e.1["content_block"]["type"] == "tool_use").unwrap();
    let index = start.1["index"].clone();
    assert_eq!(start.1["content_block"]["input"], json!({}));
    assert!(start.1["content_block"]["id"].as_str().unwrap().starts_with("toolu_"));
    let json_text: String = evs
        .iter()
        .filter(|e| e.0 == "content_block_delta" && e.1["index"] == index)
        .map(|e| e.1["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&json_text).unwrap(), json!({"city": "Tokyo"}));
    assert!(evs.iter().any(|e| e.0 == "content_block_stop" && e.1["index"] == index));
    let delta = evs.iter().find(|e| e.0 == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
}

#[tokio::test]
async fn all_claude_code_tools_render() {
    let s = demo();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/claude-code-request.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let mut body = fixture["body"].clone();
    let (st, with) = s.post("/v1/messages/count_tokens", &body).await;
    assert_eq!(st, 200, "{with}");
    body.as_object_mut().unwrap().remove("tools");
    let (_, without) = s.post("/v1/messages/count_tokens", &body).await;
    let added = with["input_tokens"].as_u64().unwrap() - without["input_tokens"].as_u64().unwrap();
    let schema_chars: usize = fixture["body"]["tools"].as_array().unwrap().iter().map(|t| t.to_string().len()).sum();
    assert!(
        added as usize > schema_chars / 8,
        "the 12 tool definitions are in the prompt: +{added} tokens for {schema_chars} chars"
    );
}

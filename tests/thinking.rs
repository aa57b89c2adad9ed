//! Thinking blocks end to end, with a random-weight model whose tokenizer has
//! <think>/</think> and whose template opens a thinking block (as Qwen3's
//! does). Random weights never close the block by themselves, so any text
//! after thinking proves the budget forced the end-of-thinking token.

mod common;

use common::{client, parse_sse, start};
use serde_json::{json, Value};

fn think_server() -> common::TestServer {
    let mut c = common::config();
    c.model = vec![pensieve::config::BUILTIN_RANDOM_THINK.into()];
    start(c)
}

fn ask(thinking: Value) -> Value {
    json!({"model": "m", "max_tokens": 24, "temperature": 0, "thinking": thinking,
           "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test]
async fn thinking_is_a_block_and_the_budget_ends_it() {
    let s = think_server();
    let (st, free) = s.post("/v1/messages", &ask(json!({"type": "enabled"}))).await;
    assert_eq!(st, 200, "{free}");
    let (st, m) = s.post("/v1/messages", &ask(json!({"type": "enabled", "budget_tokens": 6}))).await;
    assert_eq!(st, 200, "{m}");
    let blocks = m["content"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "thinking", "{m}");
    let budgeted = blocks[0]["thinking"].as_str().unwrap();
    let unbounded = free["content"][0]["thinking"].as_str().unwrap();
    assert!(!budgeted.is_empty());
    // Greedy, same prompt: the budget cut the same thinking short.
    assert!(unbounded.starts_with(budgeted) && unbounded.len() > budgeted.len(), "{budgeted:?} vs {unbounded:?}");
    for b in blocks {
        if let Some(t) = b["text"].as_str() {
            assert!(!t.contains("<think>") && !t.contains("</think>"), "markers never leak: {t:?}");
        }
    }
}

#[tokio::test]
async fn thinking_stays_out_of_the_text_unless_asked_for() {
    let s = think_server();
    let (_, m) = s
        .post(
            "/v1/messages",
            &json!({"model": "m", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "hello"}]}),
        )
        .await;
    let blocks = m["content"].as_array().unwrap();
    assert!(blocks.iter().all(|b| b["type"] != "thinking"), "{m}");
    assert_eq!(m["usage"]["output_tokens"], 12, "the thinking tokens were generated and counted: {m}");
    // The same greedy generation with thinking shown: none of its thinking
    // text may appear in the answer that hides it.
    let (_, shown) = s.post("/v1/messages", &ask(json!({"type": "enabled"}))).await;
    let thought = shown["content"][0]["thinking"].as_str().unwrap().to_string();
    assert!(thought.chars().count() > 5, "{shown}");
    let visible: String = blocks.iter().filter_map(|b| b["text"].as_str()).collect();
    let probe: String = thought.chars().take(12).collect();
    assert!(!visible.contains(&probe), "thinking leaked into the answer: {visible:?} contains {probe:?}");
}

#[tokio::test]
async fn streamed_thinking_then_text() {
    let s = think_server();
    let mut body = ask(json!({"type": "enabled", "budget_tokens": 5}));
    body["stream"] = json!(true);
    let r = client().post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    let evs = parse_sse(&r.text().await.unwrap());
    let starts: Vec<(u64, String)> = evs
        .iter()
        .filter(|e| e.0 == "content_block_start")
        .map(|e| (e.1["index"].as_u64().unwrap(), e.1["content_block"]["type"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(starts[0], (0, "thinking".to_string()), "{evs:?}");
    assert_eq!(starts[1], (1, "text".to_string()), "{evs:?}");
    assert!(evs.iter().any(|e| e.1["delta"]["type"] == "thinking_delta"));
    assert!(evs.iter().any(|e| e.1["delta"]["type"] == "text_delta"));
}

#[tokio::test]
async fn openai_reasoning_content() {
    let s = think_server();
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "m", "max_tokens": 10, "temperature": 0,
            "messages": [{"role": "user", "content": "hello"}]}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert!(!r["choices"][0]["message"]["reasoning_content"].as_str().unwrap().is_empty(), "{r}");
}

/// Claude Code sends `thinking: {type: adaptive, display: omitted}`: blocks
/// keep their place and signature, with empty text, streamed or not.
#[tokio::test]
async fn omitted_thinking_keeps_its_blocks_without_text() {
    let s = think_server();
    let thinking = json!({"type": "adaptive", "display": "omitted", "budget_tokens": 5});
    let (st, m) = s.post("/v1/messages", &ask(thinking.clone())).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["content"][0], json!({"type": "thinking", "thinking": "", "signature": ""}), "{m}");
    assert_eq!(m["content"][1]["type"], "text", "{m}");
    let mut body = ask(thinking);
    body["stream"] = json!(true);
    let evs = parse_sse(&client().post(s.url("/v1/messages")).json(&body).send().await.unwrap().text().await.unwrap());
    let block0: Vec<&Value> = evs.iter().filter(|e| e.1["index"] == 0).map(|e| &e.1).collect();
    assert_eq!(block0[0]["content_block"], json!({"type": "thinking", "thinking": ""}), "{evs:?}");
    assert!(!evs.iter().any(|e| e.1["delta"]["type"] == "thinking_delta"), "no thinking text: {evs:?}");
    assert_eq!(block0[block0.len() - 2]["delta"], json!({"type": "signature_delta", "signature": ""}));
    assert_eq!(block0[block0.len() - 1]["type"], "content_block_stop");
}

/// What Claude Code reads: the window and capabilities in /v1/models, and the
/// exact wording of a prompt over the context (it parses N and M to compact).
#[tokio::test]
async fn limits_are_told_the_way_claude_code_reads_them() {
    let s = think_server();
    let (_, models) = s.get("/v1/models").await;
    let m = &models["data"][0];
    assert_eq!(m["max_input_tokens"], 32768, "{m}");
    assert_eq!(m["max_tokens"], 32768);
    assert_eq!(m["capabilities"]["thinking"]["supported"], true, "{m}");
    assert_eq!(m["capabilities"]["image_input"]["supported"], false);
    let long = "hello ".repeat(40_000);
    let (st, e) = s
        .post(
            "/v1/messages",
            &json!({"model": "m", "max_tokens": 5,
        "messages": [{"role": "user", "content": long}]}),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let msg = e["error"]["message"].as_str().unwrap();
    let rest = msg.strip_prefix("prompt is too long: ").unwrap_or_else(|| panic!("{msg}"));
    let (n, m) = rest.split_once(" tokens > ").unwrap();
    let n: u64 = n.parse().unwrap();
    let m: u64 = m.strip_suffix(" maximum").unwrap().parse().unwrap();
    assert_eq!(m, 32767);
    assert!(n > m, "{msg}");
    let (_, count) = s
        .post(
            "/v1/messages/count_tokens",
            &json!({"model": "m",
        "messages": [{"role": "user", "content": long}]}),
        )
        .await;
    assert_eq!(count["input_tokens"], n, "the same count as count_tokens");
}

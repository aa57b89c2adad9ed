//! Agent sessions stay prefix-stable: each turn of a Claude Code conversation
//! reuses the previous turn's KV, and a new session in another directory
//! reuses the shared system prompt and tools (real requests of one Claude Code
//! conversation, prose replaced by filler: tests/fixtures/claude-code-turns.json).

mod common;

use serde_json::{json, Value};

fn turns() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/claude-code-turns.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut b = r["body"].clone();
            b["stream"] = json!(false);
            b["max_tokens"] = json!(8);
            b["temperature"] = json!(0);
            b
        })
        .collect()
}

fn prompt_tokens(m: &Value) -> u64 {
    m["usage"]["input_tokens"].as_u64().unwrap() + m["usage"]["cache_read_input_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn claude_code_turns_and_sessions_reuse_the_prefix_cache() {
    // The demo model: 32k context (Claude Code's prompt fits), and a template
    // that drops mid-conversation system messages (so they become reminders).
    let s = common::start(pensieve::Config::default_for_tests());
    let (_, h) = s.get("/health").await;
    assert_eq!(h["model"]["late_system_messages"], "user", "{h}");
    let t = turns();
    let (st, first) = s.post("/v1/messages", &t[0]).await;
    assert_eq!(st, 200, "{first}");
    let p1 = prompt_tokens(&first);
    assert!(p1 > 5000, "{first}");

    // The next turn: served from the first one's cache up to the new turn.
    let (_, second) = s.post("/v1/messages", &t[1]).await;
    let cached = second["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert!(cached >= p1, "turn 2 reused {cached} of turn 1's {p1} prompt tokens: {second}");
    assert!(prompt_tokens(&second) - cached < 100, "only the new turn is prefilled: {second}");

    // A new session in another directory: the environment block (a late
    // system message) differs; the system prompt and tools before it do not.
    let mut other = t[0].clone();
    let env = other["messages"][1]["content"][0]["text"].as_str().unwrap().to_string();
    other["messages"][1]["content"][0]["text"] = json!(env.replacen("papa", "zulu", 1));
    let mut no_env = t[0].clone();
    no_env["messages"].as_array_mut().unwrap().truncate(1);
    for k in ["max_tokens", "stream", "temperature"] {
        no_env.as_object_mut().unwrap().remove(k);
    }
    let (_, before_env) = s.post("/v1/messages/count_tokens", &no_env).await;
    let before_env = before_env["input_tokens"].as_u64().unwrap();
    let (st, m) = s.post("/v1/messages", &other).await;
    assert_eq!(st, 200, "{m}");
    let cached = m["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    // The prefix up to the environment block is reused (all but the
    // generation prompt, which the environment turn replaces).
    assert!(cached + 8 >= before_env, "new session reused {cached} of the {before_env} tokens before its environment block: {m}");
    // Only the environment block (and what follows it) is prefilled again.
    assert!(prompt_tokens(&m) - cached <= p1 - before_env + 8, "{m}");
}

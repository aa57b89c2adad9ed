//! OpenAI's Responses API (`/v1/responses`, what Codex CLI speaks) through
//! the official openai SDK (tests/clients/responses_client.py) against the
//! trained demo model: streamed and not, the event sequence, a function-tool
//! round trip chained by `previous_response_id` and served from the prefix
//! cache, structured output, the store, errors.

mod common;

use common::start;
use pensieve::Config;

#[test]
fn the_official_sdk_creates_streams_chains_and_stores_responses() {
    let s = start(Config::default_for_tests());
    common::run_checks("responses_client.py", &[&s.base]);
}

/// A failure after the stream started ends it with `error` and
/// `response.failed` events (the internal text stays in the log).
#[tokio::test]
async fn a_failure_mid_stream_is_an_error_and_a_failed_response() {
    let mut c = common::config();
    c.enable_fault_injection = true;
    let s = start(c);
    let r = common::client()
        .post(s.url("/v1/responses"))
        .header("x-pensieve-fault", "raise-after=3")
        .json(&serde_json::json!({"model": "m", "input": "hello", "stream": true, "max_output_tokens": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = common::parse_sse(&r.text().await.unwrap());
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"], "{kinds:?}");
    assert_eq!(kinds[kinds.len() - 2..], ["error", "response.failed"], "{kinds:?}");
    let failed = &events.last().unwrap().1["response"];
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"]["message"].as_str().unwrap().contains("internal error (RuntimeError)"), "{failed}");
    assert!(!failed.to_string().contains("injected fault"), "the exception's text stays in the log: {failed}");
}

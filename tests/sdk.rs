//! Real clients no one here wrote: the official SDKs, from the project venv.

mod common;

use serde_json::Value;

fn run_client(script: &str, base: &str, key: &str) -> Value {
    let path = format!("{}/tests/clients/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(common::venv_python()).args([&path, base, key]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script} failed:\n{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{script} printed non-JSON ({e}): {stdout}"))
}

#[test]
fn the_anthropic_sdk_creates_streams_and_counts() {
    let mut cfg = common::config();
    cfg.api_key = Some("sdk-key".into());
    let s = common::start(cfg);
    let r = run_client("anthropic_sdk.py", &s.base, "sdk-key");

    let create = &r["create"];
    assert!(create["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(create["model"], "claude-sonnet-4-5");
    assert_eq!(create["stop_reason"], "max_tokens");
    assert_eq!(create["output_tokens"], 16);
    assert_eq!(create["input_tokens"], r["count"]);

    let stream = &r["stream"];
    assert!(stream["pieces"].as_u64().unwrap() > 1, "text arrived in pieces: {stream}");
    assert_eq!(stream["text"], stream["final_text"]);
    assert_eq!(stream["text"], create["text"], "greedy: stream == create");
    assert_eq!(stream["stop_reason"], "max_tokens");
    assert_eq!(stream["output_tokens"], 16);

    let stop = &r["stop"];
    assert_eq!(stop["stop_reason"], "stop_sequence", "{stop}");
    assert_eq!(stop["stop_sequence"], stop["stop"]);
    assert!(!stop["text"].as_str().unwrap().contains(stop["stop"].as_str().unwrap()));

    // The served model first, then the built-ins (loaded when a request names them).
    assert_eq!(r["models"][0], "pensieve-demo-random");
    assert!(
        ["SmolLM2-135M-Instruct", "pensieve-demo"].iter().all(|m| r["models"].as_array().unwrap().iter().any(|x| x == m)),
        "{}",
        r["models"]
    );
    assert_eq!(r["bad_request"]["status"], 400);
    assert_eq!(r["bad_request"]["type"], "invalid_request_error");
}

#[test]
fn the_openai_sdk_chats_streams_completes_and_lists_models() {
    let mut cfg = common::config();
    cfg.api_key = Some("oa-key".into());
    let s = common::start(cfg);
    let r = run_client("openai_sdk.py", &s.base, "oa-key");
    let create = &r["create"];
    assert!(create["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(create["model"], "gpt-4o");
    assert_eq!(create["finish_reason"], "length");
    assert_eq!(create["completion_tokens"], 12);
    let stream = &r["stream"];
    assert!(stream["pieces"].as_u64().unwrap() > 1);
    assert_eq!(stream["text"], create["text"], "greedy: stream == create");
    assert_eq!(stream["finish_reason"], "length");
    assert_eq!(stream["completion_tokens"], 12);
    assert_eq!(r["completion"]["finish_reason"], "length");
    assert_eq!(r["completion"]["tokens"], 5);
    // The served model first, then the built-ins (loaded when a request names them).
    assert_eq!(r["models"][0], "pensieve-demo-random");
    assert!(
        ["SmolLM2-135M-Instruct", "pensieve-demo"].iter().all(|m| r["models"].as_array().unwrap().iter().any(|x| x == m)),
        "{}",
        r["models"]
    );
    assert_eq!(r["bad_request"]["status"], 400);
    assert!(r["bad_request"]["message"].as_str().unwrap().contains("n=1"));
}

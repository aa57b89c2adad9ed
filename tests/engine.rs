//! The engine without HTTP: the Rust tokenizer against the Python one.

use pensieve::api::anthropic::MessagesRequest;
use pensieve::api::parse_json;
use pensieve::{Config, EngineHandle};

#[test]
fn rust_tokenizer_reproduces_python_ids_on_the_claude_code_request() {
    let engine = EngineHandle::start(&Config::default_for_tests()).unwrap();
    assert!(engine.rust_tokenizer_active(), "the demo model's template renders identically in Rust");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/claude-code-request.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let req: MessagesRequest = parse_json(fixture["body"].to_string().as_bytes()).unwrap();
    let prompt = req.to_prompt().unwrap();
    assert_eq!(prompt.tools.len(), 12);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let python = rt.block_on(engine.tokenize_on_engine(prompt.clone())).unwrap();
    let rust = engine.tokenize_in_rust_now(&prompt).unwrap().unwrap();
    assert!(python.len() > 5000, "{}", python.len());
    assert_eq!(rust, python);
    for probe in pensieve::tokenizer::probe_prompts() {
        let py = rt.block_on(engine.tokenize_on_engine(probe.clone())).unwrap();
        assert_eq!(engine.tokenize_in_rust_now(&probe).unwrap().unwrap(), py);
    }
    engine.shutdown();
}

#[test]
fn every_claude_code_tool_is_in_the_rendered_prompt() {
    let engine = EngineHandle::start(&Config::default_for_tests()).unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/claude-code-request.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let req: MessagesRequest = parse_json(fixture["body"].to_string().as_bytes()).unwrap();
    let prompt = req.to_prompt().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ids = rt.block_on(engine.tokenize_on_engine(prompt.clone())).unwrap();
    assert_eq!(engine.tokenize_in_rust_now(&prompt).unwrap().unwrap(), ids, "Rust and Python agree on the demo template");
    let rendered = engine.render_in_rust_now(&prompt).unwrap().unwrap();
    for tool in fixture["body"]["tools"].as_array().unwrap() {
        let name = tool["name"].as_str().unwrap();
        assert!(rendered.contains(&format!("<tool>{name}: ")), "{name} is rendered");
    }
    engine.shutdown();
}

//! The invariant that makes agent loops cheap: the prompt rendered for a
//! conversation, without its generation prompt, is a token prefix of the
//! prompt rendered after any messages are appended (late system messages
//! placed as the engine places them). Property-tested for the built-in models'
//! templates and for a Qwen-style and a Llama-3-style template.

use pensieve::engine::{place_late_system_messages, ChatMessage, FunctionCall, Prompt, ToolCall};
use pensieve::tokenizer::{PromptTokenizer, TemplateInfo};
use proptest::prelude::*;
use serde_json::{json, Value};

/// SmolLM2-135M-Instruct's template, as its GGUF file carries it.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A Qwen-2.5-style ChatML template with tools, tool calls and tool responses.
const QWEN_STYLE: &str = "{%- if tools %}<|im_start|>system\n{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{%- else %}You are a helpful assistant.{%- endif %}\n\n# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{%- endif %}{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}{%- for tc in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}";

/// A Llama-3-style template (headers and end-of-turn markers).
const LLAMA3_STYLE: &str = "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{%- if message['role'] == 'assistant' and message.tool_calls %}{%- for tc in message.tool_calls %}{{- '{\"name\": \"' + tc.function.name + '\", \"parameters\": ' + (tc.function.arguments | tojson) + '}' }}{%- endfor %}{%- else %}{{- message['content'] | trim }}{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}";

/// The demo model's tokenizer, with Llama 3's markers added as special
/// tokens (as Llama 3's own tokenizer has them) for the Llama-3-style case.
fn tokenizer_file(llama3_markers: bool) -> String {
    let root = pensieve::Config::default_for_tests().cache_root();
    let demo = pensieve::demo::materialize(&root).unwrap();
    let file = demo.join("tokenizer.json");
    if !llama3_markers {
        return file.to_string_lossy().to_string();
    }
    let mut tj: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let first = tj["model"]["vocab"].as_object().unwrap().len() as u64 + 16;
    let markers = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];
    for (id, t) in (first..).zip(markers) {
        tj["added_tokens"].as_array_mut().unwrap().push(json!({"id": id, "content": t, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    let out = std::env::temp_dir().join(format!("pensieve-llama3-tokenizer-{}.json", std::process::id()));
    std::fs::write(&out, tj.to_string()).unwrap();
    out.to_string_lossy().to_string()
}

fn load(template: &str, llama3_markers: bool) -> PromptTokenizer {
    let mut specials = serde_json::Map::new();
    specials.insert("bos_token".into(), json!(if llama3_markers { "<|begin_of_text|>" } else { "" }));
    let info = TemplateInfo {
        tokenizer_file: Some(tokenizer_file(llama3_markers)),
        chat_template: Some(template.to_string()),
        special_tokens: specials,
        ..Default::default()
    };
    PromptTokenizer::load(&info, false).unwrap()
}

/// The built-in demo models' template (builtin:demo, builtin:random).
fn demo_template() -> String {
    let root = pensieve::Config::default_for_tests().cache_root();
    let demo = pensieve::demo::materialize(&root).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(demo.join("tokenizer_config.json")).unwrap()).unwrap();
    cfg["chat_template"].as_str().unwrap().to_string()
}

#[derive(Debug, Clone)]
enum Turn {
    User(String),
    Assistant(String),
    Call(String),
    Result(String),
    LateSystem(String),
}

fn turn() -> impl Strategy<Value = Turn> {
    let text = "[a-z ]{1,12}|[A-Za-z0-9 .,!?\n]{0,30}";
    prop_oneof![
        3 => text.prop_map(Turn::User),
        3 => text.prop_map(Turn::Assistant),
        1 => "[a-z]{1,8}".prop_map(Turn::Call),
        1 => text.prop_map(Turn::Result),
        1 => text.prop_map(Turn::LateSystem),
    ]
}

fn message(t: &Turn) -> ChatMessage {
    match t {
        Turn::User(s) => ChatMessage::new("user", s.as_str()),
        Turn::Assistant(s) => ChatMessage::new("assistant", s.as_str()),
        Turn::Call(city) => {
            let mut m = ChatMessage::new("assistant", "");
            m.tool_calls.push(ToolCall {
                id: "call_1".into(),
                kind: "function",
                function: FunctionCall { name: "get_weather".into(), arguments: json!({"city": city}) },
            });
            m
        }
        Turn::Result(s) => ChatMessage {
            role: "tool".into(),
            content: s.clone(),
            tool_calls: vec![],
            tool_call_id: Some("call_1".into()),
            name: Some("get_weather".into()),
        },
        Turn::LateSystem(s) => ChatMessage::new("system", if s.trim().is_empty() { "note" } else { s.as_str() }),
    }
}

fn prompt(turns: &[Turn], mode: &str, tools: bool) -> Prompt {
    let mut messages = vec![ChatMessage::new("system", "You are terse."), ChatMessage::new("user", "hello")];
    messages.extend(turns.iter().map(message));
    let mut p = Prompt { messages, ..Default::default() };
    if tools {
        p.tools = vec![json!({"type": "function", "function": {"name": "get_weather", "description": "Weather.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})];
    }
    place_late_system_messages(&mut p, mode);
    p
}

/// (name, tokenizer, the template's mid-conversation system mode as the
/// engine probes it), loaded once.
fn templates() -> &'static [(&'static str, PromptTokenizer, &'static str)] {
    static T: std::sync::OnceLock<Vec<(&'static str, PromptTokenizer, &'static str)>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        vec![
            ("demo", load(&demo_template(), false), "user"),
            ("smollm2", load(SMOLLM2, false), "system"),
            ("qwen-style", load(QWEN_STYLE, false), "system"),
            ("llama3-style", load(LLAMA3_STYLE, true), "system"),
        ]
    })
}

/// What the engine did before: a late system message hoisted into the
/// leading system prompt. Appending one rewrites the head of the prompt.
#[test]
fn hoisting_a_late_system_message_would_break_the_prefix() {
    let tok = &templates()[2].1;
    let before = prompt(&[Turn::Assistant("hi".into())], "system", false);
    let mut hoisted = prompt(&[Turn::Assistant("hi".into()), Turn::LateSystem("cwd: /tmp/x".into())], "system", false);
    let late = hoisted.messages.pop().unwrap();
    hoisted.messages[0].content.push_str(&format!("\n\n{}", late.content));
    let earlier = tok.tokenize_conversation(&before).unwrap();
    assert!(!tok.tokenize(&hoisted).unwrap().starts_with(&earlier));
    let in_place = prompt(&[Turn::Assistant("hi".into()), Turn::LateSystem("cwd: /tmp/x".into())], "system", false);
    assert!(tok.tokenize(&in_place).unwrap().starts_with(&earlier));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn appending_messages_keeps_the_earlier_prompt_as_a_token_prefix(
        before in prop::collection::vec(turn(), 0..6),
        after in prop::collection::vec(turn(), 1..5),
        tools in any::<bool>(),
    ) {
        for (name, tok, mode) in templates() {
            let mode = *mode;
            let all: Vec<Turn> = before.iter().chain(after.iter()).cloned().collect();
            let earlier = tok.tokenize_conversation(&prompt(&before, mode, tools)).unwrap();
            let later = tok.tokenize(&prompt(&all, mode, tools)).unwrap();
            prop_assert!(later.starts_with(&earlier), "{}: {} earlier tokens are not a prefix of the {} later ones",
                name, earlier.len(), later.len());
        }
    }
}

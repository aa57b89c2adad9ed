//! The Anthropic Messages dialect: wire types, conversion to the internal
//! request, and the response / event-stream rendering.

use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::prompt::{sampling, PromptBuilder};
use super::{check_range, check_stops, StreamRenderer};
use crate::engine::{
    Collected, ForceTool, FunctionCall, GenEvent, GenerateRequest, OutputToolCall, Prompt, ResponseFormat, StopReason, ToolCall,
};
use crate::error::ApiError;

/// Claude Code's first system block is an attribution line for Anthropic's
/// billing, not for the model; it can carry a per-request hash, so keeping it
/// would also defeat the prefix cache.
const BILLING_HEADER_PREFIX: &str = "x-anthropic-billing-header:";

// ---------------------------------------------------------------------------
// Wire types (requests). Unknown fields are ignored by serde's default.

/// Body of `POST /v1/messages` and `POST /v1/messages/count_tokens`.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    /// Required by /v1/messages, absent in count_tokens.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    pub messages: Vec<InputMessage>,
    #[serde(default)]
    pub system: Option<Content>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u64>,
    /// Not in Anthropic's API, but common in local servers' clients.
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub thinking: Option<Thinking>,
    /// `{"format": {"type": "json_schema", "schema": ...}}` (structured
    /// outputs; `effort` and other keys are accepted and ignored).
    #[serde(default)]
    pub output_config: Option<Value>,
    /// The structured-outputs beta's spelling of `output_config.format`.
    #[serde(default)]
    pub output_format: Option<Value>,
}

/// `thinking`: `enabled` (with `budget_tokens`), `adaptive`, or `disabled`.
#[derive(Debug, Deserialize, Clone, PartialEq)]
pub struct Thinking {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub budget_tokens: Option<u32>,
    /// `summarized` (the default) or `omitted`: blocks keep their place and
    /// signature, with empty text.
    #[serde(default)]
    pub display: Option<String>,
}

impl Thinking {
    fn enabled(&self) -> bool {
        self.kind != "disabled"
    }
}

impl MessagesRequest {
    /// `thinking.display: "omitted"`: thinking blocks carry no text.
    pub fn thinking_omitted(&self) -> bool {
        self.thinking.as_ref().is_some_and(|t| t.enabled() && t.display.as_deref() == Some("omitted"))
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    /// Not in the API reference, but Claude Code sends one mid-conversation.
    System,
}

#[derive(Debug, Deserialize)]
pub struct InputMessage {
    pub role: Role,
    pub content: Content,
}

/// A string, or a list of content blocks.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Content::Text(s)),
            Value::Array(items) => {
                let mut blocks = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let b = Block::deserialize(item).map_err(|e| D::Error::custom(format!("block {i}: {e}")))?;
                    blocks.push(b);
                }
                Ok(Content::Blocks(blocks))
            }
            other => Err(D::Error::custom(format!("expected a string or an array of content blocks, got {}", json_kind(&other)))),
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    Image {},
    Document {},
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<Content>,
        #[serde(default)]
        is_error: Option<bool>,
    },
    Thinking {},
    RedactedThinking {},
    /// Server-tool and other block types we do not act on.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize, Clone)]
pub struct ToolDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// The call's `input` must follow `input_schema` exactly.
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToolChoice {
    Auto {},
    Any {},
    Tool { name: String },
    None {},
}

// ---------------------------------------------------------------------------
// Conversion to the internal request.

impl MessagesRequest {
    /// The prompt the model sees.
    pub fn to_prompt(&self) -> Result<Prompt, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::InvalidRequest("messages: at least one message is required".into()));
        }
        let mut b = PromptBuilder::default();
        if let Some(sys) = &self.system {
            match sys {
                Content::Text(t) => b.system_prompt(t.clone()),
                Content::Blocks(blocks) => {
                    for (i, blk) in blocks.iter().enumerate() {
                        match blk {
                            Block::Text { text } if text.starts_with(BILLING_HEADER_PREFIX) => {}
                            Block::Text { text } => b.system_prompt(text.clone()),
                            _ => {
                                return Err(ApiError::InvalidRequest(format!(
                                    "system[{i}]: only text blocks are allowed in system"
                                )))
                            }
                        }
                    }
                }
            }
        }
        for (i, m) in self.messages.iter().enumerate() {
            match m.role {
                Role::System => b.system_message(&flatten_text(&m.content, i)?),
                Role::Assistant => {
                    let (mut text, mut calls) = (String::new(), vec![]);
                    for blk in blocks_of(&m.content) {
                        match blk {
                            Block::Text { text: t } => text.push_str(&t),
                            Block::ToolUse { id, name, input } => calls.push(ToolCall {
                                id,
                                kind: "function",
                                function: FunctionCall { name, arguments: if input.is_null() { json!({}) } else { input } },
                            }),
                            Block::Image {} | Block::Document {} => return Err(unsupported_media(i)),
                            _ => {}
                        }
                    }
                    b.assistant(text, calls);
                }
                Role::User => {
                    let mut text = String::new();
                    for blk in blocks_of(&m.content) {
                        match blk {
                            Block::Text { text: t } => {
                                if !text.is_empty() {
                                    text.push('\n');
                                }
                                text.push_str(&t);
                            }
                            Block::ToolResult { tool_use_id, content, is_error } => {
                                let mut body = match &content {
                                    Some(c) => flatten_text(c, i)?,
                                    None => String::new(),
                                };
                                if is_error == Some(true) {
                                    body = format!("Error: {body}");
                                }
                                b.tool_result(tool_use_id, None, body);
                            }
                            Block::Image {} | Block::Document {} => return Err(unsupported_media(i)),
                            _ => {}
                        }
                    }
                    let only_tool_results = matches!(&m.content, Content::Blocks(blks)
                        if !blks.is_empty() && blks.iter().all(|blk| matches!(blk, Block::ToolResult { .. })));
                    if !only_tool_results {
                        b.user(text);
                    }
                }
            }
        }
        let tools = match (&self.tools, &self.tool_choice) {
            (_, Some(ToolChoice::None {})) | (None, _) => vec![],
            (Some(tools), _) => tools.iter().map(tool_to_function).collect(),
        };
        let enable_thinking = self.thinking.as_ref().and_then(|t| (!t.enabled()).then_some(false));
        b.finish(tools, enable_thinking, "messages: at least one user or assistant message is required")
    }

    /// The full internal request for /v1/messages.
    pub fn to_generate(&self) -> Result<GenerateRequest, ApiError> {
        let max_tokens = match self.max_tokens {
            None => return Err(ApiError::InvalidRequest("max_tokens: field required".into())),
            Some(0) => return Err(ApiError::InvalidRequest("max_tokens: must be at least 1".into())),
            Some(n) => n,
        };
        check_range("temperature", self.temperature, 0.0, 1.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        check_range("min_p", self.min_p, 0.0, 1.0)?;
        let stop = self.stop_sequences.clone().unwrap_or_default();
        check_stops("stop_sequences", &stop, 64)?;
        let sampling = sampling(self.temperature, self.top_p, self.top_k, self.min_p, None);
        let mut req = GenerateRequest::new(self.to_prompt()?, max_tokens, sampling, stop);
        if let Some(t) = &self.thinking {
            req.thinking = t.enabled();
            req.thinking_budget = t.budget_tokens.filter(|_| t.enabled());
        }
        req.force_tool = match &self.tool_choice {
            Some(ToolChoice::Any {}) => Some(ForceTool::Any),
            Some(ToolChoice::Tool { name }) => Some(ForceTool::Named(name.clone())),
            _ => None,
        };
        req.format = self.format()?;
        if !matches!(self.tool_choice, Some(ToolChoice::None {})) {
            req.strict_tools = self.tools.iter().flatten().filter(|t| t.strict == Some(true)).map(|t| t.name.clone()).collect();
        }
        Ok(req)
    }

    /// `output_config.format` (or the beta's `output_format`).
    fn format(&self) -> Result<Option<ResponseFormat>, ApiError> {
        let (field, f) = match (self.output_config.as_ref().and_then(|c| c.get("format")), &self.output_format) {
            (Some(f), _) if !f.is_null() => ("output_config.format", f),
            (_, Some(f)) if !f.is_null() => ("output_format", f),
            _ => return Ok(None),
        };
        match f.get("type").and_then(Value::as_str) {
            Some("json_schema") => match f.get("schema") {
                Some(s) if s.is_object() => Ok(Some(ResponseFormat::JsonSchema(s.clone()))),
                _ => Err(ApiError::InvalidRequest(format!("{field}.schema: a JSON schema object is required"))),
            },
            other => Err(ApiError::InvalidRequest(format!(
                "{field}.type: expected \"json_schema\", got {}",
                other.map_or("nothing".to_string(), |t| format!("{t:?}"))
            ))),
        }
    }
}

fn unsupported_media(i: usize) -> ApiError {
    ApiError::InvalidRequest(format!(
        "messages[{i}]: image and document blocks are not supported: the loaded model reads text only"
    ))
}

fn blocks_of(c: &Content) -> Vec<Block> {
    match c {
        Content::Text(t) => vec![Block::Text { text: t.clone() }],
        Content::Blocks(b) => b.clone(),
    }
}

/// The text of a content value (system messages, tool results).
fn flatten_text(c: &Content, i: usize) -> Result<String, ApiError> {
    let mut parts = Vec::new();
    for b in blocks_of(c) {
        match b {
            Block::Text { text } => parts.push(text),
            Block::Image {} | Block::Document {} => return Err(unsupported_media(i)),
            _ => {}
        }
    }
    Ok(parts.join("\n"))
}

fn tool_to_function(t: &ToolDef) -> Value {
    super::function_tool("function", &t.name, t.description.as_deref(), t.input_schema.as_ref())
}

// ---------------------------------------------------------------------------
// Responses.

/// Token accounting for one response. Anthropic's `input_tokens` excludes
/// tokens read from the cache: input + cache_read = the prompt's tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub output_tokens: u32,
}

impl Usage {
    pub fn to_json(&self) -> Value {
        json!({
            "input_tokens": self.prompt_tokens - self.cached_tokens.min(self.prompt_tokens),
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached_tokens,
        })
    }
}

pub fn stop_reason_fields(r: &StopReason) -> (&'static str, Value) {
    match r {
        StopReason::EndTurn => ("end_turn", Value::Null),
        StopReason::MaxTokens => ("max_tokens", Value::Null),
        StopReason::StopSequence(s) => ("stop_sequence", json!(s)),
        StopReason::ToolUse => ("tool_use", Value::Null),
    }
}

fn tool_use_block(c: &OutputToolCall) -> Value {
    json!({"type": "tool_use", "id": super::new_id("toolu_"), "name": c.name, "input": c.arguments})
}

/// The `content` array of a response, in output order (`omit_thinking`:
/// thinking blocks with empty text).
pub fn content_blocks(out: &Collected, omit_thinking: bool) -> Vec<Value> {
    let mut blocks: Vec<Value> = out
        .blocks
        .iter()
        .filter_map(|b| match b {
            GenEvent::Text(t) if !t.is_empty() => Some(json!({"type": "text", "text": t})),
            GenEvent::Thinking(t) => {
                Some(json!({"type": "thinking", "thinking": if omit_thinking { "" } else { t }, "signature": ""}))
            }
            GenEvent::ToolCall(c) => Some(tool_use_block(c)),
            _ => None,
        })
        .collect();
    if blocks.is_empty() {
        blocks.push(json!({"type": "text", "text": ""}));
    }
    blocks
}

/// A complete non-streaming response.
pub fn message_response(id: &str, model: &str, out: &Collected, reason: &StopReason, usage: Usage, omit_thinking: bool) -> Value {
    let (stop_reason, stop_sequence) = stop_reason_fields(reason);
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(out, omit_thinking),
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage.to_json(),
    })
}

/// One server-sent event: its `event:` name and `data:` JSON.
pub type Event = (&'static str, Value);

/// Produces the event sequence of a streamed message, enforcing the grammar:
/// message_start, (content_block_start, content_block_delta*, content_block_stop)*,
/// message_delta, message_stop. Blocks open lazily, in output order: thinking,
/// text and tool_use blocks each get their own index.
pub struct EventStream {
    id: String,
    model: String,
    index: usize,
    open: Option<BlockKind>,
    finished: bool,
    /// `thinking.display: "omitted"`: thinking blocks open and close, no text.
    omit_thinking: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Text,
    Thinking,
}

impl EventStream {
    pub fn new(id: &str, model: &str) -> EventStream {
        EventStream { id: id.into(), model: model.into(), index: 0, open: None, finished: false, omit_thinking: false }
    }

    /// Thinking blocks without their text (`thinking.display: "omitted"`).
    pub fn omitting_thinking(mut self, omit: bool) -> EventStream {
        self.omit_thinking = omit;
        self
    }

    pub fn start(&mut self, usage: Usage) -> Vec<Event> {
        let mut u = usage.to_json();
        u["output_tokens"] = json!(usage.output_tokens.max(1));
        let start = json!({
            "type": "message_start",
            "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null, "usage": u,
            }
        });
        vec![("message_start", start), ("ping", json!({"type": "ping"}))]
    }

    fn open_block(&mut self, kind: BlockKind) -> Vec<Event> {
        if self.open == Some(kind) {
            return vec![];
        }
        let mut ev = self.close_block();
        let block = match kind {
            BlockKind::Text => json!({"type": "text", "text": ""}),
            BlockKind::Thinking => json!({"type": "thinking", "thinking": ""}),
        };
        ev.push(("content_block_start", json!({"type": "content_block_start", "index": self.index, "content_block": block})));
        self.open = Some(kind);
        ev
    }

    fn delta(&mut self, kind: BlockKind, delta: &str) -> Vec<Event> {
        if delta.is_empty() || self.finished {
            return vec![];
        }
        let mut ev = self.open_block(kind);
        if kind == BlockKind::Thinking && self.omit_thinking {
            return ev;
        }
        let d = match kind {
            BlockKind::Text => json!({"type": "text_delta", "text": delta}),
            BlockKind::Thinking => json!({"type": "thinking_delta", "thinking": delta}),
        };
        ev.push(("content_block_delta", json!({"type": "content_block_delta", "index": self.index, "delta": d})));
        ev
    }

    pub fn text(&mut self, delta: &str) -> Vec<Event> {
        self.delta(BlockKind::Text, delta)
    }

    pub fn thinking(&mut self, delta: &str) -> Vec<Event> {
        self.delta(BlockKind::Thinking, delta)
    }

    /// A whole tool_use block: start with empty input, the input as JSON
    /// fragments, stop.
    pub fn tool_call(&mut self, call: &OutputToolCall) -> Vec<Event> {
        if self.finished {
            return vec![];
        }
        let mut ev = self.close_block();
        let i = self.index;
        ev.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": i,
                   "content_block": {"type": "tool_use", "id": super::new_id("toolu_"), "name": call.name, "input": {}}}),
        ));
        for frag in super::json_fragments(&call.arguments) {
            ev.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": frag}}),
            ));
        }
        ev.push(("content_block_stop", json!({"type": "content_block_stop", "index": i})));
        self.index += 1;
        ev
    }

    fn close_block(&mut self) -> Vec<Event> {
        let Some(kind) = self.open.take() else { return vec![] };
        let mut ev = vec![];
        if kind == BlockKind::Thinking {
            // As the API does: a thinking block ends with its signature.
            ev.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.index, "delta": {"type": "signature_delta", "signature": ""}}),
            ));
        }
        ev.push(("content_block_stop", json!({"type": "content_block_stop", "index": self.index})));
        self.index += 1;
        ev
    }

    pub fn finish(&mut self, reason: &StopReason, usage: Usage) -> Vec<Event> {
        let mut ev = vec![];
        if self.index == 0 && self.open.is_none() {
            // No output at all: still one (empty) text block, as non-streaming gives.
            ev.extend(self.open_block(BlockKind::Text));
        }
        ev.extend(self.close_block());
        self.finished = true;
        let (stop_reason, stop_sequence) = stop_reason_fields(reason);
        ev.push((
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": usage.to_json(),
            }),
        ));
        ev.push(("message_stop", json!({"type": "message_stop"})));
        ev
    }

    /// An error after the 200 header went out: an `error` event, then nothing.
    pub fn error(&mut self, e: &ApiError) -> Vec<Event> {
        self.finished = true;
        vec![("error", e.body(crate::error::Dialect::Anthropic, None))]
    }

    pub fn ping() -> Event {
        ("ping", json!({"type": "ping"}))
    }
}

fn encode(events: Vec<Event>) -> String {
    events.into_iter().map(|(name, data)| crate::sse::encode(Some(name), &data)).collect()
}

impl StreamRenderer for EventStream {
    fn start(&mut self, prompt_tokens: u32, cached_tokens: u32) -> String {
        encode(EventStream::start(self, Usage { prompt_tokens, cached_tokens, output_tokens: 0 }))
    }
    fn text(&mut self, delta: &str) -> String {
        encode(EventStream::text(self, delta))
    }
    fn thinking(&mut self, delta: &str) -> String {
        encode(EventStream::thinking(self, delta))
    }
    fn tool_call(&mut self, call: &OutputToolCall) -> String {
        encode(EventStream::tool_call(self, call))
    }
    fn finish(&mut self, reason: &StopReason, prompt_tokens: u32, cached_tokens: u32, output_tokens: u32) -> String {
        encode(EventStream::finish(self, reason, Usage { prompt_tokens, cached_tokens, output_tokens }))
    }
    fn error(&mut self, e: &ApiError) -> String {
        encode(EventStream::error(self, e))
    }
    fn keepalive(&mut self) -> String {
        encode(vec![EventStream::ping()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_json;
    use crate::request::ChatMessage;

    fn req(v: Value) -> Result<MessagesRequest, ApiError> {
        parse_json(v.to_string().as_bytes())
    }

    #[test]
    fn string_content_and_system_string() {
        let r = req(json!({"model": "m", "max_tokens": 5, "system": "be brief",
            "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
        let p = r.to_prompt().unwrap();
        assert_eq!(p.messages, vec![ChatMessage::new("system", "be brief"), ChatMessage::new("user", "hi")]);
    }

    #[test]
    fn billing_header_dropped_and_late_system_messages_stay_where_they_stand() {
        let r = req(json!({"model": "m", "max_tokens": 5,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cc_entrypoint=cli;"},
                       {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "system", "content": "early rule"},
                         {"role": "user", "content": [{"type": "text", "text": "hello"}]},
                         {"role": "system", "content": [{"type": "text", "text": "late rule"}]},
                         {"role": "system", "content": "<total_tokens>4242 tokens left</total_tokens>"}]}))
        .unwrap();
        let p = r.to_prompt().unwrap();
        assert_eq!(
            p.messages,
            vec![
                ChatMessage::new("system", "You are Claude Code.\n\nearly rule"),
                ChatMessage::new("user", "hello"),
                ChatMessage::new("system", "late rule"),
            ]
        );
    }

    #[test]
    fn tool_use_and_results_become_template_messages() {
        let r = req(json!({"model": "m", "max_tokens": 5,
        "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "sunny"}], "is_error": false}]}
        ]}))
        .unwrap();
        let p = r.to_prompt().unwrap();
        assert_eq!(p.messages.len(), 3);
        assert_eq!(p.messages[1].tool_calls[0].function.name, "get_weather");
        assert_eq!(p.messages[1].tool_calls[0].function.arguments, json!({"city": "Paris"}));
        assert_eq!(p.messages[2].role, "tool");
        assert_eq!(p.messages[2].content, "sunny");
        assert_eq!(p.messages[2].name.as_deref(), Some("get_weather"));
        assert_eq!(p.tools[0]["function"]["name"], "get_weather");
        assert_eq!(p.tools[0]["function"]["parameters"], json!({"type": "object"}));
    }

    #[test]
    fn tool_choice_none_hides_tools() {
        let r = req(json!({"model": "m", "max_tokens": 5, "tool_choice": {"type": "none"},
            "tools": [{"name": "t", "input_schema": {}}], "messages": [{"role": "user", "content": "x"}]}))
        .unwrap();
        assert!(r.to_prompt().unwrap().tools.is_empty());
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let e = req(json!({"model": "m", "max_tokens": 5, "messages": []})).unwrap().to_generate().unwrap_err();
        assert!(e.message().contains("at least one message"));
        let e = req(json!({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]})).unwrap_err();
        assert!(e.message().starts_with("messages[0].role"), "{}", e.message());
        let e = req(json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 7}]})).unwrap_err();
        assert!(e.message().contains("expected a string or an array"), "{}", e.message());
        let e = req(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).unwrap().to_generate().unwrap_err();
        assert!(e.message().contains("max_tokens"));
        let e = req(json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}))
            .unwrap()
            .to_generate()
            .unwrap_err();
        assert!(e.message().contains("at least 1"));
        let e = req(json!({"model": "m", "max_tokens": 1, "temperature": 3, "messages": [{"role": "user", "content": "x"}]}))
            .unwrap()
            .to_generate()
            .unwrap_err();
        assert!(e.message().starts_with("temperature"));
        let e = req(json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})).unwrap_err();
        assert!(e.message().contains("model"));
        let e = req(json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user",
            "content": [{"type": "image", "source": {}}]}]}))
        .unwrap()
        .to_generate()
        .unwrap_err();
        assert!(e.message().contains("text only"));
    }

    #[test]
    fn unknown_fields_and_blocks_are_ignored() {
        let r = req(json!({"model": "m", "max_tokens": 128000, "metadata": {"user_id": "u"},
            "thinking": {"type": "adaptive"}, "context_management": {}, "output_config": {"effort": "medium"},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                {"type": "server_tool_use", "id": "x"}]}]}))
        .unwrap();
        let g = r.to_generate().unwrap();
        assert_eq!(g.max_tokens, 128000);
        assert_eq!(g.prompt.messages, vec![ChatMessage::new("user", "a")]);
    }

    #[test]
    fn the_claude_code_fixture_converts() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/claude-code-request.json");
        let text = std::fs::read_to_string(path).unwrap();
        let fixture: Value = serde_json::from_str(&text).unwrap();
        let r: MessagesRequest = parse_json(fixture["body"].to_string().as_bytes()).unwrap();
        let g = r.to_generate().unwrap();
        assert_eq!(g.prompt.tools.len(), 12);
        assert_eq!(g.prompt.messages[0].role, "system");
        assert!(!g.prompt.messages[0].content.contains("x-anthropic-billing-header"));
        // The environment block after the first user message stays there.
        let roles: Vec<&str> = g.prompt.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles[1..], ["user", "system"]);
    }

    #[test]
    fn usage_splits_cached_tokens() {
        let u = Usage { prompt_tokens: 100, cached_tokens: 60, output_tokens: 5 };
        let j = u.to_json();
        assert_eq!(j["input_tokens"], 40);
        assert_eq!(j["cache_read_input_tokens"], 60);
        assert_eq!(j["output_tokens"], 5);
    }

    #[test]
    fn event_stream_grammar() {
        let mut s = EventStream::new("msg_1", "m");
        let mut names: Vec<&str> = vec![];
        let u = Usage { prompt_tokens: 3, cached_tokens: 0, output_tokens: 0 };
        names.extend(s.start(u).iter().map(|e| e.0));
        names.extend(s.text("").iter().map(|e| e.0));
        names.extend(s.text("he").iter().map(|e| e.0));
        names.extend(s.text("llo").iter().map(|e| e.0));
        let fin = s.finish(&StopReason::StopSequence("X".into()), Usage { output_tokens: 2, ..u });
        assert_eq!(fin[1].1["delta"]["stop_reason"], "stop_sequence");
        assert_eq!(fin[1].1["delta"]["stop_sequence"], "X");
        assert_eq!(fin[1].1["usage"]["output_tokens"], 2);
        names.extend(fin.iter().map(|e| e.0));
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(s.text("late").is_empty());
    }

    #[test]
    fn thinking_text_and_tool_blocks_get_their_own_indices() {
        let mut s = EventStream::new("msg_1", "m");
        let u = Usage::default();
        let mut evs = s.start(u);
        evs.extend(s.thinking("hmm"));
        evs.extend(s.thinking(" ok"));
        evs.extend(s.text("Let me check."));
        let call = OutputToolCall { name: "get_weather".into(), arguments: json!({"city": "Paris"}) };
        evs.extend(s.tool_call(&call));
        evs.extend(s.finish(&StopReason::ToolUse, u));
        let starts: Vec<(u64, String)> = evs
            .iter()
            .filter(|e| e.0 == "content_block_start")
            .map(|e| (e.1["index"].as_u64().unwrap(), e.1["content_block"]["type"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(starts, vec![(0, "thinking".into()), (1, "text".into()), (2, "tool_use".into())]);
        let json: String = evs
            .iter()
            .filter(|e| e.1["delta"]["type"] == "input_json_delta")
            .map(|e| e.1["delta"]["partial_json"].as_str().unwrap())
            .collect();
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), json!({"city": "Paris"}));
        let stops = evs.iter().filter(|e| e.0 == "content_block_stop").count();
        assert_eq!(stops, 3);
        let delta = evs.iter().find(|e| e.0 == "message_delta").unwrap();
        assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn thinking_request_fields() {
        let r = req(json!({"model": "m", "max_tokens": 50, "thinking": {"type": "enabled", "budget_tokens": 20},
            "tools": [{"name": "t", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "t"},
            "messages": [{"role": "user", "content": "x"}]}))
        .unwrap();
        let g = r.to_generate().unwrap();
        assert!(g.thinking);
        assert_eq!(g.thinking_budget, Some(20));
        assert_eq!(g.force_tool, Some(ForceTool::Named("t".into())));
        let r = req(json!({"model": "m", "max_tokens": 5, "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": "x"}]}))
        .unwrap();
        let g = r.to_generate().unwrap();
        assert!(!g.thinking);
        assert_eq!(g.prompt.enable_thinking, Some(false));
    }
}

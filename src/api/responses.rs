//! The OpenAI Responses API (`/v1/responses`, what Codex CLI speaks): wire
//! types, conversion to the internal request, the response object and its
//! event stream, and the bounded store behind `previous_response_id` and
//! `GET` / `DELETE /v1/responses/{id}`.
//!
//! A chained request's prompt is the stored conversation (its messages and
//! the answer, as the engine saw them) followed by the new input, so the
//! prefix cache serves the part already computed.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{json, Value};

use super::prompt::{sampling, PromptBuilder};
use super::{check_range, new_id, StreamRenderer};
use crate::engine::{
    ChatMessage, Collected, ForceTool, FunctionCall, GenerateRequest, OutputToolCall, Prompt, ResponseFormat, StopReason,
    ToolCall,
};
use crate::error::ApiError;
use crate::sse;

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub input: Option<Input>,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub reasoning: Option<Value>,
    /// Defaults to true: the response is kept for `previous_response_id`.
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub metadata: Option<Value>,
}

/// `input`: a string, or a list of items.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

fn bad(msg: String) -> ApiError {
    ApiError::InvalidRequest(msg)
}

/// The text of a message's `content`: a string or a list of text parts.
fn content_text(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text" | "summary_text") => {
                        out.push_str(p.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    Some("refusal") => out.push_str(p.get("refusal").and_then(Value::as_str).unwrap_or_default()),
                    Some("input_image" | "input_file" | "input_audio") => {
                        return Err(bad(format!(
                            "{at}.content[{j}]: images, files and audio are not supported: the loaded model reads text only"
                        )))
                    }
                    other => return Err(bad(format!("{at}.content[{j}].type: unsupported content part {other:?}"))),
                }
            }
            Ok(out)
        }
        _ => Err(bad(format!("{at}.content: expected a string or a list of content parts"))),
    }
}

impl ResponsesRequest {
    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn stored(&self) -> bool {
        self.store.unwrap_or(true)
    }

    /// Function tools in the chat templates' format, and the strict ones.
    /// A `namespace` (Codex groups some tools so) contributes its functions.
    fn tools(&self) -> Result<(Vec<Value>, Vec<String>), ApiError> {
        let mut tools = vec![];
        let mut strict = vec![];
        let mut flat: Vec<(String, &Value)> = vec![];
        for (i, t) in self.tools.iter().flatten().enumerate() {
            if t.get("type").and_then(Value::as_str) == Some("namespace") {
                for (j, inner) in t.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
                    flat.push((format!("tools[{i}].tools[{j}]"), inner));
                }
            } else {
                flat.push((format!("tools[{i}]"), t));
            }
        }
        for (at, t) in flat {
            match t.get("type").and_then(Value::as_str) {
                Some("function") => {}
                other => {
                    return Err(bad(format!(
                        "{at}.type: only function tools are supported here, not {other:?} (built-in tools such as web search run on OpenAI's servers; Codex: web_search = \"disabled\")"
                    )))
                }
            }
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad(format!("{at}.name: required")))?;
            if t.get("strict").and_then(Value::as_bool) == Some(true) {
                strict.push(name.to_string());
            }
            tools.push(super::function_tool(
                "function",
                name,
                t.get("description").and_then(Value::as_str),
                t.get("parameters").filter(|p| !p.is_null()),
            ));
        }
        Ok((tools, strict))
    }

    /// The conversation: `history` (a stored chain), the instructions as the
    /// system prompt, then the input items.
    pub fn to_generate(&self, history: &[ChatMessage]) -> Result<GenerateRequest, ApiError> {
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        let mut b = PromptBuilder::default();
        if let Some(i) = &self.instructions {
            b.system_prompt(i.clone());
        }
        for m in history {
            match m.role.as_str() {
                "system" => b.system_message(&m.content),
                "user" => b.user(m.content.clone()),
                "assistant" => b.assistant(m.content.clone(), m.tool_calls.clone()),
                "tool" => b.tool_result(m.tool_call_id.clone().unwrap_or_default(), m.name.clone(), m.content.clone()),
                _ => {}
            }
        }
        match &self.input {
            None => return Err(bad("input: required".into())),
            Some(Input::Text(t)) => b.user(t.clone()),
            Some(Input::Items(items)) => {
                // Consecutive function calls belong to one assistant turn.
                let mut pending_calls: Vec<ToolCall> = vec![];
                let mut pending_text = String::new();
                let flush = |b: &mut PromptBuilder, text: &mut String, calls: &mut Vec<ToolCall>| {
                    if !text.is_empty() || !calls.is_empty() {
                        b.assistant(std::mem::take(text), std::mem::take(calls));
                    }
                };
                for (i, item) in items.iter().enumerate() {
                    let at = format!("input[{i}]");
                    let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
                    match kind {
                        "message" => {
                            let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                            let text = content_text(item.get("content").unwrap_or(&Value::Null), &at)?;
                            if role == "assistant" {
                                if !pending_calls.is_empty() {
                                    flush(&mut b, &mut pending_text, &mut pending_calls);
                                }
                                pending_text.push_str(&text);
                                continue;
                            }
                            flush(&mut b, &mut pending_text, &mut pending_calls);
                            match role {
                                "user" => b.user(text),
                                "system" | "developer" => b.system_message(&text),
                                other => {
                                    return Err(bad(format!(
                                        "{at}.role: expected user, assistant, system or developer, got {other:?}"
                                    )))
                                }
                            }
                        }
                        "function_call" => {
                            let name =
                                item.get("name").and_then(Value::as_str).ok_or_else(|| bad(format!("{at}.name: required")))?;
                            let call_id = item
                                .get("call_id")
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(format!("{at}.call_id: required")))?;
                            let args = item.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                            let arguments = serde_json::from_str(args).unwrap_or_else(|_| Value::String(args.to_string()));
                            pending_calls.push(ToolCall {
                                id: call_id.to_string(),
                                kind: "function",
                                function: FunctionCall { name: name.to_string(), arguments },
                            });
                        }
                        "function_call_output" => {
                            flush(&mut b, &mut pending_text, &mut pending_calls);
                            let call_id = item
                                .get("call_id")
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(format!("{at}.call_id: required")))?;
                            let output = match item.get("output") {
                                Some(Value::String(s)) => s.clone(),
                                Some(v @ Value::Array(_)) => content_text(v, &at)?,
                                Some(other) => other.to_string(),
                                None => String::new(),
                            };
                            b.tool_result(call_id.to_string(), None, output);
                        }
                        // The model's own earlier reasoning: not shown to it again.
                        "reasoning" => {}
                        other => return Err(bad(format!("{at}.type: unsupported input item {other:?}"))),
                    }
                }
                flush(&mut b, &mut pending_text, &mut pending_calls);
            }
        }
        let (tools, strict) = self.tools()?;
        let none = matches!(&self.tool_choice, Some(Value::String(s)) if s == "none");
        let effort = self.reasoning.as_ref().and_then(|r| r.get("effort")).and_then(Value::as_str);
        let thinking = match effort {
            None => None,
            Some("none" | "minimal") => Some(false),
            Some("low" | "medium" | "high" | "xhigh") => Some(true),
            Some(other) => return Err(bad(format!("reasoning.effort: unknown value {other:?}"))),
        };
        let prompt = b.finish(if none { vec![] } else { tools }, thinking.filter(|t| !t), "input: empty")?;
        let max_tokens = match self.max_output_tokens {
            Some(0) => return Err(bad("max_output_tokens: must be at least 1".into())),
            Some(n) => n,
            None => u64::MAX,
        };
        let mut req = GenerateRequest::new(prompt, max_tokens, sampling(self.temperature, self.top_p, None, None, None), vec![]);
        req.thinking = true;
        if !none {
            req.strict_tools = strict;
        }
        req.force_tool = match &self.tool_choice {
            None => None,
            Some(Value::String(s)) => match s.as_str() {
                "auto" | "none" => None,
                "required" => Some(ForceTool::Any),
                other => return Err(bad(format!("tool_choice: unknown value {other:?}"))),
            },
            Some(v) => match (v.get("type").and_then(Value::as_str), v.get("name").and_then(Value::as_str)) {
                (Some("function"), Some(name)) => Some(ForceTool::Named(name.to_string())),
                _ => {
                    return Err(bad(
                        "tool_choice: expected auto, none, required or {\"type\": \"function\", \"name\": ...}".into()
                    ))
                }
            },
        };
        req.format = match self.text.as_ref().and_then(|t| t.get("format")) {
            None | Some(Value::Null) => None,
            Some(f) => match f.get("type").and_then(Value::as_str) {
                Some("text") => None,
                Some("json_object") => Some(ResponseFormat::JsonObject),
                Some("json_schema") => match f.get("schema") {
                    Some(s) if s.is_object() => Some(ResponseFormat::JsonSchema(s.clone())),
                    _ => return Err(bad("text.format.schema: a JSON schema object is required".into())),
                },
                other => return Err(bad(format!("text.format.type: unknown {other:?}"))),
            },
        };
        Ok(req)
    }
}

// ---------------------------------------------------------------------------
// The response object.

/// What a response is built from.
pub struct Meta {
    pub id: String,
    pub model: String,
    pub created_at: u64,
    /// Echoed fields of the request.
    pub echo: Value,
}

impl Meta {
    pub fn new(req: &ResponsesRequest, model: &str) -> Meta {
        Meta {
            id: new_id("resp_"),
            model: model.to_string(),
            created_at: super::openai::unix_now(),
            echo: json!({
                "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens,
                "previous_response_id": req.previous_response_id,
                "temperature": req.temperature.unwrap_or(1.0),
                "top_p": req.top_p.unwrap_or(1.0),
                "tools": req.tools.clone().unwrap_or_default(),
                "tool_choice": req.tool_choice.clone().unwrap_or(json!("auto")),
                "text": req.text.clone().unwrap_or(json!({"format": {"type": "text"}})),
                "reasoning": req.reasoning.clone().unwrap_or(json!({"effort": null, "summary": null})),
                "store": req.stored(),
                "metadata": req.metadata.clone().unwrap_or(json!({})),
                "parallel_tool_calls": true,
                "truncation": "disabled",
            }),
        }
    }

    fn object(&self, status: &str, output: Vec<Value>, usage: Value, incomplete: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": usage,
            "error": null,
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), self.echo.as_object()) {
            o.extend(e.clone());
        }
        v
    }
}

fn usage_json(prompt: u32, cached: u32, output: u32, reasoning: u32) -> Value {
    json!({
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call_item(id: &str, call_id: &str, c: &OutputToolCall, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": c.name,
           "arguments": c.arguments.to_string(), "status": status})
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": id, "summary": [{"type": "summary_text", "text": text}]})
}

fn status_of(reason: &StopReason) -> (&'static str, bool) {
    match reason {
        StopReason::MaxTokens => ("incomplete", true),
        _ => ("completed", false),
    }
}

/// The conversation a stored response continues: the request's messages
/// (without its `instructions`, which a chained request does not inherit)
/// and the answer as one assistant turn.
pub fn conversation(prompt: &Prompt, had_instructions: bool, text: &str, calls: &[(String, OutputToolCall)]) -> Vec<ChatMessage> {
    let skip = usize::from(had_instructions && prompt.messages.first().is_some_and(|m| m.role == "system"));
    let mut msgs: Vec<ChatMessage> = prompt.messages[skip..].to_vec();
    let mut answer = ChatMessage::new("assistant", text);
    answer.tool_calls = calls
        .iter()
        .map(|(id, c)| ToolCall {
            id: id.clone(),
            kind: "function",
            function: FunctionCall { name: c.name.clone(), arguments: c.arguments.clone() },
        })
        .collect();
    msgs.push(answer);
    msgs
}

/// The non-streamed response; also returns the answer's calls with their ids
/// (for the store).
pub fn response(
    meta: &Meta,
    out: &Collected,
    reason: &StopReason,
    prompt: u32,
    cached: u32,
    output: u32,
) -> (Value, Vec<(String, OutputToolCall)>) {
    let mut items = vec![];
    if let Some(t) = out.thinking() {
        items.push(reasoning_item(&new_id("rs_"), &t));
    }
    let text = out.text();
    if !text.is_empty() || out.tool_calls().is_empty() {
        items.push(message_item(&new_id("msg_"), &text, "completed"));
    }
    let mut calls = vec![];
    for c in out.tool_calls() {
        let call_id = new_id("call_");
        items.push(call_item(&new_id("fc_"), &call_id, c, "completed"));
        calls.push((call_id, c.clone()));
    }
    let (status, incomplete) = status_of(reason);
    (meta.object(status, items, usage_json(prompt, cached, output, 0), incomplete), calls)
}

// ---------------------------------------------------------------------------
// The store.

struct Stored {
    id: String,
    response: Value,
    conversation: Vec<ChatMessage>,
    bytes: usize,
}

/// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`,
/// bounded by count and bytes (oldest out first).
pub struct ResponseStore {
    entries: Mutex<VecDeque<Stored>>,
    max_entries: usize,
    max_bytes: usize,
}

impl ResponseStore {
    pub fn new(max_entries: usize, max_bytes: usize) -> ResponseStore {
        ResponseStore { entries: Mutex::new(VecDeque::new()), max_entries, max_bytes }
    }

    pub fn insert(&self, response: Value, conversation: Vec<ChatMessage>) {
        let id = response["id"].as_str().unwrap_or_default().to_string();
        let bytes = response.to_string().len() + conversation.iter().map(|m| m.content.len() + 64).sum::<usize>();
        if bytes > self.max_bytes {
            return;
        }
        let mut e = self.entries.lock().unwrap();
        e.push_back(Stored { id, response, conversation, bytes });
        let mut total: usize = e.iter().map(|s| s.bytes).sum();
        while e.len() > self.max_entries || total > self.max_bytes {
            match e.pop_front() {
                Some(s) => total -= s.bytes,
                None => break,
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Value> {
        self.entries.lock().unwrap().iter().find(|s| s.id == id).map(|s| s.response.clone())
    }

    pub fn conversation(&self, id: &str) -> Option<Vec<ChatMessage>> {
        self.entries.lock().unwrap().iter().find(|s| s.id == id).map(|s| s.conversation.clone())
    }

    pub fn delete(&self, id: &str) -> bool {
        let mut e = self.entries.lock().unwrap();
        let before = e.len();
        e.retain(|s| s.id != id);
        e.len() != before
    }
}

// ---------------------------------------------------------------------------
// The event stream.

enum Open {
    None,
    Message { id: String, text: String },
    Reasoning { id: String, text: String },
}

/// Renders the documented event sequence; at the end, the full response
/// (stored when the request asked).
pub struct EventStream {
    meta: Meta,
    seq: u64,
    output: Vec<Value>,
    open: Open,
    calls: Vec<(String, OutputToolCall)>,
    /// Where to keep the finished response, with the request's prompt.
    pub store: Option<(std::sync::Arc<ResponseStore>, Prompt, bool)>,
}

impl EventStream {
    pub fn new(meta: Meta) -> EventStream {
        EventStream { meta, seq: 0, output: vec![], open: Open::None, calls: vec![], store: None }
    }

    fn event(&mut self, kind: &str, mut data: Value) -> String {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        sse::encode(Some(kind), &data)
    }

    fn close(&mut self) -> String {
        let index = self.output.len();
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => String::new(),
            Open::Message { id, text } => {
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let mut out = self.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                );
                out += &self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                let item = message_item(&id, &text, "completed");
                out += &self.event("response.output_item.done", json!({"output_index": index, "item": item}));
                self.output.push(item);
                out
            }
            Open::Reasoning { id, text } => {
                let part = json!({"type": "summary_text", "text": text});
                let mut out = self.event(
                    "response.reasoning_summary_text.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                );
                out += &self.event(
                    "response.reasoning_summary_part.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "part": part}),
                );
                let item = reasoning_item(&id, &text);
                out += &self.event("response.output_item.done", json!({"output_index": index, "item": item}));
                self.output.push(item);
                out
            }
        }
    }
}

impl EventStream {
    /// A piece of the answer (`reasoning`: of the thinking), opening its
    /// output item first when another one (or none) is open.
    fn append(&mut self, reasoning: bool, delta: &str) -> String {
        if delta.is_empty() {
            return String::new();
        }
        let mut out = String::new();
        let open_kind = match &self.open {
            Open::Message { .. } => Some(false),
            Open::Reasoning { .. } => Some(true),
            Open::None => None,
        };
        let index = if open_kind == Some(reasoning) { self.output.len() } else { usize::MAX };
        if index == usize::MAX {
            out += &self.close();
            let index = self.output.len();
            let (id, item, part_event, part) = if reasoning {
                let id = new_id("rs_");
                let item = json!({"type": "reasoning", "id": id, "summary": []});
                (
                    id,
                    item,
                    "response.reasoning_summary_part.added",
                    json!({"summary_index": 0, "part": {"type": "summary_text", "text": ""}}),
                )
            } else {
                let id = new_id("msg_");
                let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
                let part = json!({"content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}});
                (id, item, "response.content_part.added", part)
            };
            out += &self.event("response.output_item.added", json!({"output_index": index, "item": item}));
            let mut added = json!({"item_id": id, "output_index": index});
            if let (Some(a), Value::Object(p)) = (added.as_object_mut(), part) {
                a.extend(p);
            }
            out += &self.event(part_event, added);
            self.open =
                if reasoning { Open::Reasoning { id, text: String::new() } } else { Open::Message { id, text: String::new() } };
        }
        let index = self.output.len();
        let id = match &mut self.open {
            Open::Message { id, text } | Open::Reasoning { id, text } => {
                text.push_str(delta);
                id.clone()
            }
            Open::None => unreachable!("an item was just opened"),
        };
        let (kind, data) = if reasoning {
            (
                "response.reasoning_summary_text.delta",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": delta}),
            )
        } else {
            (
                "response.output_text.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}),
            )
        };
        out += &self.event(kind, data);
        out
    }
}

impl StreamRenderer for EventStream {
    fn start(&mut self, _prompt: u32, _cached: u32) -> String {
        let r = self.meta.object("in_progress", vec![], Value::Null, false);
        let mut out = self.event("response.created", json!({"response": r}));
        out += &self.event("response.in_progress", json!({"response": r}));
        out
    }

    fn text(&mut self, delta: &str) -> String {
        self.append(false, delta)
    }

    fn thinking(&mut self, delta: &str) -> String {
        self.append(true, delta)
    }

    fn tool_call(&mut self, call: &OutputToolCall) -> String {
        let mut out = self.close();
        let (id, call_id) = (new_id("fc_"), new_id("call_"));
        let index = self.output.len();
        let mut added = call_item(&id, &call_id, call, "in_progress");
        added["arguments"] = json!("");
        out += &self.event("response.output_item.added", json!({"output_index": index, "item": added}));
        for frag in super::json_fragments(&call.arguments) {
            out += &self
                .event("response.function_call_arguments.delta", json!({"item_id": id, "output_index": index, "delta": frag}));
        }
        out += &self.event(
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": index, "arguments": call.arguments.to_string()}),
        );
        let item = call_item(&id, &call_id, call, "completed");
        out += &self.event("response.output_item.done", json!({"output_index": index, "item": item}));
        self.output.push(item);
        self.calls.push((call_id, call.clone()));
        out
    }

    fn finish(&mut self, reason: &StopReason, prompt: u32, cached: u32, output: u32) -> String {
        let mut out = self.close();
        let (status, incomplete) = status_of(reason);
        let r = self.meta.object(status, std::mem::take(&mut self.output), usage_json(prompt, cached, output, 0), incomplete);
        if let Some((store, p, had_instructions)) = self.store.take() {
            let text: String = r["output"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["type"] == "message")
                .filter_map(|i| i["content"][0]["text"].as_str())
                .collect();
            store.insert(r.clone(), conversation(&p, had_instructions, &text, &self.calls));
        }
        out += &self.event(if incomplete { "response.incomplete" } else { "response.completed" }, json!({"response": r}));
        out
    }

    fn error(&mut self, e: &ApiError) -> String {
        let mut out = self.event("error", json!({"code": e.openai_type(), "message": e.message(), "param": null}));
        let mut r = self.meta.object("failed", std::mem::take(&mut self.output), Value::Null, false);
        r["error"] = json!({"code": "server_error", "message": e.message()});
        out += &self.event("response.failed", json!({"response": r}));
        out
    }

    fn keepalive(&mut self) -> String {
        ": keepalive\n\n".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Result<GenerateRequest, ApiError> {
        serde_json::from_value::<ResponsesRequest>(v).unwrap().to_generate(&[])
    }

    #[test]
    fn items_become_the_conversation() {
        let r = req(json!({"instructions": "be brief", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": []}],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": true}],
            "max_output_tokens": 20, "text": {"format": {"type": "json_object"}}}))
        .unwrap();
        let m = &r.prompt.messages;
        assert_eq!((m[0].role.as_str(), m[0].content.as_str()), ("system", "be brief"));
        assert_eq!(m[1].role, "user");
        assert_eq!(m[2].tool_calls[0].function.arguments, json!({"city": "Paris"}));
        assert_eq!((m[3].role.as_str(), m[3].name.as_deref()), ("tool", Some("get_weather")));
        assert_eq!(r.max_tokens, 20);
        assert_eq!(r.strict_tools, vec!["get_weather".to_string()]);
        assert_eq!(r.format, Some(ResponseFormat::JsonObject));
    }

    #[test]
    fn unsupported_inputs_are_request_errors() {
        for bad in [
            json!({}),
            json!({"input": 5}),
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
            json!({"input": [{"type": "computer_call"}]}),
            json!({"input": "x", "tool_choice": "sometimes"}),
            json!({"input": "x", "max_output_tokens": 0}),
            json!({"input": "x", "reasoning": {"effort": "extreme"}}),
        ] {
            let r = serde_json::from_value::<ResponsesRequest>(bad.clone())
                .map_err(|e| bad_json(&e))
                .and_then(|r| r.to_generate(&[]));
            assert!(matches!(r, Err(ApiError::InvalidRequest(_))), "{bad}");
        }
    }

    fn bad_json(e: &serde_json::Error) -> ApiError {
        ApiError::InvalidRequest(e.to_string())
    }

    #[test]
    fn the_store_is_bounded_oldest_first() {
        let s = ResponseStore::new(2, 1 << 20);
        for i in 0..3 {
            s.insert(json!({"id": format!("resp_{i}")}), vec![ChatMessage::new("user", "x")]);
        }
        assert!(s.get("resp_0").is_none());
        assert!(s.get("resp_2").is_some());
        assert!(s.delete("resp_1"));
        assert!(!s.delete("resp_1"));
        let small = ResponseStore::new(10, 200);
        small.insert(json!({"id": "a", "pad": "x".repeat(120)}), vec![]);
        small.insert(json!({"id": "b", "pad": "x".repeat(120)}), vec![]);
        assert!(small.get("a").is_none() && small.get("b").is_some());
    }
}

//! The OpenAI dialect: `/v1/chat/completions` and `/v1/completions` wire
//! types, conversion to the internal request, and response / chunk rendering.

use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::prompt::PromptBuilder;
use super::{check_range, check_stops, StreamRenderer};
use crate::engine::{
    Alternative, Collected, ForceTool, FunctionCall, GenerateRequest, OutputToolCall, Prompt, ResponseFormat, Sampling,
    StopReason, TokenLogprob, ToolCall,
};
use crate::error::{ApiError, Dialect};
use crate::sse;

// ---------------------------------------------------------------------------
// Wire types.

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMsg>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// `true`: report each token's log-probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token (0-20), with `logprobs`.
    #[serde(default)]
    pub top_logprobs: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptField,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    /// Alternatives per token to report (0-20; the chosen token's
    /// log-probability comes with any value).
    #[serde(default)]
    pub logprobs: Option<u64>,
}

/// Sampling and streaming fields both endpoints share.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not in OpenAI's API, but common in local servers' clients.
    #[serde(default)]
    pub top_k: Option<u64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
    #[serde(default)]
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: a string, or a list holding one string.
#[derive(Debug)]
pub struct PromptField(pub String);

impl<'de> Deserialize<'de> for PromptField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(PromptField(s)),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => Ok(PromptField(a[0].as_str().unwrap().to_string())),
            Value::Array(_) => {
                Err(D::Error::custom("only one prompt per request is supported (a string or a list of one string)"))
            }
            _ => Err(D::Error::custom("expected a string")),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Deserialize)]
pub struct ChatMsg {
    pub role: Role,
    #[serde(default)]
    pub content: Option<MsgContent>,
    #[serde(default)]
    pub tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// A string or a list of content parts.
#[derive(Debug)]
pub struct MsgContent(pub String);

impl<'de> Deserialize<'de> for MsgContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(MsgContent(s)),
            Value::Array(parts) => {
                let mut text = String::new();
                for (i, p) in parts.iter().enumerate() {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let t = p
                                .get("text")
                                .and_then(Value::as_str)
                                .ok_or_else(|| D::Error::custom(format!("part {i}: a text part needs a string `text`")))?;
                            text.push_str(t);
                        }
                        Some(other) => {
                            return Err(D::Error::custom(format!(
                                "part {i}: `{other}` content is not supported: the loaded model reads text only"
                            )))
                        }
                        None => return Err(D::Error::custom(format!("part {i}: missing `type`"))),
                    }
                }
                Ok(MsgContent(text))
            }
            Value::Null => Ok(MsgContent(String::new())),
            _ => Err(D::Error::custom("expected a string or an array of content parts")),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
pub struct InToolCall {
    pub id: String,
    pub function: InFunction,
}

#[derive(Debug, Deserialize, Clone)]
pub struct InFunction {
    pub name: String,
    /// A JSON text, per the API.
    #[serde(default)]
    pub arguments: String,
}

#[derive(Debug, Deserialize, Clone)]
pub struct ToolDef {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: FunctionDef,
}

#[derive(Debug, Deserialize, Clone)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    /// Calls must follow `parameters` exactly.
    #[serde(default)]
    pub strict: Option<bool>,
}

// ---------------------------------------------------------------------------
// Conversion.

impl Common {
    fn check(&self) -> Result<(), ApiError> {
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        check_range("min_p", self.min_p, 0.0, 1.0)?;
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::InvalidRequest(format!("n: only n=1 is supported, got {n}")));
            }
        }
        check_stops("stop", &self.stops(), 4)
    }

    /// `response_format` as the engine takes it.
    fn format(&self) -> Result<Option<ResponseFormat>, ApiError> {
        let Some(f) = &self.response_format else { return Ok(None) };
        let bad = |m: &str| Err(ApiError::InvalidRequest(format!("response_format: {m}")));
        match f.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
            Some("json_schema") => {
                let Some(js) = f.get("json_schema").filter(|v| v.is_object()) else {
                    return bad("json_schema: required for type json_schema ({\"name\", \"schema\", \"strict\"})");
                };
                match js.get("schema") {
                    None => Ok(Some(ResponseFormat::JsonSchema(json!({})))),
                    Some(s) if s.is_object() => Ok(Some(ResponseFormat::JsonSchema(s.clone()))),
                    Some(_) => bad("json_schema.schema: must be a JSON schema object"),
                }
            }
            Some(other) => bad(&format!("unknown type {other:?} (expected text, json_object or json_schema)")),
            None => bad("type: required"),
        }
    }

    fn stops(&self) -> Vec<String> {
        match &self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        }
    }

    fn sampling(&self) -> Sampling {
        super::prompt::sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)
    }

    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.map(|o| o.include_usage).unwrap_or(false)
    }
}

/// A requested `max_tokens`; absent means "as many as fit in the context".
fn max_tokens(v: Option<u64>, name: &str) -> Result<u64, ApiError> {
    match v {
        Some(0) => Err(ApiError::InvalidRequest(format!("{name}: must be at least 1"))),
        Some(n) => Ok(n),
        None => Ok(u64::MAX),
    }
}

impl ChatRequest {
    pub fn to_prompt(&self) -> Result<Prompt, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::InvalidRequest("messages: at least one message is required".into()));
        }
        let mut b = PromptBuilder::default();
        for (i, m) in self.messages.iter().enumerate() {
            let text = m.content.as_ref().map(|c| c.0.clone()).unwrap_or_default();
            match m.role {
                Role::System | Role::Developer => b.system_message(&text),
                Role::User => b.user(text),
                Role::Assistant => {
                    let calls = m
                        .tool_calls
                        .iter()
                        .flatten()
                        .map(|c| {
                            let arguments = if c.function.arguments.trim().is_empty() {
                                json!({})
                            } else {
                                serde_json::from_str(&c.function.arguments).unwrap_or(Value::String(c.function.arguments.clone()))
                            };
                            ToolCall {
                                id: c.id.clone(),
                                kind: "function",
                                function: FunctionCall { name: c.function.name.clone(), arguments },
                            }
                        })
                        .collect();
                    b.assistant(text, calls);
                }
                Role::Tool => {
                    let id = m
                        .tool_call_id
                        .clone()
                        .ok_or_else(|| ApiError::InvalidRequest(format!("messages[{i}].tool_call_id: required for role tool")))?;
                    b.tool_result(id, m.name.clone(), text);
                }
            }
        }
        let none = matches!(&self.tool_choice, Some(Value::String(s)) if s == "none");
        let tools = match &self.tools {
            Some(t) if !none => t
                .iter()
                .map(|t| {
                    let f = &t.function;
                    super::function_tool(
                        t.kind.as_deref().unwrap_or("function"),
                        &f.name,
                        f.description.as_deref(),
                        f.parameters.as_ref(),
                    )
                })
                .collect(),
            _ => vec![],
        };
        b.finish(tools, None, "messages: at least one non-system message is required")
    }

    fn force_tool(&self) -> Result<Option<ForceTool>, ApiError> {
        match &self.tool_choice {
            None => Ok(None),
            Some(Value::String(s)) => match s.as_str() {
                "auto" | "none" => Ok(None),
                "required" => Ok(Some(ForceTool::Any)),
                other => Err(ApiError::InvalidRequest(format!("tool_choice: unknown value {other:?}"))),
            },
            Some(v) => match v["function"]["name"].as_str() {
                Some(name) => Ok(Some(ForceTool::Named(name.to_string()))),
                None => Err(ApiError::InvalidRequest(
                    "tool_choice: expected a string or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                )),
            },
        }
    }

    pub fn to_generate(&self) -> Result<GenerateRequest, ApiError> {
        self.common.check()?;
        let requested = self.max_completion_tokens.or(self.max_tokens);
        let name = if self.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
        let mut req =
            GenerateRequest::new(self.to_prompt()?, max_tokens(requested, name)?, self.common.sampling(), self.common.stops());
        // Reasoning has its own field here (`reasoning_content`), which
        // clients that do not know it ignore: always pass it through.
        req.thinking = true;
        req.force_tool = self.force_tool()?;
        req.format = self.common.format()?;
        if !matches!(&self.tool_choice, Some(Value::String(s)) if s == "none") {
            req.strict_tools = self
                .tools
                .iter()
                .flatten()
                .filter(|t| t.function.strict == Some(true))
                .map(|t| t.function.name.clone())
                .collect();
        }
        req.logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), top) => Some(logprobs_count("top_logprobs", top.unwrap_or(0))?),
            (_, Some(_)) => return Err(ApiError::InvalidRequest("top_logprobs: requires logprobs: true".into())),
            _ => None,
        };
        Ok(req)
    }
}

impl CompletionRequest {
    pub fn to_generate(&self) -> Result<GenerateRequest, ApiError> {
        self.common.check()?;
        if self.echo == Some(true) {
            return Err(ApiError::InvalidRequest("echo: not supported".into()));
        }
        if self.suffix.is_some() {
            return Err(ApiError::InvalidRequest("suffix: not supported".into()));
        }
        let prompt = Prompt { raw_prompt: Some(self.prompt.0.clone()), ..Default::default() };
        let mut req = GenerateRequest::new(
            prompt,
            max_tokens(self.max_tokens.or(Some(16)), "max_tokens")?,
            self.common.sampling(),
            self.common.stops(),
        );
        req.format = self.common.format()?;
        req.logprobs = self.logprobs.map(|n| logprobs_count("logprobs", n)).transpose()?;
        Ok(req)
    }
}

/// Alternatives per token: at most 20, as OpenAI's chat API allows.
fn logprobs_count(field: &str, n: u64) -> Result<u8, ApiError> {
    if n > 20 {
        return Err(ApiError::InvalidRequest(format!("{field}: must be between 0 and 20, got {n}")));
    }
    Ok(n as u8)
}

// ---------------------------------------------------------------------------
// Responses.

fn alternative_json(a: &Alternative) -> Value {
    json!({"token": a.text, "logprob": a.logprob, "bytes": a.bytes})
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut v = alternative_json(&lp.token);
            v["top_logprobs"] = lp.top.iter().map(alternative_json).collect();
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' `logprobs`: parallel lists, text offsets from `offset`.
fn completion_logprobs(lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut offsets = Vec::with_capacity(lps.len());
    for lp in lps {
        offsets.push(offset);
        offset += lp.token.text.len();
    }
    json!({
        "tokens": lps.iter().map(|lp| lp.token.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|lp| lp.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|lp| {
            lp.top.iter().map(|a| (a.text.clone(), json!(a.logprob))).collect::<serde_json::Map<String, Value>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn logprobs_json(endpoint: Endpoint, lps: &[TokenLogprob], wanted: bool, offset: usize) -> Value {
    match (wanted, endpoint) {
        (false, _) => Value::Null,
        (true, Endpoint::Chat) => chat_logprobs(lps),
        (true, Endpoint::Completions) => completion_logprobs(lps, offset),
    }
}

pub fn finish_reason(r: &StopReason) -> &'static str {
    match r {
        StopReason::MaxTokens => "length",
        StopReason::EndTurn | StopReason::StopSequence(_) => "stop",
        StopReason::ToolUse => "tool_calls",
    }
}

fn tool_call_json(c: &OutputToolCall) -> Value {
    json!({"id": super::new_id("call_"), "type": "function", "function": {"name": c.name, "arguments": c.arguments.to_string()}})
}

pub fn usage_json(prompt: u32, cached: u32, completion: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Which endpoint a response or stream belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

#[allow(clippy::too_many_arguments)]
pub fn response(
    endpoint: Endpoint,
    id: &str,
    model: &str,
    out: &Collected,
    reason: &StopReason,
    usage: Value,
    logprobs: bool,
) -> Value {
    let text = out.text();
    let lp = logprobs_json(endpoint, &out.logprobs, logprobs, 0);
    let choice = match endpoint {
        Endpoint::Chat => {
            let calls = out.tool_calls();
            let mut message = json!({
                "role": "assistant",
                "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) },
            });
            if !calls.is_empty() {
                message["tool_calls"] = calls.iter().map(|c| tool_call_json(c)).collect();
            }
            if let Some(t) = out.thinking() {
                message["reasoning_content"] = json!(t);
            }
            json!({"index": 0, "message": message, "logprobs": lp, "finish_reason": finish_reason(reason)})
        }
        Endpoint::Completions => json!({
            "index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason(reason),
        }),
    };
    json!({
        "id": id,
        "object": if endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": model,
        "choices": [choice],
        "usage": usage,
        "system_fingerprint": concat!("pensieve-", env!("CARGO_PKG_VERSION")),
    })
}

/// Renders `data:` chunks for a streamed completion.
pub struct ChunkStream {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Tool calls streamed so far (their `index`).
    calls: usize,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
    /// Those of tokens whose text has not gone out yet.
    pending: Vec<TokenLogprob>,
    /// Text bytes streamed so far (completions' `text_offset`).
    offset: usize,
}

impl ChunkStream {
    pub fn new(endpoint: Endpoint, id: &str, model: &str, include_usage: bool) -> ChunkStream {
        ChunkStream {
            endpoint,
            id: id.into(),
            model: model.into(),
            created: unix_now(),
            include_usage,
            calls: 0,
            logprobs: false,
            pending: vec![],
            offset: 0,
        }
    }

    /// Chunks carry the log-probabilities of their tokens.
    pub fn with_logprobs(mut self, on: bool) -> ChunkStream {
        self.logprobs = on;
        self
    }

    fn chunk(&self, choice: Value) -> String {
        let mut v = json!({
            "id": self.id,
            "object": if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": concat!("pensieve-", env!("CARGO_PKG_VERSION")),
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        sse::encode(None, &v)
    }

    fn delta(&mut self, delta: Value, finish: Option<&str>) -> String {
        // Text (or the end) takes the log-probabilities of the tokens so far.
        let lp = if delta.get("content").is_some() || finish.is_some() {
            let lps = std::mem::take(&mut self.pending);
            let v = logprobs_json(self.endpoint, &lps, self.logprobs && !lps.is_empty(), self.offset);
            self.offset += delta.get("content").and_then(Value::as_str).map_or(0, str::len);
            v
        } else {
            Value::Null
        };
        match self.endpoint {
            Endpoint::Chat => self.chunk(json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})),
            Endpoint::Completions => self.chunk(json!({
                "index": 0, "text": delta.get("content").and_then(Value::as_str).unwrap_or(""),
                "logprobs": lp, "finish_reason": finish,
            })),
        }
    }
}

impl StreamRenderer for ChunkStream {
    fn start(&mut self, _prompt: u32, _cached: u32) -> String {
        match self.endpoint {
            Endpoint::Chat => self.delta(json!({"role": "assistant", "content": ""}), None),
            Endpoint::Completions => String::new(),
        }
    }

    fn text(&mut self, t: &str) -> String {
        if t.is_empty() {
            return String::new();
        }
        self.delta(json!({"content": t}), None)
    }

    fn logprob(&mut self, lp: TokenLogprob) -> String {
        if self.logprobs {
            self.pending.push(lp);
        }
        String::new()
    }

    fn thinking(&mut self, t: &str) -> String {
        if t.is_empty() || self.endpoint != Endpoint::Chat {
            return String::new();
        }
        self.delta(json!({"reasoning_content": t}), None)
    }

    fn tool_call(&mut self, call: &OutputToolCall) -> String {
        if self.endpoint != Endpoint::Chat {
            return String::new();
        }
        let index = self.calls;
        self.calls += 1;
        let mut out = self.delta(
            json!({"tool_calls": [{"index": index, "id": super::new_id("call_"), "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]}),
            None,
        );
        for frag in super::json_fragments(&call.arguments) {
            out.push_str(&self.delta(json!({"tool_calls": [{"index": index, "function": {"arguments": frag}}]}), None));
        }
        out
    }

    fn finish(&mut self, reason: &StopReason, prompt: u32, cached: u32, output: u32) -> String {
        let mut out = self.delta(json!({}), Some(finish_reason(reason)));
        if self.include_usage {
            let v = json!({
                "id": self.id,
                "object": if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_json(prompt, cached, output),
            });
            out.push_str(&sse::encode(None, &v));
        }
        out.push_str(&sse::encode_raw(None, "[DONE]"));
        out
    }

    fn error(&mut self, e: &ApiError) -> String {
        sse::encode(None, &e.body(Dialect::OpenAi, None))
    }

    fn keepalive(&mut self) -> String {
        // An SSE comment: ignored by clients, keeps the connection alive.
        ": keep-alive\n\n".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_json;
    use crate::request::ChatMessage;

    fn chat(v: Value) -> Result<ChatRequest, ApiError> {
        parse_json(v.to_string().as_bytes())
    }

    #[test]
    fn converts_roles_tools_and_results() {
        let r = chat(json!({"model": "m", "messages": [
            {"role": "system", "content": "sys"},
            {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
        ], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}))
        .unwrap();
        let p = r.to_prompt().unwrap();
        assert_eq!(p.messages[0], ChatMessage::new("system", "sys\n\ndev"));
        assert_eq!(p.messages[2].tool_calls[0].function.arguments, json!({"city": "Paris"}));
        assert_eq!(p.messages[3].role, "tool");
        assert_eq!(p.messages[3].name.as_deref(), Some("get_weather"));
        assert_eq!(p.tools.len(), 1);
        let g = r.to_generate().unwrap();
        assert_eq!(g.max_tokens, u64::MAX, "absent max_tokens: as many as fit");
    }

    #[test]
    fn limits_and_params() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            chat(b).and_then(|r| r.to_generate())
        };
        assert!(with("n", json!(2)).unwrap_err().message().contains("n=1"));
        assert!(with("n", json!(1)).is_ok());
        assert!(with("temperature", json!(2.5)).is_err());
        assert_eq!(with("stop", json!("END")).unwrap().stop, vec!["END"]);
        assert_eq!(with("stop", json!(["a", "b"])).unwrap().stop, vec!["a", "b"]);
        assert!(with("stop", json!(["a", "b", "c", "d", "e"])).is_err());
        assert_eq!(with("max_completion_tokens", json!(7)).unwrap().max_tokens, 7);
        assert!(with("max_tokens", json!(0)).is_err());
        assert_eq!(with("seed", json!(42)).unwrap().sampling.seed, Some(42));
        let e = chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})).unwrap_err();
        assert!(e.message().contains("text only"), "{}", e.message());
        let e = chat(json!({"messages": [{"role": "wizard", "content": "x"}]})).unwrap_err();
        assert!(e.message().starts_with("messages[0].role"));
    }

    #[test]
    fn tool_choice_forms() {
        let base = json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]});
        let with = |v: Value| {
            let mut b = base.clone();
            b["tool_choice"] = v;
            chat(b).unwrap().to_generate()
        };
        assert_eq!(with(json!("required")).unwrap().force_tool, Some(ForceTool::Any));
        assert_eq!(with(json!("auto")).unwrap().force_tool, None);
        assert!(with(json!("none")).unwrap().prompt.tools.is_empty());
        assert_eq!(
            with(json!({"type": "function", "function": {"name": "f"}})).unwrap().force_tool,
            Some(ForceTool::Named("f".into()))
        );
        assert!(with(json!("sometimes")).is_err());
    }

    #[test]
    fn tool_call_chunks_reassemble() {
        let mut s = ChunkStream::new(Endpoint::Chat, "chatcmpl-1", "m", false);
        let call = OutputToolCall { name: "get_weather".into(), arguments: json!({"city": "Paris"}) };
        let out = s.tool_call(&call) + &s.tool_call(&call);
        let chunks: Vec<Value> = out
            .split("\n\n")
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l.trim_start_matches("data: ")).unwrap())
            .collect();
        let mut args = ["".to_string(), "".to_string()];
        for c in &chunks {
            let tc = &c["choices"][0]["delta"]["tool_calls"][0];
            args[tc["index"].as_u64().unwrap() as usize].push_str(tc["function"]["arguments"].as_str().unwrap());
        }
        for a in args {
            assert_eq!(serde_json::from_str::<Value>(&a).unwrap(), json!({"city": "Paris"}));
        }
        // The dialect names each call: an OpenAI-style id, a new one per call.
        let ids: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["id"].as_str()).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|id| id.starts_with("call_")), "{ids:?}");
        assert_ne!(ids[0], ids[1]);
    }

    #[test]
    fn completions_prompt_forms() {
        let r: CompletionRequest = parse_json(br#"{"model":"m","prompt":["once"],"max_tokens":3}"#).unwrap();
        assert_eq!(r.to_generate().unwrap().prompt.raw_prompt.as_deref(), Some("once"));
        assert!(parse_json::<CompletionRequest>(br#"{"prompt":["a","b"]}"#).is_err());
        let r: CompletionRequest = parse_json(br#"{"prompt":"x","echo":true}"#).unwrap();
        assert!(r.to_generate().is_err());
    }

    #[test]
    fn chunk_stream_shape() {
        let mut s = ChunkStream::new(Endpoint::Chat, "chatcmpl-1", "m", true);
        let start = s.start(5, 0);
        assert!(start.contains("\"role\":\"assistant\""));
        let t = s.text("hi");
        let v: Value = serde_json::from_str(t.trim().trim_start_matches("data: ")).unwrap();
        assert_eq!(v["choices"][0]["delta"]["content"], "hi");
        assert!(v["usage"].is_null());
        let end = s.finish(&StopReason::MaxTokens, 5, 2, 3);
        let lines: Vec<&str> = end.split("\n\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 3);
        let fin: Value = serde_json::from_str(lines[0].trim_start_matches("data: ")).unwrap();
        assert_eq!(fin["choices"][0]["finish_reason"], "length");
        let usage: Value = serde_json::from_str(lines[1].trim_start_matches("data: ")).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(lines[2], "data: [DONE]");
    }
}

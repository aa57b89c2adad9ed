//! The Ollama dialect: `/api/chat` and `/api/generate` wire types,
//! conversion to the internal request, and the NDJSON stream / final object
//! with Ollama's timing fields (measured here: request start, first output,
//! end). Ollama streams by default (`stream: false` for one object).

use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};

use super::prompt::{sampling, PromptBuilder};
use super::{check_range, check_stops, StreamRenderer};
use crate::engine::{Collected, FunctionCall, GenerateRequest, OutputToolCall, Prompt, ResponseFormat, StopReason, ToolCall};
use crate::error::{ApiError, Dialect};

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct GenerateRequestBody {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    /// The prompt as is, without the chat template.
    #[serde(default)]
    pub raw: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub images: Option<Vec<Value>>,
    #[serde(flatten)]
    pub common: Common,
}

/// What both endpoints share.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    /// `"json"` or a JSON schema.
    #[serde(default)]
    pub format: Option<Value>,
    #[serde(default)]
    pub options: Option<Options>,
    /// Defaults to true.
    #[serde(default)]
    pub stream: Option<bool>,
    /// How long the model stays loaded once idle, from this request on:
    /// a duration (`"5m"`, `"1h"`, `"0"`) or seconds; negative: for ever.
    #[serde(default)]
    pub keep_alive: Option<Value>,
    /// `true` / `false`, or an effort (`"low"`, ...): thinking on.
    #[serde(default)]
    pub think: Option<Value>,
}

impl Common {
    /// `keep_alive`, read as Ollama reads it.
    pub fn keep_alive(&self) -> Result<Option<crate::config::KeepAlive>, ApiError> {
        let bad = || {
            ApiError::InvalidRequest(
                "keep_alive: expected a duration such as \"5m\", \"1h\" or \"0\", or a number of seconds".into(),
            )
        };
        match &self.keep_alive {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(d)) => crate::config::parse_keep_alive(d).map(Some).map_err(|_| bad()),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(secs) if secs < 0.0 => Ok(Some(crate::config::KeepAlive(None))),
                Some(secs) if secs.is_finite() && secs < 1e12 => {
                    Ok(Some(crate::config::KeepAlive(Some(std::time::Duration::from_secs_f64(secs)))))
                }
                _ => Err(bad()),
            },
            Some(_) => Err(bad()),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
pub struct Options {
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    /// Most tokens to generate (-1: no limit, -2: fill the context).
    #[serde(default)]
    pub num_predict: Option<i64>,
    #[serde(default)]
    pub stop: Option<Vec<String>>,
    /// The context this request may use (prompt + output), at most the model's.
    #[serde(default)]
    pub num_ctx: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub images: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_calls: Option<Vec<InToolCall>>,
    /// For role `tool`: which tool answered.
    #[serde(default)]
    pub tool_name: Option<String>,
    #[serde(default)]
    pub thinking: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InToolCall {
    pub function: InFunction,
}

#[derive(Debug, Deserialize)]
pub struct InFunction {
    pub name: String,
    #[serde(default)]
    pub arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: ToolFunction,
}

#[derive(Debug, Deserialize)]
pub struct ToolFunction {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

fn no_images(images: &Option<Vec<Value>>, what: &str) -> Result<(), ApiError> {
    match images {
        Some(v) if !v.is_empty() => {
            Err(ApiError::InvalidRequest(format!("{what}: images are not supported: the loaded model reads text only")))
        }
        _ => Ok(()),
    }
}

impl Common {
    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(true)
    }

    /// The internal request around `prompt`: sampling, limits, format, thinking.
    fn request(&self, prompt: Prompt) -> Result<GenerateRequest, ApiError> {
        let o = self.options.as_ref();
        let get = |f: fn(&Options) -> Option<f64>| o.and_then(f);
        check_range("options.temperature", get(|o| o.temperature), 0.0, 2.0)?;
        check_range("options.top_p", get(|o| o.top_p), 0.0, 1.0)?;
        check_range("options.min_p", get(|o| o.min_p), 0.0, 1.0)?;
        let stop = o.and_then(|o| o.stop.clone()).unwrap_or_default();
        check_stops("options.stop", &stop, 16)?;
        let max_tokens = match o.and_then(|o| o.num_predict) {
            None | Some(-1) | Some(-2) => u64::MAX,
            Some(n) if n <= 0 => {
                return Err(ApiError::InvalidRequest(format!("options.num_predict: must be positive, -1 or -2, got {n}")))
            }
            Some(n) => n as u64,
        };
        let seed = o.and_then(|o| o.seed).map(|s| s as u64);
        let samp = sampling(get(|o| o.temperature), get(|o| o.top_p), o.and_then(|o| o.top_k), get(|o| o.min_p), seed);
        let mut req = GenerateRequest::new(prompt, max_tokens, samp, stop);
        req.context_cap = o.and_then(|o| o.num_ctx);
        req.format = match &self.format {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) if s == "json" => Some(ResponseFormat::JsonObject),
            Some(v @ Value::Object(_)) => Some(ResponseFormat::JsonSchema(v.clone())),
            Some(other) => {
                return Err(ApiError::InvalidRequest(format!("format: expected \"json\" or a JSON schema object, got {other}")))
            }
        };
        let think = match &self.think {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::String(s)) if ["low", "medium", "high"].contains(&s.as_str()) => Some(true),
            Some(other) => {
                return Err(ApiError::InvalidRequest(format!(
                    "think: expected true, false, \"low\", \"medium\" or \"high\", got {other}"
                )))
            }
        };
        req.thinking = think.unwrap_or(false);
        req.prompt.enable_thinking = think.filter(|t| !t);
        Ok(req)
    }
}

impl ChatRequest {
    pub fn to_generate(&self) -> Result<GenerateRequest, ApiError> {
        let mut b = PromptBuilder::default();
        for (i, m) in self.messages.iter().enumerate() {
            no_images(&m.images, &format!("messages[{i}]"))?;
            let text = m.content.clone().unwrap_or_default();
            match m.role.as_str() {
                "system" => b.system_message(&text),
                "user" => b.user(text),
                "assistant" => {
                    let calls = m
                        .tool_calls
                        .iter()
                        .flatten()
                        .enumerate()
                        .map(|(j, c)| ToolCall {
                            id: format!("call_{i}_{j}"),
                            kind: "function",
                            function: FunctionCall {
                                name: c.function.name.clone(),
                                arguments: c.function.arguments.clone().unwrap_or_else(|| json!({})),
                            },
                        })
                        .collect();
                    b.assistant(text, calls);
                }
                "tool" => {
                    // Ollama names the tool, not the call: answer the latest call of it.
                    let id = self.messages[..i]
                        .iter()
                        .enumerate()
                        .rev()
                        .find_map(|(k, prev)| {
                            prev.tool_calls.as_ref()?.iter().enumerate().rev().find_map(|(j, c)| {
                                (m.tool_name.as_deref().is_none_or(|n| n == c.function.name)).then(|| format!("call_{k}_{j}"))
                            })
                        })
                        .unwrap_or_else(|| format!("call_{i}"));
                    b.tool_result(id, m.tool_name.clone(), text);
                }
                other => {
                    return Err(ApiError::InvalidRequest(format!(
                        "messages[{i}].role: expected system, user, assistant or tool, got {other:?}"
                    )))
                }
            }
        }
        let tools = self
            .tools
            .iter()
            .flatten()
            .map(|t| {
                super::function_tool(
                    t.kind.as_deref().unwrap_or("function"),
                    &t.function.name,
                    t.function.description.as_deref(),
                    t.function.parameters.as_ref(),
                )
            })
            .collect();
        let prompt = b.finish(tools, None, "messages: at least one user or assistant message is required")?;
        self.common.request(prompt)
    }
}

impl GenerateRequestBody {
    pub fn to_generate(&self) -> Result<GenerateRequest, ApiError> {
        no_images(&self.images, "images")?;
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::InvalidRequest("suffix: fill-in-the-middle is not supported".into()));
        }
        let text = self.prompt.clone().unwrap_or_default();
        if text.is_empty() {
            return Err(ApiError::InvalidRequest(
                "prompt: required (an empty prompt only loads or unloads the model in Ollama; pensieve loads a model on its first request, and keep_alive says how long it stays)".into(),
            ));
        }
        let prompt = if self.raw == Some(true) {
            Prompt { raw_prompt: Some(text), ..Default::default() }
        } else {
            let mut b = PromptBuilder::default();
            if let Some(s) = &self.system {
                b.system_prompt(s.clone());
            }
            b.user(text);
            b.finish(vec![], None, "prompt: required")?
        };
        self.common.request(prompt)
    }
}

/// Which endpoint a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Generate,
}

/// Nanoseconds, as Ollama reports durations.
fn ns(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

fn done_reason(r: &StopReason) -> &'static str {
    match r {
        StopReason::MaxTokens => "length",
        _ => "stop",
    }
}

fn tool_calls_json(calls: &[&OutputToolCall]) -> Value {
    calls.iter().map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}})).collect()
}

/// Times measured around one generation (request start, first output, end).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub started: Instant,
    pub first_output: Option<Instant>,
}

impl Timing {
    pub fn new() -> Timing {
        Timing { started: Instant::now(), first_output: None }
    }

    /// Ollama's timing fields for a generation that ends now.
    pub fn stats(&self, prompt_tokens: u32, output_tokens: u32) -> Value {
        let now = Instant::now();
        let first = self.first_output.unwrap_or(now);
        json!({
            "total_duration": ns(now - self.started),
            // The model is loaded once, at start: no request waits for it.
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": ns(first - self.started),
            "eval_count": output_tokens,
            "eval_duration": ns(now - first),
        })
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing::new()
    }
}

/// Now, as Ollama stamps its answers (RFC 3339 with nanoseconds).
fn created_at() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let whole = super::rfc3339(now.as_secs());
    format!("{}.{:09}Z", whole.trim_end_matches('Z'), now.subsec_nanos())
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// The non-streamed answer.
pub fn response(endpoint: Endpoint, model: &str, out: &Collected, reason: &StopReason, stats: Value) -> Value {
    let head = match endpoint {
        Endpoint::Chat => {
            let mut message = json!({"role": "assistant", "content": out.text()});
            if let Some(t) = out.thinking() {
                message["thinking"] = json!(t);
            }
            let calls = out.tool_calls();
            if !calls.is_empty() {
                message["tool_calls"] = tool_calls_json(&calls);
            }
            json!({"model": model, "created_at": created_at(), "message": message})
        }
        Endpoint::Generate => {
            let mut v = json!({"model": model, "created_at": created_at(), "response": out.text()});
            if let Some(t) = out.thinking() {
                v["thinking"] = json!(t);
            }
            v
        }
    };
    merge(head, merge(json!({"done": true, "done_reason": done_reason(reason)}), stats))
}

/// Renders the NDJSON stream: one object per piece of output, then the
/// final one with `done: true` and the timings.
pub struct LineStream {
    endpoint: Endpoint,
    model: String,
    timing: Timing,
}

impl LineStream {
    pub fn new(endpoint: Endpoint, model: &str, timing: Timing) -> LineStream {
        LineStream { endpoint, model: model.to_string(), timing }
    }

    fn line(&mut self, content: &str, thinking: Option<&str>, calls: Option<Value>) -> String {
        self.timing.first_output.get_or_insert_with(Instant::now);
        let v = match self.endpoint {
            Endpoint::Chat => {
                let mut message = json!({"role": "assistant", "content": content});
                if let Some(t) = thinking {
                    message["thinking"] = json!(t);
                }
                if let Some(c) = calls {
                    message["tool_calls"] = c;
                }
                json!({"model": self.model, "created_at": created_at(), "message": message, "done": false})
            }
            Endpoint::Generate => {
                let mut v = json!({"model": self.model, "created_at": created_at(), "response": content, "done": false});
                if let Some(t) = thinking {
                    v["thinking"] = json!(t);
                }
                v
            }
        };
        format!("{v}\n")
    }
}

impl StreamRenderer for LineStream {
    fn start(&mut self, _prompt: u32, _cached: u32) -> String {
        String::new()
    }

    fn text(&mut self, delta: &str) -> String {
        if delta.is_empty() {
            return String::new();
        }
        self.line(delta, None, None)
    }

    fn thinking(&mut self, delta: &str) -> String {
        if delta.is_empty() {
            return String::new();
        }
        self.line("", Some(delta), None)
    }

    fn tool_call(&mut self, call: &OutputToolCall) -> String {
        if self.endpoint != Endpoint::Chat {
            return String::new();
        }
        self.line("", None, Some(tool_calls_json(&[call])))
    }

    fn finish(&mut self, reason: &StopReason, prompt: u32, _cached: u32, output: u32) -> String {
        let empty = match self.endpoint {
            Endpoint::Chat => json!({"message": {"role": "assistant", "content": ""}}),
            Endpoint::Generate => json!({"response": ""}),
        };
        let v = merge(
            merge(json!({"model": self.model, "created_at": created_at()}), empty),
            merge(json!({"done": true, "done_reason": done_reason(reason)}), self.timing.stats(prompt, output)),
        );
        format!("{v}\n")
    }

    fn error(&mut self, e: &ApiError) -> String {
        format!("{}\n", e.body(Dialect::Ollama, None))
    }

    fn keepalive(&mut self) -> String {
        // NDJSON has no comments; a long prefill simply sends nothing.
        String::new()
    }

    fn content_type(&self) -> &'static str {
        "application/x-ndjson"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<GenerateRequest, ApiError> {
        serde_json::from_value::<ChatRequest>(v).unwrap().to_generate()
    }

    #[test]
    fn options_map_to_the_request() {
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "options": {"temperature": 0, "top_k": 5, "seed": 3, "num_predict": 7, "stop": ["x"], "num_ctx": 2048},
            "format": "json", "think": false, "keep_alive": "5m"}))
        .unwrap();
        assert_eq!(r.max_tokens, 7);
        assert_eq!(r.sampling.temperature, Some(0.0));
        assert_eq!(r.sampling.top_k, Some(5));
        assert_eq!(r.sampling.seed, Some(3));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.context_cap, Some(2048));
        assert_eq!(r.format, Some(ResponseFormat::JsonObject));
        assert_eq!(r.prompt.enable_thinking, Some(false));
        let r = chat(json!({"messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": -1}})).unwrap();
        assert_eq!(r.max_tokens, u64::MAX);
    }

    #[test]
    fn tool_results_answer_the_latest_call_of_their_tool() {
        let r = chat(json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]}))
        .unwrap();
        let m = &r.prompt.messages;
        assert_eq!(m[1].tool_calls[0].id, "call_1_0");
        assert_eq!(m[2].tool_call_id.as_deref(), Some("call_1_0"));
        assert_eq!(m[2].name.as_deref(), Some("get_weather"));
    }

    #[test]
    fn bad_inputs_are_request_errors() {
        for bad in [
            json!({"messages": []}),
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            json!({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
            json!({"messages": [{"role": "user", "content": "x"}], "format": 5}),
            json!({"messages": [{"role": "user", "content": "x"}], "options": {"temperature": 9}}),
            json!({"messages": [{"role": "user", "content": "x"}], "options": {"num_predict": 0}}),
            json!({"messages": [{"role": "user", "content": "x"}], "think": "maybe"}),
        ] {
            assert!(matches!(chat(bad.clone()), Err(ApiError::InvalidRequest(_))), "{bad}");
        }
    }
}

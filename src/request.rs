//! The internal request (both API dialects convert into it) and the output
//! a generation yields: the one vocabulary the dialects and the engine share.

use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;

/// A chat message as chat templates expect it (the Hugging Face convention).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For role "tool": which call this is the result of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For role "tool": the tool's name, which some templates print.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.to_string(), content: content.into(), tool_calls: vec![], tool_call_id: None, name: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// An object: most templates apply `tojson` to it themselves.
    pub arguments: Value,
}

/// What gets rendered into prompt tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Prompt {
    pub messages: Vec<ChatMessage>,
    /// Tool definitions in the OpenAI function format the templates expect.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
    /// A plain prompt (text completions): no chat template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_prompt: Option<String>,
    /// The template's thinking switch (`enable_thinking`), when the request says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_thinking: Option<bool>,
}

/// A request's sampling settings. `None` is "not sent": the engine fills it
/// from the model's own defaults (its generation config), then the server's
/// flags (`--temperature`, ...), then the API defaults (1.0, 1.0, off, off).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Sampling {
    /// 0 means greedy (deterministic).
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 means off.
    pub top_k: Option<u32>,
    /// 0 means off.
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
}

impl Sampling {
    /// Greedy decoding (temperature 0), everything else as the model says.
    pub fn greedy() -> Sampling {
        Sampling { temperature: Some(0.0), ..Default::default() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// Requested; the engine clamps it to what fits in the context.
    pub max_tokens: u64,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// Test hook (`--enable-fault-injection`): fail this request on purpose.
    pub fault: Option<Fault>,
    /// Stream the model's thinking (otherwise it is kept out of the output).
    pub thinking: bool,
    /// Most tokens a thinking block may run before it is closed.
    pub thinking_budget: Option<u32>,
    /// `any` or a named tool: the model must call one.
    pub force_tool: Option<ForceTool>,
    /// The answer must be JSON (of a schema).
    pub format: Option<ResponseFormat>,
    /// Tools whose calls must follow their input schema.
    pub strict_tools: Vec<String>,
    /// The compiled grammar of `format`, `strict_tools` and `force_tool`
    /// (set by the engine handle before the request reaches the engine).
    pub constraint: Option<crate::constrain::Constraint>,
    /// The most context (prompt + output) this request may use, below the
    /// model's (Ollama's `num_ctx`).
    pub context_cap: Option<u64>,
    /// OpenAI `logprobs`: report each token's log-probability and this many
    /// alternatives (`Some(0)`: the chosen token's only).
    pub logprobs: Option<u8>,
}

/// A structured-output request (`response_format`, `output_config.format`).
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid under this schema.
    JsonSchema(Value),
}

/// Failures the tests inject (see `--enable-fault-injection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Raise a Python exception after this many generated tokens.
    RaiseAfter(u32),
    /// Panic the engine thread (engine death).
    KillEngine,
    /// This request's sampler raises while a compiled sampler is traced (the
    /// shape of the `top_k` bug): the request fails, nobody else may.
    RaiseInSampler,
    /// Every forward pass this request takes part in raises once it has
    /// generated this many tokens: a failure inside a batched step.
    RaiseInForwardAfter(u32),
    /// This request's sampler raises once it has drawn this many tokens:
    /// inside a batched step, after the step's logits processors ran.
    RaiseInSamplerAfter(u32),
    /// Break MLX's global random state outside the sampling guard (what the
    /// `top_k` bug did), so the health probe must notice.
    PoisonSampling,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ForceTool {
    Any,
    Named(String),
}

impl GenerateRequest {
    /// A plain request with defaults for the optional behaviours.
    pub fn new(prompt: Prompt, max_tokens: u64, sampling: Sampling, stop: Vec<String>) -> GenerateRequest {
        GenerateRequest {
            prompt,
            max_tokens,
            sampling,
            stop,
            fault: None,
            thinking: false,
            thinking_budget: None,
            force_tool: None,
            format: None,
            strict_tools: vec![],
            constraint: None,
            logprobs: None,
            context_cap: None,
        }
    }
}

// ---------------------------------------------------------------------------
// What a generation yields.

/// A classified piece of output text (the shim splits by the model's markers).
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Thinking(String),
    /// A parsed tool call: name and arguments object.
    ToolCall {
        name: String,
        arguments: Value,
    },
}

/// Why a generation ended, in API-neutral terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence(String),
    /// The turn ended after the model called tools.
    ToolUse,
}

/// What a [`Generation`](crate::engine::Generation) yields.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Text(String),
    Thinking(String),
    ToolCall(OutputToolCall),
    /// A generated token's log-probability (requests that ask), before the
    /// text it produced.
    Logprob(TokenLogprob),
    Done {
        reason: StopReason,
        output_tokens: u32,
    },
    Error(ApiError),
}

/// A token's log-probability under the distribution it was sampled from
/// (after grammar masks, before temperature), with the most likely
/// alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: Alternative,
    pub top: Vec<Alternative>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    /// The token's text (invalid UTF-8 replaced; `bytes` has it exactly).
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A tool call the model made. Each dialect gives it the id its clients
/// refer to it by (`toolu_…`, `call_…`) when it renders the call.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputToolCall {
    pub name: String,
    pub arguments: Value,
}

/// Everything a non-streaming response needs, in output order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Collected {
    /// Output blocks in order; adjacent pieces of one kind are merged.
    pub blocks: Vec<GenEvent>,
    /// Per-token log-probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
}

impl Collected {
    pub(crate) fn push(&mut self, ev: GenEvent) {
        if let GenEvent::Logprob(lp) = ev {
            self.logprobs.push(lp);
            return;
        }
        match (self.blocks.last_mut(), ev) {
            (Some(GenEvent::Text(a)), GenEvent::Text(b)) => a.push_str(&b),
            (Some(GenEvent::Thinking(a)), GenEvent::Thinking(b)) => a.push_str(&b),
            (_, ev) => self.blocks.push(ev),
        }
    }

    pub fn text(&self) -> String {
        self.blocks.iter().filter_map(|b| if let GenEvent::Text(t) = b { Some(t.as_str()) } else { None }).collect()
    }

    pub fn thinking(&self) -> Option<String> {
        let t: String =
            self.blocks.iter().filter_map(|b| if let GenEvent::Thinking(t) = b { Some(t.as_str()) } else { None }).collect();
        (!t.is_empty()).then_some(t)
    }

    pub fn tool_calls(&self) -> Vec<&OutputToolCall> {
        self.blocks.iter().filter_map(|b| if let GenEvent::ToolCall(c) = b { Some(c) } else { None }).collect()
    }
}

//! The prompt both dialects build, message by message: where system text
//! goes, tool results named after the call they answer, the system prompt
//! put first. Each dialect keeps only what its wire format does differently.

use crate::error::ApiError;
use crate::request::{ChatMessage, Prompt, Sampling, ToolCall};

#[derive(Default)]
pub struct PromptBuilder {
    system: Vec<String>,
    messages: Vec<ChatMessage>,
    /// tool-call id -> tool name, so a tool result can name its tool.
    call_names: Vec<(String, String)>,
}

impl PromptBuilder {
    /// Text of the request's own system field: part of the system prompt.
    pub fn system_prompt(&mut self, text: String) {
        if !text.trim().is_empty() {
            self.system.push(text);
        }
    }

    /// A system message. Before the conversation it joins the system prompt;
    /// later (Claude Code's environment block after the first user message,
    /// reminders after tool results) it stays where it stands, so the head of
    /// the prompt is the same turn after turn and session after session. Its
    /// volatile parts are dropped (see `strip_volatile`).
    pub fn system_message(&mut self, text: &str) {
        let text = super::strip_volatile(text);
        if self.messages.is_empty() {
            self.system_prompt(text);
        } else if !text.trim().is_empty() {
            self.messages.push(ChatMessage::new("system", text));
        }
    }

    pub fn user(&mut self, text: String) {
        self.messages.push(ChatMessage::new("user", text));
    }

    /// An assistant turn: its text and the tool calls it made (remembered,
    /// so later results can name their tool).
    pub fn assistant(&mut self, text: String, calls: Vec<ToolCall>) {
        for c in &calls {
            self.call_names.push((c.id.clone(), c.function.name.clone()));
        }
        let mut msg = ChatMessage::new("assistant", text);
        msg.tool_calls = calls;
        self.messages.push(msg);
    }

    /// A tool's result for call `id`, named `name` or, when the wire format
    /// does not say, after the latest call with that id.
    pub fn tool_result(&mut self, id: String, name: Option<String>, content: String) {
        let name = name.or_else(|| self.call_names.iter().rev().find(|(c, _)| *c == id).map(|(_, n)| n.clone()));
        self.messages.push(ChatMessage { role: "tool".into(), content, tool_calls: vec![], tool_call_id: Some(id), name });
    }

    /// The prompt, the system prompt first. `empty`: the error when no
    /// conversation message came (each dialect words it its own way).
    pub fn finish(
        mut self,
        tools: Vec<serde_json::Value>,
        enable_thinking: Option<bool>,
        empty: &str,
    ) -> Result<Prompt, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::InvalidRequest(empty.into()));
        }
        if !self.system.is_empty() {
            self.messages.insert(0, ChatMessage::new("system", self.system.join("\n\n")));
        }
        Ok(Prompt { messages: self.messages, tools, raw_prompt: None, enable_thinking })
    }
}

/// A request's sampling values as both dialects send them.
pub fn sampling(
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u64>,
    min_p: Option<f64>,
    seed: Option<u64>,
) -> Sampling {
    Sampling {
        temperature: temperature.map(|t| t as f32),
        top_p: top_p.map(|t| t as f32),
        top_k: top_k.map(|k| k.min(u32::MAX as u64) as u32),
        min_p: min_p.map(|t| t as f32),
        seed,
    }
}

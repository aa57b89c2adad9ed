//! API dialects. Each converts its wire format into the one internal
//! [`GenerateRequest`](crate::engine::GenerateRequest) at the edge and renders
//! engine events back into its own wire format.

pub mod anthropic;
pub mod ollama;
pub mod openai;
pub mod prompt;
pub mod responses;

use rand::Rng;
use serde::de::DeserializeOwned;

use crate::engine::{OutputToolCall, StopReason};
use crate::error::ApiError;

/// Parses a JSON body into a wire type, naming the offending field on error
/// (`messages[0].role: unknown variant ...`).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::InvalidRequest("request body is empty: expected a JSON object".into()));
    }
    // serde_json's recursion limit (128 levels) stays on: deeply nested JSON
    // is a 400, never a stack overflow.
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::InvalidRequest(format!("malformed JSON body: {msg}"))
        } else if path == "." {
            ApiError::InvalidRequest(format!("invalid request: {msg}"))
        } else {
            ApiError::InvalidRequest(format!("{path}: {msg}"))
        }
    })?;
    de.end().map_err(|e| ApiError::InvalidRequest(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

/// Turns one generation's events into a dialect's event-stream text. The
/// handler drives it; each method returns the bytes to send (maybe empty).
pub trait StreamRenderer: Send + 'static {
    /// Before any token (`message_start` / the role chunk).
    fn start(&mut self, prompt_tokens: u32, cached_tokens: u32) -> String;
    fn text(&mut self, delta: &str) -> String;
    fn thinking(&mut self, delta: &str) -> String;
    fn tool_call(&mut self, call: &OutputToolCall) -> String;
    /// A token's log-probability, before the text it produced (only
    /// requests that ask get these; dialects without them ignore it).
    fn logprob(&mut self, _lp: crate::request::TokenLogprob) -> String {
        String::new()
    }
    fn finish(&mut self, reason: &StopReason, prompt_tokens: u32, cached_tokens: u32, output_tokens: u32) -> String;
    /// A failure after the 200 header went out.
    fn error(&mut self, e: &ApiError) -> String;
    /// Sent when nothing else went out for a while.
    fn keepalive(&mut self) -> String;
    /// The stream's media type.
    fn content_type(&self) -> &'static str {
        "text/event-stream"
    }
}

/// A tool definition in the function format chat templates expect; both
/// dialects' tool lists convert through here. No schema means no parameters.
pub fn function_tool(
    kind: &str,
    name: &str,
    description: Option<&str>,
    parameters: Option<&serde_json::Value>,
) -> serde_json::Value {
    serde_json::json!({
        "type": kind,
        "function": {
            "name": name,
            "description": description.unwrap_or_default(),
            "parameters": parameters.cloned().unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
        }
    })
}

/// A tool call's arguments as JSON text, cut into a few fragments (on char
/// boundaries) the way hosted APIs stream them; concatenated they parse back
/// to the same object.
pub fn json_fragments(args: &serde_json::Value) -> Vec<String> {
    let text = args.to_string();
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(3).max(8);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// Drops the parts of a late system message that change every turn and mean
/// nothing to a local model: Claude Code's `<total_tokens>N tokens
/// left</total_tokens>` countdown (N changes each turn; kept, it would end the
/// reusable prefix right there).
pub fn strip_volatile(text: &str) -> String {
    const OPEN: &str = "<total_tokens>";
    const CLOSE: &str = "</total_tokens>";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        let Some(j) = rest[i..].find(CLOSE) else { break };
        out.push_str(&rest[..i]);
        rest = &rest[i + j + CLOSE.len()..];
    }
    out.push_str(rest);
    if out.len() == text.len() {
        return out;
    }
    out.trim().to_string()
}

/// A random id with the given prefix (`msg_`, `toolu_`, `chatcmpl-`).
/// Seconds since the epoch as an RFC 3339 UTC timestamp.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d) = crate::tokenizer::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..24).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("{prefix}{tail}")
}

/// Checks a sampling number against its documented range.
pub fn check_range(name: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => {
            Err(ApiError::InvalidRequest(format!("{name}: must be between {lo} and {hi}, got {x}")))
        }
        _ => Ok(()),
    }
}

/// Longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most bytes of all stop sequences of one request together.
pub const MAX_STOPS_TOTAL_BYTES: usize = 16 * 1024;

/// Stop strings: at most `max`, none empty, each at most `MAX_STOP_BYTES`
/// and all together at most `MAX_STOPS_TOTAL_BYTES`.
pub fn check_stops(name: &str, stops: &[String], max: usize) -> Result<(), ApiError> {
    if stops.len() > max {
        return Err(ApiError::InvalidRequest(format!("{name}: at most {max} stop sequences, got {}", stops.len())));
    }
    if let Some(i) = stops.iter().position(|s| s.is_empty()) {
        return Err(ApiError::InvalidRequest(format!("{name}[{i}]: must not be empty")));
    }
    if let Some(i) = stops.iter().position(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::InvalidRequest(format!(
            "{name}[{i}]: a stop sequence may be at most {MAX_STOP_BYTES} bytes, got {}",
            stops[i].len()
        )));
    }
    let total: usize = stops.iter().map(String::len).sum();
    if total > MAX_STOPS_TOTAL_BYTES {
        return Err(ApiError::InvalidRequest(format!(
            "{name}: the stop sequences may be at most {MAX_STOPS_TOTAL_BYTES} bytes together, got {total}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        a: u32,
        b: Vec<String>,
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_json::<T>(br#"{"a": 1, "b": [1]}"#).unwrap_err();
        assert!(e.message().starts_with("b[0]:"), "{}", e.message());
        let e = parse_json::<T>(br#"{"a": 1"#).unwrap_err();
        assert!(e.message().starts_with("malformed JSON"), "{}", e.message());
        let e = parse_json::<T>(b"").unwrap_err();
        assert!(e.message().contains("empty"));
        let e = parse_json::<T>(br#"{"b": []}"#).unwrap_err();
        assert!(e.message().contains("missing field `a`"), "{}", e.message());
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct V {
        v: serde_json::Value,
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{{\"v\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        let e = parse_json::<V>(deep.as_bytes()).unwrap_err();
        assert_eq!(e.status(), 400);
        // In an ignored field serde skips it without recursion: accepted, no crash.
        let ignored = format!("{{\"a\":1,\"b\":[],\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_json::<T>(ignored.as_bytes()).is_ok());
    }

    #[test]
    fn trailing_garbage_is_rejected() {
        let e = parse_json::<T>(br#"{"a": 1, "b": []} xyz"#).unwrap_err();
        assert!(e.message().starts_with("malformed JSON"), "{}", e.message());
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn json_fragments_reassemble() {
        let v = serde_json::json!({"city": "Zürich", "days": [1, 2, 3], "nested": {"ok": true}});
        let f = json_fragments(&v);
        assert!(f.len() > 1);
        let back: serde_json::Value = serde_json::from_str(&f.concat()).unwrap();
        assert_eq!(back, v);
        assert_eq!(json_fragments(&serde_json::json!({})).concat(), "{}");
    }

    #[test]
    fn the_token_countdown_is_dropped() {
        assert_eq!(strip_volatile("<total_tokens>123456 tokens left</total_tokens>"), "");
        assert_eq!(strip_volatile("keep <total_tokens>9 tokens left</total_tokens>\n"), "keep");
        assert_eq!(strip_volatile("no marker here\n"), "no marker here\n");
        assert_eq!(strip_volatile("open <total_tokens> never closed"), "open <total_tokens> never closed");
    }

    #[test]
    fn ids_have_prefix_and_entropy() {
        let a = new_id("msg_");
        let b = new_id("msg_");
        assert!(a.starts_with("msg_") && a.len() == 28);
        assert_ne!(a, b);
    }

    #[test]
    fn ranges_and_stops() {
        assert!(check_range("temperature", Some(1.5), 0.0, 1.0).is_err());
        assert!(check_range("temperature", Some(f64::NAN), 0.0, 1.0).is_err());
        assert!(check_range("temperature", Some(0.5), 0.0, 1.0).is_ok());
        assert!(check_range("temperature", None, 0.0, 1.0).is_ok());
        assert!(check_stops("stop", &["".into()], 4).is_err());
        assert!(check_stops("stop", &vec!["a".into(); 5], 4).is_err());
        assert!(check_stops("stop", &["x".repeat(MAX_STOP_BYTES)], 4).is_ok());
        let e = check_stops("stop", &["x".repeat(MAX_STOP_BYTES + 1)], 4).unwrap_err();
        assert!(e.message().contains("at most 1024 bytes"), "{}", e.message());
        assert!(check_stops("stop_sequences", &vec!["x".repeat(MAX_STOP_BYTES); 16], 64).is_ok());
        let e = check_stops("stop_sequences", &vec!["x".repeat(MAX_STOP_BYTES); 17], 64).unwrap_err();
        assert!(e.message().contains("together"), "{}", e.message());
    }
}

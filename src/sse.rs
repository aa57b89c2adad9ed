//! Server-sent events encoding.

use serde_json::Value;

/// One event: `event: NAME\ndata: JSON\n\n` (or just the data line when the
/// dialect names no events, as OpenAI's does). serde_json never emits a raw
/// newline inside a JSON text, so the data is always a single line.
pub fn encode(event: Option<&str>, data: &Value) -> String {
    encode_raw(event, &data.to_string())
}

pub fn encode_raw(event: Option<&str>, data: &str) -> String {
    debug_assert!(!data.contains('\n'));
    match event {
        Some(name) => format!("event: {name}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn named_event() {
        let s = encode(Some("ping"), &json!({"type": "ping"}));
        assert_eq!(s, "event: ping\ndata: {\"type\":\"ping\"}\n\n");
    }

    #[test]
    fn newlines_in_text_stay_escaped() {
        let s = encode(None, &json!({"text": "a\nb\r\n"}));
        assert_eq!(s.matches('\n').count(), 2);
        assert!(s.starts_with("data: {"));
        let back: Value = serde_json::from_str(s.trim_start_matches("data: ").trim_end()).unwrap();
        assert_eq!(back["text"], "a\nb\r\n");
    }
}

//! One error type for everything a request can run into, and the one place
//! that maps it to an HTTP status and to each API dialect's error body.

use hyper::StatusCode;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The request is malformed or asks for something we cannot do (400).
    InvalidRequest(String),
    /// Missing or wrong API key (401).
    Authentication(String),
    /// Refused whoever asks: a browser origin or a host name this server
    /// does not answer to (403).
    Forbidden(String),
    /// No such route or resource (404).
    NotFound(String),
    /// The route exists but not for this method (405).
    MethodNotAllowed { message: String, allow: &'static str },
    /// Body over --max-body-bytes (413).
    RequestTooLarge(String),
    /// The client was too slow sending its request (408).
    RequestTimeout(String),
    /// A body that is not JSON by its content-type (415).
    UnsupportedMediaType(String),
    /// Admission refused: slots and queue full, or memory low (529).
    Overloaded { message: String, retry_after_secs: u64 },
    /// The engine is loading, dead or shutting down (503).
    Unavailable(String),
    /// A failure inside generation, e.g. a Python exception (500).
    Internal(String),
}

/// Which wire dialect an error is rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Anthropic,
    OpenAi,
    /// `{"error": "message"}`.
    Ollama,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Authentication(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Overloaded { .. } => StatusCode::from_u16(529).unwrap(),
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ApiError::InvalidRequest(m)
            | ApiError::Authentication(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::MethodNotAllowed { message: m, .. }
            | ApiError::RequestTooLarge(m)
            | ApiError::RequestTimeout(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::Unavailable(m)
            | ApiError::Internal(m) => m,
            ApiError::Overloaded { message, .. } => message,
        }
    }

    /// What a client may see of this error. An internal error's text (a
    /// Python exception's message, paths, internals) goes to the log under
    /// the request id; the client gets the id, the exception's class and a
    /// short message.
    pub fn for_client(&self, request_id: &str) -> ApiError {
        match self {
            ApiError::Internal(raw) => {
                tracing::error!(request_id, error = %raw, "internal error");
                // "generation failed: RuntimeError: …" -> RuntimeError
                let class = raw.split(": ").find(|c| {
                    c.len() <= 64
                        && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '.')
                        && (c.ends_with("Error") || c.ends_with("Exception"))
                });
                ApiError::Internal(match class {
                    Some(c) => format!("internal error ({c}) while serving request {request_id}; the server log has the details"),
                    None => format!("internal error while serving request {request_id}; the server log has the details"),
                })
            }
            other => other.clone(),
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded { retry_after_secs, .. } => Some(*retry_after_secs),
            ApiError::Unavailable(_) => Some(5),
            _ => None,
        }
    }

    /// The Anthropic `error.type` for this error.
    pub fn anthropic_type(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request_error",
            ApiError::Authentication(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::MethodNotAllowed { .. } => "invalid_request_error",
            ApiError::RequestTooLarge(_) => "request_too_large",
            ApiError::RequestTimeout(_) | ApiError::UnsupportedMediaType(_) => "invalid_request_error",
            ApiError::Overloaded { .. } => "overloaded_error",
            ApiError::Unavailable(_) => "api_error",
            ApiError::Internal(_) => "api_error",
        }
    }

    /// The OpenAI `error.type` for this error.
    pub fn openai_type(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_)
            | ApiError::MethodNotAllowed { .. }
            | ApiError::RequestTooLarge(_)
            | ApiError::RequestTimeout(_)
            | ApiError::UnsupportedMediaType(_) => "invalid_request_error",
            ApiError::Authentication(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::Overloaded { .. } => "server_overloaded",
            ApiError::Unavailable(_) | ApiError::Internal(_) => "server_error",
        }
    }

    /// The JSON error body in the given dialect.
    pub fn body(&self, dialect: Dialect, request_id: Option<&str>) -> Value {
        match dialect {
            Dialect::Anthropic => {
                let mut v = json!({
                    "type": "error",
                    "error": {"type": self.anthropic_type(), "message": self.message()},
                });
                if let Some(id) = request_id {
                    v["request_id"] = json!(id);
                }
                v
            }
            Dialect::Ollama => json!({"error": self.message()}),
            Dialect::OpenAi => json!({
                "error": {
                    "message": self.message(),
                    "type": self.openai_type(),
                    "param": Value::Null,
                    "code": Value::Null,
                }
            }),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.status())
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_shape_and_status() {
        let e = ApiError::InvalidRequest("messages: must not be empty".into());
        assert_eq!(e.status(), 400);
        let b = e.body(Dialect::Anthropic, Some("req_1"));
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["message"], "messages: must not be empty");
        assert_eq!(b["request_id"], "req_1");
    }

    #[test]
    fn overloaded_is_529_with_retry_after() {
        let e = ApiError::Overloaded { message: "full".into(), retry_after_secs: 2 };
        assert_eq!(e.status().as_u16(), 529);
        assert_eq!(e.retry_after(), Some(2));
        assert_eq!(e.body(Dialect::Anthropic, None)["error"]["type"], "overloaded_error");
    }

    #[test]
    fn openai_shape() {
        let e = ApiError::Authentication("bad key".into());
        let b = e.body(Dialect::OpenAi, None);
        assert_eq!(b["error"]["message"], "bad key");
        assert_eq!(b["error"]["type"], "authentication_error");
        assert!(b["error"]["param"].is_null());
        assert_eq!(e.status(), 401);
    }

    #[test]
    fn every_variant_maps_consistently() {
        let all = [
            ApiError::InvalidRequest("x".into()),
            ApiError::Authentication("x".into()),
            ApiError::Forbidden("x".into()),
            ApiError::NotFound("x".into()),
            ApiError::MethodNotAllowed { message: "x".into(), allow: "GET" },
            ApiError::RequestTooLarge("x".into()),
            ApiError::RequestTimeout("x".into()),
            ApiError::UnsupportedMediaType("x".into()),
            ApiError::Overloaded { message: "x".into(), retry_after_secs: 1 },
            ApiError::Unavailable("x".into()),
            ApiError::Internal("x".into()),
        ];
        for e in all {
            let s = e.status().as_u16();
            assert!((400..600).contains(&s));
            // Client errors are never typed as server errors and vice versa.
            let t = e.anthropic_type();
            if s >= 500 {
                assert!(t == "api_error" || t == "overloaded_error", "{e:?}");
            } else {
                assert_ne!(t, "api_error", "{e:?}");
            }
        }
    }
}

//! The route table: every route's path, methods, dialect and metric label in
//! one place (routing, 405's `Allow`, the error shape and the metrics label
//! all read it).

use hyper::Method;

use crate::error::Dialect;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    Models,
    /// `/v1/models/{id}`
    Model,
    Messages,
    CountTokens,
    ChatCompletions,
    Completions,
    /// Ollama's API (`/api/...`).
    OllamaChat,
    OllamaGenerate,
    OllamaTags,
    OllamaShow,
    OllamaPs,
    OllamaVersion,
    /// `/api/pull`, `push`, `create`, `delete`, `copy`: answered with what
    /// pensieve does instead.
    OllamaManage,
    /// OpenAI's Responses API.
    Responses,
    /// `/v1/responses/{id}`: a stored response.
    Response,
}

/// Ollama's model-management paths (one route, `OllamaManage`).
const OLLAMA_MANAGE: [&str; 5] = ["/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy"];

impl Route {
    pub const ALL: [Route; 17] = [
        Route::Health,
        Route::Metrics,
        Route::Models,
        Route::Model,
        Route::Messages,
        Route::CountTokens,
        Route::ChatCompletions,
        Route::Completions,
        Route::OllamaChat,
        Route::OllamaGenerate,
        Route::OllamaTags,
        Route::OllamaShow,
        Route::OllamaPs,
        Route::OllamaVersion,
        Route::OllamaManage,
        Route::Responses,
        Route::Response,
    ];

    /// The path (for `Model`, the prefix before the id).
    pub fn path(self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::Models => "/v1/models",
            Route::Model => "/v1/models/",
            Route::Messages => "/v1/messages",
            Route::CountTokens => "/v1/messages/count_tokens",
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::OllamaChat => "/api/chat",
            Route::OllamaGenerate => "/api/generate",
            Route::OllamaTags => "/api/tags",
            Route::OllamaShow => "/api/show",
            Route::OllamaPs => "/api/ps",
            Route::OllamaVersion => "/api/version",
            Route::OllamaManage => OLLAMA_MANAGE[0],
            Route::Responses => "/v1/responses",
            Route::Response => "/v1/responses/",
        }
    }

    pub fn methods(self) -> &'static [Method] {
        match self {
            Route::Health
            | Route::Metrics
            | Route::Models
            | Route::Model
            | Route::OllamaTags
            | Route::OllamaPs
            | Route::OllamaVersion => &[Method::GET],
            Route::Messages
            | Route::CountTokens
            | Route::ChatCompletions
            | Route::Completions
            | Route::OllamaChat
            | Route::OllamaGenerate
            | Route::OllamaShow
            | Route::Responses => &[Method::POST],
            Route::OllamaManage => &[Method::POST, Method::DELETE],
            Route::Response => &[Method::GET, Method::DELETE],
        }
    }

    /// The value of a 405's `Allow` header.
    pub fn allow(self) -> &'static str {
        match self.methods() {
            [m] if *m == Method::GET => "GET",
            [_] => "POST",
            [m, _] if *m == Method::GET => "GET, DELETE",
            _ => "POST, DELETE",
        }
    }

    pub fn dialect(self) -> Dialect {
        match self {
            Route::ChatCompletions | Route::Completions | Route::Responses | Route::Response => Dialect::OpenAi,
            Route::OllamaChat
            | Route::OllamaGenerate
            | Route::OllamaTags
            | Route::OllamaShow
            | Route::OllamaPs
            | Route::OllamaVersion
            | Route::OllamaManage => Dialect::Ollama,
            _ => Dialect::Anthropic,
        }
    }

    /// The `route` label of metrics and log lines.
    pub fn label(self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Models | Route::Model => "models",
            Route::Messages => "messages",
            Route::CountTokens => "count_tokens",
            Route::ChatCompletions => "chat_completions",
            Route::Completions => "completions",
            Route::OllamaChat => "ollama_chat",
            Route::OllamaGenerate => "ollama_generate",
            Route::OllamaTags | Route::OllamaShow | Route::OllamaPs => "ollama_models",
            Route::OllamaVersion => "ollama_version",
            Route::OllamaManage => "ollama_manage",
            Route::Responses | Route::Response => "responses",
        }
    }

    /// Whether the API key (when one is set) is required.
    pub fn needs_key(self) -> bool {
        !matches!(self, Route::Health | Route::Metrics)
    }

    /// The route a path names (a trailing slash is ignored), with the
    /// model id for `/v1/models/{id}`.
    pub fn resolve(path: &str) -> Option<(Route, Option<&str>)> {
        let path = path.trim_end_matches('/');
        if let Some(id) = path.strip_prefix(Route::Model.path()).filter(|id| !id.is_empty()) {
            return Some((Route::Model, Some(id)));
        }
        if let Some(id) = path.strip_prefix(Route::Response.path()).filter(|id| !id.is_empty()) {
            return Some((Route::Response, Some(id)));
        }
        if OLLAMA_MANAGE.contains(&path) {
            return Some((Route::OllamaManage, None));
        }
        Route::ALL.into_iter().find(|r| !matches!(r, Route::Model | Route::Response) && r.path() == path).map(|r| (r, None))
    }

    /// The error shape for a path, routed or not (an unknown path under an
    /// OpenAI prefix still gets OpenAI's shape).
    pub fn dialect_for(path: &str) -> Dialect {
        match Route::resolve(path) {
            Some((r, _)) => r.dialect(),
            None if path.starts_with("/v1/chat") || path.starts_with("/v1/completions") || path.starts_with("/v1/responses") => {
                Dialect::OpenAi
            }
            None if path.starts_with("/api/") => Dialect::Ollama,
            None => Dialect::Anthropic,
        }
    }

    /// The metrics label for a path ("other" for unknown paths: bounded cardinality).
    pub fn label_for(path: &str) -> &'static str {
        Route::resolve(path).map(|(r, _)| r.label()).unwrap_or("other")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_resolves_from_its_own_path() {
        for r in Route::ALL {
            let path = match r {
                Route::Model => "/v1/models/some-model".to_string(),
                Route::Response => "/v1/responses/resp_1".to_string(),
                _ => r.path().to_string(),
            };
            assert_eq!(Route::resolve(&path).map(|x| x.0), Some(r), "{path}");
            assert_eq!(Route::resolve(&format!("{path}/")).map(|x| x.0), Some(r), "{path}/");
        }
        assert_eq!(Route::resolve("/v1/models/a/b"), Some((Route::Model, Some("a/b"))));
        assert_eq!(Route::resolve("/v1/models/"), Some((Route::Models, None)));
        assert_eq!(Route::resolve("/v1/nothing"), None);
        assert_eq!(Route::label_for("/v1/nothing"), "other");
        assert_eq!(Route::dialect_for("/v1/chat/nothing"), Dialect::OpenAi);
        assert_eq!(Route::dialect_for("/v1/messages"), Dialect::Anthropic);
        assert_eq!(Route::Messages.allow(), "POST");
        assert_eq!(Route::Health.allow(), "GET");
    }
}
